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
        let mut idx: Vec<usize> = (0..b).collect();
        idx.sort_by(|&x, &y| score[g + y].total_cmp(&score[g + x]).then(x.cmp(&y)));
        idx.truncate(self.block_keep);
        idx.sort_unstable();
        for &n in &idx {
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
    audits.sort_by_key(|a| (a.head, a.query));
    let n = audits.len().max(1) as f64;
    Ok(DecodeReport {
        prefill_len,
        steps,
        full_tokens: heads.len(),
        full_kv_bytes: heads.len() * 2 * heads.dim() * std::mem::size_of::<f64>(),
        mean_gamma: audits.iter().map(|a| a.gamma).sum::<f64>() / n,
        max_gamma: audits.iter().map(|a| a.gamma).fold(0.0, f64::max),
        max_rel_err: audits.iter().map(|a| a.rel_err()).fold(0.0, f64::max),
        seconds_per_step: seconds / steps as f64,
        heads: heads_out,
        audits,
    })
}
