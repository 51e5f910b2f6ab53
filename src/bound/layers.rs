//! The per-layer audit table of a model forward (`tca quality-heads`): one row per
//! (layer, query head) from the audits of that head's queries, and the eviction regret
//! of decoding over the compacted cache per (layer, KV head).

use super::readings::{summarize, Reading, Summary};
use super::QueryAudit;
use serde::Serialize;

/// The readings listed in the table, each with violations / measured / with power.
pub const TABLE_READINGS: [Reading; 4] = [
    Reading::LinfEntrymax,
    Reading::L1Induced,
    Reading::L2Diameter,
    Reading::L1Entrymax,
];

/// One (layer, query head) of a forward: the self-audit of every query (the device's
/// dense output and log-sum-exp against its sparse ones) and the oracle's audit of a
/// sample of queries (exact f64 rows of the same bf16 inputs).
#[derive(Clone, Debug, Serialize)]
pub struct HeadAuditRow {
    pub layer: usize,
    pub q_head: usize,
    pub kv_head: usize,
    pub queries: usize,
    pub mean_gamma: f64,
    pub max_gamma: f64,
    /// Share of queries with gamma_i > 1 - tau.
    pub frac_gamma_above: f64,
    /// Mean |S_i| / (i + 1).
    pub keep_fraction: f64,
    /// Per reading of [`TABLE_READINGS`]: (violations, measured, with power), self-audit.
    pub readings: Vec<(&'static str, usize, usize, usize)>,
    pub non_finite: usize,
    /// The oracle's sample: rows, and violations of the identity and the three true
    /// readings (linf_entrymax, l1_induced, l2_diameter) summed.
    pub oracle_rows: usize,
    pub oracle_true_violations: usize,
    /// max gamma_i over the oracle's rows minus the same rows' gamma from the
    /// log-sum-exps (how far the device's gamma is from the oracle's).
    pub oracle_max_gamma_diff: f64,
}

/// Rows of one layer, one per query head. `self_audits` holds every query of every
/// head (any order), `oracle` a sample; `kv_of(h)` gives the KV head of query head h.
pub fn head_rows(
    layer: usize,
    hq: usize,
    kv_of: impl Fn(usize) -> usize,
    self_audits: &[QueryAudit],
    oracle: &[QueryAudit],
    tau: f64,
) -> Vec<HeadAuditRow> {
    let by_head = |audits: &[QueryAudit]| {
        let mut out: Vec<Vec<QueryAudit>> = vec![Vec::new(); hq];
        for a in audits.iter().filter(|a| a.head < hq) {
            out[a.head].push(a.clone());
        }
        out
    };
    by_head(self_audits)
        .into_iter()
        .zip(by_head(oracle))
        .enumerate()
        .map(|(h, (mine, orc))| {
            let s: Summary = summarize(&mine, tau);
            let o: Summary = summarize(&orc, tau);
            let keep = mine
                .iter()
                .map(|a| a.kept as f64 / (a.query + 1) as f64)
                .sum::<f64>()
                / mine.len().max(1) as f64;
            let oracle_true_violations = [
                Reading::Identity,
                Reading::LinfEntrymax,
                Reading::L1Induced,
                Reading::L2Diameter,
            ]
            .iter()
            .map(|r| o.readings.get(r.key()).map_or(0, |x| x.violations))
            .sum();
            let by_query: std::collections::HashMap<usize, f64> =
                mine.iter().map(|a| (a.query, a.gamma)).collect();
            let oracle_max_gamma_diff = orc
                .iter()
                .filter_map(|a| by_query.get(&a.query).map(|g| (a.gamma - g).abs()))
                .fold(0.0, f64::max);
            HeadAuditRow {
                layer,
                q_head: h,
                kv_head: kv_of(h),
                queries: mine.len(),
                mean_gamma: s.mean_gamma,
                max_gamma: s.max_gamma,
                frac_gamma_above: s.frac_gamma_above_1_minus_tau,
                keep_fraction: keep,
                readings: TABLE_READINGS
                    .iter()
                    .map(|r| {
                        let x = &s.readings[r.key()];
                        (r.key(), x.violations, x.measured, x.with_power)
                    })
                    .collect(),
                non_finite: s.non_finite_queries,
                oracle_rows: orc.len(),
                oracle_true_violations,
                oracle_max_gamma_diff,
            }
        })
        .collect()
}

/// Eviction regret of one decode step at one layer: per query head, the mass the new
/// query puts on keys the compacted cache no longer holds, 1 - exp(lse_c - lse_f) from
/// the log-sum-exps over the compacted cache (c) and the full shadow cache (f),
/// clamped at 0 (the cache is a subset, so the exact value is in [0, 1]).
pub fn regret(lse_compact: &[f32], lse_full: &[f32]) -> Vec<f64> {
    lse_compact
        .iter()
        .zip(lse_full)
        .map(|(&c, &f)| {
            let r = 1.0 - (c as f64 - f as f64).exp();
            if r.is_nan() {
                f64::NAN
            } else {
                r.max(0.0)
            }
        })
        .collect()
}

/// Mean and max regret per KV head over steps: `per_step[s][h]` for query head h.
pub fn regret_by_kv(per_step: &[Vec<f64>], group: usize, hkv: usize) -> Vec<(f64, f64)> {
    (0..hkv)
        .map(|kv| {
            let v: Vec<f64> = per_step
                .iter()
                .flat_map(|r| r[kv * group..(kv + 1) * group].iter().copied())
                .collect();
            let n = v.len().max(1) as f64;
            let max = v.iter().copied().fold(0.0f64, |m, x| {
                if x.is_nan() || m.is_nan() {
                    f64::NAN
                } else {
                    m.max(x)
                }
            });
            (v.iter().sum::<f64>() / n, max)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bound::{audit, audit_outputs, Precision};
    use crate::selection::{select, Budget};
    use crate::{Config, Heads};
    use ndarray::Array3;
    use rand::{RngExt, SeedableRng};

    fn layer() -> (Heads, Config) {
        let mut r = rand::rngs::StdRng::seed_from_u64(3);
        let mut g = |h, l, d| Array3::from_shape_fn((h, l, d), |_| r.random_range(-1.0..1.0));
        let heads = Heads::new(g(4, 96, 8), g(2, 96, 8), g(2, 96, 8)).unwrap();
        let cfg = Config {
            block_size: 16,
            window: 16,
            tau: 0.9,
            ..Config::default()
        };
        (heads, cfg)
    }

    #[test]
    fn head_rows_summarise_each_query_head() {
        let (heads, cfg) = layer();
        let budgets = vec![Budget::point(3, 16).unwrap(); 2];
        let sel = select(&heads, &cfg, &budgets).unwrap();
        let oracle = audit(&heads, &sel).unwrap();
        // Outputs of the oracle itself stand in for the device's.
        let full = crate::reference::attention(&heads);
        let sparse = crate::selection::sparse_attention(&heads, &sel).unwrap();
        let kept = |h: usize, i: usize| sel.kept(h / sel.group, i);
        let me = audit_outputs(&heads, &full, &sparse, &kept, Precision::F64).unwrap();
        let rows = head_rows(5, 4, |h| heads.kv_of(h), &me, &oracle[..40], cfg.tau);
        assert_eq!(rows.len(), 4);
        for r in &rows {
            assert_eq!((r.layer, r.queries), (5, 96));
            assert_eq!(r.kv_head, r.q_head / 2);
            let mine: Vec<_> = oracle.iter().filter(|a| a.head == r.q_head).collect();
            let mean = mine.iter().map(|a| a.gamma).sum::<f64>() / 96.0;
            assert!(
                (r.mean_gamma - mean).abs() < 1e-9,
                "{} vs {mean}",
                r.mean_gamma
            );
            let above = mine.iter().filter(|a| a.gamma > 0.1).count() as f64 / 96.0;
            assert!((r.frac_gamma_above - above).abs() < 1e-12);
            assert!(r.keep_fraction > 0.0 && r.keep_fraction <= 1.0);
            // The true readings hold on f64 outputs, and each was measured at every query.
            for &(k, viol, measured, _) in &r.readings[..3] {
                assert_eq!((viol, measured), (0, 96), "{k}");
            }
            assert_eq!(r.oracle_true_violations, 0);
            assert!(r.oracle_max_gamma_diff < 1e-9);
        }
        // Only head 0 is in the first 40 oracle rows.
        assert_eq!(rows[0].oracle_rows, 40);
        assert_eq!(rows[1].oracle_rows, 0);
    }

    #[test]
    fn a_planted_error_and_a_nan_show_in_their_head_rows() {
        use crate::bound::audit_rows;
        let (heads, cfg) = layer();
        let budgets = vec![Budget::point(3, 16).unwrap(); 2];
        let sel = select(&heads, &cfg, &budgets).unwrap();
        let full = crate::reference::attention(&heads);
        let mut sparse = crate::selection::sparse_attention(&heads, &sel).unwrap();
        // Head 1's sparse output off by 0.5 everywhere past the first 8 queries; one NaN
        // output of head 3.
        sparse
            .o
            .slice_mut(ndarray::s![1, 8.., ..])
            .mapv_inplace(|x| x + 0.5);
        sparse.o[[3, 40, 0]] = f64::NAN;
        let kept = |h: usize, i: usize| sel.kept(h / sel.group, i);
        let me = audit_outputs(&heads, &full, &sparse, &kept, Precision::F64).unwrap();
        let rows: Vec<(usize, usize)> = (0..4).flat_map(|h| (0..96).map(move |i| (h, i))).collect();
        let orc = audit_rows(&heads, &sel, &sparse, Precision::F64, &rows).unwrap();
        let r = head_rows(0, 4, |h| heads.kv_of(h), &me, &orc, cfg.tau);
        let true_viol = |x: &HeadAuditRow| x.readings[..3].iter().map(|y| y.1).sum::<usize>();
        assert_eq!((true_viol(&r[0]), r[0].oracle_true_violations), (0, 0));
        assert!(
            true_viol(&r[1]) > 0 && r[1].oracle_true_violations > 0,
            "{:?}",
            r[1]
        );
        assert_eq!((r[3].non_finite, true_viol(&r[3]) >= 3), (1, true));
        assert!(r[3].oracle_true_violations >= 4, "{:?}", r[3]);
    }

    #[test]
    fn regret_is_the_mass_outside_the_cache() {
        // Full cache: logits 0, 0, ln 2 (lse = ln 4); compacted: the last key (lse ln 2).
        let r = regret(&[2f32.ln()], &[4f32.ln()]);
        assert!((r[0] - 0.5).abs() < 1e-6);
        // Rounding cannot make it negative; NaN stays NaN.
        assert_eq!(regret(&[1.0], &[0.999_999])[0], 0.0);
        assert!(regret(&[f32::NAN], &[0.0])[0].is_nan());
        let by = regret_by_kv(&[vec![0.1, 0.3, 0.0, 0.0], vec![0.2, 0.2, 0.5, 0.0]], 2, 2);
        assert!((by[0].0 - 0.2).abs() < 1e-12 && (by[0].1 - 0.3).abs() < 1e-12);
        assert!((by[1].0 - 0.125).abs() < 1e-12 && (by[1].1 - 0.5).abs() < 1e-12);
    }
}
