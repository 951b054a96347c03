//! Socket-level load balancing of service VIPs (Cilium's socket-LB, for mesh).
//!
//! Four cgroup programs from `ebpf/sock_lb.c`, attached to a v2 cgroup, rewrite addresses at
//! the socket layer for every process below that cgroup:
//!
//! - `cgroup/connect4`: `connect()` (TCP, connected UDP) to a VIP:port goes to a random
//!   backend;
//! - `cgroup/sendmsg4`: `sendto()`/`sendmsg()` on an unconnected UDP socket goes to a backend
//!   chosen by a hash of the socket cookie (a socket keeps its backend while the set is stable);
//! - `cgroup/recvmsg4`: the reply then appears to come from the VIP:port;
//! - `cgroup/getpeername4`: a rewritten connected socket reports the VIP:port as its peer.
//!
//! Nothing is translated per packet: after `connect()` the socket simply talks to the backend.
//! A VIP that exists with no backend refuses (`ECONNREFUSED`); a VIP that is not in the maps
//! is left alone.
//!
//! [`SockLb`] loads the programs and owns the maps (`services`, `backends`, `revnat`; layouts in
//! `ebpf/lb.h`, mirrored in `layout`). [`SockLb::set_service`] reconciles one service to a full
//! backend list by diffing against what the maps hold, with O(changes) writes ordered so a
//! concurrent lookup never finds a hole (see `plan`). Dropping a [`SockLb`] detaches
//! everything and frees the maps, unless they were pinned ([`LoadOptions::pin_dir`]), in which
//! case a later [`SockLb::load_with`] picks them up again.
//!
//! The data plane drives either backend through [`VipBalancer`] (the `balancer` module):
//! [`EbpfBalancer`] over a [`SockLb`], or [`NftBalancer`], whose tables are per task.
//!
//! **Architecture Invariant**: knows VIPs, ports and backend addresses, nothing of services,
//! tasks or Raft; it is given the desired state.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError};
use aya::{Ebpf, EbpfLoader};

mod balancer;
mod layout;
pub mod nft;
pub mod nodeport;
mod plan;

pub use balancer::{EbpfBalancer, NftBalancer, TaskBalancer, VipBalancer};
pub use nft::NftLb;

#[allow(clippy::all)]
mod consts {
    include!(concat!(env!("OUT_DIR"), "/lb_consts.rs"));
}

#[allow(clippy::all)]
mod objects {
    include!(concat!(env!("OUT_DIR"), "/objects.rs"));
}

use layout::{BackendKey, BackendVal, ServiceKey, ServiceVal};
use plan::{plan, Op};

/// The programs of `sock_lb.c`, by function name.
const PROGRAMS: [&str; 4] = [
    "sock_lb_connect4",
    "sock_lb_sendmsg4",
    "sock_lb_recvmsg4",
    "sock_lb_getpeername4",
];

const MAP_SERVICES: &str = "services";
const MAP_BACKENDS: &str = "backends";
const MAP_REVNAT: &str = "revnat";

/// `CGROUP2_SUPER_MAGIC` from `linux/magic.h`.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// A transport protocol a VIP is balanced for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number (6, 17), as in the map keys.
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }

    fn from_number(n: u8) -> Option<Proto> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One service as the maps hold it (for `mesh vip ls`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    /// Bumped (wrapping) by every change of the service's backends.
    pub rev: u16,
    /// In slot order; connections spread uniformly over them.
    pub backends: Vec<(Ipv4Addr, u16)>,
}

/// How to load. The default: maps not pinned, capacities from `ebpf/lb.h`.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Pin the maps as `<pin_dir>/{services,backends,revnat}` (the directory must be on a
    /// bpffs; it is created if missing). Maps already pinned there are reused, so the
    /// services survive a restart of the daemon; they stay in the kernel after drop.
    pub pin_dir: Option<PathBuf>,
    /// Capacity of `services` (VIP:port/proto entries).
    pub max_services: Option<u32>,
    /// Capacity of `backends` (sum of all services' backends).
    pub max_backends: Option<u32>,
    /// Capacity of the `revnat` LRU (sockets x backends they talk to).
    pub max_revnat: Option<u32>,
}

