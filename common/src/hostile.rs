//! What every decoder of peer input must survive, as checks the fuzz
//! targets (`fuzz/`), the `proptest` cases and the regression tests of
//! crashes share: any bytes either decode or give an error (never a panic,
//! never an allocation past the announced limits), and what decodes
//! encodes back to the same value. Each `check_*` panics only when such a
//! property is broken, which is what a fuzzer reports.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::wire::{self, FrameHeader, FrameKind, HEADER_LEN, MAX_FRAME_LEN};
use crate::{delta, Fingerprint, Manifest};

/// A frame as a peer would send it: a header, then a body decoded by the
/// decoder of the header's kind.
pub fn check_frame(data: &[u8]) {
    let Some((head, body)) = data.split_first_chunk::<HEADER_LEN>() else {
        return;
    };
    if let Ok((header, kind)) = FrameHeader::decode(head, MAX_FRAME_LEN) {
        assert!(header.body_len() <= MAX_FRAME_LEN);
        check_body(kind, body);
    }
    // The body under every kind, whatever the header said: the decoders
    // must not rely on it (and the fuzzer reaches them without a valid one).
    for k in 0..=u8::MAX {
        if let Ok(kind) = FrameKind::try_from(k) {
            check_body(kind, body);
        }
    }
}

fn check_body(kind: FrameKind, body: &[u8]) {
    if let Ok((h, id)) = wire::decode_hello(body) {
        let again = wire::encode_hello(&h.client_nonce, &id);
        assert_eq!(wire::decode_hello(&again[HEADER_LEN..]).map(|(_, i)| i), Ok(id));
    }
    let _ = wire::decode_challenge(body);
    let _ = wire::decode_response(body);
    let _ = wire::decode_fingerprint(kind, body);
    if let Ok((head, fps)) = wire::decode_chunk_request(body) {
        assert!(fps.len() <= wire::MAX_BATCH);
        let again = wire::encode_chunk_request(0, false, head.path_rate.get(), fps);
        let (_, fps2) = wire::decode_chunk_request(&again[HEADER_LEN..]).expect("re-encoded request decodes");
        assert_eq!(fps, fps2);
    }
    if let Ok((_, asks)) = wire::decode_delta_request(body) {
        assert!(asks.len() <= wire::MAX_BATCH);
    }
    let _ = wire::decode_delta(body);
    if let Ok(fps) = wire::decode_has_request(body) {
        assert!(fps.len() <= wire::MAX_HAS);
    }
    let _ = wire::decode_has_reply(body, body.len().min(wire::MAX_HAS));
    let _ = wire::decode_chunk(body);
    let _ = wire::decode_error(body);
}

/// Manifest bytes from a peer or a store: parse, and round-trip what parses.
pub fn check_manifest(data: &[u8]) {
    if let Ok(m) = Manifest::from_bytes(data) {
        let bytes = m.to_bytes();
        let again = Manifest::from_bytes(&bytes).expect("a manifest's own bytes parse");
        assert_eq!(again, m);
        assert_eq!(again.to_bytes(), bytes);
        assert!(Manifest::from_bytes_checked(&bytes, &m.id()).is_ok());
    }
}

/// A delta against a base chunk: `data` is split into a base, a bitmap and a
/// payload; applying must fail cleanly or rebuild a chunk of the base's size.
/// Then the base and a changed copy round-trip through `encode`/`apply`.
pub fn check_delta(data: &[u8]) {
    let Some((&[a, b], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = usize::from(u16::from_le_bytes([a, b])) % (rest.len() + 1);
    let (base, rest) = rest.split_at(len);
    let bitmap_len = delta::bitmap_len(len).min(rest.len());
    let (bitmap, payload) = rest.split_at(bitmap_len);
    let mut rebuilt = base.to_vec();
    if delta::apply(&mut rebuilt, bitmap, payload).is_ok() {
        assert_eq!(rebuilt.len(), base.len());
    }
    // A new version of `base`: every byte of `payload` XORed over it in turn.
    let mut new = base.to_vec();
    for (i, x) in payload.iter().enumerate() {
        if let Some(byte) = new.get_mut(i * 7919 % len.max(1)) {
            *byte ^= x;
        }
    }
    if let Some((bitmap, payload)) = delta::encode(base, &new, usize::MAX) {
        let mut out = base.to_vec();
        delta::apply(&mut out, &bitmap, &payload).expect("an encoded delta applies");
        assert!(out == new, "the delta did not rebuild the new chunk");
    }
}

/// A postcard message: decode, and round-trip what decodes (compared as
/// bytes: a float field may hold NaN, which equals nothing).
pub fn check_postcard<T: Serialize + DeserializeOwned>(data: &[u8]) {
    if let Ok(v) = postcard::from_bytes::<T>(data) {
        let bytes = postcard::to_allocvec(&v).expect("a decoded value encodes");
        let again: T = postcard::from_bytes(&bytes).expect("its encoding decodes");
        let bytes_again = postcard::to_allocvec(&again).expect("encodes again");
        assert_eq!(bytes, bytes_again);
    }
}

/// A JSON message: decode, and round-trip what decodes.
pub fn check_json<T: Serialize + DeserializeOwned>(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<T>(data) {
        let bytes = serde_json::to_vec(&v).expect("a decoded value encodes");
        let again: T = serde_json::from_slice(&bytes).expect("its encoding decodes");
        let bytes_again = serde_json::to_vec(&again).expect("encodes again");
        assert_eq!(bytes, bytes_again);
    }
}

/// The coordinator's control messages (`control`: JSON over HTTPS), and the
/// same types as postcard.
pub fn check_control(data: &[u8]) {
    use crate::control::{Delta, Orders, Plan};
    check_json::<Plan>(data);
    check_json::<Orders>(data);
    check_json::<Delta>(data);
    check_postcard::<Plan>(data);
    check_postcard::<Orders>(data);
    check_postcard::<Delta>(data);
    check_postcard::<Vec<Fingerprint>>(data);
}
