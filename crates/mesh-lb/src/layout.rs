//! The map layouts of `ebpf/lb.h`, mirrored as `#[repr(C)]` types.
//!
//! Addresses and ports are kept in network byte order, as the kernel hands them to the
//! programs; the constructors here do the conversions. Sizes are asserted at compile time
//! against the `LB_*_SIZE` constants that `build.rs` reads from `lb.h`, and aya checks them
//! again against the object's BTF map definitions when the maps are opened.

use std::net::Ipv4Addr;

use crate::consts::{
    LB_BACKEND_KEY_SIZE, LB_BACKEND_VAL_SIZE, LB_PROTO_TCP, LB_PROTO_UDP, LB_REVNAT_KEY_SIZE,
    LB_REVNAT_VAL_SIZE, LB_SERVICE_KEY_SIZE, LB_SERVICE_VAL_SIZE,
};
use crate::Proto;

/// `struct lb_service_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ServiceKey {
    pub vip: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// `struct lb_service_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ServiceVal {
    pub count: u16,
    pub rev: u16,
    pub flags: u32,
}

/// `struct lb_backend_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct BackendKey {
    pub vip: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
    pub slot: u16,
    pub pad2: u16,
}

/// `struct lb_backend_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct BackendVal {
    pub ip: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct lb_revnat_key` (only written by the programs; here for the size check).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct RevnatKey {
    pub cookie: u64,
    pub ip: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct lb_revnat_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct RevnatVal {
    pub vip: u32,
    pub port: u16,
    pub pad: u16,
}

const _: () = {
    use std::mem::size_of;
    assert!(size_of::<ServiceKey>() == LB_SERVICE_KEY_SIZE as usize);
    assert!(size_of::<ServiceVal>() == LB_SERVICE_VAL_SIZE as usize);
    assert!(size_of::<BackendKey>() == LB_BACKEND_KEY_SIZE as usize);
    assert!(size_of::<BackendVal>() == LB_BACKEND_VAL_SIZE as usize);
    assert!(size_of::<RevnatKey>() == LB_REVNAT_KEY_SIZE as usize);
    assert!(size_of::<RevnatVal>() == LB_REVNAT_VAL_SIZE as usize);
    assert!(Proto::Tcp.number() as u32 == LB_PROTO_TCP);
    assert!(Proto::Udp.number() as u32 == LB_PROTO_UDP);
};

// SAFETY: all six are #[repr(C)] structs of integers with every padding byte spelled out as a
// field (the size asserts above prove there is no implicit padding), so every bit pattern is
// valid and there are no uninitialised bytes.
unsafe impl aya::Pod for ServiceKey {}
// SAFETY: see above.
unsafe impl aya::Pod for ServiceVal {}
// SAFETY: see above.
unsafe impl aya::Pod for BackendKey {}
// SAFETY: see above.
unsafe impl aya::Pod for BackendVal {}
// SAFETY: see above.
unsafe impl aya::Pod for RevnatKey {}
// SAFETY: see above.
unsafe impl aya::Pod for RevnatVal {}

/// An IPv4 address as the kernel stores it (network byte order in memory).
pub(crate) fn ip_to_net(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub(crate) fn ip_from_net(ip: u32) -> Ipv4Addr {
    Ipv4Addr::from(ip.to_ne_bytes())
}

/// A port as the kernel stores it (network byte order in memory).
pub(crate) fn port_to_net(port: u16) -> u16 {
    port.to_be()
}

pub(crate) fn port_from_net(port: u16) -> u16 {
    u16::from_be(port)
}

impl ServiceKey {
    pub(crate) fn new(vip: Ipv4Addr, port: u16, proto: Proto) -> Self {
        ServiceKey {
            vip: ip_to_net(vip),
            port: port_to_net(port),
            proto: proto.number(),
            pad: 0,
        }
    }

    pub(crate) fn backend(&self, slot: u16) -> BackendKey {
        BackendKey {
            vip: self.vip,
            port: self.port,
            proto: self.proto,
            pad: 0,
            slot,
            pad2: 0,
        }
    }

    pub(crate) fn vip(&self) -> Ipv4Addr {
        ip_from_net(self.vip)
    }

    pub(crate) fn port(&self) -> u16 {
        port_from_net(self.port)
    }
}

impl BackendVal {
    pub(crate) fn new(ip: Ipv4Addr, port: u16) -> Self {
        BackendVal {
            ip: ip_to_net(ip),
            port: port_to_net(port),
            pad: 0,
        }
    }

    pub(crate) fn addr(&self) -> (Ipv4Addr, u16) {
        (ip_from_net(self.ip), port_from_net(self.port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_in_network_byte_order() {
        let k = ServiceKey::new(Ipv4Addr::new(10, 255, 0, 1), 80, Proto::Tcp);
        // SAFETY: ServiceKey is Pod (no padding, all fields initialised).
        let bytes: [u8; 8] = unsafe { std::mem::transmute(k) };
        assert_eq!(bytes, [10, 255, 0, 1, 0, 80, 6, 0]);
        assert_eq!(k.vip(), Ipv4Addr::new(10, 255, 0, 1));
        assert_eq!(k.port(), 80);
        let b = k.backend(3);
        // SAFETY: BackendKey is Pod.
        let bytes: [u8; 12] = unsafe { std::mem::transmute(b) };
        assert_eq!(bytes[..8], [10, 255, 0, 1, 0, 80, 6, 0]);
        assert_eq!(u16::from_ne_bytes([bytes[8], bytes[9]]), 3);
        let v = BackendVal::new(Ipv4Addr::new(127, 0, 0, 1), 9001);
        assert_eq!(v.addr(), (Ipv4Addr::new(127, 0, 0, 1), 9001));
    }
}
