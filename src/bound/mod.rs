//! Theorem 1, checked in each of its readings (docs/algorithm.md §4).
//!
//! For query i with key set S_i: gamma_i = sum_{j <= i, j not in S_i} P_ij (the softmax
//! mass TCA omits, summed directly, never as 1 - kept) and e_i = O_i - O~_i. Identity:
//! e_i = gamma_i (mu_out - mu_in), with mu_out, mu_in the P-weighted means of v over the
//! omitted and kept keys. The norms of V range over the keys the query sees (j <= i).

pub mod readings;

pub use readings::{summarize, Reading, ReadingSummary, Summary, TOL};

use crate::data::Heads;
use crate::error::{Result, TcaError};
use crate::reference::softmax::{scores, softmax_in_place, weighted_sum};
use crate::reference::Attention;
use crate::selection::sparse::check_shape;
use crate::selection::{sparse_row, KeySets};
use ndarray::{s, Array1, ArrayView2};
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
    /// ||e_i - gamma_i (mu_out - mu_in)||_inf.
    pub identity_residual: f64,
    /// ||O_i||_2 of the exact output (for relative errors).
    pub out_l2: f64,
    /// Relative rounding r of how O_i and O~_i were computed: the allowance on ||e_i||_p
    /// is r times a bound on max_j ||v_j||_p (see [`Reading::sides`]); TOL for the f64
    /// oracle, 2^-7 for bf16 device outputs ([`Allowance::BF16`]).
    pub rounding: f64,
    /// Absolute allowance on gamma_i (TOL for the oracle).
    pub gamma_allowance: f64,
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

/// Per-position prefix statistics of one KV head's V: max |entry|, max row l1 norm and
/// l2 diameter over rows [0, i].
#[derive(Clone, Debug)]
pub struct PrefixStats {
    pub max_abs: Vec<f64>,
    pub max_row_l1: Vec<f64>,
    pub diam_l2: Vec<f64>,
}

impl PrefixStats {
    /// O(L^2 d) for the diameter: row i's farthest earlier row, then a running max.
    pub fn new(v: ArrayView2<'_, f64>) -> Self {
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
        let running = |x: Vec<f64>| {
            x.into_iter()
                .scan(0.0f64, |m, y| {
                    *m = m.max(y);
                    Some(*m)
                })
                .collect()
        };
        PrefixStats {
            max_abs: running(
                v.rows()
                    .into_iter()
                    .map(|r| r.fold(0.0f64, |m, x| m.max(x.abs())))
                    .collect(),
            ),
            max_row_l1: running(
                v.rows()
                    .into_iter()
                    .map(|r| r.fold(0.0f64, |m, x| m + x.abs()))
                    .collect(),
            ),
            diam_l2: running(far),
        }
    }
}

/// Audits every (query head, query) of a layer under `sel`: O_i from the full causal row,
/// O~_i from the sparse path's own softmax over S_i, and the identity's two sides.
pub fn audit(heads: &Heads, sel: &dyn KeySets) -> Result<Vec<QueryAudit>> {
    check_shape(heads, sel)?;
    let stats: Vec<PrefixStats> = (0..heads.num_kv_heads())
        .map(|kv| PrefixStats::new(heads.v(kv)))
        .collect();
    let l = heads.len();
    Ok((0..heads.num_q_heads() * l)
        .into_par_iter()
        .map(|n| audit_query(heads, sel, &stats[heads.kv_of(n / l)], n / l, n % l))
        .collect())
}

fn audit_query(
    heads: &Heads,
    sel: &dyn KeySets,
    st: &PrefixStats,
    h: usize,
    i: usize,
) -> QueryAudit {
    let kv = heads.kv_of(h);
    let v = heads.v(kv);
    // Logits a_ij over j <= i, the full softmax row P_i from them.
    let a = scores(heads.q(h).row(i), heads.k(kv), 0..=i, heads.scale());
    let mut p = a.clone();
    softmax_in_place(&mut p);
    let keys = sel.keys(h, i);
    let mut kept_mask = vec![false; i + 1];
    keys.iter().for_each(|&j| kept_mask[j] = true);
    let d = heads.dim();
    let (mut sum_in, mut sum_out) = (Array1::<f64>::zeros(d), Array1::<f64>::zeros(d));
    let mut gamma = 0.0;
    for (j, (&pj, &kept)) in p.iter().zip(&kept_mask).enumerate() {
        if kept {
            sum_in.scaled_add(pj, &v.row(j));
        } else {
            gamma += pj;
            sum_out.scaled_add(pj, &v.row(j));
        }
    }
    let o = &sum_in + &sum_out;
    let (o_sparse, _) = sparse_row(heads, sel, h, i);
    let e = &o - &o_sparse;
    // mu_in, the P-weighted mean of the kept values, renormalised from the logits (the
    // kept mass itself may underflow when gamma rounds to 1); gamma mu_out = sum_out.
    let mut w: Vec<f64> = keys.iter().map(|&j| a[j]).collect();
    softmax_in_place(&mut w);
    let mu_in = weighted_sum(v, keys.iter().copied(), &w);
    let predicted = &sum_out - &(&mu_in * gamma);
    let identity_residual = (&e - &predicted).fold(0.0f64, |m, x| m.max(x.abs()));
    let allow = Allowance {
        rounding: TOL,
        gamma: TOL,
    };
    QueryAudit::measure(
        (h, i),
        gamma,
        keys.len(),
        &e,
        o.view(),
        st,
        identity_residual,
        allow,
    )
}

