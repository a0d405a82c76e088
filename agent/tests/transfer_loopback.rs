//! Transfer over real TCP on loopback: `edgeshift agent` processes serving,
//! `edgeshift fetch` (and the library fetcher) pulling, test peers that lie or
//! speak garbage written with the wire module.

mod transfer_support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgeshift_agent::store::{ChunkStore, LocalStore};
use edgeshift_agent::transfer::conn::read_frame;
use edgeshift_agent::transfer::fetch::{ChunkWant, FetchOptions, Fetcher};
use edgeshift_agent::transfer::trust::{secure_client, secure_server};
use edgeshift_agent::transfer::{TransferError, Trust};
use edgeshift_common::wire::{self, error_code, FrameHeader, FrameKind};
use edgeshift_common::{Fingerprint, ManifestId};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use transfer_support::*;

const CHUNK: usize = 64 << 10;

/// A source store holding one sliced test image.
struct Source {
    dir: tempfile::TempDir,
    image: std::path::PathBuf,
    store: std::path::PathBuf,
    key: std::path::PathBuf,
    id: String,
}

fn source(chunks: usize, seed: u64) -> Source {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("image.raw");
    write_image(&image, chunks, CHUNK, seed);
    let store = dir.path().join("src");
    let id = slice(&image, &store, "64KiB");
    let key = write_key(dir.path(), "key", 0x42);
    Source {
        dir,
        image,
        store,
        key,
        id,
    }
}

fn peers_json(r: &serde_json::Value) -> Vec<serde_json::Value> {
    r["peers"].as_array().expect("peers array").clone()
}

#[test]
fn fetch_from_one_two_and_three_peers_is_byte_exact() {
    let src = source(300, 1);
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            Agent::local(
                &src.store,
                &src.key,
                false,
                &src.dir.path().join(format!("agent{i}.log")),
            )
        })
        .collect();
    let addrs: Vec<SocketAddr> = agents.iter().map(|a| a.addr).collect();
    // The image has holes and repeated chunks: neither is fetched twice.
    let m = LocalStore::open(&src.store)
        .expect("src")
        .get_manifest(&src.id.parse().expect("id"))
        .expect("manifest");
    assert!(m.zero_chunks() > 0);
    assert!(
        m.unique_chunks().len() < m.chunks.len() - m.zero_chunks(),
        "the image repeats chunks"
    );
    assert_eq!(m.unique_chunks().len(), chunk_files(&src.store));
    for k in 1..=3 {
        let dst = src.dir.path().join(format!("dst{k}"));
        let out = fetch(&src.id, &dst, &src.key, &addrs[..k]);
        let r = report(&out);
        let unique = chunk_files(&src.store);
        assert_eq!(r["chunks_fetched"].as_u64(), Some(unique as u64), "k={k}");
        assert!(r["bytes_received"].as_u64().unwrap_or(0) > 0);
        assert!(r["seconds"].as_f64().unwrap_or(-1.0) >= 0.0);
        let peers = peers_json(&r);
        assert_eq!(peers.len(), k);
        let per_peer: u64 = peers.iter().map(|p| p["chunks"].as_u64().unwrap_or(0)).sum();
        assert_eq!(
            per_peer, unique as u64,
            "every chunk is credited to exactly one peer"
        );
        for p in &peers {
            assert!(p["dropped"].is_null(), "no peer dropped: {p}");
            assert!(p["mbit_per_s"].is_number());
        }
        assert_restores(&src.id, &dst, &src.image);
        // A second run has nothing left to fetch.
        let again = report(&fetch(&src.id, &dst, &src.key, &addrs[..k]));
        assert_eq!(again["chunks_fetched"].as_u64(), Some(0));
    }
}

#[test]
fn peers_holding_different_subsets_together_supply_the_image() {
    let src = source(200, 2);
    let a_store = src.dir.path().join("a");
    let b_store = src.dir.path().join("b");
    // a: even chunks plus the manifest; b: odd chunks plus every 5th (overlap), no manifest.
    partial_copy(&src.store, &a_store, |i| i % 2 == 0, true);
    partial_copy(&src.store, &b_store, |i| i % 2 == 1 || i % 5 == 0, false);
    let a = Agent::local(&a_store, &src.key, false, &src.dir.path().join("a.log"));
    let b = Agent::local(&b_store, &src.key, false, &src.dir.path().join("b.log"));
    // b first: it lacks the manifest, so the fetcher must fall back to a.
    let dst = src.dir.path().join("dst");
    let r = report(&fetch(&src.id, &dst, &src.key, &[b.addr, a.addr]));
    let peers = peers_json(&r);
    assert!(
        peers.iter().all(|p| p["chunks"].as_u64().unwrap_or(0) > 0),
        "both peers contributed: {r}"
    );
    // The fetcher asked both what they hold first: neither was asked for
    // a chunk it lacks.
    assert!(
        peers.iter().all(|p| p["lacking_chunks"].as_u64() == Some(0)),
        "no peer answered Missing: {r}"
    );
    assert_restores(&src.id, &dst, &src.image);

    // With only a, the odd chunks exist nowhere: a clear error naming the count.
    let dst2 = src.dir.path().join("dst2");
    let out = fetch(&src.id, &dst2, &src.key, &[a.addr]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let odd = chunk_files(&src.store) / 2;
    assert!(
        err.contains(&format!("{odd} chunk(s) could not be fetched")),
        "error names the missing count {odd}: {err}"
    );
    // What a had is stored; a rerun with both peers fetches only the rest.
    let have = chunk_files(&dst2);
    assert!(have > 0);
    let r = report(&fetch(&src.id, &dst2, &src.key, &[a.addr, b.addr]));
    assert_eq!(
        r["chunks_fetched"].as_u64(),
        Some((chunk_files(&src.store) - have) as u64)
    );
    assert_restores(&src.id, &dst2, &src.image);
}

#[test]
fn wrong_cluster_key_is_refused_on_both_sides() {
    let src = source(40, 3);
    let agent = Agent::local(&src.store, &src.key, true, &src.dir.path().join("agent.log"));
    let wrong = write_key(src.dir.path(), "wrong", 0x43);
    let dst = src.dir.path().join("dst");
    let out = fetch(&src.id, &dst, &wrong, &[agent.addr]);
    assert!(!out.status.success(), "a fetch with the wrong key must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("authentication"), "stderr explains: {err}");
    assert_eq!(chunk_files(&dst), 0, "nothing flowed");
    assert!(!dst.join("manifests").join(&src.id).exists());
    let m = agent.metrics_text();
    assert!(
        metric(&m, "edgeshift_auth_failures_total", "server") >= 1.0,
        "metrics:\n{m}"
    );
    assert!(
        agent.log().contains("failed authentication"),
        "agent logs the failure"
    );
    // The agent keeps serving peers with the right key.
    let r = report(&fetch(&src.id, &dst, &src.key, &[agent.addr]));
    assert!(r["chunks_fetched"].as_u64().unwrap_or(0) > 0);
    let m = agent.metrics_text();
    assert!(metric(&m, "edgeshift_served_chunks_total", "") >= r["chunks_fetched"].as_f64().unwrap_or(1.0));
    assert!(metric(&m, "edgeshift_served_bytes_total", "") > 0.0);
}

#[test]
fn bad_key_files_are_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let short = dir.path().join("short");
    std::fs::write(&short, "abcd\n").expect("write");
    let out = std::process::Command::new(BIN)
        .args(["agent", "--listen", "127.0.0.1:0", "--store"])
        .arg(dir.path().join("s"))
        .arg("--insecure-plaintext")
        .arg("--cluster-key-file")
        .arg(&short)
        .output()
        .expect("run agent");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("64 hex digits"));
    let missing = dir.path().join("nope");
    let out = std::process::Command::new(BIN)
        .args(["fetch", &"ab".repeat(32), "--peer", "127.0.0.1:1", "--store"])
        .arg(dir.path().join("d"))
        .arg("--insecure-plaintext")
        .arg("--cluster-key-file")
        .arg(&missing)
        .output()
        .expect("run fetch");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cluster key file"));
}

