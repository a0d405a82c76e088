//! kill -9 in the middle of a slice never leaves a torn chunk: every file
//! under chunks/ hashes to its name, the next open clears the dead writer's
//! temp files, a re-slice completes, and the store verifies whole.

mod image_util;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgeshift_agent::store::{ChunkStore, LocalStore};
use image_util::*;

fn count_files(dir: &Path) -> usize {
    if dir.is_dir() {
        snapshot(dir).len()
    } else {
        0
    }
}

#[test]
fn kill_9_mid_slice_leaves_no_torn_chunk() {
    let img = image("small-base.img");
    let mut caught = false;
    for attempt in 0..5 {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store");
        // 4 KiB chunks: thousands of chunk files, so the slice is still
        // writing when it is killed.
        let mut child = Command::new(BIN)
            .args(["slice", img.to_str().expect("utf-8"), "--store"])
            .arg(&store)
            .args(["--chunk-size", "4KiB"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn slice");
        // Kill once some chunks are committed and more are being written.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut still_running = false;
        while Instant::now() < deadline {
            if count_files(&store.join("chunks")) > 300 + attempt * 200 {
                still_running = child.try_wait().expect("try_wait").is_none();
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().expect("kill -9");
        child.wait().expect("reap");
        if !still_running {
            continue;
        }
        caught = true;
        assert!(
            fs::read_dir(store.join("manifests"))
                .expect("manifests")
                .next()
                .is_none(),
            "a killed slice must not have stored a manifest"
        );
        // Every visible chunk is whole: its bytes hash to its name.
        for (path, bytes) in snapshot(&store.join("chunks")) {
            let name = path.file_name().expect("name").to_string_lossy().into_owned();
            assert_eq!(
                blake3::hash(&bytes).to_hex().as_str(),
                name,
                "torn chunk {}",
                path.display()
            );
        }
        let partial = count_files(&store.join("chunks"));
        // Reopening clears the dead writer's temp files.
        let reopened = LocalStore::open(&store).expect("reopen");
        assert_eq!(
            count_files(&store.join("tmp")),
            0,
            "temp files of a dead writer remain"
        );
        assert_eq!(reopened.stats().expect("stats").chunks as usize, partial);

        // A re-slice completes; the store then verifies and restores.
        let id = slice(&img, &store, "4KiB");
        assert!(reopened.verify_all_chunks().expect("verify").is_empty());
        ok(&[
            "inspect",
            &id,
            "--store",
            store.to_str().expect("utf-8"),
            "--verify",
        ]);
        let out = dir.path().join("out.img");
        restore(&id, &store, &out);
        assert_eq!(fs::read(&out).expect("read"), fs::read(&img).expect("read"));
        break;
    }
    assert!(caught, "the slice finished before it could be killed, five times");
}