/// Kernel object ids, for diagnostics (`bpftool prog show id N`, `bpftool map show id N`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelIds {
    /// `(program name, id)`.
    pub programs: Vec<(&'static str, u32)>,
    /// `(map name, id)`.
    pub maps: Vec<(&'static str, u32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum LbError {
    #[error(
        "socket load balancer: eBPF programs were not built (MESH_EBPF_SKIP was set when \
         mesh-lb was compiled); rebuild with clang installed"
    )]
    NotBuilt,
    #[error("socket load balancer: loading the eBPF object: {}", chain(.0.as_ref()))]
    Object(#[source] Box<aya::EbpfError>),
    #[error("socket load balancer: no program {0} in the eBPF object")]
    MissingProgram(&'static str),
    #[error("socket load balancer: no map {0} in the eBPF object")]
    MissingMap(&'static str),
    #[error(
        "socket load balancer: kernel refused program {program}: {error}\nverifier log:\n{log}"
    )]
    Refused {
        program: &'static str,
        #[source]
        error: io::Error,
        log: String,
    },
    #[error("socket load balancer: program {program}: {}", chain(.source))]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {0}: not a cgroup v2 directory (socket hooks attach to v2 cgroups only)")]
    NotCgroup2(PathBuf),
    #[error("cgroup {path}: attaching {program}: {}", chain(.source))]
    Attach {
        path: PathBuf,
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {map}: {}", chain(.source))]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("service {service}: too many backends ({count}, at most 65535)")]
    TooManyBackends { service: String, count: usize },
    /// The nftables backend ([`NftLb`]): `nft` failed or refused a transaction.
    #[error("nftables load balancer in namespace {ns}: {message}")]
    Nft { ns: String, message: String },
}

struct Attachment {
    cgroup: PathBuf,
    links: Vec<(
        &'static str,
        aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId,
    )>,
}

/// The loaded socket load balancer: four programs and their maps.
///
/// Dropping it detaches the programs from every cgroup and unloads them; the maps are freed
/// unless pinned.
pub struct SockLb {
    attached: Vec<Attachment>,
    services: HashMap<MapData, ServiceKey, ServiceVal>,
    backends: HashMap<MapData, BackendKey, BackendVal>,
    map_ids: Vec<(&'static str, u32)>,
    ebpf: Ebpf,
}

impl fmt::Debug for SockLb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SockLb")
            .field(
                "attached",
                &self.attached.iter().map(|a| &a.cgroup).collect::<Vec<_>>(),
            )
            .field("maps", &self.map_ids)
            .finish_non_exhaustive()
    }
}

impl SockLb {
    /// Loads the programs and maps (not pinned, default capacities). An error if the kernel
    /// refuses a program, with the verifier log.
    pub fn load() -> Result<SockLb, LbError> {
        Self::load_with(&LoadOptions::default())
    }

