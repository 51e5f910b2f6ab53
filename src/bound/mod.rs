//! Theorem 1, checked in each of its readings (docs/algorithm.md §4, docs/theorem.md).
//!
//! For query i with key set S_i: gamma_i = sum_{j <= i, j not in S_i} P_ij (the softmax
//! mass TCA omits, summed directly from the exact row, never as 1 - kept) and
//! e_i = O_i - O~_i. Identity: e_i = gamma_i (mu_out - mu_in), with mu_out, mu_in the
//! P-weighted means of v over the omitted and kept keys. The norms of V range over the
//! keys the query sees (j <= i).
//!
//! Every audit against the oracle takes the sparse output O~_i from the path that
//! computed it (the oracle's sparse attention, the decode cache, the GPU) and the
//! claimed S_i separately, and derives gamma_i, mu_in and mu_out from the exact row P_i
//! alone: a sparse path that attended to another set than it claims breaks the
//! identity. A non-finite value anywhere is a violation of every reading.

pub mod counterexample;
pub mod layers;
pub mod precision;
pub mod readings;

pub use precision::Precision;
pub use readings::{summarize, AuditContext, Reading, ReadingSummary, Summary, Witness, TOL};

use crate::data::Heads;
use crate::error::{Result, TcaError};
use crate::reference::softmax::{scores, softmax_in_place};
use crate::reference::Attention;
use crate::selection::sparse::check_shape;
use crate::selection::{sparse_attention, KeySets};
use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rayon::prelude::*;

/// Everything measured at one (query head, query).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct QueryAudit {
    pub head: usize,
    pub query: usize,
    /// Omitted softmax mass gamma_i.
    pub gamma: f64,
    /// |S_i|.
    pub kept: usize,
    pub err_l1: f64,
    pub err_linf: f64,
    pub err_l2: f64,
    /// max |V_jc| over j <= i.
    pub vmax_abs: f64,
    /// max_j ||v_j||_1 over j <= i (the induced infinity norm of V's visible rows).
    pub vrow_l1_max: f64,
    /// diam_2 {v_j : j <= i}.
    pub vdiam_l2: f64,
    /// ||e_i - gamma_i (mu_out - mu_in)||_inf; `None` where not measured (an audit made
    /// from two outputs alone has no mu_in, mu_out).
    pub identity_residual: Option<f64>,
    /// ||O_i||_2 of the exact output (for relative errors).
    pub out_l2: f64,
    /// Rounding allowances on ||e_i||_inf, ||e_i||_1 and ||e_i||_2 of how O_i and O~_i
    /// were computed ([`precision`]).
    pub allow_linf: f64,
    pub allow_l1: f64,
    pub allow_l2: f64,
    /// Allowance on the identity residual.
    pub allow_identity: f64,
    /// Absolute allowance on gamma_i.
    pub gamma_allowance: f64,
    /// Every output, log-sum-exp and error entry at this query is finite.
    pub finite: bool,
    /// The certificate's gamma_hat_i >= gamma_i from the kept logits and per-chunk key
    /// bounds alone (docs/theorem.md, "The certificate"); `None` where not computed.
    pub gamma_hat: Option<f64>,
}

impl QueryAudit {
    /// ||e_i||_2 / ||O_i||_2 (0 when both vanish).
    pub fn rel_err(&self) -> f64 {
        if self.out_l2 > 0.0 {
            self.err_l2 / self.out_l2
        } else {
            self.err_l2
        }
    }
}

/// Per-position prefix statistics of one KV head: max |entry|, max row l1 norm and l2
/// diameter of V over rows [0, i], max ||k_j||_2 over [0, i] (for logit bounds) and
/// max_{j <= i} |v_jc| per column c ([L, d]).
#[derive(Clone, Debug)]
pub struct PrefixStats {
    pub max_abs: Vec<f64>,
    pub max_row_l1: Vec<f64>,
    pub diam_l2: Vec<f64>,
    pub max_key_l2: Vec<f64>,
    pub col_abs_max: Array2<f64>,
}

fn running_max(x: impl IntoIterator<Item = f64>) -> Vec<f64> {
    x.into_iter()
        .scan(0.0f64, |m, y| {
            *m = m.max(y);
            Some(*m)
        })
        .collect()
}

