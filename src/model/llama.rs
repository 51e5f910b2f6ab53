//! A llama-architecture forward pass in f32 (SmolLM2-135M-Instruct and the like).
//!
//! Weights are dequantised to f32 once, at load. Per layer:
//! `x += Wo · attn(rope(Wq·n(x)), rope(Wk·n(x)), Wv·n(x))`, then
//! `x += Wdown · (silu(Wgate·n(x)) ⊙ Wup·n(x))`, with `n` an RMSNorm; the logits are
//! `Wout · n(x)` (`Wout` = the token embedding when the output is tied).
//!
//! With q/k/v biases (qwen2) `Wq·n(x) + bq` etc. RoPE rotates adjacent pairs
//! `(2i, 2i+1)` of each head (see [`super::rope`]): llama.cpp's GGUF converter
//! permutes the rows of `attn_q` and `attn_k` for exactly this (rotating halves
//! `(i, i + d/2)` instead gives perplexities in the hundreds), and the Hugging Face
//! loader ([`super::hf`]) applies the same permutation to its q/k rows and biases.
//!
//! Matrix products are ndarray `dot` / `general_mat_mul` (matrixmultiply's blocked
//! f32 GEMM), parallelised over row blocks (prefill) or output columns (decode) with
//! rayon; attention is the pluggable [`AttentionPolicy`].

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array1, Array2, Array3, ArrayView1, ArrayView2, ArrayView3, ArrayViewMut2, Axis};
use rayon::prelude::*;

use super::attention::{softmax_rows_prefix, AttentionPolicy, Exact};
use super::gguf::GgufFile;
use super::rope::{apply_rope, Rope, RopeScaling};
use super::tokenizer::Tokenizer;
use crate::error::{Result, TcaError};

/// Hyper-parameters read from the GGUF metadata (`llama.*`) or a Hugging Face
/// `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub context: usize,
    pub vocab: usize,
    /// RoPE base (`rope_theta`).
    pub rope_base: f64,
    pub rope_scaling: RopeScaling,
    pub rms_eps: f32,
}

impl LlamaConfig {
    /// The RoPE of this model.
    pub fn rope(&self) -> Rope {
        Rope {
            base: self.rope_base,
            scaling: self.rope_scaling.clone(),
        }
    }

    /// Check that the sizes fit together (the head dim need not be hidden / heads).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let c = self;
        if c.n_heads == 0
            || c.n_kv_heads == 0
            || c.n_heads % c.n_kv_heads != 0
            || c.head_dim == 0
            || c.head_dim % 2 != 0
            || c.hidden == 0
            || c.ffn == 0
            || c.vocab == 0
            || c.n_layers == 0
            || c.context == 0
            || !(c.rope_base.is_finite() && c.rope_base > 1.0)
            || !(c.rms_eps.is_finite() && c.rms_eps >= 0.0)
        {
            return Err(format!("inconsistent llama config {c:?}"));
        }
        Ok(())
    }
}

/// The weights of one layer (`[rows, cols]` = `[out, in]`; q/k rows in the
/// adjacent-pairs order of [`super::rope`]).
pub(crate) struct Layer {
    pub(crate) attn_norm: Array1<f32>,
    pub(crate) wq: Array2<f32>, // [Hq*d, hidden]
    pub(crate) wk: Array2<f32>, // [Hkv*d, hidden]
    pub(crate) wv: Array2<f32>, // [Hkv*d, hidden]
    pub(crate) wo: Array2<f32>, // [hidden, Hq*d]
    /// Biases of q `[Hq*d]`, k and v `[Hkv*d]` (qwen2), of o `[hidden]` (llama's
    /// `attention_bias`).
    pub(crate) bq: Option<Array1<f32>>,
    pub(crate) bk: Option<Array1<f32>>,
    pub(crate) bv: Option<Array1<f32>>,
    pub(crate) bo: Option<Array1<f32>>,
    pub(crate) ffn_norm: Array1<f32>,
    pub(crate) w_gate: Array2<f32>, // [ffn, hidden]
    pub(crate) w_up: Array2<f32>,   // [ffn, hidden]
    pub(crate) w_down: Array2<f32>, // [hidden, ffn]
}

/// A loaded llama model (f32 weights).
pub struct Llama {
    pub config: LlamaConfig,
    pub(crate) tok_embd: Array2<f32>, // [vocab, hidden]
    pub(crate) layers: Vec<Layer>,
    pub(crate) out_norm: Array1<f32>,
    pub(crate) output: Option<Array2<f32>>, // [vocab, hidden]; None = tied to tok_embd
}

/// A model with its tokenizer.
pub struct Model {
    /// A name for reports and capture metadata.
    pub name: String,
    pub llama: Llama,
    pub tokenizer: Tokenizer,
}

