//! The tokio runtime: sockets, timers and the [`Gossip`] handle around a [`Core`].
//!
//! One actor task owns the core and the UDP socket and serves the handle's commands; a
//! listener task accepts push-pull connections on the same port (TCP). Push-pull exchanges
//! run in tasks owned by those two, so aborting them stops everything and closes the
//! sockets.
//!
//! With [`Config::encrypt`], sealing happens here, at the edge: the core sees plain packets
//! only, and every UDP packet and push-pull frame goes through [`Sealing`] on its way out
//! and in.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{broadcast, mpsc, oneshot, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::Config;
use crate::core::{Core, Output};
use crate::error::GossipError;
use crate::event::{Entry, Event, Member};
use crate::seal::{Key, Keyring, OpenError};
use crate::stats::{add, Counters, Stats};
use crate::wire::{self, Reject, SyncState};

/// Bound of one push-pull exchange (connect, send, receive).
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent push-pulls this node opens.
const MAX_SYNC_OUT: usize = 4;
/// Concurrent push-pulls this node answers.
const MAX_SYNC_IN: usize = 8;
/// Capacity of the event channel (a slower subscriber sees `Lagged` and should re-read
/// [`Gossip::entries`]).
const EVENT_CAPACITY: usize = 4096;

enum Command {
    Join {
        peers: Vec<SocketAddr>,
        reply: oneshot::Sender<SyncState>,
    },
    SetNetworks(BTreeSet<String>, oneshot::Sender<()>),
    Put {
        network: String,
        table: String,
        key: String,
        value: Vec<u8>,
        reply: oneshot::Sender<Result<(), GossipError>>,
    },
    Delete {
        network: String,
        table: String,
        key: String,
        reply: oneshot::Sender<Result<(), GossipError>>,
    },
    Entries {
        network: String,
        table: String,
        reply: oneshot::Sender<Vec<Entry>>,
    },
    Members(oneshot::Sender<Vec<Member>>),
    Synced(oneshot::Sender<BTreeSet<String>>),
    RetractEarlierRuns {
        networks: BTreeSet<String>,
        reply: oneshot::Sender<usize>,
    },
    SyncRequest {
        state: SyncState,
        reply: oneshot::Sender<SyncState>,
    },
    SyncResponse(SyncState),
    SyncFailed,
    Leave(oneshot::Sender<()>),
}

/// Sealing of what goes out and in (see [`crate::seal`]); a no-op unless
/// [`Config::encrypt`].
struct Sealing {
    on: bool,
    ring: RwLock<Keyring>,
}

impl Sealing {
    fn ring(&self) -> std::sync::RwLockReadGuard<'_, Keyring> {
        self.ring.read().unwrap_or_else(|p| p.into_inner())
    }

    /// What to send for a plain packet or frame; `None` (counted) without a key.
    fn outgoing<'a>(&self, plain: &'a [u8], counters: &Counters) -> Option<Cow<'a, [u8]>> {
        if !self.on {
            return Some(Cow::Borrowed(plain));
        }
        let sealed = self.ring().seal(plain);
        if sealed.is_none() {
            add(&counters.no_key, 1);
        }
        sealed.map(Cow::Owned)
    }

    /// The plain packet or frame inside what arrived; `None` (counted) if it does not open.
    fn incoming<'a>(&self, data: &'a [u8], counters: &Counters) -> Option<Cow<'a, [u8]>> {
        if !self.on {
            return Some(Cow::Borrowed(data));
        }
        match self.ring().open(data) {
            Ok(plain) => Some(Cow::Owned(plain)),
            Err(e) => {
                count_open_error(e, counters);
                None
            }
        }
    }

    /// A whole push-pull stream (length-prefixed plain frames) with each frame sealed.
    fn seal_stream(&self, plain: Vec<u8>, counters: &Counters) -> Result<Vec<u8>, SyncError> {
        if !self.on {
            return Ok(plain);
        }
        let mut out = Vec::with_capacity(plain.len() + 64 * crate::seal::OVERHEAD);
        let mut rest = &plain[..];
        while rest.len() >= 4 {
            let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let frame = rest
                .get(4..4 + n)
                .ok_or(SyncError::Malformed("bad own frame"))?;
            let sealed = self.outgoing(frame, counters).ok_or(SyncError::NoKey)?;
            let len = u32::try_from(sealed.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&sealed);
            rest = &rest[4 + n..];
        }
        Ok(out)
    }
}

