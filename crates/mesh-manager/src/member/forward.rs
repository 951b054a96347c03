//! How a member's requests reach the leader, apart from the transport so that it is tested
//! with fakes: [`on_leader`] on a manager (through Raft's view of the leader, across an
//! election) and [`via_managers`] on a worker (through the managers it knows, in order).
//! `Member` implements [`Routes`] over Raft and mutual-TLS connections.

use std::future::Future;
use std::time::Duration;

use mesh_api::{ApiError, ErrorKind};
use mesh_rpc::RpcError;
use tracing::debug;

use crate::peer::{PeerRequest, PeerResponse};

/// How often a manager asks again while the leader it knows says it does not lead (or
/// does not answer).
const RETRY: Duration = Duration::from_millis(100);

/// Where the leader is, from a manager's view: this manager (with what it handles requests
/// with), or another one's control address.
#[derive(Clone)]
pub(super) enum Leader<N> {
    Me(N),
    Other(String),
}

/// What forwarding needs of a member.
pub(super) trait Routes: Sync {
    /// What the leader handles a request with, when it is this member.
    type Node: Send;
    /// Where the leader is now; an error when this member cannot tell (not a manager, no
    /// leader after an election's wait).
    fn leader(&self) -> impl Future<Output = Result<Leader<Self::Node>, ApiError>> + Send;
    /// Handles `req` as the leader.
    fn lead(&self, node: Self::Node, req: PeerRequest)
        -> impl Future<Output = PeerResponse> + Send;
    /// Sends `req` to the member at `addr` and returns its answer.
    fn send(
        &self,
        addr: &str,
        req: &PeerRequest,
    ) -> impl Future<Output = Result<PeerResponse, RpcError>> + Send;
}