impl PrefixStats {
    /// O(L^2 d) for the diameter: row i's farthest earlier row, then a running max.
    pub fn new(k: ArrayView2<'_, f64>, v: ArrayView2<'_, f64>) -> Self {
        let l = v.nrows();
        let far: Vec<f64> = (0..l)
            .into_par_iter()
            .map(|i| {
                (0..i)
                    .map(|j| {
                        let d = &v.row(i) - &v.row(j);
                        d.dot(&d)
                    })
                    .fold(0.0, f64::max)
                    .sqrt()
            })
            .collect();
        Self::with_diameters(k, v, running_max(far))
    }

    /// The O(L d) statistics, with the prefix diameters `diam_l2` [L] computed elsewhere
    /// (on the GPU for long sequences: `cuda::audit`).
    pub fn with_diameters(
        k: ArrayView2<'_, f64>,
        v: ArrayView2<'_, f64>,
        diam_l2: Vec<f64>,
    ) -> Self {
        let l = v.nrows();
        let mut col_abs_max = v.mapv(f64::abs);
        for i in 1..l {
            let (prev, mut cur) = col_abs_max.multi_slice_mut((s![i - 1, ..], s![i, ..]));
            cur.zip_mut_with(&prev, |c, p| *c = c.max(*p));
        }
        PrefixStats {
            max_abs: running_max(
                v.rows()
                    .into_iter()
                    .map(|r| r.fold(0.0f64, |m, x| m.max(x.abs()))),
            ),
            max_row_l1: running_max(
                v.rows()
                    .into_iter()
                    .map(|r| r.fold(0.0, |m, x| m + x.abs())),
            ),
            diam_l2,
            max_key_l2: running_max(k.rows().into_iter().map(|r| r.dot(&r).sqrt())),
            col_abs_max,
        }
    }

    /// One [`PrefixStats`] per KV head of `heads`.
    pub fn of(heads: &Heads) -> Vec<PrefixStats> {
        (0..heads.num_kv_heads())
            .map(|kv| PrefixStats::new(heads.k(kv), heads.v(kv)))
            .collect()
    }

    /// A bound on |q . k_j| / sqrt(d) over j <= i (Cauchy-Schwarz).
    fn logit_bound(&self, q: ArrayView1<'_, f64>, i: usize, scale: f64) -> f64 {
        q.dot(&q).sqrt() * self.max_key_l2[i] * scale
    }
}

/// One [`PrefixStats`] per KV head, each over the L positions of `heads`.
fn check_stats(heads: &Heads, stats: &[PrefixStats]) -> Result<()> {
    let l = heads.len();
    let ok = stats.len() == heads.num_kv_heads()
        && stats.iter().all(|s| {
            [&s.max_abs, &s.max_row_l1, &s.diam_l2, &s.max_key_l2]
                .iter()
                .all(|x| x.len() == l)
                && s.col_abs_max.dim() == (l, heads.dim())
        });
    if ok {
        Ok(())
    } else {
        Err(TcaError::Shape(format!(
            "prefix statistics for {} KV heads do not fit {} KV heads of L = {l}",
            stats.len(),
            heads.num_kv_heads()
        )))
    }
}

/// NaN-propagating norms (inf, 1, 2) of e.
fn err_norms(e: &Array1<f64>) -> (f64, f64, f64) {
    let linf = e.iter().fold(0.0f64, |m, &x| {
        if m.is_nan() || x.is_nan() {
            f64::NAN
        } else {
            m.max(x.abs())
        }
    });
    (e.iter().map(|x| x.abs()).sum(), linf, e.dot(e).sqrt())
}

/// Audits every (query head, query) of a layer under `sel`: O~ from the sparse path
/// ([`sparse_attention`]), then [`audit_rows`] against the exact rows.
pub fn audit(heads: &Heads, sel: &dyn KeySets) -> Result<Vec<QueryAudit>> {
    let sparse = sparse_attention(heads, sel)?;
    let rows = all_rows(heads.num_q_heads(), heads.len());
    audit_rows(heads, sel, &sparse, Precision::F64, &rows)
}

/// Every (query head, query) in order h * L + i.
pub fn all_rows(hq: usize, l: usize) -> Vec<(usize, usize)> {
    (0..hq * l).map(|n| (n / l, n % l)).collect()
}