impl Model {
    /// Replaces the model's RoPE scaling by `spec` (`none` or `KIND:FACTOR`, see
    /// [`RopeScaling::parse`]) and sets the context it may run at to the trained
    /// context times the factor. The trained context is the model's own (or, where the
    /// model already carries a scaling, its original context).
    pub fn rescale_rope(&mut self, spec: &str) -> Result<()> {
        let c = &mut self.llama.config;
        let trained = match c.rope_scaling {
            RopeScaling::Yarn {
                original_context, ..
            }
            | RopeScaling::Llama3 {
                original_context, ..
            } => original_context as usize,
            _ => (c.context as f64 / c.rope_scaling.factor()).round() as usize,
        };
        let scaling = RopeScaling::parse(spec, trained).map_err(TcaError::Invalid)?;
        c.context = (trained as f64 * scaling.factor()).round() as usize;
        c.rope_scaling = scaling;
        Ok(())
    }

    /// Load a model: a llama GGUF file (weights F32/F16/Q8_0/Q4_1, tokenizer from its
    /// metadata), or a Hugging Face folder (see [`super::hf`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref();
        if path.is_dir() {
            return super::hf::load(path);
        }
        let g = GgufFile::open(path)?;
        let llama = Llama::from_gguf(&g)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        if tokenizer.vocab_size() != llama.config.vocab {
            return Err(TcaError::Format {
                path: g.path.clone(),
                msg: format!(
                    "tokenizer has {} tokens, the model {}",
                    tokenizer.vocab_size(),
                    llama.config.vocab
                ),
            });
        }
        let name = if path.file_name() == Some(super::assets::MODEL_FILE.as_ref()) {
            super::assets::MODEL_NAME.to_owned()
        } else {
            path.file_stem()
                .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
        };
        Ok(Model {
            name,
            llama,
            tokenizer,
        })
    }
}

/// Receives each layer's post-RoPE Q `[Hq, L, d]`, K and V `[Hkv, L, d]` during prefill.
pub trait QkvHook {
    fn record(
        &mut self,
        layer: usize,
        q: ArrayView3<f32>,
        k: ArrayView3<f32>,
        v: ArrayView3<f32>,
    ) -> Result<()>;

    /// The last layer this hook needs: the forward pass stops after it (no logits).
    /// `None` runs all layers.
    fn last_layer(&self) -> Option<usize> {
        None
    }
}

/// Post-RoPE queries `[Hq, L, d]`, keys and values `[Hkv, L, d]` of one layer.
#[derive(Debug, Clone)]
pub struct Qkv {
    pub q: Array3<f32>,
    pub k: Array3<f32>,
    pub v: Array3<f32>,
}

impl Qkv {
    /// The validated f64 [`crate::Heads`] of this layer, for the reference code.
    pub fn to_heads(&self) -> Result<crate::Heads> {
        super::attention::to_heads(self.q.view(), self.k.view(), self.v.view())
    }
}

/// A [`QkvHook`] keeping the Q, K, V of chosen layers.
#[derive(Debug, Default)]
pub struct Capture {
    layers: Vec<usize>,
    /// layer -> its Q, K, V
    pub captured: BTreeMap<usize, Qkv>,
}

impl Capture {
    pub fn new(layers: &[usize]) -> Capture {
        let mut layers = layers.to_vec();
        layers.sort_unstable();
        layers.dedup();
        Capture {
            layers,
            captured: BTreeMap::new(),
        }
    }

    pub fn layers(&self) -> &[usize] {
        &self.layers
    }
}

impl QkvHook for Capture {
    fn record(
        &mut self,
        layer: usize,
        q: ArrayView3<f32>,
        k: ArrayView3<f32>,
        v: ArrayView3<f32>,
    ) -> Result<()> {
        if self.layers.binary_search(&layer).is_ok() {
            self.captured.insert(
                layer,
                Qkv {
                    q: q.to_owned(),
                    k: k.to_owned(),
                    v: v.to_owned(),
                },
            );
        }
        Ok(())
    }

    fn last_layer(&self) -> Option<usize> {
        self.layers.last().copied()
    }
}

/// Per-layer keys and values of past positions, for decoding (exact attention).
pub struct KvCache {
    k: Vec<Array3<f32>>, // per layer [Hkv, cap, d]
    v: Vec<Array3<f32>>,
    len: usize,
}

impl KvCache {
    /// An empty cache with room for `capacity` positions.
    pub fn new(config: &LlamaConfig, capacity: usize) -> KvCache {
        let shape = (config.n_kv_heads, capacity, config.head_dim);
        KvCache {
            k: (0..config.n_layers).map(|_| Array3::zeros(shape)).collect(),
            v: (0..config.n_layers).map(|_| Array3::zeros(shape)).collect(),
            len: 0,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.k.first().map_or(0, |k| k.dim().1)
    }

    /// Bytes of K and V held (f32), over all layers.
    pub fn bytes(&self) -> usize {
        self.k.first().map_or(0, |k| {
            2 * self.k.len() * k.dim().0 * self.len * k.dim().2 * 4
        })
    }
}

/// The attention of one decoding step: it receives each layer's post-RoPE query
/// `[Hq * d]` and the new key and value `[Hkv * d]` of position [`Self::position`],
/// stores them, and returns the attention output `[Hq * d]` over what it holds.
pub trait DecodeAttention {
    /// The position of the token being decoded (tokens held so far).
    fn position(&self) -> usize;
    /// Append layer `layer`'s new key and value and attend with `q`.
    fn attend(
        &mut self,
        layer: usize,
        q: ArrayView1<f32>,
        k: ArrayView1<f32>,
        v: ArrayView1<f32>,
    ) -> Result<Array1<f32>>;
    /// Called once all layers have seen the token.
    fn advance(&mut self);
}

impl DecodeAttention for KvCache {
    fn position(&self) -> usize {
        self.len
    }

