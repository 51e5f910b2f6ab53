//! The readings of Theorem 1 and their verdicts over a set of audited queries.

use super::QueryAudit;
use serde::Serialize;
use std::collections::BTreeMap;

/// Relative f64 allowance: a reading holds at a query when lhs <= rhs + TOL max_j ||v_j||
/// in the reading's norm (for gamma <= 1 - tau: gamma <= 1 - tau + TOL). Accumulated
/// rounding over L <= 10^6 terms stays far below it.
pub const TOL: f64 = 1e-9;

/// One reading of Theorem 1 (docs/algorithm.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reading {
    /// ||e_i - gamma_i (mu_out - mu_in)||_inf <= TOL max|V| (the exact identity).
    Identity,
    /// ||e_i||_inf <= 2 gamma_i max|V|.
    LinfEntrymax,
    /// ||e_i||_1 <= 2 gamma_i max|V| (the paper's literal statement).
    L1Entrymax,
    /// ||e_i||_1 <= 2 gamma_i max_j ||v_j||_1 (||V||_inf as the induced norm).
    L1Induced,
    /// ||e_i||_2 <= gamma_i diam_2{v_j : j <= i}.
    L2Diameter,
    /// gamma_i <= 1 - tau (the corollary; calibration enforces it on average only).
    GammaTau,
}

impl Reading {
    pub const ALL: [Reading; 6] = [
        Reading::Identity,
        Reading::LinfEntrymax,
        Reading::L1Entrymax,
        Reading::L1Induced,
        Reading::L2Diameter,
        Reading::GammaTau,
    ];

    /// The key used in summary.json.
    pub fn key(self) -> &'static str {
        match self {
            Reading::Identity => "identity",
            Reading::LinfEntrymax => "linf_entrymax",
            Reading::L1Entrymax => "l1_entrymax",
            Reading::L1Induced => "l1_induced",
            Reading::L2Diameter => "l2_diameter",
            Reading::GammaTau => "gamma_le_1_minus_tau",
        }
    }

    /// The inequality in words.
    pub fn statement(self) -> &'static str {
        match self {
            Reading::Identity => "e_i = gamma_i (mu_out - mu_in)",
            Reading::LinfEntrymax => "||e_i||_inf <= 2 gamma_i max|V|",
            Reading::L1Entrymax => "||e_i||_1 <= 2 gamma_i max|V| (literal)",
            Reading::L1Induced => "||e_i||_1 <= 2 gamma_i max_j ||v_j||_1",
            Reading::L2Diameter => "||e_i||_2 <= gamma_i diam_2(V)",
            Reading::GammaTau => "gamma_i <= 1 - tau",
        }
    }

    /// (lhs, rhs, allowance) at one query: the reading holds when lhs <= rhs + allowance.
    /// The allowance is the audit's rounding r times a bound on max_j ||v_j||_p for the
    /// norm of the reading (max|V| for inf, max_j ||v_j||_1 for 1, and
    /// sqrt(max|V| max_j ||v_j||_1) >= max_j ||v_j||_2 for 2), plus what the gamma
    /// allowance moves the right-hand side by. A NaN lhs: not measured there.
    pub fn sides(self, a: &QueryAudit, tau: f64) -> (f64, f64, f64) {
        let (r, g) = (a.rounding, a.gamma_allowance);
        let (inf, one) = (a.vmax_abs, a.vrow_l1_max);
        let two = (inf * one).sqrt();
        match self {
            Reading::Identity => (a.identity_residual, 0.0, r * inf),
            Reading::LinfEntrymax => (a.err_linf, 2.0 * a.gamma * inf, r * inf + 2.0 * g * inf),
            Reading::L1Entrymax => (a.err_l1, 2.0 * a.gamma * inf, r * one + 2.0 * g * inf),
            Reading::L1Induced => (a.err_l1, 2.0 * a.gamma * one, r * one + 2.0 * g * one),
            Reading::L2Diameter => (a.err_l2, a.gamma * a.vdiam_l2, r * two + g * a.vdiam_l2),
            Reading::GammaTau => (a.gamma, 1.0 - tau, g),
        }
    }

    /// Whether the reading holds at one query (false where it was not measured).
    pub fn holds_at(self, a: &QueryAudit, tau: f64) -> bool {
        let (lhs, rhs, tol) = self.sides(a, tau);
        lhs <= rhs + tol
    }

    /// Whether the audit carries this reading's left-hand side.
    pub fn measured_at(self, a: &QueryAudit, tau: f64) -> bool {
        !self.sides(a, tau).0.is_nan()
    }
}

