//! An rtnetlink connection bound to one network namespace, and the link,
//! address, route, neighbour (ARP) and FDB operations the overlay needs.
//!
//! A netlink socket acts on the namespace of the thread that *created* it,
//! whatever thread uses it later. [`Handle::new`] therefore opens the socket
//! on a throwaway OS thread that first `setns`es into the target namespace,
//! while having entered the caller's tokio runtime so that the socket is
//! registered with that runtime's reactor; the connection is then driven by
//! a task on the caller's runtime like any other.
//!
//! Every request is bounded by a timeout (5 s by default). Creation and
//! `set_*` calls are idempotent where the natural reading allows: the
//! callers are reconcilers that re-run.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use futures_util::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoPortData, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags,
    LinkInfo as NlLinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAttribute, RouteMetric};
use netlink_packet_route::AddressFamily;
use rtnetlink::{
    LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan,
    RouteMessageBuilder,
};

use crate::error::to_io;
use crate::netns::setns_net;
use crate::{format_mac, NetlinkError, Netns};

/// Default bound on one netlink request (a dump counts as one request).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`Handle::links`] reports about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface name.
    pub name: String,
    /// Interface index (unique within the namespace).
    pub index: u32,
    /// `IFLA_INFO_KIND`: "bridge", "vxlan", "veth", ...; `None` for
    /// physical devices and `lo`.
    pub kind: Option<String>,
    /// MTU.
    pub mtu: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// `IFF_LOOPBACK`.
    pub loopback: bool,
    /// Index of the master (the bridge a port is enslaved to).
    pub master: Option<u32>,
    /// Hardware address, when it is an Ethernet one.
    pub mac: Option<[u8; 6]>,
    /// VXLAN network identifier, for vxlan links.
    pub vni: Option<u32>,
}

/// An entry of a bridge's forwarding database, as [`Handle::bridge_fdb`] lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BridgeFdbEntry {
    /// The hardware address.
    pub mac: [u8; 6],
    /// Index of the port frames to `mac` leave by.
    pub port: u32,
    /// Added as `static` (never ages); else learned.
    pub is_static: bool,
}

/// An rtnetlink connection inside one network namespace. Cheap to clone;
/// the connection closes when the last clone is dropped.
#[derive(Clone)]
pub struct Handle {
    inner: rtnetlink::Handle,
    ns: Arc<str>,
    timeout: Duration,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("ns", &self.ns)
            .field("timeout", &self.timeout)
            .finish()
    }
}

type Connection = rtnetlink::proto::Connection<netlink_packet_route::RouteNetlinkMessage>;

