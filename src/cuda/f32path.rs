//! The f32 attention path (small shapes): sparse attention over a given global set, or
//! dense causal attention, checked against the f64 oracle at 1e-5.

use super::{cfg, Ctx, Gpu, GpuError, GpuResult};
use cudarc::driver::PushKernelArg;

/// f32 outputs on the host: O [Hq, L, D] and the log-sum-exp [Hq, L], row-major.
pub struct HostAttention32 {
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
}

/// Runs `tca_attention_f32`. `global` is S_G per KV head (ascending) or None for dense
/// causal attention (w = L).
#[allow(clippy::too_many_arguments)]
pub fn attention_f32(
    gpu: &Gpu,
    (hq, hkv, l, d): (usize, usize, usize, usize),
    q: &[f32],
    k: &[f32],
    v: &[f32],
    global: Option<&[Vec<usize>]>,
    window: usize,
    scale: f32,
) -> GpuResult<HostAttention32> {
    if d > 256 || hq % hkv != 0 {
        return Err(GpuError::Invalid("f32 path: d <= 256 and Hkv | Hq".into()));
    }
    let dq = gpu.upload(q)?;
    let dk = gpu.upload(k)?;
    let dv = gpu.upload(v)?;
    let mut o = gpu.alloc::<f32>(hq * l * d)?;
    let mut lse = gpu.alloc::<f32>(hq * l)?;
    gpu.poison(&mut o)?;
    gpu.poison(&mut lse)?;
    let f = gpu.func("tca_attention_f32")?;
    let rows = hq * l;
    let (li, hqi, hkvi, di) = (l as i32, hq as i32, hkv as i32, d as i32);
    let launch = cfg((rows.div_ceil(4) as u32, 1, 1), 128, 0);
    match global {
        Some(gs) => {
            let gcap = gs.iter().map(|g| g.len()).max().unwrap_or(0).max(1);
            let mut pos = vec![0i32; hkv * gcap];
            for (kv, g) in gs.iter().enumerate() {
                for (i, &p) in g.iter().enumerate() {
                    pos[kv * gcap + i] = p as i32;
                }
            }
            let counts: Vec<i32> = gs.iter().map(|g| g.len() as i32).collect();
            let dpos = gpu.upload(&pos)?;
            let dcnt = gpu.upload(&counts)?;
            let (gc, w) = (gcap as i32, window as i32);
            unsafe {
                gpu.stream
                    .launch_builder(&f)
                    .arg(&dq)
                    .arg(&dk)
                    .arg(&dv)
                    .arg(&dpos)
                    .arg(&dcnt)
                    .arg(&gc)
                    .arg(&mut o)
                    .arg(&mut lse)
                    .arg(&li)
                    .arg(&hqi)
                    .arg(&hkvi)
                    .arg(&di)
                    .arg(&w)
                    .arg(&scale)
                    .launch(launch)
            }
            .ctx("tca_attention_f32 (sparse)")?;
        }
        None => {
            let (null, zero) = (0u64, 0i32);
            unsafe {
                gpu.stream
                    .launch_builder(&f)
                    .arg(&dq)
                    .arg(&dk)
                    .arg(&dv)
                    .arg(&null)
                    .arg(&null)
                    .arg(&zero)
                    .arg(&mut o)
                    .arg(&mut lse)
                    .arg(&li)
                    .arg(&hqi)
                    .arg(&hkvi)
                    .arg(&di)
                    .arg(&li)
                    .arg(&scale)
                    .launch(launch)
            }
            .ctx("tca_attention_f32 (dense)")?;
        }
    }
    gpu.sync()?;
    Ok(HostAttention32 {
        o: gpu.download(&o)?,
        lse: gpu.download(&lse)?,
    })
}
