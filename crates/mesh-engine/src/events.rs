//! `GET /events`: the cluster's changes as Docker's event stream (one JSON message per
//! change, `scope: "swarm"`): services, nodes, networks, secrets and configs created, updated
//! and removed, as the managers derive them from the store (mesh-manager's `history`). With
//! `since`, the kept ones made since then come first; the stream then asks every [`EVERY`]
//! for those after the last one sent.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mesh_api::events::{matches, EventBatch};
use mesh_api::human::now_ns;

use crate::query::Filters;

/// How often the stream asks for new events.
pub const EVERY: Duration = Duration::from_millis(250);

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
        let mut cursor = first.cursor;
        let mut batch = first.events;
        loop {
            for ev in &batch {
                cursor = cursor.max(ev.seq);
                if until.is_some_and(|u| ev.time_ns > u) || !matches(&filters, ev) {
                    continue;
                }
                let mut line = serde_json::to_vec(&ev.docker_json()).unwrap_or_default();
                line.push(b'\n');
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
            let wait = match until {
                Some(u) => {
                    let now = now_ns();
                    if now >= u {
                        return;
                    }
                    EVERY.min(Duration::from_nanos(u - now))
                }
                None => EVERY,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = tx.closed() => return,
            }
            let req = mesh_api::Request::Events {
                after: Some(cursor),
                since_ns: None,
            };
            // No answer (an election): ask again from the same place.
            batch = match backend.call(req).await {
                Ok(v) => serde_json::from_value::<EventBatch>(v)
                    .map(|b| b.events)
                    .unwrap_or_default(),
                Err(_) => Vec::new(),
            };
        }
    });
}