/// Without --insecure-plaintext and without its certificate the agent does
/// not start: the error names the file and the command that makes it.
#[test]
fn missing_credentials_stop_the_agent_and_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = write_key(dir.path(), "cluster", 1);
    let out = std::process::Command::new(BIN)
        .args(["agent", "--listen", "127.0.0.1:0", "--store"])
        .arg(dir.path().join("s"))
        .arg("--tls-ca")
        .arg(cluster.join("ca.pem"))
        .arg("--tls-cert")
        .arg(dir.path().join("absent.pem"))
        .arg("--tls-key")
        .arg(cluster.join("edge.key"))
        .output()
        .expect("run agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("absent.pem") && err.contains("edgeshift cluster"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
}

/// How a test peer misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Lie {
    /// Authenticates, then never answers a chunk request (a stalled path).
    Stall,
    /// Flips a byte of the first chunk it is asked for; honest otherwise.
    FirstChunkBytes,
    /// Answers manifest requests with bytes that do not hash to the id.
    Manifest,
    /// Answers delta requests with deltas whose first block is wrong.
    DeltaBytes,
}

/// A peer that speaks the protocol (real TCP, real handshake) but lies.
fn spawn_liar(store: &Path, key: Trust, lie: Lie) -> SocketAddr {
    spawn_liar_telling(store, key, lie).0
}

/// [`spawn_liar`], with a flag that turns true once the liar has been asked
/// for chunks or deltas.
fn spawn_liar_telling(store: &Path, key: Trust, lie: Lie) -> (SocketAddr, Arc<AtomicBool>) {
    let asked = Arc::new(AtomicBool::new(false));
    let flag = asked.clone();
    let store = Arc::new(LocalStore::open(store).expect("liar store"));
    let addr = serve_each_connection(move |sock| {
        let (store, key, asked) = (store.clone(), key.clone(), flag.clone());
        async move {
            let _ = liar_session(sock, &store, &key, lie, &asked).await;
        }
    });
    (addr, asked)
}

/// A TCP relay to `upstream` that holds every connection until `open` is
/// true: the peer behind it cannot serve anything before then, however the
/// scheduler and the machine's load order the connections.
fn behind_gate(upstream: SocketAddr, open: Arc<AtomicBool>) -> SocketAddr {
    serve_each_connection(move |mut client| {
        let open = open.clone();
        async move {
            while !open.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            if let Ok(mut server) = TcpStream::connect(upstream).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        }
    })
}

/// Listens on a loopback port and runs `session` for every connection, on a
/// thread with a runtime of its own (a test's runtime cannot starve it).
fn serve_each_connection<F, S>(session: F) -> SocketAddr
where
    F: Fn(TcpStream) -> S + Send + 'static,
    S: std::future::Future<Output = ()> + Send + 'static,
{
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = std_listener.local_addr().expect("local addr");
    std_listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("server runtime");
        rt.block_on(async move {
            let listener = TcpListener::from_std(std_listener).expect("tokio listener");
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(session(sock));
            }
        });
    });
    addr
}

async fn liar_session(
    sock: TcpStream,
    store: &LocalStore,
    key: &Trust,
    lie: Lie,
    asked: &AtomicBool,
) -> Result<(), TransferError> {
    let peer = sock.peer_addr()?;
    let (mut sock, _) = secure_server(key, sock, peer).await?;
    let mut lied = false;
    loop {
        let f = read_frame(&mut sock, wire::MAX_FRAME_LEN, None).await?;
        let rid = f.header.request_id();
        if matches!(f.kind, FrameKind::ChunkRequest | FrameKind::DeltaRequest) {
            asked.store(true, Ordering::Release);
        }
        match f.kind {
            FrameKind::ManifestRequest => {
                let id = wire::decode_fingerprint(f.kind, &f.body)?;
                if lie == Lie::Manifest {
                    let mut bytes = store.get_manifest(&id)?.to_bytes();
                    let last = bytes.len() - 1;
                    bytes[last] ^= 1;
                    sock.write_all(&wire::encode(FrameKind::Manifest, 0, rid, &[&bytes]))
                        .await?;
                } else {
                    sock.write_all(&wire::encode(FrameKind::Missing, 0, rid, &[id.as_bytes()]))
                        .await?;
                }
            }
            FrameKind::ChunkRequest if lie == Lie::Stall => {
                // Keep the connection open and say nothing.
            }
            FrameKind::ChunkRequest => {
                let (_, fps) = wire::decode_chunk_request(&f.body)?;
                for fp in fps {
                    let mut bytes = store.get_chunk(fp)?;
                    if lie == Lie::FirstChunkBytes && !lied {
                        bytes[0] ^= 0xff;
                        lied = true;
                    }
                    let n = bytes.len() as u32;
                    sock.write_all(&wire::encode_chunk_prefix(rid, fp, n, n, false))
                        .await?;
                    sock.write_all(&bytes).await?;
                }
            }
            FrameKind::DeltaRequest => {
                let (_, asks) = wire::decode_delta_request(&f.body)?;
                for ask in asks {
                    let new = store.get_chunk(&ask.want)?;
                    let base = store.get_chunk(&ask.base)?;
                    let (bitmap, mut payload) =
                        edgeshift_common::delta::encode(&base, &new, usize::MAX).expect("same length");
                    if lie == Lie::DeltaBytes {
                        payload[0] ^= 0xff;
                    }
                    let frame =
                        wire::encode_delta(rid, &ask.want, &ask.base, new.len() as u32, &bitmap, &payload);
                    sock.write_all(&frame).await?;
                }
            }
            _ => return Ok(()),
        }
    }
}

