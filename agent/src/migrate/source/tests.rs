//! The phases driven end to end against a fake QEMU, destination and disk:
//! when the pre-copy rounds stop, when the disk-write throttle engages, and
//! what a failure in each phase leaves behind.

// A list of one range is one batch of guest writes, not a list of numbers.
#![allow(clippy::single_range_in_vec_init)]

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use edgeshift_common::Manifest;

use super::control::Destination;
use super::fakes::{boot_manifest, FakeDestination, FakeDisk, CHUNK, INCOMING_URI};
use super::memory::{hold_memory_back, MemoryHold};
use super::session::Session;
use super::{DiskHandoff, MigrateOptions, Outcome};
use crate::migrate::report::{ChangedSinceBoot, Phase, ThrottleReport};
use crate::migrate::temperature::Ordering;
use crate::migrate::MigrateError;
use crate::transfer::{ClusterKey, Trust};
use crate::vm::qemu::AccelChoice;
use crate::vm::qmp::fake::{FakeQmp, FAKE_QDEV};
use crate::vm::qmp::MigrationRam;
use crate::vm::{MemoryTransport, Qmp, VmSpec};

pub(super) const SOURCE: &str = "10.0.0.1:7000";
/// Seconds a chunk takes over the source's path: fast, the 1 s budget
/// holds 1000 chunks; slow, 10.
pub(super) const FAST: f64 = 0.001;
const SLOW: f64 = 0.1;

pub(super) fn opts() -> MigrateOptions {
    MigrateOptions {
        name: "vm1".into(),
        state_dir: "/nonexistent".into(),
        to: "10.0.0.2:7001".into(),
        source_addr: SOURCE.into(),
        peers: Vec::new(),
        trust: Trust::InsecurePlaintext {
            key: ClusterKey::from_bytes([1; 32]),
            id: "edge-a".into(),
        },
        id: "edge-a".into(),
        ordering: Ordering::ColdFirst,
        max_rounds: 5,
        converge_chunks: 4,
        downtime_limit_ms: 300,
        sample_interval: Duration::ZERO,
        fail_after: None,
        coordinator: None,
        memory: MemoryTransport::Plain,
        max_downtime: Duration::from_secs(1),
        memory_max_bps: None,
        memory_with_disk: false,
        use_boot_log: false,
        deltas: true,
        disk_handoff: DiskHandoff::Pause,
    }
}

fn spec() -> VmSpec {
    VmSpec {
        name: "vm1".into(),
        memory_mib: 256,
        cpus: 1,
        accel: AccelChoice::Tcg,
        kernel: None,
        initrd: None,
        append: None,
        net: None,
    }
}

/// QEMU's migration as it goes when nothing fails: active, the pause, done.
fn qemu() -> FakeQmp {
    let mut q = FakeQmp::running();
    q.script_migration(
        &["active", "pre-switchover", "completed"],
        MigrationRam {
            transferred: 5000,
            total: 8000,
            ..Default::default()
        },
    );
    q
}

/// One migration of a 200-chunk disk the guest writes as scripted (the
/// first batch: what changed since boot, seen by the slice beside round 0;
/// then one batch per look at the disk).
pub(super) struct Case {
    pub(super) opts: MigrateOptions,
    pub(super) qmp: FakeQmp,
    pub(super) dest: FakeDestination,
    pub(super) disk: FakeDisk,
    pub(super) boot: Manifest,
}

/// What a run left.
pub(super) struct Ran {
    pub(super) result: Result<Outcome, MigrateError>,
    pub(super) throttle: ThrottleReport,
    pub(super) phases: Vec<Phase>,
    pub(super) changed_since_boot_from: ChangedSinceBoot,
    /// Progress messages, in order.
    pub(super) said: Vec<String>,
}

impl Ran {
    /// The later pre-copy rounds, as announced.
    fn later_rounds(&self) -> Vec<&str> {
        self.said
            .iter()
            .filter(|m| m.contains("hot wait"))
            .map(String::as_str)
            .collect()
    }
}

impl Case {
    pub(super) fn new(secs_per_chunk: f64, writes: &[std::ops::Range<u32>]) -> Self {
        let boot = boot_manifest(200);
        Case {
            opts: opts(),
            qmp: qemu(),
            dest: FakeDestination::new(secs_per_chunk),
            disk: FakeDisk::new(&boot, writes),
            boot,
        }
    }

