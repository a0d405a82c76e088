//! Where each VM runs and the handoffs the coordinator orders: edges report
//! their running VMs (and their migration listener), an operator asks for a
//! handoff, the source edge picks the order up with its next orders poll
//! and reports progress until it is done or failed. Kept in memory: after a
//! restart the agents' next reports say again where each VM runs.

use std::collections::BTreeMap;

use edgeshift_common::control::{HandoffOrder, HandoffProgress, HandoffState, VmsReport};
use serde::Serialize;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HandoffError {
    #[error("unknown VM {0:?}: no edge reports it running")]
    UnknownVm(String),
    #[error("unknown edge {0:?}: not registered with this coordinator")]
    UnknownEdge(String),
    #[error("edge {0:?} receives no migrations (its agent runs without --migrate-listen)")]
    NotReceiving(String),
    #[error("VM {vm:?} already runs on edge {edge:?}")]
    AlreadyThere { vm: String, edge: String },
    #[error("VM {vm:?} is already moving (handoff {id} to {to:?}, {state:?})")]
    Moving {
        vm: String,
        id: u64,
        to: String,
        state: HandoffState,
    },
    #[error("no handoff of VM {0:?} was ordered")]
    NoHandoff(String),
    #[error("unknown handoff {0} for edge {1:?}")]
    UnknownHandoff(u64, String),
    #[error("handoff {0} is over ({1:?}); its report cannot change")]
    Over(u64, HandoffState),
}

/// One handoff, as `GET /v1/vms/{name}/handoff` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Handoff {
    pub id: u64,
    pub vm: String,
    pub from: String,
    pub to: String,
    pub state: HandoffState,
    pub phase: Option<String>,
    pub bytes: u64,
    pub rounds: u32,
    /// The source's `migrate --json` report, once done.
    pub report: Option<serde_json::Value>,
    pub error: Option<String>,
    pub ordered_ms: u64,
    pub updated_ms: u64,
}

/// How long an ordered handoff waits for its source to take it (the agent
/// polls every 5 s) before it is failed, so a dead edge does not leave its
/// VMs refusing handoffs for ever.
pub const DEFAULT_TAKE_TIMEOUT_MS: u64 = 60_000;

#[derive(Debug)]
pub struct Handoffs {
    /// VM name → the edge that runs it.
    places: BTreeMap<String, String>,
    /// Edge → its migration listener.
    receivers: BTreeMap<String, String>,
    /// The latest handoff of each VM.
    latest: BTreeMap<String, Handoff>,
    next_id: u64,
    take_timeout_ms: u64,
}

impl Default for Handoffs {
    fn default() -> Self {
        Handoffs::new(DEFAULT_TAKE_TIMEOUT_MS)
    }
}

impl Handoffs {
    pub fn new(take_timeout_ms: u64) -> Self {
        Handoffs {
            places: BTreeMap::new(),
            receivers: BTreeMap::new(),
            latest: BTreeMap::new(),
            next_id: 1,
            take_timeout_ms,
        }
    }

    /// The edge running `vm`, as the reports say.
    pub fn place(&self, vm: &str) -> Option<&str> {
        self.places.get(vm).map(String::as_str)
    }

    /// VM → edge, every known VM.
    pub fn places(&self) -> &BTreeMap<String, String> {
        &self.places
    }

    /// Replaces what `edge` runs. A source still listing a VM that a
    /// finished handoff moved away from it (a report sent before its record
    /// changed) does not move the VM back.
    pub fn report_vms(&mut self, edge: &str, report: &VmsReport) {
        match &report.migrate_addr {
            Some(a) => self.receivers.insert(edge.to_string(), a.clone()),
            None => self.receivers.remove(edge),
        };
        self.places
            .retain(|vm, at| at != edge || report.vms.iter().any(|v| v == vm));
        for vm in &report.vms {
            let moved_away = self.latest.get(vm).is_some_and(|h| {
                h.state == HandoffState::Done && h.from == edge && self.places.get(vm) == Some(&h.to)
            });
            if !moved_away {
                self.places.insert(vm.clone(), edge.to_string());
            }
        }
    }

    /// An edge left: its VMs and listener are forgotten, its handoffs fail.
    pub fn forget_edge(&mut self, edge: &str, now_ms: u64) {
        self.receivers.remove(edge);
        self.places.retain(|_, at| at != edge);
        for h in self.latest.values_mut() {
            if !h.state.is_over() && (h.from == edge || h.to == edge) {
                h.state = HandoffState::Failed;
                h.error = Some(format!("edge {edge:?} was deregistered"));
                h.updated_ms = now_ms;
            }
        }
    }

