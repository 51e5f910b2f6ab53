//! Per-block token budgets (docs/algorithm.md §§1.5, 2): a configuration p is a probability
//! distribution over budgets k in {1..b}; the candidates are discretised log-normals.

use crate::config::Config;
use crate::error::{Result, TcaError};
use num_bigint::BigUint;
use serde::{Deserialize, Serialize};

/// A probability distribution p over per-block budgets k = 1..b (`p[k - 1]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    p: Vec<f64>,
}

impl Budget {
    /// Normalises non-negative finite weights over k = 1..weights.len().
    pub fn new(weights: Vec<f64>) -> Result<Self> {
        if weights.is_empty() {
            return Err(TcaError::Invalid(
                "a budget distribution needs b >= 1 entries".into(),
            ));
        }
        if let Some(w) = weights.iter().find(|w| !w.is_finite() || **w < 0.0) {
            return Err(TcaError::Invalid(format!(
                "budget weight {w} is negative or not finite"
            )));
        }
        let sum: f64 = weights.iter().sum();
        if sum <= 0.0 {
            return Err(TcaError::Invalid("budget weights sum to zero".into()));
        }
        Ok(Budget {
            p: weights.into_iter().map(|w| w / sum).collect(),
        })
    }

    /// p(k) proportional to exp(-(ln k - mu)^2 / (2 sigma^2)), k = 1..b. The exponents
    /// are shifted by their largest value before exponentiating (normalised in log
    /// space), so the weights never all underflow: for a tiny sigma the mass lands on
    /// the k nearest exp(mu) in log scale, as the distribution intends.
    pub fn lognormal(mu: f64, sigma: f64, b: usize) -> Result<Self> {
        if !(sigma.is_finite() && sigma > 0.0 && mu.is_finite()) {
            return Err(TcaError::Invalid(format!(
                "log-normal budget needs finite mu and sigma > 0 (mu = {mu}, sigma = {sigma})"
            )));
        }
        let log_w: Vec<f64> = (1..=b)
            .map(|k| {
                let z = (k as f64).ln() - mu;
                -z * z / (2.0 * sigma * sigma)
            })
            .collect();
        let top = log_w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Self::new(log_w.into_iter().map(|x| (x - top).exp()).collect())
    }

    /// All mass on budget k (1 <= k <= b): uniform per-block top-k.
    pub fn point(k: usize, b: usize) -> Result<Self> {
        if k == 0 || k > b {
            return Err(TcaError::Invalid(format!(
                "point budget k = {k} outside [1, {b}]"
            )));
        }
        let mut w = vec![0.0; b];
        w[k - 1] = 1.0;
        Self::new(w)
    }

    /// Every block keeps all its tokens: TCA then equals exact attention.
    pub fn full(b: usize) -> Result<Self> {
        Self::point(b, b)
    }

    /// The block size b this distribution is defined over.
    pub fn block_size(&self) -> usize {
        self.p.len()
    }

    /// The probabilities p(1..b).
    pub fn probs(&self) -> &[f64] {
        &self.p
    }

    /// E_p[k].
    pub fn expected(&self) -> f64 {
        self.p
            .iter()
            .enumerate()
            .map(|(i, p)| (i + 1) as f64 * p)
            .sum()
    }

    /// Budget of the block of rank r among nb (docs/algorithm.md §1.5):
    /// t_r = min{k : F_p(k) >= 1 - (r + 0.5) / nb}, before clipping to the block size.
    /// Decided in exact arithmetic (see [`Budget::block_budgets`]).
    pub fn block_budget(&self, rank: usize, nb: usize) -> usize {
        ExactCdf::new(&self.p).budget(rank, nb)
    }

    /// t_r for every rank r = 0..nb. The comparison F_p(k) >= 1 - (r + 0.5) / nb is
    /// made exactly, as 2 nb sum_{i <= k} p_i >= (2 nb - 2 r - 1) sum_i p_i over the
    /// f64 values p_i read as exact binary fractions (big integers), so an exact
    /// boundary is never missed by rounding: uniform p over b = 10 with nb = 5 gives
    /// [9, 7, 5, 3, 1].
    pub fn block_budgets(&self, nb: usize) -> Vec<usize> {
        let cdf = ExactCdf::new(&self.p);
        (0..nb).map(|r| cdf.budget(r, nb)).collect()
    }

    /// The decode-time budget of a new block (docs/algorithm.md §3): floor(E_p[k]), at least 1.
    pub fn decode_budget(&self) -> usize {
        (self.expected().floor() as usize).clamp(1, self.p.len())
    }
}

/// The running sums A_k = sum_{i <= k} p_i of non-negative finite f64 values as exact
/// integers in units of 2^e_min (the smallest binary exponent among them).
struct ExactCdf {
    prefix: Vec<BigUint>,
}

impl ExactCdf {
    fn new(p: &[f64]) -> Self {
        // x = m 2^e with integer m (53 bits at most).
        let parts: Vec<(u64, i64)> = p
            .iter()
            .map(|&x| {
                let bits = x.to_bits();
                let exp = ((bits >> 52) & 0x7ff) as i64;
                let frac = bits & ((1u64 << 52) - 1);
                if exp == 0 {
                    (frac, -1074)
                } else {
                    (frac | (1u64 << 52), exp - 1075)
                }
            })
            .collect();
        let e_min = parts
            .iter()
            .filter(|(m, _)| *m != 0)
            .map(|(_, e)| *e)
            .min()
            .unwrap_or(0);
        let mut acc = BigUint::ZERO;
        let prefix = parts
            .iter()
            .map(|&(m, e)| {
                if m != 0 {
                    acc += BigUint::from(m) << ((e - e_min) as u64);
                }
                acc.clone()
            })
            .collect();
        ExactCdf { prefix }
    }

