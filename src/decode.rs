//! Decoding with the compacted cache (docs/algorithm.md §3).
//!
//! After prefill the cache of a KV head holds S_G (keys, values, original positions) and
//! the last w tokens (all of them when L <= w). Each new token is appended to the
//! window; when the window holds w + b tokens (after prefill with L >= w: exactly when b
//! tokens have been appended since the last compaction) its oldest b tokens form a block:
//! they are scored by the current query's softmax over the cache (pooled over the group
//! by `gqa_reduce`), the top t = floor(E_p[k]) of them move to the global part and the
//! rest are dropped. A decode query attends to everything in its cache.

use crate::bound::{audit_row, Precision, PrefixStats, QueryAudit};
use crate::config::Config;
use crate::data::Heads;
use crate::error::{Result, TcaError};
use crate::reference::softmax_in_place;
use crate::selection::importance::pool;
use crate::selection::{select, Budget};
use ndarray::{Array1, ArrayView1};
use rayon::prelude::*;
use serde::Serialize;

/// Rows of keys and values (row-major [n, d]) with their original positions.
#[derive(Clone, Debug, Default)]
struct Part {
    k: Vec<f64>,
    v: Vec<f64>,
    pos: Vec<usize>,
}

impl Part {
    fn push(&mut self, k: ArrayView1<'_, f64>, v: ArrayView1<'_, f64>, pos: usize) {
        self.k.extend(k.iter());
        self.v.extend(v.iter());
        self.pos.push(pos);
    }
}

/// The cache of one KV head: a global part and the local window, each holding copies
/// of its keys, values and original positions.
#[derive(Clone, Debug)]
pub struct KvCache {
    d: usize,
    global: Part,
    window: Part,
    /// Tokens kept from each compacted block.
    pub block_keep: usize,
    pub compactions: usize,
}

impl KvCache {
    /// An empty cache for head dimension `d` that keeps `block_keep` tokens of each
    /// compacted block (fill it with [`KvCache::push_global`] and
    /// [`KvCache::push_window`]).
    pub fn new(d: usize, block_keep: usize) -> Self {
        KvCache {
            d,
            global: Part::default(),
            window: Part::default(),
            block_keep,
            compactions: 0,
        }
    }
    /// Appends a token (key, value, original position) to the global part.
    pub fn push_global(&mut self, k: ArrayView1<'_, f64>, v: ArrayView1<'_, f64>, pos: usize) {
        self.global.push(k, v, pos);
    }
    /// Appends a token (key, value, original position) to the local window.
    pub fn push_window(&mut self, k: ArrayView1<'_, f64>, v: ArrayView1<'_, f64>, pos: usize) {
        self.window.push(k, v, pos);
    }
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.global.pos.len() + self.window.pos.len()
    }
    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Original positions held, global part first (ascending overall).
    pub fn positions(&self) -> impl Iterator<Item = usize> + '_ {
        self.global.pos.iter().chain(&self.window.pos).copied()
    }
    pub fn global_len(&self) -> usize {
        self.global.pos.len()
    }
    pub fn window_len(&self) -> usize {
        self.window.pos.len()
    }
    /// Bytes of K and V held.
    pub fn kv_bytes(&self) -> usize {
        (self.global.k.len() + self.global.v.len() + self.window.k.len() + self.window.v.len())
            * std::mem::size_of::<f64>()
    }
    /// Bytes of positions held.
    pub fn index_bytes(&self) -> usize {
        self.len() * std::mem::size_of::<usize>()
    }

    /// Softmax of `q` (scaled by `scale`) over the cache, and the output sum p_n v_n.
    pub fn attend(&self, q: ArrayView1<'_, f64>, scale: f64) -> (Vec<f64>, Array1<f64>) {
        let d = self.d;
        let parts = [&self.global, &self.window];
        let mut p: Vec<f64> = parts
            .iter()
            .flat_map(|part| part.k.chunks_exact(d))
            .map(|k| ArrayView1::from(k).dot(&q) * scale)
            .collect();
        softmax_in_place(&mut p);
        let mut o = Array1::zeros(d);
        let values = parts.iter().flat_map(|part| part.v.chunks_exact(d));
        for (v, pn) in values.zip(&p) {
            o.scaled_add(*pn, &ArrayView1::from(v));
        }
        (p, o)
    }

    /// [`KvCache::compact`] with its preconditions checked: the window holds at least
    /// `b >= 1` tokens and `score` has an entry for every token held.
    pub fn try_compact(&mut self, b: usize, score: &[f64]) -> Result<()> {
        if b == 0 || self.window_len() < b || score.len() != self.len() {
            return Err(TcaError::Invalid(format!(
                "cannot compact a block of {b} with {} window tokens and {} scores for {} \
                 tokens held",
                self.window_len(),
                score.len(),
                self.len()
            )));
        }
        self.compact(b, score);
        Ok(())
    }

    /// Moves the top `block_keep` of the window's oldest b tokens (by `score`, indexed
    /// like the cache) into the global part and drops the rest.
    fn compact(&mut self, b: usize, score: &[f64]) {
        let (g, d) = (self.global_len(), self.d);
        for n in compaction_keep(&score[g..g + b], self.block_keep) {
            let (k, v) = (
                &self.window.k[n * d..(n + 1) * d],
                &self.window.v[n * d..(n + 1) * d],
            );
            let pos = self.window.pos[n];
            self.global
                .push(ArrayView1::from(k), ArrayView1::from(v), pos);
        }
        self.window.k.drain(..b * d);
        self.window.v.drain(..b * d);
        self.window.pos.drain(..b);
        self.compactions += 1;
    }
}

