//! The llama forward on the GPU, the same computation as [`Llama`]'s CPU prefill:
//! per layer `x += Wo · attn(rope(Wq n(x)), rope(Wk n(x)), Wv n(x))`, then
//! `x += Wdown (silu(Wgate n(x)) ⊙ Wup n(x))`; logits `Wout n(x)`.
//!
//! Precision: the residual stream x and every GEMM output are f32; GEMM inputs
//! (weights, normed activations, attention output, the SiLU product) are f16 (see
//! [`super::weights`] for why not bf16); Q, K, V and the attention output are bf16 (the
//! attention kernels' format). Everything stays on the device between the embedding and the per-row NLLs: the
//! projections write the fused `[L, (Hq + 2 Hkv) d]`, `tca_rope_split` writes the
//! attention kernels' `[H, L, d]` [`DevHeads`] directly (no host round trip).
//!
//! Attention: dense causal ([`prefill::run_dense`]) or TCA (per layer and KV head the
//! budgets of the multi-layer profile, the GPU selection [`run_select`] and the sparse
//! prefill [`prefill::run_sparse`]), or a peer policy as a key set built from TCA's
//! selection of the layer ([`super::peers`]: block top-k, cumulative threshold as an
//! S_G + window for the sparse prefill; oracle top-k and StreamingLLM as per-query key
//! sets at TCA's budgets, [`crate::cuda::keysets`]); with
//! L <= w TCA keeps every key and the dense kernel runs, as on the CPU.
//!
//! Checks: attention outputs and logit chunks are NaN-poisoned before their kernels;
//! after each layer the non-finite values of x are counted on the device, and a forward
//! whose x (or whose NLLs) holds any fails, naming the first such layer.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use ndarray::Array3;

use super::super::keysets::RowRule;
use super::super::prefill::{self, DevAttention};
use super::super::selection::{download_selection, run_select, DevSelection, HostSelection};
use super::super::{backend::select_params, bf16_to_f32, Ctx, DevHeads, Gpu, GpuError, GpuResult};
use super::super::{DIMS, GROUPS};
use super::audit::LayerAuditor;
use super::gemm::Blas;
use super::glue::{self, KvRows};
use super::peers::{self, GpuPeer};
use super::weights::DevWeights;
use crate::calibration::Profile;
use crate::config::Config;
use crate::model::llama::{Capture, Llama, LlamaConfig, QkvHook, Score};
use crate::selection::policies::{
    block_topk, cumulative_threshold, OracleTopK, Policy, StreamingLlm,
};
use crate::selection::{kept_count, select, KeySets};

/// Target rows per logits chunk (`[CHUNK, vocab]` f32 on the device).
pub const LOGIT_CHUNK: usize = 1024;

/// The attention of a GPU forward.
#[derive(Clone, Copy)]
pub enum GpuAttn<'a> {
    Exact,
    /// TCA with the profile's per-layer, per-KV-head budgets.
    Tca {
        config: &'a Config,
        profile: &'a Profile,
    },
    /// A peer policy's key sets, made from TCA's selection of each layer
    /// ([`super::peers`]).
    Peer {
        peer: GpuPeer,
        config: &'a Config,
        profile: &'a Profile,
    },
}

impl<'a> GpuAttn<'a> {
    /// The configuration and profile of a sparse attention (TCA or a peer).
    pub fn sparse(&self) -> Option<(&'a Config, &'a Profile)> {
        match *self {
            GpuAttn::Exact => None,
            GpuAttn::Tca { config, profile }
            | GpuAttn::Peer {
                config, profile, ..
            } => Some((config, profile)),
        }
    }

    /// The peer, if this is one.
    pub fn peer(&self) -> Option<GpuPeer> {
        match *self {
            GpuAttn::Peer { peer, .. } => Some(peer),
            _ => None,
        }
    }