impl Handle {
    /// Opens a connection bound to `ns`. Must be called within a tokio
    /// runtime with I/O and time enabled; the connection is driven by a task
    /// spawned on it.
    pub async fn new(ns: &Netns) -> Result<Handle, NetlinkError> {
        let name: Arc<str> = Arc::from(ns.name());
        let sock_err = |source: io::Error| NetlinkError::Socket {
            ns: name.to_string(),
            source,
        };
        let rt = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime {
            ns: name.to_string(),
        })?;
        let fd = ns.as_fd().try_clone_to_owned().map_err(sock_err)?;
        let (tx, rx) =
            tokio::sync::oneshot::channel::<io::Result<(Connection, rtnetlink::Handle)>>();
        thread::Builder::new()
            .name("netns-netlink".to_string())
            .spawn(move || {
                let opened = (|| {
                    setns_net(fd.as_raw_fd())?;
                    let _entered = rt.enter();
                    let (conn, handle, _unsolicited) = rtnetlink::new_connection()?;
                    Ok((conn, handle))
                })();
                // The receiver only goes away if the caller was cancelled.
                let _ = tx.send(opened);
            })
            .map_err(sock_err)?;
        let (conn, inner) = rx
            .await
            .map_err(|_| sock_err(io::Error::other("the socket thread died")))?
            .map_err(sock_err)?;
        tokio::spawn(conn);
        Ok(Handle {
            inner,
            ns: name,
            timeout: REQUEST_TIMEOUT,
        })
    }

    /// The same connection with another bound per request.
    pub fn with_timeout(mut self, timeout: Duration) -> Handle {
        self.timeout = timeout;
        self
    }

    /// The name of the namespace this handle acts in (as in messages).
    pub fn ns_name(&self) -> &str {
        &self.ns
    }

    /// Runs one request under the timeout, naming `op` and `object` in errors.
    async fn call<T>(
        &self,
        op: &'static str,
        object: impl FnOnce() -> String,
        fut: impl Future<Output = Result<T, rtnetlink::Error>>,
    ) -> Result<T, NetlinkError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(NetlinkError::Request {
                op,
                object: object(),
                ns: self.ns.to_string(),
                source: to_io(e),
            }),
            Err(_) => Err(NetlinkError::Timeout {
                op,
                object: object(),
                ns: self.ns.to_string(),
                timeout: self.timeout,
            }),
        }
    }

    fn not_found(&self, name: &str) -> NetlinkError {
        NetlinkError::LinkNotFound {
            name: name.to_string(),
            ns: self.ns.to_string(),
        }
    }

    // ---- links -------------------------------------------------------

    /// The link named `name`, if it exists.
    pub async fn link(&self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        let req = self.inner.link().get().match_name(name).execute();
        match self
            .call(
                "look up",
                || format!("link {name}"),
                req.try_collect::<Vec<_>>(),
            )
            .await
        {
            Ok(msgs) => Ok(msgs.into_iter().next().map(parse_link)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The index of the link named `name`, if it exists.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        Ok(self.link(name).await?.map(|l| l.index))
    }

    async fn require_index(&self, name: &str) -> Result<u32, NetlinkError> {
        self.link_index(name)
            .await?
            .ok_or_else(|| self.not_found(name))
    }

    /// All links of the namespace, by index.
    pub async fn links(&self) -> Result<Vec<LinkInfo>, NetlinkError> {
        let req = self.inner.link().get().execute();
        let msgs = self
            .call("list", || "links".to_string(), req.try_collect::<Vec<_>>())
            .await?;
        let mut links: Vec<LinkInfo> = msgs.into_iter().map(parse_link).collect();
        links.sort_by_key(|l| l.index);
        Ok(links)
    }

    /// Sends a link creation; on `EEXIST`, accepts an existing link of the
    /// same kind (and VNI, for vxlan) and returns its index, after setting
    /// `mtu` on it if given. Otherwise returns the new link's index.
    async fn create_link(
        &self,
        kind: &'static str,
        name: &str,
        peer: Option<&str>,
        vni: Option<u32>,
        mtu: Option<u32>,
        msg: LinkMessage,
    ) -> Result<u32, NetlinkError> {
        let created = self
            .call(
                "create",
                || match peer {
                    Some(peer) => format!("{kind} {name} (peer {peer})"),
                    None => format!("{kind} {name}"),
                },
                self.inner.link().add(msg).execute(),
            )
            .await;
        match created {
            Ok(()) => {
                tracing::debug!(ns = %self.ns, kind, name, "created link");
                self.require_index(name).await
            }
            Err(e) if e.errno() == Some(libc::EEXIST) => {
                // EEXIST without a link of that name: another kind of clash
                // (e.g. a vxlan with this VNI and port elsewhere).
                let Some(link) = self.link(name).await? else {
                    return Err(e);
                };
                if link.kind.as_deref() != Some(kind) || (vni.is_some() && link.vni != vni) {
                    let found = match (&link.kind, link.vni) {
                        (Some(k), Some(v)) => format!("{k} vni {v}"),
                        (Some(k), None) => k.clone(),
                        (None, _) => "device".to_string(),
                    };
                    return Err(NetlinkError::LinkMismatch {
                        kind,
                        name: name.to_string(),
                        ns: self.ns.to_string(),
                        found,
                    });
                }
                if let Some(mtu) = mtu {
                    if link.mtu != Some(mtu) {
                        self.set_mtu(name, mtu).await?;
                    }
                }
                Ok(link.index)
            }
            Err(e) => Err(e),
        }
    }

    /// Creates bridge `name` (up). Idempotent: an existing bridge of that
    /// name is kept. Returns its index.
    pub async fn add_bridge(&self, name: &str, mtu: Option<u32>) -> Result<u32, NetlinkError> {
        let mut b = LinkBridge::new(name);
        if let Some(mtu) = mtu {
            b = b.mtu(mtu);
        }
        self.create_link("bridge", name, None, None, mtu, b.build())
            .await
    }

    /// Creates VXLAN `name` in this handle's namespace: VNI `vni`, UDP
    /// destination port `port`, source `local`, underlay device `dev` if
    /// given, learning off and ARP proxy on (the kernel answers ARP requests
    /// from the neighbour entries set on the device, so no ARP crosses the
    /// overlay). Its UDP socket lives in this namespace even after the device
    /// is moved elsewhere. Idempotent for an existing vxlan with the same VNI.
    /// Returns its index.
    pub async fn add_vxlan(
        &self,
        name: &str,
        vni: u32,
        port: u16,
        local: Ipv4Addr,
        dev: Option<u32>,
        mtu: Option<u32>,
    ) -> Result<u32, NetlinkError> {
        let mut b = LinkVxlan::new(name, vni)
            .port(port)
            .local(local)
            .learning(false)
            .proxy(true);
        if let Some(dev) = dev {
            b = b.dev(dev);
        }
        if let Some(mtu) = mtu {
            b = b.mtu(mtu);
        }
        self.create_link("vxlan", name, None, Some(vni), mtu, b.build())
            .await
    }

    /// Creates the veth pair `a` (here) <-> `b`; `b` is created directly in
    /// `peer_ns` if given, else here. Both ends get `mtu` if given.
    /// Idempotent: an existing veth `a` is kept (its peer is not checked).
    /// Returns the index of `a`.
    pub async fn add_veth(
        &self,
        a: &str,
        b: &str,
        peer_ns: Option<&Netns>,
        mtu: Option<u32>,
    ) -> Result<u32, NetlinkError> {
        let mut peer = LinkMessageBuilder::<LinkUnspec>::new().name(b);
        if let Some(mtu) = mtu {
            peer = peer.mtu(mtu);
        }
        if let Some(ns) = peer_ns {
            peer = peer.setns_by_fd(ns.fd());
        }
        let mut builder =
            LinkVeth::new(a, b).set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())));
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        self.create_link("veth", a, Some(b), None, mtu, builder.build())
            .await
    }

    /// Sends a `RTM_SETLINK` for link `name`, built from its index.
    async fn set_link(
        &self,
        op: &'static str,
        name: &str,
        build: impl FnOnce(LinkMessageBuilder<LinkUnspec>) -> LinkMessageBuilder<LinkUnspec>,
    ) -> Result<(), NetlinkError> {
        let index = self.require_index(name).await?;
        let msg = build(LinkUnspec::new_with_index(index)).build();
        self.call(
            op,
            || format!("link {name}"),
            self.inner.link().set(msg).execute(),
        )
        .await
    }

    /// Moves link `name` into namespace `ns` (it keeps its name there).
    pub async fn move_to_ns(&self, name: &str, ns: &Netns) -> Result<(), NetlinkError> {
        let fd = ns.fd();
        let target = ns.name().to_string();
        let index = self.require_index(name).await?;
        let msg = LinkUnspec::new_with_index(index).setns_by_fd(fd).build();
        self.call(
            "move",
            || format!("link {name} to namespace {target}"),
            self.inner.link().set(msg).execute(),
        )
        .await
    }

    /// Renames link `name` to `new_name` (the kernel refuses to rename a
    /// link that is up). Idempotent: done if only `new_name` exists.
    pub async fn rename(&self, name: &str, new_name: &str) -> Result<(), NetlinkError> {
        if self.link_index(name).await?.is_none() && self.link_index(new_name).await?.is_some() {
            return Ok(());
        }
        let new_name = new_name.to_string();
        self.set_link("rename", name, |b| b.name(new_name)).await
    }

    /// Enslaves link `name` to bridge `master`.
    pub async fn set_master(&self, name: &str, master: &str) -> Result<(), NetlinkError> {
        let master_index = self.require_index(master).await?;
        self.set_link("set master of", name, |b| b.controller(master_index))
            .await
    }

    /// Sets the isolation of bridge port `name` (`IFLA_BRPORT_ISOLATED`, as
    /// `ip link set NAME type bridge_slave isolated on`): isolated ports of a
    /// bridge exchange no frames with each other, only with the bridge itself
    /// and non-isolated ports. `name` must be enslaved to a bridge.
    /// Idempotent.
    pub async fn set_port_isolated(&self, name: &str, isolated: bool) -> Result<(), NetlinkError> {
        let index = self.require_index(name).await?;
        // Port attributes need RTM_NEWLINK without NLM_F_CREATE (the kernel's
        // RTM_SETLINK ignores IFLA_INFO_SLAVE_DATA).
        let msg = LinkBridgePort::new(index).isolated(isolated).build();
        self.call(
            "set isolation of",
            || format!("bridge port {name}"),
            self.inner.link().set_port(msg).execute(),
        )
        .await
    }

    /// Whether bridge port `name` is isolated; `None` if `name` is not a
    /// bridge port.
    pub async fn port_isolated(&self, name: &str) -> Result<Option<bool>, NetlinkError> {
        let req = self.inner.link().get().match_name(name).execute();
        let msgs: Vec<LinkMessage> = match self
            .call("look up", || format!("link {name}"), req.try_collect())
            .await
        {
            Ok(msgs) => msgs,
            Err(e) if e.is_not_found() => return Err(self.not_found(name)),
            Err(e) => return Err(e),
        };
        let Some(msg) = msgs.into_iter().next() else {
            return Err(self.not_found(name));
        };
        Ok(msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                NlLinkInfo::PortData(InfoPortData::BridgePort(p)) => Some(
                    p.iter()
                        .any(|x| matches!(x, InfoBridgePort::Isolated(true))),
                ),
                _ => None,
            }),
            _ => None,
        }))
    }

    /// Sets link `name` administratively up.
    pub async fn set_up(&self, name: &str) -> Result<(), NetlinkError> {
        self.set_link("set up", name, |b| b.up()).await
    }

    /// Sets the MTU of link `name`.
    pub async fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        self.set_link("set mtu of", name, |b| b.mtu(mtu)).await
    }

    /// Sets the hardware address of link `name`.
    pub async fn set_mac(&self, name: &str, mac: [u8; 6]) -> Result<(), NetlinkError> {
        self.set_link("set mac of", name, |b| b.address(mac.to_vec()))
            .await
    }

    /// Deletes link `name` (a veth takes its peer along). Idempotent.
    pub async fn del_link(&self, name: &str) -> Result<(), NetlinkError> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(());
        };
        match self
            .call(
                "delete",
                || format!("link {name}"),
                self.inner.link().del(index).execute(),
            )
            .await
        {
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
            Ok(()) => {
                tracing::debug!(ns = %self.ns, name, "deleted link");
                Ok(())
            }
        }
    }

    // ---- addresses and routes -----------------------------------------

    /// Adds `addr/prefix` to link `name`. Idempotent (`EEXIST` is fine).
    pub async fn add_address(
        &self,
        name: &str,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        let index = self.require_index(name).await?;
        let req = self
            .inner
            .address()
            .add(index, IpAddr::V4(addr), prefix)
            .execute();
        match self
            .call("add", || format!("address {addr}/{prefix} to {name}"), req)
            .await
        {
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// Removes `addr/prefix` from link `name`. Idempotent (an address that is not there is
    /// fine).
    pub async fn del_address(
        &self,
        name: &str,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        for msg in self.address_messages(name).await? {
            if msg.header.prefix_len != prefix || address_of(&msg) != Some(addr) {
                continue;
            }
            let req = self.inner.address().del(msg).execute();
            match self
                .call(
                    "delete",
                    || format!("address {addr}/{prefix} from {name}"),
                    req,
                )
                .await
            {
                Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) => {}
                other => other?,
            }
        }
        Ok(())
    }

    async fn address_messages(&self, name: &str) -> Result<Vec<AddressMessage>, NetlinkError> {
        let index = self.require_index(name).await?;
        let req = self
            .inner
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        self.call("list", || format!("addresses of {name}"), req.try_collect())
            .await
    }

    /// The IPv4 addresses of link `name`, with their prefix lengths.
    pub async fn addresses(&self, name: &str) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        Ok(self
            .address_messages(name)
            .await?
            .iter()
            .filter_map(|m| Some((address_of(m)?, m.header.prefix_len)))
            .collect())
    }

    /// Sets the default route via `gw` (replace semantics: idempotent, and
    /// a different gateway is replaced).
    pub async fn add_default_route(&self, gw: Ipv4Addr) -> Result<(), NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw).build();
        self.replace_route(msg, || format!("default route via {gw}"))
            .await
    }

    /// Sets the default route via `gw` out of link `dev` (replace
    /// semantics: idempotent, a different gateway or device is replaced).
    pub async fn add_default_route_dev(&self, gw: Ipv4Addr, dev: &str) -> Result<(), NetlinkError> {
        let index = self.require_index(dev).await?;
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gw)
            .output_interface(index)
            .build();
        self.replace_route(msg, || format!("default route via {gw} dev {dev}"))
            .await
    }

    /// Sets the default route of routing table `table` out of link `dev`, via `gw`, or
    /// with no gateway (`scope link`) if `gw` is `None` (replace semantics: idempotent).
    pub async fn set_table_default_route(
        &self,
        table: u32,
        gw: Option<Ipv4Addr>,
        dev: &str,
    ) -> Result<(), NetlinkError> {
        let index = self.require_index(dev).await?;
        let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(table)
            .output_interface(index);
        msg = match gw {
            Some(gw) => msg.gateway(gw),
            None => msg.scope(netlink_packet_route::route::RouteScope::Link),
        };
        self.replace_route(msg.build(), || match gw {
            Some(gw) => format!("default route via {gw} dev {dev} in table {table}"),
            None => format!("default route dev {dev} in table {table}"),
        })
        .await
    }

    /// Adds or replaces route `msg`.
    async fn replace_route(
        &self,
        msg: netlink_packet_route::route::RouteMessage,
        what: impl FnOnce() -> String,
    ) -> Result<(), NetlinkError> {
        self.call("set", what, self.inner.route().add(msg).replace().execute())
            .await
    }

    /// Adds the IPv4 policy rule `ipproto udp sport PORT lookup TABLE` at `priority`; a rule
    /// already there with the same selector is left as it is (idempotent).
    pub async fn add_udp_sport_rule(
        &self,
        port: u16,
        table: u32,
        priority: u32,
    ) -> Result<(), NetlinkError> {
        use netlink_packet_route::rule::{RuleAttribute, RulePortRange};
        let mut req = self.rule_to_table(table, priority);
        let attrs = &mut req.message_mut().attributes;
        attrs.push(RuleAttribute::IpProtocol(
            netlink_packet_route::IpProtocol::Udp,
        ));
        attrs.push(RuleAttribute::SourcePortRange(RulePortRange {
            start: port,
            end: port,
        }));
        self.add_rule(req, || {
            format!("rule ipproto udp sport {port} lookup {table}")
        })
        .await
    }

    /// Adds the IPv4 policy rule `ipproto udp dport PORT lookup TABLE` at `priority`; a rule
    /// already there with the same selector is left as it is (idempotent).
    pub async fn add_udp_dport_rule(
        &self,
        port: u16,
        table: u32,
        priority: u32,
    ) -> Result<(), NetlinkError> {
        let mut req = self.rule_to_table(table, priority);
        req.message_mut().attributes.extend(udp_dport(port));
        self.add_rule(req, || {
            format!("rule ipproto udp dport {port} lookup {table}")
        })
        .await
    }

    /// Deletes the rule [`Self::add_udp_dport_rule`] adds. Idempotent.
    pub async fn del_udp_dport_rule(
        &self,
        port: u16,
        table: u32,
        priority: u32,
    ) -> Result<(), NetlinkError> {
        let mut msg = self.rule_to_table(table, priority).message_mut().clone();
        msg.attributes.extend(udp_dport(port));
        match self
            .call(
                "delete",
                || format!("rule ipproto udp dport {port} lookup {table}"),
                self.inner.rule().del(msg).execute(),
            )
            .await
        {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }

    /// Sets a blackhole default route in table `table` at `metric` (replace semantics): what
    /// the table answers when its other routes are gone.
    pub async fn set_table_blackhole(&self, table: u32, metric: u32) -> Result<(), NetlinkError> {
        let msg = blackhole(table, metric);
        self.replace_route(msg, || {
            format!("blackhole default metric {metric} in table {table}")
        })
        .await
    }

    /// Deletes the route [`Self::set_table_blackhole`] sets. Idempotent.
    pub async fn del_table_blackhole(&self, table: u32, metric: u32) -> Result<(), NetlinkError> {
        match self
            .call(
                "delete",
                || format!("blackhole default metric {metric} in table {table}"),
                self.inner.route().del(blackhole(table, metric)).execute(),
            )
            .await
        {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }

    /// Adds the IPv4 policy rule `fwmark MARK lookup TABLE` at `priority`; a rule already
    /// there with the same selector is left as it is (idempotent).
    pub async fn add_fwmark_rule(
        &self,
        mark: u32,
        table: u32,
        priority: u32,
    ) -> Result<(), NetlinkError> {
        let req = self.rule_to_table(table, priority).fw_mark(mark);
        self.add_rule(req, || format!("rule fwmark {mark:#x} lookup {table}"))
            .await
    }

    /// An IPv4 rule `lookup TABLE` at `priority`, selectors to be added.
    fn rule_to_table(&self, table: u32, priority: u32) -> rtnetlink::RuleAddRequest<Ipv4Addr> {
        self.inner
            .rule()
            .add()
            .v4()
            .table_id(table)
            .priority(priority)
            .action(netlink_packet_route::rule::RuleAction::ToTable)
    }

    /// Adds rule `req`; one already there with the same selector is no error.
    async fn add_rule(
        &self,
        req: rtnetlink::RuleAddRequest<Ipv4Addr>,
        what: impl FnOnce() -> String,
    ) -> Result<(), NetlinkError> {
        match self.call("add", what, req.execute()).await {
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// The MTU of the link that routes to `dst` (or the route's own MTU
    /// metric if lower). Without a route, or via loopback, the MTU of the
    /// first non-loopback link that is up; `None` if there is none.
    pub async fn route_mtu(&self, dst: Ipv4Addr) -> Result<Option<u32>, NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .build();
        let req = self.inner.route().get(msg).execute();
        let routes = match self
            .call(
                "look up",
                || format!("route to {dst}"),
                req.try_collect::<Vec<_>>(),
            )
            .await
        {
            Ok(routes) => routes,
            Err(e)
                if matches!(
                    e.errno(),
                    Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) | Some(libc::ENOENT)
                ) =>
            {
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        let links = self.links().await?;
        for route in &routes {
            let oif = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            let metric_mtu = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Metrics(ms) => ms.iter().find_map(|m| match m {
                    RouteMetric::Mtu(v) if *v > 0 => Some(*v),
                    _ => None,
                }),
                _ => None,
            });
            let Some(link) = oif.and_then(|i| links.iter().find(|l| l.index == i)) else {
                continue;
            };
            if link.loopback {
                continue;
            }
            let mtu = match (link.mtu, metric_mtu) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if mtu.is_some() {
                return Ok(mtu);
            }
        }
        Ok(links
            .iter()
            .find(|l| l.up && !l.loopback && l.mtu.is_some())
            .and_then(|l| l.mtu))
    }

    // ---- neighbours (ARP) ---------------------------------------------

    /// Sets a permanent ARP entry on `dev`: `ip` -> `mac` (replace
    /// semantics: idempotent, a different MAC is replaced).
    pub async fn set_neighbour(
        &self,
        dev: &str,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<(), NetlinkError> {
        let index = self.require_index(dev).await?;
        let req = self
            .inner
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute();
        self.call(
            "set",
            || format!("neighbour {ip} ({}) on {dev}", format_mac(&mac)),
            req,
        )
        .await
    }

    /// Deletes the ARP entry of `ip` on `dev`. Idempotent (a missing entry
    /// or device is fine).
    pub async fn del_neighbour(&self, dev: &str, ip: Ipv4Addr) -> Result<(), NetlinkError> {
        let Some(index) = self.link_index(dev).await? else {
            return Ok(());
        };
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = index;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        match self
            .call(
                "delete",
                || format!("neighbour {ip} on {dev}"),
                self.inner.neighbours().del(msg).execute(),
            )
            .await
        {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }

    /// The permanent IPv4 ARP entries of `dev`, sorted by IP.
    pub async fn neighbours(&self, dev: &str) -> Result<Vec<(Ipv4Addr, [u8; 6])>, NetlinkError> {
        let index = self.require_index(dev).await?;
        let req = self
            .inner
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute();
        let msgs: Vec<NeighbourMessage> = self
            .call("list", || format!("neighbours of {dev}"), req.try_collect())
            .await?;
        let mut out: Vec<(Ipv4Addr, [u8; 6])> = msgs
            .iter()
            .filter(|m| m.header.ifindex == index && m.header.state == NeighbourState::Permanent)
            .filter_map(|m| Some((neighbour_ip(m)?, neighbour_mac(m)?)))
            .collect();
        out.sort();
        Ok(out)
    }

    // ---- VXLAN forwarding database -------------------------------------

    /// Sets a permanent FDB entry on VXLAN `dev` (`NTF_SELF`): frames to
    /// `mac` are sent to VTEP `dst`. Replace semantics: idempotent, and the
    /// entry's VTEP is replaced if it differs.
    pub async fn set_fdb(
        &self,
        dev: &str,
        mac: [u8; 6],
        dst: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        let index = self.require_index(dev).await?;
        let req = self
            .inner
            .neighbours()
            .add_bridge(index, &mac)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .destination(IpAddr::V4(dst))
            .replace()
            .execute();
        self.call(
            "set",
            || format!("fdb entry {} -> {dst} on {dev}", format_mac(&mac)),
            req,
        )
        .await
    }

    /// Deletes the FDB entry `mac` -> `dst` of VXLAN `dev`. Idempotent (a
    /// missing entry or device is fine).
    pub async fn del_fdb(
        &self,
        dev: &str,
        mac: [u8; 6],
        dst: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        self.del_fdb_entry(dev, mac, NeighbourFlags::Own, Some(dst), || {
            format!("fdb entry {} -> {dst} on {dev}", format_mac(&mac))
        })
        .await
    }

    /// The FDB entries of VXLAN `dev` that have a remote VTEP (`NTF_SELF`
    /// entries with an IPv4 destination), sorted.
    pub async fn fdb(&self, dev: &str) -> Result<Vec<([u8; 6], Ipv4Addr)>, NetlinkError> {
        let index = self.require_index(dev).await?;
        let msgs = self.fdb_dump(|| format!("fdb of {dev}")).await?;
        Ok(vxlan_entries(&msgs, index))
    }

    // ---- bridge forwarding database --------------------------------------

    /// Sets a static entry in the FDB of the bridge that port `dev` is in (`NTF_MASTER`, as
    /// `bridge fdb replace MAC dev DEV master static`): frames to `mac` leave by `dev`, and
    /// the bridge floods none of them. It never ages; learning moves it to another port that
    /// sends from `mac`, unless it is `sticky`. Replace semantics: idempotent, and an entry
    /// of `mac` on another port moves to `dev`.
    pub async fn set_bridge_fdb(
        &self,
        dev: &str,
        mac: [u8; 6],
        sticky: bool,
    ) -> Result<(), NetlinkError> {
        let index = self.require_index(dev).await?;
        let mut flags = NeighbourFlags::Controller;
        if sticky {
            flags |= NeighbourFlags::Sticky;
        }
        let req = self
            .inner
            .neighbours()
            .add_bridge(index, &mac)
            .flags(flags)
            .state(NeighbourState::Noarp)
            .replace()
            .execute();
        self.call(
            "set",
            || format!("bridge fdb entry {} on {dev}", format_mac(&mac)),
            req,
        )
        .await
    }

    /// Deletes the bridge FDB entry of `mac` on port `dev`. Idempotent (a missing entry or
    /// device is fine).
    pub async fn del_bridge_fdb(&self, dev: &str, mac: [u8; 6]) -> Result<(), NetlinkError> {
        self.del_fdb_entry(dev, mac, NeighbourFlags::Controller, None, || {
            format!("bridge fdb entry {} on {dev}", format_mac(&mac))
        })
        .await
    }

    /// The FDB of bridge `bridge` (the bridge's own entries, not its ports' `NTF_SELF` ones),
    /// without the addresses of its ports (`local`), sorted.
    pub async fn bridge_fdb(&self, bridge: &str) -> Result<Vec<BridgeFdbEntry>, NetlinkError> {
        let index = self.require_index(bridge).await?;
        let msgs = self.fdb_dump(|| format!("fdb of bridge {bridge}")).await?;
        Ok(bridge_entries(&msgs, index))
    }

    /// [`Handle::fdb`] of VXLAN `vxlan` and [`Handle::bridge_fdb`] of `bridge` from one dump
    /// (the kernel lists both in the same `AF_BRIDGE` table).
    pub async fn fdb_and_bridge_fdb(
        &self,
        vxlan: &str,
        bridge: &str,
    ) -> Result<(Vec<([u8; 6], Ipv4Addr)>, Vec<BridgeFdbEntry>), NetlinkError> {
        let vx = self.require_index(vxlan).await?;
        let br = self.require_index(bridge).await?;
        let msgs = self
            .fdb_dump(|| format!("fdb of {vxlan} and bridge {bridge}"))
            .await?;
        Ok((vxlan_entries(&msgs, vx), bridge_entries(&msgs, br)))
    }

    /// Every entry of the namespace's `AF_BRIDGE` neighbour table.
    async fn fdb_dump(
        &self,
        what: impl FnOnce() -> String,
    ) -> Result<Vec<NeighbourMessage>, NetlinkError> {
        let req = self
            .inner
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute();
        self.call("list", what, req.try_collect()).await
    }

    /// Deletes the `AF_BRIDGE` entry of `mac` on `dev` with `flags` (`NTF_SELF`: the
    /// device's own, with its VTEP `dst`; `NTF_MASTER`: its bridge's). Idempotent.
    async fn del_fdb_entry(
        &self,
        dev: &str,
        mac: [u8; 6],
        flags: NeighbourFlags,
        dst: Option<Ipv4Addr>,
        what: impl FnOnce() -> String,
    ) -> Result<(), NetlinkError> {
        let Some(index) = self.link_index(dev).await? else {
            return Ok(());
        };
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.flags = flags;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        if let Some(dst) = dst {
            msg.header.state = NeighbourState::Permanent;
            msg.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
        }
        match self
            .call("delete", what, self.inner.neighbours().del(msg).execute())
            .await
        {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }
}

/// The VXLAN device `index`'s own FDB entries with a remote VTEP, sorted.
fn vxlan_entries(msgs: &[NeighbourMessage], index: u32) -> Vec<([u8; 6], Ipv4Addr)> {
    let mut out: Vec<([u8; 6], Ipv4Addr)> = msgs
        .iter()
        .filter(|m| m.header.ifindex == index && m.header.flags.contains(NeighbourFlags::Own))
        .filter_map(|m| Some((neighbour_mac(m)?, neighbour_ip(m)?)))
        .collect();
    out.sort();
    out
}

/// Bridge `index`'s own FDB entries (`NDA_MASTER` is the bridge), but not its ports'
/// addresses (`permanent`), sorted.
fn bridge_entries(msgs: &[NeighbourMessage], index: u32) -> Vec<BridgeFdbEntry> {
    let mut out: Vec<BridgeFdbEntry> = msgs
        .iter()
        .filter(|m| {
            !m.header.flags.contains(NeighbourFlags::Own)
                && m.header.state != NeighbourState::Permanent
                && m.attributes
                    .iter()
                    .any(|a| matches!(a, NeighbourAttribute::Controller(i) if *i == index))
        })
        .filter_map(|m| {
            Some(BridgeFdbEntry {
                mac: neighbour_mac(m)?,
                port: m.header.ifindex,
                is_static: m.header.state == NeighbourState::Noarp,
            })
        })
        .collect();
    out.sort();
    out
}

fn neighbour_ip(m: &NeighbourMessage) -> Option<Ipv4Addr> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        // AF_BRIDGE dumps carry the VTEP as raw bytes.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
            <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
        }
        _ => None,
    })
}