fn count_open_error(e: OpenError, counters: &Counters) {
    let c = match e {
        OpenError::NotSealed => &counters.unsealed,
        OpenError::UnknownKey => &counters.unknown_key,
        OpenError::BadTag => &counters.bad_tag,
    };
    add(c, 1);
}

struct Inner {
    cmd: mpsc::Sender<Command>,
    events: broadcast::Sender<Event>,
    counters: Arc<Counters>,
    sealing: Arc<Sealing>,
    isolated: Arc<AtomicBool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    addr: SocketAddr,
    name: String,
    tag: u64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(|e| e.into_inner());
        for t in tasks.iter() {
            t.abort();
        }
    }
}

/// A running gossip node. Cheap to clone; the background tasks stop when the last clone is
/// dropped, or on [`Gossip::leave`] / [`Gossip::abort`].
#[derive(Clone)]
pub struct Gossip {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Gossip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gossip")
            .field("node", &self.inner.name)
            .field("addr", &self.inner.addr)
            .finish()
    }
}

/// Binds UDP and TCP on the same port (retrying when a free port was asked for and its TCP
/// twin is taken).
async fn bind(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), GossipError> {
    let err = |source| GossipError::Bind { addr, source };
    let tries = if addr.port() == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let udp = UdpSocket::bind(addr).await.map_err(err)?;
        let local = udp.local_addr().map_err(err)?;
        match TcpListener::bind(local).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(err(last.unwrap_or_else(|| std::io::Error::other("no port"))))
}

impl Gossip {
    /// Binds the gossip port (UDP and TCP) and starts the background tasks. The node knows
    /// nobody until [`Gossip::join`].
    pub async fn start(mut cfg: Config) -> Result<Gossip, GossipError> {
        cfg.validate()?;
        let (udp, tcp) = bind(cfg.bind).await?;
        let local = udp.local_addr().map_err(|source| GossipError::Bind {
            addr: cfg.bind,
            source,
        })?;
        if cfg.advertise.port() == 0 {
            cfg.advertise.set_port(local.port());
        }
        if cfg.advertise.ip().is_unspecified() {
            if local.ip().is_unspecified() {
                return Err(GossipError::Config(
                    "advertise address must be a concrete ip".into(),
                ));
            }
            cfg.advertise.set_ip(local.ip());
        }
        let counters = Arc::new(Counters::default());
        let sealing = Arc::new(Sealing {
            on: cfg.encrypt,
            ring: RwLock::new(Keyring::default()),
        });
        let seed = crate::id::wall_micros() ^ wire::cluster_tag(&cfg.node_id);
        let addr = cfg.advertise;
        let name = cfg.node_id.clone();
        let mut core = Core::new(cfg, counters.clone(), Duration::ZERO, seed);
        core.set_wall_origin(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        );
        let tag = core.tag();
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let isolated = Arc::new(AtomicBool::new(false));
        let actor = Actor {
            core,
            udp: Arc::new(udp),
            cmd_rx,
            cmd_tx: cmd_tx.clone(),
            events: events.clone(),
            isolated: isolated.clone(),
            counters: counters.clone(),
            sealing: sealing.clone(),
            start: Instant::now(),
            syncs: JoinSet::new(),
            sync_slots: Arc::new(Semaphore::new(MAX_SYNC_OUT)),
            tag,
        };
        let listener = listen(
            tcp,
            cmd_tx.clone(),
            isolated.clone(),
            counters.clone(),
            sealing.clone(),
            tag,
        );
        let tasks = vec![tokio::spawn(actor.run()), tokio::spawn(listener)];
        tracing::info!(node = %name, %addr, "gossip started");
        Ok(Gossip {
            inner: Arc::new(Inner {
                cmd: cmd_tx,
                events,
                counters,
                sealing,
                isolated,
                tasks: Mutex::new(tasks),
                addr,
                name,
                tag,
            }),
        })
    }

