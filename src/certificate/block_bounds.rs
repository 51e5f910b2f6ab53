//! Block score bounds: per KV head, summaries of each chunk B_t = [t s, (t + 1) s) of
//! the keys (s the sub-block size; with s dividing b these are sub-blocks of the
//! selection blocks), from which, for any query q, an upper bound on
//! max_{j in B_t} q . k_j / sqrt(d) follows in O(d).
//!
//! - bounding box: lo_c = min_j k_jc, hi_c = max_j k_jc;
//!   q . k_j <= sum_c max(q_c lo_c, q_c hi_c) (Quest's ranking score);
//! - ball: centroid c = mean_j k_j, radius r = max_j ||k_j - c||_2;
//!   q . k_j = q . c + q . (k_j - c) <= q . c + ||q||_2 r (Cauchy-Schwarz; true for any
//!   c, so the rounding of the computed centroid does not matter);
//! - their minimum;
//! - the box, or the minimum, in the principal axes of the KV head's keys
//!   ([`super::rotation`]).
//!
//! Every bound returned is inflated by an absolute rounding slack (see [`SLACK`]), so
//! it also bounds the f64 logits any standard summation computes for the block's keys.

use ndarray::{Array2, ArrayView1, ArrayView2};

/// Which bound on a block's largest logit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BoundKind {
    /// sum_c max(q_c lo_c, q_c hi_c).
    Box,
    /// q . c + ||q||_2 r.
    Ball,
    /// min(box, ball).
    Min,
    /// The box in the KV head's principal axes ([`super::rotation::Rotation`]).
    PcaBox,
    /// min(box, ball), both in the principal axes.
    PcaMin,
}

impl BoundKind {
    pub const ALL: [BoundKind; 5] = [
        BoundKind::Box,
        BoundKind::Ball,
        BoundKind::Min,
        BoundKind::PcaBox,
        BoundKind::PcaMin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BoundKind::Box => "box",
            BoundKind::Ball => "ball",
            BoundKind::Min => "min",
            BoundKind::PcaBox => "pca_box",
            BoundKind::PcaMin => "pca_min",
        }
    }

    /// Whether the bound works in the principal axes of the keys.
    pub fn rotated(self) -> bool {
        matches!(self, BoundKind::PcaBox | BoundKind::PcaMin)
    }

    /// The bound applied to the (rotated, if [`BoundKind::rotated`]) summaries.
    pub fn base(self) -> BoundKind {
        match self {
            BoundKind::PcaBox => BoundKind::Box,
            BoundKind::PcaMin => BoundKind::Min,
            k => k,
        }
    }

    /// Multiply-adds of one evaluation over d dimensions: the box takes two products
    /// per dimension, the ball one, the minimum both; the slacks add one each.
    pub fn macs(self, d: usize) -> usize {
        match self.base() {
            BoundKind::Box => 2 * d + 1 + usize::from(self.rotated()),
            BoundKind::Ball => d + 2,
            _ => 3 * d + 2 + usize::from(self.rotated()),
        }
    }

    /// Multiply-adds once per query: ||q|| (d), and V^T q (d^2) when rotated.
    pub fn query_macs(self, d: usize) -> usize {
        d + if self.rotated() { d * d } else { 0 }
    }
}

/// Rounding slack, in units of 2^-52 times (d + 4) ||q||_2 ||a||_2 / sqrt(d), where a is
/// the block's entrywise largest magnitude a_c = max(|lo_c|, |hi_c|). For any key k_j of
/// the block, sum_c |q_c k_jc| <= ||q||_2 ||a||_2 =: A (Cauchy-Schwarz), so
/// - the logit fl(q . k_j) / sqrt(d) that any summation order computes is within
///   (d + 2) 2^-53 A / sqrt(d) of the exact one;
/// - the computed box is within (d + 1) 2^-53 A / sqrt(d) of the exact box (lo, hi are
///   exact key entries);
/// - the computed ball is within about (5 d + 14) 2^-53 A / sqrt(d) of the exact ball
///   (q . c with |c_c| <= a_c; ||q|| and r each to (d + 2) 2^-53 relative, with
///   r <= ||k_j|| + ||c|| <= 2 ||a||).
///
/// Their sum is below (6 d + 16) 2^-53 A / sqrt(d); 8 (d + 4) 2^-52 A / sqrt(d) covers it
/// with room to spare.
pub const SLACK: f64 = 8.0 * f64::EPSILON;

/// The summaries of one KV head's keys [L, d] in chunks of s.
#[derive(Clone, Debug)]
pub struct BlockSummaries {
    size: usize,
    len: usize,
    lo: Array2<f64>,
    hi: Array2<f64>,
    centroid: Array2<f64>,
    radius: Vec<f64>,
    /// ||a||_2, a_c = max(|lo_c|, |hi_c|).
    amax_norm: Vec<f64>,
    /// max_j ||k_j||_2 over the chunk (of the keys before any rotation).
    key_norm: Vec<f64>,
}

impl BlockSummaries {
    /// Summaries of `k` [L, d] in chunks of `size` >= 1 (the last may be partial):
    /// O(L d) time, O(L d / s) memory.
    pub fn new(k: ArrayView2<'_, f64>, size: usize) -> Self {
        Self::new_masked(k, size, None)
    }

