//! Encrypted overlays (`network create --opt encrypted`) without ESP or WireGuard in the
//! kernel: the VXLAN packets of encrypted networks go through a TUN device to this process,
//! which seals each one whole (AES-256-GCM) into a UDP datagram to the peer's tunnel port;
//! the peer opens it and writes the VXLAN packet into its own TUN device, from where the
//! kernel delivers it to its VXLAN socket as if it had come off the wire.
//!
//! - **Steering.** Encrypted networks' VXLAN devices use their own UDP port
//!   ([`encrypted_vxlan_port`]: the VXLAN port + 1), and a policy rule `ipproto udp dport
//!   THAT lookup` [`TABLE`] sends what they emit to the TUN device [`TUN_NAME`]. The table
//!   also has a blackhole default: while this process is down (the TUN device goes with it),
//!   those packets are dropped, never sent in the clear. The kernel's VXLAN code routes with
//!   the ports in its flow, so nothing else is touched.
//! - **Who may send.** The member filter (`filter`) drops datagrams to the tunnel port
//!   ([`tunnel_port`]: the VXLAN port + 2) from non-members, and packets to the encrypted
//!   VXLAN port that do not come out of the TUN device: a member cannot inject plaintext
//!   frames into an encrypted network. A tunnel datagram is opened only if its sender is a
//!   member, and its VXLAN packet is delivered only if it comes from the sender's own
//!   address to this host's encrypted VXLAN port.
//! - **Keys.** The caller hands in the swarm's rotating keys (the gossip keys: made by the
//!   leader, handed to members over mutual TLS, rotated every 12 h, three kept, and replaced
//!   at once when a node is removed); each is stretched with HKDF-SHA256 into this
//!   protocol's own AES-256-GCM key. The newest seals; every key held opens.
//! - **Datagram.** `MX`, version 1, the key ID (4 bytes), a 12-byte nonce (8 random bytes
//!   chosen at start and whenever the 4-byte counter after them wraps), then the sealed
//!   packet and its 16-byte tag. The first 7 bytes are authenticated. A receiver keeps a
//!   64-packet window per nonce prefix and drops replays.
//!
//! The cost is throughput: every packet crosses into this process twice (see
//! `docs/benchmarks.md`).

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use mesh_netlink::{Handle, Netns, Tun};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use tracing::{debug, info, warn};

use crate::OverlayError;

/// The TUN device in the host namespace.
pub const TUN_NAME: &str = "mesh-crypt";
/// The TUN device's own address (link-local, the same on every host, never a source): the
/// kernel's reverse-path check drops what arrives on a device without an IPv4 address.
pub const TUN_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 79, 1);
/// The routing table that leads to it.
pub const TABLE: u32 = 0x6d63;
/// The priority of the rule that looks that table up.
const RULE_PRIORITY: u32 = 90;
/// The blackhole route's metric in [`TABLE`].
const BLACKHOLE_METRIC: u32 = 4096;
/// What the tunnel adds to a VXLAN packet on the underlay: IPv4 and UDP headers, the
/// datagram's header and nonce, the tag.
pub const OVERHEAD: u32 = 20 + 8 + HEADER as u32 + 16;

const MAGIC: &[u8; 2] = b"MX";
const VERSION: u8 = 1;
/// Magic, version, key ID (the authenticated part), then the nonce.
const AAD_LEN: usize = 7;
const HEADER: usize = AAD_LEN + NONCE_LEN;
const TAG_LEN: usize = 16;
/// How long a forwarding thread waits for a packet before it looks at its stop flag.
const POLL: Duration = Duration::from_millis(200);

/// The UDP port of encrypted networks' VXLAN devices.
pub fn encrypted_vxlan_port(vxlan_port: u16) -> u16 {
    vxlan_port.wrapping_add(1)
}

/// The tunnel's UDP port on the underlay.
pub fn tunnel_port(vxlan_port: u16) -> u16 {
    vxlan_port.wrapping_add(2)
}

/// A key of the swarm: its ID and secret.
#[derive(Clone)]
pub struct TunnelKey {
    pub id: u32,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for TunnelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TunnelKey({})", self.id)
    }
}

/// The keys that open, and the one that seals (the last given).
#[derive(Default)]
pub struct Keyring {
    keys: Vec<(u32, LessSafeKey)>,
}

