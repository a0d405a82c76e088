//! One suite, run against both engines (`with_uring::*`, `with_sync::*`): what the
//! slicer, the restorer and the store count on, whichever engine runs.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};

use super::*;

/// io_uring may be refused here (seccomp, `io_uring_disabled`): then its
/// half of the suite says so and passes, as the fallback would run.
fn usable(engine: Engine) -> bool {
    if engine == Engine::Uring {
        if let Err(e) = super::uring::probe() {
            eprintln!("io_uring unavailable here ({e}): its half of the suite is skipped");
            return false;
        }
    }
    true
}

fn temp_file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> File {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("write");
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open")
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn writes_then_reads_at_offsets(engine: Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = temp_file(&dir, "f", &[]);
    let data = pattern(10 * 4096 + 123);
    let mut q = engine.queue::<Vec<u8>>(4).expect("queue");
    // Out of order, some from the middle of their buffer.
    for (tag, i) in [3usize, 0, 2, 1].into_iter().enumerate() {
        let start = i * 2600;
        let end = ((i + 1) * 2600).min(data.len());
        q.write(&f, data.clone(), start..end, start as u64, tag)
            .expect("write");
    }
    assert!(q.is_full());
    let mut tags = Vec::new();
    while q.in_flight() > 0 {
        let c = q.next_completion().expect("completion");
        assert_eq!(c.result.expect("written"), c.requested);
        tags.push(c.tag);
    }
    tags.sort();
    assert_eq!(tags, [0, 1, 2, 3]);
    let mut q = engine.queue::<AlignedBuf>(2).expect("queue");
    q.read(&f, AlignedBuf::new(2600), 100..2600, 100, 7)
        .expect("read");
    let c = q.next_completion().expect("completion");
    assert_eq!((c.tag, c.requested, c.result.expect("read")), (7, 2500, 2500));
    assert_eq!(&c.buf.as_slice()[100..2600], &data[100..2600]);
    assert_eq!(
        &c.buf.as_slice()[..100],
        &[0u8; 100][..],
        "bytes outside the range untouched"
    );
}

fn a_read_past_the_end_comes_back_short(engine: Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = pattern(5000);
    let f = temp_file(&dir, "f", &data);
    let mut q = engine.queue::<Vec<u8>>(2).expect("queue");
    q.read(&f, vec![0; 8192], 0..8192, 4096, 0).expect("read");
    let c = q.next_completion().expect("completion");
    assert_eq!(c.result.expect("read"), 5000 - 4096);
    assert_eq!(&c.buf[..904], &data[4096..]);
    q.read(&f, vec![0; 10], 0..10, 5000, 1).expect("read at end");
    assert_eq!(q.next_completion().expect("completion").result.expect("eof"), 0);
}

fn errors_come_back_with_their_buffer(engine: Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ro");
    std::fs::write(&path, b"read only").expect("write");
    let read_only = File::open(&path).expect("open");
    let write_only = OpenOptions::new().write(true).open(&path).expect("open");
    let full = OpenOptions::new().write(true).open("/dev/full").ok();
    let mut q = engine.queue::<Vec<u8>>(2).expect("queue");
    q.write(&read_only, vec![1; 4], 0..4, 0, 1).expect("queued");
    q.read(&write_only, vec![2; 4], 0..4, 0, 2).expect("queued");
    for _ in 0..2 {
        let c = q.next_completion().expect("completion");
        let err = c.result.expect_err("EBADF");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "tag {}", c.tag);
        assert_eq!(c.buf, vec![c.tag as u8; 4], "the buffer comes back as it went");
    }
    // A full device reports ENOSPC, as a full disk would.
    if let Some(full) = &full {
        q.write(full, vec![0; 4096], 0..4096, 0, 0).expect("queued");
        let err = q
            .next_completion()
            .expect("completion")
            .result
            .expect_err("ENOSPC");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    }
}

fn misuse_is_an_error_not_a_hang(engine: Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = temp_file(&dir, "f", &pattern(100));
    let mut q = engine.queue::<Vec<u8>>(1).expect("queue");
    assert!(q.next_completion().is_err(), "nothing in flight");
    let e = q
        .read(&f, vec![0; 4], 0..5, 0, 0)
        .expect_err("range past the buffer");
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(q.in_flight(), 0);
    q.read(&f, vec![0; 4], 0..4, 0, 0).expect("read");
    assert!(q.read(&f, vec![0; 4], 0..4, 0, 1).is_err(), "queue full");
    // Dropped with a read in flight: waits for it.
    drop(q);
}

