//! Rotary position embedding: the frequencies (with Hugging Face's `rope_scaling`
//! variants) and the rotation of adjacent pairs.
//!
//! Head coordinates `(2i, 2i+1)`, `i < d/2`, are rotated by the angle `pos * f_i`, with
//! `f_i = base^(-2i/d)` before scaling; the cos and sin are multiplied by an attention
//! factor (1 except for YaRN). This is llama.cpp's layout: Hugging Face's `rotate_half`
//! pairs `(i, i + d/2)` instead, and its q/k weight rows are the same rows in another
//! order (see [`permute_rows_to_pairs`]).
//!
//! Scalings, as Hugging Face transformers computes them (`rope_scaling` in
//! `config.json`, key `rope_type` or `type`):
//! - `default` / none: `f_i` as above;
//! - `linear` (factor s): `f_i / s`;
//! - `llama3` (factor s, low/high frequency factors l, h, original context C):
//!   wavelength `λ = 2π / f_i`; `λ > C/l`: `f_i / s`; `λ < C/h`: `f_i`; between:
//!   `(1 - a) f_i / s + a f_i` with `a = (C/λ - l) / (h - l)`;
//! - `yarn` (factor s, original context C, `beta_fast` 32, `beta_slow` 1 by default):
//!   the correction range `[lo, hi]` = floor/ceil of `d ln(C / (2π β)) / (2 ln base)`
//!   for `β` = `beta_fast`, `beta_slow`, clamped to `[0, d-1]`; ramp
//!   `r_i = clamp((i - lo) / (hi - lo), 0, 1)`; `f_i' = f_i / s · r_i + f_i · (1 - r_i)`;
//!   attention factor `attention_factor` if given, else `0.1 ln s + 1` (with `mscale`
//!   and `mscale_all_dim`: the ratio of the two such values). `C` is
//!   `original_max_position_embeddings`, else the model's context; `s` is `factor` as
//!   given (newer transformers versions derive it from the two contexts instead when
//!   both are given; this follows the YaRN paper's and the config's `factor`).

use ndarray::{Array2, Axis};
use rayon::prelude::*;
use serde_json::{json, Value};

/// A RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RopeScaling {
    #[default]
    None,
    Linear {
        factor: f64,
    },
    /// NTK-aware scaling (static): the base becomes `base * s^(d / (d - 2))`, so the
    /// lowest frequency is divided by s and the highest kept. Hugging Face has no
    /// `rope_type` for it (its equivalent is a larger `rope_theta`); this harness
    /// writes and reads it as `ntk`.
    Ntk {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_context: f64,
    },
    Yarn {
        factor: f64,
        original_context: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
    },
}