    /// [`SockLb::load`] with options (pinning, capacities).
    pub fn load_with(opts: &LoadOptions) -> Result<SockLb, LbError> {
        let object = objects::SOCK_LB.ok_or(LbError::NotBuilt)?;
        let mut loader = EbpfLoader::new();
        if let Some(dir) = &opts.pin_dir {
            std::fs::create_dir_all(dir).map_err(|source| LbError::PinDir {
                path: dir.clone(),
                source,
            })?;
            for name in [MAP_SERVICES, MAP_BACKENDS, MAP_REVNAT] {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        for (name, max) in [
            (MAP_SERVICES, opts.max_services),
            (MAP_BACKENDS, opts.max_backends),
            (MAP_REVNAT, opts.max_revnat),
        ] {
            if let Some(max) = max {
                loader.map_max_entries(name, max);
            }
        }
        let mut ebpf = loader.load(object).map_err(|e| match e {
            aya::EbpfError::ProgramError(source) => program_error("(object)", source),
            e => LbError::Object(Box::new(e)),
        })?;

        for name in PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(LbError::MissingProgram(name))?
                .try_into()
                .map_err(|source| LbError::Program {
                    program: name,
                    source,
                })?;
            prog.load().map_err(|source| program_error(name, source))?;
        }

        let mut map_ids = Vec::new();
        for name in [MAP_SERVICES, MAP_BACKENDS, MAP_REVNAT] {
            if let Some(Map::HashMap(data) | Map::LruHashMap(data)) = ebpf.map(name) {
                let info = data
                    .info()
                    .map_err(|source| LbError::Map { map: name, source })?;
                map_ids.push((name, info.id()));
            }
        }
        let services = HashMap::try_from(take_map(&mut ebpf, MAP_SERVICES)?).map_err(|source| {
            LbError::Map {
                map: MAP_SERVICES,
                source,
            }
        })?;
        let backends = HashMap::try_from(take_map(&mut ebpf, MAP_BACKENDS)?).map_err(|source| {
            LbError::Map {
                map: MAP_BACKENDS,
                source,
            }
        })?;
        if ebpf.map(MAP_REVNAT).is_none() {
            return Err(LbError::MissingMap(MAP_REVNAT));
        }

        tracing::debug!(?map_ids, "socket load balancer loaded");
        Ok(SockLb {
            attached: Vec::new(),
            services,
            backends,
            map_ids,
            ebpf,
        })
    }

    /// Attaches the four programs to a v2 cgroup directory (a task's cgroup, or a parent to
    /// cover every task below it). Attaching to a directory already attached is a no-op.
    /// Other programs attached to the cgroup stay (multi attach: see `attach_mode`).
    /// Attaching to a cgroup and to one of its ancestors is harmless: the programs run twice
    /// for a socket below both, and the second pass finds no VIP left to rewrite.
    pub fn attach(&mut self, cgroup_dir: &Path) -> Result<(), LbError> {
        let path = cgroup_dir
            .canonicalize()
            .map_err(|source| LbError::Cgroup {
                path: cgroup_dir.to_path_buf(),
                source,
            })?;
        if self.attached.iter().any(|a| a.cgroup == path) {
            return Ok(());
        }
        let dir = File::open(&path).map_err(|source| LbError::Cgroup {
            path: path.clone(),
            source,
        })?;
        if !is_cgroup2(&dir).map_err(|source| LbError::Cgroup {
            path: path.clone(),
            source,
        })? {
            return Err(LbError::NotCgroup2(path));
        }
        let mut links = Vec::with_capacity(PROGRAMS.len());
        for name in PROGRAMS {
            let res = self.program(name).and_then(|p| {
                p.attach(&dir, attach_mode())
                    .map_err(|source| LbError::Attach {
                        path: path.clone(),
                        program: name,
                        source,
                    })
            });
            match res {
                Ok(id) => links.push((name, id)),
                Err(e) => {
                    self.detach_links(&path, links);
                    return Err(e);
                }
            }
        }
        tracing::debug!(cgroup = %path.display(), "socket load balancer attached");
        self.attached.push(Attachment {
            cgroup: path,
            links,
        });
        Ok(())
    }

    /// Detaches the programs from one cgroup directory (no-op if not attached there).
    pub fn detach(&mut self, cgroup_dir: &Path) {
        let path = cgroup_dir
            .canonicalize()
            .unwrap_or_else(|_| cgroup_dir.to_path_buf());
        if let Some(i) = self.attached.iter().position(|a| a.cgroup == path) {
            let a = self.attached.swap_remove(i);
            self.detach_links(&a.cgroup, a.links);
        }
    }

    /// Detaches the programs from every cgroup.
    pub fn detach_all(&mut self) {
        for a in std::mem::take(&mut self.attached) {
            self.detach_links(&a.cgroup, a.links);
        }
    }

    /// The cgroup directories the programs are attached to.
    pub fn attached(&self) -> Vec<PathBuf> {
        self.attached.iter().map(|a| a.cgroup.clone()).collect()
    }

    /// Sets a service's full backend list, diffing against what the maps hold: O(changes) map
    /// writes, ordered so that a concurrent connect never finds an empty slot. Duplicates are
    /// ignored. An empty list keeps the VIP, refusing connections (`ECONNREFUSED`), as a
    /// service scaled to zero; [`SockLb::remove_service`] forgets it.
    ///
    /// On an error the maps are left in a consistent state (some changes applied); calling
    /// again completes the update.
    pub fn set_service(
        &mut self,
        vip: Ipv4Addr,
        port: u16,
        proto: Proto,
        backends: &[(Ipv4Addr, u16)],
    ) -> Result<(), LbError> {
        let desired: Vec<BackendVal> = backends
            .iter()
            .map(|(ip, port)| BackendVal::new(*ip, *port))
            .collect();
        let distinct = desired.iter().collect::<HashSet<_>>().len();
        if distinct > usize::from(u16::MAX) {
            return Err(LbError::TooManyBackends {
                service: service_name(vip, port, proto),
                count: distinct,
            });
        }
        let key = ServiceKey::new(vip, port, proto);
        let current = self.read_service(&key)?;
        let ops = plan(
            current.as_ref().map(|(_, slots)| slots.as_slice()),
            &desired,
        );
        if ops.is_empty() {
            return Ok(());
        }
        let old = current.map(|(val, _)| val).unwrap_or_default();
        for op in &ops {
            match op {
                Op::Write { slot, backend } => self
                    .backends
                    .insert(key.backend(*slot), backend, 0)
                    .map_err(|source| LbError::Map {
                        map: MAP_BACKENDS,
                        source,
                    })?,
                Op::SetCount { count } => {
                    let val = ServiceVal {
                        count: *count,
                        rev: old.rev.wrapping_add(1),
                        flags: old.flags,
                    };
                    self.services
                        .insert(key, val, 0)
                        .map_err(|source| LbError::Map {
                            map: MAP_SERVICES,
                            source,
                        })?
                }
                Op::Delete { slot } => self.delete_backend(&key.backend(*slot))?,
            }
        }
        tracing::debug!(
            service = %service_name(vip, port, proto),
            backends = distinct,
            writes = ops.len(),
            "socket load balancer: service set"
        );
        Ok(())
    }

    /// Removes a service: connects to its VIP:port are no longer translated. No-op if absent.
    pub fn remove_service(
        &mut self,
        vip: Ipv4Addr,
        port: u16,
        proto: Proto,
    ) -> Result<(), LbError> {
        let key = ServiceKey::new(vip, port, proto);
        let count = match self.services.get(&key, 0) {
            Ok(val) => val.count,
            Err(MapError::KeyNotFound) => 0,
            Err(source) => {
                return Err(LbError::Map {
                    map: MAP_SERVICES,
                    source,
                })
            }
        };
        // The service first: programs stop picking slots, then the slots go.
        match self.services.remove(&key) {
            Ok(()) => {}
            Err(e) if is_enoent(&e) => {}
            Err(source) => {
                return Err(LbError::Map {
                    map: MAP_SERVICES,
                    source,
                })
            }
        }
        for slot in 0..count {
            self.delete_backend(&key.backend(slot))?;
        }
        // Slots above the count can only be left by an interrupted update: sweep them too.
        let mut slot = count;
        while slot < u16::MAX && self.backend_exists(&key.backend(slot))? {
            self.delete_backend(&key.backend(slot))?;
            slot += 1;
        }
        tracing::debug!(service = %service_name(vip, port, proto), "socket load balancer: service removed");
        Ok(())
    }

    /// What the maps hold (for `mesh vip ls`), sorted by VIP, port, protocol. A slot that is
    /// missing (only possible during a concurrent update from another loader) is left out.
    pub fn dump(&self) -> Result<Vec<ServiceEntry>, LbError> {
        let mut keys = Vec::new();
        for item in self.services.keys() {
            keys.push(item.map_err(|source| LbError::Map {
                map: MAP_SERVICES,
                source,
            })?);
        }
        keys.sort();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(proto) = Proto::from_number(key.proto) else {
                continue;
            };
            let Some((val, slots)) = self.read_service(&key)? else {
                continue;
            };
            out.push(ServiceEntry {
                vip: key.vip(),
                port: key.port(),
                proto,
                rev: val.rev,
                backends: slots.into_iter().flatten().map(|b| b.addr()).collect(),
            });
        }
        Ok(out)
    }

