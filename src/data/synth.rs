//! Seeded synthetic heads: named distributions of Q/K/V whose attention has the head
//! patterns the paper shows (Fig. 1) and a retrieval head with planted needles.
//!
//! Construction (per KV head, d >= 4): an orthonormal frame {e_s, e_c, e_n, e_r} drawn
//! from the seed; q and k carry Gaussian noise N(0, 0.3^2) per entry, projected off the
//! frame (so planted scores are exact but for noise . noise terms), v is N(0, 1) per
//! entry. A planted logit gap G along a direction e adds sqrt(G sqrt(d)) e
//! to the query and to the key, so their score gains G after the 1/sqrt(d) scale.
//! - `uniform`: noise only: every row is close to uniform.
//! - `sink`: key 0 and every query share e_s with G = ln L + 3: token 0 takes most mass.
//! - `terminal`: a rotary band: q_i and k_j carry A (cos(i theta) e_c + sin(i theta) e_r),
//!   theta = pi / L, A^2 / sqrt(d) = 50, so the score is 50 cos((i - j) theta): each
//!   query attends to its recent past and the last query to the end of the sequence.
//! - `bipolar`: the band plus a sink of gap 50 + ln(L / 20) on key 0 (kept off the band,
//!   level with the band's peak score of 50):
//!   mass at both ends.
//! - `retrieval`: n = max(2, L / 256) needle keys at seeded positions in [L/20, 0.9 L)
//!   and the last max(1, L / 16) queries share e_n with G = ln L + 3: the question
//!   at the end retrieves the needles.

use super::Heads;
use crate::error::{Result, TcaError};
use ndarray::{Array1, Array3};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

/// The named synthetic head distributions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    Uniform,
    Bipolar,
    Terminal,
    Sink,
    Retrieval,
}

impl HeadKind {
    pub const ALL: [HeadKind; 5] = [
        HeadKind::Uniform,
        HeadKind::Bipolar,
        HeadKind::Terminal,
        HeadKind::Sink,
        HeadKind::Retrieval,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HeadKind::Uniform => "uniform",
            HeadKind::Bipolar => "bipolar",
            HeadKind::Terminal => "terminal",
            HeadKind::Sink => "sink",
            HeadKind::Retrieval => "retrieval",
        }
    }
}

/// Shape and seed of a synthetic layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthSpec {
    pub kind: HeadKind,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub len: usize,
    pub dim: usize,
    pub seed: u64,
}

/// A synthetic layer and where its needles are (retrieval only; per KV head, ascending).
#[derive(Clone, Debug)]
pub struct Synth {
    pub heads: Heads,
    pub needles: Vec<Vec<usize>>,
}

const NOISE: f64 = 0.3;
const BAND_GAP: f64 = 50.0;

