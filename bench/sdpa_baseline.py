#!/usr/bin/env python3
"""Peer baselines on the shapes of tca-gpu-bench (LLaMA-3.1-8B layer 32/8 d=128, SmolLM2
9/3 d=64, Qwen2.5-7B 28/4 d=128), bf16, batch 1:
  - PyTorch SDPA causal prefill, flash and cuDNN backends (dense; GQA through
    enable_gqa=True, K/V not repeated);
  - PyTorch FlexAttention on TCA's own sparsity: a BlockMask (128 x 128 blocks) from the
    mask "key j <= query i and (i - j < w, or j in S_G of the KV head and j <= i - w)",
    with S_G read from the sg_{model}_{L}.json files tca-gpu-bench writes (--sg-dir).
    Building the BlockMask is timed separately and not included in the attention time.
Timed like tca-gpu-bench: W warm-ups, then N runs, each queued behind a GPU spin
(torch.cuda._sleep) so that host gaps are not timed, CUDA events; median and min.
Inputs: seeded torch.randn (the kernels' time does not depend on the values; the sparse
pattern is TCA's). Writes a CSV (model,L,hq,hkv,d,backend,ms,ms_min,tflops,...)."""
import argparse, csv, json, os, statistics, sys, time
import torch
from torch.nn.attention import sdpa_kernel, SDPBackend
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--lens", default="8192,16384,32768,65536,131072")
ap.add_argument("--models", default="llama,smol,qwen7b")
ap.add_argument("--iters", type=int, default=15, help="timed runs (tca-gpu-bench --iters)")
ap.add_argument("--warmup", type=int, default=3, help="warm-ups (tca-gpu-bench uses 3)")
ap.add_argument("--sleep-cycles", type=int, default=1_000_000,
                help="torch.cuda._sleep ahead of each timed run (GPU clock cycles)")
ap.add_argument("--sg-dir", default=None, help="directory with tca-gpu-bench's sg_*.json")
a = ap.parse_args()
models = {"llama": (32, 8, 128), "smol": (9, 3, 64), "qwen7b": (28, 4, 128)}
backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
print("torch", torch.__version__, torch.cuda.get_device_name(0), flush=True)


def timed(f):
    """(median ms, min ms) of a.iters runs after a.warmup warm-ups, each behind a spin."""
    for _ in range(a.warmup):
        f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(a.iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(a.sleep_cycles)
        s.record(); f(); e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts), min(ts)


def kept_pairs(rec):
    """Kept (query, key) pairs of TCA's pattern, all query heads (as tca-gpu-bench)."""
    L, w, g = rec["len"], rec["window"], rec["hq"] // rec["hkv"]
    win = sum(min(i + 1, w) for i in range(L))
    return sum(g * (win + sum(max(0, L - (p + w)) for p in s)) for s in rec["global"])


flex_fn = None


