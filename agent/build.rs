//! Compiles the dirty tracker's BPF object from `ebpf/src/dirty.bpf.c` into
//! OUT_DIR with the same recipe as `cargo xtask build-ebpf`; the agent embeds
//! it with `include_bytes!`. No prebuilt object is committed.

fn main() {
    println!("cargo:rerun-if-changed={}", edgeshift_ebpf::SOURCE_PATH);
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=BPFTOOL");
    let out_dir = match std::env::var_os("OUT_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            eprintln!("OUT_DIR is not set: build.rs must run under cargo");
            std::process::exit(1);
        }
    };
    if let Err(e) = edgeshift_ebpf::build_object(&out_dir) {
        // Cargo shows a build script's stderr when it fails.
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
