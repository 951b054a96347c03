//! Connection tracking entries over ctnetlink (`NETLINK_NETFILTER`, subsystem
//! `CTNETLINK`): list the IPv4 entries of a namespace and delete chosen ones,
//! which is what `conntrack -L` / `conntrack -D` do, without the tool.
//!
//! Why the data plane needs it: a balancer that translates per packet (nftables DNAT)
//! chooses a backend on a connection's first packet and conntrack keeps the choice for the
//! entry's life. When that backend is lost (its node cut off or killed), an entry that has
//! seen no reply keeps sending the client's retransmitted SYNs (TCP) or its next datagrams
//! (UDP, whose unreplied timeout every packet renews) to it; deleting the entry lets the
//! next packet be translated afresh, to a backend that answers. kube-proxy does the same for
//! UDP with the `conntrack` tool.
//!
//! Messages are built and parsed here (they are small: a `nlmsghdr`, a `nfgenmsg` and nested
//! attributes in network byte order); the socket is `netlink-sys`'s, opened on a thread that
//! entered the namespace ([`Netns::run`]). Every receive is bounded by a timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

use crate::{NetlinkError, Netns};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_MULTI: u16 = 2;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_ID: u16 = 12;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// `IPS_SEEN_REPLY`: a packet went the other way.
pub const STATUS_SEEN_REPLY: u32 = 1 << 1;
/// `IPS_DST_NAT`: the entry's destination is translated.
pub const STATUS_DST_NAT: u32 = 1 << 5;

/// `IPPROTO_TCP`.
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const PROTO_UDP: u8 = 17;

/// How long one receive may wait for the kernel.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// One direction of a connection: addresses and ports (0 for protocols without ports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
}

/// One IPv4 conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The IP protocol number ([`PROTO_TCP`], [`PROTO_UDP`], ...).
    pub proto: u8,
    /// The tuple of the first packet, as it arrived.
    pub orig: Tuple,
    /// The tuple replies are expected with: after a DNAT, its `src` is the translated
    /// destination (the backend).
    pub reply: Tuple,
    /// `IPS_*` status bits.
    pub status: u32,
    /// The kernel's id of the entry (a delete names it, so a newer entry with the same
    /// tuple is never deleted by mistake).
    pub id: Option<u32>,
}

impl Flow {
    /// Whether a reply was seen.
    pub fn replied(&self) -> bool {
        self.status & STATUS_SEEN_REPLY != 0
    }

    /// Whether the destination was translated, and to which address.
    pub fn dnat_to(&self) -> Option<Ipv4Addr> {
        (self.status & STATUS_DST_NAT != 0).then_some(self.reply.src)
    }
}

/// The IPv4 conntrack entries of `ns`.
pub fn list(ns: &Netns) -> Result<Vec<Flow>, NetlinkError> {
    ns.run(|| Session::open()?.dump())
        .and_then(|r| r.map_err(|e| err(ns, "list", "conntrack entries", e)))
}

/// Deletes `flows` from `ns`; returns how many were deleted (an entry already gone is not
/// an error: it timed out or was replaced meanwhile).
pub fn delete(ns: &Netns, flows: &[Flow]) -> Result<usize, NetlinkError> {
    if flows.is_empty() {
        return Ok(0);
    }
    let flows = flows.to_vec();
    ns.run(move || {
        let mut s = Session::open()?;
        let mut n = 0;
        for f in &flows {
            if s.delete(f)? {
                n += 1;
            }
        }
        Ok(n)
    })
    .and_then(|r| r.map_err(|e| err(ns, "delete", "conntrack entries", e)))
}

/// The entries a lost backend would strand: translated toward one of `backends`, and either
/// TCP without a reply yet (a connect in progress) or UDP (any: a datagram flow has no end,
/// and the next datagram may as well go to a backend that is there). An answered TCP
/// connection is left alone: it ends by itself, and a backend withdrawn gracefully is still
/// serving it.
pub fn stranded(flows: &[Flow], backends: &[Ipv4Addr]) -> Vec<Flow> {
    flows
        .iter()
        .filter(|f| f.dnat_to().is_some_and(|b| backends.contains(&b)))
        .filter(|f| f.proto == PROTO_UDP || (f.proto == PROTO_TCP && !f.replied()))
        .copied()
        .collect()
}

