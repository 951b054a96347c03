// SPDX-License-Identifier: Apache-2.0
/*
 * Socket-level load balancing of service VIPs (as Cilium's socket-LB):
 * the destination is rewritten when the socket is connected or a datagram
 * is sent, so east-west traffic to a VIP is never NATed per packet.
 *
 *   cgroup/connect4      TCP and connected UDP: VIP:port -> random backend
 *   cgroup/sendmsg4      unconnected UDP: VIP:port -> backend chosen by a
 *                        hash of the socket cookie (one socket keeps talking
 *                        to one backend while the backend set is unchanged)
 *   cgroup/recvmsg4      UDP reply: backend -> VIP:port as the source
 *   cgroup/getpeername4  connected socket: backend -> VIP:port as the peer
 *
 * Map layouts and the update protocol that keeps lookups hole-free are in
 * lb.h. The loader is crates/mesh-lb.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <asm-generic/errno.h>
#include <bpf/bpf_helpers.h>

#include "lb.h"
#include "mix.h"

#define SYS_REJECT 0
#define SYS_PROCEED 1

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAX_SERVICES);
	__type(key, struct lb_service_key);
	__type(value, struct lb_service_val);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAX_BACKENDS);
	__type(key, struct lb_backend_key);
	__type(value, struct lb_backend_val);
} backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_MAX_REVNAT);
	__type(key, struct lb_revnat_key);
	__type(value, struct lb_revnat_val);
} revnat SEC(".maps");

enum xlate {
	XLATE_NONE,    /* not a VIP: leave the address alone */
	XLATE_DONE,    /* rewritten to a backend */
	XLATE_REFUSE,  /* a VIP without backends */
};

/*
 * The context's user_port is a 4-byte field holding the port in network byte
 * order in its first two bytes. Older verifiers refuse narrow loads of it, so
 * always load all four bytes (volatile keeps clang from narrowing the load).
 */
static __always_inline __u16 ctx_port(struct bpf_sock_addr *ctx)
{
	return (__u16)*(volatile __u32 *)&ctx->user_port;
}

static __always_inline __u32 ctx_ip4(struct bpf_sock_addr *ctx)
{
	return *(volatile __u32 *)&ctx->user_ip4;
}

static __always_inline void remember(__u64 cookie, __u32 be_ip, __u16 be_port,
				     __u32 vip, __u16 vport)
{
	struct lb_revnat_key key;
	struct lb_revnat_val val;
	struct lb_revnat_val *old;

	__builtin_memset(&key, 0, sizeof(key));
	__builtin_memset(&val, 0, sizeof(val));
	key.cookie = cookie;
	key.ip = be_ip;
	key.port = be_port;
	val.vip = vip;
	val.port = vport;

	/* Every datagram of an unconnected socket passes here: skip the
	 * (costlier, LRU-churning) update when nothing changed. */
	old = bpf_map_lookup_elem(&revnat, &key);
	if (old && old->vip == vip && old->port == vport)
		return;
	bpf_map_update_elem(&revnat, &key, &val, BPF_ANY);
}

static __always_inline enum xlate xlate_fwd(struct bpf_sock_addr *ctx, __u8 proto,
					    __u32 pick, __u64 cookie)
{
	struct lb_service_key skey;
	struct lb_backend_key bkey;
	struct lb_service_val *svc;
	struct lb_backend_val *be;
	__u32 vip = ctx_ip4(ctx);
	__u16 vport = ctx_port(ctx);
	__u32 be_ip;
	__u16 be_port;
	__u16 count;

	__builtin_memset(&skey, 0, sizeof(skey));
	skey.vip = vip;
	skey.port = vport;
	skey.proto = proto;

	svc = bpf_map_lookup_elem(&services, &skey);
	if (!svc) {
		/* A whole-VIP entry (port 0) takes every port, as Swarm's VIPs
		 * do; its backends (port 0) keep the port asked for. */
		skey.port = 0;
		svc = bpf_map_lookup_elem(&services, &skey);
		if (!svc)
			return XLATE_NONE;
	}
	/* Read count once: the slots below it are always filled (lb.h). */
	count = *(volatile __u16 *)&svc->count;
	if (count == 0)
		return XLATE_REFUSE;

	__builtin_memset(&bkey, 0, sizeof(bkey));
	bkey.vip = vip;
	bkey.port = skey.port;
	bkey.proto = proto;
	bkey.slot = (__u16)(pick % count);

	be = bpf_map_lookup_elem(&backends, &bkey);
	if (!be) {
		/* Raced with a shrink that deleted our slot: slot 0 exists
		 * whenever the service has a backend. */
		bkey.slot = 0;
		be = bpf_map_lookup_elem(&backends, &bkey);
		if (!be)
			return XLATE_REFUSE;
	}
	be_ip = be->ip;
	be_port = be->port ? be->port : vport;

	remember(cookie, be_ip, be_port, vip, vport);

	ctx->user_ip4 = be_ip;
	ctx->user_port = (__u32)be_port;
	return XLATE_DONE;
}

static __always_inline void xlate_rev(struct bpf_sock_addr *ctx)
{
	struct lb_revnat_key key;
	struct lb_revnat_val *val;

	__builtin_memset(&key, 0, sizeof(key));
	key.cookie = bpf_get_socket_cookie(ctx);
	key.ip = ctx_ip4(ctx);
	key.port = ctx_port(ctx);

	val = bpf_map_lookup_elem(&revnat, &key);
	if (!val)
		return;
	ctx->user_ip4 = val->vip;
	ctx->user_port = (__u32)val->port;
}

SEC("cgroup/connect4")
int sock_lb_connect4(struct bpf_sock_addr *ctx)
{
	__u8 proto;

	if (ctx->protocol == IPPROTO_TCP)
		proto = LB_PROTO_TCP;
	else if (ctx->protocol == IPPROTO_UDP)
		proto = LB_PROTO_UDP;
	else
		return SYS_PROCEED;

	if (xlate_fwd(ctx, proto, bpf_get_prandom_u32(),
		      bpf_get_socket_cookie(ctx)) == XLATE_REFUSE) {
		bpf_set_retval(-ECONNREFUSED);
		return SYS_REJECT;
	}
	return SYS_PROCEED;
}

SEC("cgroup/sendmsg4")
int sock_lb_sendmsg4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);

	/* Only UDP reaches this hook. */
	/* Socket cookies are sequential: mix64 spreads them. */
	if (xlate_fwd(ctx, LB_PROTO_UDP, mix64(cookie), cookie) == XLATE_REFUSE) {
		bpf_set_retval(-ECONNREFUSED);
		return SYS_REJECT;
	}
	return SYS_PROCEED;
}

SEC("cgroup/recvmsg4")
int sock_lb_recvmsg4(struct bpf_sock_addr *ctx)
{
	xlate_rev(ctx);
	return SYS_PROCEED;
}

SEC("cgroup/getpeername4")
int sock_lb_getpeername4(struct bpf_sock_addr *ctx)
{
	xlate_rev(ctx);
	return SYS_PROCEED;
}

/* Only helpers that are not GPL-only are used, so the workspace's licence
 * is declared as is. */
char _license[] SEC("license") = "Apache-2.0";
