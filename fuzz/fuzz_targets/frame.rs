//! A frame header and body from a peer (common/src/wire.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeshift_common::hostile::check_frame(data));
