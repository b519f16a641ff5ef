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

/// KServe v2 / Triton (generated in `weir-control`).
pub use weir_control::kserve;
pub mod wasm_filters;
