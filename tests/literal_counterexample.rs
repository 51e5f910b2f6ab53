//! The literal reading ||e_i||_1 <= 2 gamma_i max|V| is false for d >= 2: proptest
//! searches for a violation, shrinks it to the smallest it can and the test prints it.

use ndarray::Array3;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestError, TestRunner};
use tca::bound::{audit, Reading};
use tca::selection::{select, Budget};
use tca::{Config, Heads};

#[test]
fn literal_reading_has_a_counterexample_in_two_or_more_dimensions() {
    // Shapes and small integer values drawn independently, so that proptest shrinks L, d
    // and b towards 1 and every value towards 0 separately.
    const MAX: usize = 6 * 4;
    let ints = || prop::collection::vec((-3i32..=3).prop_map(f64::from), MAX);
    let strategy = (1usize..=6, 1usize..=4, 1usize..=3, ints(), ints(), ints()).prop_map(
        |(l, d, b, q, k, v)| {
            let t = |x: Vec<f64>| Array3::from_shape_vec((1, l, d), x[..l * d].to_vec()).unwrap();
            (Heads::new(t(q), t(k), t(v)).unwrap(), b)
        },
    );
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 4096,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let result = runner.run(&strategy, |(heads, b): (Heads, usize)| {
        // The smallest selection that omits anything: a window of one, one token per block.
        let cfg = Config {
            block_size: b,
            window: 1,
            ..Config::default()
        };
        let sel = select(&heads, &cfg, &[Budget::point(1, b).unwrap()]).unwrap();
        for a in audit(&heads, &sel).unwrap() {
            prop_assert!(
                Reading::L1Entrymax.holds_at(&a, cfg.tau),
                "||e||_1 = {} > 2 gamma max|V| = {} (gamma = {}, max|V| = {}) at query {}",
                a.err_l1,
                2.0 * a.gamma * a.vmax_abs,
                a.gamma,
                a.vmax_abs,
                a.query
            );
        }
        Ok(())
    });
    match result {
        Err(TestError::Fail(reason, (heads, b))) => {
            let (q, k, v) = heads.tensors();
            println!("minimal counterexample (b = {b}, w = 1, one token per block): {reason}");
            println!("q = {q:?}\nk = {k:?}\nv = {v:?}");
            assert!(
                heads.dim() >= 2,
                "a violation needs d >= 2, found d = {}",
                heads.dim()
            );
        }
        other => panic!("expected a counterexample to the literal reading, got {other:?}"),
    }
}
