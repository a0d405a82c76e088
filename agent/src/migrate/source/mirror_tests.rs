//! The disk mirror's phase driven end to end against the fakes: the order
//! of its QMP commands, no disk round in the pause, and what a mirror that
//! fails (its NBD connection cut) or a failure around it leaves behind.

// A list of one range is one batch of guest writes, not a list of numbers.
#![allow(clippy::single_range_in_vec_init)]

use super::fakes::{INCOMING_URI, MIRROR_EXPORT_ADDR};
use super::mirror::{MIRROR_JOB, MIRROR_NODE};
use super::tests::{assert_rolled_back, Case, FAST};
use super::DiskHandoff;
use crate::migrate::report::Phase;
use crate::migrate::MigrateError;
use crate::vm::qemu::DISK_NODE_NAME;

/// Round 0, round 1 (20 changed since boot), a later round of 50; the next
/// look finds 2 (few enough: the rounds end), the mirror's look 10 more.
fn mirror_case() -> Case {
    let mut c = Case::new(FAST, &[0..20, 100..150, 150..152, 160..170]);
    c.opts.disk_handoff = DiskHandoff::Mirror;
    c
}

/// The QMP calls from the pause on.
fn pause_calls(c: &Case) -> Vec<String> {
    let from = c.qmp.position("query-status").expect("the pause");
    c.qmp.calls()[from..].to_vec()
}

fn assert_mirror_gone(c: &Case) {
    let calls = c.qmp.calls();
    assert!(
        c.qmp.called(&format!("block-job-cancel {MIRROR_JOB} force=true")),
        "{calls:?}"
    );
    assert!(c.qmp.jobs().is_empty(), "job dismissed: {calls:?}");
    assert!(c.qmp.nodes().is_empty(), "NBD node removed: {calls:?}");
}

#[test]
fn the_mirror_starts_beside_memory_after_the_rounds_and_the_pause_only_checks() {
    let mut c = mirror_case();
    let ran = c.run();
    ran.result.expect("migration");
    let (host, port) = MIRROR_EXPORT_ADDR.split_once(':').expect("addr");
    let first_block_call = c.qmp.position("blockdev-add").expect("node added");
    assert_eq!(
        &c.qmp.calls()[first_block_call..first_block_call + 3],
        [
            format!("blockdev-add nbd {MIRROR_NODE} {host}:{port} export-name"),
            format!("blockdev-mirror {MIRROR_JOB} {DISK_NODE_NAME} -> {MIRROR_NODE}"),
            "query-block-jobs".to_string(),
        ]
    );
    let mirror = c.qmp.position("blockdev-mirror").expect("mirror");
    let migrate = c
        .qmp
        .position(&format!("migrate {INCOMING_URI}"))
        .expect("migrate");
    assert!(
        migrate < mirror,
        "the mirror starts beside memory's first pass: {:?}",
        c.qmp.calls()
    );
    // In the pause: QEMU completes the mirror (no force), then the
    // switchover.
    assert_eq!(
        pause_calls(&c),
        [
            "query-status",
            "query-block-jobs",
            &format!("block-job-cancel {MIRROR_JOB} force=false"),
            "query-block-jobs",
            &format!("job-dismiss {MIRROR_JOB}"),
            "migrate-continue pre-switchover",
            "query-migrate",
        ]
    );
    assert!(c.qmp.jobs().is_empty());
    assert_eq!(
        c.requests(),
        [
            "prepare",
            "start_incoming",
            "pull",
            "pull",
            "pull",
            "await_incoming",
            "open_mirror",
            "pull",
            "await_image",
            "verify",
            "finish"
        ],
        "no disk round in the pause"
    );
    // Memory is held from converging until the destination's image holds
    // every chunk sent (the pause must not wait for those writes).
    let held = c
        .qmp
        .position("migrate-set-parameters avail-switchover-bandwidth=6")
        .expect("memory held");
    let let_go = c
        .qmp
        .position("migrate-set-parameters avail-switchover-bandwidth=0")
        .expect("then let converge");
    assert!(held < migrate && mirror < let_go, "{:?}", c.qmp.calls());
    // The mirror's round: the 2 the rounds left and the 10 written since.
    assert_eq!(c.pulls(), [200, 20, 50, 12]);
    assert_eq!(
        ran.phases,
        [
            Phase::Plan,
            Phase::Incoming,
            Phase::Precopy,
            Phase::Memory,
            Phase::Mirror,
            Phase::Pause
        ]
    );
    assert!(
        !c.qmp.called("block_set_io_throttle"),
        "no throttle beside a mirror"
    );
}

#[test]
fn a_mirror_that_stops_while_memory_moves_rolls_back_with_the_vm_running() {
    let mut c = mirror_case();
    // Ready at once; the look beside memory finds the job failed.
    c.qmp
        .fail_mirror_after(1, "NBD connection to the destination lost");
    let ran = c.run();
    assert!(
        matches!(&ran.result, Err(MigrateError::Mirror(m)) if m.contains("connection")),
        "{:?}",
        ran.result.as_ref().err()
    );
    assert_rolled_back(&c, &ran);
    assert!(c.qmp.called("migrate_cancel"));
    assert!(c.qmp.jobs().is_empty(), "{:?}", c.qmp.calls());
    assert!(c.qmp.nodes().is_empty(), "{:?}", c.qmp.calls());
    let cancel = c.qmp.position("migrate_cancel").expect("cancel");
    let del = c.qmp.position("blockdev-del").expect("node removed");
    assert!(cancel < del, "{:?}", c.qmp.calls());
}

#[test]
fn failures_around_the_mirror_stop_it_and_keep_the_vm_at_the_source() {
    // After the mirror's round, in the pause, and the destination's check.
    let cases: [fn(&mut Case); 4] = [
        |c| c.opts.fail_after = Some(Phase::Mirror),
        |c| c.opts.fail_after = Some(Phase::Pause),
        |c| c.dest.state().verify_differs = true,
        |c| c.opts.fail_after = Some(Phase::MemoryRound),
    ];
    for (n, setup) in cases.iter().enumerate() {
        let mut c = mirror_case();
        setup(&mut c);
        let ran = c.run();
        assert_rolled_back(&c, &ran);
        let calls = c.qmp.calls();
        if n == 0 || n == 3 {
            assert_mirror_gone(&c);
        } else {
            // Completed in the pause already: its node is removed.
            assert!(c.qmp.jobs().is_empty(), "case {n}: {calls:?}");
            assert!(c.qmp.nodes().is_empty(), "case {n}: {calls:?}");
        }
    }
    // The destination cannot open its export: nothing was added here.
    let mut c = mirror_case();
    c.dest.state().fail = Some("open_mirror");
    let ran = c.run();
    assert_rolled_back(&c, &ran);
    assert!(!c.qmp.called("blockdev-add"), "{:?}", c.qmp.calls());
    assert!(!c.qmp.called("blockdev-del"), "{:?}", c.qmp.calls());
    // QEMU refuses the mirror: its node is removed again.
    let mut c = mirror_case();
    c.qmp.fail("blockdev-mirror");
    let ran = c.run();
    assert_rolled_back(&c, &ran);
    assert!(!c.qmp.called("block-job-cancel"), "{:?}", c.qmp.calls());
    assert!(c.qmp.nodes().is_empty(), "{:?}", c.qmp.calls());
}
