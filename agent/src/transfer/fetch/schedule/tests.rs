//! The scheduler's unit tests: no sockets, only its bookkeeping.

use super::*;

fn addrs(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16)))
        .collect()
}

fn wants(n: usize, len: u64) -> Vec<ChunkWant> {
    (0..n)
        .map(|i| ChunkWant {
            optional: false,
            fp: Fingerprint::of(&(i as u64).to_le_bytes()),
            len,
            sources: None,
            base: None,
        })
        .collect()
}

fn opts() -> FetchOptions {
    FetchOptions {
        min_window: 100,
        max_window: 1000,
        initial_window: 300,
        ..FetchOptions::default()
    }
}

fn p(i: usize) -> PeerIdx {
    PeerIdx::new(i)
}

fn c(i: usize) -> ChunkIdx {
    ChunkIdx::new(i)
}

fn cs(list: &[usize]) -> Vec<ChunkIdx> {
    list.iter().map(|&i| c(i)).collect()
}

fn state(s: &Sched, i: usize) -> ChunkState {
    s.chunk(c(i)).state
}

/// Peer `i` delivers chunk `j` whole and it is stored.
fn deliver(s: &mut Sched, i: usize, j: usize) {
    assert!(s.arrived(p(i), c(j)), "chunk {j} was asked of peer {i}");
    s.chunk_stored(p(i), c(j), s.chunk(c(j)).len, Encoding::Raw);
}

#[test]
fn chunks_that_may_come_as_deltas_are_charged_at_the_measured_share() {
    let mut w = wants(20, 100);
    for x in &mut w {
        x.base = Some(Fingerprint::of(b"earlier version"));
    }
    let mut s = Sched::new(&addrs(1), w, &opts());
    // Before any delta: half a chunk each, so the 300-byte initial
    // window asks for 6 where whole chunks would be 3.
    assert_eq!(s.take_batch(p(0), 32), cs(&[0, 1, 2, 3, 4, 5]));
    // A delta of 10 bytes of 100: the next are charged 10 each.
    assert!(s.arrived(p(0), c(0)));
    s.chunk_stored(p(0), c(0), 10, Encoding::Delta);
    assert_eq!(s.peer(p(0)).delta_chunks, 1);
    assert_eq!(s.peer(p(0)).delta_saved_bytes, 90);
    assert_eq!(s.expected_wire(p(0), c(6)), 10);
    // 5 still in flight at 50: 250 charged; 5 more fit under 300.
    assert_eq!(s.take_batch(p(0), 32).len(), 5);
    // A chunk without a base is charged whole.
    let plain = Sched::new(&addrs(1), wants(2, 100), &opts());
    assert_eq!(plain.expected_wire(p(0), c(0)), 100);
}

#[test]
fn compressed_chunks_are_charged_at_the_measured_share() {
    let mut s = Sched::new(&addrs(1), wants(20, 100), &opts());
    // Before any chunk: whole lengths, 3 under the 300-byte window.
    assert_eq!(s.take_batch(p(0), 32), cs(&[0, 1, 2]));
    // One came zstd'd to 25 bytes of 100: the rest are charged 25 each,
    // so the window (in wire bytes, like the goodput it is sized from)
    // holds 4x as many chunks; before the fix it stayed at 3.
    assert!(s.arrived(p(0), c(0)));
    s.chunk_stored(p(0), c(0), 25, Encoding::Zstd);
    assert_eq!(s.expected_wire(p(0), c(5)), 25);
    // 2 in flight at 100: 200 charged; 4 more of 25 fit under 300.
    assert_eq!(s.take_batch(p(0), 32).len(), 4);
    // A raw chunk counts at its full length: the share never exceeds 1.
    assert!(s.arrived(p(0), c(1)));
    s.chunk_stored(p(0), c(1), 100, Encoding::Raw);
    assert_eq!(s.expected_wire(p(0), c(10)), 62, "(25 + 100) / 200 of 100");
}

