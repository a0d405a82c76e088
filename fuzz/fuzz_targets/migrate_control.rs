//! The migration control channel's messages (agent/src/migrate/proto.rs),
//! postcard as the channel decodes them.
#![no_main]

use edgeshift_agent::migrate::proto::{Request, Response};
use edgeshift_common::hostile::check_postcard;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    check_postcard::<Request>(data);
    check_postcard::<Response>(data);
});
