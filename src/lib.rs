//! tca: a reference harness for TCA-Attention (arXiv 2512.09238).
//!
//! Layout: [`reference`] (exact f64 attention, the oracle), [`selection`] (online
//! core-context selection and sparse attention), [`calibration`] (offline head-specific
//! budgets), [`decode`] (the compacted decoding cache), [`bound`] (Theorem 1 in each
//! reading), [`data`] (inputs), [`config`] (the TOML configuration). The method, in the
//! project's words, with every reading of the paper and its configuration key:
//! docs/algorithm.md.

pub mod backend;
pub mod bound;
pub mod calibration;
pub mod cli;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod decode;
pub mod error;
pub mod experiments;
pub mod model;
pub mod reference;
pub mod selection;

pub use config::Config;
pub use data::Heads;
pub use error::{Result, TcaError};
