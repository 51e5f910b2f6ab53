//! TCA and the peer policies inside the SmolLM2 forward pass: full budgets reproduce
//! exact attention (prefill logits and greedy decoding through the compacted cache),
//! a calibrated TCA gives a perplexity close to exact near tau = 1, and bad input is an
//! error; needle cases of both tasks and `tca quality-niah` with its Wilson summary; RoPE
//! scaling; multi-tau profile lists. Needs the model (scripts/fetch-assets) unless
//! TCA_SKIP_MODEL_TESTS=1.

#[macro_use]
mod common;

use tca::backend::BackendKind;
use tca::calibration::{HeadProfile, LayerProfile, ModelShape, Profile};
use tca::cli::model::RopeArgs;
use tca::cli::model::{
    calibration_tokens, perplexity, AttentionKind, CalibrationArgs, PerplexityArgs,
};
use tca::cli::niah::{
    first_digits, niah_case, niah_prompt, run_quality_niah, QualityNiahArgs, KEYS,
};
use tca::cli::quality::{run_quality_ppl, QualityPplArgs};
use tca::model::sparse::{calibrate_model, generate_tca, CalibrationHook, SparsePolicy};
use tca::model::{assets, Exact, Model};
use tca::selection::policies::Policy;
use tca::selection::Budget;
use tca::Config;

/// b = 16, w = 32: short texts still have a candidate region to select from.
fn small_config(tau: f64) -> Config {
    Config {
        tau,
        block_size: 16,
        window: 32,
        ..Config::default()
    }
}

/// A profile whose every layer and KV head has all its mass far above ln b: the
/// log-normal puts it all on k = b, i.e. Budget::full.
fn full_profile(m: &Model, cfg: &Config) -> Profile {
    let c = &m.llama.config;
    let shape = ModelShape {
        num_q_heads: c.n_heads,
        num_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
    };
    let layers = (0..c.n_layers)
        .map(|layer| LayerProfile {
            layer,
            heads: (0..c.n_kv_heads)
                .map(|kv_head| HeadProfile {
                    kv_head,
                    m: cfg.candidates,
                    mu: 1e3,
                    // Tiny sigma: every weight but k = b is exactly 0 (log-space
                    // normalisation keeps a 1e-7 tail at sigma = 1).
                    sigma: 1e-3,
                    expected_budget: cfg.block_size as f64,
                    retained: 1.0,
                    reached_tau: true,
                    global_tokens: 0,
                    retained_column: Vec::new(),
                    retained_mass: Vec::new(),
                })
                .collect(),
            data_hash: None,
        })
        .collect();
    Profile::new(shape, cfg.clone(), 0, layers)
}

fn novel_tokens(m: &Model) -> Vec<u32> {
    m.tokenizer.encode(assets::PRIDE_AND_PREJUDICE).unwrap()
}

#[test]
fn tca_with_full_budgets_equals_exact_logits() {
    let m = need_model!();
    let cfg = small_config(0.9);
    let prof = full_profile(m, &cfg);
    let full = Budget::full(cfg.block_size).unwrap();
    for l in 0..m.llama.config.n_layers {
        assert!(prof.budgets(l).unwrap().iter().all(|b| *b == full));
    }
    let tokens = &novel_tokens(m)[..160];
    let exact = m.llama.prefill(tokens, &Exact::default()).unwrap();
    for policy in [Policy::Tca, Policy::OracleTopK, Policy::StreamingLlm] {
        let pol = SparsePolicy::new(policy, cfg.clone(), prof.clone()).unwrap();
        let got = m.llama.prefill(tokens, &pol).unwrap();
        assert!((pol.mean_keep_fraction() - 1.0).abs() < 1e-12);
        let scale = exact.iter().fold(0f32, |a, x| a.max(x.abs()));
        let err = exact
            .iter()
            .zip(got.iter())
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        // f64 sparse path against the f32 exact kernel, through 30 layers.
        assert!(
            err <= 1e-4 * scale,
            "{}: max |logit difference| {err} (max |logit| {scale})",
            policy.name()
        );
    }
}

