//! QEMU's TLS at the source, driven against the fakes: the credentials
//! object and the migration's TLS parameters come before `migrate`, the
//! destination's edge name is the name QEMU checks, the mirror's NBD node
//! goes over TLS, and a rollback removes what was added.

// A list of one range is one batch of guest writes, not a list of numbers.
#![allow(clippy::single_range_in_vec_init)]

use super::fakes::{FAKE_DEST_NAME, INCOMING_URI, MIRROR_EXPORT_ADDR};
use super::mirror::MIRROR_NODE;
use super::tests::{assert_rolled_back, Case, FAST};
use super::DiskHandoff;
use crate::migrate::report::Phase;
use std::sync::Arc;

use edgeshift_common::identity::{issue, new_ca, Credentials, Role, TlsFiles};

use crate::transfer::Trust;
use crate::vm::tls::{TlsEndpoint, TLS_CREDS_ID};
use crate::vm::Qmp;

/// This edge's credentials of a throwaway cluster, written under `dir`.
pub(super) fn credentials(dir: &std::path::Path, name: &str) -> Arc<Credentials> {
    let ca = new_ca("test", 1).expect("ca");
    let edge = issue(&ca, Role::Edge, name, &[], 1).expect("edge");
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("edge.pem"),
        key: dir.join("edge.key"),
        crl: None,
    };
    std::fs::write(&files.ca, &ca.cert_pem).expect("write");
    std::fs::write(&files.cert, &edge.cert_pem).expect("write");
    std::fs::write(&files.key, &edge.key_pem).expect("write");
    Arc::new(Credentials::load(&files).expect("load"))
}

/// A case with TLS on: the edge's files and the VM's directory in `dir`.
fn tls_case(dir: &std::path::Path, handoff: DiskHandoff) -> Case {
    let mut c = Case::new(FAST, &[0..20, 100..150, 150..152, 160..170]);
    c.opts.state_dir = dir.join("vms");
    c.opts.disk_handoff = handoff;
    c.opts.trust = Trust::Tls(credentials(dir, "edge-a"));
    c
}

#[test]
fn memory_and_the_mirror_go_over_tls_naming_the_destination() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut c = tls_case(d.path(), DiskHandoff::Mirror);
    c.run().result.expect("migration");
    let creds_dir = d.path().join("vms/vm1/tls");
    let add = c
        .qmp
        .position(&format!(
            "object-add tls-creds-x509 {TLS_CREDS_ID} endpoint=client dir={}",
            creds_dir.display()
        ))
        .unwrap_or_else(|| panic!("credentials added: {:?}", c.qmp.calls()));
    let params = c
        .qmp
        .position(&format!(
            "migrate-set-parameters tls-creds={TLS_CREDS_ID} tls-hostname={FAKE_DEST_NAME} tls-authz=-"
        ))
        .expect("TLS parameters set");
    let migrate = c
        .qmp
        .position(&format!("migrate {INCOMING_URI}"))
        .expect("migrate");
    assert!(add < params && params < migrate, "{:?}", c.qmp.calls());
    let (host, port) = MIRROR_EXPORT_ADDR.split_once(':').expect("addr");
    assert!(
        c.qmp.called(&format!(
            "blockdev-add nbd {MIRROR_NODE} {host}:{port} export-name tls-creds={TLS_CREDS_ID} tls-hostname={FAKE_DEST_NAME}"
        )),
        "{:?}",
        c.qmp.calls()
    );
    assert!(creds_dir.join("client-key.pem").exists());
}

#[test]
fn a_rollback_removes_the_tls_object_and_a_leftover_one_is_replaced() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut c = tls_case(d.path(), DiskHandoff::Mirror);
    c.opts.fail_after = Some(Phase::Mirror);
    let ran = c.run();
    assert_rolled_back(&c, &ran);
    assert!(c.qmp.objects().is_empty(), "{:?}", c.qmp.calls());
    assert!(c
        .qmp
        .called("migrate-set-parameters tls-creds= tls-hostname=- tls-authz=-"));
    // A QEMU whose earlier handoff left the object (no rollback reached
    // it): it is replaced, not refused as a duplicate.
    let mut c = tls_case(d.path(), DiskHandoff::Mirror);
    c.qmp
        .add_tls_creds(TLS_CREDS_ID, d.path(), TlsEndpoint::Client)
        .expect("leftover");
    c.run().result.expect("migration");
    assert_eq!(c.qmp.objects(), [TLS_CREDS_ID]);
    assert!(c.qmp.position("object-del").expect("deleted") < c.qmp.calls().len() - 1);
}

#[test]
fn without_tls_nothing_is_added_and_the_mirror_is_plain() {
    let mut c = Case::new(FAST, &[0..20, 100..150, 150..152, 160..170]);
    c.opts.disk_handoff = DiskHandoff::Mirror;
    c.run().result.expect("migration");
    assert!(!c.qmp.called("object-add"), "{:?}", c.qmp.calls());
    assert!(!c.qmp.called("migrate-set-parameters tls-creds"));
    assert!(!c.qmp.calls_of("blockdev-add").iter().any(|l| l.contains("tls")));
}
