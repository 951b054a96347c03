//! The engine: one [`Dns`] in meshd serves every task through a UDP socket and a TCP
//! listener bound inside that task's namespace ([`Dns::register`]), answering from one
//! shared, atomically replaced [`Records`] snapshot and forwarding the rest.
//!
//! Per registered task: one tokio task reads the UDP socket and answers local names inline
//! (no spawn, no allocation beyond the reply); forwarded queries run in their own tokio
//! tasks, at most [`Config::max_inflight_forwards`] at a time (more are dropped: the client
//! retries). One tokio task accepts TCP connections, at most
//! [`Config::max_tcp_connections`] open, each closed after [`Config::tcp_idle_timeout`]
//! without a query. Dropping the [`Registration`] aborts all of them and closes the
//! sockets.
//!
//! Packet handling: shorter than a header, or a response (QR set; reflection) -> dropped;
//! header parses but the rest does not, or not exactly one question -> FORMERR; opcode other
//! than QUERY -> NOTIMP; class other than IN, or a zone transfer -> REFUSED. Local answers
//! have AA and RA set, echo EDNS when the query had it, and over UDP are truncated (TC, no
//! records) past the client's payload size so it retries over TCP. Nothing in the path can
//! panic on input; every packet is counted in [`Stats`].
//!
//! The common query, one plain type-A question for a cluster name (with at most an
//! option-less EDNS record), is answered straight from the wire bytes without decoding or
//! encoding `hickory` messages, byte for byte as the general path would (`Inner::fast_a`);
//! that halves the engine's user-space time per answer. Everything else takes the general
//! path above.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::op::{
    Edns, Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::{AbortHandle, JoinSet};

use crate::forward::{self, ForwardConfig, Upstreams, Via};
use crate::records::Records;
use crate::resolve::{self, NetRef, Resolution, Ttls, Want};
use crate::DnsError;

/// The UDP payload size the engine advertises in its EDNS answers (the DNS flag day 2020
/// value; answers are local, but the number also bounds what clients expect).
const ADVERTISED_PAYLOAD: u16 = 1232;

/// Engine settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Upstream resolvers for names that are not cluster names (see
    /// [`crate::ResolvConf`]). 127.0.0.11 and unspecified addresses are ignored; only the
    /// first [`ForwardConfig::max_upstreams`] are used.
    pub upstreams: Vec<SocketAddr>,
    /// Search domains that clients may append to cluster names (`web.corp.example` then
    /// resolves as `web` when `corp.example` is listed).
    pub search_domains: Vec<String>,
    /// Forwarding time bounds.
    pub forward: ForwardConfig,
    /// TTLs of local answers.
    pub ttls: Ttls,
    /// A TCP connection with no query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// Open TCP connections per task; more are accepted and closed at once.
    pub max_tcp_connections: usize,
    /// Forwarded queries in flight per task; further UDP queries are dropped, TCP ones wait.
    pub max_inflight_forwards: usize,
}

impl Config {
    /// Defaults with the given upstreams.
    pub fn new(upstreams: Vec<SocketAddr>) -> Self {
        Self {
            upstreams,
            search_domains: Vec::new(),
            forward: ForwardConfig::default(),
            ttls: Ttls::default(),
            tcp_idle_timeout: Duration::from_secs(10),
            max_tcp_connections: 16,
            max_inflight_forwards: 64,
        }
    }
}

/// Counters since the engine started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Tasks currently served.
    pub registered: usize,
    /// Datagrams received on the UDP sockets.
    pub udp_queries: u64,
    /// Messages received over TCP.
    pub tcp_queries: u64,
    /// Queries made through [`Dns::query`].
    pub api_queries: u64,
    /// Queries answered from the records (including empty NOERROR answers).
    pub local_answers: u64,
    /// Queries forwarded and answered by an upstream.
    pub forwarded: u64,
    /// Forwarded queries no upstream answered usably (the client got SERVFAIL).
    pub forward_failures: u64,
    /// Packets that did not parse: FORMERR sent when the header parsed, dropped otherwise.
    pub malformed: u64,
    /// Packets not answered for other reasons (responses sent to us, over the forwarding or
    /// TCP connection limit).
    pub dropped: u64,
    /// Local UDP answers sent truncated (TC) because they exceeded the client's size.
    pub truncated: u64,
}

#[derive(Default)]
struct Counters {
    udp_queries: AtomicU64,
    tcp_queries: AtomicU64,
    api_queries: AtomicU64,
    local_answers: AtomicU64,
    forwarded: AtomicU64,
    forward_failures: AtomicU64,
    malformed: AtomicU64,
    dropped: AtomicU64,
    truncated: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// One record of an [`Answer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerRecord {
    /// Owner name, as in the answer.
    pub name: String,
    /// TTL in seconds.
    pub ttl: u32,
    /// Record type (`A`, `PTR`, `CNAME`, ...).
    pub rtype: String,
    /// Record data in presentation format.
    pub data: String,
}

