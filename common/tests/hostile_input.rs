//! Every decoder of peer input on arbitrary bytes and on mutations of valid
//! encodings: an error or a value that round-trips, never a panic
//! (`edgeshift_common::hostile`; the same checks run under `cargo fuzz`,
//! docs/fuzzing.md). Crashes the fuzzer found stay here as regressions.

use edgeshift_common::hostile;
use edgeshift_common::wire::{self, HEADER_LEN};
use edgeshift_common::{ChunkSize, Fingerprint, Manifest};
use proptest::prelude::*;

fn fp(n: u32) -> Fingerprint {
    Fingerprint::of(&n.to_le_bytes())
}

fn manifest(ns: &[u32], chunk: u64) -> Manifest {
    let size = ChunkSize::new(chunk).expect("chunk size");
    Manifest::new(size, chunk * ns.len() as u64, ns.iter().map(|&n| fp(n)).collect())
}

/// Flips bits of `bytes` at the given positions (modulo its length).
fn mutate(mut bytes: Vec<u8>, flips: &[(usize, u8)]) -> Vec<u8> {
    if !bytes.is_empty() {
        let n = bytes.len();
        for &(at, x) in flips {
            bytes[at % n] ^= x;
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn frames_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        hostile::check_frame(&data);
    }

    #[test]
    fn valid_frames_round_trip_and_survive_mutation(
        ns in proptest::collection::vec(any::<u32>(), 1..40),
        rate in any::<u64>(),
        flips in proptest::collection::vec((any::<usize>(), 1u8..), 0..6),
    ) {
        let fps: Vec<Fingerprint> = ns.iter().map(|&n| fp(n)).collect();
        let frame = wire::encode_chunk_request(7, true, rate, &fps);
        let (head, got) = wire::decode_chunk_request(&frame[HEADER_LEN..]).expect("decodes");
        prop_assert_eq!(head.path_rate.get(), rate);
        prop_assert_eq!(got, &fps[..]);
        hostile::check_frame(&frame);
        hostile::check_frame(&mutate(frame, &flips));
        let hello = wire::encode_hello(&[5; 32], "edge-1");
        let (_, id) = wire::decode_hello(&hello[HEADER_LEN..]).expect("decodes");
        prop_assert_eq!(id, "edge-1");
        hostile::check_frame(&mutate(hello, &flips));
    }

    #[test]
    fn manifests_round_trip_and_never_panic(
        ns in proptest::collection::vec(0u32..64, 0..50),
        flips in proptest::collection::vec((any::<usize>(), 1u8..), 0..6),
        junk in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let m = manifest(&ns, 4096);
        let bytes = m.to_bytes();
        prop_assert_eq!(Manifest::from_bytes(&bytes).expect("parses"), m);
        hostile::check_manifest(&bytes);
        hostile::check_manifest(&mutate(bytes.clone(), &flips));
        hostile::check_manifest(&bytes[..bytes.len() / 2]);
        hostile::check_manifest(&junk);
    }

    #[test]
    fn deltas_rebuild_or_refuse(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
        hostile::check_delta(&data);
    }

    #[test]
    fn control_messages_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        hostile::check_control(&data);
    }

    #[test]
    fn control_json_round_trips(usage in any::<u64>(), ns in proptest::collection::vec(any::<u32>(), 0..20)) {
        let d = edgeshift_common::control::Delta {
            added: ns.iter().map(|&n| fp(n)).collect(),
            usage,
            ..Default::default()
        };
        let json = serde_json::to_vec(&d).expect("encodes");
        hostile::check_control(&json);
        let back: edgeshift_common::control::Delta = serde_json::from_slice(&json).expect("decodes");
        prop_assert_eq!(back, d);
    }
}