    /// The address other nodes reach this one at.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// This node's name.
    pub fn node_id(&self) -> &str {
        &self.inner.name
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, GossipError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(make(tx))
            .await
            .map_err(|_| GossipError::Stopped)?;
        rx.await.map_err(|_| GossipError::Stopped)
    }

    /// Joins the cluster through `peers` (the managers' or known nodes' gossip addresses):
    /// announces this node to each of them and runs a full push-pull with the first that
    /// answers. Fails if none answers; the node keeps re-announcing to them in the
    /// background while it knows no live member.
    /// [`Self::join`], tried again every `period` until a peer takes it: a peer may not
    /// take this node yet (its keys or its member filter lag behind this node's, a moment
    /// after this node joined the cluster). Ends only with success or a stopped runtime.
    pub async fn join_retrying(
        &self,
        peers: &[SocketAddr],
        period: Duration,
    ) -> Result<(), GossipError> {
        let mut failures = 0u32;
        loop {
            match self.join(peers).await {
                Err(GossipError::JoinFailed(e)) => {
                    failures += 1;
                    if failures.is_multiple_of(30) {
                        tracing::warn!(failures, "gossip join still refused: {e}");
                    }
                    tokio::time::sleep(period).await;
                }
                other => return other,
            }
        }
    }

    pub async fn join(&self, peers: &[SocketAddr]) -> Result<(), GossipError> {
        let peers: Vec<SocketAddr> = peers
            .iter()
            .copied()
            .filter(|p| *p != self.inner.addr)
            .collect();
        let request = self
            .call(|reply| Command::Join {
                peers: peers.clone(),
                reply,
            })
            .await?;
        if peers.is_empty() {
            return Ok(());
        }
        let mut errors = Vec::new();
        for p in &peers {
            if self.inner.isolated.load(Ordering::Relaxed) {
                errors.push(format!("{p}: isolated"));
                break;
            }
            add(&self.inner.counters.tcp_out, 1);
            let (tag, counters, sealing) =
                (self.inner.tag, &self.inner.counters, &self.inner.sealing);
            match push_pull(*p, &request, tag, counters, sealing).await {
                Ok(resp) => {
                    self.inner
                        .cmd
                        .send(Command::SyncResponse(resp))
                        .await
                        .map_err(|_| GossipError::Stopped)?;
                    return Ok(());
                }
                Err(e) => {
                    add(&self.inner.counters.sync_failures, 1);
                    errors.push(format!("{p}: {e}"));
                }
            }
        }
        Err(GossipError::JoinFailed(errors.join("; ")))
    }

    /// Declares the networks this node has: tables of networks no longer listed are dropped
    /// (with delete events), new ones are synced from their members.
    pub async fn set_networks(&self, networks: BTreeSet<String>) {
        if self
            .call(|reply| Command::SetNetworks(networks, reply))
            .await
            .is_err()
        {
            tracing::debug!("set_networks on a stopped gossip node");
        }
    }

    /// Writes an entry owned by this node. Fails if this node does not have `network`.
    pub async fn put(
        &self,
        network: &str,
        table: &str,
        key: &str,
        value: Vec<u8>,
    ) -> Result<(), GossipError> {
        self.call(|reply| Command::Put {
            network: network.into(),
            table: table.into(),
            key: key.into(),
            value,
            reply,
        })
        .await?
    }

    /// Deletes an entry owned by this node (no-op if absent; an error if another node owns
    /// it).
    pub async fn delete(&self, network: &str, table: &str, key: &str) -> Result<(), GossipError> {
        self.call(|reply| Command::Delete {
            network: network.into(),
            table: table.into(),
            key: key.into(),
            reply,
        })
        .await?
    }

    /// Live entries of a table, any owner (empty if stopped or not in the network).
    pub async fn entries(&self, network: &str, table: &str) -> Vec<Entry> {
        self.call(|reply| Command::Entries {
            network: network.into(),
            table: table.into(),
            reply,
        })
        .await
        .unwrap_or_default()
    }

