//! Forwarding of names that are not ours to the host's upstream resolvers.
//!
//! The client's query is relayed byte for byte (its EDNS payload size, DO/CD bits and 0x20
//! case included) under a fresh random ID from a fresh ephemeral socket `connect()`ed to
//! the upstream, so only that upstream's answer is accepted; a reply is taken only if its
//! ID and question match. The answer is relayed byte for byte with the client's ID put
//! back. The sockets are opened by meshd, i.e. in meshd's own network namespace, where the
//! host's resolvers are reachable; never from the task's.
//!
//! Transport: UDP, except that a query that came over TCP is forwarded over TCP. A UDP
//! answer with TC set is relayed as is to a UDP client (it retries over TCP, which is then
//! forwarded over TCP); for [`crate::Dns::query`] the engine itself retries over TCP.
//!
//! Time bounds: each upstream gets [`ForwardConfig::upstream_timeout`] (2 s), the whole
//! query at most [`ForwardConfig::total_timeout`] (4 s, below glibc's 5 s so the client sees
//! our SERVFAIL rather than its own timeout). Upstreams are tried in order, except that one
//! which just timed out or refused the connection is tried last for
//! [`ForwardConfig::penalty`]: a dead first resolver does not stall every query (libnetwork
//! waits on it every time: moby #30326, #32622). SERVFAIL/REFUSED/NOTIMP answers move on to
//! the next upstream; when none gives a usable answer the client gets SERVFAIL.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::op::{Header, MessageType, Query};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Where the embedded server listens inside each task.
const EMBEDDED_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 11);

/// Forwarding knobs (part of [`crate::Config`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardConfig {
    /// How long one upstream gets to answer.
    pub upstream_timeout: Duration,
    /// How long a forwarded query may take in all, across upstreams.
    pub total_timeout: Duration,
    /// At most this many upstreams are used (the first ones of the list), as glibc's MAXNS.
    pub max_upstreams: usize,
    /// How long an upstream that failed (timeout, connection refused) is tried last.
    pub penalty: Duration,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            upstream_timeout: Duration::from_secs(2),
            total_timeout: Duration::from_secs(4),
            max_upstreams: 3,
            penalty: Duration::from_secs(30),
        }
    }
}

/// The upstream list with a little failure memory.
#[derive(Debug)]
pub(crate) struct Upstreams {
    addrs: Vec<SocketAddr>,
    /// Per upstream: tried last until then.
    penalized_until: Mutex<Vec<Option<Instant>>>,
}

impl Upstreams {
    /// Keeps the first `max` usable addresses: never 127.0.0.11 (that is us, inside the
    /// task: a loop), never unspecified addresses or port 0, no duplicates.
    pub(crate) fn new(addrs: Vec<SocketAddr>, max: usize) -> Self {
        let mut kept: Vec<SocketAddr> = Vec::new();
        for a in addrs {
            let usable = a.port() != 0
                && !a.ip().is_unspecified()
                && a.ip() != std::net::IpAddr::V4(EMBEDDED_IP);
            if !usable {
                tracing::warn!(upstream = %a, "ignoring unusable DNS upstream");
                continue;
            }
            if !kept.contains(&a) && kept.len() < max {
                kept.push(a);
            }
        }
        let n = kept.len();
        Self {
            addrs: kept,
            penalized_until: Mutex::new(vec![None; n]),
        }
    }

    pub(crate) fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The upstreams in the order to try them: healthy ones in list order, then penalized
    /// ones, soonest-to-recover first.
    pub(crate) fn ordered(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let pen = self
            .penalized_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut healthy = Vec::with_capacity(self.addrs.len());
        let mut bad: Vec<(Instant, SocketAddr)> = Vec::new();
        for (i, a) in self.addrs.iter().enumerate() {
            match pen.get(i).copied().flatten() {
                Some(until) if until > now => bad.push((until, *a)),
                _ => healthy.push(*a),
            }
        }
        bad.sort_by_key(|(until, _)| *until);
        healthy.extend(bad.into_iter().map(|(_, a)| a));
        healthy
    }

