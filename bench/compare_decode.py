#!/usr/bin/env python3
"""Compares two `tca decode --out` folders on the same input (the CPU's and the GPU's):
the caches per KV head (compactions, tokens held, peak) and, step by step, the eviction
regret gamma of every (query head, step). Prints a summary and the true readings'
violations of each; exits 1 when the caches' shapes differ.
Usage: compare_decode.py CPU_DIR GPU_DIR"""
import csv
import json
import sys

TRUE = ("linf_entrymax", "l1_induced", "l2_diameter")


def load(d):
    s = json.load(open(f"{d}/summary.json"))
    rows = {(int(r["head"]), int(r["query"])): r for r in csv.DictReader(open(f"{d}/queries.csv"))}
    return s, rows


def main(a_dir, b_dir):
    (sa, ra), (sb, rb) = load(a_dir), load(b_dir)
    keys = ("compactions", "global_tokens", "window_tokens", "peak_tokens", "block_keep")
    ha, hb = sa["decode"]["heads"], sb["decode"]["heads"]
    same = len(ha) == len(hb) and all(x[k] == y[k] for x, y in zip(ha, hb) for k in keys)
    print(f"caches per KV head ({', '.join(keys)}): {'equal' if same else 'DIFFERENT'}")
    for x, y in zip(ha, hb):
        print("  kv", x["kv_head"], {k: (x[k], y[k]) for k in keys})
    if ra.keys() != rb.keys():
        print("the two runs audited different (head, step) rows")
        return 1
    dg = sorted(abs(float(ra[k]["gamma"]) - float(rb[k]["gamma"])) for k in ra)
    far = sum(x > 1e-3 for x in dg)
    print(f"{len(dg)} (query head, step) rows: |gamma_a - gamma_b| max {dg[-1]:.3g}, "
          f"median {dg[len(dg) // 2]:.3g}, above 1e-3 at {far}")
    for name, s in (("a", sa), ("b", sb)):
        v = {r: (s["readings"][r]["violations"], s["readings"][r]["with_power"]) for r in TRUE}
        print(f"{name} ({s['context']['backend']}): true readings violations / checks with power {v}; "
              f"mean gamma {s['mean_gamma']:.4g}, max {s['max_gamma']:.4g}")
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
