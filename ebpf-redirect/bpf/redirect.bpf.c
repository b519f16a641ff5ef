// SPDX-License-Identifier: GPL-2.0 OR MIT
// weir's sockmap fast path. `weir_sockops` puts established TCP sockets between two local
// endpoints (loopback, or addresses in `weir_addrs`) into `weir_socks` when one end's port is
// in `weir_ports` (the proxy's listener and upstream ports; both maps written by the proxy). `weir_msg` then hands every message sent on such a
// socket straight to its peer's receive queue, skipping the loopback TCP stack. A peer not in
// the map (the other end is not local, or was never inserted) is a miss: the message goes the
// ordinary way (SK_PASS), never dropped.
//
// Facts this relies on (measured on Linux 6.x): remote_port in bpf_sock_ops and sk_msg_md is
// the network-order port in the upper 16 bits; local_port is host order. Live sockets are never
// deleted from the map by weir (the kernel removes a socket when it closes).

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef AF_INET
#define AF_INET 2
#endif

// One socket, seen from its own side. The peer's key swaps local and remote.
struct sock_key {
	__u32 local_ip4;   // network order
	__u32 remote_ip4;  // network order
	__u32 local_port;  // host order
	__u32 remote_port; // host order
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u32);
} weir_socks SEC(".maps");

// Local IPv4 addresses besides 127.0.0.0/8 (network order) -> 1: the node's own addresses,
// where a node proxy and the pods on the node meet.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} weir_addrs SEC(".maps");

// Ports whose connections are accelerated (host order) -> 1.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} weir_ports SEC(".maps");

enum counter {
	SOCKETS_INSERTED = 0,
	INSERT_FAILED = 1,
	MSGS_REDIRECTED = 2,
	MSGS_MISSED = 3,
	BYTES_REDIRECTED = 4,
	COUNTERS = 5,
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

static __always_inline int is_local(__u32 ip4)
{
	// 127.0.0.0/8, in network order the first byte is the low byte.
	return (ip4 & 0xff) == 127 || bpf_map_lookup_elem(&weir_addrs, &ip4);
}

static __always_inline int in_scope(__u32 local_port, __u32 remote_port)
{
	return bpf_map_lookup_elem(&weir_ports, &local_port) ||
	       bpf_map_lookup_elem(&weir_ports, &remote_port);
}

SEC("sockops")
int weir_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		break;
	default:
		return 1;
	}
	if (skops->family != AF_INET)
		return 1;
	struct sock_key key = {
		.local_ip4 = skops->local_ip4,
		.remote_ip4 = skops->remote_ip4,
		.local_port = skops->local_port,
		.remote_port = bpf_ntohl(skops->remote_port),
	};
	if (!is_local(key.local_ip4) || !is_local(key.remote_ip4))
		return 1;
	if (!in_scope(key.local_port, key.remote_port))
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
		.local_ip4 = msg->remote_ip4,
		.remote_ip4 = msg->local_ip4,
		.local_port = bpf_ntohl(msg->remote_port),
		.remote_port = msg->local_port,
	};
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
