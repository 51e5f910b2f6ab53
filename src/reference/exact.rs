//! Exact causal attention with GQA: A_ij = q_i . k_j / sqrt(d), P_ij = softmax over
//! j <= i, O_i = sum_j P_ij v_j. Query head h reads KV head h / g.

use super::softmax::{scores, softmax_in_place, weighted_sum};
use crate::data::Heads;
use ndarray::{Array2, Array3, Axis};
use rayon::prelude::*;

/// Attention outputs: O [Hq, L, d] and the log-sum-exp of each query's scores [Hq, L].
#[derive(Clone, Debug)]
pub struct Attention {
    pub o: Array3<f64>,
    pub lse: Array2<f64>,
}

/// The causal softmax row of query `i` of query head `h`: P_i over keys [0, i] (length
/// i + 1) and its log-sum-exp.
pub fn causal_row(heads: &Heads, h: usize, i: usize) -> (Vec<f64>, f64) {
    let mut p = scores(
        heads.q(h).row(i),
        heads.k(heads.kv_of(h)),
        0..=i,
        heads.scale(),
    );
    let lse = softmax_in_place(&mut p);
    (p, lse)
}

/// Assembles an [`Attention`] from one (output row, lse) per (query head, query), in
/// row-major order; each row is computed independently, so the result does not depend
/// on the number of threads.
pub(crate) fn collect_rows(
    heads: &Heads,
    row: impl Fn(usize, usize) -> (ndarray::Array1<f64>, f64) + Sync,
) -> Attention {
    let (hq, l, d) = (heads.num_q_heads(), heads.len(), heads.dim());
    let rows: Vec<_> = (0..hq * l)
        .into_par_iter()
        .map(|n| row(n / l, n % l))
        .collect();
    let mut o = Array3::<f64>::zeros((hq, l, d));
    let mut lse = Array2::<f64>::zeros((hq, l));
    for (n, (orow, s)) in rows.into_iter().enumerate() {
        o.index_axis_mut(Axis(0), n / l)
            .row_mut(n % l)
            .assign(&orow);
        lse[[n / l, n % l]] = s;
    }
    Attention { o, lse }
}

/// Exact causal attention of every query head, in parallel over rows.
pub fn attention(heads: &Heads) -> Attention {
    collect_rows(heads, |h, i| {
        let (p, lse) = causal_row(heads, h, i);
        (weighted_sum(heads.v(heads.kv_of(h)), 0..=i, &p), lse)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn first_query_returns_first_value() {
        let q = Array3::from_shape_fn((2, 3, 2), |(h, i, c)| (h + i + c) as f64 * 0.3);
        let k = Array3::from_shape_fn((1, 3, 2), |(_, i, c)| (i * 2 + c) as f64 * 0.1);
        let v = Array3::from_shape_fn((1, 3, 2), |(_, i, c)| (i + 3 * c) as f64);
        let heads = Heads::new(q, k, v).unwrap();
        let att = attention(&heads);
        for h in 0..2 {
            assert_eq!(att.o[[h, 0, 0]], 0.0);
            assert_eq!(att.o[[h, 0, 1]], 3.0);
        }
    }
}
