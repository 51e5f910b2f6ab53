//! The per-query certificate (docs/theorem.md, "The certificate"): from the kept keys'
//! logits and the block summaries alone, an upper bound gamma_hat_i >= gamma_i on the
//! omitted softmax mass, without the dense pass.
//!
//! For query i with key set S_i, kept logits a_ij (j in S_i), running max m_i and
//! Z_in = sum_{j in S_i} exp(a_ij - m_i): every chunk B of the keys with n_B > 0 visible
//! omitted keys (j <= i, j not in S_i) contributes n_B exp(ub_B - m_i) to U_i, ub_B an
//! upper bound on its logits ([`BlockSummaries::logit_bound`]), and
//! gamma_hat_i = U_i / (Z_in + U_i). The visible keys of the chunk holding i are a
//! subset of the chunk, so the chunk's bound covers them; keys > i are never counted.
//! In logs: lse_in = m_i + ln Z_in, lse_out = m_i + ln U_i, and
//! gamma_hat_i = 1 / (1 + exp(lse_in - lse_out)).
//! Cost: O(|S_i| d) for the kept logits (the sparse pass computes them anyway) plus
//! O(d) per chunk with an omitted key, instead of O(i d).

use super::block_bounds::{BlockSummaries, BoundKind};
use super::rotation::Rotation;
use crate::data::Heads;
use crate::error::{Result, TcaError};
use crate::reference::softmax::scores;
use crate::selection::sparse::check_shape;
use crate::selection::KeySets;
use ndarray::ArrayView1;
use rayon::prelude::*;

/// The certificate of one (query head, query).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Certificate {
    pub head: usize,
    pub query: usize,
    /// gamma_hat_i >= gamma_i, rounded up ([`gamma_hat`]).
    pub gamma_hat: f64,
    /// Running max m_i of the kept logits (-inf when S_i is empty).
    pub max_in: f64,
    /// ln Z_in + m_i: the log-sum-exp of the kept logits.
    pub lse_in: f64,
    /// ln U_i + m_i: the log of the bound on sum_{omitted j} exp(a_ij) (-inf: none).
    pub lse_out: f64,
    /// |S_i|.
    pub kept: usize,
    /// Visible keys not in S_i: i + 1 - |S_i|.
    pub omitted: usize,
    /// Chunks whose bound was evaluated (those with an omitted key).
    pub bounded_blocks: usize,
}

/// Fixed relative rounding-up of gamma_hat; see [`rounding`].
pub const REL: f64 = 1e-9;

/// The relative rounding-up applied to gamma_hat at a query with L visible keys:
/// max(1e-9, 16 * 2^-52 (L + 16 + max(|lse_in|, |lse_out|))). Both gamma_i (a sum of
/// L softmax terms, each an exp of a difference of logits) and gamma_hat (two
/// log-sum-exps and one exp) are computed to a relative error below
/// (2 L + 30) 2^-53 + 4 max|lse| 2^-53, which this dominates; the logits' own rounding
/// is in the block bounds' slack ([`super::block_bounds::SLACK`]).
pub fn rounding(len: usize, lse_in: f64, lse_out: f64) -> f64 {
    let mag = [lse_in, lse_out]
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f64, |m, x| m.max(x.abs()));
    REL.max(16.0 * f64::EPSILON * (len as f64 + 16.0 + mag))
}

/// gamma_hat = U / (Z_in + U) from lse_in = ln Z_in + m and lse_out = ln U + m, for a
/// query with `len` visible keys, rounded up: times (1 + [`rounding`]) plus the smallest
/// normal f64 (2^-1022, which covers the absolute rounding of subnormal softmax terms
/// in gamma_i). 0 exactly when nothing is omitted (lse_out = -inf); may exceed 1 by the
/// rounding-up when nearly everything is omitted.
pub fn gamma_hat(lse_in: f64, lse_out: f64, len: usize) -> f64 {
    if lse_out == f64::NEG_INFINITY {
        return 0.0;
    }
    let g = if lse_in == f64::NEG_INFINITY {
        1.0
    } else {
        let x = lse_out - lse_in;
        if x >= 0.0 {
            1.0 / (1.0 + (-x).exp())
        } else {
            let e = x.exp();
            e / (1.0 + e)
        }
    };
    g * (1.0 + rounding(len, lse_in, lse_out)) + f64::MIN_POSITIVE
}

