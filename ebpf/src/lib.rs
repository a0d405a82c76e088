//! The dirty tracker's BPF program and its map layout.
//!
//! The program itself is C (`src/dirty.bpf.c`), compiled by Debian's clang
//! with BTF; this crate holds the `#[repr(C)]` twins of its map keys and
//! values, the names the loader uses, and [`build_object`]: the one recipe
//! that both `agent/build.rs` and `cargo xtask build-ebpf` run.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The C source of the BPF program.
pub const SOURCE_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/dirty.bpf.c");
/// The file name the object is written under in the output directory.
pub const OBJECT_FILE: &str = "dirty.bpf.o";
/// The program's name (its C function).
pub const PROGRAM: &str = "dirty_bio_queue";
/// The tracepoint it attaches to: category and name (attached as tp_btf,
/// which takes the name alone).
pub const TRACEPOINT: (&str, &str) = ("block", "block_bio_queue");
/// Array (mmapable, one element) holding the [`WatchTable`] the program
/// scans inline for every write bio.
pub const WATCH_TABLE_MAP: &str = "WATCH_TABLE";
/// Hash map of the watched devices past the inline table: kernel `dev_t` →
/// [`ChunkRange`]; consulted only once [`WatchTable::overflow`] is set.
pub const WATCHED_MORE_MAP: &str = "WATCHED_MORE";
/// Entries of the inline table (`INLINE_WATCHED` in the C source).
pub const INLINE_WATCHED: usize = 8;
/// `max_entries` of `WATCHED_MORE`.
pub const MAX_OVERFLOW_WATCHED: usize = 64;
/// Array (mmapable) of [`ChunkCounts`], one per chunk of every watched
/// device, at the device's `base` + chunk index.
pub const CHUNKS_MAP: &str = "CHUNKS";
/// Per-CPU array with one [`TrackerStats`].
pub const STATS_MAP: &str = "STATS";
/// Most chunks one bio is counted into; wider bios bump `truncated`.
pub const MAX_SPAN_CHUNKS: u64 = 1024;

/// Where a device's counters lie in `CHUNKS`: `struct chunk_range`, the
/// value of `WATCHED_MORE`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChunkRange {
    /// First slot of the device's counters in `CHUNKS`.
    pub base: u32,
    /// Chunks the device has; writes past them count as dropped.
    pub chunks: u32,
}

/// One entry of the inline table: `struct watched_dev`. `base` and `chunks`
/// are written once, before `dev` is published with a release store; later
/// only `dev` changes (0 while unwatched).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WatchedDev {
    /// Kernel `dev_t` ([`kernel_dev`]); 0 = this entry matches nothing.
    pub dev: u32,
    pub base: u32,
    pub chunks: u32,
}

/// The single element of `WATCH_TABLE`: `struct watch_table`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WatchTable {
    /// Entries `[0, used)` of `devs` are published.
    pub used: u32,
    /// Nonzero once a device lives in `WATCHED_MORE`.
    pub overflow: u32,
    /// log2 of the chunk size, written before any entry is published.
    pub chunk_shift: u32,
    pub reserved: u32,
    pub devs: [WatchedDev; INLINE_WATCHED],
}

/// One element of the `CHUNKS` array: `struct chunk_counts`, updated with
/// atomic adds by the program.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkCounts {
    pub writes: u64,
    pub bytes: u64,
}

/// One CPU's value in the `STATS` map: `struct tracker_stats`. The program
/// touches it only off its common path (a one-chunk write that has a
/// counter never does), so it does not count bios itself: see
/// [`TrackerStats::events`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrackerStats {
    /// Chunk updates with no counter (past the device's range at watch time).
    pub dropped: u64,
    /// Bios wider than [`MAX_SPAN_CHUNKS`] chunks (only the first ones counted).
    pub truncated: u64,
    /// Chunk updates beyond the first of bios spanning several chunks.
    pub extra_chunks: u64,
}

impl TrackerStats {
    /// Write bios counted, from the sum of `writes` over all counters and
    /// the stats summed over CPUs: every bio makes one chunk update, counted
    /// either in a counter or in `dropped`, plus `extra_chunks` more.
    pub fn events(&self, total_writes: u64) -> u64 {
        (total_writes + self.dropped).saturating_sub(self.extra_chunks)
    }
}

// The C side's sizes (x86_64/aarch64, both little-endian LP64 like BPF).
const _: () = assert!(std::mem::size_of::<ChunkRange>() == 8);
const _: () = assert!(std::mem::size_of::<WatchedDev>() == 12);
const _: () = assert!(std::mem::size_of::<WatchTable>() == 16 + 12 * INLINE_WATCHED);
const _: () = assert!(std::mem::size_of::<ChunkCounts>() == 16);
const _: () = assert!(std::mem::size_of::<TrackerStats>() == 24);

/// The tracepoint's `dev` field is the kernel's internal `dev_t`,
/// `MKDEV(major, minor) = major << 20 | minor`, not glibc's encoding of
/// `st_rdev`; this converts a major/minor pair into it.
pub fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xfffff)
}