/// `limit` (query head, query) rows drawn without replacement with `seed` (always
/// including the last query of every head), in order; all rows when Hq L <= limit or
/// limit = 0.
pub fn sample_rows(hq: usize, l: usize, limit: usize, seed: u64) -> Vec<(usize, usize)> {
    let total = hq * l;
    if limit == 0 || total <= limit {
        return all_rows(hq, l);
    }
    let mut picked: Vec<usize> = (0..hq).map(|h| h * l + l - 1).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let rest = limit.saturating_sub(picked.len());
    let mut extra: Vec<usize> = rand::seq::index::sample(&mut rng, total, rest.min(total))
        .into_iter()
        .collect();
    picked.append(&mut extra);
    picked.sort_unstable();
    picked.dedup();
    picked.into_iter().map(|n| (n / l, n % l)).collect()
}

/// Audits the rows `rows` of a layer against the f64 oracle: `claimed` gives S_i,
/// `sparse.o` the sparse output O~ [Hq, L, d] computed by some path in `precision`.
pub fn audit_rows(
    heads: &Heads,
    claimed: &dyn KeySets,
    sparse: &Attention,
    precision: Precision,
    rows: &[(usize, usize)],
) -> Result<Vec<QueryAudit>> {
    audit_rows_with(
        heads,
        &PrefixStats::of(heads),
        claimed,
        sparse,
        precision,
        rows,
    )
}

/// [`audit_rows`] with the prefix statistics of each KV head given.
pub fn audit_rows_with(
    heads: &Heads,
    stats: &[PrefixStats],
    claimed: &dyn KeySets,
    sparse: &Attention,
    precision: Precision,
    rows: &[(usize, usize)],
) -> Result<Vec<QueryAudit>> {
    check_stats(heads, stats)?;
    check_shape(heads, claimed)?;
    let (hq, l, d) = (heads.num_q_heads(), heads.len(), heads.dim());
    if sparse.o.dim() != (hq, l, d) {
        return Err(TcaError::Shape(format!(
            "sparse output O~ {:?} for inputs of {hq} query heads, L = {l}, d = {d}",
            sparse.o.dim()
        )));
    }
    if let Some(&(h, i)) = rows.iter().find(|&&(h, i)| h >= hq || i >= l) {
        return Err(TcaError::Invalid(format!(
            "row ({h}, {i}) outside {hq} query heads and L = {l}"
        )));
    }
    rows.par_iter()
        .map(|&(h, i)| {
            let keys = claimed.keys(h, i);
            let st = &stats[heads.kv_of(h)];
            audit_row(
                heads,
                st,
                (h, i),
                &keys,
                sparse.o.slice(s![h, i, ..]),
                precision,
            )
        })
        .collect()
}