    /// Orders `vm` to move to `to`; `to_registered` says whether the ledger
    /// knows that edge.
    pub fn order(
        &mut self,
        vm: &str,
        to: &str,
        to_registered: bool,
        now_ms: u64,
    ) -> Result<Handoff, HandoffError> {
        self.expire(now_ms);
        if let Some(h) = self.latest.get(vm).filter(|h| !h.state.is_over()) {
            return Err(HandoffError::Moving {
                vm: vm.to_string(),
                id: h.id,
                to: h.to.clone(),
                state: h.state,
            });
        }
        let from = self
            .places
            .get(vm)
            .ok_or_else(|| HandoffError::UnknownVm(vm.to_string()))?
            .clone();
        if !to_registered {
            return Err(HandoffError::UnknownEdge(to.to_string()));
        }
        if from == to {
            return Err(HandoffError::AlreadyThere {
                vm: vm.to_string(),
                edge: from,
            });
        }
        if !self.receivers.contains_key(to) {
            return Err(HandoffError::NotReceiving(to.to_string()));
        }
        let h = Handoff {
            id: self.next_id,
            vm: vm.to_string(),
            from,
            to: to.to_string(),
            state: HandoffState::Ordered,
            phase: None,
            bytes: 0,
            rounds: 0,
            report: None,
            error: None,
            ordered_ms: now_ms,
            updated_ms: now_ms,
        };
        self.next_id += 1;
        self.latest.insert(vm.to_string(), h.clone());
        Ok(h)
    }

    /// The latest handoff of `vm`.
    pub fn get(&self, vm: &str) -> Result<&Handoff, HandoffError> {
        self.latest
            .get(vm)
            .ok_or_else(|| HandoffError::NoHandoff(vm.to_string()))
    }

    /// Fails ordered handoffs their source did not take in time.
    fn expire(&mut self, now_ms: u64) {
        for h in self.latest.values_mut() {
            if h.state == HandoffState::Ordered && now_ms.saturating_sub(h.ordered_ms) > self.take_timeout_ms
            {
                h.state = HandoffState::Failed;
                h.error = Some(format!(
                    "source edge {:?} did not take the order within {} s",
                    h.from,
                    self.take_timeout_ms / 1000
                ));
                h.updated_ms = now_ms;
                metrics::counter!("coordinator_handoffs_total", "outcome" => "not-taken").increment(1);
            }
        }
    }

    /// The handoffs `edge` is to start (those it has not acknowledged).
    pub fn orders_for(&mut self, edge: &str, now_ms: u64) -> Vec<HandoffOrder> {
        self.expire(now_ms);
        self.latest
            .values()
            .filter(|h| h.from == edge && h.state == HandoffState::Ordered)
            .filter_map(|h| {
                Some(HandoffOrder {
                    id: h.id,
                    vm: h.vm.clone(),
                    to: h.to.clone(),
                    to_migrate_addr: self.receivers.get(&h.to)?.clone(),
                })
            })
            .collect()
    }

