// SPDX-License-Identifier: Apache-2.0
/*
 * The routing mesh's fast path: published ports answered by a task on
 * another node, without conntrack, NAT rules or the ingress sandbox's stack
 * on the node that took the connection. Four tc programs (maps in
 * nodeport.h, loader crates/mesh-lb/src/nodeport.rs):
 *
 *   np_underlay_in   tc ingress of the node's underlay interface. A packet
 *                    for node_ip:published port picks a task (by a hash of
 *                    the client's address and port, remembered per flow in
 *                    `fwd`) and is DNATed to it (the client's address is
 *                    kept). It goes to the task's node on the ingress
 *                    overlay's VNI as if the node's ingress sandbox had sent
 *                    it (inner source MAC = the sandbox's):
 *                    - one segment: encapsulated in VXLAN here and sent out
 *                      of the underlay at once (bpf_redirect_neigh, to the
 *                      next hop of the route to the node's VTEP);
 *                    - a GSO skb (segments the client's stack merged): to
 *                      the kernel's VXLAN device, over the sandbox's veth
 *                      (np_sbox_veth_in). bpf_skb_adjust_room marks what it
 *                      encapsulates SKB_GSO_DODGY, which no veth or common
 *                      NIC takes: the skb would be cut into segments at the
 *                      first transmit, each crossing every hop after it.
 *                    A task on this node, a port without backends, IP
 *                    options, fragments and a UDP datagram too large to
 *                    encapsulate are passed to the kernel: the nftables
 *                    path. The task's node routes the replies back here in
 *                    VXLAN (the return path marks connections by the
 *                    sender's MAC, the sandbox's): the same program finds
 *                    them in `rev`, strips the VXLAN headers, gives them
 *                    node_ip:published port as source and the client's L2
 *                    next hop as destination, and sends them back out
 *                    (vxlan_in). On the task's node, the same program takes
 *                    VXLAN on the ingress VNI for a task in `local` past the
 *                    VXLAN device and the overlay's bridge, straight into the
 *                    task's namespace (local_in).
 *   np_sbox_veth_in  tc ingress of the sandbox's end of its veth to the
 *                    host (mi0): a GSO skb from np_underlay_in (source MAC
 *                    = the sandbox's overlay MAC, which nothing else sends
 *                    there) goes on to the ingress overlay's bridge behind
 *                    the sandbox's leg, whose VXLAN device encapsulates it
 *                    whole. The sandbox's stack never sees it.
 *   np_sbox_in       tc ingress of the sandbox's leg on the ingress overlay.
 *                    A reply merged by GRO (a GSO skb) is left to the
 *                    kernel's VXLAN device, which also resets its tunnel GSO
 *                    state (bpf_skb_adjust_room cannot in 6.18). Found in
 *                    `rev`, it gets the same rewrite here and is handed to
 *                    the host's end of the sandbox's veth, skipping the
 *                    sandbox's stack.
 *   np_host_veth_in  tc ingress of the host's end of that veth: a packet from
 *                    node_ip (only the previous program sends those) goes
 *                    straight out of the underlay interface.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "mix.h"
#include "nodeport.h"

#define ETH_LEN 14
#define IP_OFF ETH_LEN
#define L4_OFF (ETH_LEN + 20)
#define IP_TTL_OFF (IP_OFF + 8)
#define IP_CSUM_OFF (IP_OFF + 10)
#define IP_SRC_OFF (IP_OFF + 12)
#define IP_DST_OFF (IP_OFF + 16)
#define TCP_CSUM_OFF (L4_OFF + 16)
#define UDP_CSUM_OFF (L4_OFF + 6)
/* Outer IPv4 + UDP + VXLAN + inner Ethernet. */
#define ENCAP_LEN 50

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct np_config);
} np_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NP_MAX_PORTS);
	__type(key, struct np_port_key);
	__type(value, struct np_port_val);
} np_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NP_MAX_BACKENDS);
	__type(key, struct np_backend_key);
	__type(value, struct np_backend_val);
} np_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NP_MAX_BACKENDS);
	__type(key, struct np_alive_key);
	__type(value, __u32);
} np_alive SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NP_MAX_FLOWS);
	__type(key, struct np_fwd_key);
	__type(value, struct np_backend_val);
} np_fwd SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NP_MAX_FLOWS);
	__type(key, struct np_rev_key);
	__type(value, struct np_rev_val);
} np_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NP_MAX_LOCAL);
	__type(key, __u32);
	__type(value, struct np_local_val);
} np_local SEC(".maps");

