//! The TCA configuration (docs/algorithm.md §7): a serde struct with the defaults,
//! read from TOML; an unknown key or a value outside its domain is an error.

use crate::error::{Result, TcaError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Calibration criterion (docs/algorithm.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Criterion {
    /// Normalised column score: a = sum_{k in S} c_k / sum_k c_k, c_k = mean_{i >= k} P_ik.
    Column,
    /// Retained softmax mass: a = 1 - mean_i gamma_i.
    Mass,
}

/// Normalisation of the block mass m_j in the redundancy score (docs/algorithm.md §1.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MassNorm {
    /// h_j = (1 - alpha) m_j + alpha c_j, as written.
    None,
    /// m_j divided by max_j m_j first.
    Max,
}

/// How the importance of a KV head pools its g query heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GqaReduce {
    Mean,
    Max,
}

/// All knobs of TCA-Attention. Field names are the TOML keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Calibration target, 0 < tau <= 1.
    pub tau: f64,
    /// Block size b >= 1.
    pub block_size: usize,
    /// Local window w >= 1.
    pub window: usize,
    /// Redundancy mix alpha in [0, 1].
    pub alpha: f64,
    /// Number M >= 1 of candidate budget distributions.
    pub candidates: usize,
    /// Log-normal spread sigma > 0 of the candidates.
    pub sigma: f64,
    pub criterion: Criterion,
    pub mass_norm: MassNorm,
    pub gqa_reduce: GqaReduce,
    /// m >= 1 last queries pooled for the importance.
    pub importance_queries: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tau: 0.9,
            block_size: 128,
            window: 4096,
            alpha: 0.5,
            candidates: 14,
            sigma: 1.0,
            criterion: Criterion::Column,
            mass_norm: MassNorm::None,
            gqa_reduce: GqaReduce::Mean,
            importance_queries: 1,
        }
    }
}

impl Config {
    /// Checks every field against its domain.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TcaError::Config(m));
        if !(self.tau.is_finite() && self.tau > 0.0 && self.tau <= 1.0) {
            return bad(format!("tau = {} must lie in (0, 1]", self.tau));
        }
        if self.block_size == 0 {
            return bad("block_size (b) must be at least 1".into());
        }
        if self.window == 0 {
            return bad("window (w) must be at least 1".into());
        }
        if !(self.alpha.is_finite() && (0.0..=1.0).contains(&self.alpha)) {
            return bad(format!("alpha = {} must lie in [0, 1]", self.alpha));
        }
        if self.candidates == 0 {
            return bad("candidates (M) must be at least 1".into());
        }
        if !(self.sigma.is_finite() && self.sigma > 0.0) {
            return bad(format!("sigma = {} must be finite and > 0", self.sigma));
        }
        if self.importance_queries == 0 {
            return bad("importance_queries must be at least 1".into());
        }
        Ok(())
    }

    /// Parses and validates a TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let cfg: Config = toml::from_str(text).map_err(|e| TcaError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TcaError::io(path, e))?;
        Self::from_toml_str(&text).map_err(|e| match e {
            TcaError::Config(m) => TcaError::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }
}
