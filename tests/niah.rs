//! Needle-in-a-haystack cases and `tca quality-niah` (both tasks, several seeds, the
//! Wilson summary), the RoPE scaling flag, multi-tau profile lists, and the GPU
//! backend's refusals where it cannot run. Needs the model (scripts/fetch-assets)
//! unless TCA_SKIP_MODEL_TESTS=1.

use std::sync::OnceLock;

use tca::backend::BackendKind;
use tca::cli::model::{CalibrationArgs, RopeArgs};
use tca::cli::niah::{first_digits, niah_case, run_quality_niah, QualityNiahArgs, KEYS};
use tca::model::sparse::calibrate_model;
use tca::model::{assets, Model};
use tca::Config;

fn model() -> Option<&'static Model> {
    static MODEL: OnceLock<Option<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| match assets::model_path(None) {
            Ok(p) => Some(Model::load(&p).expect("the cached GGUF loads")),
            Err(e) => {
                if std::env::var("TCA_SKIP_MODEL_TESTS").is_ok_and(|v| v == "1") {
                    eprintln!("skipping model test (TCA_SKIP_MODEL_TESTS=1): {e}");
                    None
                } else {
                    panic!("{e}\nrun scripts/fetch-assets first (or TCA_SKIP_MODEL_TESTS=1)")
                }
            }
        })
        .as_ref()
}

macro_rules! need_model {
    () => {
        match model() {
            Some(m) => m,
            None => return,
        }
    };
}

fn hay(m: &Model) -> Vec<u32> {
    m.tokenizer
        .encode(&assets::PRIDE_AND_PREJUDICE[..40_000])
        .unwrap()
}

#[test]
fn multi_key_cases_hold_four_needles_and_ask_for_the_first() {
    let m = need_model!();
    let hay = hay(m);
    let c = niah_case(m, &hay, "mk_niah", 600, 40, 3).unwrap();
    assert_eq!(c.prompt.len(), 600);
    let text = m.tokenizer.decode(&c.prompt).unwrap();
    assert_eq!(
        text.matches("The special magic number for ").count(),
        5,
        "{text}"
    );
    let asked = KEYS
        .iter()
        .find(|k| text.contains(&format!("What is the special magic number for {k} ")))
        .expect("the question names a key");
    assert!(text.contains(&format!("number for {asked} is {}.", c.number)));
    let planted = KEYS
        .iter()
        .filter(|k| text.contains(&format!("The special magic number for {k} is ")))
        .count();
    assert_eq!(planted, 4);
    // Deterministic per seed; another seed draws another number.
    let again = niah_case(m, &hay, "mk_niah", 600, 40, 3).unwrap();
    assert_eq!(again.prompt, c.prompt);
    assert_ne!(
        niah_case(m, &hay, "mk_niah", 600, 40, 4).unwrap().number,
        c.number
    );
    // The single-needle task, and bad tasks or lengths.
    let s = niah_case(m, &hay, "niah", 300, 100, 3).unwrap();
    assert_eq!(s.prompt.len(), 300);
    assert!(niah_case(m, &hay, "needle", 300, 0, 3).is_err());
    assert!(niah_case(m, &hay, "mk_niah", 60, 0, 3).is_err());
    assert_eq!(first_digits(" 1234567. The"), "1234567");
    assert_eq!(first_digits("none"), "");
}

fn args(dir: &std::path::Path, profile: Option<std::path::PathBuf>) -> QualityNiahArgs {
    let cfgfile = dir.join("c.toml");
    std::fs::write(&cfgfile, "block_size = 16\nwindow = 32\ntau = 0.9\n").unwrap();
    QualityNiahArgs {
        lengths: "400".into(),
        depths: "0,100".into(),
        tasks: "niah,mk_niah".into(),
        attention: "exact,tca".into(),
        long_from: usize::MAX,
        long_attention: "exact,tca".into(),
        taus: "".into(),
        seed: 7,
        seeds: Some("1,2".into()),
        answer_tokens: 8,
        essays: None,
        calibration: CalibrationArgs {
            config: Some(cfgfile),
            profile,
            calib_offset: 30_000,
            calib_tokens: 128,
            calib_text: None,
        },
        out: dir.join("q"),
        force: false,
        model: None,
        rope: RopeArgs::default(),
        backend: BackendKind::Cpu,
    }
}

