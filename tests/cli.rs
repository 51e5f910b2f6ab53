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
        tca::cli::report::QUERY_COLUMNS
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
        let r = &summary["readings"][key];
        assert_eq!(r["holds"], true, "{key}");
        assert_eq!(r["verdict"], "holds", "{key}");
        assert_eq!(r["measured"], 800, "{key}");
        assert!(r["with_power"].as_u64().unwrap() > 0, "{key}: {r}");
        assert!(r["witness"]["lhs"].is_number(), "{key}: {r}");
    }
    assert!(summary["frac_gamma_above_1_minus_tau"].is_number());
    // The certificate bounds gamma at every query, without the dense pass.
    let g = &summary["readings"]["gamma_le_gamma_hat"];
    assert_eq!(
        (g["holds"].as_bool(), g["measured"].as_u64()),
        (Some(true), Some(800)),
        "{g}"
    );
    // The profile was calibrated on this very input: an in-sample audit.
    assert_eq!(summary["context"]["in_sample"], true);
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
    let out = ok(&[
        "decode",
        "--input",
        &x,
        "--config",
        &cfg,
        "--steps",
        "64",
        "--out",
        &f.s("dec"),
    ]);
    assert!(
        out.contains("KV bytes") && out.contains("vs full attention"),
        "{out}"
    );
    // Every decode step is audited: 64 steps x 4 query heads.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.p("dec/summary.json")).unwrap()).unwrap();
    for key in ["identity", "linf_entrymax", "l1_induced", "l2_diameter"] {
        assert_eq!(summary["readings"][key]["measured"], 256, "{key}");
        assert_eq!(summary["readings"][key]["holds"], true, "{key}");
    }
    assert_eq!(summary["decode"]["steps"], 64);
}

#[test]
fn a_profile_from_another_configuration_is_refused_unless_allowed() {
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
    std::fs::write(f.p("w16.toml"), "block_size = 16\nwindow = 16\ntau = 0.9\n").unwrap();
    std::fs::write(
        f.p("t5.toml"),
        "block_size = 16\nwindow = 32\ntau = 0.5\ncriterion = \"mass\"\n",
    )
    .unwrap();
    let p = f.s("p.json");
    fails(
        &[
            "bound",
            "--input",
            &x,
            "--config",
            &f.s("w16.toml"),
            "--profile",
            &p,
            "--out",
            &f.s("a"),
        ],
        "window = 32 but the configuration has 16",
    );
    fails(
        &[
            "bound",
            "--input",
            &x,
            "--config",
            &f.s("t5.toml"),
            "--profile",
            &p,
            "--out",
            &f.s("a"),
        ],
        "criterion",
    );
    fails(
        &[
            "decode",
            "--input",
            &x,
            "--config",
            &f.s("t5.toml"),
            "--profile",
            &p,
            "--steps",
            "8",
        ],
        "tau = 0.9 but the configuration has 0.5",
    );
    ok(&[
        "bound",
        "--input",
        &x,
        "--config",
        &f.s("w16.toml"),
        "--profile",
        &p,
        "--out",
        &f.s("a"),
        "--allow-profile-mismatch",
    ]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.p("a/summary.json")).unwrap()).unwrap();
    let note = summary["context"]["profile_override"].as_str().unwrap();
    assert!(note.contains("window = 32"), "{note}");
}

#[test]
fn counterexample_finds_and_writes_a_witness_that_bound_reproduces() {
    let f = Fixture::new();
    let out = ok(&[
        "counterexample",
        "--reading",
        "l1_entrymax",
        "--seed",
        "0",
        "--out",
        &f.s("cx"),
    ]);
    assert!(out.contains("d = 2, L = 3"), "{out}");
    let bound = tca(&[
        "bound",
        "--input",
        &f.s("cx/witness.safetensors"),
        "--config",
        &f.s("cx/config.toml"),
        "--profile",
        &f.s("cx/profile.json"),
        "--out",
        &f.s("cx/bound"),
    ]);
    assert!(bound.status.success(), "{:?}", text(&bound));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.p("cx/bound/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["readings"]["l1_entrymax"]["holds"], false);
    assert_eq!(summary["readings"]["l1_induced"]["holds"], true);
    assert_eq!(summary["context"]["in_sample"], true);
    // A true reading: nothing found, and the count of cases tried is reported.
    let out = ok(&[
        "counterexample",
        "--reading",
        "l1_induced",
        "--cases",
        "3000",
    ]);
    assert!(
        out.contains("no violation of l1_induced") && out.contains("in 3000 cases"),
        "{out}"
    );
    fails(
        &["counterexample", "--reading", "l1_entrymax", "--cases", "0"],
        "--cases",
    );
    fails(
        &[
            "counterexample",
            "--reading",
            "l1_entrymax",
            "--out",
            &f.s("cx"),
        ],
        "--force",
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
    // Output into a pipe closed before the first line (`tca ... | head -0`): the process
    // ends on SIGPIPE, quietly, instead of panicking on the failed print.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tca"))
        .args(["decode", "--input", &x, "--config", &cfg, "--steps", "40"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let (_, err) = text(&o);
    assert!(!err.contains("panicked"), "closed stdout: {err}");
    // `decode --backend cuda` likewise: runs where it can (every step audited), else says
    // why without a panic.
    let o = tca(&[
        "decode",
        "--input",
        &x,
        "--config",
        &cfg,
        "--steps",
        "40",
        "--backend",
        "cuda",
    ]);
    let (out, err) = text(&o);
    if o.status.success() {
        assert!(
            out.contains("backend: cuda") && out.contains("compactions"),
            "{out}"
        );
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
    assert!(out.contains("verdicts as expected"), "{out}");
}

#[test]
fn verdicts_that_differ_from_the_expected_ones_are_reported() {
    use tca::cli::commands::verdict_mismatches;
    let want =
        "criterion,kind,reading,holds\ncolumn,sink,identity,true\ncolumn,sink,l1_entrymax,false\n";
    assert!(verdict_mismatches(want, want).is_empty());
    let flipped = "criterion,kind,reading,holds,x\ncolumn,sink,identity,false,1\ncolumn,sink,l1_entrymax,false,1\n";
    let m = verdict_mismatches(flipped, want);
    assert!(
        m.iter().any(|x| x.contains("a true reading fails")),
        "{m:?}"
    );
    assert!(m.iter().any(|x| x.contains("expected true")), "{m:?}");
    let missing = "criterion,kind,reading,holds\ncolumn,sink,identity,true\n";
    assert!(verdict_mismatches(missing, want)[0].contains("expected but not computed"));
}
