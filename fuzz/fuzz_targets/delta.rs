//! A delta applied to a base chunk (common/src/delta.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeshift_common::hostile::check_delta(data));
