#!/usr/bin/env python3
"""Per-layer relative error (Frobenius) of a GPU capture against a CPU capture (both
written by `tca capture`, f32 tensors layer{i}.q/k/v). Usage:
compare_capture.py CPU.safetensors GPU.safetensors OUT.csv LIMIT
Prints a table; exits 1 when any tensor's relative error exceeds LIMIT (or a tensor is
missing, of another shape, or non-finite)."""
import sys

import numpy as np
from safetensors.numpy import load_file


def main():
    cpu_path, gpu_path, out, limit = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    cpu, gpu = load_file(cpu_path), load_file(gpu_path)
    names = sorted(n for n in cpu if n.startswith("layer"))
    bad = 0
    rows = ["tensor,shape,rel_error,max_abs_error"]
    print(f"{'tensor':<12} {'shape':<18} {'rel. error':>11} {'max abs':>10}")
    for n in names:
        a, b = cpu[n].astype(np.float64), gpu.get(n)
        if b is None or b.shape != a.shape:
            print(f"{n}: missing or shape {None if b is None else b.shape} != {a.shape}")
            bad += 1
            continue
        b = b.astype(np.float64)
        if not np.isfinite(b).all():
            print(f"{n}: non-finite values in the GPU capture")
            bad += 1
            continue
        rel = float(np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-300))
        mx = float(np.abs(b - a).max())
        ok = rel <= limit
        bad += not ok
        shape = "x".join(map(str, a.shape))
        print(f"{n:<12} {shape:<18} {rel:>11.3e} {mx:>10.3e} {'ok' if ok else 'FAIL'}")
        rows.append(f"{n},{shape},{rel:.6e},{mx:.6e}")
    if not names:
        print("no layer tensors in the CPU capture")
        bad += 1
    with open(out, "w") as f:
        f.write("\n".join(rows) + "\n")
    print(f"{len(names)} tensors, {bad} over {limit:g} or broken")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