    /// The policy this attention runs (`None`: exact).
    pub fn policy(&self) -> Option<Policy> {
        match *self {
            GpuAttn::Exact => None,
            GpuAttn::Tca { .. } => Some(Policy::Tca),
            GpuAttn::Peer { peer, .. } => Some(peer.policy()),
        }
    }
}

/// What TCA (or a peer) kept at one layer (GPU selection).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerKeep {
    pub layer: usize,
    /// Mean over (query head, query) of |S_i| / (i + 1).
    pub keep_fraction: f64,
    /// S_G per KV head (ascending positions).
    pub global: Vec<Vec<usize>>,
    /// With `check_selection`: per KV head, the size of the symmetric difference
    /// between the GPU's S_G and the f64 oracle's (the same policy's) on the same
    /// (bf16) Q, K, V.
    pub oracle_diff: Option<Vec<usize>>,
    /// With `check_selection`, for a per-query peer (oracle top-k, StreamingLLM) at the
    /// layers [`KEY_SET_CHECK_EVERY`] apart: (query rows whose GPU key set differs from
    /// the CPU policy's on the same bf16 Q, K, V and TCA's GPU S_G, rows checked). For
    /// oracle top-k a difference is a near-tie of f32 and f64 scores.
    pub key_set_diff: Option<(usize, usize)>,
}

/// The per-query peers' key sets are checked at layers 0, 10, 20, ... (each check costs
/// an f64 CPU pass over the layer's L^2 / 2 scores per query head).
pub const KEY_SET_CHECK_EVERY: usize = 10;

/// Rows (query head, query) whose kept-key bits `[Hq, L, ceil(L / 32)]` (from
/// [`crate::cuda::keysets::run_key_rows`]) differ from `keys`' key sets.
pub fn count_key_set_diff<K: KeySets + Sync + ?Sized>(
    keys: &K,
    bits: &[u32],
    hq: usize,
    len: usize,
) -> usize {
    use rayon::prelude::*;
    let words = len.div_ceil(32);
    (0..hq * len)
        .into_par_iter()
        .filter(|&n| {
            let row = &bits[n * words..(n + 1) * words];
            let want = keys.keys(n / len, n % len);
            let have: usize = row.iter().map(|w| w.count_ones() as usize).sum();
            have != want.len() || want.iter().any(|&j| (row[j / 32] >> (j % 32)) & 1 == 0)
        })
        .count()
}

/// What a forward reports besides its output.
#[derive(Debug, Clone, Default)]
pub struct ForwardStats {
    /// TCA only: one entry per layer run.
    pub keep: Vec<LayerKeep>,
}

/// Mean over KV heads (each standing for g query heads) and queries of |S_i| / (i + 1),
/// with S_i = {j in S_G : j < max(0, i - w + 1)} ∪ the window (docs/algorithm.md §1.7).
pub fn keep_fraction(global: &[Vec<usize>], window: usize, len: usize) -> f64 {
    let frac: f64 = global
        .iter()
        .flat_map(|g| (0..len).map(move |i| kept_count(g, window, i) as f64 / (i + 1) as f64))
        .sum();
    frac / (global.len() * len).max(1) as f64
}

/// Called after a layer's attention (the stream synchronised) with the layer, its Q, K,
/// V, TCA's selection (if any) and the attention output.
pub(super) type Inspect<'a> =
    &'a mut dyn FnMut(usize, &DevHeads, Option<&DevSelection>, &DevAttention) -> GpuResult<()>;

/// A layer's K and V of every position so far, `[Hkv, cap, d]` (bf16): the full decoding
/// cache (and the shadow of the compacted one).
pub struct LayerKv {
    pub k: CudaSlice<u16>,
    pub v: CudaSlice<u16>,
    pub cap: usize,
}