    /// Drives the migration; on failure rolls back, as `migrate` does.
    pub(super) fn run(&mut self) -> Ran {
        let said = Rc::new(RefCell::new(Vec::new()));
        let log = said.clone();
        let progress = move |_: Phase, msg: &str| log.borrow_mut().push(msg.to_string());
        let mut s = Session::new(self.opts.clone(), &self.boot, &progress);
        let dest = self.dest.clone();
        let connect = move || Ok(Box::new(dest) as Box<dyn Destination>);
        let result = s.drive(&mut self.qmp, &self.disk, &spec(), &self.boot, connect);
        if result.is_err() {
            s.rollback(&mut self.qmp);
        }
        let ran = Ran {
            result,
            throttle: s.throttle.report.clone(),
            phases: s.phases.iter().map(|p| p.phase).collect(),
            changed_since_boot_from: s.changed_since_boot_from,
            said: Vec::new(),
        };
        drop(s);
        let said = said.borrow().clone();
        Ran { said, ..ran }
    }

    /// Chunks each pull asked for, in order.
    pub(super) fn pulls(&self) -> Vec<usize> {
        self.dest.state().pulls.iter().map(Vec::len).collect()
    }

    pub(super) fn requests(&self) -> Vec<&'static str> {
        self.dest.state().requests.clone()
    }
}

#[test]
fn a_migration_issues_the_qmp_commands_in_order_and_reports_what_it_did() {
    let mut c = Case::new(FAST, &[0..20]);
    let ran = c.run();
    let out = ran.result.expect("migration");
    assert_eq!(
        c.qmp.calls(),
        [
            "set-memory-transport Plain",
            "migrate-set-parameters avail-switchover-bandwidth=0",
            "migrate-set-capabilities pause-before-switchover=true events=true",
            "migrate-set-parameters downtime-limit=300 max-bandwidth=1073741824",
            &format!("migrate {INCOMING_URI}"),
            "query-migrate",
            "query-migrate",
            "query-status",
            "migrate-continue pre-switchover",
            "query-migrate",
        ]
    );
    assert_eq!(
        c.requests(),
        [
            "prepare",
            "start_incoming",
            "pull",
            "pull",
            "await_incoming",
            "pull",
            "verify",
            "finish"
        ]
    );
    // Round 0 (the boot image), round 1 (what changed since boot), the pause.
    assert_eq!(c.pulls(), [200, 20, 0]);
    assert_eq!(c.disk.flushes(), 1, "the disk is flushed in the pause");
    assert_eq!(out.downtime_ms, 42);
    assert_eq!(out.memory_bytes, 5000);
    assert_eq!(out.missing.chunks, 200);
    assert_eq!(ran.changed_since_boot_from, ChangedSinceBoot::Slice);
    assert_eq!(
        ran.phases,
        [
            Phase::Plan,
            Phase::Incoming,
            Phase::Precopy,
            Phase::Memory,
            Phase::Pause
        ]
    );
    assert!(!ran.throttle.applied);
}

#[test]
fn precopy_stops_when_a_round_shrinks_by_less_than_a_fifth() {
    // Rounds of 50, then 45: another round would mostly send the same again.
    let mut c = Case::new(FAST, &[0..20, 100..150, 150..195]);
    let ran = c.run();
    ran.result.as_ref().expect("migration");
    assert_eq!(ran.later_rounds(), ["round 1: 50 chunks (0 hot wait)"]);
    // The 45 go at memory's first look (more than --converge-chunks).
    assert_eq!(c.pulls(), [200, 20, 50, 45, 0]);
}

#[test]
fn precopy_stops_when_few_enough_are_left_for_the_pause() {
    let mut c = Case::new(FAST, &[0..20, 100..150, 150..153]);
    let ran = c.run();
    ran.result.as_ref().expect("migration");
    assert_eq!(ran.later_rounds(), ["round 1: 50 chunks (0 hot wait)"]);
    // 3 <= --converge-chunks: not sent at memory's first look either; the pause sends them.
    assert_eq!(c.pulls(), [200, 20, 50, 3]);
}

