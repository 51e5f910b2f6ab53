//! Numerically stable softmax and softmax-weighted sums of value rows.

use ndarray::{Array1, ArrayView2};

/// Turns scores `a` into softmax probabilities in place and returns the log-sum-exp
/// log sum_j exp(a_j). `a` must be non-empty and finite.
pub fn softmax_in_place(a: &mut [f64]) -> f64 {
    let max = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for x in a.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in a.iter_mut() {
        *x *= inv;
    }
    max + sum.ln()
}

/// sum_n w_n v_{idx_n}: the weighted sum of the value rows `idx` of `v` [L, d].
pub fn weighted_sum(
    v: ArrayView2<'_, f64>,
    idx: impl IntoIterator<Item = usize>,
    w: &[f64],
) -> Array1<f64> {
    let mut out = Array1::<f64>::zeros(v.ncols());
    for (j, &wj) in idx.into_iter().zip(w) {
        out.scaled_add(wj, &v.row(j));
    }
    out
}

/// Scores q . k_j * scale for the key rows `idx` of `k` [L, d].
pub fn scores(
    q: ndarray::ArrayView1<'_, f64>,
    k: ArrayView2<'_, f64>,
    idx: impl IntoIterator<Item = usize>,
    scale: f64,
) -> Vec<f64> {
    idx.into_iter().map(|j| k.row(j).dot(&q) * scale).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_lse_is_exact() {
        let mut a = vec![1000.0, 999.0, -5.0];
        let lse = softmax_in_place(&mut a);
        assert!((a.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        let direct = 1000.0 + (1.0 + (-1.0f64).exp() + (-1005.0f64).exp()).ln();
        assert!((lse - direct).abs() < 1e-12);
    }
}