/// What the engine answers for one name ([`Dns::query`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The name asked.
    pub name: String,
    /// The type asked.
    pub qtype: String,
    /// `NOERROR`, `NXDOMAIN`, `SERVFAIL`, ...
    pub rcode: String,
    /// The data of the answer records of the asked type, in the order served.
    pub answers: Vec<String>,
    /// Every record of the answer section (with CNAMEs of forwarded names).
    pub records: Vec<AnswerRecord>,
    /// Whether the name went to the upstream resolvers.
    pub forwarded: bool,
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            ";; {} {} -> {}{}",
            self.name,
            self.qtype,
            self.rcode,
            if self.forwarded { " (forwarded)" } else { "" }
        )?;
        for r in &self.records {
            write!(f, "\n{}\t{}\tIN\t{}\t{}", r.name, r.ttl, r.rtype, r.data)?;
        }
        Ok(())
    }
}

/// The resolver configuration in force.
struct Resolv {
    upstreams: Arc<Upstreams>,
    search: Vec<String>,
}

/// A registered task as the engine's table holds it.
struct RegEntry {
    generation: u64,
    networks: Arc<RwLock<Arc<[NetRef]>>>,
    tasks: Vec<AbortHandle>,
}

struct Inner {
    records: RwLock<Arc<Records>>,
    resolv: RwLock<Arc<Resolv>>,
    forward: ForwardConfig,
    ttls: Ttls,
    tcp_idle_timeout: Duration,
    max_tcp_connections: usize,
    max_inflight_forwards: usize,
    counters: Counters,
    metrics: crate::metrics::Metrics,
    regs: Mutex<HashMap<String, RegEntry>>,
    next_generation: AtomicU64,
}

/// The embedded DNS engine. Cheap to clone; all clones are the same engine.
#[derive(Clone)]
pub struct Dns {
    inner: Arc<Inner>,
}

impl fmt::Debug for Dns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dns")
            .field("upstreams", &self.upstreams())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Serving one task; dropping it (or [`Registration::unregister`], or
/// [`Dns::unregister`]) stops serving the task and closes its sockets.
pub struct Registration {
    inner: Arc<Inner>,
    task_id: String,
    generation: u64,
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("task_id", &self.task_id)
            .field("udp_addr", &self.udp_addr)
            .field("tcp_addr", &self.tcp_addr)
            .finish()
    }
}

impl Registration {
    /// The task this serves.
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// The UDP socket's address (in the task's namespace).
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// The TCP listener's address (in the task's namespace).
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// Stops serving the task (same as dropping the guard).
    pub fn unregister(self) {}
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.inner.remove(&self.task_id, Some(self.generation));
    }
}

/// What to do with one received message.
enum Action {
    Reply(Vec<u8>),
    Forward(ForwardJob),
    Drop,
}

/// A query that is not ours.
struct ForwardJob {
    raw: Vec<u8>,
    request: Message,
    via: Via,
}

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
    Api,
}

impl Dns {
    /// An engine with default settings forwarding to `upstreams`.
    pub fn new(upstreams: Vec<SocketAddr>) -> Dns {
        Self::with_config(Config::new(upstreams))
    }

    /// An engine with the given settings.
    pub fn with_config(config: Config) -> Dns {
        let Config {
            upstreams,
            search_domains,
            forward,
            ttls,
            tcp_idle_timeout,
            max_tcp_connections,
            max_inflight_forwards,
        } = config;
        let resolv = Resolv {
            upstreams: Arc::new(Upstreams::new(upstreams, forward.max_upstreams)),
            search: normalize_search(search_domains),
        };
        Dns {
            inner: Arc::new(Inner {
                records: RwLock::new(Arc::new(Records::new())),
                resolv: RwLock::new(Arc::new(resolv)),
                forward,
                ttls,
                tcp_idle_timeout,
                max_tcp_connections: max_tcp_connections.max(1),
                max_inflight_forwards: max_inflight_forwards.max(1),
                counters: Counters::default(),
                metrics: crate::metrics::Metrics::default(),
                regs: Mutex::new(HashMap::new()),
                next_generation: AtomicU64::new(1),
            }),
        }
    }

    /// Changes the records. Queries see either all of the change or none of it: they hold a
    /// snapshot, and `f` works on a copy-on-write version that replaces it. Queries wait
    /// while `f` runs, so keep it to patches; use [`Dns::replace`] for a full rebuild.
    pub fn update(&self, f: impl FnOnce(&mut Records)) {
        let mut guard = self
            .inner
            .records
            .write()
            .unwrap_or_else(|e| e.into_inner());
        // Copies (shallowly: networks and services are shared) only when a query is still
        // holding the current snapshot.
        f(Arc::make_mut(&mut guard));
    }

    /// Replaces the whole record set (for a full rebuild: build it outside, swap it in,
    /// without holding up queries while it is built).
    pub fn replace(&self, records: Records) {
        *self
            .inner
            .records
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(records);
    }

    /// The current records (a snapshot).
    pub fn records(&self) -> Arc<Records> {
        self.inner.snapshot()
    }

    /// Replaces the upstream resolvers (e.g. after the host's resolv.conf changed).
    pub fn set_upstreams(&self, upstreams: Vec<SocketAddr>) {
        let mut guard = self.inner.resolv.write().unwrap_or_else(|e| e.into_inner());
        let search = guard.search.clone();
        *guard = Arc::new(Resolv {
            upstreams: Arc::new(Upstreams::new(upstreams, self.inner.forward.max_upstreams)),
            search,
        });
    }

    /// Replaces the search domains.
    pub fn set_search_domains(&self, domains: Vec<String>) {
        let mut guard = self.inner.resolv.write().unwrap_or_else(|e| e.into_inner());
        let upstreams = guard.upstreams.clone();
        *guard = Arc::new(Resolv {
            upstreams,
            search: normalize_search(domains),
        });
    }