#[test]
fn tca_decoding_cache_with_full_budgets_matches_exact_generation() {
    let m = need_model!();
    let cfg = small_config(0.9);
    let tokens = &novel_tokens(m)[..120];
    // 40 new tokens: the window (w = 32) reaches w + b = 48 and compacts twice.
    let want = m
        .llama
        .generate_greedy(tokens, 40, &Exact::default(), None)
        .unwrap();
    let mut pol = SparsePolicy::new(Policy::Tca, cfg.clone(), full_profile(m, &cfg)).unwrap();
    let (got, cache) = generate_tca(&m.llama, tokens, 40, &mut pol, None).unwrap();
    assert_eq!(got, want);
    // Every position seen by the last step is still held (full budgets keep all).
    let held = cache.tokens_held();
    assert_eq!(held.len(), m.llama.config.n_layers);
    assert!(held.iter().flatten().all(|&n| n == 120 + 39), "{held:?}");
}

#[test]
fn calibrated_tca_is_close_to_exact_near_tau_one() {
    let m = need_model!();
    let all = novel_tokens(m);
    let cfg = small_config(0.99);
    let profs = calibrate_model(&m.llama, &all[20_000..20_256], &cfg, &[0.99, 0.5]).unwrap();
    assert_eq!(profs.len(), 2);
    assert_eq!(profs[0].layers.len(), m.llama.config.n_layers);
    // A lower tau never asks for a larger budget.
    for (a, b) in profs[0].layers.iter().zip(&profs[1].layers) {
        for (ha, hb) in a.heads.iter().zip(&b.heads) {
            assert!(hb.m <= ha.m, "layer {} head {}", a.layer, ha.kv_head);
        }
    }
    let tokens = &all[..256];
    let exact = m.llama.score(tokens, &Exact::default(), 1).unwrap();
    let pol = SparsePolicy::new(Policy::Tca, cfg.clone(), profs[0].clone()).unwrap();
    let tca = m.llama.score(tokens, &pol, 1).unwrap();
    let keep = pol.mean_keep_fraction();
    assert!(keep < 1.0, "nothing was dropped (keep fraction {keep})");
    let (pe, pt) = (exact.perplexity(), tca.perplexity());
    assert!(pt.is_finite());
    assert!(
        (pt / pe - 1.0).abs() < 0.05,
        "perplexity exact {pe} vs TCA {pt}"
    );
    assert!(tca.agreement(&exact).unwrap() > 0.9);
}

#[test]
fn bad_input_is_an_error() {
    let m = need_model!();
    let cfg = small_config(0.9);
    let prof = full_profile(m, &cfg);
    // Block size of the profile and the configuration differ.
    let other = Config {
        block_size: 32,
        ..cfg.clone()
    };
    let e = SparsePolicy::new(Policy::Tca, other, prof.clone())
        .err()
        .unwrap();
    assert!(e.to_string().contains("block_size"), "{e}");
    // A profile without the later layers.
    let mut short = prof.clone();
    short.layers.truncate(1);
    let pol = SparsePolicy::new(Policy::Tca, cfg.clone(), short).unwrap();
    let tokens = &novel_tokens(m)[..64];
    let e = m.llama.score(tokens, &pol, 1).unwrap_err();
    assert!(e.to_string().contains("no layer 1"), "{e}");
    // A profile made for another model shape.
    let mut wrong = prof.clone();
    wrong.model.head_dim = 32;
    let pol = SparsePolicy::new(Policy::Tca, cfg.clone(), wrong).unwrap();
    assert!(m.llama.score(tokens, &pol, 1).is_err());
    // The compacted cache is TCA's only.
    let mut pol = SparsePolicy::new(Policy::StreamingLlm, cfg.clone(), prof.clone()).unwrap();
    assert!(generate_tca(&m.llama, tokens, 4, &mut pol, None).is_err());
    let mut pol = SparsePolicy::new(Policy::Tca, cfg.clone(), prof.clone()).unwrap();
    assert!(generate_tca(&m.llama, tokens, 0, &mut pol, None).is_err());
    assert!(generate_tca(&m.llama, tokens, 8200, &mut pol, None).is_err());
    assert!(generate_tca(&m.llama, &[], 4, &mut pol, None).is_err());
    // Calibration targets outside (0, 1], or none.
    assert!(CalibrationHook::new(&cfg, &[]).is_err());
    assert!(CalibrationHook::new(&cfg, &[1.5]).is_err());
    // Calibration passages outside the text.
    let e = calibration_tokens(m, None, 10_000_000, 64).unwrap_err();
    assert!(e.to_string().contains("only"), "{e}");
    assert!(calibration_tokens(m, None, 0, 1).is_err());
    assert!(calibration_tokens(m, None, 0, 9000).is_err());
    // A NIAH prompt too short for its needle and question.
    let hay = novel_tokens(m);
    assert!(niah_prompt(m, &hay, 20, 50, 1234567).is_err());
    let p = niah_prompt(m, &hay, 300, 50, 1234567).unwrap();
    assert_eq!(p.len(), 300);
    assert!(m
        .tokenizer
        .decode(&p)
        .unwrap()
        .contains("magic number is 1234567."));
    // Scores over different targets cannot be compared.
    let a = m.llama.score(tokens, &Exact::default(), 1).unwrap();
    let b = m.llama.score(tokens, &Exact::default(), 2).unwrap();
    assert!(a.agreement(&b).is_err());
    assert_eq!(a.agreement(&a).unwrap(), 1.0);
}