/// Versions of `n` chunks of `CHUNK` bytes: the earlier ones (`bases`) and
/// later ones with one 4 KiB block of each rewritten, all put in `store`.
fn two_versions(store: &LocalStore, n: usize) -> (Vec<Fingerprint>, Vec<(Fingerprint, Vec<u8>)>) {
    let mut bases = Vec::new();
    let mut later = Vec::new();
    for i in 0..n {
        let old: Vec<u8> = (0..CHUNK)
            .map(|j| (j as u8) ^ (i as u8).wrapping_mul(13))
            .collect();
        let mut new = old.clone();
        let block = (i % (CHUNK / 4096)) * 4096;
        new[block..block + 4096].fill(0xa5 ^ i as u8);
        let (fo, fnew) = (Fingerprint::of(&old), Fingerprint::of(&new));
        store.put_chunk(&fo, &old).expect("put base");
        store.put_chunk(&fnew, &new).expect("put later");
        bases.push(fo);
        later.push((fnew, new));
    }
    (bases, later)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_written_again_travel_as_deltas_and_bad_deltas_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src_path = dir.path().join("src");
    let src = LocalStore::open_or_create(&src_path).expect("src store");
    let (bases, later) = two_versions(&src, 24);
    drop(src);
    let key_path = write_key(dir.path(), "key", 0x42);
    let key = trust_of(&key_path);
    let agent = Agent::local(&src_path, &key_path, false, &dir.path().join("agent.log"));
    let wants = |with_base: &dyn Fn(usize) -> Option<Fingerprint>| -> Vec<ChunkWant> {
        later
            .iter()
            .enumerate()
            .map(|(i, (fp, _))| ChunkWant {
                fp: *fp,
                len: CHUNK as u64,
                sources: None,
                optional: false,
                base: with_base(i),
            })
            .collect()
    };
    // Raw deltas, so the bytes on the wire are exactly the changed blocks
    // (compressed deltas: the test after this one).
    let opts = || FetchOptions {
        zstd: false,
        ..FetchOptions::default()
    };
    // The destination holds the earlier versions.
    let dst_with_bases = |name: &str| {
        let store = Arc::new(LocalStore::open_or_create(dir.path().join(name)).expect("dst store"));
        let src = LocalStore::open(&src_path).expect("src");
        for b in &bases {
            store.put_chunk(b, &src.get_chunk(b).expect("base")).expect("put");
        }
        store
    };

    // An honest agent: every chunk comes as one block and its bitmap.
    let dst = dst_with_bases("dst");
    let f = Fetcher::with_options(dst.clone(), vec![agent.addr], key.clone(), opts());
    let r = f.fetch_chunks(wants(&|i| Some(bases[i]))).await.expect("fetch");
    assert_eq!((r.chunks_fetched, r.peers[0].delta_chunks), (24, 24), "{r:?}");
    let bitmap = CHUNK.div_ceil(4096).div_ceil(8);
    assert_eq!(
        r.bytes_received,
        24 * (4096 + bitmap) as u64,
        "only the changed blocks travel"
    );
    assert_eq!(r.peers[0].delta_saved_bytes, 24 * (CHUNK - 4096 - bitmap) as u64);
    for (fp, bytes) in &later {
        assert_eq!(&dst.get_chunk(fp).expect("stored"), bytes);
    }

    // A base this store does not hold (never had, or evicted) while the
    // server has it: the delta cannot be applied, the chunk is asked for whole.
    let bare = Arc::new(LocalStore::open_or_create(dir.path().join("bare")).expect("bare store"));
    let f = Fetcher::with_options(bare.clone(), vec![agent.addr], key.clone(), opts());
    let r = f
        .fetch_chunks(wants(&|i| Some(bases[i])))
        .await
        .expect("fetch whole");
    assert_eq!((r.chunks_fetched, r.peers[0].delta_chunks), (24, 0), "{r:?}");
    assert!(r.peers[0].dropped.is_none(), "the peer did nothing wrong: {r:?}");
    for (fp, bytes) in &later {
        assert_eq!(&bare.get_chunk(fp).expect("stored"), bytes);
    }

    // A base the server lacks, and no base: whole chunks.
    let dst2 = dst_with_bases("dst2");
    let f = Fetcher::with_options(dst2.clone(), vec![agent.addr], key.clone(), opts());
    let unknown = Fingerprint::of(b"a version nobody holds");
    let r = f
        .fetch_chunks(wants(&|i| if i % 2 == 0 { Some(unknown) } else { None }))
        .await
        .expect("fetch");
    assert_eq!((r.chunks_fetched, r.peers[0].delta_chunks), (24, 0));
    assert_eq!(r.bytes_received, 24 * CHUNK as u64);

    // A peer whose deltas rebuild the wrong bytes is dropped; the honest
    // agent carries its chunks, and no wrong chunk is stored. The honest
    // agent is reached through a gate that opens once the liar has been
    // asked, so it cannot take every chunk first (as it did on a loaded
    // machine, where the in-process liar was slow to answer its connection).
    let (liar, liar_asked) = spawn_liar_telling(&src_path, key.clone(), Lie::DeltaBytes);
    let honest = behind_gate(agent.addr, liar_asked);
    let dst3 = dst_with_bases("dst3");
    let f = Fetcher::with_options(dst3.clone(), vec![liar, honest], key.clone(), opts());
    let r = f.fetch_chunks(wants(&|i| Some(bases[i]))).await.expect("fetch");
    let lr = r.peers.iter().find(|p| p.addr == liar.to_string()).expect("liar");
    assert!(
        lr.dropped.as_deref().unwrap_or("").contains("wrong bytes"),
        "liar dropped for its lie: {lr:?}"
    );
    assert_eq!(r.chunks_fetched, 24);
    for (fp, bytes) in &later {
        assert_eq!(&dst3.get_chunk(fp).expect("stored"), bytes);
    }
    // The liar alone: the fetch fails and nothing it rebuilt is stored.
    let dst4 = dst_with_bases("dst4");
    let f = Fetcher::with_options(dst4.clone(), vec![liar], key, opts());
    assert!(f.fetch_chunks(wants(&|i| Some(bases[i]))).await.is_err());
    for (fp, _) in &later {
        assert!(!dst4.has_chunk(fp).expect("has"), "no chunk from the liar");
    }
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_goes_compressed_on_a_slow_path_and_as_it_is_when_compression_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src_path = dir.path().join("src");
    let src = LocalStore::open_or_create(&src_path).expect("src store");
    let (bases, later) = two_versions(&src, 1);
    drop(src);
    let key_path = write_key(dir.path(), "key", 0x42);
    let agent = Agent::local(&src_path, &key_path, false, &dir.path().join("agent.log"));
    let (mut sock, _) = connect_authed(&trust_of(&key_path), agent.addr).await;
    let ask = [wire::BasedAsk {
        want: later[0].0,
        base: bases[0],
    }];
    let base = LocalStore::open(&src_path)
        .expect("src")
        .get_chunk(&bases[0])
        .expect("base");
    // 1 MB/s, compression allowed; then the same with compression refused.
    for (rid, zstd_ok) in [(1, true), (2, false)] {
        sock.write_all(&wire::encode_delta_request(rid, zstd_ok, 1_000_000, &ask))
            .await
            .expect("ask");
        sock.flush().await.expect("flush");
        let f = read_frame(&mut sock, wire::MAX_FRAME_LEN, None)
            .await
            .expect("answer");
        assert_eq!(f.kind, FrameKind::Delta);
        let (head, tail) = wire::decode_delta_head(&f.body).expect("head");
        let compressed = f.header.flags() & wire::FLAG_ZSTD != 0;
        assert_eq!(compressed, zstd_ok, "compressed only where allowed");
        let body = if compressed {
            assert!(
                tail.len() < 1024,
                "a block of one byte value compresses: {}",
                tail.len()
            );
            zstd::bulk::decompress(tail, wire::delta_body_bound(head.raw_len.get())).expect("zstd")
        } else {
            tail.to_vec()
        };
        let (bitmap, payload) = wire::split_delta(head.raw_len.get(), &body).expect("split");
        assert_eq!(payload.len(), 4096, "one block changed");
        let mut rebuilt = base.clone();
        edgeshift_common::delta::apply(&mut rebuilt, bitmap, payload).expect("apply");
        assert_eq!(rebuilt, later[0].1);
    }
}

