//! A per-query error certificate without the dense pass (docs/theorem.md, "The
//! certificate").
//!
//! Theorem 1 bounds TCA's error by the omitted mass gamma_i, which needs the full softmax
//! normaliser. Cheap per-chunk upper bounds on the logits ([`block_bounds`]) bound the
//! mass the omitted chunks can carry, so gamma_hat_i = U_i / (Z_in + U_i) >= gamma_i
//! follows from the kept keys' logits alone ([`certify`]); every true reading of
//! Theorem 1 holds with gamma_hat_i in place of gamma_i. [`certified`] widens a selection
//! until gamma_hat_i <= 1 - tau at every query (config key `certified_tau`).

pub mod block_bounds;
pub mod certified;
pub mod certify;
pub mod rotation;

pub use block_bounds::{BlockSummaries, BoundKind};
pub use certified::CertifiedTau;
pub use certify::{certify, gamma_hat, Certificate, Certifier, OmittedBlock};
