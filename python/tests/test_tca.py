"""Tests of the Python package `tca` against the library's own guarantees and the CLI.

Small layers (L = 300, d = 16) under a scaled configuration (b = 16, w = 64), so that
there is a candidate region to select from; each test runs in well under a second.
"""

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import tca

CFG = {"block_size": 16, "window": 64, "tau": 0.9}
CFG_TOML = "block_size = 16\nwindow = 64\ntau = 0.9\n"
SHAPE = dict(heads=4, kv_heads=2, len=300, dim=16)
TRUE_READINGS = ["identity", "linf_entrymax", "l1_induced", "l2_diameter"]
REPO = Path(__file__).resolve().parents[2]


def layer(kind="bipolar", seed=3):
    return tca.synth(kind, seed=seed, **SHAPE)


def bf16_bits(a):
    """float64 -> bf16 bit patterns (uint16) by truncation: exactly representable."""
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def from_bf16_bits(b):
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def test_synth_shapes_seed_and_needles():
    q, k, v = layer()
    assert q.shape == (4, 300, 16) and k.shape == v.shape == (2, 300, 16)
    assert q.dtype == np.float64
    q2, _, _ = layer()
    assert np.array_equal(q, q2)
    q3, _, _ = layer(seed=4)
    assert not np.array_equal(q, q3)
    *_, needles = tca.synth("retrieval", needles=True, **SHAPE)
    assert len(needles) == 2 and all(len(n) >= 2 for n in needles)
    assert all(15 <= j < 270 for n in needles for j in n)


def test_bound_arrays_and_verdicts():
    q, k, v = layer()
    r = tca.bound(q, k, v, CFG)
    s = r["summary"]
    assert s["queries"] == 4 * 300 and s["tau"] == 0.9
    for name in tca.QUERY_FIELDS:
        assert r[name].shape == (4, 300), name
    gamma, kept = r["gamma"], r["kept"]
    assert kept.dtype == np.int64
    assert np.all((gamma >= 0) & (gamma <= 1))
    assert np.isclose(gamma.mean(), s["mean_gamma"], rtol=1e-12)
    assert gamma.max() == s["max_gamma"]
    # Queries inside the window keep everything: gamma = 0 and e = 0 there.
    assert np.all(gamma[:, :64] == 0) and np.all(r["err_l2"][:, :64] <= 1e-12)
    assert np.all(kept <= np.arange(1, 301)) and np.all(kept >= np.minimum(np.arange(1, 301), 64))
    assert gamma[:, 64:].max() > 0, "the selection must omit something for the audit to test"
    for key in TRUE_READINGS:
        rd = s["readings"][key]
        assert rd["holds"] and rd["violations"] == 0 and rd["measured"] == 1200, key
    # The per-query arrays are the verdict's inputs: recompute one reading from them.
    lhs, rhs = r["err_linf"], 2 * gamma * r["vmax_abs"]
    assert np.all(lhs <= rhs + 1e-9 * r["vmax_abs"])
    # S_G lies in the candidate region [0, L - w).
    assert len(r["global"]) == 2 and all(np.all(g < 300 - 64) for g in r["global"])


def test_literal_l1_reading_is_measured_and_can_fail():
    q, k, v = layer("uniform")
    r = tca.bound(q, k, v, CFG)
    lit = r["summary"]["readings"]["l1_entrymax"]
    assert lit["measured"] == 1200
    # d = 16: ||e||_1 can exceed 2 gamma max|V|; the verdict counts what the arrays show
    # (the allowance of Reading::sides: allow_l1 plus 2 gamma_allowance max|V|).
    tol = r["allow_l1"] + 2 * r["gamma_allowance"] * r["vmax_abs"]
    fails = int(np.sum(r["err_l1"] > 2 * r["gamma"] * r["vmax_abs"] + tol))
    assert lit["violations"] == fails
    assert lit["holds"] == (fails == 0)


