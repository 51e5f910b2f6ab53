//! Strategies shared by the property tests: random layers, configurations and budgets,
//! small enough that hundreds of cases run in seconds.
#![allow(dead_code)]

#[macro_use]
pub mod model;

use ndarray::Array3;
use proptest::prelude::*;
use tca::config::{Criterion, GqaReduce, MassNorm};
use tca::selection::Budget;
use tca::{Config, Heads};

/// A value: mostly moderate, sometimes large (adversarial softmax peaks) or tiny.
pub fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        6 => -3.0..3.0f64,
        1 => -40.0..40.0f64,
        1 => Just(0.0),
        1 => -1e-6..1e-6f64,
    ]
}

/// A layer of `kv` KV heads with group g, length L and dim d.
pub fn heads_with(kv: usize, g: usize, l: usize, d: usize) -> impl Strategy<Value = Heads> {
    (
        prop::collection::vec(value(), kv * g * l * d),
        prop::collection::vec(value(), kv * l * d),
        prop::collection::vec(value(), kv * l * d),
    )
        .prop_map(move |(q, k, v)| {
            Heads::new(
                Array3::from_shape_vec((kv * g, l, d), q).unwrap(),
                Array3::from_shape_vec((kv, l, d), k).unwrap(),
                Array3::from_shape_vec((kv, l, d), v).unwrap(),
            )
            .unwrap()
        })
}

/// Random shapes: d from 1 to 128, GQA groups, L up to 40 (so L < b, L <= w and L not a
/// multiple of b all occur).
pub fn any_heads() -> impl Strategy<Value = Heads> {
    (
        1usize..=2,
        1usize..=3,
        1usize..=40,
        prop_oneof![1usize..=8, 9usize..=128],
    )
        .prop_flat_map(|(kv, g, l, d)| heads_with(kv, g, l, d))
}

/// A valid configuration for sequences of up to ~40 tokens.
pub fn any_config() -> impl Strategy<Value = Config> {
    (
        0.05..=1.0f64,
        1usize..=8,
        1usize..=24,
        0.0..=1.0f64,
        1usize..=6,
        0.2..2.0f64,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        1usize..=3,
    )
        .prop_map(|(tau, b, w, alpha, m, sigma, col, mn, gq, iq)| Config {
            tau,
            block_size: b,
            window: w,
            alpha,
            candidates: m,
            sigma,
            criterion: if col {
                Criterion::Column
            } else {
                Criterion::Mass
            },
            mass_norm: if mn { MassNorm::None } else { MassNorm::Max },
            gqa_reduce: if gq { GqaReduce::Mean } else { GqaReduce::Max },
            importance_queries: iq,
            ..Config::default()
        })
}

/// A random budget distribution over 1..b (some weights zero).
pub fn budget(b: usize) -> impl Strategy<Value = Budget> {
    prop::collection::vec(prop_oneof![Just(0.0), 0.0..1.0f64], b).prop_map(move |mut w| {
        if w.iter().all(|x| *x == 0.0) {
            w[b - 1] = 1.0;
        }
        Budget::new(w).unwrap()
    })
}

/// A layer, a configuration and one budget per KV head.
pub fn case() -> impl Strategy<Value = (Heads, Config, Vec<Budget>)> {
    (any_heads(), any_config()).prop_flat_map(|(h, c)| {
        let n = h.num_kv_heads();
        let b = c.block_size;
        (Just(h), Just(c), prop::collection::vec(budget(b), n))
    })
}

/// Cases for a slower property: `default`, or PROPTEST_CASES when it is set.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
