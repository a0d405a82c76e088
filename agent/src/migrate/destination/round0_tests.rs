//! Round 0 to a warm destination: the chunks the guest changed since boot
//! come as deltas against the boot image's chunks held here (no root: no
//! loop device, no QEMU; a real chunk server on loopback).

use std::net::IpAddr;
use std::sync::Arc;

use edgeshift_common::{ChunkSize, Fingerprint, Manifest};

use super::context::{Host, HostConfig};
use super::session::Session;
use crate::migrate::proto::{Request, Response};
use crate::store::{ChunkStore, LocalStore};
use crate::transfer::server::{serve, ServerConfig, ZstdPolicy};
use crate::transfer::{ClusterKey, Trust};
use crate::vm::Qemu;

const CHUNK: usize = 16 << 10;

fn trust(id: &str) -> Trust {
    Trust::InsecurePlaintext {
        key: ClusterKey::from_bytes([3; 32]),
        id: id.into(),
    }
}

fn put(store: &LocalStore, bytes: &[u8]) -> Fingerprint {
    let fp = Fingerprint::of(bytes);
    store.put_chunk(&fp, bytes).expect("put");
    fp
}

#[test]
fn round_0_to_a_warm_destination_sends_the_changed_blocks_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The boot image (4 chunks) at both edges; the guest rewrote one 4 KiB
    // block of chunks 1 and 3 since boot; only the source holds those.
    let boot: Vec<Vec<u8>> = (0..4u8)
        .map(|i| (0..CHUNK).map(|j| (j as u8).wrapping_mul(7) ^ i).collect())
        .collect();
    let src = Arc::new(LocalStore::open_or_create(dir.path().join("src")).expect("src"));
    let dst = LocalStore::open_or_create(dir.path().join("dst")).expect("dst");
    let boot_fps: Vec<Fingerprint> = boot.iter().map(|c| put(&dst, c)).collect();
    let mut now = boot_fps.clone();
    for c in &boot {
        put(&src, c);
    }
    for i in [1, 3] {
        let mut changed = boot[i].clone();
        changed[4096..8192].fill(0xee);
        now[i] = put(&src, &changed);
    }
    let cs = ChunkSize::new(CHUNK as u64).expect("chunk size");
    let manifest = Manifest::new(cs, 4 * CHUNK as u64, boot_fps.clone());
    dst.put_manifest(&manifest).expect("manifest");

    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = ServerConfig {
        trust: trust("src"),
        store: Arc::clone(&src),
        zstd: ZstdPolicy::never(),
        uses: None,
    };
    rt.spawn(serve(listener, Arc::new(server)));

    let host = Host::new(
        HostConfig {
            state_dir: dir.path().join("vms"),
            trust: trust("dst"),
            id: "dst".into(),
            qemu: Qemu::default(),
            coordinator: None,
        },
        Arc::new(dst),
        rt.handle().clone(),
    );
    let lo = IpAddr::from([127, 0, 0, 1]);
    let mut s = Session::new(Arc::new(host), lo, lo, "src".into());
    let prepared = s.handle(Request::Prepare {
        spec: crate::vm::VmSpec {
            name: "vm1".into(),
            memory_mib: 128,
            cpus: 1,
            accel: crate::vm::AccelChoice::Tcg,
            kernel: None,
            initrd: None,
            append: None,
            net: None,
        },
        manifest: manifest.to_bytes(),
    });
    assert!(matches!(prepared, Ok(Response::Prepared { .. })), "{prepared:?}");
    // Round 0: every index, as the live disk is now.
    let pulled = s.handle(Request::Pull {
        image_size: 4 * CHUNK as u64,
        chunk_size: CHUNK as u32,
        chunks: now.iter().enumerate().map(|(i, fp)| (i as u32, fp.0)).collect(),
        holders: vec![addr.to_string()],
        filler: Vec::new(),
        deltas: true,
    });
    let Ok(Response::Pulled(stats)) = pulled else {
        panic!("Pull: {pulled:?}");
    };
    assert_eq!(stats.local_chunks, 2, "{stats:?}");
    let holder = &stats.holders[0];
    assert_eq!(holder.delta_chunks, 2, "both changed chunks as deltas: {stats:?}");
    assert!(holder.bytes <= 2 * (4096 + 1), "one block each: {stats:?}");
    assert!(matches!(s.handle(Request::Abort), Ok(Response::Done)));
}