/// The block members a compaction keeps: the `keep` largest of `block_score` (the
/// window's oldest b tokens, oldest first), ties to the older token, in ascending order.
pub fn compaction_keep(block_score: &[f64], keep: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..block_score.len()).collect();
    idx.sort_by(|&x, &y| block_score[y].total_cmp(&block_score[x]).then(x.cmp(&y)));
    idx.truncate(keep);
    idx.sort_unstable();
    idx
}

/// The positions a compacted cache holds, for caches whose rows live elsewhere (the
/// GPU's, `crate::cuda::compact_cache`): per KV head the global part (ascending), and
/// the window `[lo, p]` shared by all KV heads. It follows [`KvCache`] step for step: a
/// token at position p joins the window; once the window holds w + b tokens its oldest
/// b leave it, and [`compaction_keep`] of them join the global part.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheIndex {
    pub global: Vec<Vec<usize>>,
    /// First position of the window.
    pub lo: usize,
    pub window: usize,
    pub block: usize,
    /// Tokens kept from each compacted block, per KV head.
    pub block_keep: Vec<usize>,
    pub compactions: usize,
}

impl CacheIndex {
    /// After a prefill of `prefill_len` tokens with S_G `global` (one list per KV head):
    /// the window holds the last min(L, w) of them.
    pub fn new(
        global: Vec<Vec<usize>>,
        prefill_len: usize,
        cfg: &Config,
        block_keep: Vec<usize>,
    ) -> Result<Self> {
        if global.len() != block_keep.len()
            || global.iter().any(|g| {
                g.windows(2).any(|w| w[0] >= w[1])
                    || g.last()
                        .is_some_and(|&j| j + cfg.window.min(prefill_len) >= prefill_len)
            })
        {
            return Err(TcaError::Invalid(format!(
                "a compacted cache needs one ascending S_G per KV head before the window \
                 (prefill {prefill_len}, w = {}) and one block budget each",
                cfg.window
            )));
        }
        Ok(CacheIndex {
            global,
            lo: prefill_len - cfg.window.min(prefill_len),
            window: cfg.window,
            block: cfg.block_size,
            block_keep,
            compactions: 0,
        })
    }
    /// Whether the cache compacts after the token at position `p` joined the window.
    pub fn due(&self, p: usize) -> bool {
        p + 1 - self.lo >= self.window + self.block
    }
    /// The positions KV head `kv` holds once position `p` joined (ascending).
    pub fn positions(&self, kv: usize, p: usize) -> Vec<usize> {
        self.global[kv].iter().copied().chain(self.lo..=p).collect()
    }
    /// Compacts the block `[lo, lo + b)` by the scores `block_score[kv]` (b each):
    /// returns the positions moved to each KV head's global part.
    pub fn compact(&mut self, block_score: &[Vec<f64>]) -> Result<Vec<Vec<usize>>> {
        if block_score.len() != self.global.len()
            || block_score.iter().any(|s| s.len() != self.block)
        {
            return Err(TcaError::Invalid(format!(
                "compaction needs {} scores for each of {} KV heads",
                self.block,
                self.global.len()
            )));
        }
        let moved: Vec<Vec<usize>> = block_score
            .iter()
            .zip(&self.block_keep)
            .map(|(s, &t)| {
                compaction_keep(s, t)
                    .into_iter()
                    .map(|n| self.lo + n)
                    .collect()
            })
            .collect();
        for (g, m) in self.global.iter_mut().zip(&moved) {
            g.extend(m);
        }
        self.lo += self.block;
        self.compactions += 1;
        Ok(moved)
    }
}

