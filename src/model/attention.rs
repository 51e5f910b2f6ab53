//! The pluggable attention of the forward pass.
//!
//! During prefill, each layer hands its post-RoPE queries, keys and values to an
//! [`AttentionPolicy`] and takes back the attention output (before the output
//! projection). [`Exact`] is causal softmax attention; a sparse policy (TCA, a
//! baseline selector) implements the same trait and is passed to
//! [`super::Llama::prefill`] instead.
//!
//! Conventions (the same as the rest of the crate, see docs/algorithm.md):
//! - `q` is `[Hq, L, d]`, `k` and `v` are `[Hkv, L, d]`, `Hq = g * Hkv`; query head `h`
//!   reads KV head `h / g` (GQA);
//! - position `i` may attend to keys `j <= i` (causal), scores are `q_i . k_j / sqrt(d)`;
//! - the returned array is `[Hq, L, d]`: `O_i = sum_j softmax_j(scores) v_j`.
//!
//! A policy built on the f64 reference code can convert its inputs with [`to_heads`]
//! and its output with [`to_f32`].
//!
//! The Q and K given to a policy are in the GGUF's row order: llama.cpp's converter
//! permutes the rows of `attn_q`/`attn_k` so that RoPE rotates adjacent pairs
//! `(2i, 2i+1)`. This permutes the coordinates of every query and key of a head the
//! same way, so all dot products (and hence attention) are unchanged.

use ndarray::{s, Array2, Array3, ArrayView2, ArrayView3, Axis};
use rayon::prelude::*;

use crate::data::Heads;
use crate::error::{Result, TcaError};
use crate::selection::KeySets;

/// Attention used during prefill. Implementations must be `Sync`: the model may call
/// them from a rayon pool, and they may parallelise internally.
pub trait AttentionPolicy: Sync {
    /// Attention output `[Hq, L, d]` of layer `layer` for post-RoPE `q` `[Hq, L, d]`,
    /// `k` `[Hkv, L, d]` and `v` `[Hkv, L, d]` (causal, GQA, scale `1/sqrt(d)`).
    fn prefill(
        &self,
        layer: usize,
        q: ArrayView3<f32>,
        k: ArrayView3<f32>,
        v: ArrayView3<f32>,
    ) -> Result<Array3<f32>>;
}

/// The f64 [`Heads`] of a policy's f32 inputs (validated: shapes, finite values), for
/// policies built on the f64 reference code. Convert the f64 output back with
/// [`to_f32`].
pub fn to_heads(q: ArrayView3<f32>, k: ArrayView3<f32>, v: ArrayView3<f32>) -> Result<Heads> {
    let f = |a: ArrayView3<f32>| a.mapv(f64::from);
    Heads::new(f(q), f(k), f(v))
}

/// An f64 attention output as the f32 array a policy returns.
pub fn to_f32(o: ArrayView3<f64>) -> Array3<f32> {
    o.mapv(|x| x as f32)
}

/// Exact causal softmax attention in f32, blocked over queries and parallel over
/// (head, query block); each row's softmax subtracts its maximum.
#[derive(Debug, Clone, Copy)]
pub struct Exact {
    /// Queries per work item (rows of one score block).
    pub block: usize,
}

impl Default for Exact {
    fn default() -> Self {
        Exact { block: 64 }
    }
}

/// Check the shapes of (q, k, v) and return (Hq, Hkv, L, d).
pub fn check_shapes(
    q: &ArrayView3<f32>,
    k: &ArrayView3<f32>,
    v: &ArrayView3<f32>,
) -> Result<(usize, usize, usize, usize)> {
    let (hq, l, d) = q.dim();
    let (hkv, lk, dk) = k.dim();
    if k.dim() != v.dim() {
        return Err(TcaError::Shape(format!(
            "k {:?} and v {:?} differ",
            k.dim(),
            v.dim()
        )));
    }
    if lk != l || dk != d {
        return Err(TcaError::Shape(format!(
            "q {:?} and k {:?} disagree on length or head dim",
            q.dim(),
            k.dim()
        )));
    }
    if hkv == 0 || hq % hkv != 0 || d == 0 {
        return Err(TcaError::Shape(format!(
            "{hq} query heads are not a multiple of {hkv} KV heads (d = {d})"
        )));
    }
    Ok((hq, hkv, l, d))
}

