//! The calibration profile: a versioned JSON file recording, per layer and KV head, the
//! chosen budget distribution, for the model shape it was made for.

use crate::config::Config;
use crate::data::Heads;
use crate::error::{Result, TcaError};
use crate::selection::Budget;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Format version written by this build; files of another version are refused.
pub const PROFILE_VERSION: u32 = 1;
const FORMAT: &str = "tca-calibration-profile";

/// The attention shape a profile belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl ModelShape {
    pub fn of(heads: &Heads) -> Self {
        ModelShape {
            num_q_heads: heads.num_q_heads(),
            num_kv_heads: heads.num_kv_heads(),
            head_dim: heads.dim(),
        }
    }
}

/// Calibration result of one KV head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadProfile {
    pub kv_head: usize,
    /// Chosen candidate m (1-based, candidates ordered by expected budget).
    pub m: usize,
    pub mu: f64,
    pub sigma: f64,
    /// E_p[k] of the chosen distribution.
    pub expected_budget: f64,
    /// Retained score a_m of the chosen candidate under the configured criterion.
    pub retained: f64,
    /// Whether a_m >= tau; false means the largest candidate was taken without reaching it.
    pub reached_tau: bool,
    /// |S_G| on the calibration sequence.
    pub global_tokens: usize,
    /// a_m of every candidate under the `column` criterion.
    pub retained_column: Vec<f64>,
    /// a_m of every candidate under the `mass` criterion.
    pub retained_mass: Vec<f64>,
}

/// Calibration of one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerProfile {
    pub layer: usize,
    pub heads: Vec<HeadProfile>,
    /// [`data_hash`] of the layer's calibration inputs, so an audit can say whether it
    /// runs on the data its budgets were calibrated on (in-sample). Absent in profiles
    /// of earlier builds and in those calibrated inside a model run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_hash: Option<String>,
}

/// A 64-bit FNV-1a hash of a layer's shape and the bits of every Q, K and V value, as
/// 16 hex digits.
pub fn data_hash(heads: &Heads) -> String {
    let (q, k, v) = heads.tensors();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for t in [q, k, v] {
        t.shape().iter().for_each(|&n| eat(n as u64));
        t.iter().for_each(|x| eat(x.to_bits()));
    }
    format!("{h:016x}")
}

/// A calibration profile file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub format: String,
    pub version: u32,
    pub model: ModelShape,
    /// The configuration used to calibrate (tau, b, w, criterion, ...).
    pub config: Config,
    /// Length L of the calibration sequence.
    pub calibration_len: usize,
    pub layers: Vec<LayerProfile>,
}

impl Profile {
    pub fn new(
        model: ModelShape,
        config: Config,
        calibration_len: usize,
        layers: Vec<LayerProfile>,
    ) -> Self {
        Profile {
            format: FORMAT.into(),
            version: PROFILE_VERSION,
            model,
            config,
            calibration_len,
            layers,
        }
    }

    /// Checks that this profile can drive selection on `heads` under `cfg`: same model
    /// shape, a layer `layer`, and the same configuration as the calibration (tau, b,
    /// w, alpha, M, sigma, criterion, mass_norm, gqa_reduce, importance_queries: the
    /// budgets were chosen under all of them).
    pub fn check_fits(&self, heads: &Heads, cfg: &Config, layer: usize) -> Result<()> {
        self.check_shape(heads, layer)?;
        match self.config_mismatch(cfg) {
            Some(m) => Err(TcaError::ProfileMismatch(format!(
                "calibrated with {m}; pass --allow-profile-mismatch to use it anyway \
                 (recorded in the summary)"
            ))),
            None => Ok(()),
        }
    }

    /// The model shape and layer checks of [`Profile::check_fits`] alone (b must match
    /// too: budgets are distributions over 1..b).
    pub fn check_shape(&self, heads: &Heads, layer: usize) -> Result<()> {
        let shape = ModelShape::of(heads);
        if shape != self.model {
            return Err(TcaError::ProfileMismatch(format!(
                "made for {} query heads, {} KV heads, head dim {}; the input has {}, {}, {}",
                self.model.num_q_heads,
                self.model.num_kv_heads,
                self.model.head_dim,
                shape.num_q_heads,
                shape.num_kv_heads,
                shape.head_dim
            )));
        }
        self.layer(layer).map(|_| ())
    }