#[test]
fn precopy_stops_at_max_rounds() {
    // Shrinking by a fifth each time: only --max-rounds stops them.
    let writes = [0..20, 100..150, 150..190, 20..52];
    let mut c = Case::new(FAST, &writes);
    c.opts.max_rounds = 2;
    let ran = c.run();
    ran.result.as_ref().expect("migration");
    assert_eq!(
        ran.later_rounds(),
        [
            "round 1: 50 chunks (0 hot wait)",
            "round 2: 40 chunks (0 hot wait)"
        ]
    );
    assert_eq!(c.pulls(), [200, 20, 50, 40, 32, 0]);

    let mut c = Case::new(FAST, &writes);
    c.opts.max_rounds = 0;
    let ran = c.run();
    ran.result.as_ref().expect("migration");
    assert!(ran.later_rounds().is_empty(), "{:?}", ran.said);
    assert_eq!(
        c.disk.writes_left(),
        1,
        "one look while memory moves, one in the pause"
    );
    assert_eq!(c.pulls(), [200, 20, 50, 40]);
}

#[test]
fn what_changed_since_boot_goes_in_round_one_only_past_converge_chunks() {
    let mut c = Case::new(FAST, &[0..3]);
    c.run().result.expect("migration");
    assert_eq!(c.pulls(), [200, 3], "no round 1: the pause sends the 3");
}

#[test]
fn throttle_engages_when_the_pending_chunks_overrun_the_pause_budget() {
    // 10 chunks a second over the source's path: the 1 s budget holds 10.
    // At memory's first look 30 chunks are pending: 3 s.
    let mut c = Case::new(SLOW, &[0..20, 100..130]);
    c.opts.max_rounds = 0;
    let ran = c.run();
    ran.result.as_ref().expect("migration");
    let bps = 10 * CHUNK;
    assert!(c.qmp.called("query-block disk0"));
    assert_eq!(
        c.qmp.calls_of("block_set_io_throttle"),
        [format!(
            "block_set_io_throttle {FAKE_QDEV} bps_wr={bps} iops_wr=10"
        )]
    );
    assert!(ran.throttle.applied);
    assert_eq!(ran.throttle.steps, 1);
    assert_eq!((ran.throttle.bps_wr, ran.throttle.iops_wr), (bps, 10));
    assert_eq!(ran.throttle.pending_chunks, 30);
    assert_eq!(ran.throttle.max_downtime_ms, 1000);
    // Throttled, the round beside memory sends what the budget holds; the
    // pause the rest.
    assert_eq!(c.pulls(), [200, 20, 10, 20]);
    // Switched over: the source's QEMU goes away with its throttle.
    assert_eq!(c.qmp.throttle(), (bps, 10));
}

#[test]
fn no_throttle_when_the_pending_chunks_fit_the_budget() {
    let mut c = Case::new(SLOW, &[0..20, 100..108]);
    c.opts.max_rounds = 0;
    let ran = c.run();
    ran.result.as_ref().expect("migration");
    assert!(!ran.throttle.applied);
    assert!(!c.qmp.called("block_set_io_throttle"));
}

/// The source as a rollback must leave it: running, no throttle, the
/// destination told to drop its half.
pub(super) fn assert_rolled_back(c: &Case, ran: &Ran) {
    assert!(ran.result.is_err());
    assert!(c.qmp.is_running(), "{:?}", c.qmp.calls());
    assert_eq!(c.qmp.throttle(), (0, 0));
    assert_eq!(c.requests().last(), Some(&"abort"), "{:?}", c.requests());
    assert!(!c.qmp.called("migrate-continue"));
}

#[test]
fn a_failure_before_memory_leaves_qemu_alone_and_aborts_the_destination() {
    for (fail_after, dest_fails) in [
        (Some(Phase::Plan), None),
        (Some(Phase::Incoming), None),
        (None, Some("pull")),
        (Some(Phase::Precopy), None),
    ] {
        let mut c = Case::new(FAST, &[0..20, 100..150]);
        c.opts.fail_after = fail_after;
        c.dest.state().fail = dest_fails;
        let ran = c.run();
        assert_rolled_back(&c, &ran);
        let calls = c.qmp.calls();
        assert!(
            !c.qmp.called("migrate "),
            "{fail_after:?} {dest_fails:?}: {calls:?}"
        );
        assert!(!c.qmp.called("migrate_cancel"), "nothing to cancel: {calls:?}");
        assert!(!c.qmp.called("cont"), "the VM never stopped: {calls:?}");
    }
    let mut c = Case::new(FAST, &[0..20]);
    c.opts.fail_after = Some(Phase::Plan);
    let ran = c.run();
    assert!(
        matches!(&ran.result, Err(MigrateError::State(m)) if m.contains("Plan")),
        "{:?}",
        ran.result.as_ref().err()
    );
    assert_eq!(c.requests(), ["prepare", "abort"]);
}