/// Cache statistics of one KV head after decoding.
#[derive(Clone, Debug, Serialize)]
pub struct HeadCacheReport {
    pub kv_head: usize,
    pub global_tokens: usize,
    pub window_tokens: usize,
    /// Largest number of tokens the cache held at any step.
    pub peak_tokens: usize,
    /// |S_G| + w + b with S_G as it stands at the end (prefill's plus what compactions
    /// added): the cache never holds more.
    pub ceiling_tokens: usize,
    /// Bytes of K and V held (f64).
    pub kv_bytes: usize,
    /// Bytes of the original positions held.
    pub index_bytes: usize,
    pub compactions: usize,
    pub block_keep: usize,
}

/// What a decoding run did and how far it strayed from exact attention.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeReport {
    pub prefill_len: usize,
    pub steps: usize,
    pub heads: Vec<HeadCacheReport>,
    /// Tokens and K/V bytes a full cache holds per KV head at the end.
    pub full_tokens: usize,
    pub full_kv_bytes: usize,
    pub mean_gamma: f64,
    pub max_gamma: f64,
    /// max over steps and query heads of ||O - O~||_2 / ||O||_2.
    pub max_rel_err: f64,
    /// The Theorem 1 audit of every decode step and query head against the f64 oracle:
    /// S_i is what the cache held, O~_i what the cache's own copies gave.
    #[serde(skip)]
    pub audits: Vec<QueryAudit>,
    /// Wall time spent in the cache (attention over it and compaction), summed over KV
    /// heads and divided by the steps: one thread's time to decode a token for the layer.
    /// The comparison with exact attention is not counted.
    pub seconds_per_step: f64,
}

/// Prefills on the first `prefill_len` tokens with TCA, then decodes the remaining
/// L - prefill_len tokens one at a time, each against exact attention at its position.
pub fn decode(
    heads: &Heads,
    cfg: &Config,
    budgets: &[Budget],
    prefill_len: usize,
) -> Result<DecodeReport> {
    if prefill_len == 0 || prefill_len >= heads.len() {
        return Err(TcaError::Invalid(format!(
            "decode needs 1 <= prefill length < L: prefill {prefill_len}, L = {}",
            heads.len()
        )));
    }
    let prefix = heads.prefix(prefill_len)?;
    let sel = select(&prefix, cfg, budgets)?;
    let stats = PrefixStats::of(heads);
    // Per KV head: its report, the audit per step and query head, seconds.
    type HeadRun = (HeadCacheReport, Vec<Result<QueryAudit>>, f64);
    let per_head: Vec<HeadRun> = (0..heads.num_kv_heads())
        .into_par_iter()
        .map(|kv| {
            let (k, v) = (heads.k(kv), heads.v(kv));
            let mut cache = KvCache::new(heads.dim(), budgets[kv].decode_budget());
            for &j in &sel.heads[kv].global {
                cache.global.push(k.row(j), v.row(j), j);
            }
            for j in prefill_len.saturating_sub(cfg.window)..prefill_len {
                cache.window.push(k.row(j), v.row(j), j);
            }
            let ceiling = cache.global_len() + cfg.window + cfg.block_size;
            let mut peak = cache.len();
            let mut added_global = 0;
            let mut per_step = Vec::new();
            let mut in_cache = std::time::Duration::ZERO;
            for t in prefill_len..heads.len() {
                let start = std::time::Instant::now();
                cache.window.push(k.row(t), v.row(t), t);
                let outs: Vec<(Vec<f64>, Array1<f64>)> = heads
                    .q_heads_of(kv)
                    .map(|h| cache.attend(heads.q(h).row(t), heads.scale()))
                    .collect();
                let probs = pool(
                    outs.iter().map(|o| o.0.clone()),
                    heads.group(),
                    cfg.gqa_reduce,
                );
                in_cache += start.elapsed();
                peak = peak.max(cache.len());
                let pos: Vec<usize> = cache.positions().collect();
                for (h, (_, o_cache)) in heads.q_heads_of(kv).zip(&outs) {
                    per_step.push(audit_row(
                        heads,
                        &stats[kv],
                        (h, t),
                        &pos,
                        o_cache.view(),
                        Precision::F64,
                    ));
                }
                let start = std::time::Instant::now();
                if cache.window_len() >= cfg.window + cfg.block_size {
                    let before = cache.global_len();
                    cache.compact(cfg.block_size, &probs);
                    added_global += cache.global_len() - before;
                }
                in_cache += start.elapsed();
            }
            let report = HeadCacheReport {
                kv_head: kv,
                global_tokens: cache.global_len(),
                window_tokens: cache.window_len(),
                peak_tokens: peak,
                ceiling_tokens: ceiling + added_global,
                kv_bytes: cache.kv_bytes(),
                index_bytes: cache.index_bytes(),
                compactions: cache.compactions,
                block_keep: cache.block_keep,
            };
            (report, per_step, in_cache.as_secs_f64())
        })
        .collect();
    let steps = heads.len() - prefill_len;
    let mut heads_out = Vec::new();
    let mut audits = Vec::new();
    let mut seconds = 0.0;
    for (r, a, sec) in per_head {
        heads_out.push(r);
        seconds += sec;
        for x in a {
            audits.push(x?);
        }
    }
    Ok(DecodeReport::from_parts(
        heads,
        prefill_len,
        heads_out,
        audits,
        seconds / steps as f64,
        std::mem::size_of::<f64>(),
    ))
}

