//! The `tca` binary end to end: the happy paths write what they promise, and bad input
//! exits with status 2 and a message naming the problem (never a panic).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tca(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tca"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// Runs and expects failure with `want` in stderr and no panic.
fn fails(args: &[&str], want: &str) {
    let o = tca(args);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?} should fail: {err}");
    assert!(
        err.contains(want),
        "{args:?}: stderr {err:?} should mention {want:?}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
}

fn ok(args: &[&str]) -> String {
    let o = tca(args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{args:?} failed: {err}");
    out
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let f = Fixture { _dir: dir, root };
        std::fs::write(f.p("cfg.toml"), "block_size = 16\nwindow = 32\ntau = 0.9\n").unwrap();
        ok(&[
            "synth",
            "--kind",
            "retrieval",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--len",
            "200",
            "--dim",
            "16",
            "--seed",
            "1",
            "--out",
            &f.s("x.safetensors"),
        ]);
        f
    }
    fn p(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    fn s(&self, name: &str) -> String {
        self.p(name).to_string_lossy().into()
    }
}

fn header(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn calibrate_bound_and_decode_run() {
    let f = Fixture::new();
    let (x, cfg) = (f.s("x.safetensors"), f.s("cfg.toml"));
    ok(&[
        "calibrate",
        "--input",
        &x,
        "--config",
        &cfg,
        "--out",
        &f.s("p.json"),
    ]);
    let out = ok(&[
        "bound",
        "--input",
        &x,
        "--config",
        &cfg,
        "--profile",
        &f.s("p.json"),
        "--out",
        &f.s("audit"),
    ]);
    assert!(
        out.contains("l1_entrymax") && out.contains("identity"),
        "{out}"
    );
    assert_eq!(
        header(&f.p("audit/queries.csv")),
        "head,query,gamma,kept,err_l1,err_linf,err_l2,vmax_abs,vrow_l1_max"
    );
    let rows = std::fs::read_to_string(f.p("audit/queries.csv"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(rows, 1 + 4 * 200);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.p("audit/summary.json")).unwrap()).unwrap();
    for key in [
        "identity",
        "linf_entrymax",
        "l1_entrymax",
        "l1_induced",
        "l2_diameter",
        "gamma_le_1_minus_tau",
    ] {
        let r = &summary["readings"][key];
        assert!(
            r["holds"].is_boolean() && r["worst_ratio"].is_number(),
            "{key}: {r}"
        );
    }
    for key in ["identity", "linf_entrymax", "l1_induced", "l2_diameter"] {
        assert_eq!(summary["readings"][key]["holds"], true, "{key}");
    }
    assert!(summary["frac_gamma_above_1_minus_tau"].is_number());
    // Without a profile the input calibrates itself.
    ok(&[
        "bound",
        "--input",
        &x,
        "--config",
        &cfg,
        "--out",
        &f.s("audit2"),
    ]);
    let out = ok(&["decode", "--input", &x, "--config", &cfg, "--steps", "64"]);
    assert!(
        out.contains("KV bytes") && out.contains("vs full attention"),
        "{out}"
    );
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let f = Fixture::new();
    let (x, cfg) = (f.s("x.safetensors"), f.s("cfg.toml"));
    fails(
        &[
            "bound",
            "--input",
            &f.s("nope.safetensors"),
            "--out",
            &f.s("o"),
        ],
        "nope.safetensors",
    );
    std::fs::write(f.p("junk.safetensors"), "junk").unwrap();
    fails(
        &[
            "calibrate",
            "--input",
            &f.s("junk.safetensors"),
            "--out",
            &f.s("p.json"),
        ],
        "not a safetensors file",
    );
    for (i, (body, want)) in [
        ("tau = 1.5", "tau"),
        ("tau = 0", "tau"),
        ("block_size = 0", "block_size"),
        ("window = 0", "window"),
        ("bogus = 1", "unknown field"),
    ]
    .iter()
    .enumerate()
    {
        let c = f.p(&format!("bad{i}.toml"));
        std::fs::write(&c, body).unwrap();
        fails(
            &[
                "calibrate",
                "--input",
                &x,
                "--config",
                c.to_str().unwrap(),
                "--out",
                &f.s("p.json"),
            ],
            want,
        );
    }
    fails(
        &["decode", "--input", &x, "--config", &cfg, "--steps", "0"],
        "--steps",
    );
    fails(
        &["decode", "--input", &x, "--config", &cfg, "--steps", "200"],
        "--steps",
    );
    fails(
        &["bound", "--input", &x, "--layer", "3", "--out", &f.s("o")],
        "no tensor 'layer3.q'",
    );
    // The CUDA backend: a clear error without the feature or a device, else it runs.
    let o = tca(&[
        "bound",
        "--input",
        &x,
        "--config",
        &cfg,
        "--backend",
        "cuda",
        "--out",
        &f.s("g"),
    ]);
    let (out, err) = text(&o);
    if o.status.success() {
        assert!(out.contains("backend: cuda"), "{out}");
    } else {
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains("backend:") && !err.contains("panicked"),
            "{err}"
        );
    }
    // A profile from another model shape.
    ok(&[
        "synth",
        "--kind",
        "sink",
        "--heads",
        "6",
        "--kv-heads",
        "3",
        "--len",
        "100",
        "--dim",
        "16",
        "--out",
        &f.s("y.safetensors"),
    ]);
    ok(&[
        "calibrate",
        "--input",
        &f.s("y.safetensors"),
        "--config",
        &cfg,
        "--out",
        &f.s("py.json"),
    ]);
    fails(
        &[
            "bound",
            "--input",
            &x,
            "--config",
            &cfg,
            "--profile",
            &f.s("py.json"),
            "--out",
            &f.s("o"),
        ],
        "profile does not fit",
    );
    fails(
        &[
            "bound",
            "--input",
            &x,
            "--profile",
            &cfg,
            "--out",
            &f.s("o"),
        ],
        "not JSON",
    );
    // Synth arguments.
    fails(
        &[
            "synth",
            "--kind",
            "sink",
            "--dim",
            "2",
            "--out",
            &f.s("z.safetensors"),
        ],
        "d >= 4",
    );
    fails(
        &[
            "synth",
            "--kind",
            "sink",
            "--heads",
            "3",
            "--kv-heads",
            "2",
            "--out",
            &f.s("z.safetensors"),
        ],
        "multiple",
    );
    fails(
        &[
            "synth",
            "--kind",
            "nonsense",
            "--out",
            &f.s("z.safetensors"),
        ],
        "invalid value",
    );
}

#[test]
fn nothing_is_overwritten_without_force() {
    let f = Fixture::new();
    let (x, cfg) = (f.s("x.safetensors"), f.s("cfg.toml"));
    std::fs::write(f.p("mine.json"), "precious").unwrap();
    fails(
        &[
            "calibrate",
            "--input",
            &x,
            "--config",
            &cfg,
            "--out",
            &f.s("mine.json"),
        ],
        "--force",
    );
    assert_eq!(
        std::fs::read_to_string(f.p("mine.json")).unwrap(),
        "precious"
    );
    fails(&["synth", "--kind", "sink", "--out", &x], "--force");
    std::fs::create_dir(f.p("audit")).unwrap();
    std::fs::write(f.p("audit/summary.json"), "precious").unwrap();
    fails(
        &[
            "bound",
            "--input",
            &x,
            "--config",
            &cfg,
            "--out",
            &f.s("audit"),
        ],
        "--force",
    );
    assert_eq!(
        std::fs::read_to_string(f.p("audit/summary.json")).unwrap(),
        "precious"
    );
    assert!(!f.p("audit/queries.csv").exists());
    ok(&[
        "calibrate",
        "--input",
        &x,
        "--config",
        &cfg,
        "--out",
        &f.s("mine.json"),
        "--force",
    ]);
}

#[test]
fn reproduce_quick_writes_every_head_type() {
    let f = Fixture::new();
    let out = ok(&["reproduce", "--quick", "--no-figures", "--out", &f.s("rep")]);
    for crit in ["column", "mass"] {
        for kind in ["uniform", "bipolar", "terminal", "sink", "retrieval"] {
            assert!(
                out.contains(&format!("== {kind} head, criterion {crit}")),
                "{out}"
            );
            for file in ["queries.csv", "summary.json", "profile.json"] {
                assert!(
                    f.p(&format!("rep/{crit}/{kind}/{file}"))
                        .metadata()
                        .unwrap()
                        .len()
                        > 0
                );
            }
        }
    }
    assert!(f.p("rep/verdicts.csv").exists());
}
