//! Statistics of measured results.

/// The Wilson score interval of a proportion: `k` successes in `n` trials at normal
/// quantile `z` (1.96 for 95 %): centre (p + z^2/2n) / (1 + z^2/n), half-width
/// z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n), p = k/n. (0, 1) when n = 0.
pub fn wilson(k: usize, n: usize, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (nf, p) = (n as f64, k.min(n) as f64 / n as f64);
    let z2 = z * z;
    let den = 1.0 + z2 / nf;
    let centre = (p + z2 / (2.0 * nf)) / den;
    let half = z * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt() / den;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::wilson;

    #[test]
    fn wilson_matches_known_values() {
        // 8 of 10 at 95 %: [0.4902, 0.9433] (Wilson 1927; e.g. Newcombe 1998, table I).
        let (lo, hi) = wilson(8, 10, 1.96);
        assert!(
            (lo - 0.4902).abs() < 1e-4 && (hi - 0.9433).abs() < 1e-4,
            "{lo} {hi}"
        );
        // 0 of 20: lower bound 0, upper 0.1611.
        let (lo, hi) = wilson(0, 20, 1.96);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.1611).abs() < 1e-4, "{hi}");
        // Symmetric: k of n mirrors n - k of n.
        let (a, b) = wilson(3, 17, 1.96);
        let (c, d) = wilson(14, 17, 1.96);
        assert!((a - (1.0 - d)).abs() < 1e-12 && (b - (1.0 - c)).abs() < 1e-12);
        assert_eq!(wilson(0, 0, 1.96), (0.0, 1.0));
        let (lo, hi) = wilson(20, 20, 1.96);
        assert!(hi == 1.0 && lo > 0.83);
    }
}