    /// The configuration keys whose calibration value differs from `cfg`'s, as
    /// "key = profile value but the configuration has value, ..."; `None` if all agree.
    pub fn config_mismatch(&self, cfg: &Config) -> Option<String> {
        let (p, c) = (&self.config, cfg);
        let mut diffs = Vec::new();
        let mut cmp = |key: &str, a: String, b: String| {
            if a != b {
                diffs.push(format!("{key} = {a} but the configuration has {b}"));
            }
        };
        cmp("tau", p.tau.to_string(), c.tau.to_string());
        cmp(
            "block_size",
            p.block_size.to_string(),
            c.block_size.to_string(),
        );
        cmp("window", p.window.to_string(), c.window.to_string());
        cmp("alpha", p.alpha.to_string(), c.alpha.to_string());
        cmp(
            "candidates",
            p.candidates.to_string(),
            c.candidates.to_string(),
        );
        cmp("sigma", p.sigma.to_string(), c.sigma.to_string());
        cmp(
            "criterion",
            format!("{:?}", p.criterion),
            format!("{:?}", c.criterion),
        );
        cmp(
            "mass_norm",
            format!("{:?}", p.mass_norm),
            format!("{:?}", c.mass_norm),
        );
        cmp(
            "gqa_reduce",
            format!("{:?}", p.gqa_reduce),
            format!("{:?}", c.gqa_reduce),
        );
        cmp(
            "importance_queries",
            p.importance_queries.to_string(),
            c.importance_queries.to_string(),
        );
        (!diffs.is_empty()).then(|| diffs.join(", "))
    }

    /// Whether layer `layer` was calibrated on exactly `heads` (`None`: not recorded).
    pub fn in_sample(&self, heads: &Heads, layer: usize) -> Option<bool> {
        let l = self.layer(layer).ok()?;
        l.data_hash.as_ref().map(|h| *h == data_hash(heads))
    }

    /// The profile of layer `layer`.
    pub fn layer(&self, layer: usize) -> Result<&LayerProfile> {
        self.layers
            .iter()
            .find(|l| l.layer == layer)
            .ok_or_else(|| {
                TcaError::ProfileMismatch(format!(
                    "no layer {layer} in the profile (it has {:?})",
                    self.layers.iter().map(|l| l.layer).collect::<Vec<_>>()
                ))
            })
    }

    /// The chosen budget distribution of every KV head of `layer`.
    pub fn budgets(&self, layer: usize) -> Result<Vec<Budget>> {
        let b = self.config.block_size;
        self.layer(layer)?
            .heads
            .iter()
            .map(|h| Budget::lognormal(h.mu, h.sigma, b))
            .collect()
    }

    /// Writes the profile as pretty JSON; refuses to replace an existing file unless
    /// `force`.
    pub fn save(&self, path: &Path, force: bool) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| TcaError::Format {
            path: path.into(),
            msg: e.to_string(),
        })?;
        crate::data::write_new(path, text.as_bytes(), force)
    }

    /// Reads and checks a profile file (format name, version, consistency).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TcaError::io(path, e))?;
        let fmt = |msg: String| TcaError::Format {
            path: path.into(),
            msg,
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| fmt(format!("not JSON: {e}")))?;
        match (value.get("format"), value.get("version")) {
            (Some(f), Some(v)) if f == FORMAT => {
                if v.as_u64() != Some(PROFILE_VERSION as u64) {
                    return Err(fmt(format!(
                        "profile version {v} is not supported (this build reads {PROFILE_VERSION})"
                    )));
                }
            }
            _ => return Err(fmt(format!("not a {FORMAT} file"))),
        }
        let p: Profile = serde_json::from_value(value).map_err(|e| fmt(e.to_string()))?;
        p.config.validate()?;
        for l in &p.layers {
            if l.heads.len() != p.model.num_kv_heads {
                return Err(fmt(format!(
                    "layer {} has {} heads but the model has {} KV heads",
                    l.layer,
                    l.heads.len(),
                    p.model.num_kv_heads
                )));
            }
        }
        Ok(p)
    }
}
