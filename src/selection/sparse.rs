//! Sparse attention (SPEC 1.8, Eq. 2): O~_i = sum_{j in S_i} softmax_{S_i}(A_ij) v_j.

use super::select::Selection;
use crate::data::Heads;
use crate::error::{Result, TcaError};
use crate::reference::exact::collect_rows;
use crate::reference::softmax::{scores, softmax_in_place, weighted_sum};
use crate::reference::Attention;
use ndarray::Array1;

/// O~ [Hq, L, d] and the log-sum-exp over each S_i [Hq, L]; scores are computed for the
/// kept keys only.
pub fn sparse_attention(heads: &Heads, sel: &Selection) -> Result<Attention> {
    if sel.len != heads.len() || sel.heads.len() != heads.num_kv_heads() {
        return Err(TcaError::Shape(format!(
            "selection for L = {} and {} KV heads applied to L = {} and {} KV heads",
            sel.len,
            sel.heads.len(),
            heads.len(),
            heads.num_kv_heads()
        )));
    }
    Ok(collect_rows(heads, |h, i| sparse_row(heads, sel, h, i)))
}

/// O~_i of query head `h` and the log-sum-exp over S_i.
pub fn sparse_row(heads: &Heads, sel: &Selection, h: usize, i: usize) -> (Array1<f64>, f64) {
    let kv = heads.kv_of(h);
    let mut p = scores(
        heads.q(h).row(i),
        heads.k(kv),
        sel.keys(kv, i),
        heads.scale(),
    );
    let lse = softmax_in_place(&mut p);
    (weighted_sum(heads.v(kv), sel.keys(kv, i), &p), lse)
}
