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
        let sinks = self.sinks.min(k.saturating_sub(1));
        let recent_from = (i + 1 - (k - sinks)).max(sinks);
        (0..sinks).chain(recent_from..=i).collect()
    }
}

/// Uniform per-block top-k with TCA's ranking and window: every block of every KV head
/// keeps round(|S_G| / nb) tokens (at least 1), so the total matches TCA's up to rounding.
pub fn block_topk(heads: &Heads, cfg: &Config, tca: &Selection) -> Result<Selection> {
    let nb = candidate_blocks(heads.len(), cfg).len().max(1);
    let budgets = tca
        .heads
        .iter()
        .map(|h| {
            let k = ((h.global.len() as f64 / nb as f64).round() as usize).clamp(1, cfg.block_size);
            Budget::point(k, cfg.block_size)
        })
        .collect::<Result<Vec<_>>>()?;
    select(heads, cfg, &budgets)
}

/// Cumulative threshold: per KV head, the candidate-region positions by descending
/// importance until their importance reaches tau of the region's total, plus the window.
pub fn cumulative_threshold(tca: &Selection, tau: f64) -> Selection {
    let mut out = tca.clone();
    let n = tca.len.saturating_sub(tca.window);
    for h in &mut out.heads {
        let s = &h.ranking.importance;
        let total: f64 = s[..n].iter().sum();
        let mut idx: Vec<usize> = (0..n).collect();
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
        h.global = keep;
        h.block_budgets.clear();
    }
    out
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