struct encap {
	struct iphdr ip;
	struct udphdr udp;
	__be32 vx_flags;
	__be32 vx_vni;
	__u8 dmac[6];
	__u8 smac[6];
	__be16 proto;
} __attribute__((packed));

_Static_assert(sizeof(struct encap) == ENCAP_LEN, "encap size");

static __always_inline struct np_config *config(void)
{
	__u32 k = 0;
	struct np_config *cfg = bpf_map_lookup_elem(&np_config, &k);

	if (!cfg || !cfg->enabled)
		return 0;
	return cfg;
}

/* The Ethernet header of an IPv4 frame, or 0 for anything else. */
static __always_inline struct ethhdr *ipv4_frame(struct __sk_buff *skb)
{
	struct ethhdr *eth = (void *)(long)skb->data;

	if ((void *)(eth + 1) > (void *)(long)skb->data_end ||
	    eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	return eth;
}

static __always_inline __u32 mix(__u32 a, __u32 b)
{
	return mix64(((__u64)a << 32) | b);
}

static __always_inline __u16 ip_csum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

static __always_inline int same_mac(const __u8 *a, const __u8 *b)
{
	__u8 d = 0;

#pragma unroll
	for (int i = 0; i < 6; i++)
		d |= a[i] ^ b[i];
	return d == 0;
}

static __always_inline int alive(__u32 ip, __u16 port, __u8 proto)
{
	struct np_alive_key k;

	__builtin_memset(&k, 0, sizeof(k));
	k.ip = ip;
	k.port = port;
	k.proto = proto;
	return bpf_map_lookup_elem(&np_alive, &k) != 0;
}

/* Rewrites one address (at `ip_off`) and one port (at `port_off`) of an IPv4
 * TCP/UDP packet, with the checksums. */
static __always_inline int rewrite(struct __sk_buff *skb, __u8 proto, int udp_csum,
				   int ip_off, __u32 old_ip, __u32 new_ip,
				   int port_off, __u16 old_port, __u16 new_port)
{
	int l4 = proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF;
	__u64 mangled = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (proto == IPPROTO_TCP || udp_csum) {
		if (bpf_l4_csum_replace(skb, l4, old_ip, new_ip,
					BPF_F_PSEUDO_HDR | mangled | 4))
			return -1;
		if (bpf_l4_csum_replace(skb, l4, old_port, new_port, mangled | 2))
			return -1;
	}
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ip, new_ip, 4))
		return -1;
	if (bpf_skb_store_bytes(skb, ip_off, &new_ip, 4, 0))
		return -1;
	if (bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0))
		return -1;
	return 0;
}

/* Decrements the TTL of the IPv4 packet at IP_OFF, with its checksum: the fast
 * path forwards as a router does. A packet whose TTL would expire never gets
 * here: the kernel's path takes it and answers it as a router does (ICMP time
 * exceeded). 0, or -1 when a helper failed. */
static __always_inline int dec_ttl(struct __sk_buff *skb)
{
	__u8 w[2]; /* TTL, protocol: one checksummed 16-bit word */
	__u16 old, new;

	if (bpf_skb_load_bytes(skb, IP_TTL_OFF, w, 2))
		return -1;
	__builtin_memcpy(&old, w, 2);
	w[0]--;
	__builtin_memcpy(&new, w, 2);
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, 2))
		return -1;
	return bpf_skb_store_bytes(skb, IP_TTL_OFF, w, 1, 0) ? -1 : 0;
}

