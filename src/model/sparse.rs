//! TCA and its peer policies inside the model's forward pass.
//!
//! Nothing here re-implements selection: each layer's f32 Q/K/V become the f64
//! [`Heads`] of the reference code, [`crate::selection::select`] runs docs/algorithm.md §1
//! with the layer's calibrated budgets (a multi-layer [`Profile`]), the peer policies of
//! docs/algorithm.md §5 are built from that selection exactly as
//! [`crate::selection::policies::key_sets`] builds them, and the f32
//! [`attend_key_sets`] (tested against the f64 [`crate::selection::sparse_attention`])
//! computes the output on the layer's own f32 Q/K/V.
//!
//! - [`SparsePolicy`]: an [`AttentionPolicy`] for prefill (TCA or a peer at TCA's
//!   budget), recording per layer the keep fraction it used;
//! - [`CalibrationHook`]: calibrates every layer (docs/algorithm.md §2) during one exact
//!   forward pass over a calibration text, for one or more tau;
//! - [`TcaDecode`]: the compacted decoding cache of docs/algorithm.md §3 per layer and KV
//!   head ([`crate::decode::KvCache`]), filled by a TCA prefill;
//! - [`generate_tca`]: greedy generation with a TCA prefill and the TCA cache.

use std::sync::Mutex;

use ndarray::{s, Array1, ArrayView1, ArrayView3};
use rayon::prelude::*;

use super::attention::{attend_key_sets, to_heads, AttentionPolicy, Exact};
use super::llama::{argmax, DecodeAttention, Llama, QkvHook};
use crate::calibration::{calibrate_layer, LayerProfile, ModelShape, Profile};
use crate::certificate::{BoundKind, CertifiedTau, Certifier};
use crate::config::Config;
use crate::data::Heads;
use crate::decode::KvCache as HeadCache;
use crate::error::{Result, TcaError};
use crate::selection::importance::pool;
use crate::selection::policies::{
    block_topk, cumulative_threshold, OracleTopK, Policy, StreamingLlm,
};
use crate::selection::{select, KeySets, Selection};

/// Sink tokens of the StreamingLLM peer (its paper's default).
pub const DEFAULT_SINKS: usize = 4;

/// What one layer's sparse prefill kept.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerUse {
    pub layer: usize,
    /// Mean over (query head, query) of |S_i| / (i + 1).
    pub keep_fraction: f64,
    /// |S_G| per KV head (the peer's own global set for block top-k and the
    /// cumulative threshold; TCA's for the others, whose budget is TCA's per query, and
    /// for certified-tau mode, which widens TCA's sets per query).
    pub global_tokens: Vec<usize>,
}

/// Prefill attention by TCA (with a calibrated profile) or one of its peers at TCA's
/// per-query budget.
pub struct SparsePolicy {
    pub policy: Policy,
    pub config: Config,
    pub profile: Profile,
    pub sinks: usize,
    /// Build the decoding cache of each layer during prefill (TCA only).
    keep_cache: bool,
    usage: Mutex<Vec<LayerUse>>,
    caches: Mutex<Vec<(usize, Vec<HeadCache>)>>,
}

impl SparsePolicy {
    /// `profile` must have been calibrated with `config`'s block size; its model shape
    /// is checked against each layer's input.
    pub fn new(policy: Policy, config: Config, profile: Profile) -> Result<Self> {
        config.validate()?;
        if profile.config.block_size != config.block_size {
            return Err(TcaError::ProfileMismatch(format!(
                "calibrated with block_size = {} but the configuration has {}",
                profile.config.block_size, config.block_size
            )));
        }
        Ok(SparsePolicy {
            policy,
            config,
            profile,
            sinks: DEFAULT_SINKS,
            keep_cache: false,
            usage: Mutex::new(Vec::new()),
            caches: Mutex::new(Vec::new()),
        })
    }

