//! What a crash can leave in a store, cleared when it is opened: temp files
//! of writers that died, and chunks published before they were synced
//! ([`super::LocalStore::publish`]) whose writer died before the sync.

use std::fs;
use std::io::ErrorKind;

use edgeshift_common::Fingerprint;

use super::fs::io_err;
use super::layout::{writer_alive, StorePaths};
use super::StoreError;

/// Removes temp files whose writer is gone (another live process may own
/// the rest); creates `tmp/` if it is missing.
pub(super) fn clean_tmp(paths: &StorePaths) -> Result<(), StoreError> {
    let tmp = paths.tmp_dir();
    match fs::read_dir(&tmp) {
        Ok(entries) => {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !writer_alive(&name) {
                    let _ = fs::remove_file(e.path());
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            fs::create_dir_all(&tmp).map_err(io_err("create directory", &tmp))
        }
        Err(e) => Err(io_err("read directory", &tmp)(e)),
    }
}

/// Checks the chunks that intents of dead writers name and removes the
/// torn ones, then the intents. Returns how many chunks were removed.
pub(super) fn recover_unsynced(paths: &StorePaths) -> Result<usize, StoreError> {
    let dir = paths.unsynced_dir();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err("read directory", &dir)(e)),
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if writer_alive(&name) {
            continue;
        }
        let path = e.path();
        // A torn intent names only chunks that were never renamed.
        let text = fs::read(&path).map_err(io_err("read", &path))?;
        for fp in String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|l| l.parse::<Fingerprint>().ok())
        {
            let p = paths.chunk_path(&fp);
            match fs::read(&p) {
                Ok(bytes) if Fingerprint::of(&bytes) == fp => {}
                Ok(_) => {
                    tracing::warn!(chunk = %fp, "removing a chunk torn before it was synced");
                    match fs::remove_file(&p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err("remove", &p)(e)),
                    }
                    removed += 1;
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("read", &p)(e)),
            }
        }
        fs::remove_file(&path).map_err(io_err("remove", &path))?;
    }
    Ok(removed)
}