/// log sum_n exp(x_n) (-inf for none).
pub fn log_sum_exp(x: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = x.clone().fold(f64::NEG_INFINITY, f64::max);
    if m.is_infinite() {
        return m;
    }
    m + x.map(|v| (v - m).exp()).sum::<f64>().ln()
}

/// A block-score bound: (summaries, chunk t, q, ||q||_2, scale) -> an upper bound on the
/// chunk's logits. Tests pass an unsound one to show the check catches it.
pub type BoundFn = dyn Fn(&BlockSummaries, usize, ArrayView1<'_, f64>, f64, f64) -> f64 + Sync;

enum Bound<'a> {
    Kind(BoundKind),
    Custom(&'a BoundFn),
}

/// The chunk of query i's visible omitted keys: (chunk t, n_t omitted keys,
/// ln n_t + ub_t).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OmittedBlock {
    pub block: usize,
    pub omitted: usize,
    pub log_mass: f64,
}

/// One KV head's summaries: over all keys of each chunk and, where some keys are
/// held (kept by every query that sees them under the key sets the certifier was made
/// for, e.g. TCA's S_G), over the chunk's other keys.
struct HeadSummaries {
    full: BlockSummaries,
    /// Summaries over the keys not held; None when no key is held.
    rest: Option<BlockSummaries>,
    held: Vec<bool>,
    /// held_prefix[j]: held keys in [0, j).
    held_prefix: Vec<usize>,
    rotation: Option<Rotation>,
}

/// Block summaries of every KV head of a layer and the bound that reads them: certifies
/// any key sets over that layer.
///
/// Heavy hitters: a chunk's bound covers all its keys, so one kept key with a large logit
/// (an attention sink) would be charged to every omitted key of its chunk. A certifier
/// made for key sets ([`Certifier::for_key_sets`]) therefore also summarises each chunk
/// without the keys the last query of every query head of the group keeps (for TCA:
/// S_G and the last window), and bounds a chunk by those summaries whenever none of
/// the chunk's held keys is omitted at the query; otherwise by the full chunk. Either
/// way every omitted key is covered, whatever the key sets certified.
pub struct Certifier<'a> {
    heads: &'a Heads,
    kv: Vec<HeadSummaries>,
    bound: Bound<'a>,
}

impl<'a> Certifier<'a> {
    /// Summaries in chunks of `sub_block` >= 1 for every KV head of `heads`: O(L d Hkv)
    /// (plus O(L d^2) per KV head for a rotated bound).
    pub fn new(heads: &'a Heads, kind: BoundKind, sub_block: usize) -> Result<Self> {
        Self::build(heads, Bound::Kind(kind), sub_block, None)
    }

    /// As [`Certifier::new`], with the keys held by `sel` summarised apart (see the type
    /// docs); `sel` must be made for `heads`.
    pub fn for_key_sets(
        heads: &'a Heads,
        kind: BoundKind,
        sub_block: usize,
        sel: &dyn KeySets,
    ) -> Result<Self> {
        check_shape(heads, sel)?;
        let l = heads.len();
        let held = (0..heads.num_kv_heads())
            .map(|kv| {
                let mut count = vec![0usize; l];
                let hs = heads.q_heads_of(kv);
                let n = hs.len();
                for h in hs {
                    for j in sel.keys(h, l - 1) {
                        if j < l {
                            count[j] += 1;
                        }
                    }
                }
                count.into_iter().map(|c| c == n).collect()
            })
            .collect();
        Self::build(heads, Bound::Kind(kind), sub_block, Some(held))
    }

    /// With a bound of the caller's (no soundness is assumed or checked here).
    pub fn with_bound(heads: &'a Heads, bound: &'a BoundFn, sub_block: usize) -> Result<Self> {
        Self::build(heads, Bound::Custom(bound), sub_block, None)
    }

