//! Bad input is answered with an error that names the problem, never a panic: the
//! library entry points here, the `tca` binary in tests/cli.rs.

use ndarray::Array3;
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;
use tca::calibration::Profile;
use tca::data::{load_safetensors, synth, HeadKind, SynthSpec};
use tca::decode::decode;
use tca::selection::{select, Budget};
use tca::{Config, Heads, TcaError};

fn arr(h: usize, l: usize, d: usize) -> Array3<f64> {
    Array3::from_shape_fn((h, l, d), |(a, b, c)| {
        ((a * 7 + b * 3 + c) % 5) as f64 * 0.25 - 0.5
    })
}

fn err_text<T: std::fmt::Debug>(r: Result<T, TcaError>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn heads_reject_bad_shapes_and_values() {
    let cases = [
        (arr(2, 4, 3), arr(1, 4, 3), arr(1, 5, 3), "k is"),
        (arr(2, 4, 3), arr(1, 5, 3), arr(1, 5, 3), "L = 4"),
        (arr(2, 4, 3), arr(1, 4, 2), arr(1, 4, 2), "d = 3"),
        (arr(3, 4, 3), arr(2, 4, 3), arr(2, 4, 3), "not a multiple"),
        (arr(2, 0, 3), arr(1, 0, 3), arr(1, 0, 3), "L = 0"),
        (arr(2, 4, 0), arr(1, 4, 0), arr(1, 4, 0), "d = 0"),
        (arr(0, 4, 3), arr(1, 4, 3), arr(1, 4, 3), "no heads"),
    ];
    for (q, k, v, want) in cases {
        let e = err_text(Heads::new(q, k, v));
        assert!(e.contains(want), "{e:?} should mention {want:?}");
    }
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let mut v = arr(1, 4, 3);
        v[[0, 2, 1]] = bad;
        let e = err_text(Heads::new(arr(2, 4, 3), arr(1, 4, 3), v));
        assert!(
            e.contains("non-finite value in v at index [0, 2, 1]"),
            "{e}"
        );
    }
}

#[test]
fn config_rejects_out_of_domain_values() {
    let cases = [
        ("tau = 0.0", "tau"),
        ("tau = 1.5", "tau"),
        ("tau = -0.1", "tau"),
        ("tau = nan", "tau"),
        ("block_size = 0", "block_size"),
        ("window = 0", "window"),
        ("alpha = 1.5", "alpha"),
        ("candidates = 0", "candidates"),
        ("sigma = 0.0", "sigma"),
        ("importance_queries = 0", "importance_queries"),
        ("window = -3", "window"),
        ("taux = 0.9", "unknown field"),
        ("criterion = \"median\"", "criterion"),
        ("tau = \"high\"", "tau"),
        ("tau = 0.9\ntau = 0.8", "duplicate"),
    ];
    for (text, want) in cases {
        let e = err_text(Config::from_toml_str(text));
        assert!(e.contains(want), "{text:?}: {e:?} should mention {want:?}");
        assert!(e.starts_with("invalid configuration"), "{e}");
    }
    assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
    assert!(Config::from_toml_str("tau = 1.0\nwindow = 1").is_ok());
    let e = err_text(Config::from_file(Path::new("/nonexistent/c.toml")));
    assert!(e.contains("/nonexistent/c.toml"), "{e}");
}

#[test]
fn budgets_and_selection_reject_mismatches() {
    assert!(err_text(Budget::new(vec![])).contains("b >= 1"));
    assert!(err_text(Budget::new(vec![0.5, -0.1])).contains("negative"));
    assert!(err_text(Budget::new(vec![0.5, f64::NAN])).contains("not finite"));
    assert!(err_text(Budget::new(vec![0.0, 0.0])).contains("zero"));
    assert!(err_text(Budget::point(0, 4)).contains("outside"));
    assert!(err_text(Budget::lognormal(1.0, 0.0, 4)).contains("sigma"));
    let heads = Heads::new(arr(4, 10, 3), arr(2, 10, 3), arr(2, 10, 3)).unwrap();
    let cfg = Config {
        block_size: 4,
        window: 2,
        ..Config::default()
    };
    let one = vec![Budget::full(4).unwrap()];
    assert!(err_text(select(&heads, &cfg, &one)).contains("1 budgets given for 2 KV heads"));
    let wrong_b = vec![Budget::full(8).unwrap(); 2];
    assert!(err_text(select(&heads, &cfg, &wrong_b)).contains("block_size = 4"));
    let bad_cfg = Config {
        tau: 2.0,
        ..cfg.clone()
    };
    assert!(err_text(select(&heads, &bad_cfg, &wrong_b)).contains("tau"));
    let two = vec![Budget::full(4).unwrap(); 2];
    assert!(err_text(decode(&heads, &cfg, &two, 0)).contains("prefill"));
    assert!(err_text(decode(&heads, &cfg, &two, 10)).contains("prefill"));
    assert!(err_text(heads.prefix(0)).contains("prefix"));
}