    /// The source's progress on handoff `id`; a finished handoff moves the
    /// VM to its destination at once.
    pub fn progress(
        &mut self,
        edge: &str,
        id: u64,
        p: HandoffProgress,
        now_ms: u64,
    ) -> Result<&Handoff, HandoffError> {
        let h = self
            .latest
            .values_mut()
            .find(|h| h.id == id && h.from == edge)
            .ok_or_else(|| HandoffError::UnknownHandoff(id, edge.to_string()))?;
        if h.state.is_over() {
            return Err(HandoffError::Over(id, h.state));
        }
        h.state = if p.state == HandoffState::Ordered {
            HandoffState::Running
        } else {
            p.state
        };
        h.phase = p.phase.or(h.phase.take());
        h.bytes = p.bytes.max(h.bytes);
        h.rounds = p.rounds.max(h.rounds);
        h.report = p.report.or(h.report.take());
        h.error = p.error;
        h.updated_ms = now_ms;
        match h.state {
            HandoffState::Done => {
                self.places.insert(h.vm.clone(), h.to.clone());
                metrics::counter!("coordinator_handoffs_total", "outcome" => "done").increment(1);
            }
            HandoffState::Failed => {
                metrics::counter!("coordinator_handoffs_total", "outcome" => "failed").increment(1);
            }
            _ => {}
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(vms: &[&str], addr: Option<&str>) -> VmsReport {
        VmsReport {
            vms: vms.iter().map(|s| s.to_string()).collect(),
            migrate_addr: addr.map(str::to_string),
        }
    }

    fn progress(state: HandoffState) -> HandoffProgress {
        HandoffProgress {
            state,
            phase: Some("precopy".into()),
            bytes: 10,
            rounds: 1,
            report: None,
            error: None,
        }
    }

    fn two_edges() -> Handoffs {
        let mut h = Handoffs::default();
        h.report_vms("e1", &report(&["vm1"], Some("10.0.0.1:7080")));
        h.report_vms("e2", &report(&[], Some("10.0.0.2:7080")));
        h
    }

    #[test]
    fn an_order_reaches_the_source_once_and_moves_the_vm_when_done() {
        let mut h = two_edges();
        let o = h.order("vm1", "e2", true, 0).expect("order");
        assert_eq!((o.from.as_str(), o.state), ("e1", HandoffState::Ordered));
        assert!(h.orders_for("e2", 1).is_empty());
        let orders = h.orders_for("e1", 1);
        assert_eq!(orders.len(), 1);
        assert_eq!(orders[0].to_migrate_addr, "10.0.0.2:7080");
        h.progress("e1", o.id, progress(HandoffState::Running), 2)
            .expect("running");
        assert!(
            h.orders_for("e1", 3).is_empty(),
            "taken orders are not sent again"
        );
        let mut done = progress(HandoffState::Done);
        done.report = Some(serde_json::json!({"vm": "vm1", "downtime_ms": 700}));
        h.progress("e1", o.id, done, 4).expect("done");
        assert_eq!(h.place("vm1"), Some("e2"));
        let got = h.get("vm1").expect("handoff");
        assert_eq!(got.state, HandoffState::Done);
        assert_eq!(
            got.report.as_ref().and_then(|r| r["downtime_ms"].as_u64()),
            Some(700)
        );
        // The source's report from before its record changed does not move it back.
        h.report_vms("e1", &report(&["vm1"], Some("10.0.0.1:7080")));
        assert_eq!(h.place("vm1"), Some("e2"));
        assert!(matches!(
            h.progress("e1", o.id, progress(HandoffState::Failed), 5),
            Err(HandoffError::Over(..))
        ));
    }

    #[test]
    fn a_vm_already_moving_is_refused() {
        let mut h = two_edges();
        let o = h.order("vm1", "e2", true, 0).expect("order");
        let e = h.order("vm1", "e2", true, 1).expect_err("second order");
        assert!(matches!(e, HandoffError::Moving { id, .. } if id == o.id), "{e}");
        h.progress("e1", o.id, progress(HandoffState::Failed), 2)
            .expect("failed");
        assert_eq!(
            h.place("vm1"),
            Some("e1"),
            "a failed handoff leaves the VM at its source"
        );
        h.order("vm1", "e2", true, 3)
            .expect("a new order after the failure");
    }

    #[test]
    fn unknown_vms_and_edges_and_non_receivers_are_refused() {
        let mut h = two_edges();
        assert_eq!(
            h.order("nope", "e2", true, 0),
            Err(HandoffError::UnknownVm("nope".into()))
        );
        assert_eq!(
            h.order("vm1", "e9", false, 0),
            Err(HandoffError::UnknownEdge("e9".into()))
        );
        assert!(matches!(
            h.order("vm1", "e1", true, 0),
            Err(HandoffError::AlreadyThere { .. })
        ));
        h.report_vms("e3", &report(&[], None));
        assert_eq!(
            h.order("vm1", "e3", true, 0),
            Err(HandoffError::NotReceiving("e3".into()))
        );
        assert!(matches!(h.get("vm2"), Err(HandoffError::NoHandoff(_))));
    }

    #[test]
    fn an_order_not_taken_in_time_fails() {
        let mut h = Handoffs::new(1000);
        h.report_vms("e1", &report(&["vm1"], None));
        h.report_vms("e2", &report(&[], Some("a:1")));
        h.order("vm1", "e2", true, 0).expect("order");
        assert!(h.orders_for("e1", 2000).is_empty());
        let got = h.get("vm1").expect("handoff");
        assert_eq!(got.state, HandoffState::Failed);
        assert!(got.error.as_deref().unwrap_or("").contains("did not take"));
    }

    #[test]
    fn only_the_source_reports_progress_and_a_stopped_vm_is_forgotten() {
        let mut h = two_edges();
        let o = h.order("vm1", "e2", true, 0).expect("order");
        assert!(matches!(
            h.progress("e2", o.id, progress(HandoffState::Done), 1),
            Err(HandoffError::UnknownHandoff(..))
        ));
        h.forget_edge("e2", 2);
        assert_eq!(h.get("vm1").expect("handoff").state, HandoffState::Failed);
        h.report_vms("e1", &report(&[], None));
        assert_eq!(h.place("vm1"), None);
    }
}
