//! Selection invariants (docs/algorithm.md §1) on random layers, configurations and budgets.

mod common;

use proptest::prelude::*;
use tca::reference::attention;
use tca::selection::blocks::candidate_blocks;
use tca::selection::{select, sparse_attention, window_start, Budget};

fn max_abs_diff(a: &ndarray::Array3<f64>, b: &ndarray::Array3<f64>) -> f64 {
    (a - b).fold(0.0f64, |m, x| m.max(x.abs()))
}

proptest! {
    #[test]
    fn key_sets_are_causal_sorted_and_keep_the_window((heads, cfg, budgets) in common::case()) {
        let sel = select(&heads, &cfg, &budgets).unwrap();
        let l = heads.len();
        for kv in 0..heads.num_kv_heads() {
            let glob = &sel.heads[kv].global;
            prop_assert!(glob.windows(2).all(|w| w[0] < w[1]), "S_G not strictly ascending");
            prop_assert!(glob.iter().all(|&j| j < l.saturating_sub(cfg.window)), "S_G outside [0, L - w)");
            for i in 0..l {
                let s: Vec<usize> = sel.kv_keys(kv, i).collect();
                prop_assert!(s.windows(2).all(|w| w[0] < w[1]), "duplicate or unsorted key at {i}");
                prop_assert!(s.iter().all(|&j| j <= i), "non-causal key at {i}");
                let lo = window_start(cfg.window, i);
                prop_assert!((lo..=i).all(|j| s.contains(&j)), "window not kept at {i}");
                prop_assert_eq!(s.len(), sel.kept(kv, i));
            }
        }
    }

    #[test]
    fn block_budgets_follow_the_rank((heads, cfg, budgets) in common::case()) {
        let sel = select(&heads, &cfg, &budgets).unwrap();
        let blocks = candidate_blocks(heads.len(), &cfg);
        let nb = blocks.len();
        for (kv, hs) in sel.heads.iter().enumerate() {
            let order = &hs.ranking.order;
            prop_assert_eq!(order.len(), nb);
            for (r, &j) in order.iter().enumerate() {
                let want = budgets[kv].block_budget(r, nb).min(blocks[j].len());
                prop_assert_eq!(hs.block_budgets[j], want);
                let inside = hs.global.iter().filter(|&&x| blocks[j].contains(&x)).count();
                prop_assert_eq!(inside, want, "block {} keeps {} tokens, budget {}", j, inside, want);
                // Better rank never gets a smaller unclipped budget.
                if r > 0 {
                    prop_assert!(budgets[kv].block_budget(r - 1, nb) >= budgets[kv].block_budget(r, nb));
                }
                // Within a block the kept tokens are the most important ones.
                let s = &hs.ranking.importance;
                let kept_min = hs.global.iter().filter(|&&x| blocks[j].contains(&x)).map(|&x| s[x]).fold(f64::INFINITY, f64::min);
                let dropped_max = blocks[j].clone().filter(|x| !hs.global.contains(x)).map(|x| s[x]).fold(f64::NEG_INFINITY, f64::max);
                prop_assert!(kept_min >= dropped_max);
            }
            let scores = &hs.ranking.scores.score;
            prop_assert!(order.windows(2).all(|w| scores[w[0]] > scores[w[1]] || (scores[w[0]] == scores[w[1]] && w[0] < w[1])), "order {:?} scores {:?}", order, scores);
        }
    }

    #[test]
    fn full_budgets_give_exact_attention((heads, mut cfg, _b) in common::case()) {
        cfg.window = cfg.window.min(heads.len());
        let full = vec![Budget::full(cfg.block_size).unwrap(); heads.num_kv_heads()];
        let sel = select(&heads, &cfg, &full).unwrap();
        let exact = attention(&heads);
        let sparse = sparse_attention(&heads, &sel).unwrap();
        prop_assert!(max_abs_diff(&exact.o, &sparse.o) <= 1e-12);
        prop_assert!(max_abs_diff(&exact.lse.clone().insert_axis(ndarray::Axis(2)), &sparse.lse.insert_axis(ndarray::Axis(2))) <= 1e-12);
    }

    #[test]
    fn short_sequences_are_exact((heads, mut cfg, budgets) in common::case()) {
        cfg.window += heads.len(); // L <= w
        let sel = select(&heads, &cfg, &budgets).unwrap();
        prop_assert!(sel.heads.iter().all(|h| h.global.is_empty()));
        let exact = attention(&heads);
        let sparse = sparse_attention(&heads, &sel).unwrap();
        prop_assert!(max_abs_diff(&exact.o, &sparse.o) <= 1e-12);
    }

    #[test]
    fn selection_is_deterministic_across_thread_counts((heads, cfg, budgets) in common::case()) {
        let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
        let run = || {
            let sel = select(&heads, &cfg, &budgets).unwrap();
            let prof = tca::calibration::calibrate(&heads, &cfg, 0).unwrap();
            (sel.heads.iter().map(|h| h.global.clone()).collect::<Vec<_>>(), sparse_attention(&heads, &sel).unwrap().o, prof)
        };
        let (g1, o1, p1) = pool(1).install(run);
        let (g3, o3, p3) = pool(3).install(run);
        prop_assert_eq!(g1, g3);
        prop_assert_eq!(o1, o3);
        prop_assert_eq!(p1, p3);
    }
}