    /// The kernel ids of the loaded programs and maps.
    pub fn ids(&self) -> Result<KernelIds, LbError> {
        let mut programs = Vec::with_capacity(PROGRAMS.len());
        for name in PROGRAMS {
            let prog = self
                .ebpf
                .program(name)
                .ok_or(LbError::MissingProgram(name))?;
            let info = prog.info().map_err(|source| LbError::Program {
                program: name,
                source,
            })?;
            programs.push((name, info.id()));
        }
        Ok(KernelIds {
            programs,
            maps: self.map_ids.clone(),
        })
    }

    fn program(&mut self, name: &'static str) -> Result<&mut CgroupSockAddr, LbError> {
        self.ebpf
            .program_mut(name)
            .ok_or(LbError::MissingProgram(name))?
            .try_into()
            .map_err(|source| LbError::Program {
                program: name,
                source,
            })
    }

    fn detach_links(
        &mut self,
        cgroup: &Path,
        links: Vec<(
            &'static str,
            aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId,
        )>,
    ) {
        for (name, id) in links {
            let res = self.program(name).and_then(|p| {
                p.detach(id).map_err(|source| LbError::Program {
                    program: name,
                    source,
                })
            });
            if let Err(e) = res {
                tracing::warn!(cgroup = %cgroup.display(), error = %e, "socket load balancer: detach failed");
            }
        }
        tracing::debug!(cgroup = %cgroup.display(), "socket load balancer detached");
    }

