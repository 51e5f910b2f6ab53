//! Theorem 1 on random layers: the identity and every true reading hold to the f64
//! allowance `tca::bound::TOL` (lhs <= rhs + 1e-9 max|V|), at every query.
//! More cases: `PROPTEST_CASES=2000 cargo test --release`.

mod common;

use proptest::prelude::*;
use tca::bound::{audit, audit_outputs, summarize, Allowance, Reading, TOL};
use tca::selection::{select, sparse_attention, KeySets};

proptest! {
    #[test]
    fn identity_and_true_readings_hold((heads, cfg, budgets) in common::case()) {
        let sel = select(&heads, &cfg, &budgets).unwrap();
        for a in audit(&heads, &sel).unwrap() {
            for r in [Reading::Identity, Reading::LinfEntrymax, Reading::L1Induced, Reading::L2Diameter] {
                prop_assert!(r.holds_at(&a, cfg.tau), "{r:?} fails at {a:?}");
            }
            // gamma is a sum of probabilities: within [0, 1] up to rounding.
            prop_assert!(a.gamma >= 0.0 && a.gamma <= 1.0 + 1e-12, "gamma = {}", a.gamma);
        }
    }

    #[test]
    fn literal_reading_holds_in_one_dimension(
        (heads, cfg, budgets) in (1usize..=2, 1usize..=3, 1usize..=40)
            .prop_flat_map(|(kv, g, l)| common::heads_with(kv, g, l, 1))
            .prop_flat_map(|h| (Just(h), common::any_config()))
            .prop_flat_map(|(h, c)| {
                let n = h.num_kv_heads();
                let b = c.block_size;
                (Just(h), Just(c), prop::collection::vec(common::budget(b), n))
            })
    ) {
        let sel = select(&heads, &cfg, &budgets).unwrap();
        for a in audit(&heads, &sel).unwrap() {
            prop_assert!(Reading::L1Entrymax.holds_at(&a, cfg.tau), "d = 1 violation at {a:?}");
        }
    }

    /// The audit from outputs alone (the GPU's route) agrees with the oracle's audit when
    /// fed the oracle's own f64 outputs: the same gamma, errors and verdicts, except the
    /// identity, which outputs cannot measure.
    #[test]
    fn audit_from_outputs_agrees_with_the_oracle((heads, cfg, budgets) in common::case()) {
        let sel = select(&heads, &cfg, &budgets).unwrap();
        let want = audit(&heads, &sel).unwrap();
        let full = tca::reference::exact::attention(&heads);
        let sparse = sparse_attention(&heads, &sel).unwrap();
        let kept = |h: usize, i: usize| sel.keys(h, i).len();
        let allow = Allowance { rounding: TOL, gamma: TOL };
        let got = audit_outputs(&heads, &full, &sparse, &kept, allow).unwrap();
        prop_assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            prop_assert_eq!((g.head, g.query, g.kept), (w.head, w.query, w.kept));
            prop_assert!((g.gamma - w.gamma).abs() <= 1e-12, "gamma {} vs {}", g.gamma, w.gamma);
            let scale = 1e-12 * (1.0 + w.vrow_l1_max);
            prop_assert!((g.err_l1 - w.err_l1).abs() <= scale, "{g:?} vs {w:?}");
            prop_assert!(g.identity_residual.is_nan());
            prop_assert!(!Reading::Identity.measured_at(g, cfg.tau));
        }
        let (sg, sw) = (summarize(&got, cfg.tau), summarize(&want, cfg.tau));
        for r in [Reading::LinfEntrymax, Reading::L1Induced, Reading::L2Diameter] {
            prop_assert!(sg.readings[r.key()].holds, "{:?} on outputs", r);
        }
        prop_assert_eq!(sg.readings["identity"].measured, 0);
        prop_assert!(!sg.readings["identity"].holds);
        prop_assert_eq!(sw.readings["identity"].measured, want.len());
    }
}
