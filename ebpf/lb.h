/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Map layouts of the socket-level load balancer (sock_lb.c), shared with the
 * loader crate `mesh-lb`.
 *
 * The Rust side mirrors these structs with #[repr(C)] types in
 * crates/mesh-lb/src/layout.rs. The `LB_*` numeric #defines below are read by
 * crates/mesh-lb/build.rs and turned into Rust constants, so sizes and
 * capacities have one source: both sides assert their struct sizes against
 * the LB_*_SIZE values at compile time, and aya checks key/value sizes against
 * the object's map definitions when the loader opens the maps.
 *
 * Byte order: addresses and ports are stored in NETWORK byte order, exactly
 * as the kernel presents them in `struct bpf_sock_addr` (user_ip4, the low
 * 16 bits of user_port), so the programs never convert anything.
 *
 * Keep this file parseable by build.rs: one `#define LB_NAME <decimal>` per
 * line for the constants.
 */
#ifndef MESH_LB_H
#define MESH_LB_H

#ifdef __BPF__
#include <linux/types.h>
#endif

/* Capacities (max_entries); the loader may override them at load time. */
#define LB_MAX_SERVICES 16384
#define LB_MAX_BACKENDS 262144
#define LB_MAX_REVNAT 262144

/* Struct sizes, asserted on both sides. */
#define LB_SERVICE_KEY_SIZE 8
#define LB_SERVICE_VAL_SIZE 8
#define LB_BACKEND_KEY_SIZE 12
#define LB_BACKEND_VAL_SIZE 8
#define LB_REVNAT_KEY_SIZE 16
#define LB_REVNAT_VAL_SIZE 8

/* IP protocol numbers used in the keys. */
#define LB_PROTO_TCP 6
#define LB_PROTO_UDP 17

/*
 * `services`: VIP:port/proto -> how many backends it has.
 *
 * A service with count == 0 exists but has no backend: connect()/sendmsg()
 * to it fail with ECONNREFUSED (a service scaled to zero) instead of leaking
 * to whatever the VIP routes to.
 */
struct lb_service_key {
	__u32 vip;   /* network byte order */
	__u16 port;  /* network byte order */
	__u8 proto;  /* LB_PROTO_TCP or LB_PROTO_UDP */
	__u8 pad;    /* always 0 */
};

struct lb_service_val {
	__u16 count; /* backends live in slots [0, count) of `backends` */
	__u16 rev;   /* bumped (wrapping) by every update of the service */
	__u32 flags; /* reserved, 0 */
};

/*
 * `backends`: (service, slot) -> backend address.
 *
 * Update protocol (user space, see crates/mesh-lb/src/plan.rs), chosen so a
 * program that read `count` and then looks up any slot < count always finds
 * a backend of the old or the new set:
 *   1. overwrite slots < min(old, new count) whose backend goes away, with an
 *      added backend or with a kept backend from a slot >= new count
 *      (one atomic element replace each);
 *   2. when growing, write slots [old count, new count);
 *   3. write the service value (count = new count, rev + 1);
 *   4. when shrinking, delete slots [new count, old count).
 * Adding one backend is therefore 2 writes (slot `count`, then count + 1);
 * removing one is at most 3 (move the last slot into the hole, count - 1,
 * delete the last slot). A program that raced with step 4 (read the old
 * count, then found its slot deleted) falls back to slot 0.
 */
struct lb_backend_key {
	__u32 vip;   /* network byte order */
	__u16 port;  /* network byte order */
	__u8 proto;
	__u8 pad;    /* always 0 */
	__u16 slot;  /* host byte order */
	__u16 pad2;  /* always 0 */
};

struct lb_backend_val {
	__u32 ip;    /* network byte order */
	__u16 port;  /* network byte order */
	__u16 pad;   /* always 0 */
};

/*
 * `revnat` (LRU): (socket cookie, backend) -> the VIP:port the socket asked
 * for. Written by connect4 and sendmsg4, read by recvmsg4 (source of a UDP
 * reply) and getpeername4 (peer of a connected socket). Keyed by backend as
 * well as cookie because one unconnected UDP socket may talk to several
 * services. Being an LRU, a very old entry can be evicted under pressure;
 * then a reply shows the backend's address instead of the VIP's. Two VIPs
 * that share a backend, used from one unconnected socket, share an entry:
 * replies then show the VIP that socket used last.
 */
struct lb_revnat_key {
	__u64 cookie;
	__u32 ip;    /* backend, network byte order */
	__u16 port;  /* backend, network byte order */
	__u16 pad;   /* always 0 */
};

struct lb_revnat_val {
	__u32 vip;   /* network byte order */
	__u16 port;  /* network byte order */
	__u16 pad;   /* always 0 */
};

#ifdef __BPF__
_Static_assert(sizeof(struct lb_service_key) == LB_SERVICE_KEY_SIZE, "lb_service_key size");
_Static_assert(sizeof(struct lb_service_val) == LB_SERVICE_VAL_SIZE, "lb_service_val size");
_Static_assert(sizeof(struct lb_backend_key) == LB_BACKEND_KEY_SIZE, "lb_backend_key size");
_Static_assert(sizeof(struct lb_backend_val) == LB_BACKEND_VAL_SIZE, "lb_backend_val size");
_Static_assert(sizeof(struct lb_revnat_key) == LB_REVNAT_KEY_SIZE, "lb_revnat_key size");
_Static_assert(sizeof(struct lb_revnat_val) == LB_REVNAT_VAL_SIZE, "lb_revnat_val size");
#endif

#endif /* MESH_LB_H */