/* The `rev` key of the IPv4 TCP/UDP reply whose IP header is at `ip`, and whether it
 * carries a UDP checksum: 0, or -1 when the packet is something else. */
static __always_inline int reply_key(struct iphdr *ip, void *end, struct np_rev_key *rk,
				     int *udp_csum)
{
	__be16 *ports;

	if ((void *)(ip + 1) > end || ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)))
		return -1;
	if (ip->ttl <= 1)
		return -1;
	if (ip->protocol == IPPROTO_TCP) {
		if ((void *)ip + 20 + sizeof(struct tcphdr) > end)
			return -1;
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(ip + 1);

		if ((void *)(udp + 1) > end)
			return -1;
		*udp_csum = udp->check != 0;
	} else {
		return -1;
	}
	ports = (void *)(ip + 1);
	__builtin_memset(rk, 0, sizeof(*rk));
	rk->task_ip = ip->saddr;
	rk->client_ip = ip->daddr;
	rk->task_port = ports[0];
	rk->client_port = ports[1];
	rk->proto = ip->protocol;
	return 0;
}

/* Rewrites a reply (its IP header at IP_OFF) of flow `rk`/`rv`: source
 * node_ip:published port, Ethernet addresses to the client's next hop from the
 * underlay interface, TTL one less. 0, or -1 when a helper failed. */
static __always_inline int reply_rewrite(struct __sk_buff *skb, struct np_config *cfg,
					 struct np_rev_key *rk, struct np_rev_val *rv,
					 int udp_csum)
{
	__u8 macs[12];

	__builtin_memcpy(macs, rv->client_mac, 6);
	__builtin_memcpy(&macs[6], cfg->underlay_mac, 6);
	if (rewrite(skb, rk->proto, udp_csum, IP_SRC_OFF, rk->task_ip, cfg->node_ip,
		    L4_OFF, rk->task_port, rv->port))
		return -1;
	if (dec_ttl(skb))
		return -1;
	return bpf_skb_store_bytes(skb, 0, macs, 12, 0) ? -1 : 0;
}

/*
 * VXLAN from another node for a task of this node (in `local`): the inner
 * frame, MACs and all, takes the place of the outer headers, and is handed
 * into the task's namespace through its gateway-bridge veth
 * (bpf_redirect_peer: no queue, no bridge), where the return path marks it
 * by the sandbox's MAC as it does on the overlay (mesh_ingress::return_path).
 * The kernel's way here is UDP receive, the VXLAN device and its GRO cells,
 * the overlay's bridge and a veth: two queues more. A GSO skb keeps its
 * tunnel GSO type (6.18 cannot clear it from BPF), which nothing on a local
 * delivery reads; its gso_size is the inner MSS already (FIXED_GSO). An skb
 * whose NIC vouched for checksums loses that (the default of adjust_room):
 * the task's stack checks the inner one itself.
 */
static __always_inline int local_in(struct __sk_buff *skb, __u32 ifindex)
{
	__u8 macs[12];

	/* The inner MACs: after the outer Ethernet, IPv4, UDP and VXLAN headers. */
	if (bpf_skb_load_bytes(skb, ETH_LEN + 20 + 8 + 8, macs, sizeof(macs)))
		return TC_ACT_OK;
	if (bpf_skb_adjust_room(skb, -ENCAP_LEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
		return TC_ACT_OK;
	if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0))
		return TC_ACT_SHOT;
	return bpf_redirect_peer(ifindex, 0);
}

/*
 * VXLAN to this node's VXLAN port on the ingress VNI (outer IPv4 `oip`):
 * - for a task of this node in `local`: local_in;
 * - a task's reply coming back from its node for a flow in `rev`, from that
 *   flow's node: decapsulated, rewritten (reply_rewrite), and sent to the
 *   client at once. A segment merged by GSO/GRO is left to the kernel's VXLAN
 *   device, which resets its tunnel GSO state (6.18's bpf_skb_adjust_room
 *   cannot): np_sbox_in takes it behind the sandbox's leg.
 * Anything else is the kernel's (TC_ACT_OK).
 */
