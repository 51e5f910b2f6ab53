#!/usr/bin/env python3
"""Peer baseline: PyTorch SDPA (flash and cuDNN backends) causal prefill, bf16, on the
shapes of tca-gpu-bench (LLaMA-3.1-8B layer 32/8 d=128, SmolLM2 9/3 d=64), batch 1.
GQA through enable_gqa=True (K/V are not repeated). CUDA events, median of runs after
warm-up. Writes a CSV (model,L,hq,hkv,d,backend,ms,tflops)."""
import argparse, csv, statistics, sys
import torch
from torch.nn.attention import sdpa_kernel, SDPBackend
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--lens", default="8192,16384,32768,65536,131072")
ap.add_argument("--models", default="llama,smol")
ap.add_argument("--iters", type=int, default=10)
a = ap.parse_args()
models = {"llama": (32, 8, 128), "smol": (9, 3, 64)}
backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
print("torch", torch.__version__, torch.cuda.get_device_name(0), flush=True)
rows = []
for m in a.models.split(","):
    hq, hkv, d = models[m]
    for L in [int(x) for x in a.lens.split(",")]:
        g = torch.Generator(device="cuda").manual_seed(L)
        q = torch.randn(1, hq, L, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, hkv, L, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, hkv, L, d, device="cuda", dtype=torch.bfloat16, generator=g)
        ref = None
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
                    for _ in range(2):
                        f()
                    ts = []
                    for _ in range(a.iters):
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record(); f(); e.record(); torch.cuda.synchronize()
                        ts.append(s.elapsed_time(e))
                ms = statistics.median(ts)
                fl = 4 * d * hq * L * (L + 1) / 2
                rows.append(dict(model=m, L=L, hq=hq, hkv=hkv, d=d, backend=name, ms=round(ms, 4),
                                 tflops=round(fl / (ms * 1e9), 1), max_diff_vs_first=err))
                print(f"{m:6} L={L:6} {name:6} {ms:9.3f} ms {fl / (ms * 1e9):6.1f} TF/s", flush=True)
            except Exception as ex:  # a backend that refuses a shape is recorded, not fatal
                rows.append(dict(model=m, L=L, hq=hq, hkv=hkv, d=d, backend=name, ms="", tflops="",
                                 max_diff_vs_first=f"error: {str(ex)[:120]}"))
                print(f"{m:6} L={L:6} {name:6} failed: {ex}", file=sys.stderr, flush=True)
        del q, k, v, ref
        torch.cuda.empty_cache()
with open(a.out, "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
    w.writeheader(); w.writerows(rows)
