/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Map layouts of the routing mesh's fast path (nodeport.c), shared with the
 * loader `crates/mesh-lb/src/nodeport.rs`, which mirrors these structs and
 * asserts their sizes (the NP_*_SIZE values, read by build.rs as lb.h's are).
 *
 * Byte order: addresses and ports in NETWORK byte order, as in the packets;
 * `slot`, `count`, `vni`, `mtu` and ifindexes in host byte order.
 *
 * Keep this file parseable by build.rs: one `#define NP_NAME <decimal>` per
 * line for the constants.
 */
#ifndef MESH_NODEPORT_H
#define MESH_NODEPORT_H

#ifdef __BPF__
#include <linux/types.h>
#endif

#define NP_MAX_PORTS 4096
#define NP_MAX_BACKENDS 65536
#define NP_MAX_FLOWS 262144
#define NP_MAX_LOCAL 4096

/*
 * The maps' layouts and meanings, as a whole: a daemon loading these programs
 * over those of another build copies the old maps' entries (ports, backends,
 * flows) into its own only when this is the same. Bump it with any change to
 * a map's key, value or meaning.
 */
#define NP_MAPS_VERSION 1

#define NP_CONFIG_SIZE 48
#define NP_PORT_KEY_SIZE 4
#define NP_PORT_VAL_SIZE 8
#define NP_BACKEND_KEY_SIZE 8
#define NP_BACKEND_VAL_SIZE 12
#define NP_ALIVE_KEY_SIZE 8
#define NP_FWD_KEY_SIZE 12
#define NP_REV_KEY_SIZE 16
#define NP_REV_VAL_SIZE 12
#define NP_LOCAL_VAL_SIZE 8

/*
 * `config` (array, one element): where this node's fast path plugs in.
 * `enabled` == 0 makes every program pass every packet.
 */
struct np_config {
	__u32 node_ip;          /* the node's underlay address: ports published on it */
	__u32 underlay_ifindex; /* host namespace: the interface holding node_ip */
	__u32 sbox_veth_ifindex;/* sandbox namespace: its veth to the host (mi0) */
	__u32 host_veth_ifindex;/* host namespace: the other end of that veth (mesh_ingr0) */
	__u32 sbox_leg_ifindex; /* sandbox namespace: its leg on the ingress overlay (eth0) */
	__u32 vni;              /* the ingress overlay's VNI */
	__u16 vxlan_port;       /* network byte order */
	__u16 mtu;              /* the underlay interface's MTU */
	__u8 sbox_mac[6];       /* the sandbox's MAC on the ingress overlay */
	__u8 underlay_mac[6];   /* the underlay interface's MAC */
	__u32 enabled;
	__u32 pad;
};

/* `ports`: (published port, proto) -> how many backends, in slots [0, count). */
struct np_port_key {
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct np_port_val {
	__u16 count;
	__u16 rev;
	__u32 flags;
};

/*
 * `backends`: (published port, proto, slot) -> a task. Same update protocol
 * as lb.h's `backends` (crates/mesh-lb/src/plan.rs): a slot below `count` is
 * always filled. `local` is NP_LOCAL_KERNEL for a task on this node: when the
 * task is in `local` too, np_underlay_in hands its connections straight into it
 * (recorded in `fwd` as NP_LOCAL_FAST), else to the nftables path (host DNAT ->
 * sandbox), which delivers locally.
 */
#define NP_LOCAL_KERNEL 1
#define NP_LOCAL_FAST 2

struct np_backend_key {
	__u16 port;
	__u8 proto;
	__u8 pad;
	__u16 slot;
	__u16 pad2;
};

struct np_backend_val {
	__u32 ip;    /* the task's address on the ingress overlay */
	__u32 vtep;  /* its node's underlay address */
	__u16 port;  /* the task's port */
	__u8 local;
	__u8 pad;
};

/* `alive`: (task address, port, proto) of every backend of every port. A flow
 * whose task left is moved (UDP) or, for a new TCP connection, re-balanced. */
struct np_alive_key {
	__u32 ip;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

/* `fwd` (LRU): (client, published port, proto) -> the task it was given
 * (an np_backend_val); `local` NP_LOCAL_KERNEL means the flow is the kernel's,
 * NP_LOCAL_FAST that np_underlay_in hands it to a task of this node itself. */
struct np_fwd_key {
	__u32 client_ip;
	__u16 client_port;
	__u16 port;
	__u8 proto;
	__u8 pad[3];
};

/* `rev` (LRU): (task, client, proto) -> what the reply must look like. */
struct np_rev_key {
	__u32 task_ip;
	__u32 client_ip;
	__u16 task_port;
	__u16 client_port;
	__u8 proto;
	__u8 pad[3];
};

struct np_rev_val {
	__u16 port;          /* the published port: the reply's source port */
	__u8 client_mac[6];  /* where the client's packets came from on the underlay */
	__u32 vtep;          /* the task's node */
};

/*
 * `local`: this node's tasks that publish ports in ingress mode, by their
 * address on the ingress overlay (network byte order). VXLAN from another
 * node on the ingress VNI for one of them is decapsulated by np_underlay_in
 * and handed straight into the task's namespace through its gateway-bridge
 * veth (`ifindex`: the host's end, in host byte order), past the VXLAN
 * device, the overlay's bridge and its veth; so are the connections this
 * node's published ports give them, past the host's and the sandbox's
 * DNAT. Filled by the daemon, and carried over to a new daemon's maps with
 * the flows: a flow handed to a local task must find it there.
 */
struct np_local_val {
	__u32 ifindex;
	__u32 pad;
};

#ifdef __BPF__
_Static_assert(sizeof(struct np_config) == NP_CONFIG_SIZE, "np_config size");
_Static_assert(sizeof(struct np_port_key) == NP_PORT_KEY_SIZE, "np_port_key size");
_Static_assert(sizeof(struct np_port_val) == NP_PORT_VAL_SIZE, "np_port_val size");
_Static_assert(sizeof(struct np_backend_key) == NP_BACKEND_KEY_SIZE, "np_backend_key size");
_Static_assert(sizeof(struct np_backend_val) == NP_BACKEND_VAL_SIZE, "np_backend_val size");
_Static_assert(sizeof(struct np_alive_key) == NP_ALIVE_KEY_SIZE, "np_alive_key size");
_Static_assert(sizeof(struct np_fwd_key) == NP_FWD_KEY_SIZE, "np_fwd_key size");
_Static_assert(sizeof(struct np_rev_key) == NP_REV_KEY_SIZE, "np_rev_key size");
_Static_assert(sizeof(struct np_rev_val) == NP_REV_VAL_SIZE, "np_rev_val size");
_Static_assert(sizeof(struct np_local_val) == NP_LOCAL_VAL_SIZE, "np_local_val size");
#endif

#endif /* MESH_NODEPORT_H */