/// RoPE parameters of a model: base and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub base: f64,
    pub scaling: RopeScaling,
}

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RopeScaling {
    /// Parse a Hugging Face `rope_scaling` object (`null` or absent = none).
    /// `context` is the model's `max_position_embeddings`. Errors name the field.
    pub fn from_hf(v: Option<&Value>, context: usize) -> Result<RopeScaling, String> {
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(RopeScaling::None);
        };
        let obj = v
            .as_object()
            .ok_or_else(|| format!("rope_scaling is not an object: {v}"))?;
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .ok_or("rope_scaling has no rope_type")?;
        let num = |k: &str| obj.get(k).and_then(Value::as_f64);
        let need = |k: &str| num(k).ok_or_else(|| format!("rope_scaling ({kind}) has no {k}"));
        let scaling = match kind {
            "default" | "none" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: need("factor")?,
            },
            "ntk" => RopeScaling::Ntk {
                factor: need("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_context: need("original_max_position_embeddings")?,
            },
            "yarn" => {
                let factor = need("factor")?;
                let attention_factor = match (
                    num("attention_factor"),
                    num("mscale"),
                    num("mscale_all_dim"),
                ) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                        yarn_mscale(factor, m) / yarn_mscale(factor, ma)
                    }
                    _ => yarn_mscale(factor, 1.0),
                };
                RopeScaling::Yarn {
                    factor,
                    original_context: num("original_max_position_embeddings")
                        .unwrap_or(context as f64),
                    beta_fast: num("beta_fast").unwrap_or(32.0),
                    beta_slow: num("beta_slow").unwrap_or(1.0),
                    attention_factor,
                }
            }
            other => {
                return Err(format!(
                    "rope_scaling type {other:?} is not supported (none, linear, ntk, llama3, yarn)"
                ))
            }
        };
        scaling.validate()?;
        Ok(scaling)
    }

    /// Parses `none` or `KIND:FACTOR` with KIND one of linear, ntk, yarn (YaRN with its
    /// defaults: beta_fast 32, beta_slow 1, attention factor 0.1 ln s + 1), for a model
    /// trained to `context` positions. Errors say what was expected.
    pub fn parse(spec: &str, context: usize) -> Result<RopeScaling, String> {
        let spec = spec.trim();
        if spec == "none" {
            return Ok(RopeScaling::None);
        }
        let (kind, factor) = spec.split_once(':').ok_or_else(|| {
            format!("rope scaling {spec:?}: expected none or KIND:FACTOR (linear, ntk, yarn)")
        })?;
        let factor: f64 = factor
            .trim()
            .parse()
            .map_err(|_| format!("rope scaling {spec:?}: factor {factor:?} is not a number"))?;
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(format!("rope scaling {spec:?}: the factor must be >= 1"));
        }
        let s = match kind.trim() {
            "linear" => RopeScaling::Linear { factor },
            "ntk" => RopeScaling::Ntk { factor },
            "yarn" => RopeScaling::Yarn {
                factor,
                original_context: context as f64,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: yarn_mscale(factor, 1.0),
            },
            other => {
                return Err(format!(
                    "rope scaling {other:?} is not offered here (none, linear, ntk, yarn)"
                ))
            }
        };
        s.validate()?;
        Ok(s)
    }

    /// How many times the trained context the scaling is meant to reach (1 for none).
    pub fn factor(&self) -> f64 {
        match *self {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor }
            | RopeScaling::Ntk { factor }
            | RopeScaling::Llama3 { factor, .. }
            | RopeScaling::Yarn { factor, .. } => factor,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let ok = |x: f64| x.is_finite() && x > 0.0;
        let good = match *self {
            RopeScaling::None => true,
            RopeScaling::Linear { factor } | RopeScaling::Ntk { factor } => ok(factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => {
                ok(factor)
                    && ok(low_freq_factor)
                    && ok(original_context)
                    && high_freq_factor.is_finite()
                    && high_freq_factor > low_freq_factor
            }
            RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast,
                beta_slow,
                attention_factor,
            } => {
                ok(factor)
                    && ok(original_context)
                    && ok(beta_fast)
                    && ok(beta_slow)
                    && ok(attention_factor)
            }
        };
        if good {
            Ok(())
        } else {
            Err(format!("rope_scaling {self:?} has a value out of range"))
        }
    }

    /// The Hugging Face `rope_scaling` value (`null` for none); [`Self::from_hf`]
    /// reads it back.
    pub fn to_hf(&self) -> Value {
        match *self {
            RopeScaling::None => Value::Null,
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Ntk { factor } => json!({"rope_type": "ntk", "factor": factor}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_context,
            }),
            RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast,
                beta_slow,
                attention_factor,
            } => json!({
                "rope_type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": original_context,
                "beta_fast": beta_fast,
                "beta_slow": beta_slow,
                "attention_factor": attention_factor,
            }),
        }
    }

    /// Multiplier of cos and sin (YaRN's attention factor; 1 otherwise).
    pub fn attention_factor(&self) -> f64 {
        match *self {
            RopeScaling::Yarn {
                attention_factor, ..
            } => attention_factor,
            _ => 1.0,
        }
    }
}

impl Rope {
    /// Unscaled RoPE with the given base.
    pub fn plain(base: f64) -> Rope {
        Rope {
            base,
            scaling: RopeScaling::None,
        }
    }

    /// The `d/2` frequencies `f_i` (radians per position) after scaling.
    pub fn inv_freq(&self, d: usize) -> Vec<f64> {
        let half = d / 2;
        let base = match self.scaling {
            RopeScaling::Ntk { factor } if d > 2 => {
                self.base * factor.powf(d as f64 / (d as f64 - 2.0))
            }
            _ => self.base,
        };
        let plain: Vec<f64> = (0..half)
            .map(|i| base.powf(-2.0 * i as f64 / d as f64))
            .collect();
        match self.scaling {
            RopeScaling::None | RopeScaling::Ntk { .. } => plain,
            RopeScaling::Linear { factor } => plain.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: l,
                high_freq_factor: h,
                original_context: c,
            } => plain
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen > c / l {
                        f / factor
                    } else if wavelen < c / h {
                        f
                    } else {
                        let a = (c / wavelen - l) / (h - l);
                        (1.0 - a) * f / factor + a * f
                    }
                })
                .collect(),
            RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast,
                beta_slow,
                ..
            } => {
                let dim = d as f64;
                let corr = |rot: f64| {
                    dim * (original_context / (rot * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * base.ln())
                };
                let lo = corr(beta_fast).floor().max(0.0);
                let mut hi = corr(beta_slow).ceil().min(dim - 1.0);
                if lo == hi {
                    hi += 0.001;
                }
                plain
                    .iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                        f / factor * ramp + f * (1.0 - ramp)
                    })
                    .collect()
            }
        }
    }

    /// cos and sin tables `[n_pos, d/2]` for positions `pos0 .. pos0 + n_pos`
    /// (times the attention factor).
    pub fn tables(&self, pos0: usize, n_pos: usize, d: usize) -> (Array2<f32>, Array2<f32>) {
        let inv = self.inv_freq(d);
        let m = self.scaling.attention_factor();
        let half = d / 2;
        let mut cos = Array2::<f32>::zeros((n_pos, half));
        let mut sin = Array2::<f32>::zeros((n_pos, half));
        for t in 0..n_pos {
            let p = (pos0 + t) as f64;
            for i in 0..half {
                let a = p * inv[i];
                cos[[t, i]] = (m * a.cos()) as f32;
                sin[[t, i]] = (m * a.sin()) as f32;
            }
        }
        (cos, sin)
    }
}

