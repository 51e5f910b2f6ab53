//! Projections through cuBLAS: `Y [n, out] (f32) = X [n, in] (f16) · Wᵀ + beta Y` with
//! `W [out, in]` (f16, row-major, as the model stores it), f32 accumulation.
//!
//! cuBLAS is column-major: a row-major `[r, c]` matrix is a column-major `c x r` one. So
//! `Yᵀ (out x n) = op(A) · B` with `A` = W read as `in x out` (ld = in) transposed, and
//! `B` = X read as `in x n` (ld = in): `transa = T, transb = N, m = out, n = n, k = in`,
//! `ldc = out`. [`GemmShape::for_linear`] makes these numbers; a CPU test runs them
//! through a column-major reference GEMM against ndarray's `x · wᵀ`.

use cudarc::cublas::{result as blas, sys, CudaBlas};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use std::sync::Arc;

use crate::cuda::{quiet_catch, Gpu, GpuError, GpuResult};

/// The column-major GEMM arguments of `Y = X · Wᵀ` (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    /// Whether A (W) is transposed (always: W is read as `in x out`).
    pub trans_a: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

impl GemmShape {
    /// `rows` rows of X `[rows, inn]`, W `[out, inn]`.
    pub fn for_linear(rows: usize, out: usize, inn: usize) -> GpuResult<Self> {
        let max = i32::MAX as usize;
        if rows == 0 || out == 0 || inn == 0 || rows > max || out > max || inn > max {
            return Err(GpuError::Invalid(format!(
                "GEMM shape [{rows}, {inn}] x [{out}, {inn}]^T out of range"
            )));
        }
        Ok(GemmShape {
            trans_a: true,
            m: out,
            n: rows,
            k: inn,
            lda: inn,
            ldb: inn,
            ldc: out,
        })
    }

    /// A reference column-major GEMM with these arguments (`C = op(A) B + beta C`), on
    /// the host: what cuBLAS computes, for tests of the shapes.
    pub fn reference(&self, a: &[f32], b: &[f32], c: &mut [f32], beta: f32) {
        for j in 0..self.n {
            for i in 0..self.m {
                let mut s = 0.0f32;
                for p in 0..self.k {
                    let av = if self.trans_a {
                        a[i * self.lda + p]
                    } else {
                        a[p * self.lda + i]
                    };
                    s += av * b[j * self.ldb + p];
                }
                let ci = j * self.ldc + i;
                c[ci] = s + beta * c[ci];
            }
        }
    }
}

/// A cuBLAS handle on the [`Gpu`]'s stream.
pub struct Blas {
    handle: CudaBlas,
    stream: Arc<CudaStream>,
}

impl Blas {
    /// Loads libcublas (dynamically) and creates a handle bound to `gpu`'s stream.
    pub fn new(gpu: &Gpu) -> GpuResult<Self> {
        let stream = gpu.stream.clone();
        let handle = quiet_catch(|| CudaBlas::new(stream.clone()))
            .map_err(|_| {
                GpuError::NoDevice(
                    "libcublas could not be loaded (set LD_LIBRARY_PATH to CUDA 13's lib folder)"
                        .into(),
                )
            })?
            .map_err(|e| GpuError::Invalid(format!("cublasCreate: {e:?}")))?;
        Ok(Blas { handle, stream })
    }

    /// `y = x · wᵀ + beta y` for x `[rows, inn]` f16, w `[out, inn]` f16, y `[rows, out]`
    /// f32 (beta 0 or 1: overwrite, or accumulate into the residual stream).
    pub fn linear<X, W, Y>(
        &self,
        x: &X,
        w: &W,
        y: &mut Y,
        (rows, out, inn): (usize, usize, usize),
        beta: f32,
        what: &str,
    ) -> GpuResult<()>
    where
        X: DevicePtr<u16>,
        W: DevicePtr<u16>,
        Y: DevicePtrMut<f32>,
    {
        let s = GemmShape::for_linear(rows, out, inn)?;
        if x.len() < rows * inn || w.len() < out * inn || y.len() < rows * out {
            return Err(GpuError::Invalid(format!(
                "{what}: buffers too small for [{rows}, {inn}] x [{out}, {inn}]^T"
            )));
        }
        let alpha = 1.0f32;
        let st = &self.stream;
        let (wp, _rw) = w.device_ptr(st);
        let (xp, _rx) = x.device_ptr(st);
        let (yp, _ry) = y.device_ptr_mut(st);
        // SAFETY: the pointers are live device buffers of at least the sizes checked
        // above, all on the handle's stream; the scalars are host f32 (the default
        // pointer mode).
        unsafe {
            blas::gemm_ex(
                *self.handle.handle(),
                if s.trans_a {
                    sys::cublasOperation_t::CUBLAS_OP_T
                } else {
                    sys::cublasOperation_t::CUBLAS_OP_N
                },
                sys::cublasOperation_t::CUBLAS_OP_N,
                s.m as i32,
                s.n as i32,
                s.k as i32,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                sys::cudaDataType_t::CUDA_R_16F,
                s.lda as i32,
                xp as *const _,
                sys::cudaDataType_t::CUDA_R_16F,
                s.ldb as i32,
                (&beta) as *const f32 as *const _,
                yp as *mut _,
                sys::cudaDataType_t::CUDA_R_32F,
                s.ldc as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| GpuError::Invalid(format!("cublasGemmEx ({what}): {e:?}")))
    }
}
