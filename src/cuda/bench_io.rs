//! Host-side pieces of the GPU benchmark that need no device: how many copies of a
//! decode cache keep it out of L2, and the file that hands the selected S_G to the
//! FlexAttention baseline (bench/sdpa_baseline.py).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Copies of a cache of `bytes` to rotate over so that the copies together exceed twice
/// the L2 size: `floor(2 L2 / bytes) + 1` (at least 1; 1 when one copy already does).
pub fn copies_out_of_l2(bytes: usize, l2: usize) -> usize {
    if bytes == 0 {
        return 1;
    }
    (2 * l2) / bytes + 1
}

/// The sparsity of one timed layer, as the FlexAttention baseline rebuilds it: query i
/// of query head h (KV head h / g) attends to key j <= i when i - j < window, or when j
/// is in `global[h / g]` and j <= i - window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelectionRecord {
    pub model: String,
    pub len: usize,
    pub hq: usize,
    pub hkv: usize,
    pub dim: usize,
    pub window: usize,
    pub block: usize,
    /// S_G per KV head, ascending positions in [0, L - window).
    pub global: Vec<Vec<usize>>,
}

impl SelectionRecord {
    /// The file name the bench writes and the baseline reads: sg_{model}_{L}.json.
    pub fn file_name(model: &str, len: usize) -> String {
        format!("sg_{model}_{len}.json")
    }

    /// Checks the record's invariants (one set per KV head, ascending, below L - w).
    pub fn validate(&self) -> Result<(), String> {
        if self.hkv == 0 || self.hq % self.hkv != 0 || self.global.len() != self.hkv {
            return Err(format!(
                "{} sets for Hq = {}, Hkv = {}",
                self.global.len(),
                self.hq,
                self.hkv
            ));
        }
        let lim = self.len.saturating_sub(self.window);
        for (kv, s) in self.global.iter().enumerate() {
            if !s.windows(2).all(|w| w[0] < w[1]) || s.last().is_some_and(|&p| p >= lim) {
                return Err(format!(
                    "S_G of KV head {kv} is not ascending within [0, {lim})"
                ));
            }
        }
        Ok(())
    }

    /// Writes the record as JSON under `dir`; returns the path.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        self.validate().map_err(std::io::Error::other)?;
        let path = dir.join(Self::file_name(&self.model, self.len));
        std::fs::write(&path, serde_json::to_string(self)?)?;
        Ok(path)
    }

    /// Kept (query, key) pairs over all query heads: per query head, sum_i min(i + 1, w)
    /// window keys plus, for each p in S_G, the L - (p + w) queries that see p.
    pub fn kept_pairs(&self) -> f64 {
        let g = (self.hq / self.hkv.max(1)) as f64;
        let (l, w) = (self.len, self.window);
        let win: f64 = (0..l).map(|i| (i + 1).min(w) as f64).sum();
        self.global
            .iter()
            .map(|s| {
                let glob: f64 = s.iter().map(|&p| l.saturating_sub(p + w) as f64).sum();
                g * (win + glob)
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_exceed_twice_l2() {
        let l2 = 60 << 20;
        for bytes in [
            1usize,
            1000,
            3 << 20,
            59 << 20,
            60 << 20,
            121 << 20,
            1 << 30,
        ] {
            let n = copies_out_of_l2(bytes, l2);
            assert!(n * bytes > 2 * l2, "{bytes}: {n}");
            assert!(
                n == 1 || (n - 1) * bytes <= 2 * l2,
                "{bytes}: {n} more than needed"
            );
        }
        assert_eq!(copies_out_of_l2(0, l2), 1);
        assert_eq!(copies_out_of_l2(200 << 20, l2), 1);
    }

    fn record() -> SelectionRecord {
        SelectionRecord {
            model: "toy".into(),
            len: 10,
            hq: 4,
            hkv: 2,
            dim: 64,
            window: 4,
            block: 2,
            global: vec![vec![0, 3], vec![5]],
        }
    }

    #[test]
    fn selection_file_round_trips_and_counts_pairs() {
        let r = record();
        let dir = std::env::temp_dir().join(format!("tca-bench-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = r.write(&dir).unwrap();
        assert!(path.ends_with("sg_toy_10.json"));
        let back: SelectionRecord =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, r);
        std::fs::remove_dir_all(&dir).unwrap();
        // Brute force over (h, i, j) with the rule in the type's doc.
        let mut n = 0usize;
        for h in 0..r.hq {
            let kv = h / (r.hq / r.hkv);
            for i in 0..r.len {
                for j in 0..=i {
                    let win = i - j < r.window;
                    let glob = r.global[kv].contains(&j) && j + r.window <= i;
                    n += (win || glob) as usize;
                }
            }
        }
        assert_eq!(r.kept_pairs(), n as f64);
    }

    #[test]
    fn invalid_records_are_refused() {
        let mut r = record();
        r.global = vec![vec![3, 0], vec![]];
        assert!(r.validate().is_err());
        r.global = vec![vec![6], vec![]];
        assert!(r.validate().is_err(), "6 >= L - w");
        r.global = vec![vec![]];
        assert!(r.validate().is_err(), "one set for two KV heads");
        let dir = std::env::temp_dir();
        assert!(r.write(&dir).is_err());
    }
}
