#!/usr/bin/env python3
"""Joins tca-gpu-bench's bench.csv with sdpa_baseline.py's CSV and prints the short
table and the targets of issue 5. Usage: summarize.py BENCH_CSV SDPA_CSV [OUT_MD]."""
import csv, sys

bench = list(csv.DictReader(open(sys.argv[1])))
sdpa = {}
try:
    for r in csv.DictReader(open(sys.argv[2])):
        if r["ms"]:
            sdpa[(r["model"], int(r["L"]), r["backend"])] = float(r["ms"])
except FileNotFoundError:
    pass
lines = []
p = lines.append
p("| model | L | kernel | keep | TCA ms | sel % | attn ms | own dense ms | cuDNN ms | flash ms | x cuDNN | TCA/(keep x cuDNN) | TF/s kept | dec us (sparse/dense) | dec x | dec GB/s (% copy) |")
p("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in bench:
    m, L = r["model"], int(r["L"])
    f = lambda k: float(r[k])
    cud = sdpa.get((m, L, "cudnn"))
    fla = sdpa.get((m, L, "flash"))
    tca = f("tca_ms")
    bw = f("copy_GBps")
    x = f"{cud / tca:.2f}" if cud else "-"
    ratio = f"{tca / (f('keep_frac') * cud):.2f}" if cud else "-"
    p(f"| {m} | {L} | {r.get('attention_kernel', '?')} | {f('keep_frac'):.3f} | {tca:.2f} | {100 * f('selection_share'):.1f} | {f('attention_ms'):.2f} | "
      f"{f('dense_ms'):.2f} | {cud if cud else '-'} | {fla if fla else '-'} | {x} | {ratio} | {f('tflops_kept_attn'):.0f} | "
      f"{f('decode_sparse_us'):.1f}/{f('decode_dense_us'):.1f} | {f('decode_speedup'):.2f} | "
      f"{f('decode_sparse_GBps'):.0f} ({100 * f('decode_sparse_GBps') / bw:.0f}%) |")
p("")
p("Targets at the longest L per model (copy bandwidth = measured device-to-device copy, read + write):")
for m in sorted({r["model"] for r in bench}):
    rs = [r for r in bench if r["model"] == m]
    r = max(rs, key=lambda r: int(r["L"]))
    L = int(r["L"])
    f = lambda k: float(r[k])
    cud = sdpa.get((m, L, "cudnn"))
    res = []
    if cud:
        ratio = f("tca_ms") / (f("keep_frac") * cud)
        res.append(f"TCA <= 1.3 x keep x cuDNN: {ratio:.2f}x -> {'MET' if ratio <= 1.3 else 'not met'}")
        sp = cud / f("tca_ms")
        res.append(f">= 2.8x faster than cuDNN: {sp:.2f}x -> {'MET' if sp >= 2.8 else 'not met'}")
    s = f("selection_share")
    res.append(f"selection <= 10%: {100 * s:.1f}% -> {'MET' if s <= 0.10 else 'not met'}")
    bwf = f("decode_sparse_GBps") / f("copy_GBps")
    res.append(f"decode >= 80% of copy bandwidth: {100 * bwf:.0f}% -> {'MET' if bwf >= 0.8 else 'not met'}")
    ds = f("decode_speedup")
    res.append(f"decode >= 2.1x dense: {ds:.2f}x -> {'MET' if ds >= 2.1 else 'not met'}")
    p(f"- {m} L={L}: " + "; ".join(res))
out = "\n".join(lines)
print(out)
if len(sys.argv) > 3:
    open(sys.argv[3], "w").write(out + "\n")
