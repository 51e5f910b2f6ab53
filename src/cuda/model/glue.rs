//! Launchers of kernels/model.cu (the forward's glue): one CTA of [`THREADS`] threads per
//! row. Shapes are checked against the buffers before each launch.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::super::{cfg, Ctx, Gpu, GpuError, GpuResult};

/// Threads per CTA of the row kernels (a multiple of 32).
pub const THREADS: u32 = 256;

fn check(ok: bool, what: &str) -> GpuResult<()> {
    if ok {
        Ok(())
    } else {
        Err(GpuError::Invalid(format!(
            "{what}: buffer too small for the shape"
        )))
    }
}

fn rows_u32(rows: usize, what: &str) -> GpuResult<u32> {
    if rows == 0 || rows > i32::MAX as usize {
        return Err(GpuError::Invalid(format!("{what}: {rows} rows")));
    }
    Ok(rows as u32)
}

/// x[t, :] = E[tokens[t], :] (f32 from f16); tokens are checked against the
/// vocabulary by the caller.
pub fn embed(
    gpu: &Gpu,
    table: &CudaSlice<u16>,
    tokens: &CudaSlice<u32>,
    x: &mut CudaSlice<f32>,
    hidden: usize,
) -> GpuResult<()> {
    let l = tokens.len();
    check(x.len() >= l * hidden, "tca_embed")?;
    let f = gpu.func("tca_embed")?;
    let h = hidden as i32;
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(table)
            .arg(tokens)
            .arg(x)
            .arg(&h)
            .launch(cfg((rows_u32(l, "tca_embed")?, 1, 1), THREADS, 0))
    }
    .ctx("tca_embed")?;
    Ok(())
}

/// y = f16(rmsnorm(x) * w), rows of `hidden`.
pub fn rmsnorm(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    y: &mut CudaSlice<u16>,
    (rows, hidden): (usize, usize),
    eps: f32,
) -> GpuResult<()> {
    check(
        x.len() >= rows * hidden && y.len() >= rows * hidden && w.len() == hidden,
        "tca_rmsnorm",
    )?;
    let f = gpu.func("tca_rmsnorm")?;
    let h = hidden as i32;
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(x)
            .arg(w)
            .arg(y)
            .arg(&h)
            .arg(&eps)
            .launch(cfg((rows_u32(rows, "tca_rmsnorm")?, 1, 1), THREADS, 0))
    }
    .ctx("tca_rmsnorm")?;
    Ok(())
}

/// The heads of one layer on the device: (Hq, Hkv, L, d).
pub type HeadShape = (usize, usize, usize, usize);

/// Where [`rope_split`] writes K and V: rows `p0 .. p0 + L` of `[Hkv, rows, d]` buffers
/// (`rows = L, p0 = 0` in a prefill; a cache of `rows` positions in a decode step).
#[derive(Clone, Copy, Debug)]
pub struct KvRows {
    pub rows: usize,
    pub p0: usize,
}

/// Fused Q|K|V projections `[L, (Hq + 2 Hkv) d]` (f32) of positions `p0 .. p0 + L` to
/// RoPE'd Q `[Hq, L, d]` and rows `p0 ..` of K, V `[Hkv, rows, d]` (bf16); `cos`, `sin`
/// are `[positions, d/2]` tables from position 0.
#[allow(clippy::too_many_arguments)]
pub fn rope_split(
    gpu: &Gpu,
    qkv: &CudaSlice<f32>,
    cos: &CudaSlice<f32>,
    sin: &CudaSlice<f32>,
    q: &mut CudaSlice<u16>,
    k: &mut CudaSlice<u16>,
    v: &mut CudaSlice<u16>,
    (hq, hkv, l, d): HeadShape,
    at: KvRows,
) -> GpuResult<()> {
    let end = at.p0 + l;
    check(
        qkv.len() >= l * (hq + 2 * hkv) * d
            && end <= at.rows
            && cos.len() >= end * d / 2
            && sin.len() >= end * d / 2
            && q.len() >= hq * l * d
            && k.len() >= hkv * at.rows * d
            && v.len() >= hkv * at.rows * d
            && d % 2 == 0
            && at.rows <= i32::MAX as usize,
        "tca_rope_split",
    )?;
    let f = gpu.func("tca_rope_split")?;
    let (li, hqi, hkvi, di) = (l as i32, hq as i32, hkv as i32, d as i32);
    let (si, pi) = (at.rows as i32, at.p0 as i32);
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(qkv)
            .arg(cos)
            .arg(sin)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(&li)
            .arg(&hqi)
            .arg(&hkvi)
            .arg(&di)
            .arg(&si)
            .arg(&pi)
            .launch(cfg((rows_u32(l, "tca_rope_split")?, 1, 1), THREADS, 0))
    }
    .ctx("tca_rope_split")?;
    Ok(())
}