impl Keyring {
    pub fn new(keys: &[TunnelKey]) -> Keyring {
        let mut keys = keys.to_vec();
        keys.sort_by_key(|k| k.id);
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"mesh overlay encryption v1");
        let keys = keys
            .iter()
            .filter_map(|k| {
                let prk = salt.extract(&k.secret);
                let okm = prk.expand(&[b"aes-256-gcm"], &AES_256_GCM).ok()?;
                Some((k.id, LessSafeKey::new(UnboundKey::from(okm))))
            })
            .collect();
        Keyring { keys }
    }

    pub fn ids(&self) -> Vec<u32> {
        self.keys.iter().map(|(id, _)| *id).collect()
    }

    /// Seals `packet` with the newest key and `nonce` into a datagram.
    fn seal(&self, nonce: [u8; NONCE_LEN], packet: &[u8]) -> Option<Vec<u8>> {
        let (id, key) = self.keys.last()?;
        let mut out = Vec::with_capacity(HEADER + packet.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(packet);
        let (head, body) = out.split_at_mut(HEADER);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&head[..AAD_LEN]),
                body,
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    /// Opens a datagram in place: the packet, and the nonce it was sealed with.
    fn open<'a>(&self, datagram: &'a mut [u8]) -> Result<(&'a [u8], [u8; NONCE_LEN]), Refused> {
        if datagram.len() < HEADER + TAG_LEN || &datagram[..2] != MAGIC {
            return Err(Refused::Malformed);
        }
        if datagram[2] != VERSION {
            return Err(Refused::Malformed);
        }
        let id = u32::from_be_bytes([datagram[3], datagram[4], datagram[5], datagram[6]]);
        let key = self
            .keys
            .iter()
            .find(|(k, _)| *k == id)
            .map(|(_, key)| key)
            .ok_or(Refused::UnknownKey)?;
        let (head, body) = datagram.split_at_mut(HEADER);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&head[AAD_LEN..HEADER]);
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&head[..AAD_LEN]),
                body,
            )
            .map_err(|_| Refused::BadTag)?;
        Ok((plain, nonce))
    }
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    Malformed,
    UnknownKey,
    BadTag,
    Replay,
}

/// Nonces for one sender: a random prefix and a counter; a new prefix when it wraps.
struct Nonces {
    rng: SystemRandom,
    prefix: [u8; 8],
    counter: u32,
}

impl Nonces {
    fn new() -> Nonces {
        let mut n = Nonces {
            rng: SystemRandom::new(),
            prefix: [0; 8],
            counter: 0,
        };
        n.reseed();
        n
    }

    fn reseed(&mut self) {
        if self.rng.fill(&mut self.prefix).is_err() {
            // No randomness: no packet is sealed with a nonce that could repeat.
            self.prefix = [0; 8];
        }
        self.counter = 0;
    }

    fn next(&mut self) -> Option<[u8; NONCE_LEN]> {
        if self.prefix == [0; 8] {
            self.reseed();
            if self.prefix == [0; 8] {
                return None;
            }
        }
        let mut n = [0u8; NONCE_LEN];
        n[..8].copy_from_slice(&self.prefix);
        n[8..].copy_from_slice(&self.counter.to_be_bytes());
        match self.counter.checked_add(1) {
            Some(c) => self.counter = c,
            None => self.reseed(),
        }
        Some(n)
    }
}

/// Replay windows by nonce prefix: the highest counter seen and the 64 below it.
#[derive(Default)]
struct Replay {
    windows: HashMap<[u8; 8], (u32, u64)>,
}

impl Replay {
    /// Whether the nonce is new (and remembers it).
    fn fresh(&mut self, nonce: &[u8; NONCE_LEN]) -> bool {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&nonce[..8]);
        let counter = u32::from_be_bytes([nonce[8], nonce[9], nonce[10], nonce[11]]);
        if self.windows.len() > 4096 && !self.windows.contains_key(&prefix) {
            self.windows.clear();
        }
        let (top, bits) = self.windows.entry(prefix).or_insert((counter, 0));
        if counter > *top {
            let shift = counter - *top;
            *bits = if shift >= 64 { 0 } else { *bits << shift };
            *bits |= 1;
            *top = counter;
            true
        } else {
            let back = *top - counter;
            if back >= 64 || *bits & (1 << back) != 0 {
                return false;
            }
            *bits |= 1 << back;
            true
        }
    }
}

