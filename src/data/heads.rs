//! One layer's attention inputs: Q [Hq, L, d], K and V [Hkv, L, d], validated.

use crate::error::{Result, TcaError};
use ndarray::{Array3, ArrayView2};

/// Q, K, V of one layer, f64. Invariants (checked by [`Heads::new`]): Hq = g * Hkv with
/// g >= 1, equal L >= 1 and d >= 1 everywhere, every value finite.
#[derive(Clone, Debug, PartialEq)]
pub struct Heads {
    q: Array3<f64>,
    k: Array3<f64>,
    v: Array3<f64>,
}

impl Heads {
    /// The same heads with every value rounded to bf16 (through f32, round to nearest
    /// even): what the GPU path computes on, so the oracle can see the same inputs.
    /// Errors if a value overflows bf16.
    pub fn rounded_to_bf16(&self) -> Result<Self> {
        let (q, k, v) = self.tensors();
        let r = |a: &Array3<f64>| a.mapv(|x| half::bf16::from_f32(x as f32).to_f64());
        Heads::new(r(q), r(k), r(v))
    }

    /// Validates shapes and values; the error names the tensor and the problem.
    pub fn new(q: Array3<f64>, k: Array3<f64>, v: Array3<f64>) -> Result<Self> {
        let (hq, l, d) = q.dim();
        let (hk, lk, dk) = k.dim();
        if k.dim() != v.dim() {
            return Err(TcaError::Shape(format!(
                "k is {:?} but v is {:?}; they must be equal [Hkv, L, d]",
                k.dim(),
                v.dim()
            )));
        }
        if l == 0 || lk == 0 {
            return Err(TcaError::Shape(
                "sequence length L = 0: nothing to attend".into(),
            ));
        }
        if d == 0 || dk == 0 {
            return Err(TcaError::Shape("head dimension d = 0".into()));
        }
        if hq == 0 || hk == 0 {
            return Err(TcaError::Shape("no heads (Hq = 0 or Hkv = 0)".into()));
        }
        if l != lk {
            return Err(TcaError::Shape(format!(
                "q has L = {l} but k and v have L = {lk}"
            )));
        }
        if d != dk {
            return Err(TcaError::Shape(format!(
                "q has d = {d} but k and v have d = {dk}"
            )));
        }
        if hq % hk != 0 {
            return Err(TcaError::Shape(format!(
                "Hq = {hq} query heads is not a multiple of Hkv = {hk} KV heads (GQA)"
            )));
        }
        for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
            if let Some(((a, b, c), x)) = t.indexed_iter().find(|(_, x)| !x.is_finite()) {
                return Err(TcaError::NonFinite {
                    tensor: name.into(),
                    index: vec![a, b, c],
                    value: *x,
                });
            }
        }
        Ok(Heads { q, k, v })
    }

    /// Query heads Hq.
    pub fn num_q_heads(&self) -> usize {
        self.q.dim().0
    }
    /// KV heads Hkv.
    pub fn num_kv_heads(&self) -> usize {
        self.k.dim().0
    }
    /// GQA group g = Hq / Hkv.
    pub fn group(&self) -> usize {
        self.num_q_heads() / self.num_kv_heads()
    }
    /// Sequence length L.
    pub fn len(&self) -> usize {
        self.q.dim().1
    }
    /// Always false: L >= 1 by construction.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Head dimension d.
    pub fn dim(&self) -> usize {
        self.q.dim().2
    }
    /// The KV head read by query head h: h / g.
    pub fn kv_of(&self, h: usize) -> usize {
        h / self.group()
    }
    /// Query heads of KV head kv: [kv g, (kv + 1) g).
    pub fn q_heads_of(&self, kv: usize) -> std::ops::Range<usize> {
        kv * self.group()..(kv + 1) * self.group()
    }
    /// Q of query head h, [L, d].
    pub fn q(&self, h: usize) -> ArrayView2<'_, f64> {
        self.q.index_axis(ndarray::Axis(0), h)
    }
    /// K of KV head kv, [L, d].
    pub fn k(&self, kv: usize) -> ArrayView2<'_, f64> {
        self.k.index_axis(ndarray::Axis(0), kv)
    }
    /// V of KV head kv, [L, d].
    pub fn v(&self, kv: usize) -> ArrayView2<'_, f64> {
        self.v.index_axis(ndarray::Axis(0), kv)
    }
    /// All of Q, K, V.
    pub fn tensors(&self) -> (&Array3<f64>, &Array3<f64>, &Array3<f64>) {
        (&self.q, &self.k, &self.v)
    }
    /// Softmax scale 1 / sqrt(d).
    pub fn scale(&self) -> f64 {
        1.0 / (self.dim() as f64).sqrt()
    }
    /// The first `n` positions of every head (a prefix of the sequence).
    pub fn prefix(&self, n: usize) -> Result<Heads> {
        if n == 0 || n > self.len() {
            return Err(TcaError::Invalid(format!(
                "prefix length {n} must lie in [1, {}]",
                self.len()
            )));
        }
        let s = ndarray::s![.., ..n, ..];
        Ok(Heads {
            q: self.q.slice(s).to_owned(),
            k: self.k.slice(s).to_owned(),
            v: self.v.slice(s).to_owned(),
        })
    }
}