    /// The upstreams in use.
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.inner.resolv().upstreams.addrs().to_vec()
    }

    /// Serves a task: `udp` and `tcp` are already bound (to 127.0.0.11:53 inside the task's
    /// namespace, see [`crate::bind_in_netns`]); `networks` are the `(id, name)` of the
    /// networks it is attached to, in priority order. Registering a task id again replaces
    /// the previous registration. Must be called inside a tokio runtime.
    pub fn register(
        &self,
        task_id: &str,
        networks: Vec<(String, String)>,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
    ) -> Result<Registration, DnsError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| DnsError::NoRuntime)?;
        udp.set_nonblocking(true).map_err(DnsError::Socket)?;
        tcp.set_nonblocking(true).map_err(DnsError::Socket)?;
        let udp_addr = udp.local_addr().map_err(DnsError::Socket)?;
        let tcp_addr = tcp.local_addr().map_err(DnsError::Socket)?;
        let (udp, tcp) = {
            let _entered = handle.enter();
            (
                UdpSocket::from_std(udp).map_err(DnsError::Socket)?,
                TcpListener::from_std(tcp).map_err(DnsError::Socket)?,
            )
        };
        let networks = Arc::new(RwLock::new(NetRef::list(&networks)));
        let ctx = Arc::new(TaskCtx {
            task_id: task_id.to_string(),
            networks: networks.clone(),
            forwards: Arc::new(Semaphore::new(self.inner.max_inflight_forwards)),
            connections: Arc::new(Semaphore::new(self.inner.max_tcp_connections)),
        });
        let generation = self.inner.next_generation.fetch_add(1, Ordering::Relaxed);
        let udp_task = handle.spawn(serve_udp(self.inner.clone(), ctx.clone(), Arc::new(udp)));
        let tcp_task = handle.spawn(serve_tcp(self.inner.clone(), ctx, tcp));
        let entry = RegEntry {
            generation,
            networks,
            tasks: vec![udp_task.abort_handle(), tcp_task.abort_handle()],
        };
        let old = self.inner.regs().insert(task_id.to_string(), entry);
        if let Some(old) = old {
            old.tasks.iter().for_each(AbortHandle::abort);
        }
        tracing::debug!(task = task_id, %udp_addr, %tcp_addr, "DNS serving task");
        Ok(Registration {
            inner: self.inner.clone(),
            task_id: task_id.to_string(),
            generation,
            udp_addr,
            tcp_addr,
        })
    }

    /// Changes the networks a registered task sees. Returns whether it is registered.
    pub fn set_networks(&self, task_id: &str, networks: Vec<(String, String)>) -> bool {
        let regs = self.inner.regs();
        let Some(entry) = regs.get(task_id) else {
            return false;
        };
        *entry.networks.write().unwrap_or_else(|e| e.into_inner()) = NetRef::list(&networks);
        true
    }

    /// Stops serving a task. Returns whether it was registered.
    pub fn unregister(&self, task_id: &str) -> bool {
        self.inner.remove(task_id, None)
    }

    /// The ids of the tasks served.
    pub fn registered(&self) -> Vec<String> {
        self.inner.regs().keys().cloned().collect()
    }

    /// What the engine answers for `name` (type `qtype`, e.g. `A`, `PTR`, `AAAA`) as seen
    /// from a task on `networks` (`(id, name)` pairs): local answers, or the upstream's
    /// (over UDP, then TCP if truncated).
    pub async fn query(
        &self,
        networks: &[(String, String)],
        name: &str,
        qtype: &str,
    ) -> Result<Answer, DnsError> {
        let rtype = RecordType::from_str(&qtype.to_ascii_uppercase())
            .map_err(|_| DnsError::InvalidType(qtype.to_string()))?;
        if matches!(rtype, RecordType::OPT | RecordType::Unknown(_)) {
            return Err(DnsError::InvalidType(qtype.to_string()));
        }
        let mut qname = Name::from_ascii(name).map_err(|e| DnsError::InvalidName {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        qname.set_fqdn(true);
        let mut msg = Message::query();
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(qname, rtype));
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        msg.set_edns(edns);
        let raw = msg.to_vec().map_err(|e| DnsError::Message(e.to_string()))?;
        bump(&self.inner.counters.api_queries);
        let nets = NetRef::list(networks);
        let (reply, forwarded) = match self.inner.process(&raw, Transport::Api, &nets) {
            Action::Reply(bytes) => (bytes, false),
            Action::Forward(job) => (self.inner.forward(job).await, true),
            Action::Drop => return Err(DnsError::Message("query was dropped".into())),
        };
        let resp = Message::from_vec(&reply).map_err(|e| DnsError::Message(e.to_string()))?;
        let records: Vec<AnswerRecord> = resp
            .answers
            .iter()
            .map(|r| AnswerRecord {
                name: r.name.to_string(),
                ttl: r.ttl,
                rtype: r.record_type().to_string(),
                data: r.data.to_string(),
            })
            .collect();
        let answers = resp
            .answers
            .iter()
            .filter(|r| rtype == RecordType::ANY || r.record_type() == rtype)
            .map(|r| r.data.to_string())
            .collect();
        Ok(Answer {
            name: name.to_string(),
            qtype: rtype.to_string(),
            rcode: rcode_name(resp.metadata.response_code),
            answers,
            records,
            forwarded,
        })
    }

    /// Registers the engine's metrics (see [`crate::metrics`]; names relative to the
    /// registry's `mesh` prefix).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        let m = &self.inner.metrics;
        registry.register(
            "dns_queries",
            "Queries from tasks answered, by question type and answer code",
            m.queries.clone(),
        );
        registry.register_with_unit(
            "dns_query_duration",
            "Time from receiving a task's query to its answer being ready (forwarding included)",
            prometheus_client::registry::Unit::Seconds,
            m.duration.clone(),
        );
        registry.register_collector(Box::new(crate::metrics::StatsCollector(self.clone())));
    }

    /// Counters since start.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            registered: self.inner.regs().len(),
            udp_queries: get(&c.udp_queries),
            tcp_queries: get(&c.tcp_queries),
            api_queries: get(&c.api_queries),
            local_answers: get(&c.local_answers),
            forwarded: get(&c.forwarded),
            forward_failures: get(&c.forward_failures),
            malformed: get(&c.malformed),
            dropped: get(&c.dropped),
            truncated: get(&c.truncated),
        }
    }
}

