//! A real pretrained causal LM in the harness: SmolLM2-135M-Instruct from its GGUF, or
//! a Hugging Face checkpoint of a llama, mistral or qwen2 model (see `docs/model.md`).
//!
//! - [`gguf`]: a bounds-checked GGUF reader;
//! - [`quant`]: F32/F16/Q8_0/Q4_1 dequantisation;
//! - [`tokenizer`]: Hugging Face `tokenizers`, from `tokenizer.json` or a GGUF's vocabulary
//!   and merges;
//! - [`hf`]: Hugging Face model folders (config.json, safetensors, tokenizer.json), load
//!   and export;
//! - [`rope`]: RoPE frequencies (with `rope_scaling`), rotation, q/k row orders;
//! - [`attention`]: the pluggable [`AttentionPolicy`] and its [`Exact`] implementation;
//! - [`llama`]: the f32 forward pass (prefill, scoring, Q/K/V capture, KV-cache decode);
//! - [`assets`]: where the model and texts are found.

pub mod assets;
pub mod attention;
pub mod gguf;
pub mod hf;
pub mod llama;
pub mod quant;
pub mod rope;
pub mod sparse;
pub mod tokenizer;

pub use attention::{AttentionPolicy, Exact};
pub use gguf::GgufFile;
pub use llama::{
    Capture, DecodeAttention, KvCache, Llama, LlamaConfig, Model, Qkv, QkvHook, Score,
};
pub use tokenizer::Tokenizer;
