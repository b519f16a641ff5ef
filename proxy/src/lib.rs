//! weir's data plane: an L7 proxy on pingora. `weir run` starts [`server::run`].

pub mod access_log;
pub mod admin;
pub mod control;
pub mod downstream;
pub mod drain;
pub mod fast_path;
pub mod filters;
pub mod grpc;
pub mod health;
pub mod inference;
pub mod lb;
pub mod metrics;
pub mod outlier;
pub mod proxy;
pub mod reload;
pub mod reply;
pub mod retry;
pub mod server;
pub mod state;
pub mod telemetry;