fn neighbour_mac(m: &NeighbourMessage) -> Option<[u8; 6]> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => <[u8; 6]>::try_from(b.as_slice()).ok(),
        _ => None,
    })
}

fn parse_link(msg: LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        name: String::new(),
        index: msg.header.index,
        kind: None,
        mtu: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        loopback: msg.header.flags.contains(LinkFlags::Loopback),
        master: None,
        mac: None,
        vni: None,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => info.name = name,
            LinkAttribute::Mtu(mtu) => info.mtu = Some(mtu),
            LinkAttribute::Controller(m) if m != 0 => info.master = Some(m),
            LinkAttribute::Address(a) => info.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        NlLinkInfo::Kind(kind) => info.kind = Some(kind.to_string()),
                        NlLinkInfo::Data(InfoData::Vxlan(v)) => {
                            info.vni = v.iter().find_map(|x| match x {
                                InfoVxlan::Id(id) => Some(*id),
                                _ => None,
                            });
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    info
}

/// The IPv4 address of an address message (its local address, else its address).
fn address_of(msg: &AddressMessage) -> Option<Ipv4Addr> {
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        })
    })
}

/// The selectors of `ipproto udp dport PORT`.
fn udp_dport(port: u16) -> [netlink_packet_route::rule::RuleAttribute; 2] {
    use netlink_packet_route::rule::{RuleAttribute, RulePortRange};
    [
        RuleAttribute::IpProtocol(netlink_packet_route::IpProtocol::Udp),
        RuleAttribute::DestinationPortRange(RulePortRange {
            start: port,
            end: port,
        }),
    ]
}