    /// What each layer kept in the prefills so far (in call order), and clears it.
    pub fn take_usage(&self) -> Vec<LayerUse> {
        std::mem::take(&mut self.usage.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Mean keep fraction over the layers recorded so far (does not clear them).
    pub fn mean_keep_fraction(&self) -> f64 {
        let u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        u.iter().map(|x| x.keep_fraction).sum::<f64>() / u.len().max(1) as f64
    }

    /// The layer's output from its f32 `qkv` (the same values as `heads`).
    fn layer_output(
        &self,
        layer: usize,
        heads: &Heads,
        qkv: (ArrayView3<f32>, ArrayView3<f32>, ArrayView3<f32>),
    ) -> Result<(ndarray::Array3<f32>, LayerUse, Selection)> {
        self.profile.check_fits(heads, &self.config, layer)?;
        let budgets = self.profile.budgets(layer)?;
        let tca = select(heads, &self.config, &budgets)?;
        // Key sets as `selection::policies::key_sets` builds them; the two peers with a
        // budget of their own keep their selection for the keep fraction.
        let own: Option<Selection> = match self.policy {
            Policy::BlockTopK => Some(block_topk(heads, &self.config, &tca)?),
            Policy::CumulativeThreshold => Some(cumulative_threshold(&tca, self.config.tau)),
            _ => None,
        };
        // Certified-tau mode widens TCA's key sets per query head (crate::certificate).
        let certifier = (self.policy == Policy::Tca && self.config.certified_tau)
            .then(|| {
                Certifier::for_key_sets(heads, BoundKind::Min, self.config.certificate_block, &tca)
            })
            .transpose()?;
        let certified = certifier
            .as_ref()
            .map(|c| CertifiedTau::new(c, &tca, self.config.tau))
            .transpose()?;
        let keys: Box<dyn KeySets + '_> = match (self.policy, &own, certified) {
            (_, Some(sel), _) => Box::new(sel.clone()),
            (Policy::OracleTopK, None, _) => Box::new(OracleTopK { heads, tca: &tca }),
            (Policy::StreamingLlm, None, _) => Box::new(StreamingLlm {
                tca: &tca,
                sinks: self.sinks,
            }),
            (_, _, Some(c)) => Box::new(c),
            _ => Box::new(tca.clone()),
        };
        let (q, k, v) = qkv;
        let o = attend_key_sets(q, k, v, keys.as_ref(), Exact::default().block)?;
        let counted = own.as_ref().unwrap_or(&tca);
        let l = heads.len();
        let g = heads.group();
        let mut frac = 0.0;
        if certifier.is_some() {
            frac = (0..heads.num_q_heads() * l)
                .into_par_iter()
                .map(|n| keys.keys(n / l, n % l).len() as f64 / (n % l + 1) as f64)
                .sum::<f64>();
        } else {
            for kv in 0..heads.num_kv_heads() {
                for i in 0..l {
                    frac += g as f64 * counted.kept(kv, i) as f64 / (i + 1) as f64;
                }
            }
        }
        drop(keys);
        let usage = LayerUse {
            layer,
            keep_fraction: frac / (heads.num_q_heads() * l) as f64,
            global_tokens: counted.heads.iter().map(|h| h.global.len()).collect(),
        };
        Ok((o, usage, tca))
    }
}

impl AttentionPolicy for SparsePolicy {
    fn prefill(
        &self,
        layer: usize,
        q: ArrayView3<f32>,
        k: ArrayView3<f32>,
        v: ArrayView3<f32>,
    ) -> Result<ndarray::Array3<f32>> {
        let heads = to_heads(q, k, v)?;
        let (o, usage, tca) = self.layer_output(layer, &heads, (q, k, v))?;
        if self.keep_cache {
            let budgets = self.profile.budgets(layer)?;
            let l = heads.len();
            let caches = (0..heads.num_kv_heads())
                .map(|kv| {
                    let mut c = HeadCache::new(heads.dim(), budgets[kv].decode_budget());
                    let (kk, vv) = (heads.k(kv), heads.v(kv));
                    for &j in &tca.heads[kv].global {
                        c.push_global(kk.row(j), vv.row(j), j);
                    }
                    for j in l.saturating_sub(self.config.window)..l {
                        c.push_window(kk.row(j), vv.row(j), j);
                    }
                    c
                })
                .collect();
            self.caches
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((layer, caches));
        }
        self.usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(usage);
        Ok(o)
    }
}

/// The TCA decoding cache of every layer and KV head (docs/algorithm.md §3) in f64.
pub struct TcaDecode {
    config: Config,
    /// layer -> KV head -> cache
    layers: Vec<Vec<HeadCache>>,
    pos: usize,
    scale: f64,
}

impl TcaDecode {
    /// Tokens held by each layer's KV heads.
    pub fn tokens_held(&self) -> Vec<Vec<usize>> {
        self.layers
            .iter()
            .map(|l| l.iter().map(|c| c.len()).collect())
            .collect()
    }

