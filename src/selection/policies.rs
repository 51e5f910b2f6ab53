//! Peer selection policies (docs/algorithm.md §5), compared with TCA at equal kept-token
//! budget: each keeps, at every query, as many keys as TCA's S_i (except the cumulative
//! threshold, which sets its own budget and reports it).

use super::blocks::candidate_blocks;
use super::budget::Budget;
use super::select::{select, window_start, KeySets, Selection};
use crate::config::Config;
use crate::data::Heads;
use crate::error::Result;
use crate::reference::causal_row;

/// The policies the harness compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// TCA with the calibrated budgets.
    Tca,
    /// The |S_i| keys of largest P_ij: the most mass any selector of that size retains.
    OracleTopK,
    /// The first `n_sink` tokens plus the most recent |S_i| - n_sink (StreamingLLM).
    StreamingLlm,
    /// TCA's ranking with the same budget in every block (sigma -> 0), equal total.
    BlockTopK,
    /// Smallest set of the candidate region whose importance reaches tau of the
    /// region's importance, plus the window (FlexPrefill / Tactic style; own budget).
    CumulativeThreshold,
}

impl Policy {
    pub const ALL: [Policy; 5] = [
        Policy::Tca,
        Policy::OracleTopK,
        Policy::StreamingLlm,
        Policy::BlockTopK,
        Policy::CumulativeThreshold,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Tca => "tca",
            Policy::OracleTopK => "oracle_topk",
            Policy::StreamingLlm => "streaming_llm",
            Policy::BlockTopK => "block_topk",
            Policy::CumulativeThreshold => "cumulative_threshold",
        }
    }
}

/// Oracle top-k: per query, the `tca.kept` keys of largest true P_ij (ties: lower index).
pub struct OracleTopK<'a> {
    pub heads: &'a Heads,
    pub tca: &'a Selection,
}

impl KeySets for OracleTopK<'_> {
    fn shape(&self) -> (usize, usize) {
        self.tca.shape()
    }
    fn keys(&self, h: usize, i: usize) -> Vec<usize> {
        let k = self.tca.kept(h / self.tca.group, i);
        let (p, _) = causal_row(self.heads, h, i);
        let mut idx: Vec<usize> = (0..=i).collect();
        // A total order (P descending, then index), so the k smallest are exact.
        let order = |a: &usize, b: &usize| p[*b].total_cmp(&p[*a]).then(a.cmp(b));
        if k < idx.len() {
            idx.select_nth_unstable_by(k, order);
            idx.truncate(k);
        }
        idx.sort_unstable();
        idx
    }
}

/// StreamingLLM at TCA's per-query budget: [0, n_sink) and the most recent keys.
pub struct StreamingLlm<'a> {
    pub tca: &'a Selection,
    pub sinks: usize,
}

impl KeySets for StreamingLlm<'_> {
    fn shape(&self) -> (usize, usize) {
        self.tca.shape()
    }
    fn keys(&self, h: usize, i: usize) -> Vec<usize> {
        let k = self.tca.kept(h / self.tca.group, i);
        let (sinks, recent_from) = streaming_span(k, self.sinks, i);
        (0..sinks).chain(recent_from..=i).collect()
    }
}

/// StreamingLLM's key set of query i at budget k (1 <= k <= i + 1) with `sinks` sink
/// tokens, as (s, r): keys [0, s) and [r, i], s = min(sinks, k - 1) (the most recent key
/// is always kept, so sinks >= k keeps k - 1 sinks), r = max(i + 1 - (k - s), s).
/// kernels/peers.cu applies the same rule on the device.
pub fn streaming_span(k: usize, sinks: usize, i: usize) -> (usize, usize) {
    let k = k.clamp(1, i + 1);
    let s = sinks.min(k - 1);
    (s, (i + 1 - (k - s)).max(s))
}

/// Block top-k's per-block budget for a KV head whose TCA S_G holds `global_len` tokens
/// over `nb` candidate blocks of size `b`: k = round(|S_G| / nb) clamped to [1, b].
pub fn block_topk_k(global_len: usize, nb: usize, b: usize) -> usize {
    ((global_len as f64 / nb.max(1) as f64).round() as usize).clamp(1, b.max(1))
}