/// Device buffers of one forward over L tokens.
pub(super) struct Work {
    pub(super) l: usize,
    pub(super) tokens: CudaSlice<u32>,
    pub(super) cos: CudaSlice<f32>,
    pub(super) sin: CudaSlice<f32>,
    /// Residual stream `[L, hidden]`.
    pub(super) x: CudaSlice<f32>,
    /// Normed x `[L, hidden]` (f16).
    pub(super) xn: CudaSlice<u16>,
    /// `[L, (Hq + 2 Hkv) d]`
    pub(super) qkv: CudaSlice<f32>,
    pub(super) heads: DevHeads,
    pub(super) att: DevAttention,
    /// Attention output `[L, Hq d]` (f16).
    pub(super) merged: CudaSlice<u16>,
    /// gate|up `[L, 2 F]`
    pub(super) gu: CudaSlice<f32>,
    /// silu(gate) * up `[L, F]` (f16).
    pub(super) act: CudaSlice<u16>,
    /// Non-finite values of x after each layer.
    pub(super) bad: CudaSlice<u32>,
    /// Per layer, the selection the attention uses (`None`: dense attention at this
    /// layer); for a peer, made in [`GpuModel::layers`] from `tca_sels`.
    pub(super) sels: Vec<Option<DevSelection>>,
    /// A peer, its configuration and per layer TCA's selection buffers.
    pub(super) peer: Option<(GpuPeer, Config, Vec<Option<DevSelection>>)>,
}

/// The model on one GPU: weights (f16) and a cuBLAS handle.
pub struct GpuModel {
    pub gpu: Gpu,
    pub(super) blas: Blas,
    pub(super) weights: DevWeights,
}

fn tca_err(e: crate::TcaError) -> GpuError {
    GpuError::Invalid(e.to_string())
}

impl GpuModel {
    /// Opens the device, loads the kernels and cuBLAS, uploads `llama`'s weights.
    pub fn new(llama: &Llama) -> GpuResult<Self> {
        let c = &llama.config;
        if !DIMS.contains(&c.head_dim) || !GROUPS.contains(&(c.n_heads / c.n_kv_heads)) {
            return Err(GpuError::Invalid(format!(
                "no attention kernel for head dim {} and group {} (have {DIMS:?}, {GROUPS:?})",
                c.head_dim,
                c.n_heads / c.n_kv_heads
            )));
        }
        let gpu = Gpu::new()?;
        let blas = Blas::new(&gpu)?;
        let weights = DevWeights::upload(&gpu, llama)?;
        gpu.sync()?;
        Ok(GpuModel { gpu, blas, weights })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.weights.config
    }

