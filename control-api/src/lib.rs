//! weir's control API: the `weir.control.v1` protocol (xDS semantics on one aggregated stream),
//! the control plane that serves a policy folder, and the client proxies use.

pub mod auth;
pub mod client;
pub mod policy_dir;
pub mod reload;
pub mod resources;
pub mod server;

/// Generated from `proto/weir/control/v1/discovery.proto`.
pub mod pb {
    tonic::include_proto!("weir.control.v1");
}

/// KServe v2 / Triton gRPC, generated from `proto/inference/grpc_service.proto` (matches
/// tritonclient's descriptors field for field; see the `kserve_proto` test).
pub mod kserve {
    tonic::include_proto!("inference");
}

/// The default control plane address (Istio's convention).
pub const DEFAULT_ADDR: &str = "127.0.0.1:15010";
