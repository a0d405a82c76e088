//! Where one control connection's incoming migration stands, and which
//! command may come next. Pure: no I/O, so the order rules are tested alone.
//!
//! ```text
//! Idle --Prepare--> Prepared --StartIncoming--> IncomingStarting
//!   --AwaitIncoming--> IncomingStarted --Verify(ok)--> Verified --Finish--> Finished
//! ```
//! `Pull` rounds come in `Prepared`, `IncomingStarting` and `IncomingStarted`
//! (the disk moves while QEMU starts, and the last round in the pause);
//! `OpenMirror` (the disk mirror's export) and `AwaitImage` are taken in the
//! same states and leave them as they are; `Verify` may also follow `IncomingStarting` directly (its QEMU is then
//! waited for at `Finish`). `Abort` is taken in every state and ends in
//! `Aborted`; `Finished` and `Aborted` take nothing else.

use crate::migrate::proto::Request;

/// The receive state of one control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveState {
    /// Authenticated; nothing prepared yet.
    Idle,
    /// The image exists; pull rounds may come. `pulls` counts them so far.
    Prepared { pulls: u32 },
    /// The destination QEMU is being started in the background.
    IncomingStarting { pulls: u32 },
    /// The destination QEMU listens for the memory stream.
    IncomingStarted { pulls: u32 },
    /// The image equals the source's final manifest.
    Verified,
    /// The VM runs here and is this edge's own.
    Finished,
    /// The incoming VM was dropped on the source's word.
    Aborted,
}

/// A control command, without its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Prepare,
    Pull,
    StartIncoming,
    AwaitIncoming,
    Verify,
    Finish,
    Abort,
    OpenMirror,
    AwaitImage,
}

impl Command {
    pub fn of(req: &Request) -> Self {
        match req {
            Request::Prepare { .. } => Command::Prepare,
            Request::Pull { .. } => Command::Pull,
            Request::StartIncoming { .. } => Command::StartIncoming,
            Request::AwaitIncoming => Command::AwaitIncoming,
            Request::Verify { .. } => Command::Verify,
            Request::Finish => Command::Finish,
            Request::Abort => Command::Abort,
            Request::OpenMirror => Command::OpenMirror,
            Request::AwaitImage => Command::AwaitImage,
        }
    }
}

/// A command the state does not take (`MigrateError::OutOfOrder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfOrder {
    pub command: Command,
    pub state: ReceiveState,
}

impl std::fmt::Display for OutOfOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} out of order: this migration is {}",
            self.command, self.state
        )
    }
}

impl std::fmt::Display for ReceiveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, pulls) = match *self {
            ReceiveState::Idle => ("not prepared yet (Prepare first)", None),
            ReceiveState::Prepared { pulls } => ("prepared", Some(pulls)),
            ReceiveState::IncomingStarting { pulls } => ("starting its QEMU", Some(pulls)),
            ReceiveState::IncomingStarted { pulls } => ("waiting for memory", Some(pulls)),
            ReceiveState::Verified => ("verified", None),
            ReceiveState::Finished => ("finished", None),
            ReceiveState::Aborted => ("aborted", None),
        };
        match pulls {
            Some(n) => write!(f, "{what}, after {n} pull rounds"),
            None => f.write_str(what),
        }
    }
}

impl std::error::Error for OutOfOrder {}

impl ReceiveState {
    /// The state once `command` has succeeded here, or why it may not come
    /// now. A command that fails leaves the state as it was; so does a
    /// `Verify` that finds the disk differs (the source aborts then).
    pub fn advance(self, command: Command) -> Result<ReceiveState, OutOfOrder> {
        use Command as C;
        use ReceiveState as S;
        let next = match (self, command) {
            (_, C::Abort) => Some(S::Aborted),
            (S::Idle, C::Prepare) => Some(S::Prepared { pulls: 0 }),
            (S::Prepared { pulls }, C::Pull) => Some(S::Prepared { pulls: pulls + 1 }),
            (S::IncomingStarting { pulls }, C::Pull) => Some(S::IncomingStarting { pulls: pulls + 1 }),
            (S::IncomingStarted { pulls }, C::Pull) => Some(S::IncomingStarted { pulls: pulls + 1 }),
            // The mirror's export opens beside the pulls; it does not move
            // the state.
            (
                s @ (S::Prepared { .. } | S::IncomingStarting { .. } | S::IncomingStarted { .. }),
                C::OpenMirror | C::AwaitImage,
            ) => Some(s),
            (S::Prepared { pulls }, C::StartIncoming) => Some(S::IncomingStarting { pulls }),
            (S::IncomingStarting { pulls } | S::IncomingStarted { pulls }, C::AwaitIncoming) => {
                Some(S::IncomingStarted { pulls })
            }
            (S::IncomingStarting { .. } | S::IncomingStarted { .. }, C::Verify) => Some(S::Verified),
            (S::Verified, C::Finish) => Some(S::Finished),
            _ => None,
        };
        next.ok_or(OutOfOrder { command, state: self })
    }