    fn attend(
        &mut self,
        layer: usize,
        q: ArrayView1<f32>,
        k: ArrayView1<f32>,
        v: ArrayView1<f32>,
    ) -> Result<Array1<f32>> {
        let pos = self.len;
        if pos >= self.capacity() || layer >= self.k.len() {
            return Err(TcaError::Invalid(format!(
                "KV cache full ({pos} of {} positions) or no layer {layer}",
                self.capacity()
            )));
        }
        let (hkv, _, d) = self.k[layer].dim();
        let hq = q.len() / d.max(1);
        if k.len() != hkv * d || v.len() != hkv * d || hq == 0 || hq % hkv != 0 {
            return Err(TcaError::Shape(format!(
                "decode step: q {}, k {}, v {} values for {hkv} KV heads of dim {d}",
                q.len(),
                k.len(),
                v.len()
            )));
        }
        let g = hq / hkv;
        for h in 0..hkv {
            self.k[layer]
                .slice_mut(s![h, pos, ..])
                .assign(&k.slice(s![h * d..(h + 1) * d]));
            self.v[layer]
                .slice_mut(s![h, pos, ..])
                .assign(&v.slice(s![h * d..(h + 1) * d]));
        }
        let (kc, vc) = (&self.k[layer], &self.v[layer]);
        let heads: Vec<Array1<f32>> = (0..hq)
            .into_par_iter()
            .map(|h| {
                let kv = h / g;
                let qh = q.slice(s![h * d..(h + 1) * d]).insert_axis(Axis(0));
                let keys = kc.slice(s![kv, 0..=pos, ..]);
                let mut sc = qh.dot(&keys.t());
                sc *= 1.0 / (d as f32).sqrt();
                softmax_rows_prefix(&mut sc, |_| pos + 1);
                sc.dot(&vc.slice(s![kv, 0..=pos, ..])).row(0).to_owned()
            })
            .collect();
        let mut o = Array1::<f32>::zeros(hq * d);
        for (h, oh) in heads.iter().enumerate() {
            o.slice_mut(s![h * d..(h + 1) * d]).assign(oh);
        }
        Ok(o)
    }

    fn advance(&mut self) {
        self.len += 1;
    }
}

/// Negative log-likelihoods and top-1 hits of a scored sequence.
#[derive(Debug, Clone)]
pub struct Score {
    /// Position of the first scored target token.
    pub first_target: usize,
    /// `-ln p(token[t] | token[..t])` for t = first_target .. L.
    pub nll: Vec<f64>,
    /// Whether the arg-max prediction was `token[t]`.
    pub correct: Vec<bool>,
    /// The arg-max prediction for position t (first index on ties).
    pub argmax: Vec<u32>,
}

impl Score {
    pub fn mean_nll(&self) -> f64 {
        self.nll.iter().sum::<f64>() / self.nll.len().max(1) as f64
    }

    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }

    pub fn top1(&self) -> f64 {
        self.correct.iter().filter(|&&c| c).count() as f64 / self.correct.len().max(1) as f64
    }

    /// Fraction of positions where this score's arg-max equals `other`'s (the same
    /// targets scored under another attention); an error when they cover different
    /// positions.
    pub fn agreement(&self, other: &Score) -> Result<f64> {
        if self.first_target != other.first_target || self.argmax.len() != other.argmax.len() {
            return Err(TcaError::Shape(format!(
                "scores cover targets {}..+{} and {}..+{}",
                self.first_target,
                self.argmax.len(),
                other.first_target,
                other.argmax.len()
            )));
        }
        let same = self
            .argmax
            .iter()
            .zip(&other.argmax)
            .filter(|(a, b)| a == b)
            .count();
        Ok(same as f64 / self.argmax.len().max(1) as f64)
    }
}

fn fmt_err(g: &GgufFile, msg: String) -> TcaError {
    TcaError::Format {
        path: g.path.clone(),
        msg,
    }
}