/// Counters of the tunnel.
#[derive(Debug, Default)]
pub struct TunnelStats {
    pub sealed: AtomicU64,
    pub opened: AtomicU64,
    /// Datagrams dropped: malformed, unknown key, bad tag, replayed, or from a non-member.
    pub dropped: AtomicU64,
}

/// Settings of a [`Tunnel`].
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    /// This host's underlay address.
    pub vtep: Ipv4Addr,
    /// The overlay's VXLAN port (see [`encrypted_vxlan_port`], [`tunnel_port`]).
    pub vxlan_port: u16,
    /// The underlay's MTU.
    pub underlay_mtu: u32,
}

/// The running tunnel: its device, routing and forwarding threads. See the module docs.
pub struct Tunnel {
    cfg: TunnelConfig,
    keys: Arc<RwLock<Keyring>>,
    peers: Arc<RwLock<BTreeSet<Ipv4Addr>>>,
    stats: Arc<TunnelStats>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Tunnel {
    /// Creates the TUN device and its routing in `host_ns` (through `host`, a handle there),
    /// and starts forwarding. Without keys nothing is sealed or opened.
    pub async fn start(
        host_ns: &Netns,
        host: &Handle,
        cfg: TunnelConfig,
    ) -> Result<Tunnel, OverlayError> {
        let port = tunnel_port(cfg.vxlan_port);
        let (tun, sock) = host_ns.run(move || {
            let tun = Tun::create(TUN_NAME)?;
            let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).map_err(
                |source| mesh_netlink::NetlinkError::Namespace {
                    op: "bind the tunnel port",
                    path: format!("0.0.0.0:{port}").into(),
                    source,
                },
            )?;
            // Loose reverse-path checks: a peer's address arrives on the TUN device,
            // while the route back to it is the underlay's (strict would drop it; and
            // the device needs an address of its own, `TUN_ADDR`, for either).
            let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{TUN_NAME}/rp_filter"), "2");
            Ok::<_, mesh_netlink::NetlinkError>((tun, sock))
        })??;
        let tun_mtu = cfg.underlay_mtu.saturating_sub(OVERHEAD);
        host.set_mtu(TUN_NAME, tun_mtu).await?;
        host.add_address(TUN_NAME, TUN_ADDR, 32).await?;
        host.set_up(TUN_NAME).await?;
        host.set_table_blackhole(TABLE, BLACKHOLE_METRIC).await?;
        host.set_table_default_route(TABLE, None, TUN_NAME).await?;
        host.add_udp_dport_rule(encrypted_vxlan_port(cfg.vxlan_port), TABLE, RULE_PRIORITY)
            .await?;
        sock.set_read_timeout(Some(POLL))
            .map_err(|e| OverlayError::Tunnel(e.to_string()))?;
        let mut t = Tunnel {
            cfg,
            keys: Arc::default(),
            peers: Arc::default(),
            stats: Arc::default(),
            stop: Arc::default(),
            threads: Vec::new(),
        };
        let tun = Arc::new(tun);
        let sock = Arc::new(sock);
        t.threads.push(t.spawn_out(tun.clone(), sock.clone())?);
        t.threads.push(t.spawn_in(tun, sock)?);
        info!(mtu = tun_mtu, port, "overlay encryption tunnel up");
        Ok(t)
    }

    /// The keys from now on (the newest last).
    pub fn set_keys(&self, keys: &[TunnelKey]) {
        let ring = Keyring::new(keys);
        debug!(ids = ?ring.ids(), "tunnel keys");
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = ring;
    }

    /// The members' underlay addresses: the only peers sent to and accepted from.
    pub fn set_peers(&self, peers: impl IntoIterator<Item = Ipv4Addr>) {
        *self.peers.write().unwrap_or_else(|p| p.into_inner()) = peers.into_iter().collect();
    }

    pub fn stats(&self) -> &TunnelStats {
        &self.stats
    }