    fn build(
        heads: &'a Heads,
        bound: Bound<'a>,
        sub_block: usize,
        held: Option<Vec<Vec<bool>>>,
    ) -> Result<Self> {
        if sub_block == 0 {
            return Err(TcaError::Invalid(
                "certificate sub-block size must be at least 1".into(),
            ));
        }
        let rotated = matches!(bound, Bound::Kind(k) if k.rotated());
        let l = heads.len();
        let kv = (0..heads.num_kv_heads())
            .into_par_iter()
            .map(|kv| {
                let k = heads.k(kv);
                let held_kv = held.as_ref().map(|h| h[kv].clone());
                let rotation = rotated.then(|| Rotation::principal_axes(k));
                let rk = rotation.as_ref().map(|r| r.rotate_rows(k));
                let keys = rk.as_ref().map_or(k, |x| x.view());
                let make = |skip: Option<&[bool]>| {
                    let mut s = BlockSummaries::new_masked(keys, sub_block, skip);
                    if rotation.is_some() {
                        s.set_key_norms(k, skip);
                    }
                    s
                };
                let any_held = held_kv.as_ref().is_some_and(|h| h.iter().any(|&x| x));
                let rest = any_held.then(|| make(held_kv.as_deref()));
                let held_v = held_kv.unwrap_or_else(|| vec![false; l]);
                let mut held_prefix = vec![0usize; l + 1];
                for j in 0..l {
                    held_prefix[j + 1] = held_prefix[j] + usize::from(held_v[j]);
                }
                HeadSummaries {
                    full: make(None),
                    rest,
                    held: held_v,
                    held_prefix,
                    rotation,
                }
            })
            .collect();
        Ok(Certifier { heads, kv, bound })
    }

    /// The layer this certifier reads.
    pub fn heads(&self) -> &'a Heads {
        self.heads
    }

    /// The summaries over all keys of KV head `kv`.
    pub fn summaries(&self, kv: usize) -> &BlockSummaries {
        &self.kv[kv].full
    }

    /// Query i's chunks with visible omitted keys under `keys` (ascending, unique,
    /// within [0, i]; an error otherwise), each with ln n_t + ub_t.
    pub fn omitted_blocks(&self, h: usize, i: usize, keys: &[usize]) -> Result<Vec<OmittedBlock>> {
        let hs = &self.kv[self.heads.kv_of(h)];
        let s = hs.full.size();
        let mut kept = vec![0usize; i / s + 1];
        let mut kept_held = vec![0usize; i / s + 1];
        let mut prev: Option<usize> = None;
        for &j in keys {
            if j > i || prev.is_some_and(|p| p >= j) {
                return Err(TcaError::Invalid(format!(
                    "key set of head {h}, query {i} is not ascending within [0, {i}] (key {j})"
                )));
            }
            prev = Some(j);
            kept[j / s] += 1;
            kept_held[j / s] += usize::from(hs.held[j]);
        }
        let q = self.heads.q(h);
        let q = q.row(i);
        let qnorm = q.dot(&q).sqrt();
        let scale = self.heads.scale();
        // In the principal axes: V^T q, and the rotation's allowance per chunk.
        let rot = hs.rotation.as_ref();
        let qr = rot.map(|r| r.rotate(q));
        let (qb, qbnorm) = match &qr {
            Some(x) => (x.view(), x.dot(x).sqrt()),
            None => (q, qnorm),
        };
        Ok(kept
            .iter()
            .zip(&kept_held)
            .enumerate()
            .filter_map(|(t, (&k, &kh))| {
                let (start, end) = (t * s, ((t + 1) * s).min(i + 1));
                let omitted = end - start - k;
                let held_omitted = hs.held_prefix[end] - hs.held_prefix[start] - kh;
                // Every omitted key is outside the held set: the rest summary covers them.
                let sums = match &hs.rest {
                    Some(r) if held_omitted == 0 => r,
                    _ => &hs.full,
                };
                (omitted > 0).then(|| {
                    let ub = match &self.bound {
                        Bound::Kind(kind) => {
                            sums.logit_bound(t, qb, qbnorm, scale, *kind)
                                + rot.map_or(0.0, |r| scale * r.eps() * qnorm * sums.key_norm(t))
                        }
                        Bound::Custom(f) => f(sums, t, q, qnorm, scale),
                    };
                    OmittedBlock {
                        block: t,
                        omitted,
                        log_mass: (omitted as f64).ln() + ub,
                    }
                })
            })
            .collect())
    }

    /// The logits a_ij of query i of query head h for the keys `keys`.
    pub fn logits(&self, h: usize, i: usize, keys: impl IntoIterator<Item = usize>) -> Vec<f64> {
        scores(
            self.heads.q(h).row(i),
            self.heads.k(self.heads.kv_of(h)),
            keys,
            self.heads.scale(),
        )
    }

    /// The certificate of query i of query head h with key set `keys`.
    pub fn query(&self, h: usize, i: usize, keys: &[usize]) -> Result<Certificate> {
        Ok(self.query_with_blocks(h, i, keys)?.0)
    }

    /// [`Certifier::query`] and the omitted chunks it summed.
    pub fn query_with_blocks(
        &self,
        h: usize,
        i: usize,
        keys: &[usize],
    ) -> Result<(Certificate, Vec<OmittedBlock>)> {
        let a = self.logits(h, i, keys.iter().copied());
        let max_in = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        self.from_sparse_pass(h, i, keys, max_in, log_sum_exp(a.iter().copied()))
    }

    /// The certificate from what a sparse pass over `keys` already has: its running max
    /// m_i and its log-sum-exp lse_in = m_i + ln Z_in (computed exactly as
    /// [`log_sum_exp`] of the kept logits for the f64 guarantee); only the omitted
    /// chunks' bounds are evaluated here.
    pub fn from_sparse_pass(
        &self,
        h: usize,
        i: usize,
        keys: &[usize],
        max_in: f64,
        lse_in: f64,
    ) -> Result<(Certificate, Vec<OmittedBlock>)> {
        let blocks = self.omitted_blocks(h, i, keys)?;
        let lse_out = log_sum_exp(blocks.iter().map(|b| b.log_mass));
        let cert = Certificate {
            head: h,
            query: i,
            gamma_hat: gamma_hat(lse_in, lse_out, i + 1),
            max_in,
            lse_in,
            lse_out,
            kept: keys.len(),
            omitted: i + 1 - keys.len(),
            bounded_blocks: blocks.len(),
        };
        Ok((cert, blocks))
    }

    /// Every (query head, query) of the layer under `sel`, in the order h L + i.
    pub fn all(&self, sel: &dyn KeySets) -> Result<Vec<Certificate>> {
        check_shape(self.heads, sel)?;
        let l = self.heads.len();
        (0..self.heads.num_q_heads() * l)
            .into_par_iter()
            .map(|n| {
                let (h, i) = (n / l, n % l);
                self.query(h, i, &sel.keys(h, i))
            })
            .collect()
    }
}

