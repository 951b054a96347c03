//! `GET /events`: the cluster's changes as Docker's event stream (one JSON message per
//! change, `scope: "swarm"`): services, nodes, networks, secrets and configs created, updated
//! and removed, as the managers derive them from the store (mesh-manager's `history`). With
//! `since`, the kept ones made since then come first; the stream then asks every
//! [`mesh_api::events::EVERY`] for those after the last one sent. What to send and when to
//! stop is [`Follow`]'s, as for `mesh events`. Events lost to it (more made between two
//! reads than the managers keep) are named in a warning in the daemon's log, and the stream
//! goes on; an answer it cannot read (an error other than an election's, or no event batch)
//! ends it, with an error in the daemon's log.

use std::sync::Arc;

use bytes::Bytes;
use mesh_api::events::{batch_of, EventBatch, Follow};
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
            // No answer (an election): ask again from the same place. One that cannot be
            // read ends the stream, told in the daemon's log.
            batch = match batch_of(backend.call(req).await) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!("GET /events: the stream ends: {e}");
                    return;
                }
            };
        }
    });
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::time::Duration;

    use mesh_api::events::Event;
    use mesh_api::{ApiError, ErrorKind, Request, Response};
    use serde_json::json;

    use super::*;

    /// Answers from a list, in order, and records the `after` of each request; an election
    /// once the list is done.
    struct Answers(Mutex<(VecDeque<Response>, Vec<Option<u64>>)>);

    impl crate::Backend for Answers {
        fn call(&self, req: Request) -> crate::BoxFuture<'_, Response> {
            let mut a = self.0.lock().unwrap();
            if let Request::Events { after, .. } = req {
                a.1.push(after);
            }
            let r = a.0.pop_front().unwrap_or_else(|| Err(no_leader()));
            Box::pin(async move { r })
        }
    }

    fn no_leader() -> ApiError {
        ApiError {
            kind: ErrorKind::NoLeader,
            message: "no leader".into(),
        }
    }

    fn batch(seqs: &[u64]) -> EventBatch {
        EventBatch {
            events: seqs
                .iter()
                .map(|&seq| Event {
                    seq,
                    kind: "service".into(),
                    action: "create".into(),
                    id: format!("s{seq}"),
                    attributes: [("name".to_string(), format!("web{seq}"))].into(),
                    time_ns: seq,
                })
                .collect(),
            cursor: seqs.last().copied().unwrap_or_default(),
            missed: None,
        }
    }

    /// The IDs of the events sent until the stream ends (10 s at most).
    async fn sent(mut rx: tokio::sync::mpsc::Receiver<Bytes>) -> Vec<String> {
        let mut ids = Vec::new();
        let all = async {
            while let Some(line) = rx.recv().await {
                let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
                ids.push(v["Actor"]["ID"].as_str().unwrap().to_string());
            }
        };
        tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .expect("the stream ended");
        ids
    }

    #[tokio::test]
    async fn an_election_is_waited_out_and_an_answer_that_is_no_batch_ends_the_stream() {
        let backend = Arc::new(Answers(Mutex::new((
            VecDeque::from([
                Err(no_leader()),
                Ok(json!(batch(&[2, 3]))),
                Ok(json!({"events": "none"})),
                Ok(json!(batch(&[4]))),
            ]),
            Vec::new(),
        ))));
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        stream(backend.clone(), batch(&[1]), Filters::default(), None, tx);
        assert_eq!(sent(rx).await, ["s1", "s2", "s3"]);
        // Asked after the first batch's cursor until answered, then after its last event;
        // nothing after the answer it could not read.
        let asked = backend.0.lock().unwrap().1.clone();
        assert_eq!(asked, [Some(1), Some(1), Some(3)]);
    }

    #[tokio::test]
    async fn an_error_other_than_an_election_ends_the_stream() {
        let backend = Arc::new(Answers(Mutex::new((
            VecDeque::from([Err(ApiError {
                kind: ErrorKind::NotManager,
                message: "This node is not a swarm manager.".into(),
            })]),
            Vec::new(),
        ))));
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        stream(backend, batch(&[1]), Filters::default(), None, tx);
        assert_eq!(sent(rx).await, ["s1"]);
    }
}
