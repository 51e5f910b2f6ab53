//! Calibration (docs/algorithm.md §2) and decoding (section 3) against the oracle.

mod common;

use proptest::prelude::*;
use tca::bound::{audit, Reading};
use tca::calibration::{calibrate, Profile};
use tca::config::Criterion;
use tca::data::{synth, HeadKind, SynthSpec};
use tca::decode::decode;
use tca::selection::{candidates, select, Budget};
use tca::Config;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(64)))]

    /// The `mass` criterion's retained score of the chosen candidate is 1 - mean gamma
    /// measured by the bound audit on the same selection.
    #[test]
    fn mass_criterion_is_one_minus_mean_gamma((heads, cfg, _b) in common::case()) {
        let prof = calibrate(&heads, &cfg, 0).unwrap();
        let sel = select(&heads, &cfg, &prof.budgets(0).unwrap()).unwrap();
        let audits = audit(&heads, &sel).unwrap();
        for (kv, hp) in prof.layers[0].heads.iter().enumerate() {
            let qh = heads.q_heads_of(kv);
            let group: Vec<_> = audits.iter().filter(|a| qh.contains(&a.head)).collect();
            let mean_gamma = group.iter().map(|a| a.gamma).sum::<f64>() / group.len() as f64;
            prop_assert!((hp.retained_mass[hp.m - 1] - (1.0 - mean_gamma)).abs() < 1e-9);
        }
    }

    /// The chosen candidate is the first (by expected budget) that reaches tau.
    #[test]
    fn calibration_picks_the_first_candidate_reaching_tau((heads, cfg, _b) in common::case()) {
        let prof = calibrate(&heads, &cfg, 0).unwrap();
        let cands = candidates(&cfg).unwrap();
        for hp in &prof.layers[0].heads {
            let a = match cfg.criterion { Criterion::Column => &hp.retained_column, Criterion::Mass => &hp.retained_mass };
            prop_assert_eq!(a.len(), cands.len());
            match a.iter().position(|&x| x >= cfg.tau) {
                Some(i) => { prop_assert!(hp.reached_tau); prop_assert_eq!(hp.m, i + 1); }
                None => { prop_assert!(!hp.reached_tau); prop_assert_eq!(hp.m, cands.len()); }
            }
            prop_assert!(a.iter().all(|&x| (0.0..=1.0 + 1e-12).contains(&x)));
        }
    }

    /// The decode cache never exceeds |S_G| + w + b, is exact when nothing is dropped,
    /// and every decode step is audited: one audit per step and query head, where the
    /// identity (the cache's own output against the exact row over what it holds) and
    /// the three true readings hold.
    #[test]
    fn decode_cache_is_bounded((heads, cfg, budgets) in common::case().prop_filter("L >= 2", |(h, _, _)| h.len() >= 2)) {
        let prefill = heads.len() / 2;
        let r = decode(&heads, &cfg, &budgets, prefill.max(1)).unwrap();
        for h in &r.heads {
            prop_assert!(h.peak_tokens <= h.ceiling_tokens, "{h:?}");
            prop_assert!(h.global_tokens + h.window_tokens <= heads.len());
        }
        prop_assert_eq!(r.audits.len(), r.steps * heads.num_q_heads());
        for a in &r.audits {
            prop_assert!(a.query >= r.prefill_len && a.finite);
            for rd in [Reading::Identity, Reading::LinfEntrymax, Reading::L1Induced, Reading::L2Diameter] {
                prop_assert!(rd.holds_at(a, cfg.tau), "{rd:?} at decode step {a:?}");
            }
        }
        let full = vec![Budget::full(cfg.block_size).unwrap(); heads.num_kv_heads()];
        let exact = decode(&heads, &cfg, &full, prefill.max(1)).unwrap();
        prop_assert!(exact.max_gamma == 0.0 && exact.max_rel_err < 1e-12);
    }
}

#[test]
fn column_criterion_with_everything_kept_is_one() {
    let s = synth(&SynthSpec {
        kind: HeadKind::Sink,
        q_heads: 2,
        kv_heads: 1,
        len: 96,
        dim: 8,
        seed: 1,
    })
    .unwrap();
    let cfg = Config {
        block_size: 8,
        window: 16,
        tau: 1.0,
        ..Config::default()
    };
    let prof = calibrate(&s.heads, &cfg, 0).unwrap();
    // tau = 1 asks for everything: log-normal candidates never keep all, so it fails.
    let h = &prof.layers[0].heads[0];
    assert!(!h.reached_tau && h.m == cfg.candidates);
    let cfg_short = Config { window: 96, ..cfg };
    let prof = calibrate(&s.heads, &cfg_short, 0).unwrap();
    assert_eq!(prof.layers[0].heads[0].retained_column[0], 1.0);
    assert!(prof.layers[0].heads[0].reached_tau);
}

#[test]
fn profile_round_trips_and_refuses_other_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.json");
    let spec = SynthSpec {
        kind: HeadKind::Retrieval,
        q_heads: 4,
        kv_heads: 2,
        len: 300,
        dim: 16,
        seed: 3,
    };
    let s = synth(&spec).unwrap();
    let cfg = Config {
        block_size: 16,
        window: 64,
        ..Config::default()
    };
    let prof = calibrate(&s.heads, &cfg, 0).unwrap();
    prof.save(&path, false).unwrap();
    assert_eq!(Profile::load(&path).unwrap(), prof);
    assert!(prof.save(&path, false).is_err(), "must refuse to overwrite");
    let other = synth(&SynthSpec {
        q_heads: 6,
        kv_heads: 3,
        ..spec
    })
    .unwrap();
    let err = prof
        .check_fits(&other.heads, &cfg, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("query heads"), "{err}");
    let err = prof
        .check_fits(
            &s.heads,
            &Config {
                block_size: 32,
                ..cfg.clone()
            },
            0,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("block_size"), "{err}");
    assert!(prof.check_fits(&s.heads, &cfg, 5).is_err());
}

#[test]
fn decode_saves_memory_on_long_synthetic_heads() {
    let s = synth(&SynthSpec {
        kind: HeadKind::Sink,
        q_heads: 2,
        kv_heads: 1,
        len: 1024,
        dim: 16,
        seed: 5,
    })
    .unwrap();
    let cfg = Config {
        block_size: 32,
        window: 128,
        ..Config::default()
    };
    let prof = calibrate(&s.heads.prefix(768).unwrap(), &cfg, 0).unwrap();
    let r = decode(&s.heads, &cfg, &prof.budgets(0).unwrap(), 768).unwrap();
    let h = &r.heads[0];
    assert_eq!(h.compactions, 256 / 32);
    assert!(
        h.kv_bytes < r.full_kv_bytes / 2,
        "{} vs {}",
        h.kv_bytes,
        r.full_kv_bytes
    );
    assert!(r.max_gamma < 0.1);
}
