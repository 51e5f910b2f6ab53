//! Offline head-specific calibration (docs/algorithm.md §2) and the versioned JSON profile
//! that carries its result to the online phase.

pub mod profile;

pub use profile::{data_hash, HeadProfile, LayerProfile, ModelShape, Profile, PROFILE_VERSION};

use crate::config::{Config, Criterion};
use crate::data::Heads;
use crate::error::Result;
use crate::reference::causal_row;
use crate::selection::{candidates, window_start, HeadRanking};
use rayon::prelude::*;

/// Rows (query head, query) handled by one parallel task; fixed so that sums are formed
/// in the same order whatever the thread count.
const CHUNK_ROWS: usize = 32;
/// Chunks whose partial sums are held at once before they are added in order.
const CHUNKS_IN_FLIGHT: usize = 64;

/// Retained score of every candidate under both criteria, for one KV head.
#[derive(Clone, Debug, PartialEq)]
pub struct Retained {
    /// `column`: sum_{k in S} c_k / sum_k c_k, c_k = (1 / (L - k)) sum_{i >= k} P_ik,
    /// S = S_G union [L - w, L), P averaged over the group.
    pub column: Vec<f64>,
    /// `mass`: mean over the group's query heads and queries i of sum_{j in S_i} P_ij.
    pub mass: Vec<f64>,
}

/// Evaluates the retained score of each candidate global set (`globals[m]`, ascending)
/// of KV head `kv`. One pass over the causal rows of the group's query heads.
pub fn retained(heads: &Heads, kv: usize, cfg: &Config, globals: &[Vec<usize>]) -> Retained {
    let (l, g) = (heads.len(), heads.group());
    let m_total = globals.len();
    let rows: Vec<(usize, usize)> = heads
        .q_heads_of(kv)
        .flat_map(|h| (0..l).map(move |i| (h, i)))
        .collect();
    let mut col = vec![0.0; l];
    let mut kept = vec![0.0; m_total];
    let chunk_partial = |chunk: &[(usize, usize)]| {
        let mut col = vec![0.0; l];
        let mut kept = vec![0.0; m_total];
        for &(h, i) in chunk {
            let (p, _) = causal_row(heads, h, i);
            for (c, pj) in col.iter_mut().zip(&p) {
                *c += pj;
            }
            let lo = window_start(cfg.window, i);
            let win: f64 = p[lo..].iter().sum();
            for (k, glob) in kept.iter_mut().zip(globals) {
                let n = glob.partition_point(|&j| j < lo);
                *k += win + glob[..n].iter().map(|&j| p[j]).sum::<f64>();
            }
        }
        (col, kept)
    };
    for group in rows.chunks(CHUNK_ROWS * CHUNKS_IN_FLIGHT) {
        let parts: Vec<_> = group.par_chunks(CHUNK_ROWS).map(chunk_partial).collect();
        for (pc, pk) in parts {
            col.iter_mut().zip(&pc).for_each(|(a, b)| *a += b);
            kept.iter_mut().zip(&pk).for_each(|(a, b)| *a += b);
        }
    }
    // c_k = mean over the g heads of (1 / n_k) sum_{i >= k} P_ik.
    let c: Vec<f64> = col
        .iter()
        .enumerate()
        .map(|(k, s)| s / (g * (l - k)) as f64)
        .collect();
    let total: f64 = c.iter().sum();
    let tail = l.saturating_sub(cfg.window);
    let tail_sum: f64 = c[tail..].iter().sum();
    let column = globals
        .iter()
        .map(|glob| (tail_sum + glob.iter().map(|&j| c[j]).sum::<f64>()) / total)
        .collect();
    let mass = kept.iter().map(|k| k / (g * l) as f64).collect();
    Retained { column, mass }
}

/// Calibrates every KV head of one layer: the first candidate (by expected budget) whose
/// retained score under `cfg.criterion` reaches tau, or the last one, marked as failed.
pub fn calibrate_layer(heads: &Heads, cfg: &Config, layer: usize) -> Result<LayerProfile> {
    cfg.validate()?;
    let cands = candidates(cfg)?;
    let heads_out = (0..heads.num_kv_heads())
        .map(|kv| {
            let ranking = HeadRanking::new(heads, kv, cfg);
            let globals: Vec<Vec<usize>> =
                cands.iter().map(|c| ranking.select(&c.budget).1).collect();
            let ret = retained(heads, kv, cfg, &globals);
            let scores = match cfg.criterion {
                Criterion::Column => &ret.column,
                Criterion::Mass => &ret.mass,
            };
            let pick = scores.iter().position(|&a| a >= cfg.tau);
            let idx = pick.unwrap_or(cands.len() - 1);
            let c = &cands[idx];
            HeadProfile {
                kv_head: kv,
                m: c.m,
                mu: c.mu,
                sigma: c.sigma,
                expected_budget: c.budget.expected(),
                retained: scores[idx],
                reached_tau: pick.is_some(),
                global_tokens: globals[idx].len(),
                retained_column: ret.column.clone(),
                retained_mass: ret.mass.clone(),
            }
        })
        .collect();
    Ok(LayerProfile {
        layer,
        heads: heads_out,
        data_hash: Some(data_hash(heads)),
    })
}

/// Calibrates one layer and wraps it in a [`Profile`].
pub fn calibrate(heads: &Heads, cfg: &Config, layer: usize) -> Result<Profile> {
    Ok(Profile::new(
        ModelShape::of(heads),
        cfg.clone(),
        heads.len(),
        vec![calibrate_layer(heads, cfg, layer)?],
    ))
}
