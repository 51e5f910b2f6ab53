//! Inputs: validated Q/K/V, safetensors I/O and seeded synthetic heads.

pub mod heads;

pub use heads::Heads;