/// Why the BPF object could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A tool is missing; the message says which package brings it.
    #[error("cannot build the dirty tracker's BPF object: `{tool}` is missing; {hint}")]
    MissingTool { tool: String, hint: &'static str },
    /// A tool ran and failed.
    #[error("{what} failed:\n{stderr}")]
    ToolFailed { what: String, stderr: String },
    #[error("building the BPF object: {0}")]
    Io(#[from] std::io::Error),
}

const INSTALL_HINT: &str = "install it with `apt-get install clang libbpf-dev bpftool` \
     (or run `sudo bash .ci/setup`)";

fn run_tool(tool: &str, cmd: &mut Command) -> Result<std::process::Output, BuildError> {
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(out),
        Ok(out) => Err(BuildError::ToolFailed {
            what: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(BuildError::MissingTool {
            tool: tool.to_owned(),
            hint: INSTALL_HINT,
        }),
        Err(e) => Err(BuildError::Io(e)),
    }
}

/// Compiles `src/dirty.bpf.c` into `out_dir/dirty.bpf.o` and returns its path.
///
/// Recipe: `vmlinux.h` is generated into `out_dir` from the running kernel's
/// BTF (`bpftool btf dump file /sys/kernel/btf/vmlinux format c`; the
/// program reads the tracepoint through CO-RE, so the loader fixes field
/// offsets for the kernel it runs on), then
/// `clang -target bpf -O2 -g` (`-g` puts BTF in the object, which aya needs
/// for the `.maps` definitions and CO-RE) with libbpf-dev's headers.
/// `CLANG` and `BPFTOOL` override the tools' names.
pub fn build_object(out_dir: &Path) -> Result<PathBuf, BuildError> {
    std::fs::create_dir_all(out_dir)?;
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let bpftool = std::env::var("BPFTOOL").unwrap_or_else(|_| "bpftool".into());

    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        return Err(BuildError::MissingTool {
            tool: "libbpf-dev (/usr/include/bpf/bpf_helpers.h)".into(),
            hint: INSTALL_HINT,
        });
    }
    let vmlinux_btf = "/sys/kernel/btf/vmlinux";
    let btf = run_tool(
        &bpftool,
        Command::new(&bpftool).args(["btf", "dump", "file", vmlinux_btf, "format", "c"]),
    )?;
    std::fs::write(out_dir.join("vmlinux.h"), &btf.stdout)?;

    let object = out_dir.join(OBJECT_FILE);
    let arch = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        "x86_64" => "x86",
        other => other,
    };
    run_tool(
        &clang,
        Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .arg(format!("-D__TARGET_ARCH_{arch}"))
            .arg("-I")
            .arg(out_dir)
            .args(["-c", SOURCE_PATH, "-o"])
            .arg(&object),
    )?;
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_dev_matches_mkdev() {
        // loop0 is 7:0, nbd0 43:0, sda1 8:1; MKDEV shifts the major by 20.
        assert_eq!(kernel_dev(7, 0), 7 << 20);
        assert_eq!(kernel_dev(8, 1), 0x0080_0001);
        assert_eq!(kernel_dev(259, 0x12345), (259 << 20) | 0x12345);
    }

    #[test]
    fn events_count_each_bio_once() {
        // A one-chunk write counted, a one-chunk write dropped, a bio over
        // 3 chunks (2 counted, 1 dropped).
        let s = TrackerStats {
            dropped: 2,
            truncated: 0,
            extra_chunks: 2,
        };
        assert_eq!(s.events(1 + 2), 3);
        // Nothing yet, and a reading taken while a wide bio is half counted
        // (its extra updates already added): never below zero.
        assert_eq!(TrackerStats::default().events(0), 0);
        let mid = TrackerStats {
            extra_chunks: 5,
            ..TrackerStats::default()
        };
        assert_eq!(mid.events(1), 0);
    }

    #[test]
    fn layout_field_offsets_match_c() {
        assert_eq!(std::mem::offset_of!(ChunkRange, chunks), 4);
        assert_eq!(std::mem::offset_of!(WatchedDev, base), 4);
        assert_eq!(std::mem::offset_of!(WatchedDev, chunks), 8);
        assert_eq!(std::mem::offset_of!(WatchTable, overflow), 4);
        assert_eq!(std::mem::offset_of!(WatchTable, chunk_shift), 8);
        assert_eq!(std::mem::offset_of!(WatchTable, devs), 16);
        assert_eq!(std::mem::offset_of!(ChunkCounts, bytes), 8);
        assert_eq!(std::mem::offset_of!(TrackerStats, truncated), 8);
        assert_eq!(std::mem::offset_of!(TrackerStats, extra_chunks), 16);
    }

    #[test]
    fn object_builds_and_its_btf_matches_this_layout() {
        let dir = std::env::temp_dir().join(format!("edgeshift-ebpf-test-{}", std::process::id()));
        let obj = match build_object(&dir) {
            Ok(o) => o,
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("skipping: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        // The object's BTF describes the C structs; their sizes must be ours.
        let out = Command::new("bpftool")
            .args(["btf", "dump", "file"])
            .arg(&obj)
            .output()
            .expect("bpftool runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let _ = std::fs::remove_dir_all(&dir);
        for (name, size) in [
            ("chunk_range", std::mem::size_of::<ChunkRange>()),
            ("watched_dev", std::mem::size_of::<WatchedDev>()),
            ("watch_table", std::mem::size_of::<WatchTable>()),
            ("chunk_counts", std::mem::size_of::<ChunkCounts>()),
            ("tracker_stats", std::mem::size_of::<TrackerStats>()),
        ] {
            let needle = format!("STRUCT '{name}' size={size} ");
            assert!(text.contains(&needle), "BTF lacks `{needle}`:\n{text}");
        }
    }
}