/// Lists `ns`'s entries and deletes those [`stranded`] by the loss of `backends`; returns
/// how many were deleted.
pub fn forget_backends(ns: &Netns, backends: &[Ipv4Addr]) -> Result<usize, NetlinkError> {
    if backends.is_empty() {
        return Ok(0);
    }
    let flows = list(ns)?;
    delete(ns, &stranded(&flows, backends))
}

/// How long after a backend leaves a balancer its stranded entries are deleted: a backend
/// withdrawn gracefully is still there and answers within that time (a connect in
/// progress gets its SYN-ACK, a UDP request its reply), so only the flows of a backend
/// that is really gone are still unanswered then. Deleting at once would drop the replies
/// in flight from a backend that is merely leaving (they would arrive untranslated).
pub const STRANDED_AFTER: Duration = Duration::from_secs(1);

/// The backends a balancer holds now, shared with the delayed deletions it asked for: a
/// backend back by the time of the deletion keeps its entries.
pub type Holding = Arc<Mutex<BTreeSet<Ipv4Addr>>>;

struct Job {
    ns: Netns,
    backends: Vec<Ipv4Addr>,
    holding: Holding,
}

/// The deletions waiting for one namespace: each lost backend with the time its entries are
/// due for deletion.
struct Pending {
    ns: Netns,
    holding: Holding,
    due: BTreeMap<Ipv4Addr, Instant>,
}

/// Deletes, [`STRANDED_AFTER`] from now and on a thread of this module, the entries of `ns`
/// [`stranded`] by those of `backends` that `holding` does not contain by then. Requests for
/// one namespace are merged (one listing deletes what is due for all its backends), so a
/// burst of changes costs one pass. Failures are logged (the entries then end by their own
/// timeouts).
pub fn forget_backends_later(ns: Netns, backends: Vec<Ipv4Addr>, holding: Holding) {
    if backends.is_empty() {
        return;
    }
    static QUEUE: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        if let Err(e) = thread::Builder::new()
            .name("conntrack-janitor".into())
            .spawn(move || janitor(rx))
        {
            tracing::warn!(error = %e, "conntrack: cannot start the janitor thread");
        }
        Mutex::new(tx)
    });
    let job = Job {
        ns,
        backends,
        holding,
    };
    let sent = queue.lock().map(|q| q.send(job).is_ok()).unwrap_or(false);
    if !sent {
        tracing::warn!(
            "conntrack: the janitor thread is gone; stranded entries are left to time out"
        );
    }
}

/// Keeps the pending deletions by namespace (its inode) and runs each when due.
fn janitor(rx: mpsc::Receiver<Job>) {
    let mut pending: BTreeMap<u64, Pending> = BTreeMap::new();
    loop {
        let next = pending.values().flat_map(|p| p.due.values()).min().copied();
        let job = match next {
            None => match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            },
            Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(job) => Some(job),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            },
        };
        if let Some(job) = job {
            let due = Instant::now() + STRANDED_AFTER;
            let key = match job.ns.inode() {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(ns = job.ns.name(), error = %e, "conntrack: cannot identify namespace");
                    continue;
                }
            };
            let p = pending.entry(key).or_insert_with(|| Pending {
                ns: job.ns,
                holding: job.holding.clone(),
                due: BTreeMap::new(),
            });
            p.holding = job.holding;
            for b in job.backends {
                p.due.insert(b, due);
            }
            continue;
        }
        let now = Instant::now();
        for p in pending.values_mut() {
            let ready: Vec<Ipv4Addr> = p
                .due
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(b, _)| *b)
                .collect();
            if ready.is_empty() {
                continue;
            }
            for b in &ready {
                p.due.remove(b);
            }
            let lost: Vec<Ipv4Addr> = {
                let held = p.holding.lock().unwrap_or_else(|e| e.into_inner());
                ready.into_iter().filter(|b| !held.contains(b)).collect()
            };
            match forget_backends(&p.ns, &lost) {
                Ok(0) => {}
                Ok(n) => tracing::debug!(
                    ns = p.ns.name(),
                    entries = n,
                    backends = ?lost,
                    "conntrack: forgot flows stranded toward removed backends"
                ),
                Err(e) => tracing::warn!(
                    ns = p.ns.name(),
                    error = %e,
                    "conntrack: cannot forget flows toward removed backends"
                ),
            }
        }
        pending.retain(|_, p| !p.due.is_empty());
    }
}