    /// The networks whose tables are synced: a member's whole copy was merged, or nobody
    /// else has the network (see the `core` module docs). Until a network is, its
    /// [`Gossip::entries`] may hold only part of the picture (a restarted node's own
    /// records); [`Event::Synced`] reports the change, after the changes it brought.
    pub async fn synced(&self) -> BTreeSet<String> {
        self.call(Command::Synced).await.unwrap_or_default()
    }

    /// Retracts, in `networks`, the entries an earlier run of this node (before a restart)
    /// wrote and this run has not written again, as seen in peers' copies: the other nodes
    /// drop them now instead of after [`crate::core::RESTART_GRACE`]. Call it once
    /// everything this run keeps has been put (a key put later is simply written again).
    /// Returns how many were retracted.
    pub async fn retract_earlier_runs(&self, networks: BTreeSet<String>) -> usize {
        self.call(|reply| Command::RetractEarlierRuns { networks, reply })
            .await
            .unwrap_or_default()
    }

    /// Changes as they happen (see [`Event`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Every node this one knows, itself first.
    pub async fn members(&self) -> Vec<Member> {
        self.call(Command::Members).await.unwrap_or_default()
    }

    /// Packet and sync counters.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// Replaces the cluster keys (with [`Config::encrypt`]; ignored otherwise): the newest
    /// [`crate::seal::MAX_KEYS`] are kept, the newest seals, all of them open. Takes effect
    /// for the next packet either way.
    pub fn set_keys(&self, keys: &[Key]) {
        if !self.inner.sealing.on {
            return;
        }
        let ring = Keyring::new(keys);
        tracing::debug!(ids = ?ring.ids(), "gossip keys set");
        *self
            .inner
            .sealing
            .ring
            .write()
            .unwrap_or_else(|p| p.into_inner()) = ring;
    }

    /// The IDs of the keys held, oldest first (the last one seals); empty without keys or
    /// without encryption.
    pub fn key_ids(&self) -> Vec<u32> {
        self.inner.sealing.ring().ids()
    }

    /// Whether packets are sealed ([`Config::encrypt`]).
    pub fn encrypted(&self) -> bool {
        self.inner.sealing.on
    }

    /// Fault injection for tests: while on, every packet in or out is dropped and push-pull
    /// connections are refused, as if the node were cut off the network.
    pub fn set_isolated(&self, on: bool) {
        self.inner.isolated.store(on, Ordering::Relaxed);
    }

    /// Leaves gracefully (tells a few members this node is down, so the others drop its
    /// entries at once) and stops.
    pub async fn leave(&self) {
        let _ = self.call(Command::Leave).await;
        self.abort().await;
    }

    /// Stops at once without telling anyone (as a crash would) and waits until the sockets
    /// are closed.
    pub async fn abort(&self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut t = self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut *t)
        };
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// Runs one push-pull: connect, send `request`, read the answer.
async fn push_pull(
    to: SocketAddr,
    request: &SyncState,
    tag: u64,
    counters: &Counters,
    sealing: &Sealing,
) -> Result<SyncState, SyncError> {
    let bytes = sealing.seal_stream(wire::encode_sync(request, tag), counters)?;
    let run = async {
        let mut s = TcpStream::connect(to).await?;
        s.set_nodelay(true)?;
        s.write_all(&bytes).await?;
        s.flush().await?;
        read_sync(&mut s, tag, sealing).await
    };
    let r = match tokio::time::timeout(SYNC_TIMEOUT, run).await {
        Ok(r) => r,
        Err(_) => Err(SyncError::Timeout),
    };
    if let Err(e) = &r {
        count_reject(e, counters);
    }
    r
}

/// Why a push-pull failed.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("push-pull i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed push-pull stream: {0}")]
    Malformed(&'static str),
    #[error("push-pull stream of another cluster")]
    Foreign,
    #[error("push-pull timed out")]
    Timeout,
    #[error("push-pull frame refused: {0}")]
    Sealed(OpenError),
    #[error("no gossip key yet")]
    NoKey,
}

