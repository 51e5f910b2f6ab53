//! Token importance of a KV head (docs/algorithm.md §1.1, paper Eq. 5).

use crate::config::{Config, GqaReduce};
use crate::data::Heads;
use crate::reference::causal_row;

/// s [L]: for each query head of KV head `kv`, the mean of the causal softmax rows of
/// its last m = `importance_queries` queries (row i is zero beyond key i); then pooled
/// over the g query heads by `gqa_reduce` (mean or max). With m = 1 this is
/// softmax_j(q_{L-1} . k_j / sqrt(d)) over all j in [0, L).
pub fn importance(heads: &Heads, kv: usize, cfg: &Config) -> Vec<f64> {
    let l = heads.len();
    let m = cfg.importance_queries.min(l);
    let per_head = heads.q_heads_of(kv).map(|h| {
        let mut s = vec![0.0; l];
        for i in l - m..l {
            let (p, _) = causal_row(heads, h, i);
            for (sj, pj) in s.iter_mut().zip(&p) {
                *sj += pj / m as f64;
            }
        }
        s
    });
    pool(per_head, heads.group(), cfg.gqa_reduce)
}

/// Pools per-query-head vectors of equal length by mean or max.
pub fn pool(rows: impl Iterator<Item = Vec<f64>>, g: usize, how: GqaReduce) -> Vec<f64> {
    let mut acc: Option<Vec<f64>> = None;
    for r in rows {
        acc = Some(match acc {
            None => r,
            Some(mut a) => {
                for (x, y) in a.iter_mut().zip(&r) {
                    *x = match how {
                        GqaReduce::Mean => *x + y,
                        GqaReduce::Max => x.max(*y),
                    };
                }
                a
            }
        });
    }
    let mut a = acc.unwrap_or_default();
    if how == GqaReduce::Mean {
        a.iter_mut().for_each(|x| *x /= g as f64);
    }
    a
}