#[test]
fn quality_niah_writes_cases_and_wilson_summary() {
    let m = need_model!();
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        block_size: 16,
        window: 32,
        tau: 0.9,
        ..Config::default()
    };
    let all = m
        .tokenizer
        .encode(&assets::PRIDE_AND_PREJUDICE[..200_000])
        .unwrap();
    let prof = calibrate_model(&m.llama, &all[30_000..30_128], &cfg, &[0.9])
        .unwrap()
        .pop()
        .unwrap();
    let pfile = dir.path().join("p.json");
    prof.save(&pfile, false).unwrap();
    let a = args(dir.path(), Some(pfile.clone()));
    run_quality_niah(a.clone()).unwrap();
    let csv = std::fs::read_to_string(dir.path().join("q/niah.csv")).unwrap();
    // 2 tasks x 2 seeds x 2 depths x (exact, tca, tca_prefill_full_decode)
    assert_eq!(csv.lines().count(), 1 + 24, "{csv}");
    assert!(csv
        .lines()
        .next()
        .unwrap()
        .starts_with("task,length,seed,haystack_offset"));
    let sum = std::fs::read_to_string(dir.path().join("q/niah_summary.csv")).unwrap();
    let lines: Vec<&str> = sum.lines().collect();
    assert_eq!(lines.len(), 1 + 6, "{sum}");
    assert!(lines[0].contains("wilson95_lo,wilson95_hi"));
    for l in &lines[1..] {
        assert!(l.contains(",4,"), "4 cases per cell: {l}");
    }
    assert!(dir.path().join("q/niah_summary.parquet").is_file());
    // No overwrite without --force.
    assert!(run_quality_niah(a.clone()).is_err());
    // A profile list without the tau asked for is refused, naming the tau.
    let e = run_quality_niah(QualityNiahArgs {
        taus: "0.8".into(),
        force: true,
        ..a.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("tau = 0.8"), "{e}");
    // The GPU runs exact and tca only; without a device (or CUDA) it says so.
    let e = run_quality_niah(QualityNiahArgs {
        attention: "exact,oracle_topk".into(),
        backend: BackendKind::Cuda,
        force: true,
        ..a.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("CPU only"), "{e}");
    if !cfg!(feature = "cuda") {
        let e = run_quality_niah(QualityNiahArgs {
            backend: BackendKind::Cuda,
            force: true,
            ..a.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("without CUDA"), "{e}");
    }
    // Unknown tasks, lengths beyond the context, an unknown RoPE scaling.
    for bad in [
        QualityNiahArgs {
            tasks: "niah,haystack".into(),
            force: true,
            ..a.clone()
        },
        QualityNiahArgs {
            lengths: "9000".into(),
            force: true,
            ..a.clone()
        },
        QualityNiahArgs {
            rope: RopeArgs {
                rope_scaling: Some("dynamic:2".into()),
            },
            force: true,
            ..a.clone()
        },
    ] {
        assert!(run_quality_niah(bad).is_err());
    }
}

#[test]
fn rope_scaling_extends_the_context_and_changes_the_forward() {
    let m = need_model!();
    let mut scaled = Model::load(assets::model_path(None).unwrap()).unwrap();
    scaled.rescale_rope("yarn:4").unwrap();
    assert_eq!(scaled.llama.config.context, 4 * m.llama.config.context);
    let toks = &hay(m)[..64];
    let a = m
        .llama
        .score(toks, &tca::model::Exact::default(), 1)
        .unwrap();
    let b = scaled
        .llama
        .score(toks, &tca::model::Exact::default(), 1)
        .unwrap();
    assert_ne!(a.perplexity(), b.perplexity());
    // none restores the plain RoPE.
    scaled.rescale_rope("none").unwrap();
    assert_eq!(scaled.llama.config.context, m.llama.config.context);
    let c = scaled
        .llama
        .score(toks, &tca::model::Exact::default(), 1)
        .unwrap();
    assert_eq!(a.perplexity(), c.perplexity());
    assert!(scaled.rescale_rope("yarn:0.5").is_err());
}