/// `exp(x)` for `x <= 0`, vectorisable: `2^n * p(r)` with `n = round(x / ln 2)`,
/// `r = x - n ln 2` (two-part `ln 2`), and `p` the degree-7 Taylor polynomial of `e^r`
/// on `|r| <= ln(2)/2` (truncation below 2e-9, relative). Arguments below -87 give 0.
/// Relative error against `f32::exp` stays within a few ulps (tested).
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let live = x >= -87.0;
    let x = x.max(-87.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if live {
        p * scale
    } else {
        0.0
    }
}

/// In-place softmax of each row of `s` over its first `valid(row)` entries; the rest
/// are set to zero.
pub(crate) fn softmax_rows_prefix(s: &mut Array2<f32>, valid: impl Fn(usize) -> usize) {
    for (r, mut row) in s.axis_iter_mut(Axis(0)).enumerate() {
        let n = valid(r).min(row.len());
        let Some(slice) = row.as_slice_mut() else {
            continue;
        };
        let (live, dead) = slice.split_at_mut(n);
        let m = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            // Nothing to attend to (every score masked): the row is zero.
            slice.fill(0.0);
            continue;
        }
        for x in live.iter_mut() {
            *x = exp_nonpos(*x - m);
        }
        // Eight partial sums: vectorisable, and more accurate than one running sum.
        let mut acc = [0f32; 8];
        let mut chunks = live.chunks_exact(8);
        for c in &mut chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += x;
            }
        }
        let sum: f32 = acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
        let inv = 1.0 / sum;
        for x in live.iter_mut() {
            *x *= inv;
        }
        dead.fill(0.0);
    }
}

/// Exact attention of a block of queries at absolute positions `pos0 .. pos0 + nq`
/// against keys `0 .. nk` (causal: query at `p` sees keys `j <= p`).
pub(crate) fn attend_block(
    q: ArrayView2<f32>,
    k: ArrayView2<f32>,
    v: ArrayView2<f32>,
    pos0: usize,
) -> Array2<f32> {
    let d = q.ncols();
    let scale = 1.0 / (d as f32).sqrt();
    let mut s = Array2::<f32>::zeros((q.nrows(), k.nrows()));
    ndarray::linalg::general_mat_mul(scale, &q, &k.t(), 0.0, &mut s);
    softmax_rows_prefix(&mut s, |r| pos0 + r + 1);
    s.dot(&v)
}

impl AttentionPolicy for Exact {
    fn prefill(
        &self,
        _layer: usize,
        q: ArrayView3<f32>,
        k: ArrayView3<f32>,
        v: ArrayView3<f32>,
    ) -> Result<Array3<f32>> {
        let (hq, hkv, _, _) = check_shapes(&q, &k, &v)?;
        let g = hq / hkv;
        Ok(by_query_blocks(&q, self.block, |h, i0, i1| {
            let kv = h / g;
            attend_block(
                q.slice(s![h, i0..i1, ..]),
                k.slice(s![kv, 0..i1, ..]),
                v.slice(s![kv, 0..i1, ..]),
                i0,
            )
        }))
    }
}

/// Runs `f(h, i0, i1)` (the `[i1 - i0, d]` output of query head `h`, rows `i0..i1`) for
/// every block of `block` queries of every head, in parallel, latest blocks (the most
/// keys) first for load balance, and assembles the `[Hq, L, d]` output.
fn by_query_blocks<F>(q: &ArrayView3<f32>, block: usize, f: F) -> Array3<f32>
where
    F: Fn(usize, usize, usize) -> Array2<f32> + Sync,
{
    let (hq, l, d) = q.dim();
    let bq = block.max(1);
    let nblocks = l.div_ceil(bq);
    let mut items: Vec<(usize, usize)> = (0..hq)
        .flat_map(|h| (0..nblocks).map(move |b| (h, b)))
        .collect();
    items.sort_by_key(|&(h, b)| (std::cmp::Reverse(b), h));
    let blocks: Vec<(usize, usize, Array2<f32>)> = items
        .into_par_iter()
        .map(|(h, b)| {
            let i0 = b * bq;
            (h, i0, f(h, i0, (i0 + bq).min(l)))
        })
        .collect();
    let mut out = Array3::<f32>::zeros((hq, l, d));
    for (h, i0, o) in blocks {
        let n = o.nrows();
        out.slice_mut(s![h, i0..i0 + n, ..]).assign(&o);
    }
    out
}

