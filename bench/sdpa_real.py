#!/usr/bin/env python3
"""PyTorch SDPA (cuDNN and flash backends) causal prefill on captured real Q/K/V
(`tca capture --backend cuda` safetensors: layer{i}.q [Hq, L, d], .k/.v [Hkv, L, d],
f32, rounded to bf16 here as the project's kernels read them), and on seeded random
inputs of the same shape (dense attention's time does not depend on the values; the
pair shows it). Timed as tca-gpu-model times its kernels: warm-up runs, then CUDA
events around each run with the work queued behind torch.cuda._sleep so host gaps are
not timed; median and min. GQA through enable_gqa=True. Appends to a CSV:
tokens,layer,input,backend,median_ms,min_ms,tflops."""
import argparse, csv, os, statistics, sys
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from safetensors import safe_open

ap = argparse.ArgumentParser()
ap.add_argument("--capture", required=True, help="capture .safetensors file")
ap.add_argument("--out", required=True)
ap.add_argument("--iters", type=int, default=10)
ap.add_argument("--warm", type=int, default=2)
a = ap.parse_args()
backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
rows = []
with safe_open(a.capture, framework="pt", device="cpu") as f:
    names = sorted({k.rsplit(".", 1)[0] for k in f.keys() if k.startswith("layer")})
    for layer in names:
        q = f.get_tensor(layer + ".q").to("cuda", torch.bfloat16).unsqueeze(0)
        k = f.get_tensor(layer + ".k").to("cuda", torch.bfloat16).unsqueeze(0)
        v = f.get_tensor(layer + ".v").to("cuda", torch.bfloat16).unsqueeze(0)
        _, hq, L, d = q.shape
        g = torch.Generator(device="cuda").manual_seed(L)
        inputs = {"real": (q, k, v),
                  "random": tuple(torch.randn(x.shape, device="cuda", dtype=torch.bfloat16, generator=g) for x in (q, k, v))}
        for kind, (qq, kk, vv) in inputs.items():
            for name, be in backends.items():
                try:
                    with sdpa_kernel([be]):
                        run = lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
                        o = run()
                        torch.cuda.synchronize()
                        if not torch.isfinite(o).all():
                            raise RuntimeError("non-finite output")
                        ts = []
                        for it in range(a.warm + a.iters):
                            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            torch.cuda._sleep(5_000_000)
                            s.record(); run(); e.record(); torch.cuda.synchronize()
                            if it >= a.warm:
                                ts.append(s.elapsed_time(e))
                    med, mn = statistics.median(ts), min(ts)
                    fl = 4 * d * hq * L * (L + 1) / 2
                    rows.append(dict(tokens=L, layer=layer[5:], input=kind, backend=name, median_ms=round(med, 4),
                                     min_ms=round(mn, 4), tflops=round(fl / (med * 1e9), 1)))
                    print(f"L={L:7} {layer:8} {kind:6} {name:6} {med:9.3f} ms (min {mn:.3f}) {fl / (med * 1e9):6.1f} TF/s", flush=True)
                except Exception as ex:
                    rows.append(dict(tokens=L, layer=layer[5:], input=kind, backend=name, median_ms="", min_ms="",
                                     tflops=f"error: {str(ex)[:100]}"))
                    print(f"L={L} {layer} {kind} {name} failed: {ex}", file=sys.stderr, flush=True)
        del q, k, v, inputs
        torch.cuda.empty_cache()
new = not os.path.exists(a.out)
with open(a.out, "a", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
    if new:
        w.writeheader()
    w.writerows(rows)