/// `blackhole default metric METRIC table TABLE`.
fn blackhole(table: u32, metric: u32) -> netlink_packet_route::route::RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .table_id(table)
        .priority(metric)
        .kind(netlink_packet_route::route::RouteType::BlackHole)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn is_send_sync<T: Send + Sync>() {}
    fn is_send<T: Send>(_: &T) {}

    #[test]
    fn handles_and_their_futures_can_cross_threads() {
        is_send_sync::<Handle>();
        is_send_sync::<Netns>();
        // Never called: only has to compile.
        fn _futures(h: &Handle, ns: &Netns) {
            is_send(&Handle::new(ns));
            is_send(&h.add_vxlan("v", 1, 4789, Ipv4Addr::LOCALHOST, None, None));
            is_send(&h.add_veth("a", "b", Some(ns), None));
            is_send(&h.set_fdb("v", [0; 6], Ipv4Addr::LOCALHOST));
            is_send(&h.set_bridge_fdb("v", [0; 6], false));
            is_send(&h.bridge_fdb("b"));
            is_send(&h.route_mtu(Ipv4Addr::LOCALHOST));
        }
        let _: fn(&Handle, &Netns) = _futures;
    }

    #[test]
    fn new_without_a_runtime_fails_cleanly() {
        let ns = Netns::current().unwrap();
        let mut fut = pin!(Handle::new(&ns));
        let mut cx = Context::from_waker(Waker::noop());
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(Err(e)) => assert_eq!(
                e.to_string(),
                "cannot open a netlink socket in namespace host: no tokio runtime"
            ),
            Poll::Ready(Ok(_)) => panic!("opened a handle without a runtime"),
            Poll::Pending => panic!("pending without a runtime"),
        }
    }

    #[test]
    fn parse_link_reads_the_interesting_attributes() {
        let mut msg = LinkMessage::default();
        msg.header.index = 7;
        msg.header.flags = LinkFlags::Up;
        msg.attributes = vec![
            LinkAttribute::IfName("vx-4096".into()),
            LinkAttribute::Mtu(1450),
            LinkAttribute::Controller(3),
            LinkAttribute::Address(vec![2, 0x42, 10, 0, 9, 1]),
            LinkAttribute::LinkInfo(vec![
                NlLinkInfo::Kind(netlink_packet_route::link::InfoKind::Vxlan),
                NlLinkInfo::Data(InfoData::Vxlan(vec![InfoVxlan::Id(4096)])),
            ]),
        ];
        assert_eq!(
            parse_link(msg),
            LinkInfo {
                name: "vx-4096".into(),
                index: 7,
                kind: Some("vxlan".into()),
                mtu: Some(1450),
                up: true,
                loopback: false,
                master: Some(3),
                mac: Some([2, 0x42, 10, 0, 9, 1]),
                vni: Some(4096),
            }
        );
    }
}
