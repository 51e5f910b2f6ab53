//! The experiments in quick mode write every promised file, and the automatic head-type
//! picker of Fig. 1 recognises the synthetic heads it is shown.

use tca::data::{synth, HeadKind};
use tca::experiments::{fig1, synthetic_spec, Context, Layer, EXPERIMENTS};

#[test]
fn quick_experiments_write_png_svg_parquet_csv() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::new(dir.path().to_path_buf(), true, None, "none", false).unwrap();
    for (name, run) in EXPERIMENTS {
        let files = run(&ctx).unwrap();
        assert!(!files.is_empty(), "{name} wrote nothing");
        for ext in ["png", "svg", "parquet", "csv"] {
            assert!(
                files.iter().any(|f| f.extension().unwrap() == ext),
                "{name}: no .{ext}"
            );
        }
        for f in files {
            assert!(f.metadata().unwrap().len() > 0, "{} is empty", f.display());
        }
    }
}

#[test]
fn head_type_picker_recognises_synthetic_heads() {
    let layers: Vec<Layer> = [
        HeadKind::Uniform,
        HeadKind::Sink,
        HeadKind::Terminal,
        HeadKind::Bipolar,
    ]
    .iter()
    .enumerate()
    .map(|(i, &k)| Layer {
        source: "test".into(),
        label: k.name().into(),
        kind: None,
        layer: i,
        heads: synth(&synthetic_spec(k, true)).unwrap().heads,
    })
    .collect();
    let picks = fig1::pick_real_heads(&layers);
    let got: Vec<(&str, &str)> = picks
        .iter()
        .map(|&(ty, li, _)| (ty, layers[li].label.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("attention sink", "sink"),
            ("terminal-biased", "terminal"),
            ("bipolar", "bipolar"),
            ("uniform", "uniform")
        ]
    );
}