impl DecodeReport {
    /// The report of a run over `heads` after a prefill of `prefill_len`: the caches'
    /// reports, every step's audit (sorted here), seconds per step, and the bytes of one
    /// K or V element (for the full cache's size).
    pub fn from_parts(
        heads: &Heads,
        prefill_len: usize,
        caches: Vec<HeadCacheReport>,
        mut audits: Vec<QueryAudit>,
        seconds_per_step: f64,
        elem_bytes: usize,
    ) -> Self {
        audits.sort_by_key(|a| (a.head, a.query));
        let n = audits.len().max(1) as f64;
        DecodeReport {
            prefill_len,
            steps: heads.len() - prefill_len,
            full_tokens: heads.len(),
            full_kv_bytes: heads.len() * 2 * heads.dim() * elem_bytes,
            mean_gamma: audits.iter().map(|a| a.gamma).sum::<f64>() / n,
            max_gamma: audits.iter().map(|a| a.gamma).fold(0.0, f64::max),
            max_rel_err: audits.iter().map(|a| a.rel_err()).fold(0.0, f64::max),
            seconds_per_step,
            heads: caches,
            audits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`CacheIndex`] holds the positions [`KvCache`] holds, at every step and through
    /// compactions with ties, for two KV heads with different block budgets.
    #[test]
    fn cache_index_follows_kv_cache() {
        let cfg = Config {
            window: 8,
            block_size: 4,
            ..Config::default()
        };
        let prefill = 20;
        let global = vec![vec![1, 5, 9], vec![0, 11]];
        let keep = vec![2, 1];
        let mut index = CacheIndex::new(global.clone(), prefill, &cfg, keep.clone()).unwrap();
        let row = [0.0];
        let mut caches: Vec<KvCache> = (0..2)
            .map(|kv| {
                let mut c = KvCache::new(1, keep[kv]);
                for &j in &global[kv] {
                    c.push_global(ArrayView1::from(&row), ArrayView1::from(&row), j);
                }
                for j in prefill - cfg.window..prefill {
                    c.push_window(ArrayView1::from(&row), ArrayView1::from(&row), j);
                }
                c
            })
            .collect();
        let mut compactions = 0;
        for p in prefill..prefill + 30 {
            let mut block_scores = Vec::new();
            for (kv, c) in caches.iter_mut().enumerate() {
                c.push_window(ArrayView1::from(&row), ArrayView1::from(&row), p);
                assert_eq!(c.positions().collect::<Vec<_>>(), index.positions(kv, p));
                // Scores with ties (multiples of 0.25), indexed like the cache.
                let score: Vec<f64> = (0..c.len())
                    .map(|n| ((n * 7 + p * 3 + kv) % 5) as f64 * 0.25)
                    .collect();
                let g = c.global_len();
                block_scores.push(score[g..g + cfg.block_size].to_vec());
                if c.window_len() >= cfg.window + cfg.block_size {
                    c.try_compact(cfg.block_size, &score).unwrap();
                }
            }
            if index.due(p) {
                index.compact(&block_scores).unwrap();
                compactions += 1;
            }
            for (kv, c) in caches.iter().enumerate() {
                assert_eq!(c.positions().collect::<Vec<_>>(), index.positions(kv, p));
            }
        }
        assert_eq!(compactions, 7);
        assert_eq!(index.compactions, caches[0].compactions);
        assert_eq!(compaction_keep(&[1.0, 3.0, 3.0, 0.5], 2), vec![1, 2]);
        assert_eq!(compaction_keep(&[2.0, 2.0, 2.0], 1), vec![0]);
        // A prefill shorter than w: no S_G, the window holds it all and first compacts
        // once it is w + b long (as the CPU cache does).
        let short = CacheIndex::new(vec![vec![]], 5, &cfg, vec![2]).unwrap();
        assert_eq!((short.lo, short.positions(0, 5)), (0, (0..=5).collect()));
        assert!(!short.due(10) && short.due(11));
        // S_G reaching into the window, or one budget short, is refused.
        assert!(CacheIndex::new(vec![vec![15]], prefill, &cfg, vec![1]).is_err());
        assert!(CacheIndex::new(global, prefill, &cfg, vec![1]).is_err());
        assert!(index.compact(&[vec![0.0; 3], vec![0.0; 4]]).is_err());
    }
}
