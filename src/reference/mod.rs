//! The f64 oracle: causal softmax rows and exact attention. Everything else in the
//! harness (sparse attention, calibration, the bound checker, the GPU audit) is measured
//! against these functions.

pub mod exact;
pub mod softmax;

pub use exact::{attention, causal_row, Attention};
pub use softmax::{softmax_in_place, weighted_sum};