    fn set_penalty(&self, addr: SocketAddr, until: Option<Instant>) {
        let mut pen = self
            .penalized_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(i) = self.addrs.iter().position(|a| *a == addr) {
            if let Some(slot) = pen.get_mut(i) {
                *slot = until;
            }
        }
    }
}

/// How a query reaches the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// UDP; a truncated answer is returned as is.
    Udp,
    /// UDP, retried over TCP when the answer is truncated.
    UdpThenTcp,
    /// TCP only.
    Tcp,
}

/// Why one upstream gave nothing usable.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[source] std::io::Error),
    /// It answered SERVFAIL, REFUSED or NOTIMP (not its fault to penalize, but not usable).
    #[error("answered {0}")]
    Unusable(ResponseCode),
}

/// Forwards `raw` (a well-formed query whose header parsed as `id`) and returns the answer
/// with `id` restored, or `None` when no upstream gave a usable one.
pub(crate) async fn forward(
    upstreams: &Upstreams,
    cfg: &ForwardConfig,
    raw: &[u8],
    via: Via,
) -> Option<Vec<u8>> {
    let client_id: [u8; 2] = raw.get(..2)?.try_into().ok()?;
    if raw.len() < 12 {
        return None;
    }
    let deadline = tokio::time::Instant::now() + cfg.total_timeout;
    for up in upstreams.ordered() {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        let until = std::cmp::min(deadline, now + cfg.upstream_timeout);
        let result = match tokio::time::timeout_at(until, exchange(up, raw, via)).await {
            Ok(r) => r,
            Err(_) => Err(ExchangeError::Timeout),
        };
        match result {
            Ok(mut answer) => {
                upstreams.set_penalty(up, None);
                // `answer` passed `check_answer`, so it has a full header.
                if let Some(id) = answer.get_mut(..2) {
                    id.copy_from_slice(&client_id);
                }
                return Some(answer);
            }
            Err(ExchangeError::Unusable(rcode)) => {
                tracing::debug!(upstream = %up, %rcode, "upstream answer not usable, trying next");
            }
            Err(e) => {
                tracing::debug!(upstream = %up, error = %e, "upstream failed, trying next");
                upstreams.set_penalty(up, Some(Instant::now() + cfg.penalty));
            }
        }
    }
    None
}

async fn exchange(up: SocketAddr, raw: &[u8], via: Via) -> Result<Vec<u8>, ExchangeError> {
    match via {
        Via::Tcp => exchange_tcp(up, raw).await,
        Via::Udp => exchange_udp(up, raw).await,
        Via::UdpThenTcp => {
            let answer = exchange_udp(up, raw).await?;
            if is_truncated(&answer) {
                exchange_tcp(up, raw).await
            } else {
                Ok(answer)
            }
        }
    }
}

fn is_truncated(msg: &[u8]) -> bool {
    msg.get(2).is_some_and(|b| b & 0x02 != 0)
}

/// `raw` with a fresh random ID.
fn with_new_id(raw: &[u8]) -> (Vec<u8>, u16) {
    let id: u16 = rand::random();
    let mut q = raw.to_vec();
    if let Some(head) = q.get_mut(..2) {
        head.copy_from_slice(&id.to_be_bytes());
    }
    (q, id)
}

async fn exchange_udp(up: SocketAddr, raw: &[u8]) -> Result<Vec<u8>, ExchangeError> {
    let (query, id) = with_new_id(raw);
    let local: SocketAddr = if up.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = UdpSocket::bind(local).await.map_err(ExchangeError::Io)?;
    sock.connect(up).await.map_err(ExchangeError::Io)?;
    sock.send(&query).await.map_err(ExchangeError::Io)?;
    let mut buf = vec![0u8; 65535];
    loop {
        // A connected UDP socket reports ICMP port unreachable as ECONNREFUSED here.
        let n = sock.recv(&mut buf).await.map_err(ExchangeError::Io)?;
        if let Some(answer) = check_answer(&buf[..n], id, &query)? {
            return Ok(answer);
        }
        // Not our answer (stale or forged): keep waiting until the timeout.
    }
}

