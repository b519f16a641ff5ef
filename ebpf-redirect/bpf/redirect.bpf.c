// SPDX-License-Identifier: GPL-2.0 OR MIT
// weir's sockmap fast path. `weir_sockops` puts established TCP sockets (IPv4 and IPv6)
// between two local endpoints (loopback, or addresses in `weir_addrs`) into `weir_socks` when the connection is
// the proxy's: one end's port is in `weir_ports` (the proxy's listener ports, and ports that
// policy adds), or the proxy's own process opened it (its upstream connections, marked by
// `weir_connect4` at connect time). Other local traffic is left alone, even to the same
// upstream port. `weir_msg` then hands every message sent on such a socket straight to its
// peer's receive queue, skipping the loopback TCP stack. A peer not in the map (the other end
// is not local, or was never inserted) is a miss: the message goes the ordinary way
// (SK_PASS), never dropped.
//
// `weir_connect4` (cgroup/connect4) also captures an app's outbound connections for a
// sidecar without iptables: a TCP connect() from a process in the cgroup to a destination in
// scope (`weir_config` and `weir_out_ports`, written by the proxy) is sent to the proxy's
// outbound listener instead. The original destination is kept by socket cookie until the
// connection is established, when `weir_sockops` files it under the app socket's own address
// in `weir_orig_dst`, the map the proxy reads for each connection it accepts there (and
// deletes when the socket closes). Never captured: loopback destinations, and the proxy's own
// connections, so the proxy reaches the original destination itself.
//
// Nothing bounds what waits in a peer's queue but the kernel's socket memory accounting (the
// node's TCP memory): a direction is never sent through TCP once accelerated. Doing
// that past a few MiB left bytes in two queues that Linux 6.18 cannot read safely as one
// (README: a short read that hangs edge-triggered readers, or, through an sk_skb verdict,
// retransmitted bytes delivered twice).
//
// Facts this relies on (measured on Linux 6.x): remote_port in bpf_sock_ops and sk_msg_md is
// the network-order port in the upper 16 bits; local_port is host order. Live sockets are never
// deleted from the map by weir (the kernel removes a socket when it closes). A client's
// ACTIVE_ESTABLISHED callback runs before it sends the handshake's last ACK, so before the
// server's PASSIVE_ESTABLISHED one.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#ifndef IPPROTO_TCP
#define IPPROTO_TCP 6
#endif

// An address of either family: IPv6, or IPv4 as ::ffff:a.b.c.d (so an IPv6 socket talking
// to a v4-mapped address has the same key as the IPv4 socket at the other end). Network order.
struct ip {
	__u32 a[4];
};

// One socket, seen from its own side. The peer's key swaps local and remote.
struct sock_key {
	struct ip local;
	struct ip remote;
	__u32 local_port;  // host order
	__u32 remote_port; // host order
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u32);
} weir_socks SEC(".maps");

// Local addresses besides 127.0.0.0/8 and ::1 (as in `struct ip`) -> 1: the node's own
// addresses, where a node proxy and the pods on the node meet.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct ip);
	__type(value, __u8);
} weir_addrs SEC(".maps");

// Ports whose local connections are accelerated, whoever made them (host order) -> 1:
// the proxy's listener ports and those policy adds.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} weir_ports SEC(".maps");

// Settings written by the proxy (one entry).
struct weir_cfg {
	__u32 proxy_tgid;    // the proxy's process id (0: none): its connections are accelerated
			     // when local, and never captured
	__u32 capture;       // outbound capture on
	__u32 listener_ip4;  // outbound capture's listener, network order
	__u32 listener_port; // host order
	__u32 all_ports;     // 1: every port but those in weir_out_ports; 0: only those
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weir_cfg);
} weir_config SEC(".maps");

// The proxy's own connects, by socket cookie, until established (LRU: a connect that never
// completes is forgotten in time).
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u8);
} weir_proxy_conns SEC(".maps");

// The peers of the proxy's established local connections, keyed as the peer sees itself,
// until the peer's side is established too.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u8);
} weir_expect SEC(".maps");

// Destination ports (host order) -> 1: captured, or exempt when `all_ports` is set.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} weir_out_ports SEC(".maps");

// An IPv4 address and port: ip in network order, port in host order.
struct addr4 {
	__u32 ip4;
	__u32 port;
};

// A captured socket's original destination, by socket cookie, from connect() until the socket
// closes: `weir_getpeername4` answers the app's getpeername() with it (LRU: a connect that
// never completes is forgotten in time).
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct addr4);
} weir_conn_dst SEC(".maps");

