#!/usr/bin/env python3
"""Joins tca-gpu-bench's bench.csv with sdpa_baseline.py's CSV and prints the short
table and the targets of issue 12. Usage: summarize.py BENCH_CSV SDPA_CSV [OUT_MD].

Columns: TF/s on kept pairs of TCA's sparse attention kernel; TCA (selection + sparse
attention) against cuDNN's dense causal attention (x cuDNN = cuDNN ms / TCA ms) and
against keep x cuDNN (what cuDNN would take if its time scaled with the kept pairs);
FlexAttention on the same S_G + window (its BlockMask build not timed) against TCA's
attention kernel alone and against TCA's total; decode per token (sparse / dense, cache
out of L2) and its share of the measured device copy bandwidth; where bench.csv has them,
decode with and without programmatic dependent launch side by side, and a line through
each model's shortest and longest L (fixed us per token + bytes / marginal bandwidth).
SDPA_CSV may be a path that does not exist (no baselines)."""
import csv, sys

bench = list(csv.DictReader(open(sys.argv[1])))
base = {}
try:
    for r in csv.DictReader(open(sys.argv[2])):
        if r["ms"]:
            base[(r["model"], int(r["L"]), r["backend"])] = float(r["ms"])
except FileNotFoundError:
    pass
lines = []
p = lines.append
p("| model | L | kernel | keep | TCA ms | sel % | attn ms | TF/s kept | own dense ms | cuDNN ms | flash ms | x cuDNN "
  "| TCA/(keep x cuDNN) | Flex ms | Flex/attn | Flex/TCA | dec us (sparse/dense) | dec x | dec GB/s (% copy) |")
p("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in bench:
    m, L = r["model"], int(r["L"])
    f = lambda k: float(r[k])
    cud = base.get((m, L, "cudnn"))
    fla = base.get((m, L, "flash"))
    flx = base.get((m, L, "flex"))
    tca, att = f("tca_ms"), f("attention_ms")
    bw = f("copy_GBps")
    x = f"{cud / tca:.2f}" if cud else "-"
    ratio = f"{tca / (f('keep_frac') * cud):.2f}" if cud else "-"
    fx = f"{flx / att:.2f}" if flx else "-"
    ft = f"{flx / tca:.2f}" if flx else "-"
    p(f"| {m} | {L} | {r.get('attention_kernel', '?')} | {f('keep_frac'):.3f} | {tca:.2f} | {100 * f('selection_share'):.1f} | "
      f"{att:.2f} | {f('tflops_kept_attn'):.0f} | {f('dense_ms'):.2f} | {cud if cud else '-'} | {fla if fla else '-'} | {x} | {ratio} | "
      f"{flx if flx else '-'} | {fx} | {ft} | {f('decode_sparse_us'):.1f}/{f('decode_dense_us'):.1f} | {f('decode_speedup'):.2f} | "
      f"{f('decode_sparse_GBps'):.0f} ({100 * f('decode_sparse_GBps') / bw:.0f}%) |")
if bench and "decode_sparse_us_pdl" in bench[0]:
    p("")
    p("Decode by launch path (us per token, cache out of L2; PDL = programmatic dependent launch, "
      "plain = cuLaunchKernel; same run, paths alternated):")
    p("| model | L | PDL sparse/dense | plain sparse/dense | plain / PDL sparse | sparse GB/s PDL (% copy) |")
    p("|---|---|---|---|---|---|")
    for r in bench:
        f = lambda k: float(r[k]) if r.get(k) not in (None, "") else float("nan")
        sp, pl = f("decode_sparse_us_pdl"), f("decode_sparse_us_plain")
        gbs = float(r["kv_bytes_tca"]) / (sp * 1e3)
        p(f"| {r['model']} | {r['L']} | {sp:.1f}/{f('decode_dense_us_pdl'):.1f} | {pl:.1f}/{f('decode_dense_us_plain'):.1f} | "
          f"{pl / sp:.2f} | {gbs:.0f} ({100 * gbs / f('copy_GBps'):.0f}%) |")
if bench and "decode_sparse_us_pdl" in bench[0]:
    # Time per token = fixed + bytes / marginal bandwidth, through the shortest and longest
    # L of each model (the default launch path's times and the bytes each path reads).
    p("")
    p("Decode fitted through the shortest and longest L: fixed us per token + bytes / marginal GB/s:")
    p("| model | path | fixed us | marginal GB/s (% copy) |")
    p("|---|---|---|---|")
    for m in sorted({r["model"] for r in bench}):
        rs = sorted((r for r in bench if r["model"] == m), key=lambda r: int(r["L"]))
        if len(rs) < 2:
            continue
        a, z = rs[0], rs[-1]
        for path, t, nb in [("sparse", "decode_sparse_us", "kv_bytes_tca"), ("dense", "decode_dense_us", "kv_bytes_full")]:
            ta, tz = float(a[t]), float(z[t])
            ba, bz = float(a[nb]) / 1e6, float(z[nb]) / 1e6
            slope = (tz - ta) / (bz - ba)  # us per MB
            gbs = 1e3 / slope
            p(f"| {m} | {path} | {ta - ba * slope:.1f} | {gbs:.0f} ({100 * gbs / float(z['copy_GBps']):.0f}%) |")
p("")
p("Targets at the longest L per model (copy bandwidth = measured device-to-device copy, read + write; "
  "decode with the cache out of L2):")
for m in sorted({r["model"] for r in bench}):
    rs = [r for r in bench if r["model"] == m]
    r = max(rs, key=lambda r: int(r["L"]))
    L = int(r["L"])
    f = lambda k: float(r[k])
    cud = base.get((m, L, "cudnn"))
    flx = base.get((m, L, "flex"))
    res = []
    tfk = f("tflops_kept_attn")
    goal = 550 if int(r["d"]) == 128 else 450
    res.append(f"attention >= {goal} TF/s kept: {tfk:.0f} -> {'MET' if tfk >= goal else 'not met'}")
    if cud:
        ratio = f("tca_ms") / (f("keep_frac") * cud)
        res.append(f"TCA <= 1.15 x keep x cuDNN: {ratio:.2f}x -> {'MET' if ratio <= 1.15 else 'not met'}")
        res.append(f"x cuDNN: {cud / f('tca_ms'):.2f}")
    if flx:
        res.append(f"faster than FlexAttention on the same mask: {flx / f('attention_ms'):.2f}x (attention), "
                   f"{flx / f('tca_ms'):.2f}x (TCA total) -> {'MET' if flx > f('attention_ms') else 'not met'}")
    bwf = f("decode_sparse_GBps") / f("copy_GBps")
    res.append(f"decode >= 80% of copy bandwidth: {100 * bwf:.0f}% -> {'MET' if bwf >= 0.8 else 'not met'}")
    ds = f("decode_speedup")
    res.append(f"decode >= 2.5x dense: {ds:.2f}x -> {'MET' if ds >= 2.5 else 'not met'}")
    p(f"- {m} L={L}: " + "; ".join(res))
out = "\n".join(lines)
print(out)
if len(sys.argv) > 3:
    open(sys.argv[3], "w").write(out + "\n")