#[test]
fn a_peer_sending_wrong_bytes_is_dropped_and_its_chunks_reassigned() {
    let src = source(200, 4);
    let key = trust_of(&src.key);
    let liar = spawn_liar(&src.store, key.clone(), Lie::FirstChunkBytes);
    let honest = Agent::local(&src.store, &src.key, false, &src.dir.path().join("agent.log"));
    let dst = src.dir.path().join("dst");
    let r = report(&fetch(&src.id, &dst, &src.key, &[liar, honest.addr]));
    let peers = peers_json(&r);
    let liar_report = peers
        .iter()
        .find(|p| p["addr"] == liar.to_string())
        .expect("liar in report");
    let reason = liar_report["dropped"].as_str().unwrap_or("");
    assert!(
        reason.contains("wrong bytes"),
        "liar dropped for its lie: {liar_report}"
    );
    assert_eq!(r["chunks_fetched"].as_u64(), Some(chunk_files(&src.store) as u64));
    assert_restores(&src.id, &dst, &src.image);

    // The liar alone: the fetch fails and the lied-about bytes never enter the store.
    let dst3 = src.dir.path().join("dst3");
    std::fs::create_dir_all(&dst3).expect("mkdir");
    let s3 = LocalStore::open_or_create(&dst3).expect("store");
    let m = LocalStore::open(&src.store)
        .expect("src")
        .get_manifest(&src.id.parse().expect("id"))
        .expect("manifest");
    s3.put_manifest(&m).expect("manifest");
    drop(s3);
    let out = fetch(&src.id, &dst3, &src.key, &[liar]);
    assert!(
        !out.status.success(),
        "a fetch from the liar alone cannot complete"
    );
    let s3 = LocalStore::open(&dst3).expect("store");
    for fp in s3.list_chunks().expect("list") {
        assert!(s3.get_chunk(&fp).is_ok(), "every stored chunk verifies");
    }
}