/// Uniform per-block top-k with TCA's ranking and window: every block of every KV head
/// keeps round(|S_G| / nb) tokens (at least 1), so the total matches TCA's up to rounding.
pub fn block_topk(heads: &Heads, cfg: &Config, tca: &Selection) -> Result<Selection> {
    let nb = candidate_blocks(heads.len(), cfg).len();
    let budgets = tca
        .heads
        .iter()
        .map(|h| {
            Budget::point(
                block_topk_k(h.global.len(), nb, cfg.block_size),
                cfg.block_size,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    select(heads, cfg, &budgets)
}

/// The cumulative-threshold key set of one KV head over its candidate region: with `s`
/// the importance of positions [0, n) (n = L - w), the positions by descending s (ties:
/// lower position first) until their sum reaches tau * sum(s); ascending.
pub fn cumulative_keep(s: &[f64], tau: f64) -> Vec<usize> {
    let total: f64 = s.iter().sum();
    let mut idx: Vec<usize> = (0..s.len()).collect();
    idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
    let mut acc = 0.0;
    let mut keep = Vec::new();
    for j in idx {
        if acc >= tau * total {
            break;
        }
        acc += s[j];
        keep.push(j);
    }
    keep.sort_unstable();
    keep
}

/// Cumulative threshold: per KV head, the candidate-region positions by descending
/// importance until their importance reaches tau of the region's total, plus the window
/// ([`cumulative_keep`]).
pub fn cumulative_threshold(tca: &Selection, tau: f64) -> Selection {
    let mut out = tca.clone();
    let n = tca.len.saturating_sub(tca.window);
    for h in &mut out.heads {
        h.global = cumulative_keep(&h.ranking.importance[..n], tau);
        h.block_budgets.clear();
    }
    out
}

/// A key set S_G of the candidate region [0, lc) as the GPU's per-block top-t
/// compaction takes it: score 1 at kept positions and 0 elsewhere, the kept count t of
/// every block of size b (the top-t of a 0/1 block with t ones is exactly its ones), and
/// the exclusive prefix sums of t (each block's offset into the compacted cache).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockMarks {
    pub scores: Vec<f32>,
    pub counts: Vec<i32>,
    pub offsets: Vec<i32>,
}

impl BlockMarks {
    /// Fails on a position outside [0, lc), a repeated or unsorted `keep`, or b = 0.
    pub fn new(keep: &[usize], lc: usize, b: usize) -> Result<Self> {
        if b == 0 {
            return Err(crate::TcaError::Invalid("block size 0".into()));
        }
        if keep.windows(2).any(|w| w[0] >= w[1]) {
            return Err(crate::TcaError::Invalid(
                "key set not strictly ascending".into(),
            ));
        }
        if let Some(&j) = keep.iter().find(|&&j| j >= lc) {
            return Err(crate::TcaError::Invalid(format!(
                "position {j} outside the candidate region [0, {lc})"
            )));
        }
        let nb = lc.div_ceil(b);
        let mut scores = vec![0.0f32; lc];
        let mut counts = vec![0i32; nb];
        for &j in keep {
            scores[j] = 1.0;
            counts[j / b] += 1;
        }
        let offsets = counts
            .iter()
            .scan(0i32, |acc, &t| {
                let o = *acc;
                *acc += t;
                Some(o)
            })
            .collect();
        Ok(BlockMarks {
            scores,
            counts,
            offsets,
        })
    }
}

/// The key sets of `policy` at TCA's budget (`tca` is TCA's selection under `cfg`).
pub fn key_sets<'a>(
    policy: Policy,
    heads: &'a Heads,
    cfg: &Config,
    tca: &'a Selection,
    n_sink: usize,
) -> Result<Box<dyn KeySets + 'a>> {
    Ok(match policy {
        Policy::Tca => Box::new(tca.clone()),
        Policy::OracleTopK => Box::new(OracleTopK { heads, tca }),
        Policy::StreamingLlm => Box::new(StreamingLlm { tca, sinks: n_sink }),
        Policy::BlockTopK => Box::new(block_topk(heads, cfg, tca)?),
        Policy::CumulativeThreshold => Box::new(cumulative_threshold(tca, cfg.tau)),
    })
}