    /// Stops forwarding and removes the device and its routing.
    pub async fn stop(mut self, host: &Handle) -> Result<(), OverlayError> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        // The device went with its file, closed with the threads.
        remove_routing(host, self.cfg.vxlan_port).await?;
        info!("overlay encryption tunnel down");
        Ok(())
    }

    /// TUN -> seal -> the peer's tunnel port.
    fn spawn_out(
        &self,
        tun: Arc<Tun>,
        sock: Arc<UdpSocket>,
    ) -> Result<JoinHandle<()>, OverlayError> {
        let (keys, peers, stats, stop) = (
            self.keys.clone(),
            self.peers.clone(),
            self.stats.clone(),
            self.stop.clone(),
        );
        let port = tunnel_port(self.cfg.vxlan_port);
        std::thread::Builder::new()
            .name("tunnel-out".into())
            .spawn(move || {
                let mut nonces = Nonces::new();
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let n = match tun.recv_timeout(&mut buf, POLL) {
                        Ok(Some(n)) => n,
                        Ok(None) => continue,
                        Err(e) => {
                            warn!("reading the tunnel device: {e}");
                            std::thread::sleep(POLL);
                            continue;
                        }
                    };
                    let Some((_, dst)) = ipv4_addrs(&buf[..n]) else {
                        continue;
                    };
                    if !peers
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains(&dst)
                    {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let sealed = nonces.next().and_then(|nonce| {
                        keys.read()
                            .unwrap_or_else(|p| p.into_inner())
                            .seal(nonce, &buf[..n])
                    });
                    let Some(sealed) = sealed else {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    match sock.send_to(&sealed, SocketAddrV4::new(dst, port)) {
                        Ok(_) => {
                            stats.sealed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => debug!(%dst, "sending a tunnel datagram: {e}"),
                    }
                }
            })
            .map_err(|e| OverlayError::Tunnel(e.to_string()))
    }

    /// Tunnel port -> open -> TUN.
    fn spawn_in(
        &self,
        tun: Arc<Tun>,
        sock: Arc<UdpSocket>,
    ) -> Result<JoinHandle<()>, OverlayError> {
        let (keys, peers, stats, stop) = (
            self.keys.clone(),
            self.peers.clone(),
            self.stats.clone(),
            self.stop.clone(),
        );
        let (vtep, vxlan_port) = (self.cfg.vtep, encrypted_vxlan_port(self.cfg.vxlan_port));
        std::thread::Builder::new()
            .name("tunnel-in".into())
            .spawn(move || {
                let mut replay = Replay::default();
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let (n, from) = match sock.recv_from(&mut buf) {
                        Ok((n, std::net::SocketAddr::V4(from))) => (n, *from.ip()),
                        Ok(_) => continue,
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            continue
                        }
                        Err(e) => {
                            warn!("reading the tunnel port: {e}");
                            std::thread::sleep(POLL);
                            continue;
                        }
                    };
                    let refuse = |_why: Refused| {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                    };
                    if !peers
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains(&from)
                    {
                        refuse(Refused::Malformed);
                        continue;
                    }
                    let ring = keys.read().unwrap_or_else(|p| p.into_inner());
                    let (packet, nonce) = match ring.open(&mut buf[..n]) {
                        Ok(p) => p,
                        Err(why) => {
                            refuse(why);
                            continue;
                        }
                    };
                    // Only the sender's own VXLAN packets, to this host's encrypted port.
                    if vxlan_to(packet) != Some((from, vtep, vxlan_port)) {
                        refuse(Refused::Malformed);
                        continue;
                    }
                    if !replay.fresh(&nonce) {
                        refuse(Refused::Replay);
                        continue;
                    }
                    if let Err(e) = tun.send(packet) {
                        debug!("writing to the tunnel device: {e}");
                        continue;
                    }
                    stats.opened.fetch_add(1, Ordering::Relaxed);
                }
            })
            .map_err(|e| OverlayError::Tunnel(e.to_string()))
    }
}

/// Removes the tunnel's rule and blackhole route from the host namespace of `host`: what
/// [`Tunnel::stop`] removes, and what a daemon killed while it ran leaves behind.
pub async fn remove_routing(host: &Handle, vxlan_port: u16) -> Result<(), OverlayError> {
    host.del_udp_dport_rule(encrypted_vxlan_port(vxlan_port), TABLE, RULE_PRIORITY)
        .await?;
    host.del_table_blackhole(TABLE, BLACKHOLE_METRIC).await?;
    Ok(())
}

/// Source and destination of an IPv4 packet.
fn ipv4_addrs(p: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let a = |i: usize| Ipv4Addr::new(p[i], p[i + 1], p[i + 2], p[i + 3]);
    Some((a(12), a(16)))
}