#[test]
fn a_manifest_that_does_not_hash_to_its_id_is_refused() {
    let src = source(30, 5);
    let key = trust_of(&src.key);
    let liar = spawn_liar(&src.store, key, Lie::Manifest);
    let dst = src.dir.path().join("dst");
    let out = fetch(&src.id, &dst, &src.key, &[liar]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hash"), "error explains the id mismatch: {err}");
    // With an honest peer after the liar, the fetch succeeds.
    let honest = Agent::local(&src.store, &src.key, false, &src.dir.path().join("agent.log"));
    report(&fetch(&src.id, &dst, &src.key, &[liar, honest.addr]));
    assert_restores(&src.id, &dst, &src.image);
}

/// Reads frames until an error frame or the end of the stream; returns the
/// error code seen (if any) and whether the server closed the connection.
/// A fresh connection to `addr`, authenticated as `key`.
async fn connect_authed(key: &Trust, addr: SocketAddr) -> (edgeshift_agent::transfer::PeerStream, String) {
    secure_client(key, TcpStream::connect(addr).await.expect("connect"), addr)
        .await
        .expect("auth")
}

async fn error_then_close<S: tokio::io::AsyncRead + Unpin>(sock: &mut S) -> (Option<u32>, bool) {
    let mut code = None;
    loop {
        match tokio::time::timeout(
            Duration::from_secs(5),
            read_frame(sock, wire::MAX_FRAME_LEN, None),
        )
        .await
        {
            Ok(Ok(f)) if f.kind == FrameKind::Error => code = Some(wire::decode_error(&f.body).0),
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return (code, true),
            Err(_) => return (code, false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_frames_drop_the_connection() {
    let src = source(20, 6);
    let agent = Agent::local(&src.store, &src.key, true, &src.dir.path().join("agent.log"));
    let key = trust_of(&src.key);

    // Garbage before authentication.
    let mut s = TcpStream::connect(agent.addr).await.expect("connect");
    s.write_all(&[0x55; 64]).await.expect("write");
    let (_, closed) = error_then_close(&mut s).await;
    assert!(closed, "garbage closes the connection");

    // An oversized hello (the insecure handshake's first frame) is not a
    // TLS ClientHello: refused at once.
    let mut s = TcpStream::connect(agent.addr).await.expect("connect");
    let hdr = FrameHeader::new(FrameKind::Hello, 0, 0, 512 << 20);
    s.write_all(zerocopy::IntoBytes::as_bytes(&hdr))
        .await
        .expect("write");
    let (_, closed) = error_then_close(&mut s).await;
    assert!(closed);

    // Authenticated, then a frame longer than the limit.
    let (mut s, _) = connect_authed(&key, agent.addr).await;
    let hdr = FrameHeader::new(FrameKind::ChunkRequest, 0, 1, wire::MAX_FRAME_LEN + 1);
    s.write_all(zerocopy::IntoBytes::as_bytes(&hdr))
        .await
        .expect("write");
    let (code, closed) = error_then_close(&mut s).await;
    assert_eq!(code, Some(error_code::TOO_LONG));
    assert!(closed);

    // Authenticated, then a chunk request that is not a whole number of fingerprints.
    let (mut s, _) = connect_authed(&key, agent.addr).await;
    s.write_all(&wire::encode(FrameKind::ChunkRequest, 0, 2, &[&[0u8; 8 + 33]]))
        .await
        .expect("write");
    let (code, closed) = error_then_close(&mut s).await;
    assert_eq!(code, Some(error_code::MALFORMED));
    assert!(closed);

    // A request kind announcing more than it can hold (here a chunk
    // request of 3 MiB, beyond 4096 fingerprints): refused from its header
    // at once (issue 21, finding 6: any kind could announce 64 MiB).
    let (mut s, _) = connect_authed(&key, agent.addr).await;
    let hdr = FrameHeader::new(FrameKind::ChunkRequest, 0, 9, 3 << 20);
    s.write_all(zerocopy::IntoBytes::as_bytes(&hdr))
        .await
        .expect("write");
    let (code, closed) = error_then_close(&mut s).await;
    assert_eq!(code, Some(error_code::TOO_LONG));
    assert!(closed);

    // A frame type only servers send.
    let (mut s, _) = connect_authed(&key, agent.addr).await;
    s.write_all(&wire::encode(FrameKind::AuthOk, 0, 3, &[]))
        .await
        .expect("write");
    let (code, closed) = error_then_close(&mut s).await;
    assert_eq!(code, Some(error_code::MALFORMED));
    assert!(closed);

    // A request for a chunk it does not hold: a Missing frame, connection kept.
    let (mut s, _) = connect_authed(&key, agent.addr).await;
    let absent = Fingerprint::of(b"not in any store");
    s.write_all(&wire::encode_chunk_request(4, false, 0, &[absent]))
        .await
        .expect("write");
    let f = read_frame(&mut s, wire::MAX_FRAME_LEN, None)
        .await
        .expect("answer");
    assert_eq!(f.kind, FrameKind::Missing);
    assert_eq!(f.header.request_id(), 4);
    assert_eq!(wire::decode_fingerprint(f.kind, &f.body).expect("fp"), absent);

    let m = tokio::task::spawn_blocking(move || {
        let text = agent.metrics_text();
        drop(agent);
        text
    })
    .await
    .expect("join");
    assert!(
        metric(&m, "edgeshift_malformed_frames_total", "edge") >= 4.0,
        "metrics:\n{m}"
    );
    assert!(
        metric(&m, "edgeshift_auth_failures_total", "") >= 2.0,
        "metrics:\n{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_fetcher_respects_per_chunk_sources_and_priority() {
    let src = source(120, 7);
    let a = Agent::local(&src.store, &src.key, false, &src.dir.path().join("a.log"));
    let b = Agent::local(&src.store, &src.key, false, &src.dir.path().join("b.log"));
    let key = trust_of(&src.key);
    let dst = src.dir.path().join("dst");
    let store = Arc::new(LocalStore::open_or_create(&dst).expect("dst store"));
    let opts = FetchOptions::default();
    let fetcher = Fetcher::with_options(store.clone(), vec![a.addr, b.addr], key, opts);
    let id: ManifestId = src.id.parse().expect("id");
    let manifest = fetcher.fetch_manifest(&id).await.expect("manifest");
    let mut wants = fetcher.missing_chunks(&manifest).expect("missing");
    assert!(!wants.is_empty());
    // Coldest-first order is the caller's; here: reversed, and the first
    // half may only come from a, the second half only from b.
    wants.reverse();
    let half = wants.len() / 2;
    for (i, w) in wants.iter_mut().enumerate() {
        w.sources = Some(vec![if i < half { a.addr } else { b.addr }]);
    }
    let n = wants.len() as u64;
    let report = fetcher.fetch_chunks(wants.clone()).await.expect("fetch");
    assert_eq!(report.chunks_fetched, n);
    let pa = report
        .peers
        .iter()
        .find(|p| p.addr == a.addr.to_string())
        .expect("a");
    let pb = report
        .peers
        .iter()
        .find(|p| p.addr == b.addr.to_string())
        .expect("b");
    assert_eq!(pa.chunks, half as u64);
    assert_eq!(pb.chunks, n - half as u64);
    for w in &wants {
        assert!(store.has_chunk(&w.fp).expect("has"));
    }

    // A chunk whose only allowed source is not among the peers is unavailable.
    let ghost = ChunkWant {
        optional: false,
        base: None,
        fp: Fingerprint::of(b"ghost"),
        len: 5,
        sources: Some(vec!["127.0.0.1:9".parse().expect("addr")]),
    };
    match fetcher.fetch_chunks(vec![ghost]).await {
        Err(TransferError::ChunksUnavailable { missing: 1, .. }) => {}
        other => panic!("expected ChunksUnavailable, got {other:?}"),
    }
    drop((a, b));
}

#[test]
fn a_stalled_peer_costs_only_its_in_flight_chunks() {
    let src = source(120, 8);
    let key = trust_of(&src.key);
    let staller = spawn_liar(&src.store, key, Lie::Stall);
    let honest = Agent::local(&src.store, &src.key, false, &src.dir.path().join("agent.log"));
    // With an honest peer: the staller's requested chunks are taken over
    // (tail stealing, or the 3 s stall timeout), and the fetch completes.
    let dst = src.dir.path().join("dst");
    let r = report(&fetch(&src.id, &dst, &src.key, &[staller, honest.addr]));
    let peers = peers_json(&r);
    let s = peers
        .iter()
        .find(|p| p["addr"] == staller.to_string())
        .expect("staller in report");
    assert_eq!(s["chunks"].as_u64(), Some(0), "{r}");
    assert_eq!(r["chunks_fetched"].as_u64(), Some(chunk_files(&src.store) as u64));
    assert_restores(&src.id, &dst, &src.image);

    // The staller alone: dropped after the stall timeout (fetch() passes
    // --stall-timeout 3), and the fetch fails naming it, instead of hanging.
    let dst2 = src.dir.path().join("dst2");
    let src_store = LocalStore::open(&src.store).expect("src");
    let m = src_store
        .get_manifest(&src.id.parse().expect("id"))
        .expect("manifest");
    LocalStore::open_or_create(&dst2)
        .expect("dst2")
        .put_manifest(&m)
        .expect("put manifest");
    let started = std::time::Instant::now();
    let out = fetch(&src.id, &dst2, &src.key, &[staller]);
    let took = started.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stalled"), "the error names the stall: {err}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(20),
        "took {took:?}"
    );
}

#[test]
fn an_unreachable_peer_is_reported_and_the_others_carry_the_fetch() {
    let src = source(60, 9);
    let agent = Agent::local(&src.store, &src.key, false, &src.dir.path().join("agent.log"));
    // A port nobody listens on (bound, then released).
    let dead: SocketAddr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dst = src.dir.path().join("dst");
    let r = report(&fetch(&src.id, &dst, &src.key, &[dead, agent.addr]));
    let peers = peers_json(&r);
    assert!(
        !peers[0]["dropped"].is_null(),
        "the unreachable peer is reported: {r}"
    );
    assert_eq!(peers[0]["chunks"].as_u64(), Some(0));
    assert_eq!(r["chunks_fetched"].as_u64(), Some(chunk_files(&src.store) as u64));
    assert_restores(&src.id, &dst, &src.image);
    // Only unreachable peers: a clear error, non-zero exit.
    let out = fetch(&src.id, &src.dir.path().join("dst2"), &src.key, &[dead]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no peer could supply manifest"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_store_reads_verified_manifests_and_chunks() {
    use edgeshift_agent::transfer::peer::PeerStore;
    let src = source(30, 10);
    let agent = Agent::local(&src.store, &src.key, false, &src.dir.path().join("agent.log"));
    let key = trust_of(&src.key);
    let local = LocalStore::open(&src.store).expect("src");
    let id: ManifestId = src.id.parse().expect("id");
    let mut peer = PeerStore::connect(agent.addr, &key, FetchOptions::default())
        .await
        .expect("connect");
    assert!(!peer.peer_id().is_empty());
    let m = peer.get_manifest(&id).await.expect("manifest");
    assert_eq!(m, local.get_manifest(&id).expect("local manifest"));
    let absent = Fingerprint::of(b"absent");
    let present = m.unique_chunks();
    let got = peer
        .get_chunks(&[present[0], absent, present[1]])
        .await
        .expect("chunks");
    assert_eq!(
        got[0].as_deref(),
        Some(&local.get_chunk(&present[0]).expect("chunk")[..])
    );
    assert_eq!(got[1], None);
    assert!(got[2].is_some());
    match peer.get_manifest(&absent).await {
        Err(TransferError::Store(edgeshift_agent::store::StoreError::ManifestMissing(_))) => {}
        other => panic!("expected ManifestMissing, got {other:?}"),
    }
    // A liar's wrong bytes are refused.
    let liar = spawn_liar(&src.store, key.clone(), Lie::FirstChunkBytes);
    let mut lp = PeerStore::connect(liar, &key, FetchOptions::default())
        .await
        .expect("connect liar");
    assert!(matches!(
        lp.get_chunks(&present[..1]).await,
        Err(TransferError::Store(
            edgeshift_agent::store::StoreError::ChunkRejected { .. }
        ))
    ));
    // And a certificate of another cluster never connects.
    let wrong = trust_of(&write_key(src.dir.path(), "other-cluster", 0x99));
    assert!(matches!(
        PeerStore::connect(agent.addr, &wrong, FetchOptions::default()).await,
        Err(TransferError::AuthFailed { .. })
    ));
    drop(agent);
}

/// An intent under the store's `unsynced/` naming `fps`, as a publish in
/// progress by this (live) process writes before placing its chunks.
fn intent_naming(store: &Path, fps: &[Fingerprint]) {
    use edgeshift_agent::store::publish::UNSYNCED_DIR;
    let dir = store.join(UNSYNCED_DIR);
    std::fs::create_dir_all(&dir).expect("unsynced dir");
    let text: String = fps.iter().map(|f| format!("{}\n", f.to_hex())).collect();
    std::fs::write(dir.join(format!("publish.{}.0", std::process::id())), text).expect("intent");
}

/// Puts `data` into the store at `store` after `ms`, on a thread of its
/// own, the way a publish does: written aside, then renamed into place, so
/// a server never sees a chunk half written.
fn place_after(store: &Path, data: Vec<u8>, ms: u64) -> std::thread::JoinHandle<()> {
    let store = LocalStore::open(store).expect("store");
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(ms));
        store.put_chunk(&Fingerprint::of(&data), &data).expect("place");
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_being_published_is_waited_for_and_one_that_never_comes_is_missing() {
    let src = source(8, 11);
    let agent = Agent::local(&src.store, &src.key, false, &src.dir.path().join("a.log"));
    let key = trust_of(&src.key);
    let coming = vec![9u8; CHUNK];
    let never = vec![10u8; CHUNK];
    let (fc, fnv) = (Fingerprint::of(&coming), Fingerprint::of(&never));
    intent_naming(&src.store, &[fc, fnv]);
    let want = |fp: Fingerprint| ChunkWant {
        optional: false,
        base: None,
        fp,
        len: CHUNK as u64,
        sources: None,
    };
    // The chunk appears 300 ms after it is asked for: the server waits.
    let placed = place_after(&src.store, coming.clone(), 300);
    let dst = Arc::new(LocalStore::open_or_create(src.dir.path().join("dst")).expect("dst"));
    let fetcher = Fetcher::new(dst.clone(), vec![agent.addr], key);
    let t = std::time::Instant::now();
    let report = fetcher
        .fetch_chunks(vec![want(fc)])
        .await
        .expect("fetch the coming chunk");
    assert_eq!(report.chunks_fetched, 1);
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "served before it was placed?"
    );
    assert_eq!(dst.get_chunk(&fc).expect("stored"), coming);
    placed.join().expect("placer");
    // Named but never placed: after the server's wait, missing.
    match fetcher.fetch_chunks(vec![want(fnv)]).await {
        Err(TransferError::ChunksUnavailable { missing: 1, .. }) => {}
        other => panic!("expected ChunksUnavailable, got {other:?}"),
    }
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_in_place_are_not_held_behind_one_still_being_placed() {
    use edgeshift_agent::transfer::peer::PeerStore;
    let src = source(8, 12);
    let agent = Agent::local(&src.store, &src.key, false, &src.dir.path().join("a.log"));
    let key = trust_of(&src.key);
    let store = LocalStore::open(&src.store).expect("src");
    let present = vec![5u8; CHUNK];
    let fp_present = Fingerprint::of(&present);
    store.put_chunk(&fp_present, &present).expect("put");
    let place_later = |data: Vec<u8>, ms: u64| {
        let fp = Fingerprint::of(&data);
        intent_naming(&src.store, &[fp]);
        (fp, place_after(&src.store, data, ms))
    };

    // Asked first, placed 400 ms later: the chunk in place comes before it.
    let (fp_coming, placer) = place_later(vec![6u8; CHUNK], 400);
    let (mut s, _) = connect_authed(&key, agent.addr).await;
    s.write_all(&wire::encode_chunk_request(1, false, 0, &[fp_coming, fp_present]))
        .await
        .expect("request");
    let mut order = Vec::new();
    for _ in 0..2 {
        let f = read_frame(&mut s, wire::MAX_FRAME_LEN, None)
            .await
            .expect("answer");
        assert_eq!(f.kind, FrameKind::Chunk);
        let (head, bytes) = wire::decode_chunk(&f.body).expect("chunk");
        assert_eq!(Fingerprint::of(bytes), head.fingerprint, "bytes match their name");
        order.push(head.fingerprint);
    }
    assert_eq!(
        order,
        vec![fp_present, fp_coming],
        "the chunk in place went first"
    );
    placer.join().expect("placer");

    // The library client still returns the answers in the order asked.
    let (fp_late, placer) = place_later(vec![7u8; CHUNK], 300);
    let mut peer = PeerStore::connect(agent.addr, &key, FetchOptions::default())
        .await
        .expect("peer");
    let got = peer
        .get_chunks(&[fp_late, fp_present, fp_late])
        .await
        .expect("chunks");
    assert_eq!(got[0].as_deref(), Some(&[7u8; CHUNK][..]));
    assert_eq!(got[1].as_deref(), Some(&present[..]));
    assert_eq!(got[2].as_deref(), Some(&[7u8; CHUNK][..]));
    placer.join().expect("placer");
    drop(agent);
}

fn agent_with_info_log(store: &Path, key: &Path, listen: &str, log: &Path) -> Agent {
    let mut cmd = std::process::Command::new(BIN);
    cmd.env("RUST_LOG", "info");
    Agent::start(cmd, store, key, listen, None, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_sharing_a_pool_authenticate_once_and_replace_a_closed_connection() {
    use edgeshift_agent::transfer::pool::ConnPool;
    let src = source(120, 9);
    let log1 = src.dir.path().join("a1.log");
    let mut a = agent_with_info_log(&src.store, &src.key, "127.0.0.1:0", &log1);
    let addr = a.addr;
    let key = trust_of(&src.key);
    let pool = Arc::new(ConnPool::new());
    let fetcher = |dst: &str| {
        let store = Arc::new(LocalStore::open_or_create(src.dir.path().join(dst)).expect("dst store"));
        let opts = FetchOptions::default();
        (
            store.clone(),
            Fetcher::with_options(store, vec![addr], key.clone(), opts).with_pool(pool.clone()),
        )
    };
    let (store, f) = fetcher("dst");
    let id: ManifestId = src.id.parse().expect("id");
    let manifest = f.fetch_manifest(&id).await.expect("manifest");
    let wants = f.missing_chunks(&manifest).expect("missing");
    let (first, second) = wants.split_at(wants.len() / 2);
    // Three fetches (rounds): one connection, kept in the pool after each.
    for part in [first, second, &second[..1]] {
        let r = f.fetch_chunks(part.to_vec()).await.expect("fetch");
        assert!(r.peers[0].dropped.is_none(), "{r:?}");
        assert_eq!(pool.idle_count(), 1, "the connection went back to the pool");
    }
    for w in &wants {
        assert!(store.has_chunk(&w.fp).expect("has"));
    }
    let authenticated = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("peer authenticated")
            .count()
    };
    // The manifest's connection (`PeerStore`), then one for three fetches.
    assert_eq!(authenticated(&log1), 2, "one handshake for three fetches");

    // The agent restarts on the same address: the pooled connection it
    // closed is noticed and replaced, and the fetch does not lose the peer.
    a.kill();
    let log2 = src.dir.path().join("a2.log");
    let _b = agent_with_info_log(&src.store, &src.key, &addr.to_string(), &log2);
    let (store2, f2) = fetcher("dst2");
    let r = f2.fetch_chunks(wants.clone()).await.expect("fetch after restart");
    assert!(r.peers[0].dropped.is_none(), "{r:?}");
    assert_eq!(r.chunks_fetched, wants.len() as u64);
    for w in &wants {
        assert!(store2.has_chunk(&w.fp).expect("has"));
    }
    assert_eq!(authenticated(&log2), 1);
    assert_eq!(pool.idle_count(), 1);
}

/// Issue 21, finding 1: ~1,000 half-open connections from one address at a
/// 1024-descriptor limit used to make `accept` fail with EMFILE, and the
/// agent exited. Now handshakes in progress are bounded (per address and
/// in total) and accept errors back off: the agent keeps running and a
/// legitimate peer is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_open_connections_neither_stops_the_agent_nor_keeps_peers_out() {
    let src = source(20, 13);
    let mut cmd = std::process::Command::new("prlimit");
    cmd.args(["--nofile=1024:1024", BIN]);
    let mut agent = Agent::start(
        cmd,
        &src.store,
        &src.key,
        "127.0.0.1:0",
        None,
        &src.dir.path().join("agent.log"),
    );
    let mut flood = Vec::new();
    for _ in 0..1000 {
        let s = tokio::net::TcpSocket::new_v4().expect("socket");
        s.bind("127.0.0.2:0".parse().expect("addr"))
            .expect("bind 127.0.0.2");
        match tokio::time::timeout(Duration::from_secs(2), s.connect(agent.addr)).await {
            Ok(Ok(c)) => flood.push(c),
            _ => break,
        }
    }
    assert!(flood.len() >= 900, "the flood opened {} connections", flood.len());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        agent.child.try_wait().expect("wait").is_none(),
        "the agent exited under the flood: {}",
        agent.log()
    );
    let (id, dst, key, addr) = (
        src.id.clone(),
        src.dir.path().join("dst"),
        src.key.clone(),
        agent.addr,
    );
    let out = tokio::task::spawn_blocking(move || fetch(&id, &dst, &key, &[addr]))
        .await
        .expect("join");
    assert!(
        out.status.success(),
        "a legitimate peer was kept out: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(agent.child.try_wait().expect("wait").is_none());
    drop(flood);
}

/// In front of `upstream`: requests pass at full speed, answers pass at full
/// speed for their first `fast` bytes (the TLS handshake) and then 8 KiB a
/// second: a whole TLS record (16 KiB) completes every 2 s, so something
/// always arrives within the 3 s stall timeout and only a rate floor can
/// tell this peer from a slow path.
fn trickling(upstream: SocketAddr, fast: usize) -> SocketAddr {
    use tokio::io::AsyncReadExt;
    serve_each_connection(move |client| async move {
        let Ok(server) = TcpStream::connect(upstream).await else {
            return;
        };
        let (mut client_r, mut client_w) = client.into_split();
        let (mut server_r, mut server_w) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut client_r, &mut server_w).await;
        });
        let mut buf = vec![0u8; 64 << 10];
        let mut passed = 0usize;
        while let Ok(n) = server_r.read(&mut buf).await {
            if n == 0 {
                break;
            }
            for piece in buf[..n].chunks(8 << 10) {
                if client_w.write_all(piece).await.is_err() {
                    return;
                }
                passed += piece.len();
                if passed > fast {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    })
}

#[test]
fn a_trickling_peer_is_dropped_by_the_rate_floor() {
    let src = source(40, 11);
    let honest = Agent::local(&src.store, &src.key, false, &src.dir.path().join("agent.log"));
    let trickler = trickling(honest.addr, 16 << 10);
    let dst = src.dir.path().join("dst");
    let started = std::time::Instant::now();
    let mut child = fetch_cmd(
        std::process::Command::new(BIN),
        &src.id,
        &dst,
        &src.key,
        &[trickler],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("spawn fetch");
    // fetch_cmd passes --stall-timeout 3: the floor judges 3 s windows.
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(40) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("a peer trickling 8 KiB/s held the fetch for 40 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().expect("output");
    assert!(!status.success(), "the trickler alone cannot supply the image");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("too slow"), "the error names the trickle: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );

    // Beside an honest peer the fetch completes without the trickler's help.
    let dst2 = src.dir.path().join("dst2");
    let r = report(&fetch(&src.id, &dst2, &src.key, &[trickler, honest.addr]));
    assert_eq!(
        r["chunks_fetched"].as_u64(),
        Some(chunk_files(&src.store) as u64),
        "{r}"
    );
    assert_restores(&src.id, &dst2, &src.image);
}

/// `dir/v1.raw` (a test image) and `dir/v2.raw`, v1 with one 4 KiB block
/// of every other data chunk written again; returns both paths and the
/// number of chunks that changed.
fn an_image_and_its_later_version(
    dir: &Path,
    chunks: usize,
) -> (std::path::PathBuf, std::path::PathBuf, usize) {
    let v1 = dir.join("v1.raw");
    write_image(&v1, chunks, CHUNK, 11);
    let mut bytes = std::fs::read(&v1).expect("read v1");
    let mut changed = 0;
    for i in (0..chunks).step_by(2) {
        let at = i * CHUNK + (i % (CHUNK / 4096)) * 4096;
        let block = &mut bytes[at..at + 4096];
        if block.iter().all(|&b| b == 0) || i % 23 == 7 {
            continue; // zero and repeated chunks stay as they are
        }
        block.fill(0x5a ^ i as u8);
        changed += 1;
    }
    let v2 = dir.join("v2.raw");
    std::fs::write(&v2, bytes).expect("write v2");
    (v1, v2, changed)
}

#[test]
fn a_fetch_asks_for_the_blocks_that_differ_from_the_earlier_version_held_here() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (v1, v2, changed) = an_image_and_its_later_version(dir.path(), 40);
    let key = write_key(dir.path(), "key", 0x42);
    // `both` holds the two versions, `later` only the later one.
    let both = dir.path().join("both");
    slice(&v1, &both, "64KiB");
    let id = slice(&v2, &both, "64KiB");
    let later = dir.path().join("later");
    slice(&v2, &later, "64KiB");
    let agent = Agent::local(&both, &key, false, &dir.path().join("agent.log"));
    let only_later = Agent::local(&later, &key, false, &dir.path().join("later.log"));
    let warm = |name: &str| {
        let d = dir.path().join(name);
        slice(&v1, &d, "64KiB");
        d
    };

    // A peer holding both versions sends each changed chunk as its block.
    let dst = warm("dst");
    let r = report(&fetch(&id, &dst, &key, &[agent.addr]));
    let peer = &peers_json(&r)[0];
    assert_eq!(peer["delta_chunks"].as_u64(), Some(changed as u64), "{r}");
    let bitmap = CHUNK.div_ceil(4096).div_ceil(8);
    assert!(
        r["bytes_received"].as_u64().expect("bytes") <= (changed * (4096 + bitmap)) as u64,
        "only the changed blocks travel: {r}"
    );
    assert_restores(&id, &dst, &v2);

    // A peer lacking the earlier version answers whole chunks (all but
    // chunk 4: its earlier version is also chunk 7 of the later image,
    // which `write_image` made a copy of chunk 4, so that peer holds it).
    let dst = warm("dst-whole");
    let r = report(&fetch(&id, &dst, &key, &[only_later.addr]));
    let peer = &peers_json(&r)[0];
    assert_eq!(peer["delta_chunks"].as_u64(), Some(1), "{r}");
    assert!(
        r["bytes_received"].as_u64().expect("bytes") > ((changed - 1) * CHUNK / 2) as u64,
        "whole chunks (zstd takes off their rewritten block): {r}"
    );
    assert_eq!(r["chunks_fetched"].as_u64(), Some(changed as u64), "{r}");
    assert!(peer["dropped"].is_null(), "it did nothing wrong: {r}");
    assert_restores(&id, &dst, &v2);

    // A peer whose deltas rebuild wrong bytes is dropped and its chunks
    // come from the honest one (reached once the liar was asked).
    let (liar, liar_asked) = spawn_liar_telling(&both, trust_of(&key), Lie::DeltaBytes);
    let honest = behind_gate(agent.addr, liar_asked);
    let dst = warm("dst-liar");
    // The manifest is here already: the liar serves none, and the honest
    // peer answers only once the liar was asked for chunks.
    let m = LocalStore::open(&both)
        .expect("both")
        .get_manifest(&id.parse().expect("id"))
        .expect("manifest");
    LocalStore::open(&dst)
        .expect("dst")
        .put_manifest(&m)
        .expect("put");
    let r = report(&fetch(&id, &dst, &key, &[liar, honest]));
    let lr = peers_json(&r)
        .into_iter()
        .find(|p| p["addr"] == liar.to_string())
        .expect("liar in the report");
    assert!(
        lr["dropped"].as_str().unwrap_or("").contains("wrong bytes"),
        "liar dropped for its lie: {lr}"
    );
    assert_restores(&id, &dst, &v2);
}

#[test]
fn fetch_out_writes_the_image_restore_would_and_a_killed_fetch_leaves_no_image() {
    let src = source(200, 12);
    let agent = Agent::local(&src.store, &src.key, false, &src.dir.path().join("agent.log"));
    let out_dir = src.dir.path().join("out");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let image = out_dir.join("vm.raw");
    let store = src.dir.path().join("dst");

    // Through a peer that goes slow after 2 MB, killed (SIGKILL) mid-way.
    let slow = trickling(agent.addr, 2 << 20);
    let mut cmd = fetch_cmd(Command::new(BIN), &src.id, &store, &src.key, &[slow]);
    let mut child = cmd
        .arg("--out")
        .arg(&image)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start fetch");
    let stored_some = || chunk_files(&store) >= 8;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !stored_some() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(stored_some(), "the fetch got going");
    assert!(
        child.try_wait().expect("poll").is_none(),
        "still fetching when killed"
    );
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    assert!(!image.exists(), "a killed fetch leaves no image at its path");
    for e in std::fs::read_dir(&out_dir).expect("ls").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(
            name.starts_with('.'),
            "only a hidden temp file may be left: {name}"
        );
    }

    // Again, from the agent itself: the image is whole, byte for byte what
    // `restore` writes.
    let out = fetch_cmd(Command::new(BIN), &src.id, &store, &src.key, &[agent.addr])
        .arg("--out")
        .arg(&image)
        .output()
        .expect("run fetch");
    report(&out);
    let restored = out_dir.join("restored.raw");
    let r = Command::new(BIN)
        .args(["restore", &src.id, "--store"])
        .arg(&store)
        .arg("--out")
        .arg(&restored)
        .output()
        .expect("run restore");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let written = std::fs::read(&image).expect("read image");
    assert!(
        written == std::fs::read(&restored).expect("read restored"),
        "fetch --out equals restore"
    );
    assert!(
        written == std::fs::read(&src.image).expect("read source"),
        "and the source image"
    );
}