fn normalize_search(domains: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in domains {
        let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
        if !d.is_empty() && !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

/// `NOERROR`, `NXDOMAIN`, ... as dig prints them.
pub(crate) fn rcode_name(rcode: ResponseCode) -> String {
    match rcode {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::BADVERS => "BADVERS".into(),
        other => format!("RCODE{}", u16::from(other)),
    }
}

impl Inner {
    fn snapshot(&self) -> Arc<Records> {
        self.records
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn resolv(&self) -> Arc<Resolv> {
        self.resolv
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn regs(&self) -> std::sync::MutexGuard<'_, HashMap<String, RegEntry>> {
        self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes a registration (only the given generation, if one is given).
    fn remove(&self, task_id: &str, generation: Option<u64>) -> bool {
        let mut regs = self.regs();
        let matches = regs
            .get(task_id)
            .is_some_and(|e| generation.is_none_or(|g| g == e.generation));
        if !matches {
            return false;
        }
        if let Some(entry) = regs.remove(task_id) {
            entry.tasks.iter().for_each(AbortHandle::abort);
            tracing::debug!(task = task_id, "DNS stopped serving task");
        }
        true
    }

    /// Decides what to do with one received message. Never panics on any input.
    fn process(&self, pkt: &[u8], transport: Transport, nets: &[NetRef]) -> Action {
        if let Some(reply) = self.fast_a(pkt, transport, nets) {
            bump(&self.counters.local_answers);
            return Action::Reply(reply);
        }
        self.process_general(pkt, transport, nets)
    }

    /// [`Inner::process`] for every message the fast path does not take.
    fn process_general(&self, pkt: &[u8], transport: Transport, nets: &[NetRef]) -> Action {
        let Ok(header) = Header::read(&mut BinDecoder::new(pkt)) else {
            bump(&self.counters.malformed);
            return Action::Drop;
        };
        if header.metadata.message_type == MessageType::Response {
            bump(&self.counters.dropped);
            return Action::Drop;
        }
        let request = match Message::from_vec(pkt) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "malformed DNS query");
                bump(&self.counters.malformed);
                return Action::Reply(header_only(&header.metadata, ResponseCode::FormErr));
            }
        };
        if request.metadata.op_code != OpCode::Query {
            return Action::Reply(header_only(&request.metadata, ResponseCode::NotImp));
        }
        let [query] = request.queries.as_slice() else {
            bump(&self.counters.malformed);
            return Action::Reply(header_only(&request.metadata, ResponseCode::FormErr));
        };
        let limit = match transport {
            Transport::Udp => usize::from(request.max_payload()),
            Transport::Tcp | Transport::Api => usize::from(u16::MAX),
        };
        let qtype = query.query_type();
        if query.query_class() != DNSClass::IN
            || matches!(qtype, RecordType::AXFR | RecordType::IXFR)
        {
            bump(&self.counters.local_answers);
            let reply = response_to(&request, query, ResponseCode::Refused);
            return Action::Reply(self.encode(&reply, limit));
        }
        let want = match qtype {
            RecordType::A => Want::A,
            RecordType::PTR => Want::Ptr,
            RecordType::ANY => Want::Any,
            _ => Want::Other,
        };
        let resolution = match resolve::name_key(query.name().iter()) {
            Some(key) => {
                let records = self.snapshot();
                let resolv = self.resolv();
                resolve::resolve(&records, nets, &resolv.search, &key, want, &self.ttls)
            }
            None => Resolution::NotLocal,
        };
        let mut reply = response_to(&request, query, ResponseCode::NoError);
        match resolution {
            Resolution::NotLocal => {
                let via = match transport {
                    Transport::Udp => Via::Udp,
                    Transport::Tcp => Via::Tcp,
                    Transport::Api => Via::UdpThenTcp,
                };
                tracing::debug!(name = %query.name(), %qtype, "DNS forwarding");
                return Action::Forward(ForwardJob {
                    raw: pkt.to_vec(),
                    request,
                    via,
                });
            }
            Resolution::A { ips, ttl } => {
                reply.answers = ips
                    .into_iter()
                    .map(|ip| a_record(query.name(), ttl, ip))
                    .collect();
            }
            Resolution::Ptr { names, ttl } => {
                reply.answers = names
                    .iter()
                    .filter_map(|n| Name::from_ascii(format!("{n}.")).ok())
                    .map(|target| {
                        Record::from_rdata(query.name().clone(), ttl, RData::PTR(PTR(target)))
                    })
                    .collect();
            }
            Resolution::NoData => {}
        }
        tracing::debug!(
            name = %query.name(),
            %qtype,
            answers = reply.answers.len(),
            "DNS local answer"
        );
        bump(&self.counters.local_answers);
        Action::Reply(self.encode(&reply, limit))
    }

    /// The fast path for the common query: one plain type-A question for a cluster name,
    /// answered straight from the wire bytes, without building `hickory` messages (that
    /// decoding and encoding, with their allocations, was most of the user-space time per
    /// query; `cargo xtask bench dns`). The reply is byte for byte what the general path
    /// encodes (tested in `fast_path_matches_the_general_path`). `None` for anything
    /// else, which then takes the general path: not exactly header + question + at most an
    /// option-less EDNS 0 OPT record, a label outside `[A-Za-z0-9_-]`, a compression
    /// pointer, a name that is not ours (forwarded), or a reply over the size limit
    /// (truncated there).
    fn fast_a(&self, pkt: &[u8], transport: Transport, nets: &[NetRef]) -> Option<Vec<u8>> {
        let h = pkt.get(..12)?;
        let count = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        // QR = 0, opcode QUERY; one question, no answers or authorities, at most the OPT.
        if h[2] & 0xf8 != 0 || count(4) != 1 || count(6) != 0 || count(8) != 0 {
            return None;
        }
        let additionals = count(10);
        if additionals > 1 {
            return None;
        }
        // The question name: plain labels only.
        let mut pos = 12;
        let mut labels: [&[u8]; 127] = [&[]; 127];
        let mut n_labels = 0;
        loop {
            let len = usize::from(*pkt.get(pos)?);
            if len == 0 {
                pos += 1;
                break;
            }
            let label = pkt.get(pos + 1..pos + 1 + len)?;
            if len > 63
                || n_labels == labels.len()
                || !label
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            {
                return None;
            }
            labels[n_labels] = label;
            n_labels += 1;
            pos += 1 + len;
        }
        // Wire length of the name at most 255; the root name is not ours.
        if n_labels == 0 || pos - 12 > 255 {
            return None;
        }
        let question = pkt.get(12..pos + 4)?;
        let tail = &pkt[pos..];
        // Type A, class IN.
        if tail[..4] != [0, 1, 0, 1] {
            return None;
        }
        let rest = &tail[4..];
        let edns = match (additionals, rest.len()) {
            (0, 0) => false,
            // Root owner, type OPT, payload size, extended rcode 0, version 0, any flags,
            // no options.
            (1, 11) if rest[..3] == [0, 0, 41] && rest[5..7] == [0, 0] && rest[9..] == [0, 0] => {
                true
            }
            _ => return None,
        };
        let limit = match transport {
            Transport::Udp if edns => usize::from(u16::from_be_bytes([rest[3], rest[4]]).max(512)),
            Transport::Udp => 512,
            Transport::Tcp | Transport::Api => usize::from(u16::MAX),
        };
        let key = resolve::name_key(labels[..n_labels].iter().copied())?;
        let resolution = {
            let records = self.snapshot();
            let resolv = self.resolv();
            resolve::resolve(&records, nets, &resolv.search, &key, Want::A, &self.ttls)
        };
        let (ips, ttl) = match resolution {
            Resolution::A { ips, ttl } => (ips, ttl),
            Resolution::NoData => (Vec::new(), 0),
            Resolution::Ptr { .. } | Resolution::NotLocal => return None,
        };
        let an = u16::try_from(ips.len()).ok()?;
        let mut out = Vec::with_capacity(12 + question.len() + 16 * ips.len() + 11);
        out.extend_from_slice(&h[..2]);
        // QR, opcode 0, AA, RD as asked; RA, CD as asked, NOERROR.
        out.push(0x80 | 0x04 | (h[2] & 0x01));
        out.push(0x80 | (h[3] & 0x10));
        out.extend_from_slice(&[0, 1]);
        out.extend_from_slice(&an.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, u8::from(edns)]);
        out.extend_from_slice(question);
        for ip in &ips {
            // Owner: a pointer to the question name at offset 12.
            out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&[0, 4]);
            out.extend_from_slice(&ip.octets());
        }
        if edns {
            out.extend_from_slice(&[0, 0, 41]);
            out.extend_from_slice(&ADVERTISED_PAYLOAD.to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        if out.len() > limit {
            return None;
        }
        tracing::debug!(name = %key, answers = ips.len(), "DNS local answer (fast path)");
        Some(out)
    }

    /// Encodes a reply, truncating it (TC, no records) when longer than `limit`.
    fn encode(&self, reply: &Message, limit: usize) -> Vec<u8> {
        match reply.to_vec() {
            Ok(bytes) if bytes.len() <= limit => bytes,
            Ok(_) => {
                bump(&self.counters.truncated);
                reply
                    .truncate()
                    .to_vec()
                    .unwrap_or_else(|_| header_only(&reply.metadata, ResponseCode::ServFail))
            }
            Err(e) => {
                tracing::warn!(error = %e, "encoding DNS answer failed");
                header_only(&reply.metadata, ResponseCode::ServFail)
            }
        }
    }

    /// Runs a forward job to its reply bytes (the upstream's answer or SERVFAIL).
    async fn forward(&self, job: ForwardJob) -> Vec<u8> {
        let resolv = self.resolv();
        match forward::forward(&resolv.upstreams, &self.forward, &job.raw, job.via).await {
            Some(answer) => {
                bump(&self.counters.forwarded);
                answer
            }
            None => {
                bump(&self.counters.forward_failures);
                if resolv.upstreams.addrs().is_empty() {
                    tracing::debug!("no DNS upstreams: SERVFAIL");
                } else {
                    tracing::debug!("all DNS upstreams failed: SERVFAIL");
                }
                let [query] = job.request.queries.as_slice() else {
                    return header_only(&job.request.metadata, ResponseCode::ServFail);
                };
                let reply = response_to(&job.request, query, ResponseCode::ServFail);
                self.encode(&reply, usize::from(u16::MAX))
            }
        }
    }
}

/// A reply skeleton for `request`: its ID, opcode, RD and CD, the question, AA and RA set,
/// and EDNS when the request had it.
fn response_to(request: &Message, query: &Query, rcode: ResponseCode) -> Message {
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata = Metadata::response_from_request(&request.metadata);
    reply.metadata.authoritative = rcode == ResponseCode::NoError;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = rcode;
    reply.add_query(query.clone());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(ADVERTISED_PAYLOAD);
        reply.set_edns(edns);
    }
    reply
}