/// Source, destination and UDP destination port of an IPv4 UDP packet.
fn vxlan_to(p: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u16)> {
    let (src, dst) = ipv4_addrs(p)?;
    let ihl = usize::from(p[0] & 0x0f) * 4;
    if p[9] != 17 || p.len() < ihl + 8 {
        return None;
    }
    Some((src, dst, u16::from_be_bytes([p[ihl + 2], p[ihl + 3]])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u32, b: u8) -> TunnelKey {
        TunnelKey {
            id,
            secret: vec![b; 32],
        }
    }

    #[test]
    fn sealed_datagrams_open_with_any_key_held_and_nothing_else() {
        let old = Keyring::new(&[key(1, 7)]);
        let both = Keyring::new(&[key(1, 7), key(2, 9)]);
        let mut nonces = Nonces::new();
        let packet = b"a vxlan packet with a known payload".to_vec();
        let mut d = both.seal(nonces.next().unwrap(), &packet).unwrap();
        assert_eq!(d.len(), packet.len() + HEADER + TAG_LEN);
        assert_eq!(&d[3..7], &2u32.to_be_bytes(), "sealed with the newest key");
        assert!(
            !d.windows(packet.len()).any(|w| w == packet.as_slice()),
            "no plaintext in the datagram"
        );
        assert_eq!(old.open(&mut d.clone()).unwrap_err(), Refused::UnknownKey);
        assert_eq!(both.open(&mut d.clone()).unwrap().0, packet.as_slice());
        // Sealed with the older key: every holder opens it.
        let mut d1 = old.seal(nonces.next().unwrap(), &packet).unwrap();
        assert_eq!(both.open(&mut d1).unwrap().0, packet.as_slice());
        // One flipped bit anywhere: refused.
        for i in [0, 5, HEADER - 1, HEADER + 3, d.len() - 1] {
            let mut bad = d.clone();
            bad[i] ^= 0x10;
            assert!(both.open(&mut bad).is_err(), "bit flipped at {i}");
        }
        // The same secret under another ID is another key.
        let renamed = Keyring::new(&[key(3, 9)]);
        d[3..7].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(renamed.open(&mut d).unwrap_err(), Refused::BadTag);
        assert!(Keyring::default().seal([1; NONCE_LEN], &packet).is_none());
        assert_eq!(
            both.open(&mut b"MX".to_vec()).unwrap_err(),
            Refused::Malformed
        );
    }

    #[test]
    fn nonces_never_repeat_across_a_wrap() {
        let mut n = Nonces::new();
        let first = n.next().unwrap();
        n.counter = u32::MAX;
        let last = n.next().unwrap();
        let after = n.next().unwrap();
        assert_eq!(&last[8..], &u32::MAX.to_be_bytes());
        assert_ne!(&after[..8], &first[..8], "a new prefix after the wrap");
        assert_eq!(&after[8..], &0u32.to_be_bytes());
    }

    #[test]
    fn replays_are_refused_reordering_within_the_window_is_not() {
        let mut r = Replay::default();
        let nonce = |p: u8, c: u32| {
            let mut n = [p; NONCE_LEN];
            n[8..].copy_from_slice(&c.to_be_bytes());
            n
        };
        assert!(r.fresh(&nonce(1, 10)));
        assert!(!r.fresh(&nonce(1, 10)));
        assert!(r.fresh(&nonce(1, 12)));
        assert!(r.fresh(&nonce(1, 11)), "late but within the window");
        assert!(!r.fresh(&nonce(1, 11)));
        assert!(r.fresh(&nonce(1, 100)));
        assert!(!r.fresh(&nonce(1, 12)), "fell out of the window");
        assert!(r.fresh(&nonce(2, 10)), "another sender");
    }

    #[test]
    fn only_a_senders_own_vxlan_packets_pass() {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[22..24].copy_from_slice(&4790u16.to_be_bytes());
        assert_eq!(
            vxlan_to(&p),
            Some((Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 4790))
        );
        p[9] = 6;
        assert_eq!(vxlan_to(&p), None);
        assert_eq!(vxlan_to(&p[..10]), None);
        assert_eq!(encrypted_vxlan_port(4789), 4790);
        assert_eq!(tunnel_port(4789), 4791);
    }
}
