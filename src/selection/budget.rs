//! Per-block token budgets (docs/algorithm.md §§1.5, 2): a configuration p is a probability
//! distribution over budgets k in {1..b}; the candidates are discretised log-normals.

use crate::config::Config;
use crate::error::{Result, TcaError};
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

    /// p(k) proportional to exp(-(ln k - mu)^2 / (2 sigma^2)), k = 1..b.
    pub fn lognormal(mu: f64, sigma: f64, b: usize) -> Result<Self> {
        if !(sigma.is_finite() && sigma > 0.0 && mu.is_finite()) {
            return Err(TcaError::Invalid(format!(
                "log-normal budget needs finite mu and sigma > 0 (mu = {mu}, sigma = {sigma})"
            )));
        }
        let w = (1..=b)
            .map(|k| {
                let z = (k as f64).ln() - mu;
                (-z * z / (2.0 * sigma * sigma)).exp()
            })
            .collect::<Vec<_>>();
        // Far in the tail every weight can underflow: put the mass at the nearest end.
        if w.iter().all(|x| *x == 0.0) {
            let k = if mu > (b as f64).ln() { b } else { 1 };
            return Self::point(k, b);
        }
        Self::new(w)
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
    pub fn block_budget(&self, rank: usize, nb: usize) -> usize {
        let target = 1.0 - (rank as f64 + 0.5) / nb as f64;
        let mut cdf = 0.0;
        for (i, p) in self.p.iter().enumerate() {
            cdf += p;
            if cdf >= target {
                return i + 1;
            }
        }
        self.p.len()
    }

    /// The decode-time budget of a new block (docs/algorithm.md §3): floor(E_p[k]), at least 1.
    pub fn decode_budget(&self) -> usize {
        (self.expected().floor() as usize).clamp(1, self.p.len())
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

    #[test]
    fn full_budget_keeps_everything() {
        let p = Budget::full(8).unwrap();
        assert!((0..5).all(|r| p.block_budget(r, 5) == 8));
    }
}