/// Verdict of one reading over all audited queries.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReadingSummary {
    pub statement: &'static str,
    /// No violation among at least one measured query.
    pub holds: bool,
    /// Queries where it could be measured (the identity is not, from outputs alone).
    pub measured: usize,
    /// Measured queries where it fails.
    pub violations: usize,
    /// max lhs / rhs over queries with rhs above the allowance (for the identity:
    /// max residual / max|V|); 0 when no query qualifies.
    pub worst_ratio: f64,
    pub worst_head: Option<usize>,
    pub worst_query: Option<usize>,
}

/// The content of summary.json.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub queries: usize,
    pub tau: f64,
    /// Relative rounding allowance r of the audits (TOL for the f64 oracle, 2^-7 for
    /// bf16 device outputs; the largest over the audits).
    pub tolerance: f64,
    pub mean_gamma: f64,
    pub max_gamma: f64,
    /// Fraction of queries with gamma_i > 1 - tau.
    pub frac_gamma_above_1_minus_tau: f64,
    pub mean_kept_fraction: f64,
    pub readings: BTreeMap<&'static str, ReadingSummary>,
}

/// Worst ratio of one reading and where it occurs.
fn worst(r: Reading, audits: &[QueryAudit], tau: f64) -> (f64, Option<&QueryAudit>) {
    let mut best: (f64, Option<&QueryAudit>) = (0.0, None);
    for a in audits.iter().filter(|a| r.measured_at(a, tau)) {
        let (lhs, rhs, tol) = r.sides(a, tau);
        let ratio = match r {
            Reading::Identity if a.vmax_abs > 0.0 => lhs / a.vmax_abs,
            Reading::Identity => 0.0,
            _ if rhs > tol => lhs / rhs,
            _ => continue,
        };
        if best.1.is_none() || ratio > best.0 {
            best = (ratio, Some(a));
        }
    }
    best
}

/// Summarises the audit of every query under tau.
pub fn summarize(audits: &[QueryAudit], tau: f64) -> Summary {
    let n = audits.len().max(1) as f64;
    let readings = Reading::ALL
        .iter()
        .map(|&r| {
            let measured = audits.iter().filter(|a| r.measured_at(a, tau)).count();
            let violations = audits
                .iter()
                .filter(|a| r.measured_at(a, tau) && !r.holds_at(a, tau))
                .count();
            let (ratio, at) = worst(r, audits, tau);
            (
                r.key(),
                ReadingSummary {
                    statement: r.statement(),
                    holds: measured > 0 && violations == 0,
                    measured,
                    violations,
                    worst_ratio: ratio,
                    worst_head: at.map(|a| a.head),
                    worst_query: at.map(|a| a.query),
                },
            )
        })
        .collect();
    Summary {
        queries: audits.len(),
        tau,
        tolerance: audits.iter().map(|a| a.rounding).fold(TOL, f64::max),
        mean_gamma: audits.iter().map(|a| a.gamma).sum::<f64>() / n,
        max_gamma: audits.iter().map(|a| a.gamma).fold(0.0, f64::max),
        frac_gamma_above_1_minus_tau: audits.iter().filter(|a| a.gamma > 1.0 - tau).count() as f64
            / n,
        mean_kept_fraction: audits
            .iter()
            .map(|a| a.kept as f64 / (a.query + 1) as f64)
            .sum::<f64>()
            / n,
        readings,
    }
}