    /// As [`BlockSummaries::new`], over the keys j with `skip[j]` false only (a chunk
    /// whose keys are all skipped has an empty box and must not be bounded).
    pub fn new_masked(k: ArrayView2<'_, f64>, size: usize, skip: Option<&[bool]>) -> Self {
        let size = size.max(1);
        let (len, d) = k.dim();
        let n = len.div_ceil(size);
        let mut lo = Array2::from_elem((n, d), f64::INFINITY);
        let mut hi = Array2::from_elem((n, d), f64::NEG_INFINITY);
        let mut centroid = Array2::zeros((n, d));
        let mut radius = vec![0.0; n];
        let mut amax_norm = vec![0.0; n];
        let mut key_norm = vec![0.0; n];
        for t in 0..n {
            let idx: Vec<usize> = (t * size..((t + 1) * size).min(len))
                .filter(|&j| !skip.is_some_and(|m| m[j]))
                .collect();
            if idx.is_empty() {
                continue;
            }
            let (mut l, mut h, mut c) = (lo.row_mut(t), hi.row_mut(t), centroid.row_mut(t));
            for &j in &idx {
                let r = k.row(j);
                for x in 0..d {
                    l[x] = l[x].min(r[x]);
                    h[x] = h[x].max(r[x]);
                }
                c += &r;
                key_norm[t] = f64::max(key_norm[t], r.dot(&r).sqrt());
            }
            c /= idx.len() as f64;
            radius[t] = idx
                .iter()
                .map(|&j| {
                    let diff = &k.row(j) - &c;
                    diff.dot(&diff).sqrt()
                })
                .fold(0.0, f64::max);
            amax_norm[t] = l
                .iter()
                .zip(h.iter())
                .map(|(a, b)| {
                    let m = a.abs().max(b.abs());
                    m * m
                })
                .sum::<f64>()
                .sqrt();
        }
        BlockSummaries {
            size,
            len,
            lo,
            hi,
            centroid,
            radius,
            amax_norm,
            key_norm,
        }
    }

    /// Replaces max_j ||k_j||_2 per chunk by that of `k` [L, d] over the same keys (the
    /// unrotated keys when the summaries were made from rotated ones).
    pub fn set_key_norms(&mut self, k: ArrayView2<'_, f64>, skip: Option<&[bool]>) {
        self.key_norm = (0..self.num_blocks())
            .map(|t| {
                self.range(t)
                    .filter(|&j| !skip.is_some_and(|m| m[j]))
                    .map(|j| k.row(j).dot(&k.row(j)).sqrt())
                    .fold(0.0, f64::max)
            })
            .collect();
    }

    /// max_j ||k_j||_2 over chunk t.
    pub fn key_norm(&self, t: usize) -> f64 {
        self.key_norm[t]
    }

    /// Sub-block size s.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Number of blocks, ceil(L / s).
    pub fn num_blocks(&self) -> usize {
        self.radius.len()
    }

    /// Positions of block t: [t s, min((t + 1) s, L)).
    pub fn range(&self, t: usize) -> std::ops::Range<usize> {
        t * self.size..((t + 1) * self.size).min(self.len)
    }

    /// Centroid c of block t (exposed for tests of unsound bounds).
    pub fn centroid(&self, t: usize) -> ArrayView1<'_, f64> {
        self.centroid.row(t)
    }

    /// An upper bound on max_{j in block t} of the f64 logit q . k_j * `scale` (exact or
    /// as computed): the bound of `kind` (its [`BoundKind::base`]: the caller rotates
    /// q and the keys) plus the rounding slack. `qnorm` = ||q||_2.
    pub fn logit_bound(
        &self,
        t: usize,
        q: ArrayView1<'_, f64>,
        qnorm: f64,
        scale: f64,
        kind: BoundKind,
    ) -> f64 {
        let boxed = || {
            q.iter()
                .zip(self.lo.row(t))
                .zip(self.hi.row(t))
                .map(|((&qc, &l), &h)| (qc * l).max(qc * h))
                .sum::<f64>()
        };
        let ball = || q.dot(&self.centroid.row(t)) + qnorm * self.radius[t];
        let raw = match kind.base() {
            BoundKind::Box => boxed(),
            BoundKind::Ball => ball(),
            _ => boxed().min(ball()),
        };
        let d = q.len() as f64;
        scale * (raw + SLACK * (d + 4.0) * qnorm * self.amax_norm[t])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn bounds_cover_every_key_and_the_box_is_exact_on_one_key() {
        let k = array![
            [1.0, -2.0],
            [0.5, 3.0],
            [-1.0, 0.0],
            [2.0, 2.0],
            [0.0, -1.0]
        ];
        let s = BlockSummaries::new(k.view(), 2);
        assert_eq!(s.num_blocks(), 3);
        assert_eq!(s.range(2), 4..5);
        let q = array![0.7f64, -1.3];
        let qn: f64 = q.dot(&q).sqrt();
        for t in 0..3 {
            let best = s
                .range(t)
                .map(|j| k.row(j).dot(&q))
                .fold(f64::NEG_INFINITY, f64::max);
            for kind in BoundKind::ALL {
                let ub = s.logit_bound(t, q.view(), qn, 1.0, kind);
                assert!(ub >= best, "{kind:?} block {t}: {ub} < {best}");
            }
        }
        // A block of one key: the box is its score (up to the slack).
        let ub = s.logit_bound(2, q.view(), qn, 1.0, BoundKind::Box);
        assert!((ub - k.row(4).dot(&q)).abs() < 1e-12);
    }
}
