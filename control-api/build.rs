fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // protox compiles the .proto in pure Rust: no system protoc needed.
    let fds = protox::compile(["weir/control/v1/discovery.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
