//! The model's weights for the GPU: dequantised f32 (as [`Llama`] holds them) to f16
//! once, on the host, then uploaded. f16, not bf16: its 10-bit mantissa makes the
//! projections' rounding 8 times smaller, which keeps the GPU's per-layer Q/K/V within
//! 1e-2 of the CPU forward's (a CPU emulation of the roundings at 2K tokens: max V
//! error 7.5e-3 with f16 weights and GEMM inputs, 1.03e-2 with bf16); SmolLM2's
//! weights and GEMM inputs stay far inside f16's range (inputs below 3e3 at 2K, the
//! range is 6.5e4; an overflow would show as a non-finite residual, which fails). Per layer the Q, K, V projections are stacked into
//! one `[(Hq + 2 Hkv) d, hidden]` matrix (rows of Q, then K, then V: one GEMM gives the
//! fused `[L, (Hq + 2 Hkv) d]` that `tca_rope_split` reads) and gate and up into one
//! `[2 F, hidden]` matrix (gate rows, then up rows: `tca_silu_mul`'s layout). Norm
//! weights stay f32.

use cudarc::driver::CudaSlice;
use ndarray::{Array1, Array2};

use super::super::{Gpu, GpuError, GpuResult};
use crate::model::llama::{Llama, LlamaConfig};

/// f32 to f16 bits, round to nearest even.
pub fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// f16 bit patterns of the matrices' rows, stacked in order (row-major).
pub fn stack_f16(parts: &[&Array2<f32>]) -> GpuResult<Vec<u16>> {
    let cols = parts.first().map_or(0, |p| p.ncols());
    if parts.iter().any(|p| p.ncols() != cols) {
        return Err(GpuError::Invalid(
            "stacked matrices differ in column count".into(),
        ));
    }
    let n: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(n);
    for p in parts {
        // `iter` walks in logical (row-major) order whatever the memory layout.
        out.extend(p.iter().map(|&x| f32_to_f16(x)));
    }
    Ok(out)
}

/// One layer's weights on the host, in the device layout.
pub struct HostLayer {
    pub attn_norm: Vec<f32>,
    /// `[(Hq + 2 Hkv) d, hidden]`
    pub wqkv: Vec<u16>,
    /// `[hidden, Hq d]`
    pub wo: Vec<u16>,
    pub ffn_norm: Vec<f32>,
    /// `[2 F, hidden]`
    pub w_gate_up: Vec<u16>,
    /// `[hidden, F]`
    pub w_down: Vec<u16>,
}

fn vec_of(a: &Array1<f32>) -> Vec<f32> {
    a.iter().copied().collect()
}

/// Layer `i` of `llama` in the device layout.
pub fn host_layer(llama: &Llama, i: usize) -> GpuResult<HostLayer> {
    let w = llama
        .layer_weights(i)
        .ok_or_else(|| GpuError::Invalid(format!("no layer {i}")))?;
    Ok(HostLayer {
        attn_norm: vec_of(w.attn_norm),
        wqkv: stack_f16(&[w.wq, w.wk, w.wv])?,
        wo: stack_f16(&[w.wo])?,
        ffn_norm: vec_of(w.ffn_norm),
        w_gate_up: stack_f16(&[w.w_gate, w.w_up])?,
        w_down: stack_f16(&[w.w_down])?,
    })
}

/// One layer's weights on the device.
pub struct DevLayer {
    pub attn_norm: CudaSlice<f32>,
    pub wqkv: CudaSlice<u16>,
    pub wo: CudaSlice<u16>,
    pub ffn_norm: CudaSlice<f32>,
    pub w_gate_up: CudaSlice<u16>,
    pub w_down: CudaSlice<u16>,
}

/// Every weight on the device: the embedding (also the output head when tied) and the
/// output head f16, norms f32.
pub struct DevWeights {
    pub config: LlamaConfig,
    /// `[vocab, hidden]`
    pub embed: CudaSlice<u16>,
    /// `[vocab, hidden]`; `None` when tied to `embed`.
    pub head: Option<CudaSlice<u16>>,
    pub out_norm: CudaSlice<f32>,
    pub layers: Vec<DevLayer>,
}

impl DevWeights {
    /// Converts and uploads every weight of `llama` (one layer on the host at a time).
    pub fn upload(gpu: &Gpu, llama: &Llama) -> GpuResult<Self> {
        let c = llama.config.clone();
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let h = host_layer(llama, i)?;
            layers.push(DevLayer {
                attn_norm: gpu.upload(&h.attn_norm)?,
                wqkv: gpu.upload(&h.wqkv)?,
                wo: gpu.upload(&h.wo)?,
                ffn_norm: gpu.upload(&h.ffn_norm)?,
                w_gate_up: gpu.upload(&h.w_gate_up)?,
                w_down: gpu.upload(&h.w_down)?,
            });
        }
        let embed = llama.token_embedding();
        let head = llama.output_head();
        let tied = std::ptr::eq(embed, head);
        Ok(DevWeights {
            embed: gpu.upload(&stack_f16(&[embed])?)?,
            head: if tied {
                None
            } else {
                Some(gpu.upload(&stack_f16(&[head])?)?)
            },
            out_norm: gpu.upload(&vec_of(llama.output_norm()))?,
            layers,
            config: c,
        })
    }

    /// The output head `[vocab, hidden]`.
    pub fn head(&self) -> &CudaSlice<u16> {
        self.head.as_ref().unwrap_or(&self.embed)
    }
}
