#!/usr/bin/env python3
"""Compares two calibration profiles (tca calibrate-model JSON) head by head: same
configuration, then per (layer, KV head) the global-token count, m, mu, expected budget
and whether tau was reached. Prints a summary and exits 1 when the configurations or the
shapes differ. Usage: compare_profiles.py A.json B.json"""
import json
import sys


def main(a_path, b_path):
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    if a["config"] != b["config"] or a["model"] != b["model"]:
        print(f"configurations differ:\n  {a['config']}\n  {b['config']}")
        return 1
    ha = {(l["layer"], h["kv_head"]): h for l in a["layers"] for h in l["heads"]}
    hb = {(l["layer"], h["kv_head"]): h for l in b["layers"] for h in l["heads"]}
    if ha.keys() != hb.keys():
        print("the profiles cover different (layer, KV head) pairs")
        return 1
    n = len(ha)
    same_m = sum(ha[k]["m"] == hb[k]["m"] for k in ha)
    same_reached = sum(ha[k]["reached_tau"] == hb[k]["reached_tau"] for k in ha)
    rel = lambda x, y: abs(x - y) / max(abs(x), abs(y), 1e-300)
    d_mu = max(abs(ha[k]["mu"] - hb[k]["mu"]) for k in ha)
    d_budget = max(rel(ha[k]["expected_budget"], hb[k]["expected_budget"]) for k in ha)
    d_glob = [abs(ha[k]["global_tokens"] - hb[k]["global_tokens"]) / max(ha[k]["global_tokens"], 1) for k in ha]
    d_ret = max(abs(ha[k]["retained"] - hb[k]["retained"]) for k in ha)
    print(f"{n} (layer, KV head) pairs: m equal at {same_m}, reached_tau equal at {same_reached}")
    print(f"max |mu_a - mu_b| = {d_mu:.3g}; max relative expected-budget difference = {d_budget:.3g}")
    print(f"|S_G| relative difference: max {max(d_glob):.3g}, mean {sum(d_glob) / n:.3g}; "
          f"max |retained_a - retained_b| = {d_ret:.3g}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
