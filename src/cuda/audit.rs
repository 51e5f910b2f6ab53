//! Launcher of kernels/audit.cu: the prefix l2 diameters of V that the `l2_diameter`
//! reading of Theorem 1 needs (docs/theorem.md), computed on the device where the host's
//! O(L^2 d) loop is too slow (32K-128K tokens).

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{cfg, Ctx, Gpu, GpuError, GpuResult};

/// Rows per CTA of `tca_prefix_far_d{D}`.
const ROWS: usize = 128;

/// diam_2{v_j : j <= i} per KV head and position, from V bf16 `[Hkv, L, d]` on the
/// device: max_{j < i} ||v_i - v_j||^2 per row on the GPU (f32 sums of exact bf16
/// differences, relative error <= d 2^-24), then the running maximum and the root on
/// the host, widened by (1 + d 2^-23) so that the result bounds the exact diameter from
/// above (the reading can only be judged as strictly as with the exact value, or
/// 1e-5 more leniently, never more strictly).
pub fn prefix_diameters(
    gpu: &Gpu,
    v: &CudaSlice<u16>,
    (hkv, l, d): (usize, usize, usize),
) -> GpuResult<Vec<Vec<f64>>> {
    if ![64, 96, 128].contains(&d) {
        return Err(GpuError::Invalid(format!(
            "prefix diameters: head dim {d} (have 64, 96, 128)"
        )));
    }
    if l == 0 || l > i32::MAX as usize || v.len() < hkv * l * d {
        return Err(GpuError::Invalid(format!(
            "prefix diameters: V holds {} values for {hkv} x {l} x {d}",
            v.len()
        )));
    }
    let f = gpu.func(&format!("tca_prefix_far_d{d}"))?;
    let mut far2 = gpu.upload(&vec![f32::NAN; hkv * l])?;
    let li = l as i32;
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(v)
            .arg(&mut far2)
            .arg(&li)
            .launch(cfg(
                (l.div_ceil(ROWS) as u32, hkv as u32, 1),
                ROWS as u32,
                0,
            ))
    }
    .ctx("tca_prefix_far")?;
    Ok(diameters_from_far2(&gpu.download(&far2)?, l, d))
}

/// The prefix diameters of each KV head from the kernel's `far2` `[Hkv, L]`: the
/// running maximum, its root, widened by (1 + d 2^-23); a NaN (a row the kernel did not
/// write) stays NaN from there on, and fails the audit.
pub fn diameters_from_far2(far2: &[f32], l: usize, d: usize) -> Vec<Vec<f64>> {
    let widen = 1.0 + d as f64 * f64::powi(2.0, -23);
    far2.chunks(l)
        .map(|row| {
            let mut m = 0.0f64;
            row.iter()
                .map(|&x| {
                    m = if x.is_nan() || m.is_nan() {
                        f64::NAN
                    } else {
                        m.max(x as f64)
                    };
                    m.sqrt() * widen
                })
                .collect()
        })
        .collect()
}
