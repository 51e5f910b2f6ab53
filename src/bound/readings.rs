//! The readings of Theorem 1 and their verdicts over a set of audited queries.

use super::QueryAudit;
use serde::Serialize;
use std::collections::BTreeMap;

/// Relative f64 allowance: against the oracle a reading holds at a query when
/// lhs <= rhs + TOL max_j ||v_j|| in the reading's norm (for gamma <= 1 - tau:
/// gamma <= 1 - tau + TOL). Accumulated f64 rounding over L <= 10^6 terms
/// (about L 2^-53 < 1.2e-10) stays below it.
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
    /// The allowance is the audit's rounding allowance on ||e_i||_p in the reading's
    /// norm (QueryAudit::allow_*), plus what the gamma allowance moves the right-hand
    /// side by.
    pub fn sides(self, a: &QueryAudit, tau: f64) -> (f64, f64, f64) {
        let g = a.gamma_allowance;
        let (inf, one) = (a.vmax_abs, a.vrow_l1_max);
        match self {
            Reading::Identity => (
                a.identity_residual.unwrap_or(f64::NAN),
                0.0,
                a.allow_identity,
            ),
            Reading::LinfEntrymax => (
                a.err_linf,
                2.0 * a.gamma * inf,
                a.allow_linf + 2.0 * g * inf,
            ),
            Reading::L1Entrymax => (a.err_l1, 2.0 * a.gamma * inf, a.allow_l1 + 2.0 * g * inf),
            Reading::L1Induced => (a.err_l1, 2.0 * a.gamma * one, a.allow_l1 + 2.0 * g * one),
            Reading::L2Diameter => (a.err_l2, a.gamma * a.vdiam_l2, a.allow_l2 + g * a.vdiam_l2),
            Reading::GammaTau => (a.gamma, 1.0 - tau, g),
        }
    }

    /// Whether the reading holds at one query: every value there finite and
    /// lhs <= rhs + allowance (a NaN side fails).
    pub fn holds_at(self, a: &QueryAudit, tau: f64) -> bool {
        let (lhs, rhs, tol) = self.sides(a, tau);
        a.finite && lhs <= rhs + tol
    }

    /// Whether the audit measures this reading (only the identity can be unmeasured,
    /// in an audit made from two outputs alone).
    pub fn measured_at(self, a: &QueryAudit) -> bool {
        self != Reading::Identity || a.identity_residual.is_some()
    }

    /// Whether the check had power at this query: the allowance is below half the bound,
    /// so an error of twice the bound could not pass. The identity (bound 0) has power
    /// when its allowance is below half the largest error it could mask, gamma_i times
    /// twice max|V|.
    pub fn has_power(self, a: &QueryAudit, tau: f64) -> bool {
        let (_, rhs, tol) = self.sides(a, tau);
        match self {
            Reading::Identity => tol < a.gamma * a.vmax_abs,
            _ => tol < 0.5 * rhs,
        }
    }
}

/// Where a reading is at its worst, or first fails on a non-finite value.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Witness {
    pub head: usize,
    pub query: usize,
    pub gamma: f64,
    pub lhs: f64,
    pub rhs: f64,
    pub allowance: f64,
    pub finite: bool,
}

/// Verdict of one reading over all audited queries.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReadingSummary {
    pub statement: &'static str,
    /// "holds", "fails" or "not measured".
    pub verdict: &'static str,
    /// No violation among at least one measured query.
    pub holds: bool,
    /// Queries where it was measured (the identity is not, from outputs alone): each
    /// could have failed it.
    pub measured: usize,
    /// Measured queries where it fails (non-finite ones included).
    pub violations: usize,
    /// Measured queries with a non-finite value.
    pub non_finite: usize,
    /// Measured queries where the check had power (allowance < 0.5 x bound).
    pub with_power: usize,
    /// max lhs / rhs over finite queries with rhs above the allowance (for the
    /// identity: max residual / max|V|); 0 when no query qualifies.
    pub worst_ratio: f64,
    /// The first non-finite query if any, else the query of the worst ratio.
    pub witness: Option<Witness>,
}

/// How an audit was made, recorded in summary.json.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditContext {
    /// Where the sparse outputs were computed ("cpu (f64)", "cuda (bf16, ...)").
    pub backend: String,
    /// What O_i and gamma_i are measured from ("f64 oracle", or the GPU's own dense
    /// pass).
    pub reference: String,
    /// Which (query head, query) rows were audited.
    pub rows: String,
    /// Whether the budgets were calibrated on the audited data itself (true: an
    /// in-sample figure); `None` when not known.
    pub in_sample: Option<bool>,
    /// A profile used despite a configuration mismatch (--allow-profile-mismatch): what
    /// differed.
    pub profile_override: Option<String>,
}

