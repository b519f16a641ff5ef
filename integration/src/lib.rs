//! Test support for weir's end-to-end tests and benchmarks: real backends (HTTP/1.1 + h2c,
//! gRPC with all four RPC kinds and health), and a harness that runs the real `weir` binary.

pub mod envoy;
pub mod grpc_backend;
pub mod http_backend;
pub mod inference_client;
pub mod model_server;
pub mod otlp_receiver;
pub mod sockmap_env;
pub mod weir_process;

/// Generated from `proto/echo.proto`.
pub mod pb {
    tonic::include_proto!("weir.test");
}

/// Connections accepted from `listener`, for a tonic server, with Nagle's algorithm off as
/// tonic's own `serve` sets it. `serve_with_incoming` over a bare listener leaves it on, and a
/// large message's last segment then waits for the peer's delayed ACK: a 2 MB xDS push took
/// 40-46 ms instead of 3 ms to arrive in `weir-bench xds`.
pub fn grpc_incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// KServe v2 / Triton (generated in `weir-control`).
pub use weir_control::kserve;
pub mod wasm_filters;