/// A manager's way to the leader: handled here when this manager leads, else sent as
/// [`PeerRequest::Forwarded`] (forwarded once: the receiver does not forward it again) to
/// the leader Raft names. A leader that answers that it does not lead, or no answer at all
/// (it died: an election is on), is asked again every [`RETRY`], finding the leader anew each
/// time, until an answer comes or `wait` has passed since the first failure: then "no
/// leader", as Docker's "The swarm does not have a leader" error.
pub(super) async fn on_leader<R: Routes>(
    routes: &R,
    req: PeerRequest,
    wait: Duration,
) -> PeerResponse {
    let fwd = PeerRequest::Forwarded(Box::new(req));
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        match routes.leader().await {
            Err(e) => return PeerResponse::Error(e),
            Ok(Leader::Me(node)) => {
                let PeerRequest::Forwarded(req) = fwd else {
                    unreachable!("made above")
                };
                return routes.lead(node, *req).await;
            }
            Ok(Leader::Other(addr)) => match routes.send(&addr, &fwd).await {
                Ok(PeerResponse::Error(e)) if e.kind == ErrorKind::NoLeader => {
                    debug!("leader {addr} says it does not lead");
                }
                Ok(r) => return r,
                Err(e) => debug!("forwarding to leader {addr}: {e}"),
            },
        }
        let d = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + wait);
        if tokio::time::Instant::now() >= d {
            return PeerResponse::Error(ApiError::no_leader());
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// A worker's way to the leader: `req` to each manager it knows, in order, until one
/// answers with something other than "no leader" or "not a manager" (a manager demoted
/// since); an unreachable manager is skipped. The managers forward it to their leader.
/// Without any such answer: the last of those errors, else "no leader".
pub(super) async fn via_managers<R: Routes>(
    routes: &R,
    managers: &[String],
    req: &PeerRequest,
) -> PeerResponse {
    let mut last = PeerResponse::Error(ApiError::no_leader());
    for addr in managers {
        match routes.send(addr, req).await {
            Ok(PeerResponse::Error(e))
                if e.kind == ErrorKind::NoLeader || e.kind == ErrorKind::NotManager =>
            {
                last = PeerResponse::Error(e)
            }
            Ok(r) => return r,
            Err(e) => debug!("to leader via {addr}: {e}"),
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;

    /// One answer of a member, as the fake gives it.
    #[derive(Clone)]
    enum Answer {
        Done,
        Error(ErrorKind),
        Unreachable,
    }

    /// Members by address; Raft's view of the leader, one per call (the last one stays); a
    /// log of what went where.
    #[derive(Default)]
    struct FakeRoutes {
        leaders: Mutex<VecDeque<Result<Leader<&'static str>, ErrorKind>>>,
        answers: Mutex<Vec<(String, VecDeque<Answer>)>>,
        sent: Mutex<Vec<(String, String)>>,
        led: Mutex<Vec<String>>,
    }

    fn kind(req: &PeerRequest) -> String {
        match req {
            PeerRequest::Forwarded(inner) => format!("forwarded {}", kind(inner)),
            PeerRequest::Heartbeat { node_id, .. } => format!("heartbeat {node_id}"),
            other => format!("{other:?}"),
        }
    }

    impl FakeRoutes {
        fn new(leaders: Vec<Result<Leader<&'static str>, ErrorKind>>) -> FakeRoutes {
            FakeRoutes {
                leaders: Mutex::new(leaders.into()),
                ..Default::default()
            }
        }

        fn answers(self, addr: &str, answers: &[Answer]) -> FakeRoutes {
            self.answers
                .lock()
                .unwrap()
                .push((addr.to_string(), answers.iter().cloned().collect()));
            self
        }

        fn sent(&self) -> Vec<(String, String)> {
            self.sent.lock().unwrap().clone()
        }
    }

    impl Routes for FakeRoutes {
        type Node = &'static str;

        fn leader(&self) -> impl Future<Output = Result<Leader<&'static str>, ApiError>> + Send {
            let mut l = self.leaders.lock().unwrap();
            let next = if l.len() > 1 {
                l.pop_front()
            } else {
                l.front().cloned()
            };
            let r = match next.expect("a leader view") {
                Ok(l) => Ok(l),
                Err(k) => Err(ApiError::new(k, "no view")),
            };
            std::future::ready(r)
        }

        fn lead(
            &self,
            node: &'static str,
            req: PeerRequest,
        ) -> impl Future<Output = PeerResponse> + Send {
            self.led
                .lock()
                .unwrap()
                .push(format!("{node}: {}", kind(&req)));
            std::future::ready(PeerResponse::Done)
        }

        fn send(
            &self,
            addr: &str,
            req: &PeerRequest,
        ) -> impl Future<Output = Result<PeerResponse, RpcError>> + Send {
            self.sent
                .lock()
                .unwrap()
                .push((addr.to_string(), kind(req)));
            let mut all = self.answers.lock().unwrap();
            let q = &mut all
                .iter_mut()
                .find(|(a, _)| a == addr)
                .unwrap_or_else(|| panic!("no member at {addr}"))
                .1;
            let a = if q.len() > 1 {
                q.pop_front()
            } else {
                q.front().cloned()
            };
            let r = match a.expect("an answer") {
                Answer::Done => Ok(PeerResponse::Done),
                Answer::Error(k) => Ok(PeerResponse::Error(ApiError::new(k, "from the fake"))),
                Answer::Unreachable => Err(RpcError::Closed(addr.to_string())),
            };
            std::future::ready(r)
        }
    }

    fn hb() -> PeerRequest {
        PeerRequest::Heartbeat {
            node_id: "n1".into(),
            tls: None,
        }
    }

    fn is_done(r: &PeerResponse) -> bool {
        matches!(r, PeerResponse::Done)
    }

    fn error_kind(r: &PeerResponse) -> Option<ErrorKind> {
        match r {
            PeerResponse::Error(e) => Some(e.kind),
            _ => None,
        }
    }

    /// The leader handles its own requests, unwrapped; a follower forwards them, once, to
    /// the leader Raft names.
    #[tokio::test]
    async fn a_follower_forwards_once_and_the_leader_handles_its_own() {
        let me = FakeRoutes::new(vec![Ok(Leader::Me("m1"))]);
        assert!(is_done(&on_leader(&me, hb(), Duration::from_secs(1)).await));
        assert_eq!(*me.led.lock().unwrap(), ["m1: heartbeat n1"]);
        assert!(me.sent().is_empty());

        let follower = FakeRoutes::new(vec![Ok(Leader::Other("m2:2377".into()))])
            .answers("m2:2377", &[Answer::Done]);
        assert!(is_done(
            &on_leader(&follower, hb(), Duration::from_secs(1)).await
        ));
        assert_eq!(
            follower.sent(),
            [("m2:2377".to_string(), "forwarded heartbeat n1".to_string())]
        );
    }

    /// Across an election: the old leader is gone (no answer), then the one Raft names next
    /// says it does not lead yet; the request goes to the leader once there is one, and
    /// its answer comes back.
    #[tokio::test(start_paused = true)]
    async fn a_forwarded_request_waits_out_an_election() {
        let r = FakeRoutes::new(vec![
            Ok(Leader::Other("m1:2377".into())),
            Ok(Leader::Other("m2:2377".into())),
            Ok(Leader::Other("m2:2377".into())),
            Ok(Leader::Other("m3:2377".into())),
        ])
        .answers("m1:2377", &[Answer::Unreachable])
        .answers("m2:2377", &[Answer::Error(ErrorKind::NoLeader)])
        .answers("m3:2377", &[Answer::Done]);
        let t0 = tokio::time::Instant::now();
        assert!(is_done(&on_leader(&r, hb(), Duration::from_secs(4)).await));
        let to: Vec<String> = r.sent().into_iter().map(|(a, _)| a).collect();
        assert_eq!(to, ["m1:2377", "m2:2377", "m2:2377", "m3:2377"]);
        assert_eq!(t0.elapsed(), RETRY * 3);
    }

    /// An answer other than "no leader" is the answer, errors included: a refused request
    /// is not sent again.
    #[tokio::test(start_paused = true)]
    async fn the_leader_s_errors_are_answers() {
        let r = FakeRoutes::new(vec![Ok(Leader::Other("m2:2377".into()))])
            .answers("m2:2377", &[Answer::Error(ErrorKind::AlreadyExists)]);
        let a = on_leader(&r, hb(), Duration::from_secs(4)).await;
        assert_eq!(error_kind(&a), Some(ErrorKind::AlreadyExists));
        assert_eq!(r.sent().len(), 1);
    }

    /// No leader for the whole wait: "no leader", after `wait` and not much more; a manager
    /// that cannot tell where the leader is answers its own error at once.
    #[tokio::test(start_paused = true)]
    async fn without_a_leader_the_wait_ends_in_no_leader() {
        let r = FakeRoutes::new(vec![Ok(Leader::Other("m2:2377".into()))])
            .answers("m2:2377", &[Answer::Error(ErrorKind::NoLeader)]);
        let t0 = tokio::time::Instant::now();
        let a = on_leader(&r, hb(), Duration::from_secs(2)).await;
        assert_eq!(error_kind(&a), Some(ErrorKind::NoLeader));
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited <= Duration::from_secs(2) + RETRY,
            "{waited:?}"
        );
        assert_eq!(r.sent().len() as u32, 1 + 2000 / RETRY.as_millis() as u32);

        let r = FakeRoutes::new(vec![Err(ErrorKind::NotManager)]);
        let a = on_leader(&r, hb(), Duration::from_secs(2)).await;
        assert_eq!(error_kind(&a), Some(ErrorKind::NotManager));
        assert!(r.sent().is_empty());
    }

    /// A worker asks the managers it knows in order, skipping the unreachable ones and those
    /// that do not lead or manage any more; the request goes as it is (the manager forwards
    /// it); without an answer, the last such error.
    #[tokio::test]
    async fn a_worker_asks_its_managers_in_turn() {
        let managers = ["m1:2377".to_string(), "m2:2377".into(), "m3:2377".into()];
        let r = FakeRoutes::new(vec![])
            .answers("m1:2377", &[Answer::Error(ErrorKind::NotManager)])
            .answers("m2:2377", &[Answer::Unreachable])
            .answers("m3:2377", &[Answer::Done]);
        assert!(is_done(&via_managers(&r, &managers, &hb()).await));
        assert_eq!(
            r.sent(),
            [
                ("m1:2377".to_string(), "heartbeat n1".to_string()),
                ("m2:2377".into(), "heartbeat n1".into()),
                ("m3:2377".into(), "heartbeat n1".into()),
            ]
        );

        let r = FakeRoutes::new(vec![])
            .answers("m1:2377", &[Answer::Error(ErrorKind::NoLeader)])
            .answers("m2:2377", &[Answer::Error(ErrorKind::InvalidArgument)])
            .answers("m3:2377", &[Answer::Done]);
        let a = via_managers(&r, &managers, &hb()).await;
        assert_eq!(error_kind(&a), Some(ErrorKind::InvalidArgument));
        assert_eq!(r.sent().len(), 2);

        let r = FakeRoutes::new(vec![])
            .answers("m1:2377", &[Answer::Error(ErrorKind::NoLeader)])
            .answers("m2:2377", &[Answer::Unreachable])
            .answers("m3:2377", &[Answer::Unreachable]);
        let a = via_managers(&r, &managers, &hb()).await;
        assert_eq!(error_kind(&a), Some(ErrorKind::NoLeader));
        let a = via_managers(&r, &[], &hb()).await;
        assert_eq!(error_kind(&a), Some(ErrorKind::NoLeader));
    }
}