static __always_inline int vxlan_in(struct __sk_buff *skb, struct np_config *cfg,
				    struct iphdr *oip, void *end)
{
	struct udphdr *oudp = (void *)(oip + 1);
	struct np_local_val *lv;
	struct np_rev_val *rv;
	struct np_rev_key rk;
	struct ethhdr *ieth;
	struct iphdr *iip;
	int udp_csum = 0;
	__be32 *vx;

	if ((void *)(oudp + 1) > end || oudp->dest != cfg->vxlan_port)
		return TC_ACT_OK;
	vx = (void *)(oudp + 1);
	if ((void *)(vx + 2) > end || vx[1] != bpf_htonl(cfg->vni << 8))
		return TC_ACT_OK;
	ieth = (void *)(vx + 2);
	if ((void *)(ieth + 1) > end || ieth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	iip = (void *)(ieth + 1);
	if ((void *)(iip + 1) > end)
		return TC_ACT_OK;
	lv = bpf_map_lookup_elem(&np_local, &iip->daddr);
	if (lv)
		return local_in(skb, lv->ifindex);
	if (reply_key(iip, end, &rk, &udp_csum))
		return TC_ACT_OK;
	rv = bpf_map_lookup_elem(&np_rev, &rk);
	if (!rv || rv->vtep != oip->saddr || skb->gso_size)
		return TC_ACT_OK;
	if (bpf_skb_adjust_room(skb, -ENCAP_LEN, BPF_ADJ_ROOM_MAC, 0))
		return TC_ACT_OK;
	if (reply_rewrite(skb, cfg, &rk, rv, udp_csum))
		return TC_ACT_SHOT;
	return bpf_redirect(cfg->underlay_ifindex, 0);
}

SEC("classifier")
int np_underlay_in(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct np_config *cfg = config();
	struct np_backend_val be, *fv;
	struct np_backend_key bk;
	struct np_port_key pk;
	struct np_local_val *lv;
	struct np_port_val *pv;
	struct np_fwd_key fk;
	struct np_rev_key rk;
	struct np_rev_val rv;
	struct encap enc;
	struct iphdr oip;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__be16 *ports;
	__u32 client_ip, hash, tot_len, local_ifindex = 0;
	__u16 client_port, port;
	int syn = 0, udp_csum = 0, have = 0;
	__u8 proto;

	if (!cfg)
		return TC_ACT_OK;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->daddr != cfg->node_ip)
		return TC_ACT_OK;
	if (ip->frag_off & bpf_htons(0x3fff))
		return TC_ACT_OK;
	proto = ip->protocol;
	if (proto == IPPROTO_UDP) {
		int ret = vxlan_in(skb, cfg, ip, end);

		if (ret != TC_ACT_OK)
			return ret;
		/* vxlan_in may have moved the data: parse again. */
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		eth = data;
		ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return TC_ACT_OK;
	}
	if (proto == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(ip + 1);

		if ((void *)(tcp + 1) > end)
			return TC_ACT_OK;
		syn = tcp->syn && !tcp->ack;
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(ip + 1);

		if ((void *)(udp + 1) > end)
			return TC_ACT_OK;
		udp_csum = udp->check != 0;
	} else {
		return TC_ACT_OK;
	}
	/* A TTL that expires here is the kernel's to answer. */
	if (ip->ttl <= 1)
		return TC_ACT_OK;
	ports = (void *)(ip + 1);
	client_ip = ip->saddr;
	client_port = ports[0];
	port = ports[1];
	tot_len = bpf_ntohs(ip->tot_len);
	/* A segment merged by GSO is cut to the connection's MSS, which the
	 * task's overlay MTU bounds; anything else must fit as it is. */
	if (!skb->gso_size && tot_len + ENCAP_LEN > cfg->mtu)
		return TC_ACT_OK;

