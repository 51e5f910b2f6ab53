//! Sparse attention (docs/algorithm.md §1.8): O~_i = sum_{j in S_i} softmax_{S_i}(A_ij) v_j.

use super::select::KeySets;
use crate::data::Heads;
use crate::error::{Result, TcaError};
use crate::reference::exact::collect_rows;
use crate::reference::softmax::{scores, softmax_in_place, weighted_sum};
use crate::reference::Attention;
use ndarray::Array1;

/// O~ [Hq, L, d] and the log-sum-exp over each S_i [Hq, L]; scores are computed for the
/// kept keys only.
pub fn sparse_attention(heads: &Heads, sel: &dyn KeySets) -> Result<Attention> {
    check_shape(heads, sel)?;
    Ok(collect_rows(heads, |h, i| sparse_row(heads, sel, h, i)))
}

/// Errors unless `sel` was made for this input's query heads and length.
pub fn check_shape(heads: &Heads, sel: &dyn KeySets) -> Result<()> {
    let (hq, l) = sel.shape();
    if (hq, l) != (heads.num_q_heads(), heads.len()) {
        return Err(TcaError::Shape(format!(
            "key sets for {hq} query heads and L = {l} applied to {} query heads and L = {}",
            heads.num_q_heads(),
            heads.len()
        )));
    }
    Ok(())
}

/// O~_i of query head `h` and the log-sum-exp over S_i.
pub fn sparse_row(heads: &Heads, sel: &dyn KeySets, h: usize, i: usize) -> (Array1<f64>, f64) {
    let kv = heads.kv_of(h);
    let keys = sel.keys(h, i);
    let mut p = scores(
        heads.q(h).row(i),
        heads.k(kv),
        keys.iter().copied(),
        heads.scale(),
    );
    let lse = softmax_in_place(&mut p);
    (weighted_sum(heads.v(kv), keys.iter().copied(), &p), lse)
}
