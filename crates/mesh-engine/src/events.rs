//! `GET /events`: the cluster's changes as Docker's event stream (one JSON message per
//! change, `scope: "swarm"`): services, nodes, networks, secrets and configs created, updated
//! and removed, as the managers derive them from the store (mesh-manager's `history`). With
//! `since`, the kept ones made since then come first; the stream then asks every
//! [`mesh_api::events::EVERY`] for those after the last one sent. What to send and when to
//! stop is [`Follow`]'s, as for `mesh events`. Events lost to it (more made between two
//! reads than the managers keep) are named in a warning in the daemon's log, and the stream
//! goes on.

use std::sync::Arc;

use bytes::Bytes;
use mesh_api::events::{EventBatch, Follow};
use mesh_api::human::now_ns;

use crate::query::Filters;

/// Streams `first`'s events and those after it matching `filters`, until `until` (ns) or
/// the client goes away.
pub fn stream(
    backend: Arc<dyn crate::Backend>,
    first: EventBatch,
    filters: Filters,
    until: Option<u64>,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    tokio::spawn(async move {
        let mut follow = Follow::new(filters, until);
        let mut batch = Some(first);
        loop {
            let taken = batch.map(|b| follow.take(b)).unwrap_or_default();
            if let Some(m) = taken.missed {
                // Docker's stream has no message for it: the daemon's log tells.
                tracing::warn!("GET /events: {m}");
            }
            for ev in taken.events {
                let mut line = serde_json::to_vec(&ev.docker_json()).unwrap_or_default();
                line.push(b'\n');
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
            let Some(wait) = follow.wait(now_ns()) else {
                return;
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = tx.closed() => return,
            }
            let req = mesh_api::Request::Events {
                after: follow.after(),
                since_ns: None,
            };
            // No answer (an election): ask again from the same place.
            batch = match backend.call(req).await {
                Ok(v) => serde_json::from_value::<EventBatch>(v).ok(),
                Err(_) => None,
            };
        }
    });
}
