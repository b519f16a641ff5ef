fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // protox compiles the .proto in pure Rust: no system protoc needed.
    let fds = protox::compile(["weir/control/v1/discovery.proto"], ["proto"])?;
    // Resource bodies are shared between every proxy's push: `Bytes` clones without copying.
    tonic_prost_build::configure()
        .bytes(".weir.control.v1.Resource.body")
        .compile_fds(fds)?;
    // KServe v2 / Triton (`inference.GRPCInferenceService`): the proxy polls readiness and
    // warms up replicas with it, `weir-control reload` drives reloads, tests simulate servers.
    let fds = protox::compile(["inference/grpc_service.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