/// Rotate adjacent pairs `(2i, 2i+1)` of each head of `x` `[n, heads * d]` by the
/// tables of [`Rope::tables`] (row t of the tables for row t of `x`).
pub fn apply_rope(x: &mut Array2<f32>, d: usize, cos: &Array2<f32>, sin: &Array2<f32>) {
    x.axis_iter_mut(Axis(0))
        .into_par_iter()
        .enumerate()
        .for_each(|(t, mut row)| {
            let (c, s) = (cos.row(t), sin.row(t));
            if let Some(r) = row.as_slice_mut() {
                for head in r.chunks_exact_mut(d) {
                    for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                        let (x0, x1) = (pair[0], pair[1]);
                        pair[0] = x0 * c[i] - x1 * s[i];
                        pair[1] = x0 * s[i] + x1 * c[i];
                    }
                }
            }
        });
}

/// The row order of llama.cpp's q/k weights from Hugging Face's: within each head of
/// `d` rows, HF row `j·d/2 + i` (`j` ∈ {0, 1}) becomes row `2i + j`, so that
/// `rotate_half` on the HF rows equals rotating adjacent pairs on the result. `rows`
/// is the matrix (or bias, with one column) `[heads·d, cols]` as a flat row-major
/// slice.
pub fn permute_rows_to_pairs(rows: &[f32], cols: usize, d: usize) -> Vec<f32> {
    reorder_rows(rows, cols, d, |i, j| (2 * i + j, j * (d / 2) + i))
}

/// The inverse of [`permute_rows_to_pairs`]: llama.cpp's q/k rows back to HF's.
pub fn permute_rows_to_halves(rows: &[f32], cols: usize, d: usize) -> Vec<f32> {
    reorder_rows(rows, cols, d, |i, j| (j * (d / 2) + i, 2 * i + j))
}

