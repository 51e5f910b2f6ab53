#!/usr/bin/env python3
"""Reads `tca bound` on the GPU (DIR/<case>/cuda: the verdict against the f64 oracle on
the bf16-rounded inputs, and `gpu_self`, the GPU's dense outputs against its sparse
ones), the oracle with its own selection on the same rounded inputs (DIR/<case>/cpu_bf16)
and on the full-precision inputs (DIR/<case>/cpu). Writes DIR/compare.json and prints a
table per case: rows audited, selection differences, max |gamma_gpu - gamma_oracle| where
the selections agree, and per true reading the verdict, the queries that could fail it,
violations and the queries with power, for the oracle audit and the GPU's own.
A case whose name starts with `fault_` was run with --fault-v-scale: its verdict must
fail while the GPU's own audit may not notice. Exits 1 when a true reading fails against
the oracle in a case without a fault, when a fault is not caught, or on any non-finite
value."""
import csv, json, os, sys

TRUE = ["identity", "linf_entrymax", "l1_induced", "l2_diameter"]


def load(d, csv_name="queries.csv"):
    with open(os.path.join(d, "summary.json")) as f:
        s = json.load(f)
    with open(os.path.join(d, csv_name)) as f:
        q = {(int(r["head"]), int(r["query"])): r for r in csv.DictReader(f)}
    with open(os.path.join(d, "selection.json")) as f:
        g = json.load(f)["global"]
    return s, q, g


def reading_row(s, key):
    r = s["readings"][key]
    return {k: r[k] for k in ("verdict", "measured", "violations", "non_finite", "with_power", "worst_ratio")}


root = sys.argv[1]
rows, bad = [], []
for case in sorted(os.listdir(root)):
    c, g, f = (os.path.join(root, case, x) for x in ("cpu_bf16", "cuda", "cpu"))
    if not os.path.isfile(os.path.join(g, "summary.json")):
        continue
    sg, _, gg = load(g)
    _, qself, _ = load(g, "queries_gpu_self.csv")
    own = sg["gpu_self"]
    row = {"case": case, "rows": sg["context"]["rows"], "queries_gpu_self": own["queries"],
           "selection_differences": sg.get("selection_differences"),
           "non_finite": sg["non_finite_queries"] + own["non_finite_queries"],
           "gpu_mean_gamma": sg["mean_gamma"], "gpu_keep": sg["mean_kept_fraction"],
           "allowance_rel_max": sg["tolerance"],
           "oracle": {k: reading_row(sg, k) for k in sg["readings"]},
           "gpu_self": {k: reading_row(own, k) for k in own["readings"]}}
    if os.path.isfile(os.path.join(c, "summary.json")):
        sc, qc, gc = load(c)
        hq = 1 + max(h for h, _ in qc)
        group = hq // len(gc)
        same = [a == b for a, b in zip(gc, gg)]
        diffs = [abs(float(qself[k]["gamma"]) - float(qc[k]["gamma"])) for k in qc
                 if same[k[0] // group] and k in qself]
        row["max_gamma_diff_same_selection"] = max(diffs) if diffs else None
        row["kv_heads_same_selection"] = f"{sum(same)}/{len(same)}"
        row["cpu_bf16"] = {k: reading_row(sc, k) for k in sc["readings"]}
    if os.path.isfile(os.path.join(f, "summary.json")):
        sf, _, _ = load(f)
        row["full_precision"] = {"mean_gamma": sf["mean_gamma"], "keep": sf["mean_kept_fraction"],
                                 "holds": {k: v["holds"] for k, v in sf["readings"].items()}}
    fails = [k for k in TRUE if sg["readings"][k]["verdict"] == "fails"]
    if case.startswith("fault_"):
        row["fault_caught"] = bool(fails)
        row["fault_seen_by_gpu_self"] = any(own["readings"][k]["verdict"] == "fails" for k in TRUE[1:])
        if not fails:
            bad.append(f"{case}: injected fault not caught")
    elif fails:
        bad.append(f"{case}: {fails} fail against the oracle")
    if row["non_finite"]:
        bad.append(f"{case}: {row['non_finite']} non-finite queries")
    rows.append(row)

with open(os.path.join(root, "compare.json"), "w") as fh:
    json.dump(rows, fh, indent=1)

print(f"{'case':<18} {'rows (oracle)':<22} {'S_G diff':>8} {'dgamma':>9}  reading: verdict measured/violations/power (oracle | gpu_self)")
for r in rows:
    dg = r.get("max_gamma_diff_same_selection")
    head = f"{r['case']:<18} {r['rows'][:22]:<22} {str(r['selection_differences']):>8} {('%.1e' % dg) if dg is not None else '-':>9}"
    parts = []
    for k in TRUE[1:] + ["l1_entrymax"]:
        o, s = r["oracle"][k], r["gpu_self"][k]
        parts.append(f"{k}: {o['verdict']} {o['measured']}/{o['violations']}/{o['with_power']} | "
                     f"{s['verdict']} {s['measured']}/{s['violations']}/{s['with_power']}")
    ident = r["oracle"]["identity"]
    parts.insert(0, f"identity: {ident['verdict']} {ident['measured']}/{ident['violations']}/{ident['with_power']}")
    print(head + "\n    " + "\n    ".join(parts))
    if "fault_caught" in r:
        print(f"    injected fault caught by the oracle audit: {r['fault_caught']}; "
              f"seen by the GPU's own audit: {r['fault_seen_by_gpu_self']}")
print("ALL OK" if not bad else "PROBLEMS:\n  " + "\n  ".join(bad))
sys.exit(1 if bad else 0)
