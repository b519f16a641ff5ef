//! weir's KServe v2 / Triton proto (control-api/proto/inference/grpc_service.proto) against the real
//! one: the descriptors the tritonclient wheel ships. Every message, field (name, number,
//! type, repeated, oneof) and method weir declares must be identical.

use std::path::PathBuf;
use std::process::Command;

use weir_integration::envoy::{missing_prerequisite, venv};

fn reference() -> Result<serde_json::Value, String> {
    let python = venv().join("bin/python");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kserve_descriptors.py");
    let out = Command::new(&python)
        .arg(&script)
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "tritonclient[grpc] is not installed in {} (.ci/install-deps installs it): {}",
            venv().display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

#[test]
fn kserve_proto_matches_tritonclient() {
    let reference = match reference() {
        Ok(r) => r,
        Err(e) => return missing_prerequisite("tritonclient descriptors", &e),
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../control-api/proto");
    let set =
        protox::compile(["inference/grpc_service.proto"], [&root]).expect("our proto compiles");
    let file = set
        .file
        .iter()
        .find(|f| f.name() == "inference/grpc_service.proto")
        .expect("our file");
    let mut checked = 0;
    let mut stack: Vec<(String, &prost_types::DescriptorProto)> = file
        .message_type
        .iter()
        .map(|m| (format!(".inference.{}", m.name()), m))
        .collect();
    while let Some((name, m)) = stack.pop() {
        for n in &m.nested_type {
            stack.push((format!("{name}.{}", n.name()), n));
        }
        let Some(want) = reference["messages"][&name].as_array() else {
            panic!("{name} is not in tritonclient's proto");
        };
        let ours: Vec<serde_json::Value> = m
            .field
            .iter()
            .map(|f| {
                serde_json::json!({
                    "name": f.name(),
                    "number": f.number(),
                    "type": f.r#type() as i32,
                    "repeated": f.label() == prost_types::field_descriptor_proto::Label::Repeated,
                    "type_name": f.type_name(),
                    "oneof": f.oneof_index.map_or(String::new(), |i| m.oneof_decl[i as usize].name().to_string()),
                })
            })
            .collect();
        assert_eq!(&ours, want, "{name}: fields differ from tritonclient's");
        checked += 1;
    }
    let service = file
        .service
        .iter()
        .find(|s| s.name() == "GRPCInferenceService")
        .expect("service");
    for m in &service.method {
        let want = &reference["methods"][m.name()];
        let ours = serde_json::json!([
            m.input_type(),
            m.output_type(),
            m.client_streaming(),
            m.server_streaming()
        ]);
        assert_eq!(&ours, want, "method {}", m.name());
    }
    assert!(checked >= 20, "only {checked} messages checked");
    assert!(service
        .method
        .iter()
        .any(|m| m.name() == "ModelStreamInfer" && m.client_streaming() && m.server_streaming()));
}