impl QueryAudit {
    /// The record of query i of head h from its error e_i and exact output O_i.
    #[allow(clippy::too_many_arguments)]
    fn measure(
        (head, query): (usize, usize),
        gamma: f64,
        kept: usize,
        e: &Array1<f64>,
        o: ndarray::ArrayView1<f64>,
        st: &PrefixStats,
        identity_residual: f64,
        allow: Allowance,
    ) -> Self {
        QueryAudit {
            head,
            query,
            gamma,
            kept,
            err_l1: e.fold(0.0f64, |m, x| m + x.abs()),
            err_linf: e.fold(0.0f64, |m, x| m.max(x.abs())),
            err_l2: e.dot(e).sqrt(),
            vmax_abs: st.max_abs[query],
            vrow_l1_max: st.max_row_l1[query],
            vdiam_l2: st.diam_l2[query],
            identity_residual,
            out_l2: o.dot(&o).sqrt(),
            rounding: allow.rounding,
            gamma_allowance: allow.gamma,
        }
    }
}

/// Rounding allowances of an audit made from outputs computed elsewhere.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Allowance {
    /// Relative rounding r of the outputs (QueryAudit::rounding).
    pub rounding: f64,
    /// Absolute allowance on gamma_i.
    pub gamma: f64,
}

impl Allowance {
    /// The bf16 device path (inputs rounded to bf16 before both passes, f32
    /// accumulation). Each of O_i and O~_i is off, entrywise, by at most
    /// 2^-9 sum_j P_j |v_j| from the bf16 probabilities of its P V product plus 2^-9 |O_i|
    /// <= 2^-9 sum_j P_j |v_j| from rounding the output to bf16, so e_i is off by at most
    /// 2^-7 sum_j P_j |v_j|, whose p-norm is at most max_j ||v_j||_p. gamma from the two
    /// f32 log-sum-exps of the same logits is off by far less than 1e-4.
    pub const BF16: Allowance = Allowance {
        rounding: 1.0 / 128.0,
        gamma: 1e-4,
    };
}

/// Audits a layer from its exact and sparse outputs computed elsewhere (the GPU), for
/// the inputs `heads` they were computed from: O and lse [Hq, L] of full causal
/// attention, O~ and lse~ over each S_i, and |S_i| from `kept(h, i)`. Then
/// gamma_i = 1 - exp(lse~_i - lse_i) (clamped at 0) and e_i = O_i - O~_i. The identity
/// needs mu_in and mu_out, which outputs do not carry: its residual is NaN (not
/// measured).
pub fn audit_outputs(
    heads: &Heads,
    full: &Attention,
    sparse: &Attention,
    kept: &(dyn Fn(usize, usize) -> usize + Sync),
    allow: Allowance,
) -> Result<Vec<QueryAudit>> {
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
    let stats: Vec<PrefixStats> = (0..heads.num_kv_heads())
        .map(|kv| PrefixStats::new(heads.v(kv)))
        .collect();
    Ok((0..hq * l)
        .into_par_iter()
        .map(|n| {
            let (h, i) = (n / l, n % l);
            let st = &stats[heads.kv_of(h)];
            let o = full.o.slice(s![h, i, ..]);
            let e = &o - &sparse.o.slice(s![h, i, ..]);
            let gamma = (1.0 - (sparse.lse[[h, i]] - full.lse[[h, i]]).exp()).max(0.0);
            QueryAudit::measure((h, i), gamma, kept(h, i), &e, o, st, f64::NAN, allow)
        })
        .collect())
}
