//! Writing the bound audit (queries.csv, summary.json) and printing verdict tables.

use crate::bound::{QueryAudit, Summary};
use crate::data::write_new;
use crate::error::{Result, TcaError};
use std::fmt::Write as _;
use std::path::Path;

/// The columns of queries.csv, in order: everything needed to recompute each verdict
/// (`Reading::sides`); identity_residual is empty where not measured.
pub const QUERY_COLUMNS: &str = "head,query,gamma,kept,err_l1,err_linf,err_l2,vmax_abs,vrow_l1_max,vdiam_l2,identity_residual,allow_linf,allow_l1,allow_l2,allow_identity,gamma_allowance,finite";

/// queries.csv text: one row per audited (query head, query).
pub fn queries_csv(audits: &[QueryAudit]) -> String {
    let mut s = String::with_capacity(audits.len() * 200);
    s.push_str(QUERY_COLUMNS);
    s.push('\n');
    for a in audits {
        let _ = writeln!(
            s,
            "{},{},{:e},{},{:e},{:e},{:e},{:e},{:e},{:e},{},{:e},{:e},{:e},{:e},{:e},{}",
            a.head,
            a.query,
            a.gamma,
            a.kept,
            a.err_l1,
            a.err_linf,
            a.err_l2,
            a.vmax_abs,
            a.vrow_l1_max,
            a.vdiam_l2,
            a.identity_residual
                .map(|r| format!("{r:e}"))
                .unwrap_or_default(),
            a.allow_linf,
            a.allow_l1,
            a.allow_l2,
            a.allow_identity,
            a.gamma_allowance,
            a.finite
        );
    }
    s
}

/// Writes DIR/queries.csv and DIR/summary.json (refusing to replace them unless `force`).
/// `extra` adds keys to summary.json (e.g. the GPU's self-audit, decode statistics).
pub fn write_audit(
    dir: &Path,
    audits: &[QueryAudit],
    summary: &Summary,
    extra: &[(&str, serde_json::Value)],
    force: bool,
) -> Result<()> {
    let mut value = serde_json::to_value(summary)
        .map_err(|e| TcaError::Invalid(format!("cannot encode summary: {e}")))?;
    if let Some(obj) = value.as_object_mut() {
        for (k, v) in extra {
            obj.insert((*k).to_string(), v.clone());
        }
    }
    let json = serde_json::to_string_pretty(&value)
        .map_err(|e| TcaError::Invalid(format!("cannot encode summary: {e}")))?;
    let (csv_path, json_path) = (dir.join("queries.csv"), dir.join("summary.json"));
    for p in [&csv_path, &json_path] {
        if p.exists() && !force {
            return Err(TcaError::WouldOverwrite(p.clone()));
        }
    }
    write_new(&csv_path, queries_csv(audits).as_bytes(), force)?;
    write_new(&json_path, json.as_bytes(), force)
}

/// The error a command returns after writing its tables when an audited value was not
/// finite: the count and the first witness (exit code 1).
pub fn non_finite_error(what: &str, audits: &[QueryAudit]) -> Option<TcaError> {
    let bad: Vec<&QueryAudit> = audits.iter().filter(|a| !a.finite).collect();
    bad.first().map(|a| {
        TcaError::Verdict(format!(
            "{what}: {} of {} audited queries have a non-finite output, log-sum-exp or error \
             (first: head {}, query {}; gamma = {}, ||e||_inf = {}); every reading fails there",
            bad.len(),
            audits.len(),
            a.head,
            a.query,
            a.gamma,
            a.err_linf
        ))
    })
}

/// The per-reading verdict table: verdict, queries measured (each could have failed
/// it), violations, queries with power, worst ratio and its witness.
pub fn verdict_table(summary: &Summary) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<22} {:>6} {:>9} {:>10} {:>9} {:>12}  {:<12} statement",
        "reading", "holds", "measured", "violations", "power", "worst_ratio", "witness(h,i)"
    );
    for (key, r) in &summary.readings {
        let at = r
            .witness
            .as_ref()
            .map(|w| format!("({},{})", w.head, w.query))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:<22} {:>6} {:>9} {:>10} {:>9} {:>12.4e}  {:<12} {}",
            key,
            match (r.measured, r.holds) {
                (0, _) => "n/a",
                (_, true) => "yes",
                _ => "NO",
            },
            r.measured,
            r.violations,
            r.with_power,
            r.worst_ratio,
            at,
            r.statement
        );
    }
    let _ = writeln!(
        s,
        "queries {}  non-finite {}  mean kept fraction {:.4}  mean gamma {:.3e}  max gamma {:.3e}  gamma > 1 - tau: {:.2}%",
        summary.queries,
        summary.non_finite_queries,
        summary.mean_kept_fraction,
        summary.mean_gamma,
        summary.max_gamma,
        100.0 * summary.frac_gamma_above_1_minus_tau
    );
    let _ = writeln!(
        s,
        "backend {}; reference {}; rows {}; in-sample {}",
        summary.context.backend,
        summary.context.reference,
        summary.context.rows,
        match summary.context.in_sample {
            Some(true) => "yes (budgets calibrated on this data)",
            Some(false) => "no",
            None => "unknown",
        }
    );
    s
}
