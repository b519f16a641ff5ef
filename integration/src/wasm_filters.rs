//! The example proxy-wasm filters (filters/examples), built for wasm32-wasip1 by build.rs.

use std::path::PathBuf;

/// Path of the example filter `name` (`header_rewrite`, `authz`, `rate_limit`,
/// `body_transform`, `token_counter`, `probe`).
pub fn path(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("WEIR_WASM_FILTERS")).join(format!("{name}.wasm"));
    assert!(p.is_file(), "example filter {} was not built", p.display());
    p
}

/// Hex sha256 of the example filter `name`.
pub fn sha256(name: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(
        std::fs::read(path(name)).expect("read wasm"),
    ))
}
