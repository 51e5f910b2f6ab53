//! Checks that can fail: volume and tightness of the true readings, a non-finite output
//! failing every reading, an error of twice the bound caught through the bf16
//! allowance at gamma ~ 1e-3, and the prefix norms that a looser checker would replace.

use ndarray::{s, Array3};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;
use tca::bound::{all_rows, audit, audit_outputs, audit_rows, summarize, Precision, Reading};
use tca::selection::{select, sparse_attention, Budget, KeySets};
use tca::{Config, Heads};

const TRUE: [Reading; 3] = [
    Reading::LinfEntrymax,
    Reading::L1Induced,
    Reading::L2Diameter,
];

fn normal(rng: &mut StdRng, shape: (usize, usize, usize), sd: f64) -> Array3<f64> {
    Array3::from_shape_simple_fn(shape, || sd * rng.sample::<f64, _>(StandardNormal))
}

/// V of KV head `kv` set to two points: -a s on S_i* of query `i_star` (of the group's
/// first query head), +a s elsewhere, with s a sign vector. At i* every query head of
/// the group then has e = 2 a gamma s: linf_entrymax, l1_induced and l2_diameter are
/// all tight (lhs / rhs = 1).
fn two_point(heads: &Heads, sel: &dyn KeySets, rng: &mut StdRng, i_star: usize) -> Heads {
    let (q, k, v) = heads.tensors();
    let mut v = v.clone();
    let d = heads.dim();
    for kv in 0..heads.num_kv_heads() {
        let keys = sel.keys(kv * heads.group(), i_star);
        let a = 0.5 + rng.random::<f64>() * 3.0;
        let sign: Vec<f64> = (0..d)
            .map(|_| if rng.random_bool(0.5) { a } else { -a })
            .collect();
        for j in 0..heads.len() {
            let side = if keys.contains(&j) { -1.0 } else { 1.0 };
            for c in 0..d {
                v[[kv, j, c]] = side * sign[c];
            }
        }
    }
    Heads::new(q.clone(), k.clone(), v).unwrap()
}

/// At least 10^5 (query head, query) checks of the true readings, L up to 512, d up to
/// 128, GQA, L not a multiple of b, L <= w, random and adversarial layers: every true
/// reading holds, and its largest observed lhs / rhs exceeds 0.5, so a checker loosened
/// by a factor of 2 (4 gamma for 2 gamma) would be caught here.
#[test]
fn a_hundred_thousand_checks_hold_and_come_close_to_the_bound() {
    let mut rng = StdRng::seed_from_u64(2026);
    let lens = [1usize, 7, 33, 64, 100, 129, 200, 257, 384, 512];
    let dims = [1usize, 2, 3, 8, 16, 64, 128];
    let (mut checked, mut cases) = (0usize, 0usize);
    let mut worst = [0.0f64; 3];
    let mut identity_worst = 0.0f64;
    while checked < 100_000 {
        let l = lens[cases % lens.len()];
        let d = dims[(cases / 2 + cases % 3) % dims.len()];
        let (kv, g) = (1 + cases % 2, [1, 2, 3, 4][cases % 4]);
        let b = [1usize, 4, 16, 64][cases % 4];
        let w = [1usize, 8, 32, 600][(cases / 4) % 4];
        let kind = cases % 4;
        cases += 1;
        // 0: Gaussian; 1: peaked (large logits); 2, 3: two-point values (mass split
        // between S_i* and its complement by uniform attention for 3).
        let sd_qk = [1.0, 4.0, 1.0, 0.0][kind];
        let q = normal(&mut rng, (kv * g, l, d), sd_qk);
        let k = normal(&mut rng, (kv, l, d), 1.0);
        let v = normal(&mut rng, (kv, l, d), 1.0);
        let mut heads = Heads::new(q, k, v).unwrap();
        let cfg = Config {
            block_size: b,
            window: w,
            ..Config::default()
        };
        let budgets: Vec<Budget> = (0..kv)
            .map(|_| Budget::point(rng.random_range(1..=b), b).unwrap())
            .collect();
        let sel = select(&heads, &cfg, &budgets).unwrap();
        if kind >= 2 {
            let i_star = rng.random_range(0..l);
            heads = two_point(&heads, &sel, &mut rng, i_star);
        }
        let audits = audit(&heads, &sel).unwrap();
        for a in &audits {
            for (n, r) in TRUE.iter().enumerate() {
                assert!(r.holds_at(a, cfg.tau), "{r:?} fails at {a:?}");
                let (lhs, rhs, tol) = r.sides(a, cfg.tau);
                if rhs > tol {
                    worst[n] = worst[n].max(lhs / rhs);
                }
            }
            assert!(Reading::Identity.holds_at(a, cfg.tau), "{a:?}");
            identity_worst =
                identity_worst.max(a.identity_residual.unwrap() / a.vmax_abs.max(1e-300));
        }
        checked += audits.len();
    }
    println!("{checked} (query head, query) checks in {cases} layers");
    for (r, w) in TRUE.iter().zip(worst) {
        println!("  {:<14} holds everywhere, largest lhs/rhs {w:.6}", r.key());
        assert!(
            w > 0.5,
            "{r:?}: largest ratio {w} <= 0.5: the check has no power"
        );
        assert!(w <= 1.0 + 1e-9, "{r:?}: ratio {w}");
    }
    println!("  identity       holds everywhere, largest residual / max|V| {identity_worst:.3e}");
}