/// y = f16(bf16(x)) elementwise (a decode step's attention output `[Hq d]`).
pub fn to_f16(gpu: &Gpu, x: &CudaSlice<f32>, y: &mut CudaSlice<u16>) -> GpuResult<()> {
    let n = x.len();
    check(
        y.len() >= n && n > 0 && n <= i32::MAX as usize,
        "tca_to_f16",
    )?;
    let f = gpu.func("tca_to_f16")?;
    let ni = n as i32;
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(x)
            .arg(y)
            .arg(&ni)
            .launch(cfg(
                (n.div_ceil(THREADS as usize).min(1024) as u32, 1, 1),
                THREADS,
                0,
            ))
    }
    .ctx("tca_to_f16")?;
    Ok(())
}

/// O `[H, L, d]` (bf16) to `[L, H d]` (f16).
pub fn merge_heads(
    gpu: &Gpu,
    o: &CudaSlice<u16>,
    y: &mut CudaSlice<u16>,
    (h, l, d): (usize, usize, usize),
) -> GpuResult<()> {
    check(
        o.len() >= h * l * d && y.len() >= h * l * d,
        "tca_merge_heads",
    )?;
    let f = gpu.func("tca_merge_heads")?;
    let (li, hi, di) = (l as i32, h as i32, d as i32);
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(o)
            .arg(y)
            .arg(&li)
            .arg(&hi)
            .arg(&di)
            .launch(cfg((rows_u32(l, "tca_merge_heads")?, 1, 1), THREADS, 0))
    }
    .ctx("tca_merge_heads")?;
    Ok(())
}

/// gate|up `[L, 2 F]` (f32) to f16 silu(gate) * up `[L, F]`.
pub fn silu_mul(
    gpu: &Gpu,
    gu: &CudaSlice<f32>,
    y: &mut CudaSlice<u16>,
    (l, ffn): (usize, usize),
) -> GpuResult<()> {
    check(
        gu.len() >= l * 2 * ffn && y.len() >= l * ffn,
        "tca_silu_mul",
    )?;
    let f = gpu.func("tca_silu_mul")?;
    let fi = ffn as i32;
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(gu)
            .arg(y)
            .arg(&fi)
            .launch(cfg((rows_u32(l, "tca_silu_mul")?, 1, 1), THREADS, 0))
    }
    .ctx("tca_silu_mul")?;
    Ok(())
}

/// Adds the number of non-finite values among the first `n` of `x` to `count[slot]`.
pub fn count_nonfinite(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    n: usize,
    count: &mut CudaSlice<u32>,
    slot: usize,
) -> GpuResult<()> {
    check(x.len() >= n && slot < count.len(), "tca_count_nonfinite")?;
    let f = gpu.func("tca_count_nonfinite")?;
    let n64 = n as u64;
    let mut c = count.slice_mut(slot..slot + 1);
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1024) as u32;
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(x)
            .arg(&n64)
            .arg(&mut c)
            .launch(cfg((blocks, 1, 1), THREADS, 0))
    }
    .ctx("tca_count_nonfinite")?;
    Ok(())
}

/// Rows `r0 .. r0 + rows` of the scored targets from a logits chunk `[rows, vocab]`:
/// nll[r] = lse - logit[target[r]] (f64) and the arg-max (first on ties).
pub fn row_nll(
    gpu: &Gpu,
    logits: &CudaSlice<f32>,
    targets: &CudaSlice<u32>,
    nll: &mut CudaSlice<f64>,
    arg: &mut CudaSlice<u32>,
    (r0, rows, vocab): (usize, usize, usize),
) -> GpuResult<()> {
    check(
        logits.len() >= rows * vocab
            && targets.len() >= r0 + rows
            && nll.len() >= r0 + rows
            && arg.len() >= r0 + rows,
        "tca_row_nll",
    )?;
    let f = gpu.func("tca_row_nll")?;
    let (v, r0i) = (vocab as i32, r0 as i32);
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(logits)
            .arg(targets)
            .arg(nll)
            .arg(arg)
            .arg(&v)
            .arg(&r0i)
            .launch(cfg((rows_u32(rows, "tca_row_nll")?, 1, 1), THREADS, 0))
    }
    .ctx("tca_row_nll")?;
    Ok(())
}