/// Sparse attention over given key sets in f32, the fast path of
/// [`crate::selection::sparse_attention`] (the f64 oracle it is tested against):
/// `O_i = sum_{j in S_i} softmax_{S_i}(q_i . k_j / sqrt(d)) v_j` for `q` `[Hq, L, d]`,
/// `k`, `v` `[Hkv, L, d]`; `[Hq, L, d]` out. Blocked like [`Exact`]: a block of
/// `block` queries scores the union of its rows' key sets with one matrix product,
/// keys outside a row's S_i are masked out, and a row with an empty S_i is zero.
pub fn attend_key_sets(
    q: ArrayView3<f32>,
    k: ArrayView3<f32>,
    v: ArrayView3<f32>,
    sets: &dyn KeySets,
    block: usize,
) -> Result<Array3<f32>> {
    let (hq, hkv, l, d) = check_shapes(&q, &k, &v)?;
    if sets.shape() != (hq, l) {
        return Err(TcaError::Shape(format!(
            "key sets for {:?} (query heads, L) applied to {hq} query heads and L = {l}",
            sets.shape()
        )));
    }
    let g = hq / hkv;
    let scale = 1.0 / (d as f32).sqrt();
    Ok(by_query_blocks(&q, block, |h, i0, i1| {
        let kv = h / g;
        let rows: Vec<Vec<usize>> = (i0..i1).map(|i| sets.keys(h, i)).collect();
        // Union of the block's key sets, ascending (every key is <= i1 - 1).
        let mut member = vec![false; i1];
        for &j in rows.iter().flatten() {
            member[j] = true;
        }
        let union: Vec<usize> = (0..i1).filter(|&j| member[j]).collect();
        let kk = k.slice(s![kv, .., ..]).select(Axis(0), &union);
        let vv = v.slice(s![kv, .., ..]).select(Axis(0), &union);
        let mut sc = Array2::<f32>::zeros((i1 - i0, union.len()));
        ndarray::linalg::general_mat_mul(scale, &q.slice(s![h, i0..i1, ..]), &kk.t(), 0.0, &mut sc);
        for (mut row, keys) in sc.axis_iter_mut(Axis(0)).zip(&rows) {
            // Both lists ascend: walk them together and mask what S_i lacks.
            let mut next = keys.iter().peekable();
            for (x, &j) in row.iter_mut().zip(&union) {
                if next.peek() == Some(&&j) {
                    next.next();
                } else {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        let n = union.len();
        softmax_rows_prefix(&mut sc, |_| n);
        sc.dot(&vv)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive f64 causal GQA attention.
    fn naive(q: &Array3<f32>, k: &Array3<f32>, v: &Array3<f32>) -> Array3<f64> {
        let (hq, l, d) = q.dim();
        let g = hq / k.dim().0;
        let mut out = Array3::<f64>::zeros((hq, l, d));
        for h in 0..hq {
            for i in 0..l {
                let sc: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..d)
                            .map(|x| q[[h, i, x]] as f64 * k[[h / g, j, x]] as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for (j, wj) in w.iter().enumerate() {
                    for x in 0..d {
                        out[[h, i, x]] += wj / z * v[[h / g, j, x]] as f64;
                    }
                }
            }
        }
        out
    }

    fn pseudo(shape: (usize, usize, usize), seed: u64, amp: f32) -> Array3<f32> {
        let mut st = seed;
        Array3::from_shape_fn(shape, |_| {
            st = st
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((st >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * amp
        })
    }

    /// max |got - want| over all entries.
    fn max_err(got: &Array3<f32>, want: &Array3<f64>) -> f64 {
        got.iter()
            .zip(want.iter())
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn exact_matches_naive_f64() {
        let (hq, hkv, l, d) = (6, 2, 37, 8);
        let q = pseudo((hq, l, d), 1, 6.0);
        let k = pseudo((hkv, l, d), 2, 6.0);
        let v = pseudo((hkv, l, d), 3, 2.0);
        let want = naive(&q, &k, &v);
        for block in [1, 5, 64] {
            let got = Exact { block }
                .prefill(0, q.view(), k.view(), v.view())
                .unwrap();
            let err = max_err(&got, &want);
            assert!(err < 1e-5, "block {block}: max error {err}");
        }
    }

    /// Explicit key sets: sets[h][i] ascending within [0, i].
    struct Listed(Vec<Vec<Vec<usize>>>);
    impl KeySets for Listed {
        fn shape(&self) -> (usize, usize) {
            (self.0.len(), self.0[0].len())
        }
        fn keys(&self, h: usize, i: usize) -> Vec<usize> {
            self.0[h][i].clone()
        }
    }

    #[test]
    fn key_sets_match_the_f64_oracle() {
        let (hq, hkv, l, d) = (6, 2, 45, 8);
        let q = pseudo((hq, l, d), 11, 6.0);
        let k = pseudo((hkv, l, d), 12, 6.0);
        let v = pseudo((hkv, l, d), 13, 2.0);
        let mut st = 7u64;
        let sets = Listed(
            (0..hq)
                .map(|_| {
                    (0..l)
                        .map(|i| {
                            // i itself plus a pseudo-random part of 0..i.
                            (0..=i)
                                .filter(|&j| {
                                    st = st.wrapping_mul(6364136223846793005).wrapping_add(1);
                                    j == i || (st >> 61) < 3
                                })
                                .collect()
                        })
                        .collect()
                })
                .collect(),
        );
        let heads = to_heads(q.view(), k.view(), v.view()).unwrap();
        let want = crate::selection::sparse_attention(&heads, &sets).unwrap().o;
        for block in [1, 7, 64] {
            let got = attend_key_sets(q.view(), k.view(), v.view(), &sets, block).unwrap();
            let err = max_err(&got, &want);
            assert!(err < 1e-5, "block {block}: max error {err}");
        }
        // Full causal sets give exact attention; an empty set gives a zero row.
        let mut full = Listed(vec![(0..l).map(|i| (0..=i).collect()).collect(); hq]);
        let exact = Exact::default()
            .prefill(0, q.view(), k.view(), v.view())
            .unwrap();
        let got = attend_key_sets(q.view(), k.view(), v.view(), &full, 16).unwrap();
        let err = got
            .iter()
            .zip(exact.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-5, "full sets: max error {err}");
        full.0[2][5].clear();
        let got = attend_key_sets(q.view(), k.view(), v.view(), &full, 16).unwrap();
        assert!(got.slice(s![2, 5, ..]).iter().all(|&x| x == 0.0));
        assert!(attend_key_sets(
            q.view(),
            k.view(),
            v.view(),
            &Listed(vec![vec![vec![0]]]),
            4
        )
        .is_err());
    }

    #[test]
    fn stable_for_large_scores() {
        let q = Array3::from_elem((1, 3, 4), 300.0f32);
        let k = Array3::from_elem((1, 3, 4), 300.0f32);
        let v = pseudo((1, 3, 4), 9, 1.0);
        let o = Exact::default()
            .prefill(0, q.view(), k.view(), v.view())
            .unwrap();
        assert!(o.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=2_000_000 {
            let x = -87.0 * i as f32 / 2_000_000.0;
            let want = (x as f64).exp();
            let got = exp_nonpos(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-100.0), 0.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn f64_round_trip_through_heads() {
        let q = pseudo((6, 5, 4), 4, 2.0);
        let k = pseudo((2, 5, 4), 5, 2.0);
        let h = to_heads(q.view(), k.view(), k.view()).unwrap();
        assert_eq!(
            (h.num_q_heads(), h.num_kv_heads(), h.len(), h.dim()),
            (6, 2, 5, 4)
        );
        assert_eq!(to_f32(h.tensors().0.view()), q);
        let mut bad = q.clone();
        bad[[1, 2, 3]] = f32::NAN;
        assert!(to_heads(bad.view(), k.view(), k.view()).is_err());
    }

    #[test]
    fn rejects_bad_shapes() {
        let q = Array3::<f32>::zeros((4, 3, 4));
        let k = Array3::<f32>::zeros((3, 3, 4));
        assert!(Exact::default()
            .prefill(0, q.view(), k.view(), k.view())
            .is_err());
        let k = Array3::<f32>::zeros((2, 2, 4));
        assert!(Exact::default()
            .prefill(0, q.view(), k.view(), k.view())
            .is_err());
    }
}
