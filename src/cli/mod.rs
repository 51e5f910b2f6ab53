//! Command-line entry points of the `tca` binary that live in the library.

pub mod model;