async fn exchange_tcp(up: SocketAddr, raw: &[u8]) -> Result<Vec<u8>, ExchangeError> {
    let (query, id) = with_new_id(raw);
    let len = u16::try_from(query.len())
        .map_err(|_| ExchangeError::Io(std::io::Error::other("query too long for TCP")))?;
    let mut stream = TcpStream::connect(up).await.map_err(ExchangeError::Io)?;
    let _ = stream.set_nodelay(true);
    let mut out = Vec::with_capacity(query.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&query);
    stream.write_all(&out).await.map_err(ExchangeError::Io)?;
    loop {
        let mut len = [0u8; 2];
        stream
            .read_exact(&mut len)
            .await
            .map_err(ExchangeError::Io)?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream
            .read_exact(&mut buf)
            .await
            .map_err(ExchangeError::Io)?;
        if let Some(answer) = check_answer(&buf, id, &query)? {
            return Ok(answer);
        }
    }
}

/// `Ok(Some(answer))` if `answer` answers `query` (ID, QR, question) usably; `Ok(None)` if
/// it is not an answer to it; `Err(Unusable)` for SERVFAIL/REFUSED/NOTIMP.
fn check_answer(answer: &[u8], id: u16, query: &[u8]) -> Result<Option<Vec<u8>>, ExchangeError> {
    let mut dec = BinDecoder::new(answer);
    let Ok(header) = Header::read(&mut dec) else {
        return Ok(None);
    };
    if header.metadata.id != id || header.metadata.message_type != MessageType::Response {
        return Ok(None);
    }
    if !same_question(&mut dec, header.counts.queries, query) {
        // A FORMERR answer may legitimately carry no question; accept it as an answer.
        if header.counts.queries != 0 {
            return Ok(None);
        }
    }
    match header.metadata.response_code {
        rc @ (ResponseCode::ServFail | ResponseCode::Refused | ResponseCode::NotImp) => {
            Err(ExchangeError::Unusable(rc))
        }
        _ => Ok(Some(answer.to_vec())),
    }
}

/// Whether the question section at `dec` equals the query's (names case-insensitively).
fn same_question(dec: &mut BinDecoder<'_>, count: u16, query: &[u8]) -> bool {
    let mut qdec = BinDecoder::new(query);
    let Ok(qheader) = Header::read(&mut qdec) else {
        return false;
    };
    if qheader.counts.queries != count {
        return false;
    }
    for _ in 0..count {
        let (Ok(a), Ok(q)) = (Query::read(dec), Query::read(&mut qdec)) else {
            return false;
        };
        if a.query_type() != q.query_type()
            || a.query_class() != q.query_class()
            || !a.name().eq_ignore_root(q.name())
        {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn upstream_filtering() {
        let u = Upstreams::new(
            vec![
                sa("127.0.0.11:53"),
                sa("0.0.0.0:53"),
                sa("10.0.0.1:0"),
                sa("10.0.0.1:53"),
                sa("10.0.0.1:53"),
                sa("10.0.0.2:53"),
                sa("[2001:db8::1]:53"),
                sa("10.0.0.3:53"),
            ],
            3,
        );
        assert_eq!(
            u.addrs(),
            &[sa("10.0.0.1:53"), sa("10.0.0.2:53"), sa("[2001:db8::1]:53")]
        );
    }

    #[test]
    fn penalized_upstreams_go_last() {
        let u = Upstreams::new(
            vec![sa("10.0.0.1:53"), sa("10.0.0.2:53"), sa("10.0.0.3:53")],
            3,
        );
        u.set_penalty(
            sa("10.0.0.1:53"),
            Some(Instant::now() + Duration::from_secs(60)),
        );
        assert_eq!(
            u.ordered(),
            vec![sa("10.0.0.2:53"), sa("10.0.0.3:53"), sa("10.0.0.1:53")]
        );
        u.set_penalty(sa("10.0.0.1:53"), Some(Instant::now()));
        assert_eq!(u.ordered()[0], sa("10.0.0.1:53"));
    }
}