    /// Buffers for a forward over `tokens`, with RoPE tables for `tokens.len() + extra`
    /// positions; past the model's context only when `beyond_context` (timing: RoPE
    /// extrapolates, the arithmetic is the same).
    pub(super) fn work(
        &self,
        tokens: &[u32],
        attn: GpuAttn,
        beyond_context: bool,
        extra: usize,
    ) -> GpuResult<Work> {
        let c = self.config();
        let (l, hid, d, hq, hkv) = (tokens.len(), c.hidden, c.head_dim, c.n_heads, c.n_kv_heads);
        if l == 0 || (l + extra > c.context && !beyond_context) {
            return Err(GpuError::Invalid(format!(
                "{l} tokens and {extra} more positions: need 1 ..= {} in all (the model's context{})",
                c.context,
                if c.rope_scaling == crate::model::rope::RopeScaling::None {
                    "; --rope-scaling reaches further"
                } else {
                    ""
                }
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(GpuError::Invalid(format!(
                "token id {t} outside the vocabulary of {}",
                c.vocab
            )));
        }
        let g = &self.gpu;
        let (cos, sin) = c.rope().tables(0, l + extra, d);
        let tca_sels = match attn.sparse() {
            None => (0..c.n_layers).map(|_| None).collect(),
            Some((config, profile)) => {
                let m = &profile.model;
                if (m.num_q_heads, m.num_kv_heads, m.head_dim) != (hq, hkv, d) {
                    return Err(GpuError::Invalid(format!(
                        "profile made for {} query heads, {} KV heads, head dim {}; the model has {hq}, {hkv}, {d}",
                        m.num_q_heads, m.num_kv_heads, m.head_dim
                    )));
                }
                if profile.config.block_size != config.block_size {
                    return Err(GpuError::Invalid(format!(
                        "profile calibrated with block_size = {}, the configuration has {}",
                        profile.config.block_size, config.block_size
                    )));
                }
                let shape = DevHeads {
                    q: g.alloc(1)?,
                    k: g.alloc(1)?,
                    v: g.alloc(1)?,
                    hq,
                    hkv,
                    len: l,
                    dim: d,
                };
                (0..c.n_layers)
                    .map(|li| {
                        if l <= config.window {
                            return Ok(None);
                        }
                        let budgets = profile.budgets(li).map_err(tca_err)?;
                        let p = select_params(l, config, &budgets)?;
                        DevSelection::new(g, &shape, &p).map(Some)
                    })
                    .collect::<GpuResult<Vec<_>>>()?
            }
        };
        let (sels, peer) = match (attn.peer(), attn.sparse()) {
            (Some(peer), Some((config, _))) => (
                (0..c.n_layers).map(|_| None).collect(),
                Some((peer, config.clone(), tca_sels)),
            ),
            _ => (tca_sels, None),
        };
        let heads = DevHeads {
            q: g.alloc(hq * l * d)?,
            k: g.alloc(hkv * l * d)?,
            v: g.alloc(hkv * l * d)?,
            hq,
            hkv,
            len: l,
            dim: d,
        };
        let att = DevAttention::new(g, &heads)?;
        Ok(Work {
            l,
            tokens: g.upload(tokens)?,
            cos: g.upload(
                cos.as_slice()
                    .ok_or_else(|| GpuError::Invalid("rope table layout".into()))?,
            )?,
            sin: g.upload(
                sin.as_slice()
                    .ok_or_else(|| GpuError::Invalid("rope table layout".into()))?,
            )?,
            x: g.alloc(l * hid)?,
            xn: g.alloc(l * hid)?,
            qkv: g.alloc(l * (hq + 2 * hkv) * d)?,
            heads,
            att,
            merged: g.alloc(l * hq * d)?,
            gu: g.alloc(l * 2 * c.ffn)?,
            act: g.alloc(l * c.ffn)?,
            bad: g.alloc(c.n_layers)?,
            sels,
            peer,
        })
    }

    /// Queues layers `0 ..= last` on the stream. With `inspect`, after each layer's Q,
    /// K, V (and TCA's selection) the stream is synchronised and `inspect` gets them.
    /// With `caches`, each layer's K and V are also copied into rows 0..L of its cache.
    pub(super) fn layers(
        &self,
        w: &mut Work,
        last: usize,
        mut inspect: Option<Inspect<'_>>,
        mut caches: Option<&mut [LayerKv]>,
    ) -> GpuResult<()> {
        let c = self.config().clone();
        let g = &self.gpu;
        let (l, hid, d, hq, hkv) = (w.l, c.hidden, c.head_dim, c.n_heads, c.n_kv_heads);
        g.stream
            .memset_zeros(&mut w.bad)
            .ctx("clear the non-finite counts")?;
        glue::embed(g, &self.weights.embed, &w.tokens, &mut w.x, hid)?;
        for li in 0..=last {
            let lw = &self.weights.layers[li];
            glue::rmsnorm(g, &w.x, &lw.attn_norm, &mut w.xn, (l, hid), c.rms_eps)?;
            let nqkv = (hq + 2 * hkv) * d;
            self.blas
                .linear(&w.xn, &lw.wqkv, &mut w.qkv, (l, nqkv, hid), 0.0, "Q|K|V")?;
            if inspect.is_some() {
                // Q, K, V go to the host in these runs: poisoned, so that a value the
                // kernel did not write shows as non-finite there.
                g.poison(&mut w.heads.q)?;
                g.poison(&mut w.heads.k)?;
                g.poison(&mut w.heads.v)?;
            }
            glue::rope_split(
                g,
                &w.qkv,
                &w.cos,
                &w.sin,
                &mut w.heads.q,
                &mut w.heads.k,
                &mut w.heads.v,
                (hq, hkv, l, d),
                KvRows { rows: l, p0: 0 },
            )?;
            if let Some(c) = caches.as_deref_mut() {
                let c = &mut c[li];
                for kv in 0..hkv {
                    let (src, dst) = (kv * l * d..(kv + 1) * l * d, kv * c.cap * d..);
                    g.stream
                        .memcpy_dtod(
                            &w.heads.k.slice(src.clone()),
                            &mut c.k.slice_mut(dst.clone()),
                        )
                        .ctx("copy K into the cache")?;
                    g.stream
                        .memcpy_dtod(&w.heads.v.slice(src), &mut c.v.slice_mut(dst))
                        .ctx("copy V into the cache")?;
                }
            }
            w.att.poison(g)?;
            // A per-query peer's attention is done here (its key sets are not an S_G).
            let mut rows_done = false;
            if let Some((peer, cfg, tca_sels)) = w.peer.as_mut() {
                if let Some(tsel) = tca_sels[li].as_mut() {
                    run_select(g, &w.heads, tsel, None)?;
                    match peer.rows() {
                        Some(rule) => {
                            peers::peer_rows(g, &w.heads, tsel, rule, &mut w.att, None)?;
                            rows_done = true;
                        }
                        None => {
                            w.sels[li] =
                                Some(peers::peer_selection(g, &w.heads, tsel, *peer, cfg)?);
                        }
                    }
                }
            }
            match (rows_done, w.sels[li].as_mut(), w.peer.is_some()) {
                (true, _, _) => {}
                (false, None, _) => prefill::run_dense(g, &w.heads, &mut w.att)?,
                (false, Some(sel), true) => prefill::run_sparse(g, &w.heads, sel, &mut w.att)?,
                (false, Some(sel), false) => {
                    run_select(g, &w.heads, sel, None)?;
                    prefill::run_sparse(g, &w.heads, sel, &mut w.att)?;
                }
            }
            if let Some(f) = inspect.as_deref_mut() {
                g.sync()?;
                // A per-query peer reports TCA's selection (its budget is TCA's).
                let sel = match (&w.peer, rows_done) {
                    (Some((_, _, tca_sels)), true) => tca_sels[li].as_ref(),
                    _ => w.sels[li].as_ref(),
                };
                f(li, &w.heads, sel, &w.att)?;
            }
            glue::merge_heads(g, &w.att.o, &mut w.merged, (hq, l, d))?;
            self.after_attention(
                li,
                l,
                &mut w.x,
                &w.merged,
                (&mut w.xn, &mut w.gu, &mut w.act),
            )?;
            glue::count_nonfinite(g, &w.x, l * hid, &mut w.bad, li)?;
        }
        Ok(())
    }

    /// The rest of layer `li` over `rows` rows once its attention output `merged`
    /// `[rows, Hq d]` (f16) is there: `x += Wo merged`, then the MLP block
    /// `x += Wdown (silu(Wgate n(x)) ⊙ Wup n(x))` (scratch: normed x, gate|up, product).
    pub(super) fn after_attention(
        &self,
        li: usize,
        rows: usize,
        x: &mut CudaSlice<f32>,
        merged: &CudaSlice<u16>,
        (xn, gu, act): (
            &mut CudaSlice<u16>,
            &mut CudaSlice<f32>,
            &mut CudaSlice<u16>,
        ),
    ) -> GpuResult<()> {
        let c = self.config();
        let (hid, d, hq, ffn) = (c.hidden, c.head_dim, c.n_heads, c.ffn);
        let lw = &self.weights.layers[li];
        let g = &self.gpu;
        self.blas
            .linear(merged, &lw.wo, x, (rows, hid, hq * d), 1.0, "O")?;
        glue::rmsnorm(g, x, &lw.ffn_norm, xn, (rows, hid), c.rms_eps)?;
        self.blas
            .linear(xn, &lw.w_gate_up, gu, (rows, 2 * ffn, hid), 0.0, "gate|up")?;
        glue::silu_mul(g, gu, act, (rows, ffn))?;
        self.blas
            .linear(act, &lw.w_down, x, (rows, hid, ffn), 1.0, "down")
    }

    /// Fails naming the first layer whose residual stream held a non-finite value.
    pub(super) fn check_finite(&self, w: &Work) -> GpuResult<()> {
        let bad = self.gpu.download(&w.bad)?;
        match bad.iter().position(|&n| n > 0) {
            Some(li) => Err(GpuError::Invalid(format!(
                "non-finite values in the residual stream after layer {li} ({} of {})",
                bad[li],
                w.l * self.config().hidden
            ))),
            None => Ok(()),
        }
    }

    /// Negative log-likelihood and top-1 hit of every target `tokens[t]`,
    /// `t = max(first_target, 1) .. L` (as [`Llama::score`]). With `check_selection`
    /// (TCA), each layer's GPU S_G is compared with the f64 oracle's selection on the
    /// same bf16 Q, K, V.
    /// With `auditor` (TCA), every layer is audited ([`LayerAuditor`]).
    pub fn score(
        &self,
        tokens: &[u32],
        attn: GpuAttn,
        first_target: usize,
        check_selection: bool,
        mut auditor: Option<&mut LayerAuditor>,
    ) -> GpuResult<(Score, ForwardStats)> {
        let first = first_target.max(1);
        if first >= tokens.len() {
            return Err(GpuError::Invalid(format!(
                "nothing to score: first target {first} but only {} tokens",
                tokens.len()
            )));
        }
        let c = self.config().clone();
        let g = &self.gpu;
        let mut w = self.work(tokens, attn, false, 0)?;
        let mut stats = ForwardStats::default();
        let tca_cfg = attn.sparse();
        let policy = attn.policy();
        let rows = attn.peer().and_then(|p| p.rows());
        if let (Some(rule), true) = (rows, auditor.is_some()) {
            return Err(GpuError::Invalid(format!(
                "the layer audit checks TCA-style key sets (S_G + window); {rule:?} chooses keys per query"
            )));
        }
        {
            let mut inspect = |li: usize,
                               h: &DevHeads,
                               sel: Option<&DevSelection>,
                               att: &DevAttention|
             -> GpuResult<()> {
                let (Some(sel), Some((cfg, profile))) = (sel, tca_cfg) else {
                    return Ok(());
                };
                let hs: HostSelection = download_selection(g, h, sel)?;
                if let Some(a) = auditor.as_deref_mut() {
                    a.layer(g, li, h, &hs, cfg.window, att)?;
                }
                let mut key_set_diff = None;
                let oracle_diff = if check_selection {
                    let heads = download_heads(g, h)?.to_heads().map_err(tca_err)?;
                    let budgets = profile.budgets(li).map_err(tca_err)?;
                    let cpu = select(&heads, cfg, &budgets).map_err(tca_err)?;
                    if let (Some(rule), 0) = (rows, li % KEY_SET_CHECK_EVERY) {
                        // The kernel again, with its kept keys as bits, against the CPU
                        // policy at the same budgets (TCA's GPU S_G).
                        let mut scratch = DevAttention::new(g, h)?;
                        let mut mask = g.alloc::<u32>(h.hq * h.len * h.len.div_ceil(32))?;
                        peers::peer_rows(g, h, sel, rule, &mut scratch, Some(&mut mask))?;
                        let bits = g.download(&mask)?;
                        let mut at = cpu.clone();
                        for (hd, gl) in at.heads.iter_mut().zip(&hs.global) {
                            hd.global = gl.clone();
                        }
                        let n = match rule {
                            RowRule::OracleTopK => {
                                let k = OracleTopK {
                                    heads: &heads,
                                    tca: &at,
                                };
                                count_key_set_diff(&k, &bits, h.hq, h.len)
                            }
                            RowRule::StreamingLlm { sinks } => {
                                let k = StreamingLlm { tca: &at, sinks };
                                count_key_set_diff(&k, &bits, h.hq, h.len)
                            }
                        };
                        key_set_diff = Some((n, h.hq * h.len));
                    }
                    let cpu = match policy {
                        Some(Policy::BlockTopK) => {
                            block_topk(&heads, cfg, &cpu).map_err(tca_err)?
                        }
                        Some(Policy::CumulativeThreshold) => cumulative_threshold(&cpu, cfg.tau),
                        _ => cpu,
                    };
                    Some(
                        cpu.heads
                            .iter()
                            .zip(&hs.global)
                            .map(|(a, b)| crate::backend::symmetric_difference(&a.global, b))
                            .collect(),
                    )
                } else {
                    None
                };
                stats.keep.push(LayerKeep {
                    layer: li,
                    keep_fraction: keep_fraction(&hs.global, cfg.window, h.len),
                    global: hs.global,
                    oracle_diff,
                    key_set_diff,
                });
                Ok(())
            };
            let inspect: Option<Inspect<'_>> = if tca_cfg.is_some() {
                Some(&mut inspect)
            } else {
                None
            };
            self.layers(&mut w, c.n_layers - 1, inspect, None)?;
        }
        // Final norm, then the head and the per-row NLL chunk by chunk.
        glue::rmsnorm(
            g,
            &w.x,
            &self.weights.out_norm,
            &mut w.xn,
            (w.l, c.hidden),
            c.rms_eps,
        )?;
        let targets = g.upload(&tokens[first..])?;
        let n = tokens.len() - first;
        // Poisoned: a row the kernel never wrote fails the checks below.
        let mut nll = g.upload(&vec![f64::NAN; n])?;
        let mut arg = g.upload(&vec![u32::MAX; n])?;
        let mut logits = g.alloc::<f32>(LOGIT_CHUNK.min(n) * c.vocab)?;
        for r0 in (0..n).step_by(LOGIT_CHUNK) {
            let rows = LOGIT_CHUNK.min(n - r0);
            // Row first - 1 + r of the normed hidden states predicts target r.
            let h0 = (first - 1 + r0) * c.hidden;
            let xs = w.xn.slice(h0..h0 + rows * c.hidden);
            g.poison(&mut logits)?;
            self.blas.linear(
                &xs,
                self.weights.head(),
                &mut logits,
                (rows, c.vocab, c.hidden),
                0.0,
                "output head",
            )?;
            glue::row_nll(
                g,
                &logits,
                &targets,
                &mut nll,
                &mut arg,
                (r0, rows, c.vocab),
            )?;
        }
        g.sync()?;
        self.check_finite(&w)?;
        let nll = g.download(&nll)?;
        let arg = g.download(&arg)?;
        if let Some(i) = nll.iter().position(|v| !v.is_finite()) {
            return Err(GpuError::Invalid(format!(
                "non-finite NLL at target position {} (the output head)",
                first + i
            )));
        }
        if let Some(&a) = arg.iter().find(|&&a| a as usize >= c.vocab) {
            return Err(GpuError::Invalid(format!(
                "arg-max {a} outside the vocabulary"
            )));
        }
        let score = Score {
            first_target: first,
            correct: arg
                .iter()
                .zip(&tokens[first..])
                .map(|(a, t)| a == t)
                .collect(),
            nll,
            argmax: arg,
        };
        Ok((score, stats))
    }

    /// Post-RoPE Q `[Hq, L, d]`, K and V `[Hkv, L, d]` of the given layers (exact
    /// attention; bf16 values as f32); the forward stops after the last of them.
    pub fn capture(&self, tokens: &[u32], layers: &[usize]) -> GpuResult<Capture> {
        let mut cap = Capture::new(layers);
        let last = *cap
            .layers()
            .last()
            .ok_or_else(|| GpuError::Invalid("no layers to capture".into()))?;
        if last >= self.config().n_layers {
            return Err(GpuError::Invalid(format!(
                "layer {last} asked for; the model has layers 0..{}",
                self.config().n_layers - 1
            )));
        }
        let g = &self.gpu;
        let mut w = self.work(tokens, GpuAttn::Exact, false, 0)?;
        {
            let mut inspect = |li: usize,
                               h: &DevHeads,
                               _: Option<&DevSelection>,
                               _: &DevAttention|
             -> GpuResult<()> {
                if cap.layers().binary_search(&li).is_ok() {
                    let q = download_heads(g, h)?;
                    cap.record(li, q.q.view(), q.k.view(), q.v.view())
                        .map_err(tca_err)?;
                }
                Ok(())
            };
            self.layers(&mut w, last, Some(&mut inspect), None)?;
        }
        g.sync()?;
        // Layers before `last` are complete; `last` stopped after its attention input.
        if last > 0 {
            let bad = g.download(&w.bad)?;
            if let Some(li) = bad[..last].iter().position(|&n| n > 0) {
                return Err(GpuError::Invalid(format!(
                    "non-finite values in the residual stream after layer {li}"
                )));
            }
        }
        for (li, qkv) in &cap.captured {
            if [&qkv.q, &qkv.k, &qkv.v]
                .iter()
                .any(|a| a.iter().any(|v| !v.is_finite()))
            {
                return Err(GpuError::Invalid(format!(
                    "non-finite Q, K or V at layer {li}"
                )));
            }
        }
        Ok(cap)
    }

    /// Milliseconds of `iters` prefills over `tokens` (all layers and the final norm, no
    /// output head), timed with CUDA events after one untimed warm-up run. `tokens` may
    /// be longer than the model's context (a throughput measurement only).
    pub fn time_prefill(&self, tokens: &[u32], attn: GpuAttn, iters: usize) -> GpuResult<Vec<f64>> {
        let c = self.config().clone();
        let g = &self.gpu;
        let mut w = self.work(tokens, attn, true, 0)?;
        let ev = |_| {
            g.ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .ctx("cuEventCreate")
        };
        let (e0, e1) = (ev(0)?, ev(1)?);
        let mut out = Vec::with_capacity(iters);
        for it in 0..=iters {
            // The spin lets the host queue the whole forward before the start event.
            g.spin(5000)?;
            e0.record(&g.stream).ctx("cuEventRecord")?;
            self.layers(&mut w, c.n_layers - 1, None, None)?;
            glue::rmsnorm(
                g,
                &w.x,
                &self.weights.out_norm,
                &mut w.xn,
                (w.l, c.hidden),
                c.rms_eps,
            )?;
            e1.record(&g.stream).ctx("cuEventRecord")?;
            g.sync()?;
            self.check_finite(&w)?;
            if it > 0 {
                out.push(e0.elapsed_ms(&e1).ctx("cuEventElapsedTime")? as f64);
            }
        }
        Ok(out)
    }
}

/// Q, K, V of a layer on the host (bf16 values as f32).
pub(super) fn download_heads(g: &Gpu, h: &DevHeads) -> GpuResult<crate::model::llama::Qkv> {
    let f = |x: &CudaSlice<u16>, heads: usize| -> GpuResult<Array3<f32>> {
        let v: Vec<f32> = g
            .download(x)?
            .iter()
            .take(heads * h.len * h.dim)
            .map(|&b| bf16_to_f32(b))
            .collect();
        Array3::from_shape_vec((heads, h.len, h.dim), v)
            .map_err(|e| GpuError::Invalid(e.to_string()))
    };
    Ok(crate::model::llama::Qkv {
        q: f(&h.q, h.hq)?,
        k: f(&h.k, h.hkv)?,
        v: f(&h.v, h.hkv)?,
    })
}