/// A weight matrix `[rows, cols]` (GGUF dims `[cols, rows]`).
fn matrix(g: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<Array2<f32>> {
    let (dims, data) = g.tensor_f32(name)?;
    if dims != [cols, rows] {
        return Err(fmt_err(
            g,
            format!("tensor {name} has dims {dims:?}, expected [{cols}, {rows}]"),
        ));
    }
    Array2::from_shape_vec((rows, cols), data)
        .map_err(|e| fmt_err(g, format!("tensor {name}: {e}")))
}

fn vector(g: &GgufFile, name: &str, n: usize) -> Result<Array1<f32>> {
    let (dims, data) = g.tensor_f32(name)?;
    if dims != [n] {
        return Err(fmt_err(
            g,
            format!("tensor {name} has dims {dims:?}, expected [{n}]"),
        ));
    }
    Ok(Array1::from(data))
}

/// `x · wᵀ` for `x` `[n, in]` and `w` `[out, in]`, parallel over row blocks of `x`
/// (or over output blocks when `x` has few rows).
pub fn linear(x: ArrayView2<f32>, w: &Array2<f32>) -> Array2<f32> {
    let (n, _) = x.dim();
    let out = w.nrows();
    let mut y = Array2::<f32>::zeros((n, out));
    let threads = rayon::current_num_threads().max(1);
    if n >= 64 {
        let rows = n.div_ceil(threads * 4).max(32);
        let chunks: Vec<(ArrayViewMut2<f32>, ArrayView2<f32>)> = y
            .axis_chunks_iter_mut(Axis(0), rows)
            .zip(x.axis_chunks_iter(Axis(0), rows))
            .collect();
        chunks.into_par_iter().for_each(|(mut yc, xc)| {
            general_mat_mul(1.0, &xc, &w.t(), 0.0, &mut yc);
        });
    } else if n <= 4 {
        // Decoding: matrix-vector products over contiguous weight rows (packing the
        // weights for a GEMM would copy all of them for one row of output).
        let cols = out.div_ceil(threads * 4).max(64);
        let mut yt = Array2::<f32>::zeros((out, n));
        let chunks: Vec<(ArrayViewMut2<f32>, ArrayView2<f32>)> = yt
            .axis_chunks_iter_mut(Axis(0), cols)
            .zip(w.axis_chunks_iter(Axis(0), cols))
            .collect();
        chunks.into_par_iter().for_each(|(mut yc, wc)| {
            for (mut yrow, wrow) in yc.axis_iter_mut(Axis(0)).zip(wc.axis_iter(Axis(0))) {
                for (yv, xrow) in yrow.iter_mut().zip(x.axis_iter(Axis(0))) {
                    *yv = wrow.dot(&xrow);
                }
            }
        });
        y.assign(&yt.t());
    } else {
        let cols = out.div_ceil(threads * 4).max(64);
        let chunks: Vec<(ArrayViewMut2<f32>, ArrayView2<f32>)> = y
            .axis_chunks_iter_mut(Axis(1), cols)
            .zip(w.axis_chunks_iter(Axis(0), cols))
            .collect();
        chunks.into_par_iter().for_each(|(mut yc, wc)| {
            general_mat_mul(1.0, &x, &wc.t(), 0.0, &mut yc);
        });
    }
    y
}

fn rms_norm(x: ArrayView2<f32>, w: &Array1<f32>, eps: f32) -> Array2<f32> {
    let mut y = x.to_owned();
    y.axis_iter_mut(Axis(0))
        .into_par_iter()
        .for_each(|mut row| {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            row.zip_mut_with(w, |a, &b| *a = *a * inv * b);
        });
    y
}

/// Unscaled cos and sin tables `[n_pos, d/2]` for positions `pos0 .. pos0 + n_pos`
/// (no `rope_scaling`: the CPU forward uses [`LlamaConfig::rope`]).
pub fn rope_tables(pos0: usize, n_pos: usize, d: usize, base: f64) -> (Array2<f32>, Array2<f32>) {
    Rope::plain(base).tables(pos0, n_pos, d)
}

/// `[L, H*d]` -> `[H, L, d]`.
fn split_heads(x: Array2<f32>, h: usize, d: usize) -> Result<Array3<f32>> {
    let l = x.nrows();
    let x = x
        .into_shape_with_order((l, h, d))
        .map_err(|e| TcaError::Shape(e.to_string()))?;
    Ok(x.permuted_axes([1, 0, 2]).as_standard_layout().into_owned())
}

/// `[H, L, d]` -> `[L, H*d]`.
fn merge_heads(x: Array3<f32>) -> Result<Array2<f32>> {
    let (h, l, d) = x.dim();
    x.permuted_axes([1, 0, 2])
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((l, h * d))
        .map_err(|e| TcaError::Shape(e.to_string()))
}

/// `x += b` on every row.
fn add_bias(x: &mut Array2<f32>, b: Option<&Array1<f32>>) {
    if let Some(b) = b {
        *x += b;
    }
}

/// `x · wᵀ + b`.
fn affine(x: ArrayView2<f32>, w: &Array2<f32>, b: Option<&Array1<f32>>) -> Array2<f32> {
    let mut y = linear(x, w);
    add_bias(&mut y, b);
    y
}

fn silu_mul(gate: &mut Array2<f32>, up: &Array2<f32>) {
    ndarray::Zip::from(gate).and(up).par_for_each(|g, &u| {
        *g = *g / (1.0 + (-*g).exp()) * u;
    });
}

/// RoPE scaling from GGUF metadata (`llama.rope.scaling.type`: none or linear).
fn gguf_rope_scaling(g: &GgufFile) -> Result<RopeScaling> {
    let Ok(kind) = g.meta_str("llama.rope.scaling.type") else {
        return Ok(RopeScaling::None);
    };
    match kind {
        "none" => Ok(RopeScaling::None),
        "linear" => {
            let factor = g.meta_f64("llama.rope.scaling.factor")?;
            if !(factor.is_finite() && factor > 0.0) {
                return Err(fmt_err(g, format!("RoPE scaling factor {factor}")));
            }
            Ok(RopeScaling::Linear { factor })
        }
        other => Err(fmt_err(
            g,
            format!("RoPE scaling {other:?} in a GGUF is not supported (none, linear)"),
        )),
    }
}

impl Llama {
    /// Build the model from a parsed GGUF with `general.architecture = "llama"`.
    pub fn from_gguf(g: &GgufFile) -> Result<Llama> {
        let arch = g.meta_str("general.architecture")?;
        if arch != "llama" {
            return Err(fmt_err(
                g,
                format!("architecture {arch:?} is not supported (only llama)"),
            ));
        }
        let n_heads = g.meta_usize("llama.attention.head_count")?;
        let hidden = g.meta_usize("llama.embedding_length")?;
        let config = LlamaConfig {
            n_layers: g.meta_usize("llama.block_count")?,
            n_heads,
            n_kv_heads: g.meta_usize("llama.attention.head_count_kv")?,
            head_dim: match g.meta_usize("llama.attention.key_length") {
                Ok(d) => d,
                Err(_) => hidden.checked_div(n_heads).unwrap_or(0),
            },
            hidden,
            ffn: g.meta_usize("llama.feed_forward_length")?,
            context: g.meta_usize("llama.context_length")?,
            vocab: g.meta_str_array("tokenizer.ggml.tokens")?.len(),
            rope_base: g.meta_f64("llama.rope.freq_base").unwrap_or(10000.0),
            rope_scaling: gguf_rope_scaling(g)?,
            rms_eps: g.meta_f64("llama.attention.layer_norm_rms_epsilon")? as f32,
        };
        let c = &config;
        c.validate().map_err(|m| fmt_err(g, m))?;
        if g.tensor_info("rope_freqs.weight").is_some() {
            return Err(fmt_err(
                g,
                "per-frequency RoPE factors (rope_freqs.weight) are not supported".into(),
            ));
        }
        if let Ok(rd) = g.meta_usize("llama.rope.dimension_count") {
            if rd != c.head_dim {
                return Err(fmt_err(
                    g,
                    format!(
                        "partial RoPE ({rd} of {} dims) is not supported",
                        c.head_dim
                    ),
                ));
            }
        }
        let (d, hq, hkv) = (c.head_dim, c.n_heads, c.n_kv_heads);
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            layers.push(Layer {
                attn_norm: vector(g, &p("attn_norm"), c.hidden)?,
                wq: matrix(g, &p("attn_q"), hq * d, c.hidden)?,
                wk: matrix(g, &p("attn_k"), hkv * d, c.hidden)?,
                wv: matrix(g, &p("attn_v"), hkv * d, c.hidden)?,
                wo: matrix(g, &p("attn_output"), c.hidden, hq * d)?,
                bq: None,
                bk: None,
                bv: None,
                bo: None,
                ffn_norm: vector(g, &p("ffn_norm"), c.hidden)?,
                w_gate: matrix(g, &p("ffn_gate"), c.ffn, c.hidden)?,
                w_up: matrix(g, &p("ffn_up"), c.ffn, c.hidden)?,
                w_down: matrix(g, &p("ffn_down"), c.hidden, c.ffn)?,
            });
        }
        let tok_embd = matrix(g, "token_embd.weight", c.vocab, c.hidden)?;
        let output = match g.tensor_info("output.weight") {
            Some(_) => Some(matrix(g, "output.weight", c.vocab, c.hidden)?),
            None => None,
        };
        Ok(Llama {
            out_norm: vector(g, "output_norm.weight", c.hidden)?,
            config,
            tok_embd,
            layers,
            output,
        })
    }

    /// Checks that `tokens` is non-empty, in the vocabulary, and that `tokens.len() +
    /// extra` fits the context.
    pub fn check_tokens(&self, tokens: &[u32], extra: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(TcaError::Invalid("no tokens to run".into()));
        }
        let n = tokens.len().saturating_add(extra);
        if n > self.config.context {
            return Err(TcaError::Invalid(format!(
                "{n} tokens exceed the model's context of {}",
                self.config.context
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.config.vocab) {
            return Err(TcaError::Invalid(format!(
                "token id {t} outside the vocabulary of {}",
                self.config.vocab
            )));
        }
        Ok(())
    }

    fn embed(&self, tokens: &[u32]) -> Array2<f32> {
        let mut x = Array2::<f32>::zeros((tokens.len(), self.config.hidden));
        for (mut row, &t) in x.axis_iter_mut(Axis(0)).zip(tokens) {
            row.assign(&self.tok_embd.row(t as usize));
        }
        x
    }

    fn output_matrix(&self) -> &Array2<f32> {
        self.output.as_ref().unwrap_or(&self.tok_embd)
    }

    /// Run the layers over `tokens` (positions 0..L). Returns the final residual
    /// stream `[L, hidden]` (before the output norm), or `None` when the hook's last
    /// layer was reached before the end.
    fn run_layers(
        &self,
        tokens: &[u32],
        policy: &dyn AttentionPolicy,
        mut hook: Option<&mut dyn QkvHook>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Option<Array2<f32>>> {
        self.check_tokens(tokens, 0)?;
        let c = &self.config;
        let l = tokens.len();
        if let Some(cache) = cache.as_deref() {
            if cache.capacity() < l || cache.k.len() != c.n_layers {
                return Err(TcaError::Invalid(format!(
                    "KV cache of capacity {} cannot hold {l} positions",
                    cache.capacity()
                )));
            }
        }
        let stop = hook.as_deref().and_then(|h| h.last_layer());
        if let Some(s) = stop {
            if s >= c.n_layers {
                return Err(TcaError::Invalid(format!(
                    "layer {s} asked for; the model has layers 0..{}",
                    c.n_layers - 1
                )));
            }
        }
        let (d, hq, hkv) = (c.head_dim, c.n_heads, c.n_kv_heads);
        let (cos, sin) = c.rope().tables(0, l, d);
        let mut x = self.embed(tokens);
        for (li, layer) in self.layers.iter().enumerate() {
            let xn = rms_norm(x.view(), &layer.attn_norm, c.rms_eps);
            let mut q = affine(xn.view(), &layer.wq, layer.bq.as_ref());
            let mut k = affine(xn.view(), &layer.wk, layer.bk.as_ref());
            let v = affine(xn.view(), &layer.wv, layer.bv.as_ref());
            drop(xn);
            apply_rope(&mut q, d, &cos, &sin);
            apply_rope(&mut k, d, &cos, &sin);
            let q3 = split_heads(q, hq, d)?;
            let k3 = split_heads(k, hkv, d)?;
            let v3 = split_heads(v, hkv, d)?;
            if let Some(h) = hook.as_deref_mut() {
                h.record(li, q3.view(), k3.view(), v3.view())?;
            }
            if stop == Some(li) {
                return Ok(None);
            }
            if let Some(cache) = cache.as_deref_mut() {
                cache.k[li].slice_mut(s![.., 0..l, ..]).assign(&k3);
                cache.v[li].slice_mut(s![.., 0..l, ..]).assign(&v3);
            }
            let o3 = policy.prefill(li, q3.view(), k3.view(), v3.view())?;
            if o3.dim() != q3.dim() {
                return Err(TcaError::Shape(format!(
                    "attention policy returned {:?} for q {:?} at layer {li}",
                    o3.dim(),
                    q3.dim()
                )));
            }
            drop((q3, k3, v3));
            let o = merge_heads(o3)?;
            x += &affine(o.view(), &layer.wo, layer.bo.as_ref());
            drop(o);
            let xn = rms_norm(x.view(), &layer.ffn_norm, c.rms_eps);
            let mut gate = linear(xn.view(), &layer.w_gate);
            let up = linear(xn.view(), &layer.w_up);
            drop(xn);
            silu_mul(&mut gate, &up);
            drop(up);
            x += &linear(gate.view(), &layer.w_down);
        }
        if let Some(cache) = cache {
            cache.len = l;
        }
        Ok(Some(x))
    }

    /// Final-normed hidden states `[L, hidden]` of a prefill over `tokens`.
    pub fn prefill_hidden(
        &self,
        tokens: &[u32],
        policy: &dyn AttentionPolicy,
        hook: Option<&mut dyn QkvHook>,
        cache: Option<&mut KvCache>,
    ) -> Result<Array2<f32>> {
        let hook_stops = hook.as_ref().and_then(|h| h.last_layer()).is_some();
        if hook_stops {
            return Err(TcaError::Invalid(
                "a hook that stops early cannot be used to compute hidden states".into(),
            ));
        }
        let x = self
            .run_layers(tokens, policy, hook, cache)?
            .ok_or_else(|| TcaError::Invalid("forward pass stopped early".into()))?;
        Ok(rms_norm(x.view(), &self.out_norm, self.config.rms_eps))
    }

    /// Logits `[n, vocab]` of final-normed hidden states `[n, hidden]`.
    pub fn logits(&self, hidden: ArrayView2<f32>) -> Array2<f32> {
        linear(hidden, self.output_matrix())
    }

    /// Prefill over `tokens` with an attention policy: logits `[L, vocab]`
    /// (row i predicts token i + 1). At 8K tokens this is 1.6 GB of f32; use
    /// [`Llama::score`] for perplexity.
    pub fn prefill(&self, tokens: &[u32], policy: &dyn AttentionPolicy) -> Result<Array2<f32>> {
        let h = self.prefill_hidden(tokens, policy, None, None)?;
        Ok(self.logits(h.view()))
    }

    /// Post-RoPE Q `[Hq, L, d]`, K and V `[Hkv, L, d]` of the given layers (the
    /// forward pass stops after the last of them).
    pub fn capture(&self, tokens: &[u32], layers: &[usize]) -> Result<Capture> {
        if layers.is_empty() {
            return Err(TcaError::Invalid("no layers to capture".into()));
        }
        let mut cap = Capture::new(layers);
        self.run_layers(tokens, &Exact::default(), Some(&mut cap), None)?;
        Ok(cap)
    }

    /// Negative log-likelihood and top-1 hit of every target `tokens[t]`,
    /// `t = max(first_target, 1) .. L`, given `tokens[..t]`, in one prefill with
    /// `policy`. The output projection runs in row blocks, so no `[L, vocab]` array
    /// is ever held.
    pub fn score(
        &self,
        tokens: &[u32],
        policy: &dyn AttentionPolicy,
        first_target: usize,
    ) -> Result<Score> {
        let first = first_target.max(1);
        if first >= tokens.len() {
            return Err(TcaError::Invalid(format!(
                "nothing to score: first target {first} but only {} tokens",
                tokens.len()
            )));
        }
        let h = self.prefill_hidden(tokens, policy, None, None)?;
        // Row i of h predicts token i + 1.
        let rows = h.slice(s![first - 1..tokens.len() - 1, ..]);
        let targets = &tokens[first..];
        let w = self.output_matrix();
        const CHUNK: usize = 64;
        let parts: Vec<(Vec<f64>, Vec<bool>, Vec<u32>)> = rows
            .axis_chunks_iter(Axis(0), CHUNK)
            .into_par_iter()
            .zip(targets.par_chunks(CHUNK))
            .map(|(hc, tc)| {
                let logits = hc.dot(&w.t());
                let mut nll = Vec::with_capacity(tc.len());
                let mut hit = Vec::with_capacity(tc.len());
                let mut arg = Vec::with_capacity(tc.len());
                for (row, &t) in logits.axis_iter(Axis(0)).zip(tc) {
                    let (mut best, mut best_i) = (f32::NEG_INFINITY, 0usize);
                    for (i, &v) in row.iter().enumerate() {
                        if v > best {
                            best = v;
                            best_i = i;
                        }
                    }
                    let z: f64 = row.iter().map(|&v| ((v - best) as f64).exp()).sum();
                    let lse = best as f64 + z.ln();
                    nll.push(lse - row[t as usize] as f64);
                    hit.push(best_i == t as usize);
                    arg.push(best_i as u32);
                }
                (nll, hit, arg)
            })
            .collect();
        let mut score = Score {
            first_target: first,
            nll: Vec::with_capacity(targets.len()),
            correct: Vec::with_capacity(targets.len()),
            argmax: Vec::with_capacity(targets.len()),
        };
        for (n, c, a) in parts {
            score.nll.extend(n);
            score.correct.extend(c);
            score.argmax.extend(a);
        }
        Ok(score)
    }

    /// Fill `cache` with a prefill over `tokens` (exact attention unless `policy` says
    /// otherwise; the cache keeps every position's K and V) and return the logits of
    /// the last position.
    pub fn prefill_cache(
        &self,
        tokens: &[u32],
        policy: &dyn AttentionPolicy,
        cache: &mut KvCache,
    ) -> Result<Array1<f32>> {
        let h = self.prefill_hidden(tokens, policy, None, Some(cache))?;
        let last = h.slice(s![h.nrows() - 1..h.nrows(), ..]);
        Ok(self.logits(last).row(0).to_owned())
    }

    /// One decoding step with exact attention over the cache: appends `token` at
    /// position `cache.len()` and returns the logits predicting the next token.
    pub fn decode_step(&self, token: u32, cache: &mut KvCache) -> Result<Array1<f32>> {
        let c = &self.config;
        if cache.len >= cache.capacity() || cache.k.len() != c.n_layers {
            return Err(TcaError::Invalid(format!(
                "KV cache full ({} of {} positions)",
                cache.len,
                cache.capacity()
            )));
        }
        self.decode_step_with(token, cache)
    }

    /// One decoding step with any [`DecodeAttention`]: runs `token` at position
    /// `attn.position()` through every layer (the attention appends its key and value
    /// and attends over what it holds), then calls `attn.advance()`; returns the logits
    /// predicting the next token.
    pub fn decode_step_with(
        &self,
        token: u32,
        attn: &mut dyn DecodeAttention,
    ) -> Result<Array1<f32>> {
        let c = &self.config;
        let pos = attn.position();
        self.check_tokens(&[token], pos)?;
        let d = c.head_dim;
        let (cos, sin) = c.rope().tables(pos, 1, d);
        let mut x = self.embed(&[token]);
        for (li, layer) in self.layers.iter().enumerate() {
            let xn = rms_norm(x.view(), &layer.attn_norm, c.rms_eps);
            let mut q = affine(xn.view(), &layer.wq, layer.bq.as_ref());
            let mut k = affine(xn.view(), &layer.wk, layer.bk.as_ref());
            let v = affine(xn.view(), &layer.wv, layer.bv.as_ref());
            apply_rope(&mut q, d, &cos, &sin);
            apply_rope(&mut k, d, &cos, &sin);
            let o = attn.attend(li, q.row(0), k.row(0), v.row(0))?;
            if o.len() != c.n_heads * d {
                return Err(TcaError::Shape(format!(
                    "decode attention returned {} values for {} query heads of dim {d}",
                    o.len(),
                    c.n_heads
                )));
            }
            let o = o.insert_axis(Axis(0));
            x += &affine(o.view(), &layer.wo, layer.bo.as_ref());
            let xn = rms_norm(x.view(), &layer.ffn_norm, c.rms_eps);
            let mut gate = linear(xn.view(), &layer.w_gate);
            let up = linear(xn.view(), &layer.w_up);
            silu_mul(&mut gate, &up);
            x += &linear(gate.view(), &layer.w_down);
        }
        attn.advance();
        let h = rms_norm(x.view(), &self.out_norm, c.rms_eps);
        Ok(self.logits(h.view()).row(0).to_owned())
    }

    /// Greedy decoding: prefill `prompt` with `policy`, then up to `max_new` tokens
    /// with exact attention over the KV cache, stopping after `eos` if given.
    pub fn generate_greedy(
        &self,
        prompt: &[u32],
        max_new: usize,
        policy: &dyn AttentionPolicy,
        eos: Option<u32>,
    ) -> Result<Vec<u32>> {
        self.check_tokens(prompt, max_new.saturating_sub(1))?;
        // check_tokens bounds prompt.len() + max_new - 1 by the context.
        let mut cache = KvCache::new(&self.config, prompt.len() + max_new);
        let mut logits = self.prefill_cache(prompt, policy, &mut cache)?;
        let mut out = Vec::with_capacity(max_new);
        for step in 0..max_new {
            let next = argmax(logits.view());
            out.push(next);
            if Some(next) == eos || step + 1 == max_new {
                break;
            }
            logits = self.decode_step(next, &mut cache)?;
        }
        Ok(out)
    }
}

/// Index of the largest value (first one on ties).
pub fn argmax(x: ndarray::ArrayView1<f32>) -> u32 {
    let mut best = (f32::NEG_INFINITY, 0usize);
    for (i, &v) in x.iter().enumerate() {
        if v > best.0 {
            best = (v, i);
        }
    }
    best.1 as u32
}

/// One layer's weights, borrowed (matrices `[out, in]`, row-major), for other backends.
pub struct LayerWeights<'a> {
    pub attn_norm: &'a Array1<f32>,
    pub wq: &'a Array2<f32>,
    pub wk: &'a Array2<f32>,
    pub wv: &'a Array2<f32>,
    pub wo: &'a Array2<f32>,
    /// Biases of q, k (rows in the adjacent-pairs order, like `wq`, `wk`), v and o;
    /// `None` for SmolLM2 and llama without `attention_bias`, q/k/v for qwen2.
    pub bq: Option<&'a Array1<f32>>,
    pub bk: Option<&'a Array1<f32>>,
    pub bv: Option<&'a Array1<f32>>,
    pub bo: Option<&'a Array1<f32>>,
    pub ffn_norm: &'a Array1<f32>,
    pub w_gate: &'a Array2<f32>,
    pub w_up: &'a Array2<f32>,
    pub w_down: &'a Array2<f32>,
}

impl Llama {
    /// The weights of layer `i` (`None` past the last layer).
    pub fn layer_weights(&self, i: usize) -> Option<LayerWeights<'_>> {
        self.layers.get(i).map(|l| LayerWeights {
            attn_norm: &l.attn_norm,
            wq: &l.wq,
            wk: &l.wk,
            wv: &l.wv,
            wo: &l.wo,
            bq: l.bq.as_ref(),
            bk: l.bk.as_ref(),
            bv: l.bv.as_ref(),
            bo: l.bo.as_ref(),
            ffn_norm: &l.ffn_norm,
            w_gate: &l.w_gate,
            w_up: &l.w_up,
            w_down: &l.w_down,
        })
    }

    /// The token embedding `[vocab, hidden]`.
    pub fn token_embedding(&self) -> &Array2<f32> {
        &self.tok_embd
    }

    /// The final RMSNorm's weight `[hidden]`.
    pub fn output_norm(&self) -> &Array1<f32> {
        &self.out_norm
    }

    /// The output head `[vocab, hidden]` (the token embedding when tied).
    pub fn output_head(&self) -> &Array2<f32> {
        self.output_matrix()
    }
}
