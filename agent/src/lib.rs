//! The edgeshift agent as a library: every part the `edgeshift` binary drives.
//!
//! Data flows one way: image → [`slicer`] → [`store`] → transfer → assembler.

pub mod store;
