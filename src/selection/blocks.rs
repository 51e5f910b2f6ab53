//! Candidate blocks, their redundancy scores (docs/algorithm.md §1.3, Eq. 6), ranking (§1.4).

use crate::config::{Config, MassNorm};

/// The candidate region [0, L - w) cut into blocks of b (the last may be partial).
/// Empty when L <= w.
pub fn candidate_blocks(len: usize, cfg: &Config) -> Vec<std::ops::Range<usize>> {
    let n = len.saturating_sub(cfg.window);
    (0..n.div_ceil(cfg.block_size))
        .map(|j| j * cfg.block_size..((j + 1) * cfg.block_size).min(n))
        .collect()
}

/// Scores of one block: mass m_j = sum s_i, concentration c_j = 1 - sum s_i^2 / m_j^2
/// (0 when m_j = 0), and h_j = (1 - alpha) m'_j + alpha c_j, with m'_j = m_j or
/// m_j / max_j m_j (`mass_norm`).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockScores {
    pub mass: Vec<f64>,
    pub concentration: Vec<f64>,
    pub score: Vec<f64>,
}

/// Redundancy scores of `blocks` under importance `s`.
pub fn redundancy(s: &[f64], blocks: &[std::ops::Range<usize>], cfg: &Config) -> BlockScores {
    let mass: Vec<f64> = blocks.iter().map(|r| s[r.clone()].iter().sum()).collect();
    let concentration = blocks
        .iter()
        .zip(&mass)
        .map(|(r, &m)| {
            if m > 0.0 {
                // sum (s_i / m)^2, not sum s_i^2 / m^2: m^2 underflows for tiny masses.
                1.0 - s[r.clone()].iter().map(|x| (x / m) * (x / m)).sum::<f64>()
            } else {
                0.0
            }
        })
        .collect::<Vec<_>>();
    let max_mass = mass.iter().copied().fold(0.0, f64::max);
    let score = mass
        .iter()
        .zip(&concentration)
        .map(|(&m, &c)| {
            let m = match cfg.mass_norm {
                MassNorm::None => m,
                MassNorm::Max if max_mass > 0.0 => m / max_mass,
                MassNorm::Max => 0.0,
            };
            (1.0 - cfg.alpha) * m + cfg.alpha * c
        })
        .collect();
    BlockScores {
        mass,
        concentration,
        score,
    }
}

/// Block indices by descending score; ties go to the lower block index. Entry r is the
/// block of rank r.
pub fn rank(score: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..score.len()).collect();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    order
}

/// The `t` positions of largest `s` within `block` (ties: lower index), ascending.
pub fn top_t(s: &[f64], block: std::ops::Range<usize>, t: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = block.collect();
    idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
    idx.truncate(t);
    idx.sort_unstable();
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_last_block_and_empty_region() {
        let cfg = Config {
            block_size: 4,
            window: 3,
            ..Config::default()
        };
        assert_eq!(candidate_blocks(13, &cfg), vec![0..4, 4..8, 8..10]);
        assert!(candidate_blocks(3, &cfg).is_empty());
    }

    #[test]
    fn ranking_breaks_ties_by_lower_index() {
        assert_eq!(rank(&[0.5, 0.9, 0.5, 0.1]), vec![1, 0, 2, 3]);
    }

    #[test]
    fn top_t_breaks_ties_by_lower_index() {
        assert_eq!(top_t(&[0.1, 0.3, 0.3, 0.2, 0.3], 0..5, 2), vec![1, 2]);
    }
}