fn err(ns: &Netns, op: &'static str, object: &str, source: io::Error) -> NetlinkError {
    NetlinkError::Request {
        op,
        object: object.to_string(),
        ns: ns.name().to_string(),
        source,
    }
}

/// A ctnetlink socket of the calling thread's namespace.
struct Session {
    sock: Socket,
    seq: u32,
}

impl Session {
    fn open() -> io::Result<Session> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        set_recv_timeout(&sock, RECV_TIMEOUT)?;
        Ok(Session { sock, seq: 0 })
    }

    fn send(&mut self, kind: u16, flags: u16, attrs: &[u8]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = Vec::with_capacity(20 + attrs.len());
        let len = (16 + 4 + attrs.len()) as u32;
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version 0, resource id 0.
        msg.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
        msg.extend_from_slice(attrs);
        self.sock.send(&msg, 0)?;
        Ok(self.seq)
    }

    /// Receives the messages answering `seq` and gives each payload (after the
    /// `nfgenmsg`) to `each`, until the dump's end or the acknowledgement.
    fn answers(&mut self, seq: u32, mut each: impl FnMut(&[u8])) -> io::Result<()> {
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
        loop {
            buf.clear();
            self.sock.recv(&mut buf, 0)?;
            let mut rest = &buf[..];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
                let flags = u16::from_ne_bytes(rest[6..8].try_into().unwrap());
                let mseq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
                if len < 16 || len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "malformed netlink message",
                    ));
                }
                let body = &rest[16..len];
                rest = &rest[align(len).min(rest.len())..];
                if mseq != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = body
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                            .unwrap_or(-libc::EPROTO);
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    _ => {
                        if body.len() >= 4 {
                            each(&body[4..]);
                        }
                        if flags & NLM_F_MULTI == 0 {
                            // A lone answer (not part of a dump) ends the exchange.
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    fn dump(&mut self) -> io::Result<Vec<Flow>> {
        let seq = self.send(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, &[])?;
        let mut out = Vec::new();
        self.answers(seq, |attrs| {
            if let Some(f) = parse_flow(attrs) {
                out.push(f);
            }
        })?;
        Ok(out)
    }

    /// Deletes one entry; false if it was gone already.
    fn delete(&mut self, f: &Flow) -> io::Result<bool> {
        let mut attrs = Vec::new();
        put_tuple(&mut attrs, CTA_TUPLE_ORIG, f.proto, &f.orig);
        if let Some(id) = f.id {
            put_attr(&mut attrs, CTA_ID, &id.to_be_bytes());
        }
        let seq = self.send(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, &attrs)?;
        match self.answers(seq, |_| {}) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn set_recv_timeout(sock: &Socket, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a valid timeval that outlives the call and its size is passed; the fd
    // is the socket's own, open for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

fn put_attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(align(out.len()), 0);
}

fn put_nested(out: &mut Vec<u8>, kind: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let mut body = Vec::new();
    inner(&mut body);
    put_attr(out, kind | NLA_F_NESTED, &body);
}

fn put_tuple(out: &mut Vec<u8>, kind: u16, proto: u8, t: &Tuple) {
    put_nested(out, kind, |b| {
        put_nested(b, CTA_TUPLE_IP, |ip| {
            put_attr(ip, CTA_IP_V4_SRC, &t.src.octets());
            put_attr(ip, CTA_IP_V4_DST, &t.dst.octets());
        });
        put_nested(b, CTA_TUPLE_PROTO, |p| {
            put_attr(p, CTA_PROTO_NUM, &[proto]);
            if proto == PROTO_TCP || proto == PROTO_UDP {
                put_attr(p, CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes());
                put_attr(p, CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
            }
        });
    });
}

/// The attributes of a buffer as `(type without flags, payload)`; stops at the first
/// malformed one.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[align(len).min(buf.len())..];
        Some((kind, payload))
    })
}

fn parse_tuple(buf: &[u8]) -> Option<(u8, Tuple)> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
    for (kind, payload) in attrs(buf) {
        match kind {
            CTA_TUPLE_IP => {
                for (k, p) in attrs(payload) {
                    let addr = <[u8; 4]>::try_from(p).ok().map(Ipv4Addr::from);
                    match k {
                        CTA_IP_V4_SRC => src = addr,
                        CTA_IP_V4_DST => dst = addr,
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, p) in attrs(payload) {
                    let port = <[u8; 2]>::try_from(p).ok().map(u16::from_be_bytes);
                    match k {
                        CTA_PROTO_NUM => proto = p.first().copied(),
                        CTA_PROTO_SRC_PORT => sport = port.unwrap_or(0),
                        CTA_PROTO_DST_PORT => dport = port.unwrap_or(0),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        proto?,
        Tuple {
            src: src?,
            dst: dst?,
            sport,
            dport,
        },
    ))
}

/// One entry from a `IPCTNL_MSG_CT_NEW` message's attributes; `None` if it is not IPv4
/// or lacks a tuple.
fn parse_flow(buf: &[u8]) -> Option<Flow> {
    let (mut orig, mut reply, mut status, mut id) = (None, None, 0, None);
    for (kind, payload) in attrs(buf) {
        match kind {
            CTA_TUPLE_ORIG => orig = parse_tuple(payload),
            CTA_TUPLE_REPLY => reply = parse_tuple(payload),
            CTA_STATUS => {
                status = <[u8; 4]>::try_from(payload)
                    .map(u32::from_be_bytes)
                    .unwrap_or(0)
            }
            CTA_ID => id = <[u8; 4]>::try_from(payload).ok().map(u32::from_be_bytes),
            _ => {}
        }
    }
    let (proto, orig) = orig?;
    let (_, reply) = reply?;
    Some(Flow {
        proto,
        orig,
        reply,
        status,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(proto: u8, backend: [u8; 4], status: u32) -> Flow {
        Flow {
            proto,
            orig: Tuple {
                src: Ipv4Addr::new(10, 0, 1, 5),
                dst: Ipv4Addr::new(10, 0, 1, 2),
                sport: 40000,
                dport: 80,
            },
            reply: Tuple {
                src: Ipv4Addr::from(backend),
                dst: Ipv4Addr::new(10, 0, 1, 5),
                sport: 80,
                dport: 40000,
            },
            status,
            id: Some(7),
        }
    }

    #[test]
    fn a_tuple_survives_encoding_and_parsing() {
        let f = flow(PROTO_TCP, [10, 0, 1, 9], STATUS_DST_NAT);
        let mut buf = Vec::new();
        put_tuple(&mut buf, CTA_TUPLE_ORIG, f.proto, &f.orig);
        put_tuple(&mut buf, CTA_TUPLE_REPLY, f.proto, &f.reply);
        put_attr(&mut buf, CTA_STATUS, &f.status.to_be_bytes());
        put_attr(&mut buf, CTA_ID, &7u32.to_be_bytes());
        assert_eq!(parse_flow(&buf), Some(f));
        // Truncated input yields nothing rather than garbage.
        assert_eq!(parse_flow(&buf[..10]), None);
    }

    #[test]
    fn stranded_flows_are_unanswered_tcp_and_any_udp_toward_a_lost_backend() {
        let lost = [Ipv4Addr::new(10, 0, 1, 9)];
        let flows = [
            flow(PROTO_TCP, [10, 0, 1, 9], STATUS_DST_NAT), // connecting: stranded
            flow(PROTO_TCP, [10, 0, 1, 9], STATUS_DST_NAT | STATUS_SEEN_REPLY), // answered
            flow(PROTO_UDP, [10, 0, 1, 9], STATUS_DST_NAT | STATUS_SEEN_REPLY), // stranded
            flow(PROTO_TCP, [10, 0, 1, 8], STATUS_DST_NAT), // another backend
            flow(PROTO_TCP, [10, 0, 1, 9], 0),              // not translated
        ];
        let got = stranded(&flows, &lost);
        assert_eq!(got, vec![flows[0], flows[2]]);
    }
}
