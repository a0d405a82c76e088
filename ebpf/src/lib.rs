//! The dirty tracker BPF program and its map layout (being built: see issue 5).