def test_config_forms_agree(tmp_path):
    q, k, v = layer()
    path = tmp_path / "c.toml"
    path.write_text(CFG_TOML)
    ref = tca.bound(q, k, v, CFG)["summary"]
    assert tca.bound(q, k, v, CFG_TOML)["summary"] == ref
    assert tca.bound(q, k, v, path)["summary"] == ref
    assert tca.bound(q, k, v, str(path))["summary"] == ref
    assert tca.default_config()["window"] == 4096
    # With the defaults (w = 4096 > L) attention is exact: nothing omitted.
    assert tca.bound(q, k, v)["summary"]["max_gamma"] == 0


def test_profile_round_trip(tmp_path):
    q, k, v = layer()
    prof = tca.calibrate(q, k, v, CFG)
    assert prof["format"] == "tca-calibration-profile"
    assert len(prof["layers"][0]["heads"]) == 2
    self_cal = tca.bound(q, k, v, CFG)
    with_prof = tca.bound(q, k, v, CFG, prof)
    assert with_prof["summary"] == self_cal["summary"]
    assert np.array_equal(with_prof["gamma"], self_cal["gamma"])
    path = tmp_path / "p.json"
    path.write_text(json.dumps(prof))
    assert tca.bound(q, k, v, CFG, path)["summary"] == self_cal["summary"]
    # A profile from another layer's data drives the selection of this one.
    q2, k2, v2 = layer("sink")
    other = tca.calibrate(q2, k2, v2, CFG)
    sel = tca.select(q, k, v, CFG, profile=other)
    assert len(sel["global"]) == 2