// A captured connection's original destination, by the app socket's own address (what the
// proxy sees as its peer). Deleted when the app's socket closes.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct addr4);
	__type(value, struct addr4);
} weir_orig_dst SEC(".maps");

enum counter {
	SOCKETS_INSERTED = 0,
	INSERT_FAILED = 1,
	MSGS_REDIRECTED = 2,
	MSGS_MISSED = 3,
	BYTES_REDIRECTED = 4,
	CONNECTS_CAPTURED = 5,
	CAPTURE_FAILED = 6,
	COUNTERS = 7,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} weir_counters SEC(".maps");

static __always_inline void count(__u32 which, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&weir_counters, &which);
	if (v)
		*v += n;
}

// Keeps the compiler from merging the two families' context loads into one load through a
// computed context pointer, which the verifier refuses.
#define ctx_barrier() __asm__ __volatile__("" ::: "memory")

static __always_inline int is_v4(const struct ip *ip)
{
	return ip->a[0] == 0 && ip->a[1] == 0 && ip->a[2] == bpf_htonl(0xffff);
}

static __always_inline int is_local(const struct ip *ip)
{
	// 127.0.0.0/8: in network order the first byte is the low byte. ::1.
	if (is_v4(ip) && (ip->a[3] & 0xff) == 127)
		return 1;
	if (ip->a[0] == 0 && ip->a[1] == 0 && ip->a[2] == 0 && ip->a[3] == bpf_htonl(1))
		return 1;
	return bpf_map_lookup_elem(&weir_addrs, ip) != 0;
}

// An IPv6 address from a context's `__u32 x_ip6[4]` field (each a direct context load).
#define set_v6(ip, field)                  \
	do {                               \
		(ip)->a[0] = (field)[0];   \
		(ip)->a[1] = (field)[1];   \
		(ip)->a[2] = (field)[2];   \
		(ip)->a[3] = (field)[3];   \
	} while (0)

static __always_inline void set_v4(struct ip *ip, __u32 ip4)
{
	ip->a[0] = 0;
	ip->a[1] = 0;
	ip->a[2] = bpf_htonl(0xffff);
	ip->a[3] = ip4;
}

static __always_inline int in_scope(__u32 local_port, __u32 remote_port)
{
	return bpf_map_lookup_elem(&weir_ports, &local_port) ||
	       bpf_map_lookup_elem(&weir_ports, &remote_port);
}

// Whether the connecting process is the proxy; if so its socket is marked, to be accelerated
// once established.
static __always_inline int marked_as_proxy(struct bpf_sock_addr *ctx, const struct weir_cfg *cfg)
{
	if (!cfg->proxy_tgid || (__u32)(bpf_get_current_pid_tgid() >> 32) != cfg->proxy_tgid)
		return 0;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	__u8 one = 1;
	bpf_map_update_elem(&weir_proxy_conns, &cookie, &one, BPF_ANY);
	return 1;
}

// The proxy's settings for a TCP connect; NULL for any other protocol, or before the proxy
// wrote them.
static __always_inline struct weir_cfg *tcp_connect_config(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return NULL;
	__u32 zero = 0;
	return bpf_map_lookup_elem(&weir_config, &zero);
}

SEC("cgroup/connect4")
int weir_connect4(struct bpf_sock_addr *ctx)
{
	struct weir_cfg *cfg = tcp_connect_config(ctx);
	if (!cfg || marked_as_proxy(ctx, cfg) || !cfg->capture)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	__u32 ip4 = ctx->user_ip4;
	if ((ip4 & 0xff) == 127)
		return 1;
	// user_port holds the network-order port in its low 16 bits.
	__u32 port = bpf_ntohs((__u16)ctx->user_port);
	int listed = bpf_map_lookup_elem(&weir_out_ports, &port) != 0;
	if (cfg->all_ports ? listed : !listed)
		return 1;
	struct addr4 dst = { .ip4 = ip4, .port = port };
	if (bpf_map_update_elem(&weir_conn_dst, &cookie, &dst, BPF_ANY) != 0) {
		// Without its destination on record the proxy could not forward it: leave it be.
		count(CAPTURE_FAILED, 1);
		return 1;
	}
	ctx->user_ip4 = cfg->listener_ip4;
	ctx->user_port = bpf_htons((__u16)cfg->listener_port);
	count(CONNECTS_CAPTURED, 1);
	return 1;
}

// IPv6 connects: only the proxy's own are marked (outbound capture is IPv4 only).
SEC("cgroup/connect6")
int weir_connect6(struct bpf_sock_addr *ctx)
{
	struct weir_cfg *cfg = tcp_connect_config(ctx);
	if (cfg)
		marked_as_proxy(ctx, cfg);
	return 1;
}