/// The audit of query i of query head h against the exact row P_i of the f64 inputs:
/// S_i = `keys` (ascending, unique, within [0, i]) and O~_i = `o_sparse`, computed
/// elsewhere in `precision`. gamma_i, O_i, mu_in and mu_out come from P_i alone.
pub fn audit_row(
    heads: &Heads,
    st: &PrefixStats,
    (h, i): (usize, usize),
    keys: &[usize],
    o_sparse: ArrayView1<'_, f64>,
    precision: Precision,
) -> Result<QueryAudit> {
    if keys.windows(2).any(|w| w[0] >= w[1]) || keys.last().is_some_and(|&j| j > i) {
        return Err(TcaError::Invalid(format!(
            "key set of query {i} (head {h}) is not ascending, unique and within [0, {i}]"
        )));
    }
    let kv = heads.kv_of(h);
    let (v, d) = (heads.v(kv), heads.dim());
    // Logits a_ij over j <= i and the full softmax row P_i from them.
    let q_rows = heads.q(h);
    let q = q_rows.row(i);
    let a = scores(q, heads.k(kv), 0..=i, heads.scale());
    let mut p = a.clone();
    softmax_in_place(&mut p);
    let mut kept = vec![false; i + 1];
    keys.iter().for_each(|&j| kept[j] = true);
    let mut sum_out = Array1::<f64>::zeros(d);
    let mut o = Array1::<f64>::zeros(d);
    let mut gamma = 0.0;
    for (j, (&pj, &k)) in p.iter().zip(&kept).enumerate() {
        o.scaled_add(pj, &v.row(j));
        if !k {
            gamma += pj;
            sum_out.scaled_add(pj, &v.row(j));
        }
    }
    // mu_in, the mean of the kept values under P_i restricted to S_i, renormalised from
    // the logits (the kept mass itself may underflow when gamma rounds to 1); with it
    // the P-weighted mean of |v_jc| over S_i for the rounding allowance.
    let mut w: Vec<f64> = keys.iter().map(|&j| a[j]).collect();
    let (mut mu_in, mut abs_in) = (Array1::<f64>::zeros(d), Array1::<f64>::zeros(d));
    if !w.is_empty() {
        softmax_in_place(&mut w);
        for (&j, &wj) in keys.iter().zip(&w) {
            mu_in.scaled_add(wj, &v.row(j));
            // Only the bf16 allowance needs it: skipped on the oracle's own audit.
            if precision == Precision::Bf16 {
                abs_in.scaled_add(wj, &v.row(j).mapv(f64::abs));
            }
        }
    }
    let e = &o - &o_sparse;
    // gamma (mu_out - mu_in) = sum_out - gamma mu_in.
    let predicted = &sum_out - &(&mu_in * gamma);
    let (err_l1, err_linf, err_l2) = err_norms(&e);
    let identity_residual = err_norms(&(&e - &predicted)).1;
    let (vmax, one) = (st.max_abs[i], st.max_row_l1[i]);
    let f64_allow = precision::f64_norms(vmax, one);
    let [allow_linf, allow_l1, allow_l2] = match precision {
        Precision::F64 => f64_allow,
        Precision::Bf16 => {
            let x = st.logit_bound(q, i, heads.scale());
            let k = precision::kappa(keys.len(), d, x);
            let entry: Vec<f64> = abs_in
                .iter()
                .zip(o_sparse)
                .map(|(&m, &obs)| precision::output_allowance(k, m, obs))
                .collect();
            let n = precision::norms(&entry);
            [
                n[0] + f64_allow[0],
                n[1] + f64_allow[1],
                n[2] + f64_allow[2],
            ]
        }
    };
    let finite = o_sparse.iter().all(|x| x.is_finite())
        && [gamma, err_l1, err_linf, err_l2, identity_residual]
            .iter()
            .all(|x| x.is_finite());
    Ok(QueryAudit {
        head: h,
        query: i,
        gamma,
        kept: keys.len(),
        err_l1,
        err_linf,
        err_l2,
        vmax_abs: vmax,
        vrow_l1_max: one,
        vdiam_l2: st.diam_l2[i],
        identity_residual: Some(identity_residual),
        out_l2: o.dot(&o).sqrt(),
        allow_linf,
        allow_l1,
        allow_l2,
        allow_identity: allow_linf,
        gamma_allowance: TOL,
        finite,
        gamma_hat: None,
    })
}

/// Audits a layer from its exact and sparse outputs computed elsewhere (the GPU) for
/// the inputs `heads` they were computed from, without the oracle: O and lse [Hq, L]
/// of full causal attention, O~ and lse~ over each S_i, |S_i| from `kept(h, i)`. Then
/// gamma_i = 1 - exp(lse~_i - lse_i) (clamped at 0) and e_i = O_i - O~_i. Both outputs
/// carry the rounding of `precision`; for bf16 the allowance bounds sum_j w_j |v_jc| by
/// max_{j <= i} |v_jc| (no exact row is computed). The identity needs mu_in and mu_out,
/// which outputs do not carry: not measured.
pub fn audit_outputs(
    heads: &Heads,
    full: &Attention,
    sparse: &Attention,
    kept: &(dyn Fn(usize, usize) -> usize + Sync),
    precision: Precision,
) -> Result<Vec<QueryAudit>> {
    audit_outputs_with(
        heads,
        &PrefixStats::of(heads),
        full,
        sparse,
        kept,
        precision,
    )
}