    /// Whether an incoming VM exists in this state (it is torn down or kept
    /// by then otherwise).
    pub fn holds_vm(self) -> bool {
        !matches!(
            self,
            ReceiveState::Idle | ReceiveState::Finished | ReceiveState::Aborted
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Command as C;
    use ReceiveState as S;

    fn run(commands: &[Command]) -> Result<ReceiveState, OutOfOrder> {
        commands.iter().try_fold(S::Idle, |s, &c| s.advance(c))
    }

    #[test]
    fn the_sources_sequences_are_taken() {
        // After-disk and with-disk memory: QEMU starts right after Prepare;
        // the last round comes in the pause, after AwaitIncoming.
        let seq = [
            C::Prepare,
            C::StartIncoming,
            C::Pull,
            C::Pull,
            C::AwaitIncoming,
            C::Pull,
            C::Verify,
            C::Finish,
        ];
        assert_eq!(run(&seq), Ok(S::Finished));
        assert_eq!(
            run(&seq[..6]),
            Ok(S::IncomingStarted { pulls: 3 }),
            "pull rounds are counted"
        );
        // Pulls before QEMU starts, and Verify before AwaitIncoming.
        let early = [C::Prepare, C::Pull, C::StartIncoming, C::Verify, C::Finish];
        assert_eq!(run(&early), Ok(S::Finished));
    }

    #[test]
    fn abort_is_taken_anywhere_and_ends_it() {
        for prefix in 0..=7 {
            let seq = [
                C::Prepare,
                C::StartIncoming,
                C::Pull,
                C::AwaitIncoming,
                C::Pull,
                C::Verify,
                C::Finish,
            ];
            let s = run(&seq[..prefix.min(seq.len())]).expect("in order");
            assert_eq!(s.advance(C::Abort), Ok(S::Aborted));
        }
        assert_eq!(
            S::Aborted.advance(C::Prepare),
            Err(OutOfOrder {
                command: C::Prepare,
                state: S::Aborted
            })
        );
    }

    #[test]
    fn commands_out_of_order_are_refused_with_the_state() {
        let refused = [
            (S::Idle, C::Pull),
            (S::Idle, C::StartIncoming),
            (S::Idle, C::AwaitIncoming),
            (S::Idle, C::Verify),
            (S::Idle, C::Finish),
            (S::Prepared { pulls: 0 }, C::Prepare),
            (S::Prepared { pulls: 2 }, C::AwaitIncoming),
            (S::Prepared { pulls: 2 }, C::Verify),
            (S::Prepared { pulls: 2 }, C::Finish),
            (S::IncomingStarting { pulls: 0 }, C::StartIncoming),
            (S::IncomingStarted { pulls: 1 }, C::Finish),
            (S::Verified, C::Pull),
            (S::Idle, C::OpenMirror),
            (S::Verified, C::OpenMirror),
            (S::Idle, C::AwaitImage),
            (S::Verified, C::AwaitImage),
            (S::Verified, C::Verify),
            (S::Finished, C::Prepare),
            (S::Finished, C::Pull),
        ];
        for (state, command) in refused {
            let e = state.advance(command).expect_err("out of order");
            assert_eq!(e, OutOfOrder { command, state });
        }
        let msg = S::Idle.advance(C::Pull).expect_err("refused").to_string();
        assert!(
            msg.contains("Pull out of order") && msg.contains("Prepare first"),
            "{msg}"
        );
        let msg = S::Prepared { pulls: 2 }
            .advance(C::Finish)
            .expect_err("refused")
            .to_string();
        assert!(msg.contains("after 2 pull rounds"), "{msg}");
    }

    #[test]
    fn only_live_states_hold_a_vm() {
        assert!(!S::Idle.holds_vm());
        assert!(S::Prepared { pulls: 0 }.holds_vm());
        assert!(S::Verified.holds_vm());
        assert!(!S::Finished.holds_vm());
        assert!(!S::Aborted.holds_vm());
    }
}