fn a_record(name: &Name, ttl: u32, ip: Ipv4Addr) -> Record {
    Record::from_rdata(name.clone(), ttl, RData::A(A(ip)))
}

/// A header-only reply (no question), built by hand so that it cannot fail.
fn header_only(request: &Metadata, rcode: ResponseCode) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&request.id.to_be_bytes());
    let opcode: u8 = u8::from(request.op_code) & 0x0f;
    out.push(0x80 | (opcode << 3) | u8::from(request.recursion_desired));
    out.push(0x80 | (rcode.low() & 0x0f));
    out.extend_from_slice(&[0; 8]);
    out
}

/// What the serving loops of one task share.
struct TaskCtx {
    task_id: String,
    networks: Arc<RwLock<Arc<[NetRef]>>>,
    forwards: Arc<Semaphore>,
    connections: Arc<Semaphore>,
}

impl TaskCtx {
    fn networks(&self) -> Arc<[NetRef]> {
        self.networks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

async fn serve_udp(inner: Arc<Inner>, ctx: Arc<TaskCtx>, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 65535];
    let mut forwards: JoinSet<()> = JoinSet::new();
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(task = %ctx.task_id, error = %e, "DNS UDP receive error");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let started = Instant::now();
        while forwards.try_join_next().is_some() {}
        bump(&inner.counters.udp_queries);
        let pkt = buf.get(..n).unwrap_or_default();
        match inner.process(pkt, Transport::Udp, &ctx.networks()) {
            Action::Drop => {}
            Action::Reply(reply) => {
                inner.metrics.observe(pkt, &reply, started);
                if let Err(e) = sock.send_to(&reply, src).await {
                    tracing::debug!(task = %ctx.task_id, error = %e, "DNS UDP send error");
                }
            }
            Action::Forward(job) => {
                let Ok(permit) = ctx.forwards.clone().try_acquire_owned() else {
                    bump(&inner.counters.dropped);
                    continue;
                };
                let (inner, sock) = (inner.clone(), sock.clone());
                forwards.spawn(async move {
                    let qtype = crate::metrics::qtype_label(&job.raw);
                    let reply = inner.forward(job).await;
                    inner.metrics.observe_forwarded(qtype, &reply, started);
                    drop(permit);
                    let _ = sock.send_to(&reply, src).await;
                });
            }
        }
    }
}

