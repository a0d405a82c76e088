//! Peer-to-peer chunk protocol, chunk server, striped multi-source fetcher (issue 3).
