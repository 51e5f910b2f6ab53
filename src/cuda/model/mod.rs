//! The model forward on the GPU (SmolLM2 and other llama GGUFs): weights dequantised
//! once and held in f16 on the device ([`weights`]; Q, K, V in bf16), projections through cuBLAS
//! ([`gemm`]), the elementwise and row kernels of kernels/model.cu ([`glue`]), and the
//! project's attention kernels, dense or TCA ([`forward`]). [`cli`] runs it for
//! `tca perplexity --backend cuda` and `tca capture --backend cuda`.

pub mod audit;
pub mod cli;
pub mod forward;
pub mod gemm;
pub mod generate;
pub mod glue;
pub mod peers;
pub mod timing;
pub mod weights;

pub use forward::{keep_fraction, ForwardStats, GpuAttn, GpuModel, LayerKeep};
pub use peers::GpuPeer;