#[test]
fn synth_rejects_bad_specs() {
    let ok = SynthSpec {
        kind: HeadKind::Sink,
        q_heads: 2,
        kv_heads: 1,
        len: 8,
        dim: 8,
        seed: 0,
    };
    assert!(synth(&ok).is_ok());
    assert!(err_text(synth(&SynthSpec { dim: 3, ..ok }).map(|s| s.heads)).contains("d >= 4"));
    assert!(err_text(synth(&SynthSpec { len: 0, ..ok }).map(|s| s.heads)).contains("L"));
    assert!(err_text(
        synth(&SynthSpec {
            q_heads: 3,
            kv_heads: 2,
            ..ok
        })
        .map(|s| s.heads)
    )
    .contains("multiple"));
    assert!(
        err_text(synth(&SynthSpec { kv_heads: 0, ..ok }).map(|s| s.heads)).contains("multiple")
    );
}

fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, s, b)| (n.to_string(), TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn f32_bytes(n: usize, fill: f32) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (fill + i as f32 * 0.01).to_le_bytes())
        .collect()
}

#[test]
fn safetensors_inputs_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    let e = err_text(load_safetensors(
        &dir.path().join("missing.safetensors"),
        "",
    ));
    assert!(e.contains("missing.safetensors"), "{e}");
    std::fs::write(&p, b"definitely not safetensors").unwrap();
    assert!(err_text(load_safetensors(&p, "")).contains("not a safetensors file"));
    let good = |n| f32_bytes(n, 0.1);
    write_st(
        &p,
        &[
            ("q", Dtype::F32, vec![2, 4, 3], good(24)),
            ("k", Dtype::F32, vec![1, 4, 3], good(12)),
        ],
    );
    assert!(err_text(load_safetensors(&p, "")).contains("no tensor 'v'"));
    write_st(
        &p,
        &[
            ("q", Dtype::F32, vec![8, 3], good(24)),
            ("k", Dtype::F32, vec![1, 4, 3], good(12)),
            ("v", Dtype::F32, vec![1, 4, 3], good(12)),
        ],
    );
    assert!(err_text(load_safetensors(&p, "")).contains("3 dimensions"));
    write_st(
        &p,
        &[
            ("q", Dtype::I32, vec![2, 4, 3], good(24)),
            ("k", Dtype::F32, vec![1, 4, 3], good(12)),
            ("v", Dtype::F32, vec![1, 4, 3], good(12)),
        ],
    );
    assert!(err_text(load_safetensors(&p, "")).contains("unsupported dtype"));
    let mut nan = good(12);
    nan[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    write_st(
        &p,
        &[
            ("q", Dtype::F32, vec![2, 4, 3], good(24)),
            ("k", Dtype::F32, vec![1, 4, 3], nan),
            ("v", Dtype::F32, vec![1, 4, 3], good(12)),
        ],
    );
    assert!(err_text(load_safetensors(&p, "")).contains("non-finite value in k"));
    write_st(
        &p,
        &[
            ("q", Dtype::F32, vec![2, 0, 3], vec![]),
            ("k", Dtype::F32, vec![1, 0, 3], vec![]),
            ("v", Dtype::F32, vec![1, 0, 3], vec![]),
        ],
    );
    assert!(err_text(load_safetensors(&p, "")).contains("L = 0"));
    // bf16 and f16 inputs load.
    let half = |n: usize| {
        (0..n)
            .flat_map(|i| half::bf16::from_f32(i as f32 * 0.1).to_le_bytes())
            .collect::<Vec<u8>>()
    };
    write_st(
        &p,
        &[
            ("q", Dtype::BF16, vec![2, 4, 3], half(24)),
            ("k", Dtype::BF16, vec![1, 4, 3], half(12)),
            ("v", Dtype::BF16, vec![1, 4, 3], half(12)),
        ],
    );
    assert_eq!(load_safetensors(&p, "").unwrap().len(), 4);
    let f16 = |n: usize| {
        (0..n)
            .flat_map(|i| half::f16::from_f32(i as f32 * 0.1).to_le_bytes())
            .collect::<Vec<u8>>()
    };
    write_st(
        &p,
        &[
            ("layer2.q", Dtype::F16, vec![2, 4, 3], f16(24)),
            ("layer2.k", Dtype::F16, vec![1, 4, 3], f16(12)),
            ("layer2.v", Dtype::F16, vec![1, 4, 3], f16(12)),
        ],
    );
    assert_eq!(load_safetensors(&p, "layer2.").unwrap().dim(), 3);
}

#[test]
fn profiles_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.json");
    assert!(err_text(Profile::load(&p)).contains("p.json"));
    std::fs::write(&p, "{ not json").unwrap();
    assert!(err_text(Profile::load(&p)).contains("not JSON"));
    std::fs::write(&p, r#"{"format": "something-else", "version": 1}"#).unwrap();
    assert!(err_text(Profile::load(&p)).contains("not a tca-calibration-profile"));
    std::fs::write(
        &p,
        r#"{"format": "tca-calibration-profile", "version": 99}"#,
    )
    .unwrap();
    assert!(err_text(Profile::load(&p)).contains("version 99"));
    std::fs::write(&p, r#"{"format": "tca-calibration-profile", "version": 1}"#).unwrap();
    assert!(err_text(Profile::load(&p)).contains("missing field"));
}
