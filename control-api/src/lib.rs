//! weir's control API: the `weir.control.v1` protocol (xDS semantics on one aggregated stream),
//! the control plane that serves a policy folder, and the client proxies use.

pub mod auth;
pub mod client;
pub mod policy_dir;
pub mod reload;
pub mod resources;
pub mod server;
pub mod xds_v3;

/// Generated from `proto/weir/control/v1/discovery.proto`.
pub mod pb {
    tonic::include_proto!("weir.control.v1");
}

/// KServe v2 / Triton gRPC, generated from `proto/inference/grpc_service.proto` (matches
/// tritonclient's descriptors field for field; see the `kserve_proto` test).
pub mod kserve {
    tonic::include_proto!("inference");
}

/// Turns off transparent huge pages for this process's memory. weir's processes allocate in
/// bursts (a config of 10,000 routes is tens of MB parsed, validated and dropped), and the
/// allocator hands freed memory back to the kernel: with huge pages, each fresh 2 MiB page is
/// zeroed whole when first touched, and the kernel's page zeroing was a fifth of the CPU time
/// of a config change. Measured with `weir-bench xds` (10,000 routes, 1 proxy, 5 interleaved
/// runs each): all routes changed 207-395 ms with, 236-303 ms without. Best effort: a kernel
/// without the setting keeps its default.
pub fn no_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes an integer flag and no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::debug!("PR_SET_THP_DISABLE: {}", std::io::Error::last_os_error());
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (`info` when unset or unreadable): a level, or
/// `target=level` pairs separated by commas (`weir_proxy=debug,info`).
///
/// `Targets`, not `EnvFilter`: EnvFilter's span and field filters pull in `regex-automata` with
/// its full-DFA builder, and Cargo unifies that feature into the `regex` crate that compiles
/// route and RBAC patterns. `regex` then builds a full DFA for every small pattern: 10,000
/// header regexes took 1.04 s to compile instead of 0.30 s, and `weir validate` of a 10,000-route
/// file held 222 MB.
pub fn init_logs() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
        });
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
}

/// The default control plane address (Istio's convention).
pub const DEFAULT_ADDR: &str = "127.0.0.1:15010";
