//! Dirty-rate tracking per chunk: eBPF, fallback and fake trackers (issue 5).