fn large_batches_through_a_small_queue(engine: Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = temp_file(&dir, "f", &[]);
    let chunk = 512;
    let n = 2000;
    let mut q = engine.queue::<Vec<u8>>(64).expect("queue");
    for i in 0..n {
        if q.is_full() {
            let c = q.next_completion().expect("completion");
            assert_eq!(c.result.expect("write"), chunk);
        }
        q.write(&f, vec![(i % 251) as u8; chunk], 0..chunk, (i * chunk) as u64, i)
            .expect("write");
    }
    while q.in_flight() > 0 {
        assert_eq!(
            q.next_completion().expect("completion").result.expect("write"),
            chunk
        );
    }
    let back = std::fs::read(dir.path().join("f")).expect("read back");
    assert_eq!(back.len(), n * chunk);
    assert!(back
        .chunks(chunk)
        .enumerate()
        .all(|(i, c)| c.iter().all(|b| *b == (i % 251) as u8)));

    // More files than one sync ring holds, data and full syncs.
    let files: Vec<File> = (0..300)
        .map(|i| {
            let mut f = File::create(dir.path().join(format!("s{i}"))).expect("create");
            f.write_all(b"x").expect("write");
            f
        })
        .collect();
    let refs: Vec<&File> = files.iter().collect();
    engine.sync_files(&refs, true).expect("fdatasync all");
    engine.sync_files(&refs, false).expect("fsync all");
    engine.sync_files(&[], true).expect("nothing to sync");
}

fn a_failed_sync_is_reported_after_the_others(engine: Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = File::create(dir.path().join("good")).expect("create");
    // fsync on a socket fails with EINVAL.
    let (socket, _other_end) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    let socket = File::from(std::os::fd::OwnedFd::from(socket));
    let err = engine
        .sync_files(&[&good, &socket, &good], false)
        .expect_err("a socket cannot be synced");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
}

macro_rules! suite_for {
    ($name:ident, $engine:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn writes_then_reads_at_offsets() {
                if usable($engine) {
                    super::writes_then_reads_at_offsets($engine);
                }
            }

            #[test]
            fn a_read_past_the_end_comes_back_short() {
                if usable($engine) {
                    super::a_read_past_the_end_comes_back_short($engine);
                }
            }

            #[test]
            fn errors_come_back_with_their_buffer() {
                if usable($engine) {
                    super::errors_come_back_with_their_buffer($engine);
                }
            }

            #[test]
            fn misuse_is_an_error_not_a_hang() {
                if usable($engine) {
                    super::misuse_is_an_error_not_a_hang($engine);
                }
            }

            #[test]
            fn large_batches_through_a_small_queue() {
                if usable($engine) {
                    super::large_batches_through_a_small_queue($engine);
                }
            }

            #[test]
            fn a_failed_sync_is_reported_after_the_others() {
                if usable($engine) {
                    super::a_failed_sync_is_reported_after_the_others($engine);
                }
            }
        }
    };
}

suite_for!(with_uring, Engine::Uring);
suite_for!(with_sync, Engine::Sync);

#[test]
fn the_override_and_a_refused_ring_choose_the_fallback() {
    let refused = || Err(io::Error::from_raw_os_error(libc::ENOSYS));
    let works = || Ok(());
    assert_eq!(choose(Some("sync"), works), Engine::Sync);
    assert_eq!(choose(None, refused), Engine::Sync);
    assert_eq!(choose(None, works), Engine::Uring);
    assert_eq!(choose(Some("uring"), works), Engine::Uring);
    assert_eq!(Engine::current(), Engine::current(), "chosen once");
}

#[test]
fn a_mapping_shows_the_file_and_an_empty_one_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = pattern(3 * DIRECT_ALIGN + 100);
    let f = temp_file(&dir, "mapped", &bytes);
    let m = MappedFile::map(&f, bytes.len() as u64).expect("map");
    drop(f);
    assert_eq!(m.len(), bytes.len());
    assert_eq!(m.bytes(), &bytes[..], "the mapping outlives the file handle");
    // A prefix maps too; an empty length cannot be mapped.
    let f = temp_file(&dir, "again", &bytes);
    assert_eq!(MappedFile::map(&f, 10).expect("map").bytes(), &bytes[..10]);
    assert!(MappedFile::map(&f, 0).is_err());
}
