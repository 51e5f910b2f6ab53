//! Rounding allowances: how far an output computed in finite precision may be from the
//! exact attention of the same inputs, derived term by term (docs/theorem.md,
//! "Rounding allowances").
//!
//! Two precisions: the f64 oracle (a fixed relative allowance [`TOL`]) and the device's
//! bf16 path (bf16 inputs, f32 logits and softmax, P rounded to bf16 for the P V
//! product, f32 tensor-core accumulation, output rounded to bf16, log-sum-exp in f32).
//! For one attention pass over n keys with normalised weights w_j, every output entry
//! satisfies
//!
//!   |Ô_c - O_c| <= kappa(n, d, x) sum_j w_j |v_jc| + u/(1 - u) |Ô_c| + 2^-133,
//!
//! with u = 2^-8 the unit roundoff of round-to-nearest bf16 (`cvt.rn.bf16x2.f32`: 8
//! significand bits), x a bound on the |logits| and kappa the product of the weight
//! perturbations in [`kappa`]. The log-sum-exp is off by at most [`lse_error`].

use super::readings::TOL;

/// Unit roundoff of round-to-nearest bf16: 2^-8.
pub const U_BF16: f64 = 1.0 / 256.0;
/// Unit roundoff of round-to-nearest f32: 2^-24.
pub const U_F32: f64 = 1.0 / 16_777_216.0;
/// Per-addition relative error of tensor-core f32 accumulation, taken as 2^-23 (twice
/// f32's, so that truncating alignment inside the MMA unit is covered).
pub const U_MMA: f64 = 1.0 / 8_388_608.0;
/// Relative error of `exp2f` (at most 2 ulp of f32).
pub const EXP2_REL: f64 = 2.0 * U_F32 * 2.0;
/// Keys per tile of the prefill kernels (the online softmax rescales once per tile).
pub const KEY_TILE: usize = 64;

/// Where an audited output came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// The f64 oracle's arithmetic: relative allowance [`TOL`].
    F64,
    /// The device's bf16 path described in the module documentation.
    Bf16,
}

/// gamma_n = n u / (1 - n u): the relative error of n sequential roundings of unit u.
pub fn gamma_n(n: usize, u: f64) -> f64 {
    let nu = n as f64 * u;
    if nu >= 0.5 {
        f64::INFINITY
    } else {
        nu / (1.0 - nu)
    }
}

/// Error of one logit x_j = q . k_j / sqrt(d) * log2(e) in the kernel, in log2 units,
/// for |q . k_j| / sqrt(d) <= `logit_bound`: d/16 MMA steps of 16 exact bf16 products
/// (gamma_{d/16 + 16} at U_MMA) and two f32 roundings of the scale and its product.
fn logit_error(dim: usize, logit_bound: f64) -> f64 {
    (gamma_n(dim.div_ceil(16) + 16, U_MMA) + 2.0 * U_F32) * logit_bound * std::f64::consts::LOG2_E
}

/// Sequential roundings of one pass over n keys: (the row sum l, the rescales, the
/// P V accumulation). l: 16 terms per thread per tile, one update per tile, two warp
/// shuffles; rescales: one f32 product per tile on both l and O; P V: one MMA step of
/// 16 keys at a time plus 16 inside the unit.
fn accumulation(n: usize) -> (f64, f64, f64) {
    let tiles = n.div_ceil(KEY_TILE).max(1);
    (
        gamma_n(16 + tiles + 2, U_F32),
        gamma_n(2 * tiles, U_F32),
        gamma_n(n.div_ceil(16) + 16, U_MMA),
    )
}

/// kappa(n, d, x): the relative perturbation of the normalised weights of one bf16
/// pass over n keys (logits within 2^(+-2 eps_x) after the shift by the running max
/// cancels, exp2f on numerator and denominator, the row sum, the rescales, P rounded
/// to bf16 for the numerator only, the reciprocal and product), times the P V
/// accumulation, all multiplied out: |Ô_c - O_c| <= kappa sum_j w_j |v_jc| before the
/// output is rounded.
pub fn kappa(n: usize, dim: usize, logit_bound: f64) -> f64 {
    let ex = logit_error(dim, logit_bound);
    let (g_l, g_resc, g_pv) = accumulation(n);
    let factors = [
        (2.0 * ex).exp2() - 1.0,
        2.0 * EXP2_REL * (1.0 + EXP2_REL),
        g_l,
        g_resc,
        U_BF16,
        2.0 * U_F32,
        g_pv,
    ];
    factors.iter().fold(1.0, |acc, f| acc * (1.0 + f)) - 1.0
}