def flex_row(m, L, hq, hkv, d, q, k, v):
    """FlexAttention on TCA's S_G + window; returns a CSV row (raises on failure)."""
    global flex_fn
    from torch.nn.attention.flex_attention import flex_attention, create_block_mask
    if a.sg_dir is None:
        raise RuntimeError("no --sg-dir: the S_G files of tca-gpu-bench are needed")
    path = os.path.join(a.sg_dir, f"sg_{m}_{L}.json")
    rec = json.load(open(path))
    if (rec["len"], rec["hq"], rec["hkv"], rec["dim"]) != (L, hq, hkv, d):
        raise RuntimeError(f"{path}: shape {rec['len'], rec['hq'], rec['hkv'], rec['dim']} differs")
    W, G = rec["window"], hq // hkv
    sel = torch.zeros(hkv, L, dtype=torch.bool, device="cuda")
    for kv, s in enumerate(rec["global"]):
        if s:
            sel[kv, torch.tensor(s, device="cuda", dtype=torch.long)] = True

    def mask_mod(b, h, qi, kj):
        return (kj <= qi) & ((qi - kj < W) | (sel[h // G, kj] & (kj + W <= qi)))

    t0 = time.time()
    bm = create_block_mask(mask_mod, 1, hq, L, L, device="cuda", BLOCK_SIZE=128, _compile=True)
    torch.cuda.synchronize()
    mask_s = time.time() - t0
    if flex_fn is None:
        flex_fn = torch.compile(flex_attention, dynamic=False)
    f = lambda: flex_fn(q, k, v, block_mask=bm, enable_gqa=True)
    o = f()
    torch.cuda.synchronize()
    # Check the last 64 queries against the mask applied directly (f32).
    n = min(64, L)
    qi = torch.arange(L - n, L, device="cuda")
    kj = torch.arange(L, device="cuda")
    kvh = torch.arange(hq, device="cuda") // G
    keep = (kj[None, None, :] <= qi[None, :, None]) & (
        (qi[None, :, None] - kj[None, None, :] < W)
        | (sel[kvh][:, None, :] & (kj[None, None, :] + W <= qi[None, :, None])))
    kf = k[0].float().repeat_interleave(G, 0)
    vf = v[0].float().repeat_interleave(G, 0)
    sc = q[0, :, L - n:].float() @ kf.transpose(1, 2) / d ** 0.5
    sc = sc.masked_fill(~keep, float("-inf"))
    ref = torch.softmax(sc, -1) @ vf
    err = ((o[0, :, L - n:].float() - ref).abs().max() / ref.abs().max()).item()
    del kf, vf, sc, ref, keep
    ms, ms_min = timed(f)
    kept = kept_pairs(rec)
    return dict(model=m, L=L, hq=hq, hkv=hkv, d=d, backend="flex", ms=round(ms, 4),
                ms_min=round(ms_min, 4), tflops=round(4 * d * kept / (ms * 1e9), 1),
                tflops_basis="kept pairs of TCA's S_G + window", check=f"rel err last {n} queries {err:.2e}",
                extra=f"block mask build {mask_s:.1f} s (not timed); block sparsity {bm.sparsity():.1f}%")


rows = []
for m in a.models.split(","):
    hq, hkv, d = models[m]
    for L in [int(x) for x in a.lens.split(",")]:
        g = torch.Generator(device="cuda").manual_seed(L)
        q = torch.randn(1, hq, L, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, hkv, L, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, hkv, L, d, device="cuda", dtype=torch.bfloat16, generator=g)
        ref = None
        fl = 4 * d * hq * L * (L + 1) / 2
        for name, be in backends.items():
            try:
                with sdpa_kernel([be]):
                    f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    o = f()
                    torch.cuda.synchronize()
                    if ref is None:
                        ref = o.float()
                        err = 0.0
                    else:
                        err = (o.float() - ref).abs().max().item()
                    ms, ms_min = timed(f)
                rows.append(dict(model=m, L=L, hq=hq, hkv=hkv, d=d, backend=name, ms=round(ms, 4),
                                 ms_min=round(ms_min, 4), tflops=round(fl / (ms * 1e9), 1),
                                 tflops_basis="causal pairs", check=f"max diff vs first backend {err:.3g}",
                                 extra=""))
                print(f"{m:6} L={L:6} {name:6} {ms:9.3f} ms (min {ms_min:.3f}) {fl / (ms * 1e9):6.1f} TF/s", flush=True)
            except Exception as ex:  # a backend that refuses a shape is recorded, not fatal
                rows.append(dict(model=m, L=L, hq=hq, hkv=hkv, d=d, backend=name, ms="", ms_min="",
                                 tflops="", tflops_basis="", check=f"error: {str(ex)[:160]}", extra=""))
                print(f"{m:6} L={L:6} {name:6} failed: {ex}", file=sys.stderr, flush=True)
        del ref
        try:
            r = flex_row(m, L, hq, hkv, d, q, k, v)
            rows.append(r)
            print(f"{m:6} L={L:6} flex   {r['ms']:9.3f} ms (min {r['ms_min']:.3f}) {r['tflops']:6.1f} TF/s kept; "
                  f"{r['check']}; {r['extra']}", flush=True)
        except Exception as ex:  # FlexAttention failing must not stop the other baselines
            rows.append(dict(model=m, L=L, hq=hq, hkv=hkv, d=d, backend="flex", ms="", ms_min="",
                             tflops="", tflops_basis="", check=f"error: {type(ex).__name__}: {str(ex)[:160]}", extra=""))
            print(f"{m:6} L={L:6} FlexAttention baseline failed ({type(ex).__name__}): {str(ex)[:300]}",
                  file=sys.stderr, flush=True)
        del q, k, v
        torch.cuda.empty_cache()
with open(a.out, "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
    w.writeheader(); w.writerows(rows)
