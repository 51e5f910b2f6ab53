#!/usr/bin/env python3
"""Case-by-case agreement of one attention's needle answers with exact attention's.
Usage: niah_case_agreement.py [--seed S] [--tau T] ATTENTION EXACT_RUNS PEER_RUN [EXACT_RUNS PEER_RUN ...]

A RUN is a folder with `tca quality-niah`'s niah.csv; EXACT_RUNS is one or more of them
joined by commas. The ATTENTION rows of PEER_RUN (at tau T if given; one row per case is
required) are matched with the exact rows of EXACT_RUNS by (task, length, seed, depth).
Prints, per pair and in total: the matched cases, those where both are right or both
wrong, those with the same answer text, and how many each got right. --seed keeps one
needle seed."""
import csv, sys

args = sys.argv[1:]
opt = {}
while args[:1] in (["--seed"], ["--tau"]) and len(args) > 1:
    opt[args[0]], args = args[1], args[2:]
if len(args) < 3 or len(args) % 2 == 0:
    sys.exit(__doc__)

def rows(runs, attention):
    out = {}
    for run in runs.split(","):
        for r in csv.DictReader(open(f"{run}/niah.csv")):
            if r["attention"] != attention or opt.get("--seed", r["seed"]) != r["seed"]:
                continue
            if attention != "exact" and "--tau" in opt and float(r["tau"]) != float(opt["--tau"]):
                continue
            k = (r["task"], r["length"], r["seed"], r["depth_pct"])
            if k in out:
                sys.exit(f"{run}: two {attention} rows for {k} (give --tau)")
            out[k] = r
    return out

att = args[0]
tot = [0, 0, 0, 0, 0]
for ex_runs, peer_run in zip(args[1::2], args[2::2]):
    ex, peer = rows(ex_runs, "exact"), rows(peer_run, att)
    keys = [k for k in peer if k in ex]
    if not keys or len(keys) < len(peer):
        sys.exit(f"{peer_run}: {len(peer) - len(keys)} of {len(peer)} {att} cases have no exact case in {ex_runs}")
    right = lambda d: sum(d[k]["correct"] == "1" for k in keys)
    v = (len(keys), sum(ex[k]["correct"] == peer[k]["correct"] for k in keys),
         sum(ex[k]["answer"] == peer[k]["answer"] for k in keys), right(ex), right(peer))
    print(f"{peer_run}: {att} against {ex_runs}: {v[0]} cases, right/wrong alike {v[1]}, "
          f"same answer {v[2]}; right: exact {v[3]}, {att} {v[4]}")
    tot = [a + b for a, b in zip(tot, v)]
print(f"all: {tot[0]} cases, right/wrong alike {tot[1]}, same answer {tot[2]}; "
      f"right: exact {tot[3]}, {att} {tot[4]}")
