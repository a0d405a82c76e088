//! Who may do what. Authentication gives each request a [`Caller`] (an
//! edge named by its certificate, the operator, or anyone when the API runs
//! open); handlers then check it: an edge acts only as itself, the policy,
//! hints, other edges' plans and deregistration are the operator's.

/// A caller refused by the access rules (the HTTP layer maps it to 403).
#[derive(Debug, thiserror::Error)]
#[error("forbidden: {0}")]
pub struct Forbidden(pub String);

/// Who is on the other end of a connection, as the transport proved it
/// (`None`: plain HTTP, or TLS without a client certificate).
#[derive(Debug, Clone, Default)]
pub struct Peer(pub Option<Caller>);

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// `--insecure-no-auth`: every request may do everything.
    Anyone,
    /// The operator credential (certificate or bearer token).
    Operator,
    /// An edge, by the name in its certificate.
    Edge(String),
}

impl Caller {
    /// For routes that change or read one edge's own state (register,
    /// inventory, delta, paths, orders): only that edge.
    pub fn act_as_edge(&self, id: &str) -> Result<(), Forbidden> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::Edge(name) if name == id => Ok(()),
            Caller::Edge(name) => Err(Forbidden(format!(
                "edge {name:?} may act only as itself, not as {id:?}"
            ))),
            Caller::Operator => Err(Forbidden(format!(
                "only edge {id:?} itself (with its certificate) may do this"
            ))),
        }
    }

    /// For routes the operator may also use on an edge's behalf (pins, plans).
    pub fn edge_or_operator(&self, id: &str) -> Result<(), Forbidden> {
        match self {
            Caller::Operator => Ok(()),
            other => other.act_as_edge(id),
        }
    }

    /// For the fleet-wide routes: policy, hints, deregistration.
    pub fn operator(&self) -> Result<(), Forbidden> {
        match self {
            Caller::Anyone | Caller::Operator => Ok(()),
            Caller::Edge(name) => Err(Forbidden(format!(
                "edge {name:?} may not do this: it needs the operator credential"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_act_only_as_themselves() {
        let e1 = Caller::Edge("e1".into());
        assert!(e1.act_as_edge("e1").is_ok());
        assert!(e1.act_as_edge("e2").is_err());
        assert!(e1.edge_or_operator("e2").is_err());
        assert!(e1.operator().is_err());
        assert!(Caller::Operator.act_as_edge("e1").is_err());
        assert!(Caller::Operator.edge_or_operator("e1").is_ok());
        assert!(Caller::Operator.operator().is_ok());
        assert!(Caller::Anyone.act_as_edge("e9").is_ok());
        assert!(Caller::Anyone.operator().is_ok());
    }
}
