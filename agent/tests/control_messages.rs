//! The migration control channel's messages on hostile bytes: postcard
//! decoding gives an error or a value that encodes back the same, never a
//! panic (the `migrate_control` fuzz target runs the same check;
//! docs/fuzzing.md).

use edgeshift_agent::migrate::proto::{Request, Response};
use edgeshift_common::hostile::check_postcard;
use proptest::prelude::*;

fn encoded(r: &Request) -> Vec<u8> {
    postcard::to_allocvec(r).expect("encodes")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        check_postcard::<Request>(&data);
        check_postcard::<Response>(&data);
    }

    #[test]
    fn requests_round_trip_and_survive_mutation(
        recheck in proptest::collection::vec(any::<u32>(), 0..50),
        id in any::<[u8; 32]>(),
        flip in (any::<usize>(), 1u8..),
    ) {
        let verify = Request::Verify { manifest_id: id, recheck: recheck.clone() };
        let bytes = encoded(&verify);
        match postcard::from_bytes::<Request>(&bytes) {
            Ok(Request::Verify { manifest_id, recheck: back }) => {
                prop_assert_eq!(manifest_id, id);
                prop_assert_eq!(back, recheck);
            }
            other => prop_assert!(false, "decoded as {other:?}"),
        }
        let mut bad = bytes;
        let n = bad.len();
        bad[flip.0 % n] ^= flip.1;
        check_postcard::<Request>(&bad);
        check_postcard::<Response>(&bad);
        for r in [Request::Finish, Request::Abort, Request::AwaitIncoming, Request::OpenMirror, Request::AwaitImage] {
            check_postcard::<Request>(&encoded(&r));
        }
    }
}