/// The norms of V range over the keys the query sees (j <= i). A tight query in the
/// middle of a sequence whose later values are 10 times larger: its ratios exceed 0.5,
/// so a checker that took max|V|, max ||v_j||_1 or the diameter over all L rows (a
/// 10 times larger right-hand side) would be caught.
#[test]
fn prefix_norms_are_tight_mid_sequence() {
    let mut rng = StdRng::seed_from_u64(7);
    let (l, d, i_star) = (40, 6, 19);
    let zeros = Array3::<f64>::zeros((2, l, d));
    let heads = Heads::new(
        zeros.clone(),
        zeros.slice(s![..1, .., ..]).to_owned(),
        normal(&mut rng, (1, l, d), 1.0),
    )
    .unwrap();
    let cfg = Config {
        block_size: 4,
        window: 2,
        ..Config::default()
    };
    let budgets = vec![Budget::point(1, 4).unwrap()];
    let sel = select(&heads, &cfg, &budgets).unwrap();
    let tight = two_point(&heads, &sel, &mut rng, i_star);
    let (q, k, v) = tight.tensors();
    let mut v = v.clone();
    v.slice_mut(s![.., i_star + 1.., ..])
        .mapv_inplace(|x| 10.0 * x);
    let heads = Heads::new(q.clone(), k.clone(), v).unwrap();
    let audits = audit(&heads, &sel).unwrap();
    for h in 0..2 {
        let a = &audits[h * l + i_star];
        assert!(a.gamma > 0.0);
        for r in TRUE {
            let (lhs, rhs, _) = r.sides(a, cfg.tau);
            assert!(
                lhs / rhs > 0.5 && r.holds_at(a, cfg.tau),
                "{r:?}: {lhs} vs {rhs}"
            );
        }
    }
}

/// A layer with one query whose omitted mass is ~1e-3: keys all 0 but one, whose logit
/// gives it weight 1e-3, and one outlier value at a key of negligible weight (max|V| =
/// 100 while the attended values are +-1). Returns the heads and key sets that omit
/// exactly that key at the last query.
fn small_gamma_layer() -> (Heads, Explicit) {
    let (l, d) = (256usize, 16usize);
    let mut rng = StdRng::seed_from_u64(11);
    let mut q = Array3::<f64>::zeros((1, l, d));
    let mut k = Array3::<f64>::zeros((1, l, d));
    let mut v =
        Array3::from_shape_simple_fn((1, l, d), || if rng.random_bool(0.5) { 1.0 } else { -1.0 });
    let (j0, j1) = (40, 90);
    // a_{j0} = s / sqrt(16) with exp(s / 4) / (exp(s / 4) + 255) = 1e-3.
    let s0 = 4.0 * (255.0 * 1e-3 / (1.0 - 1e-3f64)).ln();
    q[[0, l - 1, 0]] = s0;
    q[[0, l - 1, 1]] = -80.0;
    k[[0, j0, 0]] = 1.0;
    k[[0, j1, 1]] = 1.0;
    v[[0, j1, 3]] = 100.0;
    let heads = Heads::new(q, k, v).unwrap();
    (heads, Explicit { l, omit: j0 })
}

