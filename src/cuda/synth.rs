//! Fast seeded synthetic layers for the GPU benchmark, generated in parallel on the host
//! straight into bf16 (the f64 generator of `data::synth` is too slow at 128K x 32 heads).
//! Same construction as `data::synth` (see there): Gaussian noise N(0, 0.3^2) on q and k,
//! N(0, 1) on v, and planted logit gaps along an orthonormal frame {e_s, e_c, e_n, e_r}
//! per KV head. Every KV head mixes the patterns of real heads; by kv mod 4:
//! - 0 "bipolar": sink on key 0 (gap ln(L / 13.5)) and a rotary band (A^2 / sqrt(d) = 50,
//!   theta = pi / L);
//! - 1 "retrieval": max(2, L / 256) needle keys in [L / 20, 0.9 L), retrieved by the last
//!   max(1, L / 16) queries (gap ln L + 3), over a sharp band (200);
//! - 2 "terminal": a sharp band (200);
//! - 3 "sink": sink gap ln L + 3.

use rayon::prelude::*;

/// One layer in bf16 bits, row-major: q [Hq, L, D], k and v [Hkv, L, D].
pub struct Layer {
    pub hq: usize,
    pub hkv: usize,
    pub len: usize,
    pub dim: usize,
    pub q: Vec<u16>,
    pub k: Vec<u16>,
    pub v: Vec<u16>,
    /// Needle positions per KV head (empty for other kinds).
    pub needles: Vec<Vec<usize>>,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A standard normal from a counter (Box-Muller on two hashed uniforms).
fn normal(key: u64) -> f64 {
    let a = splitmix(key);
    let b = splitmix(a ^ 0x5851_F42D_4C95_7F2D);
    let u1 = ((a >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let u2 = (b >> 11) as f64 / (1u64 << 53) as f64;
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn key(seed: u64, tensor: u64, head: u64, row: u64, col: u64) -> u64 {
    splitmix(seed ^ (tensor << 60) ^ (head << 48))
        .wrapping_add(row.wrapping_mul(0x1_0000_0001))
        .wrapping_add(col.wrapping_mul(0x9E37_79B9))
        ^ row.wrapping_mul(0xD6E8_FEB8_6659_FD93).wrapping_add(col)
}

fn frame(seed: u64, kv: usize, d: usize) -> Vec<Vec<f64>> {
    let mut out: Vec<Vec<f64>> = Vec::new();
    for f in 0..4u64 {
        let mut e: Vec<f64> = (0..d)
            .map(|c| normal(key(seed, 3, kv as u64, 1_000_000 + f, c as u64)))
            .collect();
        for o in &out {
            let dot: f64 = e.iter().zip(o).map(|(a, b)| a * b).sum();
            e.iter_mut().zip(o).for_each(|(a, b)| *a -= dot * b);
        }
        let n = e.iter().map(|x| x * x).sum::<f64>().sqrt();
        e.iter_mut().for_each(|x| *x /= n);
        out.push(e);
    }
    out
}

/// Generates a layer; the same arguments give the same values.
pub fn generate(hq: usize, hkv: usize, len: usize, dim: usize, seed: u64) -> Layer {
    let g = hq / hkv;
    let d = dim;
    let lf = len as f64;
    let amp = |gap: f64| (gap.max(0.0) * (d as f64).sqrt()).sqrt();
    let theta = std::f64::consts::PI / lf;
    let frames: Vec<_> = (0..hkv).map(|kv| frame(seed, kv, d)).collect();
    let n_needles = (len / 256).max(2);
    let needles: Vec<Vec<usize>> = (0..hkv)
        .map(|kv| {
            if kv % 4 != 1 {
                return vec![];
            }
            let lo = len / 20;
            let hi = ((len as f64) * 0.9) as usize;
            let mut v: Vec<usize> = (0..n_needles)
                .map(|n| {
                    lo + (splitmix(key(seed, 4, kv as u64, n as u64, 0)) as usize)
                        % (hi - lo).max(1)
                })
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        })
        .collect();
    // Per KV head: (sink gap, band gap, retrieval).
    let kind = |kv: usize| -> (f64, f64, bool) {
        match kv % 4 {
            0 => ((lf / 13.5).ln(), 50.0, false),
            1 => (0.0, 200.0, true),
            2 => (0.0, 200.0, false),
            _ => (lf.ln() + 3.0, 0.0, false),
        }
    };
    let n_retrieving = (len / 16).max(1);
    let needle_amp = amp(lf.ln() + 3.0);
    let bf = |x: f64| super::f32_to_bf16(x as f32);
    let row = |tensor: u64, head: usize, kv: usize, i: usize, out: &mut [u16]| {
        let (sink, band, retr) = kind(kv);
        let fr = &frames[kv];
        let mut x: Vec<f64> = (0..d)
            .map(|c| {
                let z = normal(key(seed, tensor, head as u64, i as u64, c as u64));
                if tensor == 2 {
                    z
                } else {
                    0.3 * z
                }
            })
            .collect();
        if tensor != 2 {
            let is_q = tensor == 0;
            let mut add = |e: &Vec<f64>, a: f64| x.iter_mut().zip(e).for_each(|(y, b)| *y += a * b);
            if sink > 0.0 && (is_q || i == 0) {
                add(&fr[0], amp(sink));
            }
            if band > 0.0 {
                let a = amp(band);
                add(&fr[1], a * (i as f64 * theta).cos());
                add(&fr[3], a * (i as f64 * theta).sin());
            }
            if retr {
                let hit = if is_q {
                    i >= len - n_retrieving
                } else {
                    needles[kv].binary_search(&i).is_ok()
                };
                if hit {
                    add(&fr[2], needle_amp);
                }
            }
        }
        out.iter_mut().zip(&x).for_each(|(o, &y)| *o = bf(y));
    };
    let mut q = vec![0u16; hq * len * d];
    q.par_chunks_mut(d).enumerate().for_each(|(n, out)| {
        let (h, i) = (n / len, n % len);
        row(0, h, h / g, i, out)
    });
    let mut k = vec![0u16; hkv * len * d];
    k.par_chunks_mut(d).enumerate().for_each(|(n, out)| {
        let (kv, i) = (n / len, n % len);
        row(1, kv, kv, i, out)
    });
    let mut v = vec![0u16; hkv * len * d];
    v.par_chunks_mut(d).enumerate().for_each(|(n, out)| {
        let (kv, i) = (n / len, n % len);
        row(2, kv, kv, i, out)
    });
    Layer {
        hq,
        hkv,
        len,
        dim,
        q,
        k,
        v,
        needles,
    }
}

impl Layer {
    /// The layer as f64 heads (exact: bf16 values are representable in f64).
    pub fn to_heads(&self) -> crate::Result<crate::Heads> {
        let cv = |x: &[u16], h: usize| {
            ndarray::Array3::from_shape_vec(
                (h, self.len, self.dim),
                x.iter().map(|&b| super::bf16_to_f32(b) as f64).collect(),
            )
            .expect("shape")
        };
        crate::Heads::new(
            cv(&self.q, self.hq),
            cv(&self.k, self.hkv),
            cv(&self.v, self.hkv),
        )
    }
}