/// `out[h·d + to] = x[h·d + from]` (rows of `cols` values) for each `(to, from)` of
/// `map(i, j)`, `i < d/2`, `j < 2`.
fn reorder_rows(
    x: &[f32],
    cols: usize,
    d: usize,
    map: impl Fn(usize, usize) -> (usize, usize),
) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let head = d * cols;
    if head == 0 {
        return out;
    }
    for (o, src) in out.chunks_exact_mut(head).zip(x.chunks_exact(head)) {
        for i in 0..d / 2 {
            for j in 0..2 {
                let (to, from) = map(i, j);
                o[to * cols..(to + 1) * cols].copy_from_slice(&src[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_inverse_and_match_rotate_half() {
        let (heads, d, cols) = (3, 8, 2);
        let x: Vec<f32> = (0..heads * d * cols).map(|v| v as f32).collect();
        let p = permute_rows_to_pairs(&x, cols, d);
        assert_ne!(p, x);
        assert_eq!(permute_rows_to_halves(&p, cols, d), x);
        // Head 1, HF row d/2 + 1 (second half, i = 1) lands on row 2*1 + 1.
        let hf_row = d + d / 2 + 1;
        let pair_row = d + 3;
        assert_eq!(
            p[pair_row * cols..(pair_row + 1) * cols],
            x[hf_row * cols..(hf_row + 1) * cols]
        );
        // rotate_half on a HF-ordered vector equals pair rotation on the permuted one.
        let rope = Rope::plain(10000.0);
        let (c, s) = rope.tables(7, 1, d);
        let v: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
        let h = d / 2;
        let hf: Vec<f32> = (0..d)
            .map(|k| {
                let i = k % h;
                let rot = if k < h { -v[k + h] } else { v[k - h] };
                v[k] * c[[0, i]] + rot * s[[0, i]]
            })
            .collect();
        let mut pv = Array2::from_shape_vec((1, d), permute_rows_to_pairs(&v, 1, d)).unwrap();
        apply_rope(&mut pv, d, &c, &s);
        let back = permute_rows_to_halves(pv.as_slice().unwrap(), 1, d);
        for (a, b) in back.iter().zip(&hf) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn scalings_follow_their_formulas() {
        let d = 64;
        let base = 500000.0;
        let plain = Rope::plain(base).inv_freq(d);
        let with = |s: RopeScaling| Rope { base, scaling: s }.inv_freq(d);
        let lin = with(RopeScaling::Linear { factor: 4.0 });
        for (a, b) in lin.iter().zip(&plain) {
            assert_eq!(*a, b / 4.0);
        }
        // Llama 3.1's values: high frequencies kept, low ones divided by 8.
        let l3 = with(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 8192.0,
        });
        assert_eq!(l3[0], plain[0]);
        assert_eq!(l3[31], plain[31] / 8.0);
        let mid = (0..32)
            .filter(|&i| l3[i] != plain[i] && l3[i] != plain[i] / 8.0)
            .count();
        assert!(
            mid > 0
                && l3
                    .iter()
                    .zip(&plain)
                    .all(|(a, p)| *a <= *p && *a >= p / 8.0)
        );
        let y = with(RopeScaling::Yarn {
            factor: 4.0,
            original_context: 4096.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: 1.0,
        });
        assert_eq!(y[0], plain[0]);
        assert!((y[31] - plain[31] / 4.0).abs() < 1e-18);
        // NTK: the base grows by s^(d/(d-2)): the first frequency is kept, the last
        // (exponent -(d-2)/d) is divided by s exactly.
        let ntk = with(RopeScaling::Ntk { factor: 4.0 });
        assert_eq!(ntk[0], plain[0]);
        assert!((ntk[31] / (plain[31] / 4.0) - 1.0).abs() < 1e-12);
        assert!(ntk
            .iter()
            .zip(&plain)
            .all(|(a, p)| *a <= *p && *a >= p / 4.0 * 0.999));
    }

    #[test]
    fn the_rope_flag_parses() {
        assert_eq!(RopeScaling::parse("none", 8192).unwrap(), RopeScaling::None);
        assert_eq!(
            RopeScaling::parse("linear:2", 8192).unwrap(),
            RopeScaling::Linear { factor: 2.0 }
        );
        assert_eq!(
            RopeScaling::parse(" ntk:8 ", 8192).unwrap(),
            RopeScaling::Ntk { factor: 8.0 }
        );
        let y = RopeScaling::parse("yarn:16", 8192).unwrap();
        assert_eq!(y.factor(), 16.0);
        assert!(
            matches!(y, RopeScaling::Yarn { original_context, .. } if original_context == 8192.0)
        );
        assert_eq!(RopeScaling::from_hf(Some(&y.to_hf()), 1).unwrap(), y);
        let n = RopeScaling::Ntk { factor: 3.0 };
        assert_eq!(RopeScaling::from_hf(Some(&n.to_hf()), 1).unwrap(), n);
        for bad in [
            "yarn",
            "yarn:",
            "yarn:x",
            "yarn:0.5",
            "yarn:inf",
            "dynamic:2",
            "llama3:8",
            "",
        ] {
            let e = RopeScaling::parse(bad, 8192).unwrap_err();
            assert!(e.contains("rope scaling"), "{bad}: {e}");
        }
    }

    #[test]
    fn hf_rope_scaling_parses() {
        let p = |s: &str| RopeScaling::from_hf(Some(&serde_json::from_str(s).unwrap()), 4096);
        assert_eq!(p("null").unwrap(), RopeScaling::None);
        assert_eq!(RopeScaling::from_hf(None, 1).unwrap(), RopeScaling::None);
        assert_eq!(
            p(r#"{"type": "linear", "factor": 2.0}"#).unwrap(),
            RopeScaling::Linear { factor: 2.0 }
        );
        let y = p(r#"{"rope_type": "yarn", "factor": 4.0}"#).unwrap();
        assert!((y.attention_factor() - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
        assert!(
            matches!(y, RopeScaling::Yarn { original_context, .. } if original_context == 4096.0)
        );
        let l3 = r#"{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#;
        assert!(matches!(p(l3).unwrap(), RopeScaling::Llama3 { .. }));
        for s in [
            p(l3).unwrap(),
            y,
            RopeScaling::Linear { factor: 3.0 },
            RopeScaling::None,
        ] {
            assert_eq!(RopeScaling::from_hf(Some(&s.to_hf()), 1).unwrap(), s);
        }
        for bad in [
            r#"{"rope_type": "dynamic", "factor": 2.0}"#,
            r#"{"rope_type": "linear"}"#,
            r#"{"rope_type": "linear", "factor": -1}"#,
            r#"{"factor": 2.0}"#,
            r#"[1]"#,
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
        assert!(p(r#"{"rope_type": "dynamic", "factor": 2.0}"#)
            .unwrap_err()
            .contains("dynamic"));
    }
}