/// S_i = [0, i] except key `omit` at the last query.
struct Explicit {
    l: usize,
    omit: usize,
}

impl KeySets for Explicit {
    fn shape(&self) -> (usize, usize) {
        (1, self.l)
    }
    fn keys(&self, _h: usize, i: usize) -> Vec<usize> {
        (0..=i)
            .filter(|&j| i + 1 < self.l || j != self.omit)
            .collect()
    }
}

fn to_bf16(x: f64) -> f64 {
    half::bf16::from_f64(x).to_f64()
}

/// An error of twice the bound, planted at a query with gamma ~ 1e-3 into a bf16
/// sparse output, is caught by the GPU's verdict path (the oracle audit with the derived
/// bf16 allowance): the allowance scales with the attended values, not with max|V|.
/// Without the plant the same rounded output passes.
#[test]
fn an_error_of_twice_the_bound_is_caught_at_small_gamma() {
    let (heads, keys) = small_gamma_layer();
    let l = heads.len();
    let exact = sparse_attention(&heads, &keys).unwrap();
    let mut rounded = exact.clone();
    rounded.o.mapv_inplace(to_bf16);
    let row = [(0usize, l - 1)];
    let clean = audit_rows(&heads, &keys, &rounded, Precision::Bf16, &row).unwrap();
    let a = &clean[0];
    assert!((a.gamma - 1e-3).abs() < 1e-5, "gamma = {}", a.gamma);
    for r in TRUE {
        assert!(r.holds_at(a, 0.9), "{r:?} on the rounded output: {a:?}");
        assert!(
            r.has_power(a, 0.9),
            "{r:?} has no power at gamma 1e-3: {a:?}"
        );
    }
    for r in TRUE {
        let (_, rhs, _) = r.sides(a, 0.9);
        let mut planted = rounded.clone();
        // Twice the bound in one coordinate: ||e||_p >= 2 rhs - ||e_true||_p.
        planted.o[[0, l - 1, 5]] -= 2.0 * rhs;
        let got = audit_rows(&heads, &keys, &planted, Precision::Bf16, &row).unwrap();
        assert!(
            !r.holds_at(&got[0], 0.9),
            "{r:?}: planted error not caught: {:?}",
            got[0]
        );
        assert!(!Reading::Identity.holds_at(&got[0], 0.9));
    }
}

/// A row left at the poison value (NaN) or a NaN log-sum-exp fails every reading on
/// both audit paths, is counted, and is the witness; before, max-folds skipped NaN and
/// such rows read as `holds`.
#[test]
fn non_finite_outputs_fail_every_reading() {
    let (heads, keys) = small_gamma_layer();
    let l = heads.len();
    let full = tca::reference::exact::attention(&heads);
    let mut sparse = sparse_attention(&heads, &keys).unwrap();
    sparse.o.slice_mut(s![0, 10, ..]).fill(f64::NAN);
    sparse.lse[[0, 20]] = f64::NAN;
    let kept = |h: usize, i: usize| keys.keys(h, i).len();
    for precision in [Precision::F64, Precision::Bf16] {
        let got = audit_outputs(&heads, &full, &sparse, &kept, precision).unwrap();
        let sm = summarize(&got, 0.9);
        assert_eq!(sm.non_finite_queries, 2);
        for (key, r) in &sm.readings {
            if *key == "identity" {
                continue;
            }
            assert!(!r.holds, "{key} holds with NaN outputs");
            assert_eq!(r.non_finite, 2, "{key}");
            assert_eq!(r.witness.as_ref().unwrap().query, 10, "{key}");
        }
        assert!(tca::cli::report::non_finite_error("test", &got).is_some());
    }
    let rows = all_rows(1, l);
    let got = audit_rows(&heads, &keys, &sparse, Precision::F64, &rows).unwrap();
    let sm = summarize(&got, 0.9);
    assert_eq!(sm.non_finite_queries, 1);
    for r in sm.readings.values() {
        assert!(!r.holds);
    }
}