def test_select_matches_bound():
    q, k, v = layer()
    sel = tca.select(q, k, v, CFG)
    r = tca.bound(q, k, v, CFG)
    assert np.array_equal(sel["kept"], r["kept"])
    for a, b in zip(sel["global"], r["global"]):
        assert np.array_equal(a, b)
    nb = -(-(300 - 64) // 16)
    assert sel["block_budget"].shape == sel["block_score"].shape == (2, nb)
    assert sel["importance"].shape == (2, 300)
    assert np.allclose(sel["importance"].sum(axis=1), 1.0)
    # |S_G| is the sum of the block budgets.
    assert [len(g) for g in sel["global"]] == list(sel["block_budget"].sum(axis=1))


def test_dtypes_are_widened_exactly():
    q, k, v = layer()
    for dt in (np.float32, np.float16):
        qq, kk, vv = (a.astype(dt) for a in (q, k, v))
        got = tca.bound(qq, kk, vv, CFG)
        want = tca.bound(*(a.astype(np.float64) for a in (qq, kk, vv)), CFG)
        assert got["summary"] == want["summary"], dt
        assert np.array_equal(got["err_l2"], want["err_l2"])
    bits = [bf16_bits(a) for a in (q, k, v)]
    got = tca.bound(*bits, CFG, dtype="bf16")
    want = tca.bound(*(from_bf16_bits(b) for b in bits), CFG)
    assert got["summary"] == want["summary"]
    # Non-contiguous views are read as they are.
    got = tca.bound(q[:, :, ::-1], k[:, :, ::-1], v[:, :, ::-1], CFG)
    want = tca.bound(*(np.ascontiguousarray(a[:, :, ::-1]) for a in (q, k, v)), CFG)
    assert got["summary"] == want["summary"]


def test_ml_dtypes_bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q, k, v = layer()
    b = [a.astype(ml_dtypes.bfloat16) for a in (q, k, v)]
    got = tca.bound(*b, CFG)
    want = tca.bound(*(a.astype(np.float64) for a in b), CFG)
    assert got["summary"] == want["summary"]


def test_inputs_bf16_rounds_like_the_cli():
    q, k, v = layer()
    got = tca.bound(q, k, v, CFG, inputs_bf16=True)["summary"]
    f32s = [a.astype(np.float32) for a in (q, k, v)]

    # Round to nearest even at bf16 (what Heads::rounded_to_bf16 does), then widen.
    def rne(a):
        u = a.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return from_bf16_bits(u.astype(np.uint16))
    want = tca.bound(*(rne(a) for a in f32s), CFG)["summary"]
    assert got == want


def err_msg(fn, *a, **kw):
    with pytest.raises(tca.TcaError) as e:
        fn(*a, **kw)
    assert isinstance(e.value, ValueError)
    return str(e.value)


def test_errors_carry_the_cli_messages():
    q, k, v = layer()
    m = err_msg(tca.bound, q[:3], k, v, CFG)
    assert m == "shape mismatch: Hq = 3 query heads is not a multiple of Hkv = 2 KV heads (GQA)"
    bad = q.copy()
    bad[1, 2, 3] = np.nan
    assert err_msg(tca.bound, bad, k, v, CFG) == "non-finite value in q at index [1, 2, 3]: NaN"
    assert err_msg(tca.bound, q, k[:, :10], v[:, :10], CFG).startswith("shape mismatch: q has L = 300")
    assert "expected 3 dimensions" in err_msg(tca.bound, q[0], k, v, CFG)
    assert "unsupported dtype int64" in err_msg(tca.bound, q.astype(np.int64), k, v, CFG)
    assert "uint16 arrays of bf16 bits" in err_msg(tca.bound, q, k, v, CFG, dtype="bf16")
    m = err_msg(tca.bound, q, k, v, {"tau": 1.5})
    assert m == "invalid configuration: tau = 1.5 must lie in (0, 1]"
    assert "unknown field `windw`" in err_msg(tca.bound, q, k, v, {"windw": 3})
    assert err_msg(tca.bound, q, k, v, "no/such.toml").startswith("i/o error on no/such.toml")
    q6, k6, v6 = tca.synth("sink", heads=6, kv_heads=3, len=300, dim=16)
    prof = tca.calibrate(q6, k6, v6, CFG)
    m = err_msg(tca.bound, q, k, v, CFG, prof)
    assert m.startswith("profile does not fit this input: made for 6 query heads, 3 KV heads")
    m = err_msg(tca.bound, q, k, v, CFG, {"format": "x"})
    assert m.startswith("profile does not fit this input: not a calibration profile")
    assert "unknown kind" in err_msg(tca.synth, "spiky")
    assert "d >= 4" in err_msg(tca.synth, "sink", dim=2)


def cli_binary():
    """The `tca` binary of this checkout's release build, if there is one."""
    if os.environ.get("TCA_BIN"):
        return Path(os.environ["TCA_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    for p in (target / "release" / "tca", Path(shutil.which("tca") or "/nonexistent")):
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def test_same_numbers_as_the_cli(tmp_path):
    exe = cli_binary()
    if exe is None:
        pytest.skip("no tca binary: build it with `cargo build --release` (or set TCA_BIN)")
    inp, cfg, out = tmp_path / "in.safetensors", tmp_path / "c.toml", tmp_path / "out"
    cfg.write_text(CFG_TOML)
    run = lambda *a: subprocess.run([str(exe), *map(str, a)], check=True, capture_output=True)
    run("synth", "--kind", "terminal", "--heads", 4, "--kv-heads", 2, "--len", 300,
        "--dim", 16, "--seed", 5, "--out", inp)
    run("bound", "--input", inp, "--config", cfg, "--out", out)
    q, k, v = tca.synth("terminal", seed=5, **SHAPE)
    r = tca.bound(q, k, v, CFG)
    assert r["summary"] == json.loads((out / "summary.json").read_text())
    with open(out / "queries.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1200
    for row in rows:
        h, i = int(row["head"]), int(row["query"])
        for name in tca.QUERY_FIELDS:
            if name in row:
                assert float(row[name]) == r[name][h, i], (name, h, i)
    # A CLI error and the Python exception say the same thing.
    p = subprocess.run([str(exe), "bound", "--input", inp, "--config", tmp_path / "none.toml",
                        "--out", out], capture_output=True, text=True)
    assert p.returncode != 0
    with pytest.raises(tca.TcaError) as e:
        tca.bound(q, k, v, tmp_path / "none.toml")
    assert p.stderr.strip() == f"error: {e.value}"
