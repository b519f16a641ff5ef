//! weir's config and policy model.
//!
//! YAML written by hand is parsed ([`load_str`]) into the raw [`model`], validated and compiled
//! into an immutable [`Snapshot`]. Decisions over a snapshot (which route) are pure functions in
//! [`routing`]. No I/O and no async here: the proxy and the control plane bring their own.

pub mod duration;
pub mod error;
pub mod load;
pub mod model;
mod position;
pub mod routing;
pub mod snapshot;
mod split;
pub mod validate;

pub use error::{ConfigError, ConfigErrors};
pub use load::{
    load_many, load_many_with, load_str, parse, parse_cached, FileSpan, EMBEDDED_DEFAULT,
};
pub use snapshot::Snapshot;
pub use split::ItemCache;

/// Threads worth using for one large config (parse, compile, decode): one per CPU this process
/// may run on, at most 8.
pub fn config_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}