/// [`audit_outputs`] with the prefix statistics of each KV head given.
pub fn audit_outputs_with(
    heads: &Heads,
    stats: &[PrefixStats],
    full: &Attention,
    sparse: &Attention,
    kept: &(dyn Fn(usize, usize) -> usize + Sync),
    precision: Precision,
) -> Result<Vec<QueryAudit>> {
    check_stats(heads, stats)?;
    let (hq, l, d) = (heads.num_q_heads(), heads.len(), heads.dim());
    for (name, a) in [("exact", full), ("sparse", sparse)] {
        if a.o.dim() != (hq, l, d) || a.lse.dim() != (hq, l) {
            return Err(TcaError::Shape(format!(
                "{name} outputs O {:?}, lse {:?} for inputs of {hq} query heads, L = {l}, d = {d}",
                a.o.dim(),
                a.lse.dim()
            )));
        }
    }
    Ok((0..hq * l)
        .into_par_iter()
        .map(|n| {
            let (h, i) = (n / l, n % l);
            let st = &stats[heads.kv_of(h)];
            let (o, os) = (full.o.slice(s![h, i, ..]), sparse.o.slice(s![h, i, ..]));
            let (lse, lse_s) = (full.lse[[h, i]], sparse.lse[[h, i]]);
            let e = &o - &os;
            let raw_gamma = 1.0 - (lse_s - lse).exp();
            let gamma = if raw_gamma.is_nan() {
                f64::NAN
            } else {
                raw_gamma.max(0.0)
            };
            let (err_l1, err_linf, err_l2) = err_norms(&e);
            let n_kept = kept(h, i);
            let (vmax, one) = (st.max_abs[i], st.max_row_l1[i]);
            let f64_allow = precision::f64_norms(vmax, one);
            let ([allow_linf, allow_l1, allow_l2], gamma_allowance) = match precision {
                Precision::F64 => (f64_allow, TOL),
                Precision::Bf16 => {
                    let x = st.logit_bound(heads.q(h).row(i), i, heads.scale());
                    let (kd, ks) = (
                        precision::kappa(i + 1, d, x),
                        precision::kappa(n_kept, d, x),
                    );
                    let entry: Vec<f64> = (0..d)
                        .map(|c| {
                            let m = st.col_abs_max[[i, c]];
                            precision::output_allowance(kd, m, o[c])
                                + precision::output_allowance(ks, m, os[c])
                        })
                        .collect();
                    let eta = precision::lse_error(i + 1, d, x, lse)
                        + precision::lse_error(n_kept, d, x, lse_s);
                    let nm = precision::norms(&entry);
                    (
                        [
                            nm[0] + f64_allow[0],
                            nm[1] + f64_allow[1],
                            nm[2] + f64_allow[2],
                        ],
                        precision::gamma_from_lse_error(lse_s, lse, eta) + TOL,
                    )
                }
            };
            let finite = o.iter().chain(os.iter()).all(|x| x.is_finite())
                && [lse, lse_s, gamma, err_l1, err_linf, err_l2]
                    .iter()
                    .all(|x| x.is_finite());
            QueryAudit {
                head: h,
                query: i,
                gamma,
                kept: n_kept,
                err_l1,
                err_linf,
                err_l2,
                vmax_abs: vmax,
                vrow_l1_max: one,
                vdiam_l2: st.diam_l2[i],
                identity_residual: None,
                out_l2: o.dot(&o).sqrt(),
                allow_linf,
                allow_l1,
                allow_l2,
                allow_identity: allow_linf,
                gamma_allowance,
                finite,
                gamma_hat: None,
            }
        })
        .collect())
}

/// Sets `gamma_hat` of each audit (in order h L + i over all rows) from the
/// certificate of the same key sets (`tca::certificate`).
pub fn attach_certificates(
    audits: &mut [QueryAudit],
    certs: &[crate::certificate::Certificate],
) -> Result<()> {
    if audits.len() != certs.len() {
        return Err(TcaError::Shape(format!(
            "{} certificates for {} audited queries",
            certs.len(),
            audits.len()
        )));
    }
    for (a, c) in audits.iter_mut().zip(certs) {
        if (a.head, a.query) != (c.head, c.query) {
            return Err(TcaError::Shape(format!(
                "certificate of ({}, {}) for the audit of ({}, {})",
                c.head, c.query, a.head, a.query
            )));
        }
        a.gamma_hat = Some(c.gamma_hat);
    }
    Ok(())
}
