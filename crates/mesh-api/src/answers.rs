//! The answers of the local API's calls that return no object of the store: what `swarm init`,
//! `join`, a create or an update, `exec` answer. The daemon builds them and the CLI and the
//! Engine API read them as these types, so a key cannot drift between the two (the wire is
//! their JSON, as before).

use serde::{Deserialize, Serialize};

use crate::{ApiError, NodeRole, Response};

/// `answer` as a [`Response`]'s value.
pub fn to_response<T: Serialize>(answer: &T) -> Response {
    serde_json::to_value(answer).map_err(ApiError::internal)
}

/// A [`Response`]'s value read as the answer it is.
pub fn from_value<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::internal(format!("unexpected answer: {e}")))
}

/// `swarm init` (and `--force-new-cluster`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwarmInitAnswer {
    pub node_id: String,
    /// The worker join token.
    pub worker_token: String,
    /// The address other nodes join at (`IP:PORT`).
    pub addr: String,
    /// The unlock key, in Docker's form, when autolock is on.
    pub unlock_key: Option<String>,
}

/// `swarm join`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinAnswer {
    pub node_id: String,
    pub role: NodeRole,
}

/// A call whose answer is one line for people (`Node left the swarm.`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageAnswer {
    pub message: String,
}

/// A create, update or remove: the object's ID, and for a service whether a rolling update
/// started and what the daemon warns of (an image it could not pin to a digest).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdAnswer {
    pub id: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollout: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl MessageAnswer {
    pub fn new(message: impl Into<String>) -> MessageAnswer {
        MessageAnswer {
            message: message.into(),
        }
    }
}

impl IdAnswer {
    /// The ID alone.
    pub fn new(id: impl Into<String>) -> IdAnswer {
        IdAnswer {
            id: id.into(),
            ..Default::default()
        }
    }

    /// A service's ID, and whether a rolling update started.
    pub fn rollout(id: impl Into<String>, rollout: bool) -> IdAnswer {
        IdAnswer {
            id: id.into(),
            rollout,
            ..Default::default()
        }
    }
}

/// `exec` in a task.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecAnswer {
    /// The command's exit status.
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// `swarm join-token`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenAnswer {
    pub token: String,
    pub role: NodeRole,
    pub rotated: bool,
    /// Where to join: the address of the node asked (its daemon fills it in; the leader
    /// that made the answer may be another).
    #[serde(default)]
    pub addr: String,
}

/// `swarm ca`: the root the swarm wants (the new one while a rotation goes on) and how many
/// of its nodes have moved to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaAnswer {
    /// The desired root certificate (PEM).
    pub root_pem: String,
    /// `sha256:` and the hex SHA-256 of `root_pem`'s text, as Docker shows it.
    pub root_digest: String,
    /// Certificates are still being moved to the new root.
    pub rotating: bool,
    /// The nodes that take part (every node that has not left).
    pub nodes: u32,
    /// Nodes whose certificate is from the desired root.
    pub tls_rotated: u32,
    /// Nodes that trust the desired root.
    pub trust_rotated: u32,
}

impl CaAnswer {
    /// The rotation is over: every node has a certificate from the desired root and trusts it.
    pub fn converged(&self) -> bool {
        !self.rotating && self.tls_rotated == self.nodes && self.trust_rotated == self.nodes
    }
}

/// `swarm unlock-key`: the key in Docker's form (`None`: autolock is off).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnlockKeyAnswer {
    pub key: Option<String>,
    pub rotated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_keys_stay() {
        let v = serde_json::to_value(IdAnswer {
            id: "abc".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(v, serde_json::json!({ "id": "abc" }));
        let v = serde_json::to_value(IdAnswer {
            id: "abc".into(),
            rollout: true,
            warnings: vec!["w".into()],
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({ "id": "abc", "rollout": true, "warnings": ["w"] })
        );
        let back: IdAnswer = serde_json::from_value(serde_json::json!({ "id": "x" })).unwrap();
        assert!(!back.rollout && back.warnings.is_empty());
        let v = serde_json::to_value(SwarmInitAnswer::default()).unwrap();
        assert_eq!(v["unlock_key"], serde_json::Value::Null);
    }
}