#[test]
fn windows_follow_measured_rates_and_work_is_shared_in_order() {
    let mut s = Sched::new(&addrs(2), wants(20, 100), &opts());
    // Unmeasured: the initial window (3 chunks of 100 bytes).
    assert_eq!(s.take_batch(p(0), 32), cs(&[0, 1, 2]));
    assert_eq!(s.take_batch(p(1), 32), cs(&[3, 4, 5]));
    // Full windows take nothing more.
    assert!(s.take_batch(p(0), 32).is_empty());
    // Peer 1 measured 10x faster: its window grows to the cap.
    s.peer_mut(p(1)).rate = 10_000.0;
    s.peer_mut(p(0)).rate = 1_000.0;
    assert_eq!(s.take_batch(p(1), 32).len(), 7);
    // Arrival frees window; storing completes the chunk.
    assert!(s.arrived(p(0), c(0)));
    assert!(!s.arrived(p(0), c(0)), "a chunk arrives once");
    s.chunk_stored(p(0), c(0), 100, Encoding::Raw);
    assert_eq!(state(&s, 0), ChunkState::Done);
    assert_eq!(s.remaining, 19);
    assert_eq!(s.peer(p(0)).chunks, 1);
}

#[test]
fn a_peer_takes_what_only_it_holds_before_shared_chunks() {
    let a = addrs(2);
    let mut w = wants(8, 100);
    // Chunks 5..8 are held by peer 0 alone (as a migration's source
    // alone holds what the guest wrote); 0..5 by both.
    for x in &mut w[5..] {
        x.sources = Some(vec![a[0]]);
    }
    let mut s = Sched::new(&a, w, &opts());
    assert_eq!(
        s.take_batch(p(0), 32),
        cs(&[5, 6, 7]),
        "peer 0 starts with its own"
    );
    assert_eq!(
        s.take_batch(p(1), 32),
        cs(&[0, 1, 2]),
        "peer 1 takes the shared ones in order"
    );
}

#[test]
fn optional_chunks_fill_the_tail_and_are_left_out_after_it() {
    let a = addrs(2);
    let mut w = wants(6, 100);
    // 0..3 required, 3..6 filler; chunk 0 only at peer 1.
    w[0].sources = Some(vec![a[1]]);
    for x in &mut w[3..] {
        x.optional = true;
    }
    let mut s = Sched::new(&a, w, &opts());
    // Peer 0 takes its required share, then fills with optional chunks
    // while peer 1 still has required work on its way.
    assert_eq!(s.take_batch(p(1), 1), cs(&[0]));
    assert_eq!(s.take_batch(p(0), 32), cs(&[1, 2, 3]));
    for j in [1, 2, 3] {
        deliver(&mut s, 0, j);
    }
    assert_eq!(
        s.take_batch(p(0), 32),
        cs(&[4, 5]),
        "filler while chunk 0 is on its way"
    );
    // Chunk 4 arrives; then chunk 0, the last required one: the filler
    // still in flight (5) completes, nothing more is asked for.
    deliver(&mut s, 0, 4);
    deliver(&mut s, 1, 0);
    assert!(!s.finished(), "5 is still on its way");
    deliver(&mut s, 0, 5);
    assert!(s.finished());

    // Required work done before the filler was asked for: left out.
    let mut w = wants(4, 100);
    for x in &mut w[2..] {
        x.optional = true;
    }
    let fillers = [w[2].fp, w[3].fp];
    let mut s = Sched::new(&addrs(1), w, &opts());
    assert_eq!(s.take_batch(p(0), 2), cs(&[0, 1]));
    for j in [0, 1] {
        deliver(&mut s, 0, j);
    }
    assert!(s.finished());
    assert_eq!(state(&s, 2), ChunkState::Unavailable);
    assert_eq!(state(&s, 3), ChunkState::Unavailable);
    let left = s.left_out();
    assert_eq!(left.skipped, fillers, "left-out fillers are skipped, not missing");
    assert!(left.missing.is_empty());
    // Only optional chunks: nothing to fill, all left out at once.
    let mut w = wants(2, 100);
    for x in &mut w {
        x.optional = true;
    }
    assert!(Sched::new(&addrs(1), w, &opts()).finished());
}

#[test]
fn a_dead_peer_returns_its_chunks_and_a_lacking_chunk_moves_on() {
    let mut s = Sched::new(&addrs(2), wants(6, 100), &opts());
    let a = s.take_batch(p(0), 32);
    assert_eq!(a, cs(&[0, 1, 2]));
    // Chunk 1 arrived and is being stored when peer 0 dies.
    assert!(s.arrived(p(0), c(1)));
    s.peer_dead(p(0), Some("killed".into()));
    for j in [0, 1, 2] {
        assert_eq!(state(&s, j), ChunkState::Queued, "chunk {j} requeued");
    }
    // Peer 1 gets them first, in the caller's order.
    let b = s.take_batch(p(1), 32);
    assert_eq!(b, cs(&[0, 1, 2]));
    // Peer 1 lacks chunk 0: nobody else is alive, so it is unavailable.
    s.chunk_lacking(p(1), c(0));
    assert_eq!(state(&s, 0), ChunkState::Unavailable);
    assert_eq!(s.remaining, 5);
    assert_eq!(s.peer(p(0)).dropped.as_deref(), Some("killed"));
}