	__builtin_memset(&pk, 0, sizeof(pk));
	pk.port = port;
	pk.proto = proto;
	pv = bpf_map_lookup_elem(&np_ports, &pk);
	if (!pv)
		return TC_ACT_OK;

	__builtin_memset(&fk, 0, sizeof(fk));
	fk.client_ip = client_ip;
	fk.client_port = client_port;
	fk.port = port;
	fk.proto = proto;
	fv = bpf_map_lookup_elem(&np_fwd, &fk);
	if (fv) {
		be = *fv;
		/* A datagram or a new connection leaves a task that is gone. */
		have = (proto == IPPROTO_TCP && !syn) || alive(be.ip, be.port, proto);
	}
	/* Not found (new, or evicted from the LRU): the task is chosen by a hash of
	 * the client's address and port, so a segment of a connection whose entry
	 * was evicted goes to the same task while the backends are unchanged. A
	 * connection given to a local task is handed into it through its gateway
	 * veth when the task is in `local`, else to the kernel (the nftables path, whose
	 * conntrack keeps its task); either is recorded, and the flow stays on its
	 * way: the hash of its next segment, after a change of the backends, could
	 * name a task on another node, which would answer the handshake's ACK with
	 * a reset, and a flow the kernel's NAT began must end there. */
	if (!have) {
		__u16 count = *(volatile __u16 *)&pv->count;
		struct np_backend_val *b;

		if (count == 0)
			return TC_ACT_OK;
		__builtin_memset(&bk, 0, sizeof(bk));
		bk.port = port;
		bk.proto = proto;
		bk.slot = (__u16)(mix(client_ip, client_port) % count);
		b = bpf_map_lookup_elem(&np_backends, &bk);
		if (!b) {
			bk.slot = 0;
			b = bpf_map_lookup_elem(&np_backends, &bk);
			if (!b)
				return TC_ACT_OK;
		}
		be = *b;
		if (be.local && bpf_map_lookup_elem(&np_local, &be.ip))
			be.local = NP_LOCAL_FAST;
		bpf_map_update_elem(&np_fwd, &fk, &be, BPF_ANY);
	}
	if (be.local == NP_LOCAL_FAST) {
		lv = bpf_map_lookup_elem(&np_local, &be.ip);
		if (!lv)
			return TC_ACT_OK;
		local_ifindex = lv->ifindex;
	} else if (be.local) {
		return TC_ACT_OK;
	}

	__builtin_memset(&rk, 0, sizeof(rk));
	rk.task_ip = be.ip;
	rk.client_ip = client_ip;
	rk.task_port = be.port;
	rk.client_port = client_port;
	rk.proto = proto;
	__builtin_memset(&rv, 0, sizeof(rv));
	rv.port = port;
	__builtin_memcpy(rv.client_mac, eth->h_source, 6);
	rv.vtep = be.vtep;
	if (syn || proto == IPPROTO_UDP || !have) {
		struct np_rev_val *old = bpf_map_lookup_elem(&np_rev, &rk);

		if (!old || old->port != rv.port || old->vtep != rv.vtep ||
		    !same_mac(old->client_mac, rv.client_mac))
			bpf_map_update_elem(&np_rev, &rk, &rv, BPF_ANY);
	}

	if (rewrite(skb, proto, udp_csum, IP_DST_OFF, cfg->node_ip, be.ip,
		    L4_OFF + 2, port, be.port) || dec_ttl(skb))
		return TC_ACT_SHOT;

	/* Overlay MACs are 02:42 + the address. */
	__u8 macs[12] = {0x02, 0x42};

	__builtin_memcpy(&macs[2], &be.ip, 4);
	__builtin_memcpy(&macs[6], cfg->sbox_mac, 6);
	if (local_ifindex) {
		/* A task of this node: into its namespace through its gateway-bridge
		 * veth, as from the sandbox (local_in). Its reply goes to the sandbox
		 * on the overlay, where np_sbox_in sends it back out. */
		if (bpf_skb_store_bytes(skb, 0, macs, 12, 0))
			return TC_ACT_SHOT;
		return bpf_redirect_peer(local_ifindex, 0);
	}
	if (skb->gso_size) {
		/* To the task's MAC from the sandbox's, through the sandbox's veth
		 * (np_sbox_veth_in) to the overlay's bridge and VXLAN device. */
		if (bpf_skb_store_bytes(skb, 0, macs, 12, 0))
			return TC_ACT_SHOT;
		return bpf_redirect_peer(cfg->host_veth_ifindex, 0);
	}

