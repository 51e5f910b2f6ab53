//! The one error type of the library: every public entry point answers bad input with
//! one of these (never a panic).

use std::path::PathBuf;

/// Errors of the harness, each naming the problem in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum TcaError {
    /// Tensor shapes that do not fit together (GQA, lengths, head dims).
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A value that is NaN or infinite.
    #[error("non-finite value in {tensor} at index {index:?}: {value}")]
    NonFinite {
        tensor: String,
        index: Vec<usize>,
        value: f64,
    },
    /// A configuration value outside its domain.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A file that cannot be read as what it claims to be.
    #[error("cannot read {path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A calibration profile made for another model shape or configuration.
    #[error("profile does not fit this input: {0}")]
    ProfileMismatch(String),
    /// An argument outside its domain (steps, kinds, sizes).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A file that would be overwritten without `--force`.
    #[error("{0} exists; pass --force to overwrite it")]
    WouldOverwrite(PathBuf),
    /// A check that failed: a non-finite output, or a reading that must hold did not
    /// (exit code 1, after the tables are written).
    #[error("check failed: {0}")]
    Verdict(String),
    /// A compute backend that is not built in or has no device.
    #[error("backend: {0}")]
    Backend(String),
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Result with [`TcaError`].
pub type Result<T> = std::result::Result<T, TcaError>;

impl TcaError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TcaError::Io {
            path: path.into(),
            source,
        }
    }
}