#[test]
fn per_chunk_sources_restrict_and_idle_fast_peers_steal_the_tail() {
    let a = addrs(2);
    let mut w = wants(4, 100);
    w[0].sources = Some(vec![a[1]]);
    w[1].sources = Some(vec![a[1]]);
    w[3].sources = Some(vec!["10.0.0.1:1".parse().expect("addr")]);
    let mut s = Sched::new(&a, w, &opts());
    // Chunk 3's only source is not a peer: unavailable from the start.
    assert_eq!(state(&s, 3), ChunkState::Unavailable);
    assert_eq!(s.take_batch(p(0), 32), cs(&[2]));
    assert_eq!(s.take_batch(p(1), 32), cs(&[0, 1]));
    // Peer 0 is idle and much faster: it steals the chunk peer 1 would
    // deliver last, but never one it may not serve.
    s.peer_mut(p(0)).rate = 1e6;
    s.peer_mut(p(1)).rate = 10.0;
    deliver(&mut s, 0, 2);
    assert!(
        s.take_batch(p(0), 32).is_empty(),
        "0 and 1 are restricted to peer 1"
    );

    let mut s = Sched::new(&a, wants(4, 100), &opts());
    assert_eq!(s.take_batch(p(1), 32), cs(&[0, 1, 2]));
    assert_eq!(s.take_batch(p(0), 32), cs(&[3]));
    s.peer_mut(p(0)).rate = 1e6;
    s.peer_mut(p(1)).rate = 10.0;
    deliver(&mut s, 0, 3);
    assert_eq!(
        s.take_batch(p(0), 32),
        cs(&[2]),
        "steals the latest request at the slow peer"
    );
    // The stolen copy wins; the slow copy is a duplicate when it arrives.
    deliver(&mut s, 0, 2);
    deliver(&mut s, 1, 2);
    assert_eq!(s.peer(p(1)).duplicates, 1);
    assert_eq!(s.peer(p(1)).chunks, 0);
}

#[test]
fn a_peer_steals_only_when_clearly_sooner_and_never_a_chunk_twice() {
    let a = addrs(3);
    let mut s = Sched::new(&a, wants(4, 100), &opts());
    assert_eq!(s.take_batch(p(1), 32), cs(&[0, 1, 2]));
    assert_eq!(s.take_batch(p(0), 32), cs(&[3]));
    deliver(&mut s, 0, 3);
    // Peer 1 needs 1 s for its 300 bytes. At a third of its rate peer 0
    // would need 1 s for chunk 2 too: not clearly sooner (under 0.8x).
    s.peer_mut(p(0)).rate = 100.0;
    s.peer_mut(p(1)).rate = 300.0;
    assert!(
        s.take_batch(p(0), 32).is_empty(),
        "100/100 s is not under 0.8 x 300/300 s"
    );
    s.peer_mut(p(0)).rate = 300.0;
    assert_eq!(
        s.take_batch(p(0), 32),
        cs(&[2]),
        "100/300 s is under 0.8 x 300/300 s"
    );
    // Chunk 2 is now at two peers: a third idle peer steals chunk 1, the
    // latest one still at peer 1 alone, never a second copy of chunk 2.
    s.peer_mut(p(2)).rate = 1e6;
    assert_eq!(s.take_batch(p(2), 32), cs(&[1]));
    assert_eq!(state(&s, 1), ChunkState::InFlight);
    assert_eq!(s.chunk(c(1)).holders.len(), 2);
}