    /// Bytes of K and V held (f64) over all layers and KV heads.
    pub fn kv_bytes(&self) -> usize {
        self.layers.iter().flatten().map(|c| c.kv_bytes()).sum()
    }
}

impl DecodeAttention for TcaDecode {
    fn position(&self) -> usize {
        self.pos
    }

    fn attend(
        &mut self,
        layer: usize,
        q: ArrayView1<f32>,
        k: ArrayView1<f32>,
        v: ArrayView1<f32>,
    ) -> Result<Array1<f32>> {
        let pos = self.pos;
        let (w, b, reduce) = (
            self.config.window,
            self.config.block_size,
            self.config.gqa_reduce,
        );
        let scale = self.scale;
        let caches = self.layers.get_mut(layer).ok_or_else(|| {
            TcaError::Invalid(format!("the TCA decoding cache has no layer {layer}"))
        })?;
        let hkv = caches.len();
        let d = k.len() / hkv.max(1);
        let hq = q.len() / d.max(1);
        if hkv == 0 || d == 0 || k.len() != hkv * d || v.len() != hkv * d || hq % hkv != 0 {
            return Err(TcaError::Shape(format!(
                "decode step: q {}, k {}, v {} values for {hkv} KV heads",
                q.len(),
                k.len(),
                v.len()
            )));
        }
        let g = hq / hkv;
        let outs: Vec<Result<Vec<Array1<f64>>>> = caches
            .par_iter_mut()
            .enumerate()
            .map(|(kv, cache)| {
                let kr = k.slice(s![kv * d..(kv + 1) * d]).mapv(f64::from);
                let vr = v.slice(s![kv * d..(kv + 1) * d]).mapv(f64::from);
                cache.push_window(kr.view(), vr.view(), pos);
                let per_head: Vec<(Vec<f64>, Array1<f64>)> = (kv * g..(kv + 1) * g)
                    .map(|h| {
                        let qh = q.slice(s![h * d..(h + 1) * d]).mapv(f64::from);
                        cache.attend(qh.view(), scale)
                    })
                    .collect();
                if cache.window_len() >= w + b {
                    let probs = pool(per_head.iter().map(|o| o.0.clone()), g, reduce);
                    cache.try_compact(b, &probs)?;
                }
                Ok(per_head.into_iter().map(|o| o.1).collect())
            })
            .collect();
        let mut o = Array1::<f32>::zeros(hq * d);
        for (kv, r) in outs.into_iter().enumerate() {
            for (i, oh) in r?.into_iter().enumerate() {
                let h = kv * g + i;
                o.slice_mut(s![h * d..(h + 1) * d])
                    .assign(&oh.mapv(|x| x as f32));
            }
        }
        Ok(o)
    }