fn count_reject(e: &SyncError, counters: &Counters) {
    match e {
        SyncError::Malformed(_) => add(&counters.malformed, 1),
        SyncError::Foreign => add(&counters.foreign, 1),
        SyncError::Sealed(e) => count_open_error(*e, counters),
        _ => {}
    }
}

/// Reads a push-pull stream up to its `End` frame. A stream cut short is malformed.
async fn read_sync(s: &mut TcpStream, tag: u64, sealing: &Sealing) -> Result<SyncState, SyncError> {
    let mut reader = wire::SyncReader::new(tag);
    let truncated = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => SyncError::Malformed("truncated push-pull stream"),
        _ => SyncError::Io(e),
    };
    loop {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.map_err(truncated)?;
        let n = wire::frame_len(len).map_err(reject)?;
        let mut frame = vec![0u8; n];
        s.read_exact(&mut frame).await.map_err(truncated)?;
        let frame = if sealing.on {
            Cow::Owned(sealing.ring().open(&frame).map_err(SyncError::Sealed)?)
        } else {
            Cow::Borrowed(&frame[..])
        };
        if let Some(state) = reader.frame(&frame).map_err(reject)? {
            return Ok(state);
        }
    }
}

fn reject(r: Reject) -> SyncError {
    match r {
        Reject::Foreign => SyncError::Foreign,
        Reject::Malformed(why) => SyncError::Malformed(why),
    }
}

/// Accepts push-pull connections and answers them through the actor.
async fn listen(
    tcp: TcpListener,
    cmd: mpsc::Sender<Command>,
    isolated: Arc<AtomicBool>,
    counters: Arc<Counters>,
    sealing: Arc<Sealing>,
    tag: u64,
) {
    let slots = Arc::new(Semaphore::new(MAX_SYNC_IN));
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = tcp.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (mut s, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "gossip accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if isolated.load(Ordering::Relaxed) {
            continue;
        }
        add(&counters.tcp_in, 1);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many push-pulls, refusing one");
            continue;
        };
        let (cmd, counters, sealing) = (cmd.clone(), counters.clone(), sealing.clone());
        conns.spawn(async move {
            let _permit = permit;
            let serve = async {
                let req = read_sync(&mut s, tag, &sealing).await?;
                let (tx, rx) = oneshot::channel();
                if cmd
                    .send(Command::SyncRequest {
                        state: req,
                        reply: tx,
                    })
                    .await
                    .is_err()
                {
                    return Ok(());
                }
                let Ok(resp) = rx.await else { return Ok(()) };
                let bytes = sealing.seal_stream(wire::encode_sync(&resp, tag), &counters)?;
                s.write_all(&bytes).await?;
                s.flush().await?;
                Ok::<(), SyncError>(())
            };
            let r = match tokio::time::timeout(SYNC_TIMEOUT, serve).await {
                Ok(r) => r,
                Err(_) => Err(SyncError::Timeout),
            };
            if let Err(e) = r {
                count_reject(&e, &counters);
                tracing::debug!(%peer, error = %e, "answering push-pull");
            }
        });
    }
}

struct Actor {
    core: Core,
    udp: Arc<UdpSocket>,
    cmd_rx: mpsc::Receiver<Command>,
    cmd_tx: mpsc::Sender<Command>,
    events: broadcast::Sender<Event>,
    isolated: Arc<AtomicBool>,
    counters: Arc<Counters>,
    sealing: Arc<Sealing>,
    start: Instant,
    syncs: JoinSet<()>,
    sync_slots: Arc<Semaphore>,
    tag: u64,
}

