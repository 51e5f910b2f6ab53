//! Theorem 1 on random layers: the identity and every true reading hold to the f64
//! allowance `tca::bound::TOL` (lhs <= rhs + 1e-9 max|V|), at every query.
//! More cases: `PROPTEST_CASES=2000 cargo test --release`.

mod common;

use proptest::prelude::*;
use tca::bound::{audit, Reading};
use tca::selection::select;

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
}
