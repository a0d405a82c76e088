//! The edgeshift agent as a library: every part the `edgeshift` binary drives.
//!
//! Data flows one way: image → [`slicer`] → [`store`] → [`transfer`] →
//! assembler; [`dirty`] ranks chunks by write rate for [`migrate`], which
//! drives [`vm`]s and asks the coordinator through [`coordination`].

pub mod coordination;
pub mod dirty;
pub mod diskio;
pub mod migrate;
pub mod par;
pub mod slicer;
pub mod store;
pub mod transfer;
pub mod vm;