#[test]
fn quality_ppl_writes_its_table() {
    let _ = need_model!();
    let dir = tempfile::tempdir().unwrap();
    let cfgfile = dir.path().join("c.toml");
    std::fs::write(&cfgfile, "block_size = 16\nwindow = 32\n").unwrap();
    let args = QualityPplArgs {
        rope: Default::default(),
        backend: tca::backend::BackendKind::Cpu,
        text: None,
        lengths: "96".into(),
        taus: "0.5,0.95".into(),
        long_from: usize::MAX,
        long_taus: "0.95".into(),
        peers: "streaming_llm".into(),
        peer_tau: 0.95,
        peer_max_len: 2048,
        calibration: CalibrationArgs {
            config: Some(cfgfile),
            profile: None,
            calib_offset: 30_000,
            calib_tokens: 128,
            calib_text: None,
        },
        out: dir.path().join("q"),
        force: false,
        model: None,
    };
    run_quality_ppl(args.clone()).unwrap();
    let csv = std::fs::read_to_string(dir.path().join("q/ppl.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    // header, exact, TCA at two taus, StreamingLLM
    assert_eq!(lines.len(), 5, "{csv}");
    assert!(lines[0].starts_with("length,attention,tau"));
    assert!(lines[1].contains(",exact,") && lines[1].contains(",1.0,"));
    assert!(lines[4].contains("streaming_llm"));
    assert!(dir.path().join("q/ppl.parquet").is_file());
    // No overwrite without --force; unknown attention names and lengths are refused.
    assert!(run_quality_ppl(args.clone()).is_err());
    let bad = QualityPplArgs {
        rope: Default::default(),
        backend: tca::backend::BackendKind::Cpu,
        peers: "nonsense".into(),
        force: true,
        ..args.clone()
    };
    assert!(run_quality_ppl(bad)
        .unwrap_err()
        .to_string()
        .contains("unknown"));
    let bad = QualityPplArgs {
        rope: Default::default(),
        backend: tca::backend::BackendKind::Cpu,
        lengths: "1".into(),
        force: true,
        ..args.clone()
    };
    assert!(run_quality_ppl(bad).is_err());
    // The GPU runs exact, TCA and every peer; certified-tau mode is refused before
    // any work.
    let e = run_quality_ppl(QualityPplArgs {
        backend: BackendKind::Cuda,
        peers: "streaming_llm,tca_certified".into(),
        force: true,
        ..args.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("CPU only"), "{e}");
    if !cfg!(feature = "cuda") {
        for peers in [
            "",
            "block_topk,cumulative_threshold",
            "oracle_topk,streaming_llm",
        ] {
            let e = run_quality_ppl(QualityPplArgs {
                backend: BackendKind::Cuda,
                peers: peers.into(),
                force: true,
                ..args.clone()
            })
            .unwrap_err()
            .to_string();
            assert!(e.contains("without CUDA"), "{e}");
        }
    }
}

#[test]
fn perplexity_cli_runs_tca_and_the_peers() {
    let _ = need_model!();
    let dir = tempfile::tempdir().unwrap();
    let cfgfile = dir.path().join("c.toml");
    std::fs::write(&cfgfile, "tau = 0.95\nblock_size = 16\nwindow = 32\n").unwrap();
    let args = PerplexityArgs {
        rope: Default::default(),
        text: None,
        tokens: 96,
        from: 0,
        attention: AttentionKind::Exact,
        calibration: CalibrationArgs {
            config: Some(cfgfile.clone()),
            profile: None,
            calib_offset: 40_000,
            calib_tokens: 128,
            calib_text: None,
        },
        model: None,
        backend: BackendKind::Cpu,
    };
    let exact = perplexity(&args).unwrap();
    for kind in [AttentionKind::Tca, AttentionKind::StreamingLlm] {
        let r = perplexity(&PerplexityArgs {
            rope: Default::default(),
            attention: kind,
            ..args.clone()
        })
        .unwrap();
        assert!(r.keep_fraction < 1.0, "{kind:?} kept everything");
        let (pe, pt) = (exact.score.perplexity(), r.score.perplexity());
        assert!(
            pt.is_finite() && (pt / pe - 1.0).abs() < 0.1,
            "{kind:?}: {pe} vs {pt}"
        );
    }
    // A profile that is not a profile, and a calibration passage beyond the text.
    let junk = dir.path().join("p.json");
    std::fs::write(&junk, "{}").unwrap();
    let mut bad = args.clone();
    bad.attention = AttentionKind::Tca;
    bad.calibration.profile = Some(junk);
    assert!(perplexity(&bad).is_err());
    let mut bad = args.clone();
    bad.attention = AttentionKind::Tca;
    bad.calibration.calib_offset = 10_000_000;
    assert!(perplexity(&bad).unwrap_err().to_string().contains("only"));
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
    // The GPU runs every attention but certified-tau mode; without a device (or CUDA)
    // it says so.
    let e = run_quality_niah(QualityNiahArgs {
        attention: "exact,oracle_topk,tca_certified".into(),
        backend: BackendKind::Cuda,
        force: true,
        ..a.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("CPU only"), "{e}");
    if !cfg!(feature = "cuda") {
        for attention in [
            a.attention.as_str(),
            "exact,block_topk,cumulative_threshold",
            "exact,oracle_topk,streaming_llm",
        ] {
            let e = run_quality_niah(QualityNiahArgs {
                backend: BackendKind::Cuda,
                attention: attention.into(),
                force: true,
                ..a.clone()
            })
            .unwrap_err()
            .to_string();
            assert!(e.contains("without CUDA"), "{e}");
        }
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

#[test]
fn calibration_from_a_capture_equals_calibration_in_the_forward() {
    use tca::model::sparse::calibrate_from_capture;
    let m = need_model!();
    let cfg = small_config(0.9);
    let tokens = &novel_tokens(m)[30_000..30_128];
    let n = m.llama.config.n_layers;
    let direct = calibrate_model(&m.llama, tokens, &cfg, &[0.5, 0.9]).unwrap();
    let cap = m
        .llama
        .capture(tokens, &(0..n).collect::<Vec<_>>())
        .unwrap();
    let from = calibrate_from_capture(&cap, n, &cfg, &[0.5, 0.9]).unwrap();
    assert_eq!(from, direct);
    // Every layer is needed.
    let part = m.llama.capture(tokens, &[0, 1]).unwrap();
    let e = calibrate_from_capture(&part, n, &cfg, &[0.9]).unwrap_err();
    assert!(e.to_string().contains("every layer"), "{e}");
}