// A captured socket's peer, as the app asks for it, is where it was going: the capture stays
// out of the app's sight.
SEC("cgroup/getpeername4")
int weir_getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct addr4 *dst = bpf_map_lookup_elem(&weir_conn_dst, &cookie);
	if (dst) {
		ctx->user_ip4 = dst->ip4;
		ctx->user_port = bpf_htons((__u16)dst->port);
	}
	return 1;
}

// A captured connection is established: file its original destination under the app
// socket's address, and ask to hear when it closes.
static __always_inline void file_original_destination(struct bpf_sock_ops *skops, __u64 cookie)
{
	struct addr4 *dst = bpf_map_lookup_elem(&weir_conn_dst, &cookie);
	if (!dst)
		return;
	struct addr4 key = { .ip4 = skops->local_ip4, .port = skops->local_port };
	struct addr4 value = *dst;
	if (bpf_map_update_elem(&weir_orig_dst, &key, &value, BPF_ANY) != 0) {
		count(CAPTURE_FAILED, 1);
		return;
	}
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

SEC("sockops")
int weir_sockops(struct bpf_sock_ops *skops)
{
	int proxy = 0;
	__u32 family = skops->family;
	if (family != AF_INET && family != AF_INET6)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
		__u64 cookie = bpf_get_socket_cookie(skops);
		if (family == AF_INET)
			file_original_destination(skops, cookie);
		if (bpf_map_lookup_elem(&weir_proxy_conns, &cookie)) {
			bpf_map_delete_elem(&weir_proxy_conns, &cookie);
			proxy = 1;
		}
		break;
	}
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		break;
	case BPF_SOCK_OPS_STATE_CB:
		// Only captured (IPv4) sockets asked for this: forget their destination once closed.
		if (skops->args[1] == BPF_TCP_CLOSE) {
			struct addr4 key = { .ip4 = skops->local_ip4, .port = skops->local_port };
			bpf_map_delete_elem(&weir_orig_dst, &key);
			__u64 cookie = bpf_get_socket_cookie(skops);
			bpf_map_delete_elem(&weir_conn_dst, &cookie);
		}
		return 1;
	default:
		return 1;
	}
	struct sock_key key = {
		.local_port = skops->local_port,
		.remote_port = bpf_ntohl(skops->remote_port),
	};
	if (family == AF_INET) {
		set_v4(&key.local, skops->local_ip4);
		set_v4(&key.remote, skops->remote_ip4);
		ctx_barrier();
	} else {
		set_v6(&key.local, skops->local_ip6);
		set_v6(&key.remote, skops->remote_ip6);
		ctx_barrier();
	}
	if (!is_local(&key.local) || !is_local(&key.remote))
		return 1;
	if (proxy) {
		// The proxy's connection: its peer's side is accelerated too when it comes up.
		struct sock_key peer = {
			.local = key.remote,
			.remote = key.local,
			.local_port = key.remote_port,
			.remote_port = key.local_port,
		};
		__u8 one = 1;
		bpf_map_update_elem(&weir_expect, &peer, &one, BPF_ANY);
	} else if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB &&
		   bpf_map_lookup_elem(&weir_expect, &key)) {
		bpf_map_delete_elem(&weir_expect, &key);
		proxy = 1;
	}
	if (!proxy && !in_scope(key.local_port, key.remote_port))
		return 1;
	if (bpf_sock_hash_update(skops, &weir_socks, &key, BPF_NOEXIST) == 0)
		count(SOCKETS_INSERTED, 1);
	else
		count(INSERT_FAILED, 1);
	return 1;
}

SEC("sk_msg")
int weir_msg(struct sk_msg_md *msg)
{
	struct sock_key peer = {
		.local_port = bpf_ntohl(msg->remote_port),
		.remote_port = msg->local_port,
	};
	if (msg->family == AF_INET) {
		set_v4(&peer.local, msg->remote_ip4);
		set_v4(&peer.remote, msg->local_ip4);
		ctx_barrier();
	} else {
		set_v6(&peer.local, msg->remote_ip6);
		set_v6(&peer.remote, msg->local_ip6);
		ctx_barrier();
	}
	__u64 size = msg->size;
	if (bpf_msg_redirect_hash(msg, &weir_socks, &peer, BPF_F_INGRESS) == SK_PASS) {
		count(MSGS_REDIRECTED, 1);
		count(BYTES_REDIRECTED, size);
		return SK_PASS;
	}
	count(MSGS_MISSED, 1);
	return SK_PASS;
}

char _license[] SEC("license") = "GPL";
