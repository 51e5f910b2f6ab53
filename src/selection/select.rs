//! Online core-context selection (docs/algorithm.md §1): importance, ranking, per-block budgets
//! and the per-query key sets S_i = W_i union {j in S_G : j <= i}.

use super::blocks::{candidate_blocks, rank, redundancy, top_t, BlockScores};
use super::budget::Budget;
use super::importance::importance;
use crate::config::Config;
use crate::data::Heads;
use crate::error::{Result, TcaError};
use rayon::prelude::*;
use std::ops::Range;

/// What a KV head's selection needs before a budget is chosen: importance s [L], the
/// candidate blocks, their scores and their ranking. Computed once, reused for every
/// candidate budget of the calibration.
#[derive(Clone, Debug)]
pub struct HeadRanking {
    pub importance: Vec<f64>,
    pub blocks: Vec<Range<usize>>,
    pub scores: BlockScores,
    /// order[r] is the block of rank r.
    pub order: Vec<usize>,
}

impl HeadRanking {
    /// Steps 1-4 of docs/algorithm.md §1 for KV head `kv`.
    pub fn new(heads: &Heads, kv: usize, cfg: &Config) -> Self {
        let importance = importance(heads, kv, cfg);
        let blocks = candidate_blocks(heads.len(), cfg);
        let scores = redundancy(&importance, &blocks, cfg);
        let order = rank(&scores.score);
        HeadRanking {
            importance,
            blocks,
            scores,
            order,
        }
    }

    /// Steps 5-6: the budget t of each block (indexed by block) and the global set S_G
    /// (ascending positions in [0, L - w)).
    pub fn select(&self, budget: &Budget) -> (Vec<usize>, Vec<usize>) {
        let nb = self.blocks.len();
        let mut t = vec![0; nb];
        let by_rank = budget.block_budgets(nb);
        for (r, &j) in self.order.iter().enumerate() {
            t[j] = by_rank[r].min(self.blocks[j].len());
        }
        let global = self
            .blocks
            .iter()
            .zip(&t)
            .flat_map(|(blk, &tj)| top_t(&self.importance, blk.clone(), tj))
            .collect();
        (t, global)
    }
}

/// The selection of one KV head.
#[derive(Clone, Debug)]
pub struct HeadSelection {
    pub ranking: HeadRanking,
    /// Budget t_j of block j (after clipping to its size).
    pub block_budgets: Vec<usize>,
    /// S_G, ascending.
    pub global: Vec<usize>,
}

/// The selection of every KV head of a layer, with the local window w.
#[derive(Clone, Debug)]
pub struct Selection {
    pub window: usize,
    pub len: usize,
    /// GQA group g: query head h reads KV head h / g.
    pub group: usize,
    pub heads: Vec<HeadSelection>,
}

/// What a selector keeps: S_i for every (query head h, query i), ascending, unique and
/// within [0, i]. TCA's [`Selection`] and the peer policies implement it, so the sparse
/// attention, the bound audit and the experiments treat every policy alike.
pub trait KeySets: Sync {
    /// (query heads, L) the key sets were made for.
    fn shape(&self) -> (usize, usize);
    /// S_i of query head `h`.
    fn keys(&self, h: usize, i: usize) -> Vec<usize>;
}

impl KeySets for Selection {
    fn shape(&self) -> (usize, usize) {
        (self.heads.len() * self.group, self.len)
    }
    fn keys(&self, h: usize, i: usize) -> Vec<usize> {
        self.kv_keys(h / self.group, i).collect()
    }
}

impl Selection {
    /// S_i of KV head `kv` in ascending order: the global positions before the window,
    /// then W_i = [max(0, i - w + 1), i]. No position appears twice.
    pub fn kv_keys(&self, kv: usize, i: usize) -> impl Iterator<Item = usize> + '_ {
        key_set(&self.heads[kv].global, self.window, i)
    }

    /// |S_i| for KV head `kv`.
    pub fn kept(&self, kv: usize, i: usize) -> usize {
        kept_count(&self.heads[kv].global, self.window, i)
    }
}

/// First position of query i's local window: max(0, i - w + 1).
pub fn window_start(window: usize, i: usize) -> usize {
    (i + 1).saturating_sub(window)
}

/// |S_i| = |{j in `global` : j < lo}| + (i + 1 - lo), lo = max(0, i - w + 1) (`global`
/// ascending): the size of [`key_set`] without building it.
pub fn kept_count(global: &[usize], window: usize, i: usize) -> usize {
    let lo = window_start(window, i);
    global.partition_point(|&j| j < lo) + (i + 1 - lo)
}

/// |S_i| of every query i in 0..len ([`kept_count`]): the per-query budget k_i at which
/// the peers of docs/algorithm.md §5 run (the GPU uploads it as `[Hkv, L]`).
pub fn kept_counts(global: &[usize], window: usize, len: usize) -> Vec<usize> {
    (0..len).map(|i| kept_count(global, window, i)).collect()
}

/// S_i = {j in `global` : j < lo} followed by [lo, i], lo = max(0, i - w + 1).
pub fn key_set(global: &[usize], window: usize, i: usize) -> impl Iterator<Item = usize> + '_ {
    let lo = window_start(window, i);
    let n = global.partition_point(|&j| j < lo);
    global[..n].iter().copied().chain(lo..=i)
}

/// Runs docs/algorithm.md §1 for every KV head with its budget distribution (one per KV head,
/// each over k = 1..b).
pub fn select(heads: &Heads, cfg: &Config, budgets: &[Budget]) -> Result<Selection> {
    cfg.validate()?;
    if budgets.len() != heads.num_kv_heads() {
        return Err(TcaError::Shape(format!(
            "{} budgets given for {} KV heads",
            budgets.len(),
            heads.num_kv_heads()
        )));
    }
    if let Some(b) = budgets.iter().find(|b| b.block_size() != cfg.block_size) {
        return Err(TcaError::Config(format!(
            "a budget is defined over b = {} but the configuration has block_size = {}",
            b.block_size(),
            cfg.block_size
        )));
    }
    let heads_sel = (0..heads.num_kv_heads())
        .into_par_iter()
        .map(|kv| {
            let ranking = HeadRanking::new(heads, kv, cfg);
            let (block_budgets, global) = ranking.select(&budgets[kv]);
            HeadSelection {
                ranking,
                block_budgets,
                global,
            }
        })
        .collect();
    Ok(Selection {
        window: cfg.window,
        len: heads.len(),
        group: heads.group(),
        heads: heads_sel,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_counts_are_the_key_set_sizes() {
        let global = [0, 3, 4, 9, 12];
        for window in [1, 2, 5, 30] {
            let k = kept_counts(&global, window, 20);
            assert_eq!(k.len(), 20);
            for (i, &n) in k.iter().enumerate() {
                assert_eq!(n, key_set(&global, window, i).count(), "w {window} i {i}");
                assert!(n >= 1 && n <= i + 1);
            }
        }
        // Window 2, i = 10: S_G below 9 ({0, 3, 4}) and [9, 10].
        assert_eq!(kept_counts(&global, 2, 11)[10], 5);
        assert!(kept_counts(&global, 2, 0).is_empty());
    }
}