#[test]
fn a_failure_while_memory_moves_cancels_it_and_lifts_the_throttle() {
    let mut c = Case::new(SLOW, &[0..20, 100..130]);
    c.opts.max_rounds = 0;
    c.opts.fail_after = Some(Phase::MemoryRound);
    let ran = c.run();
    assert_rolled_back(&c, &ran);
    assert!(
        ran.throttle.applied,
        "the throttle was engaged before the failure"
    );
    let cancel = c.qmp.position("migrate_cancel").expect("migrate_cancel issued");
    let lift = c
        .qmp
        .position(&format!("block_set_io_throttle {FAKE_QDEV} bps_wr=0 iops_wr=0"))
        .expect("throttle lifted");
    assert!(cancel < lift, "{:?}", c.qmp.calls());
    assert!(!c.qmp.called("cont"), "the VM kept running: {:?}", c.qmp.calls());

    // QEMU's own migration failing is rolled back the same way.
    let mut c = Case::new(FAST, &[0..20]);
    c.qmp
        .script_migration(&["active", "failed"], MigrationRam::default());
    let ran = c.run();
    assert!(matches!(ran.result, Err(MigrateError::Memory(_))));
    assert_rolled_back(&c, &ran);
    assert!(c.qmp.called("migrate_cancel"));
}

#[test]
fn a_failure_in_the_pause_resumes_the_source_vm() {
    let cases: [fn(&mut Case); 3] = [
        |c| c.opts.fail_after = Some(Phase::Pause),
        |c| c.dest.state().verify_differs = true,
        |c| c.dest.state().fail = Some("verify"),
    ];
    for (n, setup) in cases.iter().enumerate() {
        let mut c = Case::new(FAST, &[0..20, 100..150, 150..160]);
        setup(&mut c);
        let ran = c.run();
        assert_rolled_back(&c, &ran);
        let calls = c.qmp.calls();
        let cancel = c.qmp.position("migrate_cancel").expect("cancelled");
        let cont = c
            .qmp
            .position("cont")
            .unwrap_or_else(|| panic!("case {n}: not resumed: {calls:?}"));
        assert!(cancel < cont, "case {n}: {calls:?}");
        assert!(
            !c.qmp.called("block_set_io_throttle"),
            "case {n}: no throttle to lift"
        );
    }
    let mut c = Case::new(FAST, &[0..20]);
    c.dest.state().verify_differs = true;
    let ran = c.run();
    assert!(matches!(&ran.result, Err(MigrateError::Verify(d)) if d.contains("differs")));
}

#[test]
fn a_qemu_that_cannot_hold_memory_back_starts_nothing() {
    let boot = boot_manifest(10);
    let progress = |_: Phase, _: &str| {};
    let mut s = Session::new(opts(), &boot, &progress);
    let mut q = FakeQmp::running();
    q.fail("migrate-set-parameters avail-switchover-bandwidth");
    let started = s.start_memory(&mut q, INCOMING_URI, MemoryTransport::Plain, true);
    assert!(!started.expect("no error"), "memory goes after the disk");
    assert_eq!(q.calls().len(), 1, "{:?}", q.calls());
}

#[test]
fn memory_is_held_back_as_its_first_pass_ends_and_reports_converging() {
    let mut q = FakeQmp::running();
    let ram = |remaining| MigrationRam {
        transferred: 100 - remaining,
        remaining,
        total: 100,
        dirty_sync_count: 1,
    };
    for (status, remaining) in [("active", 50), ("active", 10), ("pre-switchover", 0)] {
        q.push_migration(crate::vm::qmp::MigrationInfo {
            status: Some(status.into()),
            ram: Some(ram(remaining)),
            ..Default::default()
        });
    }
    q.migrate(INCOMING_URI).expect("migrate");
    let hold = MemoryHold::default();
    hold_memory_back(&mut q, &hold).expect("watch");
    assert!(hold.converged());
    // Held once, in the last quarter of the first pass.
    assert_eq!(
        q.calls_of("migrate-set-parameters"),
        ["migrate-set-parameters downtime-limit=- max-bandwidth=65536"]
    );
    let held = q.position("migrate-set-parameters").expect("held");
    assert_eq!(
        q.calls()[..held].iter().filter(|c| *c == "query-migrate").count(),
        2
    );
}