#[test]
fn a_dead_peer_loses_its_exclusive_chunks_and_they_are_reported_missing() {
    let a = addrs(2);
    let mut w = wants(4, 100);
    // Chunks 2 and 3 only at peer 0.
    w[2].sources = Some(vec![a[0]]);
    w[3].sources = Some(vec![a[0]]);
    let exclusive = [w[2].fp, w[3].fp];
    let mut s = Sched::new(&a, w, &opts());
    assert_eq!(s.take_batch(p(0), 1), cs(&[2]), "its own first");
    assert_eq!(s.take_batch(p(1), 32), cs(&[0, 1]));
    s.peer_dead(p(0), Some("connection closed".into()));
    // Chunk 2 (in flight) and chunk 3 (queued) have no other source.
    assert_eq!(state(&s, 2), ChunkState::Unavailable);
    assert_eq!(state(&s, 3), ChunkState::Unavailable);
    assert!(!s.peer(p(0)).alive);
    // A second report of the same death changes nothing.
    s.peer_dead(p(0), Some("again".into()));
    assert_eq!(s.peer(p(0)).dropped.as_deref(), Some("connection closed"));
    deliver(&mut s, 1, 0);
    deliver(&mut s, 1, 1);
    assert!(s.finished());
    let left = s.left_out();
    assert_eq!(left.missing, exclusive);
    assert!(left.skipped.is_empty());
}

#[test]
fn chunks_nobody_holds_are_reported_missing_after_every_peer_says_so() {
    let mut s = Sched::new(&addrs(2), wants(2, 100), &opts());
    // Peer 1 is too slow to steal from peer 0.
    s.peer_mut(p(0)).rate = 1e6;
    s.peer_mut(p(1)).rate = 10.0;
    assert_eq!(s.take_batch(p(0), 32), cs(&[0, 1]));
    assert!(s.take_batch(p(1), 32).is_empty(), "peer 0 took both");
    // Peer 0 lacks chunk 1: it goes to peer 1, which lacks it too.
    s.chunk_lacking(p(0), c(1));
    assert_eq!(state(&s, 1), ChunkState::Queued);
    assert_eq!(s.take_batch(p(1), 32), cs(&[1]));
    s.chunk_lacking(p(1), c(1));
    assert_eq!(state(&s, 1), ChunkState::Unavailable);
    // Nobody is asked again for a chunk it said it lacks.
    assert!(s.take_batch(p(0), 32).is_empty());
    deliver(&mut s, 0, 0);
    assert!(s.finished());
    let left = s.left_out();
    assert_eq!(left.missing, [s.chunk(c(1)).fp]);
    assert_eq!(s.peer(p(0)).lacking, 1);
    assert_eq!(s.peer(p(1)).lacking, 1);
    assert_eq!(s.stored_bytes(), 100);
}

#[test]
fn a_base_that_cannot_be_read_sends_the_chunk_back_whole() {
    let mut w = wants(1, 100);
    w[0].base = Some(Fingerprint::of(b"earlier version"));
    let mut s = Sched::new(&addrs(1), w, &opts());
    assert_eq!(s.take_batch(p(0), 32), cs(&[0]));
    assert!(s.arrived(p(0), c(0)));
    s.base_unusable(p(0), c(0), 30);
    assert_eq!(s.chunk(c(0)).base, None);
    assert_eq!(s.peer(p(0)).bytes, 30, "the delta's bytes still count");
    assert_eq!(s.take_batch(p(0), 32), cs(&[0]), "asked again");
    assert_eq!(s.expected_wire(p(0), c(0)), 100, "charged whole");
}

#[test]
fn the_holders_of_a_base_take_its_chunks_first_and_the_others_ask_them_whole() {
    // Chunks 0..4 have a base that peer 0 lacks and peer 1 holds; 4..8 none.
    let mut w = wants(8, 100);
    for x in &mut w[..4] {
        x.base = Some(Fingerprint::of(b"earlier version"));
    }
    let lacking: HashMap<Fingerprint, PeerSet> = w[..4].iter().map(|x| (x.fp, PeerSet::only(p(0)))).collect();
    let mut s = Sched::new(&addrs(2), w, &opts());
    s.note_bases_lacking(&lacking);
    // Peer 0 takes the chunks without a base first, peer 1 (which would
    // send deltas) the based ones: half charged, so 6 fit its window.
    assert_eq!(s.take_batch(p(0), 3), cs(&[4, 5, 6]));
    assert_eq!(s.take_batch(p(1), 32), cs(&[0, 1, 2, 3, 7]));
    assert_eq!(s.base_at(p(1), c(0)), s.chunk(c(0)).base);
    assert_eq!(s.base_at(p(0), c(0)), None, "asked whole where the base is not");
    assert_eq!(s.expected_wire(p(0), c(0)), 100);
    assert_eq!(s.expected_wire(p(1), c(0)), 50);
}