    /// min{k : 2 nb A_k >= (2 nb - 2 r - 1) A_b}.
    fn budget(&self, rank: usize, nb: usize) -> usize {
        let b = self.prefix.len();
        let total = &self.prefix[b - 1];
        let lhs_factor = BigUint::from(2 * nb as u64);
        let target = total * BigUint::from((2 * nb).saturating_sub(2 * rank + 1) as u64);
        // A_k is non-decreasing: the first k that reaches the target.
        let k = self.prefix.partition_point(|a| a * &lhs_factor < target);
        (k + 1).min(b)
    }
}

/// One candidate configuration p_m of the calibration.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// 1-based index m after ordering by expected budget.
    pub m: usize,
    pub mu: f64,
    pub sigma: f64,
    pub budget: Budget,
}

/// The M candidates of docs/algorithm.md §2: mu_m = ln(b) (m - 1) / (M - 1) (mu = ln b / 2 when
/// M = 1), shared sigma, ordered by E_p[k] ascending.
pub fn candidates(cfg: &Config) -> Result<Vec<Candidate>> {
    cfg.validate()?;
    let b = cfg.block_size;
    let m_total = cfg.candidates;
    let mut out = (0..m_total)
        .map(|m| {
            let mu = if m_total == 1 {
                (b as f64).ln() / 2.0
            } else {
                (b as f64).ln() * m as f64 / (m_total - 1) as f64
            };
            Ok(Candidate {
                m: 0,
                mu,
                sigma: cfg.sigma,
                budget: Budget::lognormal(mu, cfg.sigma, b)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    out.sort_by(|a, b| a.budget.expected().total_cmp(&b.budget.expected()));
    for (i, c) in out.iter_mut().enumerate() {
        c.m = i + 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_ranked_blocks_get_largest_budgets() {
        let p = Budget::lognormal(2.0, 1.0, 64).unwrap();
        let t: Vec<_> = (0..10).map(|r| p.block_budget(r, 10)).collect();
        assert!(t.windows(2).all(|w| w[0] >= w[1]), "{t:?}");
    }

    #[test]
    fn candidates_are_ordered_by_expected_budget() {
        let c = candidates(&Config::default()).unwrap();
        assert_eq!(c.len(), 14);
        assert!(c
            .windows(2)
            .all(|w| w[0].budget.expected() <= w[1].budget.expected()));
    }

    /// t_r = min{k : F(k) >= 1 - (r + 0.5)/nb}, worked by hand for uniform p over
    /// b = 10 and nb = 5: targets 0.9, 0.7, 0.5, 0.3, 0.1 are met exactly at
    /// F(k) = k/10, so t = [9, 7, 5, 3, 1] (f64 running sums give 10 for the first).
    #[test]
    fn exact_boundaries_of_the_budget_rule() {
        let p = Budget::new(vec![1.0; 10]).unwrap();
        assert_eq!(p.block_budgets(5), vec![9, 7, 5, 3, 1]);
        assert_eq!(
            (0..5).map(|r| p.block_budget(r, 5)).collect::<Vec<_>>(),
            vec![9, 7, 5, 3, 1]
        );
        // b = 4, nb = 2: targets 3/4 and 1/4 at F(k) = k/4: t = [3, 1].
        assert_eq!(
            Budget::new(vec![0.25; 4]).unwrap().block_budgets(2),
            vec![3, 1]
        );
        // p = (0.5, 0, 0.5) over b = 3, nb = 4: targets 7/8, 5/8, 3/8, 1/8 give
        // [3, 3, 1, 1]; a zero weight is never the first k to reach a target.
        assert_eq!(
            Budget::new(vec![0.5, 0.0, 0.5]).unwrap().block_budgets(4),
            vec![3, 3, 1, 1]
        );
        // nb = 1: target 1/2.
        assert_eq!(
            Budget::new(vec![1.0, 1.0]).unwrap().block_budgets(1),
            vec![1]
        );
        // Tiny and huge weights together (exponents far apart) stay exact.
        let q = Budget::new(vec![1e-300, 1.0, 1e-300]).unwrap();
        assert_eq!(q.block_budgets(2), vec![2, 2]);
    }

    /// With a tiny sigma every weight of a direct exp underflows; normalised in log
    /// space the mass goes to the k nearest exp(mu) (b = 128, M = 14, sigma = 0.001).
    #[test]
    fn small_sigma_lognormal_keeps_its_interior_budget() {
        let b = 128usize;
        for m in 0..14 {
            let mu = (b as f64).ln() * m as f64 / 13.0;
            let p = Budget::lognormal(mu, 0.001, b).unwrap();
            let nearest = (1..=b)
                .min_by(|&x, &y| {
                    ((x as f64).ln() - mu)
                        .abs()
                        .total_cmp(&((y as f64).ln() - mu).abs())
                })
                .unwrap();
            assert!(p.probs()[nearest - 1] > 1.0 - 1e-12, "m = {m}, mu = {mu}");
            assert!((p.expected() - nearest as f64).abs() < 1e-9, "m = {m}");
        }
        // e.g. exp(mu) = 2.11 for m = 2: k = 2, not the k = 1 the underflow gave.
        let p = Budget::lognormal((b as f64).ln() * 2.0 / 13.0, 0.001, b).unwrap();
        assert!((p.expected() - 2.0).abs() < 1e-12);
    }

    #[test]
    fn full_budget_keeps_everything() {
        let p = Budget::full(8).unwrap();
        assert!((0..5).all(|r| p.block_budget(r, 5) == 8));
    }
}