	hash = mix(client_ip ^ be.ip, ((__u32)client_port << 16) | be.port);
	__builtin_memset(&oip, 0, sizeof(oip));
	oip.version = 4;
	oip.ihl = 5;
	oip.tot_len = bpf_htons(tot_len + ENCAP_LEN);
	oip.frag_off = bpf_htons(0x4000); /* DF */
	oip.ttl = 64;
	oip.protocol = IPPROTO_UDP;
	oip.saddr = cfg->node_ip;
	oip.daddr = be.vtep;
	oip.check = ip_csum(&oip);
	__builtin_memset(&enc, 0, sizeof(enc));
	enc.ip = oip;
	enc.udp.source = bpf_htons(0xc000 | (hash & 0x3fff));
	enc.udp.dest = cfg->vxlan_port;
	enc.udp.len = bpf_htons(tot_len + ENCAP_LEN - 20);
	enc.vx_flags = bpf_htonl(0x08000000);
	enc.vx_vni = bpf_htonl(cfg->vni << 8);
	__builtin_memcpy(enc.dmac, macs, 12);
	enc.proto = bpf_htons(ETH_P_IP);

	if (bpf_skb_adjust_room(skb, ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
				BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
				BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
				BPF_F_ADJ_ROOM_ENCAP_L2(ETH_LEN)))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, ETH_LEN, &enc, sizeof(enc), 0))
		return TC_ACT_SHOT;

	/* The next hop is the route's to the VTEP (a FIB lookup on the outer
	 * header): the task's node may be behind a router. */
	return bpf_redirect_neigh(cfg->underlay_ifindex, NULL, 0, 0);
}

SEC("classifier")
int np_sbox_veth_in(struct __sk_buff *skb)
{
	struct np_config *cfg = config();
	struct ethhdr *eth = ipv4_frame(skb);

	if (!cfg || !eth)
		return TC_ACT_OK;
	if (!same_mac(eth->h_source, cfg->sbox_mac))
		return TC_ACT_OK;
	return bpf_redirect_peer(cfg->sbox_leg_ifindex, 0);
}

SEC("classifier")
int np_sbox_in(struct __sk_buff *skb)
{
	void *end = (void *)(long)skb->data_end;
	struct np_config *cfg = config();
	struct ethhdr *eth = ipv4_frame(skb);
	struct np_rev_val *rv;
	struct np_rev_key rk;
	int udp_csum = 0;

	if (!cfg || !eth)
		return TC_ACT_OK;
	if (reply_key((void *)(eth + 1), end, &rk, &udp_csum))
		return TC_ACT_OK;
	rv = bpf_map_lookup_elem(&np_rev, &rk);
	if (!rv)
		return TC_ACT_OK;
	if (reply_rewrite(skb, cfg, &rk, rv, udp_csum))
		return TC_ACT_SHOT;
	return bpf_redirect_peer(cfg->sbox_veth_ifindex, 0);
}

SEC("classifier")
int np_host_veth_in(struct __sk_buff *skb)
{
	void *end = (void *)(long)skb->data_end;
	struct np_config *cfg = config();
	struct ethhdr *eth = ipv4_frame(skb);
	struct iphdr *ip;

	if (!cfg || !eth)
		return TC_ACT_OK;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->saddr != cfg->node_ip)
		return TC_ACT_OK;
	return bpf_redirect(cfg->underlay_ifindex, 0);
}

/* Only helpers that are not GPL-only are used, so the workspace's licence
 * is declared as is. */
char _license[] SEC("license") = "Apache-2.0";