/// Generates the layer described by `spec`; the same spec gives the same values.
pub fn synth(spec: &SynthSpec) -> Result<Synth> {
    let SynthSpec {
        kind,
        q_heads,
        kv_heads,
        len: l,
        dim: d,
        seed,
    } = *spec;
    if l == 0 {
        return Err(TcaError::Invalid(
            "synthetic length L must be at least 1".into(),
        ));
    }
    if d < 4 {
        return Err(TcaError::Invalid(format!(
            "synthetic heads need head dim d >= 4 (got {d})"
        )));
    }
    if kv_heads == 0 || q_heads == 0 || q_heads % kv_heads != 0 {
        return Err(TcaError::Shape(format!(
            "query heads ({q_heads}) must be a positive multiple of KV heads ({kv_heads})"
        )));
    }
    let g = q_heads / kv_heads;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut draw = |shape: (usize, usize, usize), sd: f64| {
        Array3::from_shape_simple_fn(shape, || sd * rng.sample::<f64, _>(StandardNormal))
    };
    let mut q = draw((q_heads, l, d), NOISE);
    let mut k = draw((kv_heads, l, d), NOISE);
    let v = draw((kv_heads, l, d), 1.0);
    let lf = l as f64;
    let amp = |gap: f64| (gap.max(0.0) * (d as f64).sqrt()).sqrt();
    let mut needles = vec![Vec::new(); kv_heads];
    for (kv, needles_kv) in needles.iter_mut().enumerate() {
        let frame = orthonormal_frame(&mut rng, d, 4);
        let (e_s, e_c, e_n, e_r) = (&frame[0], &frame[1], &frame[2], &frame[3]);
        let qh = kv * g..(kv + 1) * g;
        // Noise lives off the frame, so planted scores are exact up to noise . noise.
        let project_out = |mut x: ndarray::ArrayViewMut1<'_, f64>| {
            for e in &frame {
                let c = x.dot(e);
                x.scaled_add(-c, e);
            }
        };
        for h in qh.clone() {
            q.index_axis_mut(ndarray::Axis(0), h)
                .rows_mut()
                .into_iter()
                .for_each(project_out);
        }
        k.index_axis_mut(ndarray::Axis(0), kv)
            .rows_mut()
            .into_iter()
            .for_each(project_out);
        let mut add_q = |i: usize, e: &Array1<f64>, a: f64| {
            for h in qh.clone() {
                q.slice_mut(ndarray::s![h, i, ..]).scaled_add(a, e);
            }
        };
        let sink_gap = match kind {
            HeadKind::Sink => Some(lf.ln() + 3.0),
            HeadKind::Bipolar => Some(BAND_GAP + (lf / 20.0).ln()),
            _ => None,
        };
        if let Some(gap) = sink_gap {
            let a = amp(gap);
            // The sink key is exactly a e_s: no noise to shift its score per head.
            k.slice_mut(ndarray::s![kv, 0, ..]).assign(&(e_s * a));
            (0..l).for_each(|i| add_q(i, e_s, a));
        }
        if matches!(kind, HeadKind::Terminal | HeadKind::Bipolar) {
            let a = amp(BAND_GAP);
            let theta = std::f64::consts::PI / lf;
            for i in 0..l {
                let (s, c) = (i as f64 * theta).sin_cos();
                let band = e_c * c + e_r * s;
                add_q(i, &band, a);
                // The bipolar head's sink key stays off the band (it would score
                // -50 at the far end and hide the sink).
                if !(kind == HeadKind::Bipolar && i == 0) {
                    k.slice_mut(ndarray::s![kv, i, ..]).scaled_add(a, &band);
                }
            }
        }
        if kind == HeadKind::Retrieval {
            let a = amp(lf.ln() + 3.0);
            let n = (l / 256).max(2).min(l);
            let (lo, hi) = (l / 20, ((9 * l) / 10).max(l / 20 + 1));
            let mut pos: Vec<usize> = Vec::with_capacity(n);
            while pos.len() < n.min(hi - lo) {
                let p = rng.random_range(lo..hi);
                if !pos.contains(&p) {
                    pos.push(p);
                }
            }
            pos.sort_unstable();
            for &p in &pos {
                k.slice_mut(ndarray::s![kv, p, ..]).scaled_add(a, e_n);
            }
            (l - (l / 16).max(1)..l).for_each(|i| add_q(i, e_n, a));
            *needles_kv = pos;
        }
    }
    Ok(Synth {
        heads: Heads::new(q, k, v)?,
        needles,
    })
}

/// `n` orthonormal vectors of dimension d (n <= d), by Gram-Schmidt on Gaussian draws.
fn orthonormal_frame(rng: &mut StdRng, d: usize, n: usize) -> Vec<Array1<f64>> {
    let mut out: Vec<Array1<f64>> = Vec::with_capacity(n);
    while out.len() < n {
        let mut x = Array1::from_shape_simple_fn(d, || rng.sample::<f64, _>(StandardNormal));
        for e in &out {
            let c = x.dot(e);
            x.scaled_add(-c, e);
        }
        let norm = x.dot(&x).sqrt();
        if norm > 1e-6 {
            out.push(x / norm);
        }
    }
    out
}
