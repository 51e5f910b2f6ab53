//! Online core-context selection and sparse attention (docs/algorithm.md §1), plus the peer
//! selection policies of docs/algorithm.md §5.

pub mod blocks;
pub mod budget;
pub mod importance;
pub mod policies;
pub mod select;
pub mod sparse;

pub use budget::{candidates, Budget, Candidate};
pub use importance::importance;
pub use select::{
    kept_count, kept_counts, key_set, select, window_start, HeadRanking, HeadSelection, KeySets,
    Selection,
};
pub use sparse::{sparse_attention, sparse_row};