    fn advance(&mut self) {
        self.pos += 1;
    }
}

/// Greedy generation with TCA: prefill `prompt` with `policy` (which must be
/// [`Policy::Tca`]), keep each layer's S_G and last w tokens in the compacted cache,
/// then decode up to `max_new` tokens over it, stopping after `eos` if given. Returns
/// the tokens and the cache at the end.
pub fn generate_tca(
    llama: &Llama,
    prompt: &[u32],
    max_new: usize,
    policy: &mut SparsePolicy,
    eos: Option<u32>,
) -> Result<(Vec<u32>, TcaDecode)> {
    if policy.policy != Policy::Tca {
        return Err(TcaError::Invalid(format!(
            "the compacted decoding cache is TCA's; policy {} decodes with the full cache",
            policy.policy.name()
        )));
    }
    if max_new == 0 {
        return Err(TcaError::Invalid("max_new must be at least 1".into()));
    }
    if prompt.len().saturating_add(max_new - 1) > llama.config.context {
        return Err(TcaError::Invalid(format!(
            "{} prompt tokens and {max_new} new ones exceed the model's context of {}",
            prompt.len(),
            llama.config.context
        )));
    }
    policy.keep_cache = true;
    policy
        .caches
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    let hidden = llama.prefill_hidden(prompt, &*policy, None, None);
    policy.keep_cache = false;
    let hidden = hidden?;
    let mut caches = std::mem::take(&mut *policy.caches.lock().unwrap_or_else(|e| e.into_inner()));
    caches.sort_by_key(|c| c.0);
    if caches.len() != llama.config.n_layers {
        return Err(TcaError::Invalid(format!(
            "prefill left {} layer caches for {} layers",
            caches.len(),
            llama.config.n_layers
        )));
    }
    let mut dec = TcaDecode {
        config: policy.config.clone(),
        layers: caches.into_iter().map(|c| c.1).collect(),
        pos: prompt.len(),
        scale: 1.0 / (llama.config.head_dim as f64).sqrt(),
    };
    let n = hidden.nrows();
    let mut logits = llama
        .logits(hidden.slice(s![n - 1..n, ..]))
        .row(0)
        .to_owned();
    let mut out = Vec::with_capacity(max_new);
    for step in 0..max_new {
        let next = argmax(logits.view());
        out.push(next);
        if Some(next) == eos || step + 1 == max_new {
            break;
        }
        logits = llama.decode_step_with(next, &mut dec)?;
    }
    Ok((out, dec))
}

/// Calibrates every layer during one exact forward pass, once per tau of `taus`
/// (everything else from `config`): docs/algorithm.md §2 via
/// [`crate::calibration::calibrate_layer`].
pub struct CalibrationHook {
    config: Config,
    taus: Vec<f64>,
    shape: Option<ModelShape>,
    len: usize,
    /// per tau, the layers calibrated so far
    layers: Vec<Vec<LayerProfile>>,
}

impl CalibrationHook {
    pub fn new(config: &Config, taus: &[f64]) -> Result<Self> {
        if taus.is_empty() {
            return Err(TcaError::Invalid("no tau to calibrate for".into()));
        }
        for &tau in taus {
            Config {
                tau,
                ..config.clone()
            }
            .validate()?;
        }
        Ok(CalibrationHook {
            config: config.clone(),
            taus: taus.to_vec(),
            shape: None,
            len: 0,
            layers: vec![Vec::new(); taus.len()],
        })
    }

    /// One multi-layer profile per tau (in the order given).
    pub fn profiles(self) -> Result<Vec<Profile>> {
        let shape = self
            .shape
            .ok_or_else(|| TcaError::Invalid("no layer was calibrated".into()))?;
        Ok(self
            .taus
            .iter()
            .zip(self.layers)
            .map(|(&tau, layers)| {
                let cfg = Config {
                    tau,
                    ..self.config.clone()
                };
                Profile::new(shape, cfg, self.len, layers)
            })
            .collect())
    }
}

impl QkvHook for CalibrationHook {
    fn record(
        &mut self,
        layer: usize,
        q: ArrayView3<f32>,
        k: ArrayView3<f32>,
        v: ArrayView3<f32>,
    ) -> Result<()> {
        let heads = to_heads(q, k, v)?;
        self.shape = Some(ModelShape::of(&heads));
        self.len = heads.len();
        for (i, &tau) in self.taus.iter().enumerate() {
            let cfg = Config {
                tau,
                ..self.config.clone()
            };
            self.layers[i].push(calibrate_layer(&heads, &cfg, layer)?);
        }
        Ok(())
    }
}

/// Calibration profiles (one per tau) from the captured Q, K, V of every layer
/// 0..`n_layers` (an exact forward computed elsewhere, e.g. on the GPU: `tca
/// calibrate-model --backend cuda`); the same calibration as [`calibrate_model`].
pub fn calibrate_from_capture(
    cap: &super::llama::Capture,
    n_layers: usize,
    config: &Config,
    taus: &[f64],
) -> Result<Vec<Profile>> {
    let have: Vec<usize> = cap.captured.keys().copied().collect();
    if have != (0..n_layers).collect::<Vec<_>>() {
        return Err(TcaError::Invalid(format!(
            "calibration needs the Q/K/V of every layer 0..{n_layers}; the capture has {have:?}"
        )));
    }
    let mut hook = CalibrationHook::new(config, taus)?;
    for (&layer, qkv) in &cap.captured {
        hook.record(layer, qkv.q.view(), qkv.k.view(), qkv.v.view())?;
    }
    hook.profiles()
}

/// Calibration profiles (one per tau) of every layer on `tokens` (exact forward pass).
pub fn calibrate_model(
    llama: &Llama,
    tokens: &[u32],
    config: &Config,
    taus: &[f64],
) -> Result<Vec<Profile>> {
    let mut hook = CalibrationHook::new(config, taus)?;
    llama.prefill_hidden(tokens, &super::Exact::default(), Some(&mut hook), None)?;
    hook.profiles()
}