/// Absolute error of a log-sum-exp the kernel stores (m ln 2 + logf(l) in f32) over n
/// keys, for logits within `logit_bound` and a stored value `lse`: the logits (ln 2
/// eps_x), exp2f, the row sum and the rescales (relative on l, absolute on ln l), and
/// four f32 roundings of numbers at most |lse| + 2 ln n + 2 in size.
pub fn lse_error(n: usize, dim: usize, logit_bound: f64, lse: f64) -> f64 {
    let (g_l, g_resc, _) = accumulation(n);
    std::f64::consts::LN_2 * logit_error(dim, logit_bound)
        + 2.0 * EXP2_REL
        + g_l
        + g_resc
        + 4.0 * U_F32 * (lse.abs() + 2.0 * (n as f64).ln() + 2.0)
}

/// Allowance on gamma = 1 - exp(lse~ - lse) computed from two stored log-sum-exps that
/// are each off by at most eta_s and eta_d: with D^ their difference,
/// |gamma^ - gamma| <= exp(D^) (exp(eta_s + eta_d) - 1).
pub fn gamma_from_lse_error(lse_sparse: f64, lse_dense: f64, eta: f64) -> f64 {
    (lse_sparse - lse_dense).exp() * eta.exp_m1()
}

/// Entry-wise allowance of one output Ô (bf16, observed) of a pass with perturbation
/// `kappa`, given `abs_mean` >= sum_j w_j |v_jc| (plus 2^-133, bf16's subnormal step).
pub fn output_allowance(kappa: f64, abs_mean: f64, observed: f64) -> f64 {
    kappa * abs_mean + U_BF16 / (1.0 - U_BF16) * observed.abs() + 2f64.powi(-133)
}

/// The p-norms (inf, 1, 2) of an entry-wise allowance vector.
pub fn norms(a: &[f64]) -> [f64; 3] {
    let inf = a.iter().copied().fold(0.0, f64::max);
    let one = a.iter().sum();
    let two = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    [inf, one, two]
}

/// The f64 oracle's allowances on ||e||_inf, ||e||_1, ||e||_2: TOL times max|V|,
/// max_j ||v_j||_1 and sqrt(max|V| max_j ||v_j||_1) >= max_j ||v_j||_2.
pub fn f64_norms(vmax_abs: f64, vrow_l1_max: f64) -> [f64; 3] {
    [
        TOL * vmax_abs,
        TOL * vrow_l1_max,
        TOL * (vmax_abs * vrow_l1_max).sqrt(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kappa_is_dominated_by_the_bf16_rounding_of_p_at_moderate_sizes() {
        let k = kappa(4096, 128, 10.0);
        assert!(k > U_BF16 && k < 1.05 * U_BF16, "kappa = {k}");
        // It grows with n and with the logit range.
        assert!(kappa(131_072, 128, 10.0) > k);
        assert!(kappa(4096, 128, 100.0) > k);
    }

    #[test]
    fn gamma_n_blows_up_instead_of_wrapping() {
        assert_eq!(gamma_n(1 << 24, U_F32), f64::INFINITY);
        let g = gamma_n(10, U_F32);
        assert!(g > 10.0 * U_F32 && g < 10.0 * U_F32 * (1.0 + 1e-5));
    }

    #[test]
    fn gamma_allowance_vanishes_with_the_lse_errors() {
        assert_eq!(gamma_from_lse_error(-0.1, 0.0, 0.0), 0.0);
        let g = gamma_from_lse_error(-0.1, 0.0, 1e-5);
        assert!(g > 0.9e-5 && g < 1e-5, "{g}");
    }
}
