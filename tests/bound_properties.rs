//! Theorem 1 on random layers: the identity and every true reading hold to the f64
//! allowance `tca::bound::TOL` (lhs <= rhs + 1e-9 max|V|), at every query.
//! More cases: `PROPTEST_CASES=2000 cargo test --release`.

mod common;

use proptest::prelude::*;
use tca::bound::{all_rows, audit, audit_outputs, audit_rows, summarize, Precision, Reading};
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

    /// The audit from outputs alone (the GPU's self-audit route) agrees with the
    /// oracle's audit when fed the oracle's own f64 outputs: the same gamma, errors and
    /// verdicts, except the identity, which outputs cannot measure.
    #[test]
    fn audit_from_outputs_agrees_with_the_oracle((heads, cfg, budgets) in common::case()) {
        let sel = select(&heads, &cfg, &budgets).unwrap();
        let want = audit(&heads, &sel).unwrap();
        let full = tca::reference::exact::attention(&heads);
        let sparse = sparse_attention(&heads, &sel).unwrap();
        let kept = |h: usize, i: usize| sel.keys(h, i).len();
        let got = audit_outputs(&heads, &full, &sparse, &kept, Precision::F64).unwrap();
        prop_assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            prop_assert_eq!((g.head, g.query, g.kept), (w.head, w.query, w.kept));
            prop_assert!((g.gamma - w.gamma).abs() <= 1e-12, "gamma {} vs {}", g.gamma, w.gamma);
            let scale = 1e-12 * (1.0 + w.vrow_l1_max);
            prop_assert!((g.err_l1 - w.err_l1).abs() <= scale, "{g:?} vs {w:?}");
            prop_assert!(g.identity_residual.is_none());
            prop_assert!(!Reading::Identity.measured_at(g));
            prop_assert!(g.finite && w.finite);
        }
        let (sg, sw) = (summarize(&got, cfg.tau), summarize(&want, cfg.tau));
        for r in [Reading::LinfEntrymax, Reading::L1Induced, Reading::L2Diameter] {
            prop_assert!(sg.readings[r.key()].holds, "{:?} on outputs", r);
        }
        prop_assert_eq!(sg.readings["identity"].measured, 0);
        prop_assert!(!sg.readings["identity"].holds);
        prop_assert_eq!(sw.readings["identity"].measured, want.len());
    }

    /// A sparse path that attends to another set than it claims breaks the identity:
    /// O~ computed over S_i minus one key (or plus one omitted key), audited against
    /// the claimed S_i, fails it at that query.
    #[test]
    fn the_identity_catches_a_wrong_key_set((heads, cfg, budgets) in common::case()) {
        let sel = select(&heads, &cfg, &budgets).unwrap();
        let wrong = DropOne { inner: &sel };
        let o_wrong = sparse_attention(&heads, &wrong).unwrap();
        let rows = all_rows(heads.num_q_heads(), heads.len());
        let audits = audit_rows(&heads, &sel, &o_wrong, Precision::F64, &rows).unwrap();
        let want = sparse_attention(&heads, &sel).unwrap();
        for a in &audits {
            let differs = wrong.keys(a.head, a.query) != sel.keys(a.head, a.query);
            // Where the two sets give outputs that differ beyond the allowance, the
            // identity must fail; where they give the same output it must hold.
            let gap = (&o_wrong.o.slice(ndarray::s![a.head, a.query, ..])
                - &want.o.slice(ndarray::s![a.head, a.query, ..]))
                .fold(0.0f64, |m, x| m.max(x.abs()));
            if differs && gap > 10.0 * a.allow_identity {
                prop_assert!(!Reading::Identity.holds_at(a, cfg.tau), "wrong set passed at {a:?}");
            }
            if gap == 0.0 {
                prop_assert!(Reading::Identity.holds_at(a, cfg.tau));
            }
        }
    }
}

/// Key sets that drop the first key of every S_i with two or more keys (a sparse path
/// with a masking bug).
struct DropOne<'a> {
    inner: &'a tca::selection::Selection,
}

impl KeySets for DropOne<'_> {
    fn shape(&self) -> (usize, usize) {
        self.inner.shape()
    }
    fn keys(&self, h: usize, i: usize) -> Vec<usize> {
        let mut k = self.inner.keys(h, i);
        if k.len() > 1 {
            k.remove(0);
        }
        k
    }
}

/// A deliberately wrong key set on a fixed layer: the identity fails, and it names
/// the query; with the right set it holds.
#[test]
fn identity_fails_on_a_sparse_output_over_another_set() {
    let v =
        ndarray::Array3::from_shape_vec((1, 4, 2), vec![1.0, 0.0, -1.0, 2.0, 3.0, -3.0, 0.5, 0.5])
            .unwrap();
    let qk = ndarray::Array3::from_shape_fn((1, 4, 2), |(_, i, c)| (i + c) as f64 * 0.1);
    let heads = tca::Heads::new(qk.clone(), qk, v).unwrap();
    let cfg = tca::Config {
        block_size: 2,
        window: 1,
        ..tca::Config::default()
    };
    let budgets = vec![tca::selection::Budget::point(1, 2).unwrap()];
    let sel = select(&heads, &cfg, &budgets).unwrap();
    let right = sparse_attention(&heads, &sel).unwrap();
    let wrong = sparse_attention(&heads, &DropOne { inner: &sel }).unwrap();
    let rows = all_rows(1, 4);
    let ok = audit_rows(&heads, &sel, &right, Precision::F64, &rows).unwrap();
    assert!(summarize(&ok, cfg.tau).readings["identity"].holds);
    let bad = audit_rows(&heads, &sel, &wrong, Precision::F64, &rows).unwrap();
    let s = summarize(&bad, cfg.tau);
    assert!(
        !s.readings["identity"].holds,
        "{:?}",
        s.readings["identity"]
    );
    assert!(s.readings["identity"].violations >= 1);
}
