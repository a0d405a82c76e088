//! The coordinator's control messages (common/src/control.rs), JSON and postcard.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeshift_common::hostile::check_control(data));
