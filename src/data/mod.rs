//! Inputs: validated Q/K/V, safetensors I/O and seeded synthetic heads.

pub mod heads;
pub mod io;
pub mod synth;

pub use heads::Heads;
pub use io::{load_safetensors, save_safetensors, write_new, SaveDtype};
pub use synth::{synth, HeadKind, Synth, SynthSpec};