async fn serve_tcp(inner: Arc<Inner>, ctx: Arc<TaskCtx>, listener: TcpListener) {
    // Connections live in this set: aborting this task (unregistering) drops them all.
    let mut connections: JoinSet<()> = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(task = %ctx.task_id, error = %e, "DNS TCP accept error");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let Ok(permit) = ctx.connections.clone().try_acquire_owned() else {
            bump(&inner.counters.dropped);
            continue;
        };
        let (inner, ctx) = (inner.clone(), ctx.clone());
        connections.spawn(async move {
            serve_tcp_connection(&inner, &ctx, stream).await;
            drop(permit);
        });
    }
}

async fn serve_tcp_connection(inner: &Inner, ctx: &TaskCtx, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let idle = inner.tcp_idle_timeout;
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        match tokio::time::timeout(idle, stream.read_exact(&mut msg)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let started = Instant::now();
        bump(&inner.counters.tcp_queries);
        let reply = match inner.process(&msg, Transport::Tcp, &ctx.networks()) {
            Action::Reply(reply) => reply,
            // Not even a header: the stream cannot be trusted any more.
            Action::Drop => return,
            Action::Forward(job) => {
                let Ok(_permit) = ctx.forwards.acquire().await else {
                    return;
                };
                inner.forward(job).await
            }
        };
        inner.metrics.observe(&msg, &reply, started);
        let Ok(rlen) = u16::try_from(reply.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&rlen.to_be_bytes());
        out.extend_from_slice(&reply);
        match tokio::time::timeout(idle, stream.write_all(&out)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::TaskRecord;

    fn engine() -> Dns {
        let dns = Dns::new(vec![]);
        dns.update(|r| {
            r.upsert_service("n1", "web", Some(Ipv4Addr::new(10, 0, 1, 2)), false);
            r.upsert_task(
                "n1",
                "web",
                TaskRecord::new("web.1.abc", "abcabcabcabc", Ipv4Addr::new(10, 0, 1, 5)),
            );
        });
        dns
    }

    fn nets() -> Vec<(String, String)> {
        vec![("n1".into(), "front".into())]
    }

    #[tokio::test]
    async fn query_api_local_answers() {
        let dns = engine();
        let a = dns.query(&nets(), "WEB.", "a").await.unwrap();
        assert_eq!(a.rcode, "NOERROR");
        assert_eq!(a.answers, vec!["10.0.1.2"]);
        assert!(!a.forwarded);
        assert_eq!(a.records[0].ttl, 10);

        let a = dns.query(&nets(), "web", "AAAA").await.unwrap();
        assert_eq!((a.rcode.as_str(), a.answers.len()), ("NOERROR", 0));

        let a = dns
            .query(&nets(), "5.1.0.10.in-addr.arpa", "PTR")
            .await
            .unwrap();
        assert_eq!(a.answers, vec!["web.1.abc."]);

        let a = dns.query(&nets(), "web.front", "A").await.unwrap();
        assert_eq!(a.answers, vec!["10.0.1.2"]);
        assert!(a.to_string().contains("10.0.1.2"));
    }

    #[tokio::test]
    async fn replace_swaps_everything() {
        let dns = engine();
        let mut r = Records::new();
        r.upsert_service("n1", "other", Some(Ipv4Addr::new(10, 0, 1, 99)), false);
        dns.replace(r);
        let a = dns.query(&nets(), "other", "A").await.unwrap();
        assert_eq!(a.answers, vec!["10.0.1.99"]);
        let a = dns.query(&nets(), "web", "A").await.unwrap();
        assert!(a.forwarded);
        assert!(dns.records().service("n1", "web").is_none());
    }

    #[tokio::test]
    async fn unknown_names_without_upstreams_are_servfail() {
        let dns = engine();
        let a = dns.query(&nets(), "example.com", "A").await.unwrap();
        assert_eq!(a.rcode, "SERVFAIL");
        assert!(a.forwarded);
        // Not visible from a task on no network.
        let a = dns.query(&[], "web", "A").await.unwrap();
        assert_eq!(a.rcode, "SERVFAIL");
        assert_eq!(dns.stats().forward_failures, 2);
    }

    #[tokio::test]
    async fn query_api_rejects_bad_input() {
        let dns = engine();
        assert!(matches!(
            dns.query(&nets(), "web", "NOPE").await,
            Err(DnsError::InvalidType(_))
        ));
        let long = "a".repeat(70);
        assert!(matches!(
            dns.query(&nets(), &long, "A").await,
            Err(DnsError::InvalidName { .. })
        ));
    }

    #[test]
    fn process_never_panics_on_garbage() {
        let dns = engine();
        let nets = NetRef::list(&nets());
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for len in 0..600usize {
            let mut pkt: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if len >= 3 && len % 2 == 0 {
                pkt[2] &= 0x7f; // make about half of them queries
            }
            let _ = dns.inner.process(&pkt, Transport::Udp, &nets);
        }
        assert!(dns.stats().malformed > 0);
    }

    /// A type-`qtype` query for `name`, with EDNS (payload size) if given.
    fn wire_query(name: &str, qtype: RecordType, edns: Option<u16>, rd: bool, cd: bool) -> Vec<u8> {
        let mut msg = Message::query();
        msg.metadata.id = 0x1234;
        msg.metadata.recursion_desired = rd;
        msg.metadata.checking_disabled = cd;
        msg.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            msg.set_edns(e);
        }
        msg.to_vec().unwrap()
    }

    fn general(dns: &Dns, pkt: &[u8], transport: Transport, nets: &[NetRef]) -> Vec<u8> {
        match dns.inner.process_general(pkt, transport, nets) {
            Action::Reply(bytes) => bytes,
            _ => panic!("the general path did not answer"),
        }
    }

    fn engine_with_more() -> Dns {
        let dns = engine();
        dns.update(|r| {
            r.upsert_service("n1", "db", Some(Ipv4Addr::new(10, 0, 1, 3)), false);
            r.upsert_service("n1", "many", Some(Ipv4Addr::new(10, 0, 1, 4)), false);
            r.set_tasks(
                "n1",
                "many",
                (0..40u8)
                    .map(|i| {
                        TaskRecord::new(
                            format!("many.{i}.t{i}"),
                            format!("t{i}"),
                            Ipv4Addr::new(10, 0, 2, i + 1),
                        )
                    })
                    .collect(),
            );
        });
        dns
    }

    #[test]
    fn fast_path_matches_the_general_path() {
        let dns = engine_with_more();
        let nets = NetRef::list(&nets());
        let names = [
            "web",
            "WEB.",
            "web.front",
            "Web.1.Abc",
            "abcabcabcabc",
            "db",
            "tasks.db",
            "tasks.web",
            "many.7.t7",
        ];
        for name in names {
            for edns in [None, Some(4096), Some(100)] {
                for (rd, cd) in [(true, false), (false, true)] {
                    for transport in [Transport::Udp, Transport::Tcp] {
                        let mut pkt = wire_query(name, RecordType::A, edns, rd, cd);
                        let fast = dns.inner.fast_a(&pkt, transport, &nets);
                        let slow = general(&dns, &pkt, transport, &nets);
                        assert_eq!(fast.as_ref(), Some(&slow), "{name} {edns:?} {rd} {cd}");
                        if edns.is_some() {
                            // The DO flag is accepted and not echoed, as the general path.
                            let at = pkt.len() - 4;
                            pkt[at] |= 0x80;
                            let fast = dns.inner.fast_a(&pkt, transport, &nets);
                            assert_eq!(fast, Some(general(&dns, &pkt, transport, &nets)));
                        }
                    }
                }
            }
        }
        // Shuffled answers: the same records, maybe in another order.
        let pkt = wire_query("tasks.many", RecordType::A, Some(4096), true, false);
        let fast = dns.inner.fast_a(&pkt, Transport::Udp, &nets).unwrap();
        let slow = general(&dns, &pkt, Transport::Udp, &nets);
        assert_eq!(fast.len(), slow.len());
        let (f, s) = (
            Message::from_vec(&fast).unwrap(),
            Message::from_vec(&slow).unwrap(),
        );
        assert_eq!(f.metadata, s.metadata);
        assert_eq!(f.queries, s.queries);
        assert_eq!(f.edns, s.edns);
        let sorted = |m: &Message| {
            let mut v: Vec<String> = m.answers.iter().map(|r| r.to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(sorted(&f), sorted(&s));
        assert_eq!(f.answers.len(), 40);
    }

    #[test]
    fn fast_path_leaves_the_rest_to_the_general_path() {
        let dns = engine_with_more();
        let nets = NetRef::list(&nets());
        let declined = |pkt: &[u8]| dns.inner.fast_a(pkt, Transport::Udp, &nets).is_none();
        // Other types, names that are not ours, odd characters.
        assert!(declined(&wire_query(
            "web",
            RecordType::AAAA,
            None,
            true,
            false
        )));
        assert!(declined(&wire_query(
            "web",
            RecordType::ANY,
            None,
            true,
            false
        )));
        assert!(declined(&wire_query(
            "5.1.0.10.in-addr.arpa",
            RecordType::PTR,
            None,
            true,
            false
        )));
        assert!(declined(&wire_query(
            "example.com",
            RecordType::A,
            None,
            true,
            false
        )));
        let mut odd = wire_query("wexb", RecordType::A, None, true, false);
        odd[15] = b'*';
        assert!(declined(&odd));
        assert!(declined(&wire_query(".", RecordType::A, None, true, false)));
        // 40 addresses do not fit 512 bytes: the general path truncates.
        let big = wire_query("tasks.many", RecordType::A, None, true, false);
        assert!(declined(&big));
        let tc = Message::from_vec(&general(&dns, &big, Transport::Udp, &nets)).unwrap();
        assert!(tc.metadata.truncation);
        // A trailing byte, a second question, a response, another opcode, another class.
        let ok = wire_query("web", RecordType::A, None, true, false);
        assert!(!declined(&ok));
        let mut trailing = ok.clone();
        trailing.push(0);
        assert!(declined(&trailing));
        let mut two = ok.clone();
        two[5] = 2;
        assert!(declined(&two));
        let mut response = ok.clone();
        response[2] |= 0x80;
        assert!(declined(&response));
        let mut notify = ok.clone();
        notify[2] |= 4 << 3;
        assert!(declined(&notify));
        let mut chaos = ok.clone();
        let n = chaos.len();
        chaos[n - 1] = 3;
        assert!(declined(&chaos));
        // EDNS with an option (a cookie), or version 1.
        let mut cookie = wire_query("web", RecordType::A, Some(1232), true, false);
        let n = cookie.len();
        cookie[n - 1] = 12;
        cookie.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(declined(&cookie));
        let mut v1 = wire_query("web", RecordType::A, Some(1232), true, false);
        let n = v1.len();
        v1[n - 5] = 1;
        assert!(declined(&v1));
        // A compression pointer in the question.
        let mut ptr = ok[..12].to_vec();
        ptr.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(declined(&ptr));
    }

    #[test]
    fn fast_path_never_panics_on_garbage_after_a_query_header() {
        let dns = engine_with_more();
        let nets = NetRef::list(&nets());
        let ok = wire_query("web", RecordType::A, Some(1232), true, false);
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for len in 0..ok.len() + 8 {
            for _ in 0..200 {
                let mut pkt = ok.clone();
                pkt.resize(len, 0);
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                if len > 12 {
                    let at = 12 + (seed as usize) % (len - 12);
                    pkt[at] = (seed >> 32) as u8;
                }
                let _ = dns.inner.process(&pkt, Transport::Udp, &nets);
            }
        }
    }

    #[test]
    fn header_only_encodes_rcode() {
        let mut md = Metadata::new(0xbeef, MessageType::Query, OpCode::Query);
        md.recursion_desired = true;
        let bytes = header_only(&md, ResponseCode::FormErr);
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!(m.metadata.id, 0xbeef);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert!(m.metadata.recursion_desired);
    }
}