/// Whether query i's window [max(0, i - w + 1), i] lies in `keys`.
pub fn keeps_window(keys: &[usize], window: usize, i: usize) -> bool {
    (window_start(window, i)..=i).all(|j| keys.binary_search(&j).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_span_keeps_k_keys_sinks_first() {
        for i in 0..40 {
            for k in 1..=i + 1 {
                for sinks in [0, 1, 4, 50] {
                    let (s, r) = streaming_span(k, sinks, i);
                    let keys: Vec<usize> = (0..s).chain(r..=i).collect();
                    assert_eq!(keys.len(), k, "i {i} k {k} sinks {sinks}");
                    assert!(keys.windows(2).all(|w| w[0] < w[1]));
                    assert_eq!(keys.last(), Some(&i));
                    assert_eq!(s, sinks.min(k - 1));
                }
            }
        }
        // Out-of-range budgets are clamped to [1, i + 1].
        assert_eq!(streaming_span(0, 4, 9), (0, 9));
        assert_eq!(streaming_span(99, 4, 9), (4, 4));
    }

    #[test]
    fn block_topk_k_rounds_and_clamps() {
        // (|S_G|, nb, b, k)
        let cases = [
            (0, 10, 64, 1),
            (14, 10, 64, 1),
            (15, 10, 64, 2),
            (250, 10, 64, 25),
            (10_000, 10, 64, 64),
            (7, 0, 64, 7),
            (5, 2, 4, 3),
        ];
        for (n, nb, b, k) in cases {
            assert_eq!(block_topk_k(n, nb, b), k, "|S_G| {n}, nb {nb}, b {b}");
        }
    }

    /// The smallest prefix of the descending order (ties: lower position) whose sum
    /// reaches tau * total, by brute force over prefix lengths.
    fn brute_cumulative(s: &[f64], tau: f64) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..s.len()).collect();
        idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        let total: f64 = s.iter().sum();
        let n = (0..=s.len())
            .find(|&n| idx[..n].iter().map(|&j| s[j]).sum::<f64>() >= tau * total)
            .unwrap_or(s.len());
        let mut k = idx[..n].to_vec();
        k.sort_unstable();
        k
    }

    #[test]
    fn cumulative_keep_is_the_smallest_top_prefix_reaching_tau() {
        assert_eq!(cumulative_keep(&[0.1, 0.5, 0.2, 0.2], 0.6), vec![1, 2]);
        // Ties: the lower position first.
        assert_eq!(cumulative_keep(&[0.25; 4], 0.5), vec![0, 1]);
        assert_eq!(cumulative_keep(&[0.0; 3], 0.9), Vec::<usize>::new());
        assert_eq!(cumulative_keep(&[], 0.9), Vec::<usize>::new());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        for case in 0..200 {
            let n = 1 + case % 40;
            // Coarse values so that ties occur.
            let s: Vec<f64> = (0..n).map(|_| (rnd() * 8.0).floor() / 8.0).collect();
            let tau = rnd();
            assert_eq!(
                cumulative_keep(&s, tau),
                brute_cumulative(&s, tau),
                "{s:?} tau {tau}"
            );
        }
    }

    /// What tca_select_compact does with the marks (kernels/selection.cu): per block the
    /// t tokens of largest score (ties: lower index) at the block's offset, ascending.
    fn compact_on_host(m: &BlockMarks, b: usize) -> Vec<usize> {
        let total: i32 = m.counts.iter().sum();
        let mut out = vec![usize::MAX; total as usize];
        for (blk, (&t, &off)) in m.counts.iter().zip(&m.offsets).enumerate() {
            let r = blk * b..((blk + 1) * b).min(m.scores.len());
            let mut idx: Vec<usize> = r.collect();
            idx.sort_by(|&a, &c| m.scores[c].total_cmp(&m.scores[a]).then(a.cmp(&c)));
            let mut top = idx[..t as usize].to_vec();
            top.sort_unstable();
            for (i, j) in top.into_iter().enumerate() {
                out[off as usize + i] = j;
            }
        }
        out
    }

    #[test]
    fn block_marks_compact_back_to_the_key_set() {
        let m = BlockMarks::new(&[0, 3, 4, 9], 10, 4).unwrap();
        assert_eq!(m.counts, vec![2, 1, 1]);
        assert_eq!(m.offsets, vec![0, 2, 3]);
        assert_eq!(m.scores.iter().filter(|&&x| x == 1.0).count(), 4);
        let mut x = 12345u64;
        for case in 0..100 {
            let (lc, b) = (1 + case * 7 % 97, 1 + case % 13);
            let keep: Vec<usize> = (0..lc)
                .filter(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 33) % 3 == 0
                })
                .collect();
            let m = BlockMarks::new(&keep, lc, b).unwrap();
            assert_eq!(m.counts.len(), lc.div_ceil(b));
            assert_eq!(compact_on_host(&m, b), keep, "lc {lc} b {b}");
        }
        assert!(BlockMarks::new(&[3, 1], 10, 4).is_err());
        assert!(BlockMarks::new(&[1, 1], 10, 4).is_err());
        assert!(BlockMarks::new(&[10], 10, 4).is_err());
        assert!(BlockMarks::new(&[1], 10, 0).is_err());
    }
}