impl Actor {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    async fn run(mut self) {
        let mut buf = vec![0u8; 65_536];
        loop {
            let deadline = tokio::time::Instant::from_std(self.start + self.core.next_deadline());
            let mut stop = false;
            tokio::select! {
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(c) => stop = self.command(c),
                    None => stop = true,
                },
                r = self.udp.recv_from(&mut buf) => match r {
                    Ok((n, _from)) => {
                        if !self.isolated.load(Ordering::Relaxed) {
                            self.receive(n, &buf);
                        }
                    }
                    Err(e) => {
                        tracing::trace!(error = %e, "gossip recv");
                    }
                },
                _ = tokio::time::sleep_until(deadline) => {
                    let now = self.now();
                    self.core.poll(now);
                }
                Some(_) = self.syncs.join_next(), if !self.syncs.is_empty() => {}
            }
            self.dispatch().await;
            if stop {
                break;
            }
        }
    }

    /// Hands a received packet (opened first when sealing) to the core; one that does not
    /// open is counted as received and dropped.
    fn receive(&mut self, n: usize, buf: &[u8]) {
        let now = self.now();
        match self.sealing.incoming(&buf[..n], &self.counters) {
            Some(plain) => self.core.handle_udp(&plain, now),
            None => {
                add(&self.counters.udp_in, 1);
                add(&self.counters.bytes_in, n as u64);
            }
        }
    }

    /// Serves a command; `true` to stop.
    fn command(&mut self, c: Command) -> bool {
        let now = self.now();
        match c {
            Command::Join { peers, reply } => {
                self.core.join(&peers, now);
                let _ = reply.send(self.core.sync_request());
            }
            Command::SetNetworks(n, reply) => {
                self.core.set_networks(&n, now);
                let _ = reply.send(());
            }
            Command::Put {
                network,
                table,
                key,
                value,
                reply,
            } => {
                let _ = reply.send(self.core.put(&network, &table, &key, value, now));
            }
            Command::Delete {
                network,
                table,
                key,
                reply,
            } => {
                let _ = reply.send(self.core.delete(&network, &table, &key, now));
            }
            Command::Entries {
                network,
                table,
                reply,
            } => {
                let _ = reply.send(self.core.entries(&network, &table));
            }
            Command::Members(reply) => {
                let _ = reply.send(self.core.members());
            }
            Command::Synced(reply) => {
                let _ = reply.send(self.core.synced());
            }
            Command::RetractEarlierRuns { networks, reply } => {
                let _ = reply.send(self.core.retract_earlier_runs(&networks, now));
            }
            Command::SyncRequest { state, reply } => {
                let resp = self.core.handle_sync_request(state, now);
                let _ = reply.send(resp);
            }
            Command::SyncResponse(state) => self.core.handle_sync_response(state, now),
            Command::SyncFailed => self.core.sync_failed(),
            Command::Leave(reply) => {
                self.core.leave(now);
                let _ = reply.send(());
                return true;
            }
        }
        false
    }

    async fn dispatch(&mut self) {
        let isolated = self.isolated.load(Ordering::Relaxed);
        for o in self.core.take_outputs() {
            match o {
                Output::Udp { to, data } => {
                    if isolated {
                        continue;
                    }
                    let Some(data) = self.sealing.outgoing(&data, &self.counters) else {
                        continue;
                    };
                    if let Err(e) = self.udp.send_to(&data, to).await {
                        tracing::trace!(%to, error = %e, "gossip send");
                    }
                }
                Output::Sync { to, request } => {
                    let permit = match self.sync_slots.clone().try_acquire_owned() {
                        Ok(p) if !isolated => p,
                        _ => {
                            self.core.sync_failed();
                            continue;
                        }
                    };
                    add(&self.counters.tcp_out, 1);
                    let (cmd, tag, counters, sealing) = (
                        self.cmd_tx.clone(),
                        self.tag,
                        self.counters.clone(),
                        self.sealing.clone(),
                    );
                    self.syncs.spawn(async move {
                        let _permit = permit;
                        let msg = match push_pull(to, &request, tag, &counters, &sealing).await {
                            Ok(resp) => Command::SyncResponse(resp),
                            Err(e) => {
                                tracing::debug!(%to, error = %e, "push-pull");
                                Command::SyncFailed
                            }
                        };
                        let _ = cmd.send(msg).await;
                    });
                }
                Output::Event(e) => {
                    if matches!(e, Event::NodeUp { .. } | Event::NodeDown { .. }) {
                        let alive = self.core.alive_count() as u64;
                        self.counters.alive_peers.store(alive, Ordering::Relaxed);
                    }
                    let _ = self.events.send(e);
                }
            }
        }
    }
}
