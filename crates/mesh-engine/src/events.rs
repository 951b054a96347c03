//! `GET /events`: the cluster's changes as Docker's event stream (one JSON message per
//! change, `scope: "swarm"`), found by comparing snapshots of the leader's objects every
//! [`EVERY`]: services, nodes and networks created, updated and removed. Only from the moment
//! of the call: mesh keeps no event history, so `since` in the past is refused.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mesh_api::events::{matches, Snapshot};
use mesh_api::ClusterObjects;

use crate::query::Filters;

/// How often the objects are compared.
pub const EVERY: Duration = Duration::from_millis(500);

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Parses Docker's `since`/`until` (Unix seconds, with an optional fraction) to nanoseconds.
pub fn parse_time(v: &str) -> Result<u128, String> {
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: u128 = secs
        .parse()
        .map_err(|_| format!("invalid time {v:?}: expected Unix seconds"))?;
    let mut nanos = 0u128;
    if !frac.is_empty() {
        let f: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = f
            .parse()
            .map_err(|_| format!("invalid time {v:?}: expected Unix seconds"))?;
    }
    Ok(secs * 1_000_000_000 + nanos)
}

/// Streams the events matching `filters` until `until` (ns) or the client goes away.
pub fn stream(
    backend: Arc<dyn crate::Backend>,
    first: ClusterObjects,
    filters: Filters,
    until: Option<u128>,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    tokio::spawn(async move {
        let mut last = Snapshot::of(&first);
        loop {
            let wait = match until {
                Some(u) => {
                    let now = now_ns();
                    if now >= u {
                        return;
                    }
                    EVERY.min(Duration::from_nanos((u - now).min(u64::MAX as u128) as u64))
                }
                None => EVERY,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = tx.closed() => return,
            }
            let Ok(v) = backend
                .call(mesh_api::Request::Objects { service: None })
                .await
            else {
                continue;
            };
            let Ok(o) = serde_json::from_value::<ClusterObjects>(v) else {
                continue;
            };
            let next = Snapshot::of(&o);
            for ev in last.changes(&next, now_ns() as u64) {
                if !matches(&filters, &ev) {
                    continue;
                }
                let mut line = serde_json::to_vec(&ev.docker_json()).unwrap_or_default();
                line.push(b'\n');
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
            last = next;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::events::Event;

    #[test]
    fn messages_as_docker_s() {
        let ev = Event {
            kind: "node",
            action: "update",
            id: "n1".into(),
            attributes: [
                ("name", "h1"),
                ("state.new", "down"),
                ("state.old", "ready"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            time_ns: 12_500_000_000,
        };
        let m = ev.docker_json();
        assert_eq!(m["Type"], "node");
        assert_eq!(m["Actor"]["Attributes"]["state.new"], "down");
        assert_eq!(m["time"], 12);
        assert_eq!(m["timeNano"], 12_500_000_000u64);
        assert_eq!(parse_time("12.5").unwrap(), 12_500_000_000);
        assert!(parse_time("x").is_err());
    }
}