    /// The service's value and its slots `0..count` (`None` for a missing slot), or `None`
    /// if the service is absent.
    #[allow(clippy::type_complexity)]
    fn read_service(
        &self,
        key: &ServiceKey,
    ) -> Result<Option<(ServiceVal, Vec<Option<BackendVal>>)>, LbError> {
        let val = match self.services.get(key, 0) {
            Ok(val) => val,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(source) => {
                return Err(LbError::Map {
                    map: MAP_SERVICES,
                    source,
                })
            }
        };
        let mut slots = Vec::with_capacity(usize::from(val.count));
        for slot in 0..val.count {
            match self.backends.get(&key.backend(slot), 0) {
                Ok(b) => slots.push(Some(b)),
                Err(MapError::KeyNotFound) => slots.push(None),
                Err(source) => {
                    return Err(LbError::Map {
                        map: MAP_BACKENDS,
                        source,
                    })
                }
            }
        }
        Ok(Some((val, slots)))
    }

    fn backend_exists(&self, key: &BackendKey) -> Result<bool, LbError> {
        match self.backends.get(key, 0) {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(source) => Err(LbError::Map {
                map: MAP_BACKENDS,
                source,
            }),
        }
    }

    fn delete_backend(&mut self, key: &BackendKey) -> Result<(), LbError> {
        match self.backends.remove(key) {
            Ok(()) => Ok(()),
            Err(e) if is_enoent(&e) => Ok(()),
            Err(source) => Err(LbError::Map {
                map: MAP_BACKENDS,
                source,
            }),
        }
    }
}

impl Drop for SockLb {
    fn drop(&mut self) {
        // Links are owned by the programs and would go with them; detaching first makes the
        // order explicit (and logged). The maps and programs close with their fds.
        self.detach_all();
    }
}

/// Since 5.7 aya attaches with `BPF_LINK_CREATE`, whose cgroup links are always multi and
/// which refuses any attach flag (`EINVAL` for `BPF_F_ALLOW_MULTI`): ask for "single" there.
/// Older kernels get `BPF_PROG_ATTACH`, where multi must be asked for.
fn attach_mode() -> CgroupAttachMode {
    match aya::util::KernelVersion::current() {
        Ok(v) if v < aya::util::KernelVersion::new(5, 7, 0) => CgroupAttachMode::AllowMultiple,
        _ => CgroupAttachMode::Single,
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, LbError> {
    ebpf.take_map(name).ok_or(LbError::MissingMap(name))
}

fn program_error(program: &'static str, source: ProgramError) -> LbError {
    match source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => LbError::Refused {
            program,
            error: io_error,
            log: verifier_log.to_string(),
        },
        source => LbError::Program { program, source },
    }
}

fn is_enoent(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound)
        || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

fn is_cgroup2(dir: &File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: statfs is plain old data; zeroed is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the duration of the call and `st` is a valid out pointer.
    if unsafe { libc::fstatfs(dir.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64 == CGROUP2_SUPER_MAGIC)
}

/// An error and its sources, joined with ": " (aya's syscall errors keep the errno in the
/// source, which a one-line message would otherwise lose).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(e) = next {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        next = e.source();
    }
    out
}

fn service_name(vip: Ipv4Addr, port: u16, proto: Proto) -> String {
    format!("{vip}:{port}/{proto}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sock_lb_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<SockLb>();
    }

    #[test]
    fn errors_name_the_object() {
        let e = LbError::TooManyBackends {
            service: service_name(Ipv4Addr::new(10, 255, 0, 1), 80, Proto::Tcp),
            count: 70000,
        };
        assert_eq!(
            e.to_string(),
            "service 10.255.0.1:80/tcp: too many backends (70000, at most 65535)"
        );
        let io = io::Error::from_raw_os_error(libc::EINVAL);
        let e = LbError::Map {
            map: MAP_BACKENDS,
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_elem",
                io_error: io,
            }),
        };
        assert!(e.to_string().starts_with("map backends: "), "{e}");
        assert!(e.to_string().contains("Invalid argument"), "{e}");
    }
}
