//! The model's weights for the GPU: dequantised f32 (as [`Llama`] holds them) to bf16
//! once, on the host, then uploaded. Per layer the Q, K, V projections are stacked into
//! one `[(Hq + 2 Hkv) d, hidden]` matrix (rows of Q, then K, then V: one GEMM gives the
//! fused `[L, (Hq + 2 Hkv) d]` that `tca_rope_split` reads) and gate and up into one
//! `[2 F, hidden]` matrix (gate rows, then up rows: `tca_silu_mul`'s layout). Norm
//! weights stay f32.

use cudarc::driver::CudaSlice;
use ndarray::{Array1, Array2};

use super::super::{f32_to_bf16, Gpu, GpuError, GpuResult};
use crate::model::llama::{Llama, LlamaConfig};

/// bf16 bit patterns of a matrix's rows, stacked in order (row-major).
pub fn stack_bf16(parts: &[&Array2<f32>]) -> GpuResult<Vec<u16>> {
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
        out.extend(p.iter().map(|&x| f32_to_bf16(x)));
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
        wqkv: stack_bf16(&[w.wq, w.wk, w.wv])?,
        wo: stack_bf16(&[w.wo])?,
        ffn_norm: vec_of(w.ffn_norm),
        w_gate_up: stack_bf16(&[w.w_gate, w.w_up])?,
        w_down: stack_bf16(&[w.w_down])?,
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
/// output head bf16, norms f32.
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
            embed: gpu.upload(&stack_bf16(&[embed])?)?,
            head: if tied {
                None
            } else {
                Some(gpu.upload(&stack_bf16(&[head])?)?)
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
