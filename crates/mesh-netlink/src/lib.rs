//! Kernel plumbing for the overlay data plane, over netlink: network
//! namespaces, links (bridge, vxlan, veth), addresses, routes, neighbour
//! (ARP) entries and VXLAN FDB entries. It knows nothing of services, gossip
//! or Raft, and never shells out to `ip`/`bridge`.
//!
//! A netlink socket acts on the namespace of the thread that created it, so
//! a [`Handle`] is opened *inside* a [`Netns`] (on a throwaway thread that
//! `setns`es there) and then driven from the caller's tokio runtime.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mesh_netlink::NetlinkError> {
//! use std::net::Ipv4Addr;
//! use std::path::Path;
//! use mesh_netlink::{mac_for_ip, Handle, Netns};
//!
//! let dir = Path::new("/run/mesh/netns");
//! let host = Handle::new(&Netns::current()?).await?;
//! let ov = Netns::create(dir, "ov-4096")?;
//! let h = Handle::new(&ov).await?;
//! h.add_bridge("br0", Some(1450)).await?;
//! h.add_address("br0", Ipv4Addr::new(10, 0, 9, 1), 24).await?;
//! // The vxlan is created in the host namespace (its UDP socket stays
//! // there) and then moved into the overlay namespace.
//! host.add_vxlan("vx-4096", 4096, 4789, Ipv4Addr::new(10, 98, 0, 1), None, Some(1450)).await?;
//! host.move_to_ns("vx-4096", &ov).await?;
//! h.set_master("vx-4096", "br0").await?;
//! h.set_up("vx-4096").await?;
//! let peer = Ipv4Addr::new(10, 0, 9, 3);
//! h.set_neighbour("vx-4096", peer, mac_for_ip(peer)).await?;
//! h.set_fdb("vx-4096", mac_for_ip(peer), Ipv4Addr::new(10, 98, 0, 2)).await?;
//! # Ok(()) }
//! ```

pub mod conntrack;
mod error;
mod handle;
mod mac;
mod netns;
pub mod nft;
mod tun;

pub use error::NetlinkError;
pub use handle::{BridgeFdbEntry, Handle, LinkInfo, REQUEST_TIMEOUT};
pub use mac::{format_mac, mac_for_ip, parse_mac};
pub use netns::Netns;
pub use tun::Tun;
