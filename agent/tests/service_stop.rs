//! A clean stop during a fetch: SIGTERM to the serving agent while a peer
//! pulls from it through a slow link (a throttling proxy on loopback, so
//! the signal surely lands mid-transfer). The agent exits 0; the fetcher's
//! store reopens holding only whole, correctly hashed chunks (some, not
//! all); a fetch after the agent's restart completes it and the image
//! restores byte for byte. The same for SIGTERM to the fetch command.

mod transfer_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgeshift_agent::store::LocalStore;
use transfer_support::*;

const CHUNK: usize = 64 << 10;
const CHUNKS: usize = 480;

/// Forwards loopback connections to `to`, the answers at about `bytes_per_sec`.
fn slow_proxy(to: SocketAddr, bytes_per_sec: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
    let addr = l.local_addr().expect("proxy addr");
    std::thread::spawn(move || {
        for down in l.incoming().map_while(Result::ok) {
            let Ok(up) = TcpStream::connect(to) else { continue };
            let (Ok(mut down_w), Ok(mut up_r)) = (down.try_clone(), up.try_clone()) else {
                continue;
            };
            let (mut down_r, mut up_w) = (down, up);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut down_r, &mut up_w);
                let _ = up_w.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 16 << 10];
                let pause = Duration::from_secs_f64(buf.len() as f64 / bytes_per_sec as f64);
                while let Ok(n) = up_r.read(&mut buf) {
                    if n == 0 || down_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    std::thread::sleep(pause);
                }
                let _ = down_w.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}

fn sigterm(child: &Child) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on our own child, not yet reaped; no memory involved.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    panic!("no exit within {within:?} of SIGTERM");
}

/// Waits until the fetch has stored some chunks (it is mid-transfer).
fn wait_some_chunks(store: &std::path::Path) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = chunk_files(store);
        if n >= 20 {
            return n;
        }
        assert!(Instant::now() < deadline, "the fetch stored nothing in 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The store reopens (its crash recovery runs) and every chunk rehashes to its name.
fn assert_consistent(store: &std::path::Path, what: &str) -> usize {
    let s = LocalStore::open(store).unwrap_or_else(|e| panic!("{what}: the store reopens: {e}"));
    let corrupt = s.verify_all_chunks().expect("rehash");
    assert!(corrupt.is_empty(), "{what}: corrupt chunks {corrupt:?}");
    chunk_files(store)
}

#[test]
fn sigterm_during_a_fetch_leaves_the_stores_consistent_and_the_fetch_resumable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("image.raw");
    write_image(&image, CHUNKS, CHUNK, 7);
    let src = dir.path().join("src");
    let id = slice(&image, &src, "64KiB");
    let key = write_key(dir.path(), "key", 0x42);
    let total = chunk_files(&src);
    // About 3 s for the image through the proxy.
    let rate = CHUNKS * CHUNK / 3;

    // 1. The fetch command stopped mid-transfer.
    let mut agent = Agent::local(&src, &key, false, &dir.path().join("agent1.log"));
    let proxy = slow_proxy(agent.addr, rate);
    let dst = dir.path().join("dst");
    let mut fetching = fetch_cmd(Command::new(BIN), &id, &dst, &key, &[proxy])
        .arg("--no-zstd")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fetch");
    wait_some_chunks(&dst);
    sigterm(&fetching);
    let _ = wait_exit(&mut fetching, Duration::from_secs(10));
    let held = assert_consistent(&dst, "fetch stopped");
    assert!(
        held < total,
        "the stop landed mid-fetch ({held} of {total} chunks)"
    );

    // 2. The serving agent stopped mid-transfer: it exits 0.
    let mut fetching = fetch_cmd(Command::new(BIN), &id, &dst, &key, &[proxy])
        .arg("--no-zstd")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fetch");
    let before = chunk_files(&dst);
    let deadline = Instant::now() + Duration::from_secs(30);
    while chunk_files(&dst) < before + 20 {
        assert!(Instant::now() < deadline, "the second fetch stored nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
    sigterm(&agent.child);
    let status = wait_exit(&mut agent.child, Duration::from_secs(20));
    assert!(
        status.success(),
        "SIGTERM: the serving agent exits 0 ({status}): {}",
        agent.log()
    );
    assert!(
        agent.log().contains("stopping"),
        "the agent logged its stop: {}",
        agent.log()
    );
    let _ = wait_exit(&mut fetching, Duration::from_secs(30));
    let held = assert_consistent(&dst, "agent stopped");
    assert!(
        held < total,
        "the stop landed mid-fetch ({held} of {total} chunks)"
    );
    assert_consistent(&src, "the serving agent's store");

    // 3. After a restart the fetch completes and the image is whole.
    let agent = Agent::local(&src, &key, false, &dir.path().join("agent2.log"));
    let r = report(&fetch(&id, &dst, &key, &[agent.addr]));
    assert!(r["chunks_fetched"].as_u64().unwrap_or(0) > 0, "{r}");
    assert_restores(&id, &dst, &image);
}