impl Default for AuditContext {
    fn default() -> Self {
        AuditContext {
            backend: "cpu (f64)".into(),
            reference: "f64 oracle".into(),
            rows: "all".into(),
            in_sample: None,
            profile_override: None,
        }
    }
}

/// The content of summary.json.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub queries: usize,
    pub tau: f64,
    pub context: AuditContext,
    /// Largest allowance on ||e_i||_inf relative to max|V| over the audits (1e-9 for the
    /// f64 oracle).
    pub tolerance: f64,
    /// Queries with a non-finite value (each a violation of every reading).
    pub non_finite_queries: usize,
    /// Means and fractions over the finite queries.
    pub mean_gamma: f64,
    pub max_gamma: f64,
    /// Fraction of queries with gamma_i > 1 - tau.
    pub frac_gamma_above_1_minus_tau: f64,
    pub mean_kept_fraction: f64,
    pub readings: BTreeMap<&'static str, ReadingSummary>,
}

impl Summary {
    /// Whether any audited value was non-finite.
    pub fn has_non_finite(&self) -> bool {
        self.non_finite_queries > 0
    }
}

fn witness(r: Reading, a: &QueryAudit, tau: f64) -> Witness {
    let (lhs, rhs, allowance) = r.sides(a, tau);
    Witness {
        head: a.head,
        query: a.query,
        gamma: a.gamma,
        lhs,
        rhs,
        allowance,
        finite: a.finite,
    }
}

/// Worst ratio of one reading over finite queries and where it occurs.
fn worst(r: Reading, audits: &[QueryAudit], tau: f64) -> (f64, Option<&QueryAudit>) {
    let mut best: (f64, Option<&QueryAudit>) = (0.0, None);
    for a in audits.iter().filter(|a| a.finite && r.measured_at(a)) {
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

/// Summarises the audit of every query under tau (context: the f64 oracle's default;
/// callers set their own).
pub fn summarize(audits: &[QueryAudit], tau: f64) -> Summary {
    let finite: Vec<&QueryAudit> = audits.iter().filter(|a| a.finite).collect();
    let n = finite.len().max(1) as f64;
    let readings = Reading::ALL
        .iter()
        .map(|&r| {
            let measured: Vec<&QueryAudit> = audits.iter().filter(|a| r.measured_at(a)).collect();
            let violations = measured.iter().filter(|a| !r.holds_at(a, tau)).count();
            let non_finite = measured.iter().filter(|a| !a.finite).count();
            let with_power = measured
                .iter()
                .filter(|a| a.finite && r.has_power(a, tau))
                .count();
            let (ratio, at) = worst(r, audits, tau);
            let first_bad = measured.iter().find(|a| !a.finite).copied();
            let holds = !measured.is_empty() && violations == 0;
            (
                r.key(),
                ReadingSummary {
                    statement: r.statement(),
                    verdict: match (measured.len(), holds) {
                        (0, _) => "not measured",
                        (_, true) => "holds",
                        _ => "fails",
                    },
                    holds,
                    measured: measured.len(),
                    violations,
                    non_finite,
                    with_power,
                    worst_ratio: ratio,
                    witness: first_bad.or(at).map(|a| witness(r, a, tau)),
                },
            )
        })
        .collect();
    Summary {
        queries: audits.len(),
        tau,
        context: AuditContext::default(),
        tolerance: audits
            .iter()
            .filter(|a| a.finite && a.vmax_abs > 0.0)
            .map(|a| a.allow_linf / a.vmax_abs)
            .fold(TOL, f64::max),
        non_finite_queries: audits.len() - finite.len(),
        mean_gamma: finite.iter().map(|a| a.gamma).sum::<f64>() / n,
        max_gamma: finite.iter().map(|a| a.gamma).fold(0.0, f64::max),
        frac_gamma_above_1_minus_tau: finite.iter().filter(|a| a.gamma > 1.0 - tau).count() as f64
            / n,
        mean_kept_fraction: finite
            .iter()
            .map(|a| a.kept as f64 / (a.query + 1) as f64)
            .sum::<f64>()
            / n,
        readings,
    }
}
