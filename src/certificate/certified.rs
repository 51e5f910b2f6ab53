//! Certified-tau mode (config key `certified_tau`): per query, after a base selection
//! (TCA's), add the omitted chunks in decreasing order of their mass bound
//! n_t exp(ub_t) until the certificate reads gamma_hat_i <= 1 - tau. Then
//! gamma_i <= gamma_hat_i <= 1 - tau holds at every query by construction, not on
//! average as calibration gives it.
//!
//! Deviation from docs/algorithm.md §1: the key sets become per query head (each head's query bounds the
//! chunks itself), so they no longer share one KV cache per KV head; this is a prefill
//! mode. The decoding cache stays TCA's.

use super::certify::{gamma_hat, log_sum_exp, Certifier};
use crate::error::{Result, TcaError};
use crate::selection::sparse::check_shape;
use crate::selection::KeySets;
use rayon::prelude::*;

/// TCA's (or any base) key sets widened per query until gamma_hat_i <= 1 - tau.
pub struct CertifiedTau<'a> {
    base: &'a dyn KeySets,
    sub_block: usize,
    len: usize,
    /// Per (h, i), in the order h L + i: the chunks added to S_i, ascending.
    added: Vec<Vec<u32>>,
}

/// Logits of the keys of chunk `range` that are visible to query i and not in `keys`.
fn omitted_in(range: std::ops::Range<usize>, i: usize, keys: &[usize]) -> Vec<usize> {
    let (lo, hi) = (range.start, range.end.min(i + 1));
    let from = keys.partition_point(|&j| j < lo);
    let mut kept = keys[from..].iter().peekable();
    (lo..hi)
        .filter(|j| {
            if kept.peek() == Some(&j) {
                kept.next();
                false
            } else {
                true
            }
        })
        .collect()
}

impl<'a> CertifiedTau<'a> {
    /// Widens `base` over the layer of `certifier` so that every query's certificate
    /// (from `certifier`, the same chunks and bound) reads gamma_hat_i <= 1 - tau,
    /// tau in (0, 1]. Cost per query: the certificate of the base set, then the logits
    /// of the added chunks' keys.
    pub fn new(certifier: &Certifier<'_>, base: &'a dyn KeySets, tau: f64) -> Result<Self> {
        if !(tau.is_finite() && tau > 0.0 && tau <= 1.0) {
            return Err(TcaError::Config(format!("tau = {tau} must lie in (0, 1]")));
        }
        let heads = certifier.heads();
        check_shape(heads, base)?;
        let target = 1.0 - tau;
        let l = heads.len();
        let sub_block = certifier.summaries(0).size();
        let added = (0..heads.num_q_heads() * l)
            .into_par_iter()
            .map(|n| {
                let (h, i) = (n / l, n % l);
                let keys = base.keys(h, i);
                let (cert, mut blocks) = certifier.query_with_blocks(h, i, &keys)?;
                if cert.gamma_hat <= target {
                    return Ok(Vec::new());
                }
                // Largest mass bound first (ties: lower chunk).
                blocks.sort_by(|a, b| {
                    b.log_mass
                        .total_cmp(&a.log_mass)
                        .then(a.block.cmp(&b.block))
                });
                // suffix[k]: ln of U over the chunks not yet added after adding k.
                let mut suffix = vec![f64::NEG_INFINITY; blocks.len() + 1];
                for k in (0..blocks.len()).rev() {
                    suffix[k] = log_sum_exp([blocks[k].log_mass, suffix[k + 1]].into_iter());
                }
                let sums = certifier.summaries(heads.kv_of(h));
                let mut lse_in = cert.lse_in;
                let mut take = blocks.len();
                for (k, b) in blocks.iter().enumerate() {
                    let extra = certifier.logits(h, i, omitted_in(sums.range(b.block), i, &keys));
                    lse_in = log_sum_exp([lse_in, log_sum_exp(extra.into_iter())].into_iter());
                    if gamma_hat(lse_in, suffix[k + 1], i + 1) <= target {
                        take = k + 1;
                        break;
                    }
                }
                // The certificate of the widened set, computed as `certifier` computes
                // every certificate, decides: widen further while it exceeds the target
                // (rounding of the incremental sums may differ in the last bits).
                loop {
                    let mut chosen: Vec<u32> =
                        blocks[..take].iter().map(|b| b.block as u32).collect();
                    chosen.sort_unstable();
                    let widened = merge(&keys, &chosen, sub_block, i);
                    if take == blocks.len() || certifier.query(h, i, &widened)?.gamma_hat <= target
                    {
                        return Ok(chosen);
                    }
                    take += 1;
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CertifiedTau {
            base,
            sub_block,
            len: l,
            added,
        })
    }

    /// The chunks (of the certifier's sub-block size) added to query i of head h.
    pub fn added(&self, h: usize, i: usize) -> &[u32] {
        &self.added[h * self.len + i]
    }
}

/// `keys` (ascending) with every visible key of the chunks `blocks` (ascending) of size
/// `s`, ascending and unique.
fn merge(keys: &[usize], blocks: &[u32], s: usize, i: usize) -> Vec<usize> {
    if blocks.is_empty() {
        return keys.to_vec();
    }
    let mut out: Vec<usize> = keys.to_vec();
    for &t in blocks {
        let t = t as usize;
        out.extend(t * s..((t + 1) * s).min(i + 1));
    }
    out.sort_unstable();
    out.dedup();
    out
}

impl KeySets for CertifiedTau<'_> {
    fn shape(&self) -> (usize, usize) {
        self.base.shape()
    }
    fn keys(&self, h: usize, i: usize) -> Vec<usize> {
        merge(&self.base.keys(h, i), self.added(h, i), self.sub_block, i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_visible_keys_once() {
        assert_eq!(merge(&[0, 5, 9], &[1], 4, 9), vec![0, 4, 5, 6, 7, 9]);
        assert_eq!(merge(&[0, 9], &[2], 4, 9), vec![0, 8, 9]);
        assert_eq!(omitted_in(4..8, 9, &[0, 5, 9]), vec![4, 6, 7]);
        assert_eq!(omitted_in(8..12, 9, &[0, 5, 9]), vec![8]);
    }
}
