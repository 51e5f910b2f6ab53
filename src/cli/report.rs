//! Writing the bound audit (queries.csv, summary.json) and printing verdict tables.

use crate::bound::{QueryAudit, Summary};
use crate::data::write_new;
use crate::error::{Result, TcaError};
use std::fmt::Write as _;
use std::path::Path;

/// The columns of queries.csv, in order.
pub const QUERY_COLUMNS: &str = "head,query,gamma,kept,err_l1,err_linf,err_l2,vmax_abs,vrow_l1_max";

/// queries.csv text: one row per (query head, query).
pub fn queries_csv(audits: &[QueryAudit]) -> String {
    let mut s = String::with_capacity(audits.len() * 96);
    s.push_str(QUERY_COLUMNS);
    s.push('\n');
    for a in audits {
        let _ = writeln!(
            s,
            "{},{},{:e},{},{:e},{:e},{:e},{:e},{:e}",
            a.head,
            a.query,
            a.gamma,
            a.kept,
            a.err_l1,
            a.err_linf,
            a.err_l2,
            a.vmax_abs,
            a.vrow_l1_max
        );
    }
    s
}

/// Writes DIR/queries.csv and DIR/summary.json (refusing to replace them unless `force`).
pub fn write_audit(
    dir: &Path,
    audits: &[QueryAudit],
    summary: &Summary,
    force: bool,
) -> Result<()> {
    let json = serde_json::to_string_pretty(summary)
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

/// The per-reading verdict table.
pub fn verdict_table(summary: &Summary) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<22} {:>6} {:>10} {:>12}  {:<12} statement",
        "reading", "holds", "violations", "worst_ratio", "worst(h,i)"
    );
    for (key, r) in &summary.readings {
        let at = match (r.worst_head, r.worst_query) {
            (Some(h), Some(i)) => format!("({h},{i})"),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "{:<22} {:>6} {:>10} {:>12.4e}  {:<12} {}",
            key,
            match (r.measured, r.holds) {
                (0, _) => "n/a",
                (_, true) => "yes",
                _ => "NO",
            },
            r.violations,
            r.worst_ratio,
            at,
            r.statement
        );
    }
    let _ = writeln!(
        s,
        "queries {}  mean kept fraction {:.4}  mean gamma {:.3e}  max gamma {:.3e}  gamma > 1 - tau: {:.2}%",
        summary.queries,
        summary.mean_kept_fraction,
        summary.mean_gamma,
        summary.max_gamma,
        100.0 * summary.frac_gamma_above_1_minus_tau
    );
    s
}