/// gamma_hat_i >= gamma_i for every (query head h, query i) of `heads` under `sel`, in
/// the order h L + i (that of [`crate::bound::audit`]), from chunks of `sub_block` keys
/// and the bound `kind`. Reads only the kept keys' logits and the block summaries.
pub fn certify(
    heads: &Heads,
    sel: &dyn KeySets,
    kind: BoundKind,
    sub_block: usize,
) -> Result<Vec<Certificate>> {
    Certifier::for_key_sets(heads, kind, sub_block, sel)?.all(sel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_hat_is_zero_without_omission_and_monotone() {
        assert_eq!(gamma_hat(3.0, f64::NEG_INFINITY, 10), 0.0);
        assert!(gamma_hat(f64::NEG_INFINITY, 0.0, 10) > 1.0);
        let a = gamma_hat(0.0, -1.0, 10);
        let b = gamma_hat(0.0, -0.5, 10);
        assert!(a < b && b < 1.0);
        // U / (Z + U) with Z = 1, U = e^-1.
        let want = (-1.0f64).exp() / (1.0 + (-1.0f64).exp());
        assert!(a >= want && a <= want * (1.0 + 2e-9));
        // Far below: still positive (covers subnormal softmax terms).
        assert!(gamma_hat(800.0, 0.0, 10) > 0.0);
    }

    #[test]
    fn log_sum_exp_of_nothing_is_minus_infinity() {
        assert_eq!(log_sum_exp(std::iter::empty()), f64::NEG_INFINITY);
        let x = [1000.0, 1000.0];
        assert!((log_sum_exp(x.iter().copied()) - (1000.0 + 2f64.ln())).abs() < 1e-12);
    }
}
