use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    // protox compiles the .proto in pure Rust: no system protoc needed.
    let fds = protox::compile(["proto/echo.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    build_example_filters()
}

/// Builds the proxy-wasm example filters (filters/examples, the Envoy SDK) for wasm32-wasip1
/// and tells the tests and the benchmark where the `.wasm` files are (WEIR_WASM_FILTERS).
fn build_example_filters() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("..");
    let examples = root.join("filters/examples");
    for entry in ["Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", examples.join(entry).display());
    }
    for dir in std::fs::read_dir(&examples)? {
        let dir = dir?.path();
        if dir.join("src").is_dir() {
            println!("cargo:rerun-if-changed={}", dir.join("src").display());
            println!(
                "cargo:rerun-if-changed={}",
                dir.join("Cargo.toml").display()
            );
        }
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("wasm-filters");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip1",
        ])
        .arg("--manifest-path")
        .arg(examples.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // The outer build's flags are for the host, not for wasm.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .status()?;
    if !status.success() {
        return Err(format!(
            "building the example filters failed ({status}); is the wasm32-wasip1 target installed? \
             (`rustup target add wasm32-wasip1`, done by .ci/install-deps)"
        )
        .into());
    }
    let out = target_dir.join("wasm32-wasip1/release");
    println!("cargo:rustc-env=WEIR_WASM_FILTERS={}", out.display());
    Ok(())
}
