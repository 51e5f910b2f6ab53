//! Peer policies (docs/algorithm.md §5): valid key sets, equal budgets, and the oracle top-k
//! retains at least as much mass as any policy of the same per-query size.

mod common;

use proptest::prelude::*;
use tca::bound::{audit, Reading};
use tca::selection::policies::{keeps_window, key_sets, Policy};
use tca::selection::select;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(64)))]

    #[test]
    fn every_policy_gives_valid_key_sets((heads, cfg, budgets) in common::case(), sinks in 0usize..4) {
        let tca = select(&heads, &cfg, &budgets).unwrap();
        let audits: Vec<_> = Policy::ALL.iter().map(|&p| {
            let ks = key_sets(p, &heads, &cfg, &tca, sinks).unwrap();
            for h in 0..heads.num_q_heads() {
                for i in 0..heads.len() {
                    let k = ks.keys(h, i);
                    assert!(k.windows(2).all(|w| w[0] < w[1]) && k.iter().all(|&j| j <= i), "{p:?}");
                    if p != Policy::OracleTopK {
                        assert!(k.contains(&i), "{p:?} drops the query's own token");
                    }
                    let want = tca.kept(heads.kv_of(h), i);
                    if matches!(p, Policy::Tca | Policy::OracleTopK | Policy::StreamingLlm) {
                        assert_eq!(k.len(), want, "{p:?} budget");
                    }
                    if matches!(p, Policy::Tca | Policy::BlockTopK | Policy::CumulativeThreshold) {
                        assert!(keeps_window(&k, cfg.window, i), "{p:?} window");
                    }
                }
            }
            audit(&heads, ks.as_ref()).unwrap()
        }).collect();
        let oracle = &audits[1];
        for (p, a) in Policy::ALL.iter().zip(&audits) {
            for (x, o) in a.iter().zip(oracle) {
                for r in [Reading::Identity, Reading::LinfEntrymax, Reading::L1Induced, Reading::L2Diameter] {
                    prop_assert!(r.holds_at(x, cfg.tau), "{p:?} {r:?} {x:?}");
                }
                if matches!(p, Policy::Tca | Policy::StreamingLlm) {
                    prop_assert!(o.gamma <= x.gamma + 1e-12, "oracle omits more than {p:?}");
                }
            }
        }
    }
}
