//! Hints from predictions: each move a VM makes teaches the mobility model,
//! and the VM's hint follows the model's next edge for it.

use edgeshift_common::ManifestId;
use serde::{Deserialize, Serialize};

use super::{Coordinator, ServiceError};
use crate::mobility::Prediction;

/// How the predictions fared: a move to where the VM's last prediction
/// pointed is right, any other move of a VM with a prediction wrong.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct PredictionStats {
    pub moves: u64,
    pub predicted: u64,
    pub right: u64,
}

impl Coordinator {
    /// `vm` (running `manifest`, if known) moved `from → to`: the model
    /// learns it, the VM's previous predicted hint is withdrawn, and a hint
    /// for its predicted next edge is given (prefetch then fills that
    /// edge's room under its high watermark, as for any hint).
    pub fn learn_move(
        &mut self,
        vm: &str,
        manifest: Option<&ManifestId>,
        from: &str,
        to: &str,
    ) -> Result<Option<Prediction>, ServiceError> {
        self.predictions.moves += 1;
        if let Some(p) = self.mobility.predict(vm) {
            self.predictions.predicted += 1;
            let outcome = if p.edge == to { "right" } else { "wrong" };
            if p.edge == to {
                self.predictions.right += 1;
            }
            metrics::counter!("coordinator_predictions_total", "outcome" => outcome).increment(1);
        }
        self.mobility.record(vm, from, to);
        if let Some((edge, m, owned)) = self.auto_hints.remove(vm) {
            if owned {
                self.drop_auto_hint(&edge, &m)?;
            }
        }
        let Some(next) = self.mobility.predict(vm) else {
            return Ok(None);
        };
        let Some(m) = manifest.filter(|m| self.ledger.catalogue.contains_key(*m)) else {
            return Ok(Some(next));
        };
        if self.ledger.edge_ix(&next.edge).is_err() {
            return Ok(Some(next));
        }
        let key = (next.edge.clone(), *m);
        let refs = self.auto_hint_refs.get(&key).copied().unwrap_or(0);
        let owned = refs > 0 || !self.hints.contains_key(&key);
        if owned {
            if refs == 0 {
                self.hint(m, &next.edge)?;
            }
            self.auto_hint_refs.insert(key, refs + 1);
        }
        self.auto_hints
            .insert(vm.to_string(), (next.edge.clone(), *m, owned));
        Ok(Some(next))
    }

    fn drop_auto_hint(&mut self, edge: &str, m: &ManifestId) -> Result<(), ServiceError> {
        let key = (edge.to_string(), *m);
        match self.auto_hint_refs.get_mut(&key) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.auto_hint_refs.remove(&key);
                match self.delete_hint(m, edge) {
                    // Fulfilled (pinned there) or withdrawn by the operator.
                    Ok(()) | Err(ServiceError::UnknownHint(..)) => {}
                    Err(e) => return Err(e),
                }
            }
            None => {}
        }
        Ok(())
    }
}
