//! Manifest bytes (Manifest::from_bytes).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeshift_common::hostile::check_manifest(data));
