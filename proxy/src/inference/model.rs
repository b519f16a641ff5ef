//! Which model a request asks for, read from the request itself: the `model_name` of the first
//! KServe v2 gRPC message (field 1 of `ModelInferRequest` and of the other `Model*` calls'
//! requests), or the `model` field of an OpenAI-style JSON body. Pure functions over the bytes
//! seen so far, so the proxy reads what it must and holds nothing else back. A header
//! (`x-weir-model`) may override both.
//!
//! weir must read the name the server will read, or a request reaches a replica picked for
//! another model than it is served (past that model's queue and limits). So the name is read
//! the way the servers read it (protobuf and Python's `json`: the last of a repeated field
//! wins) from the whole first message or the whole JSON body, and a body weir cannot read whole
//! is refused ([`Unreadable`]), never sent to any replica. The prompt's first bytes are hashed
//! for prefix-cache affinity from the same read.

use std::io::Read;

use prost::Message;

/// The header that names the model and overrides the body.
pub const MODEL_HEADER: &str = "x-weir-model";

/// What the bytes seen so far say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Extract {
    Found(String),
    /// Not decided yet: read more of the body.
    NeedMore,
    /// The request names no model (`ServerReady`, `GET /v1/models`, a body that is not a
    /// JSON object).
    Absent,
    /// A JSON request that names no model (`model` missing, null or empty): vLLM serves it
    /// with its default model.
    Unnamed,
    /// The request may name a model, but weir cannot read it.
    Unreadable(Unreadable),
}

/// Why a request's model cannot be read: the request is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unreadable {
    /// The body (JSON) or its first message (gRPC) is larger than the pool's `max_body`.
    TooLarge,
    /// Compressed with a coding weir does not decode (the coding, as the request names it).
    Encoded(String),
    /// Not what its protocol says it is (the parser's words).
    Malformed(String),
}

/// The part of every KServe v2 `Model*` request that names the model: field 1 (`model_name`
/// of `ModelInferRequest`, `name` of `ModelReadyRequest`, `ModelMetadataRequest`,
/// `ModelConfigRequest`, `ModelStatisticsRequest`).
#[derive(Clone, PartialEq, Message)]
struct Named {
    #[prost(string, tag = "1")]
    name: String,
}

/// Whether a gRPC method of `GRPCInferenceService` names a model in field 1 of its request:
/// the `Model*` calls do; the others (`ServerReady`, `RepositoryModelLoad`, the shared-memory
/// and trace calls) carry other things there, and go to any replica.
pub fn names_a_model(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|m| m.starts_with("Model"))
}

/// `model_name` from the start of a gRPC request body: the first message whole (5-byte frame
/// header, then the message, compressed with `encoding` when its flag says so), at most
/// `max_body` bytes before and after decompression. `complete`: the body has ended.
pub fn from_grpc(body: &[u8], encoding: Option<&str>, max_body: usize, complete: bool) -> Extract {
    match first_message(body, encoding, max_body, complete) {
        Ok(msg) => match Named::decode(&msg[..]) {
            Ok(Named { name }) if name.is_empty() => Extract::Absent,
            Ok(Named { name }) => Extract::Found(name),
            Err(e) => malformed(&e.to_string()),
        },
        Err(found) => found,
    }
}

/// The first gRPC message of `body`, decompressed; `Err` says what to do instead.
fn first_message<'a>(
    body: &'a [u8],
    encoding: Option<&str>,
    max_body: usize,
    complete: bool,
) -> Result<std::borrow::Cow<'a, [u8]>, Extract> {
    if body.len() < 5 {
        return Err(match (complete, body.is_empty()) {
            (false, _) => Extract::NeedMore,
            // A call whose request stream sent no message names nothing.
            (true, true) => Extract::Absent,
            (true, false) => malformed("the request ended inside a gRPC frame header"),
        });
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if len > max_body {
        return Err(Extract::Unreadable(Unreadable::TooLarge));
    }
    let Some(msg) = body.get(5..5 + len) else {
        return Err(if complete {
            malformed("the request ended inside its first gRPC message")
        } else {
            Extract::NeedMore
        });
    };
    match body[0] {
        0 => Ok(msg.into()),
        1 => decompress(msg, encoding, max_body)
            .map(Into::into)
            .map_err(Extract::Unreadable),
        flag => Err(malformed(&format!(
            "gRPC frame flag {flag} (0 or 1 expected)"
        ))),
    }
}

/// A hash of the first `n` bytes of the prompt of the `ModelInferRequest` that starts `body`
/// (read whole by [`from_grpc`]), for prefix-cache affinity. The prompt is the first element
/// of the input `text_input` (the name Triton's TensorRT-LLM and vLLM backends use), else of
/// the first `BYTES` input, from the tensor's contents or its raw bytes (each element a 4-byte
/// little-endian length, then the bytes). `None` for other requests or one without such an
/// input. Tensors are not copied: `body`'s bytes are sliced.
pub fn grpc_prompt_prefix(body: bytes::Bytes, encoding: Option<&str>, n: usize) -> Option<u64> {
    if n == 0 {
        return None;
    }
    let msg = match first_message(&body, encoding, usize::MAX, true).ok()? {
        std::borrow::Cow::Owned(decoded) => bytes::Bytes::from(decoded),
        std::borrow::Cow::Borrowed(m) => body.slice_ref(m),
    };
    let Prompted {
        mut inputs,
        raw_input_contents,
    } = Prompted::decode(msg).ok()?;
    let at = inputs
        .iter()
        .position(|i| i.name == "text_input" && i.datatype == "BYTES")
        .or_else(|| inputs.iter().position(|i| i.datatype == "BYTES"))?;
    // Raw contents, when a request uses them, hold every input in order.
    let prompt = if raw_input_contents.is_empty() {
        inputs
            .swap_remove(at)
            .contents?
            .bytes_contents
            .into_iter()
            .next()?
    } else {
        let raw = raw_input_contents.get(at)?;
        let len = u32::from_le_bytes(raw.get(..4)?.try_into().ok()?) as usize;
        raw.slice(4..4usize.checked_add(len).filter(|&end| end <= raw.len())?)
    };
    hash_prefix(&prompt, n)
}

/// The parts of a `ModelInferRequest` that hold its prompt.
#[derive(Clone, PartialEq, Message)]
struct Prompted {
    #[prost(message, repeated, tag = "5")]
    inputs: Vec<InputTensor>,
    #[prost(bytes = "bytes", repeated, tag = "7")]
    raw_input_contents: Vec<bytes::Bytes>,
}

#[derive(Clone, PartialEq, Message)]
struct InputTensor {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    datatype: String,
    #[prost(message, optional, tag = "5")]
    contents: Option<TensorContents>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorContents {
    #[prost(bytes = "bytes", repeated, tag = "8")]
    bytes_contents: Vec<bytes::Bytes>,
}

/// A hash of the first `n` bytes of `text` (`None` when either is empty).
fn hash_prefix(text: &[u8], n: usize) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    if n == 0 || text.is_empty() {
        return None;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text[..n.min(text.len())].hash(&mut h);
    Some(h.finish())
}

/// A compressed gRPC message, decoded as `grpc-encoding` says (`gzip`, or `deflate`: zlib).
fn decompress(msg: &[u8], encoding: Option<&str>, max_body: usize) -> Result<Vec<u8>, Unreadable> {
    let mut out = Vec::new();
    let limit = (max_body as u64).saturating_add(1);
    let read = match encoding {
        Some("gzip") => flate2::read::GzDecoder::new(msg)
            .take(limit)
            .read_to_end(&mut out),
        Some("deflate") => flate2::read::ZlibDecoder::new(msg)
            .take(limit)
            .read_to_end(&mut out),
        other => {
            return Err(Unreadable::Encoded(
                other
                    .unwrap_or("(a compressed message without grpc-encoding)")
                    .to_string(),
            ))
        }
    };
    match read {
        Ok(_) if out.len() > max_body => Err(Unreadable::TooLarge),
        Ok(_) => Ok(out),
        Err(e) => Err(Unreadable::Malformed(format!(
            "the compressed message: {e}"
        ))),
    }
}

fn malformed(why: &str) -> Extract {
    Extract::Unreadable(Unreadable::Malformed(why.to_string()))
}

/// The `model` field of a whole JSON request body (`/v1/chat/completions`, `/v1/completions`),
/// and a hash of its prompt's first `prefix_bytes` bytes ([`prompt_prefix`]). An empty body or
/// one that is not a JSON object names no model; an object without `model` is
/// [`Extract::Unnamed`]; a body that does not parse is malformed.
pub fn from_json(body: &[u8], prefix_bytes: usize) -> (Extract, Option<u64>) {
    if body.iter().all(u8::is_ascii_whitespace) {
        return (Extract::Absent, None);
    }
    // Into a `Value`, as Python's `json` reads it: of a repeated key, the last one counts.
    let v: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return (malformed(&format!("the body is not JSON: {e}")), None),
    };
    let found = match v.get("model") {
        _ if !v.is_object() => Extract::Absent,
        None | Some(serde_json::Value::Null) => Extract::Unnamed,
        Some(serde_json::Value::String(m)) if m.is_empty() => Extract::Unnamed,
        Some(serde_json::Value::String(m)) => Extract::Found(m.clone()),
        Some(_) => malformed("`model` is not a string"),
    };
    (found, prompt_prefix(&v, prefix_bytes))
}

/// A hash of the first `n` bytes of an OpenAI request's prompt (`prompt`, or the `messages`'
/// contents in order), for prefix-cache affinity: requests that share a prompt prefix share a
/// hash. `None` when the body has no prompt or `n` is 0.
pub fn prompt_prefix(v: &serde_json::Value, n: usize) -> Option<u64> {
    if n == 0 {
        return None;
    }
    let mut text = String::new();
    let mut push = |s: &str| {
        if text.len() < n {
            text.push_str(s);
        }
    };
    match (&v["prompt"], &v["messages"]) {
        (serde_json::Value::String(p), _) => push(p),
        (serde_json::Value::Array(ps), _) => ps.iter().filter_map(|p| p.as_str()).for_each(push),
        (_, serde_json::Value::Array(ms)) => {
            for m in ms {
                push(m["role"].as_str().unwrap_or(""));
                match &m["content"] {
                    serde_json::Value::String(c) => push(c),
                    serde_json::Value::Array(parts) => parts
                        .iter()
                        .filter_map(|p| p["text"].as_str())
                        .for_each(&mut push),
                    _ => {}
                }
            }
        }
        _ => return None,
    }
    hash_prefix(text.as_bytes(), n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const MAX: usize = 4 << 20;

    /// A `ModelInferRequest` with `id` (field 3) before `model_name`, as clients are free to
    /// order fields, and a 1000-byte tensor after it.
    fn message(model: &str) -> Vec<u8> {
        let mut m = Vec::new();
        prost::encoding::string::encode(3, &"req-1".to_string(), &mut m);
        prost::encoding::int64::encode(99, &7, &mut m);
        prost::encoding::string::encode(1, &model.to_string(), &mut m);
        prost::encoding::bytes::encode(7, &vec![0u8; 1000], &mut m);
        m
    }

    /// `m` in a gRPC frame with compression flag `flag`.
    fn framed(flag: u8, m: &[u8]) -> Vec<u8> {
        let mut f = vec![flag];
        f.extend_from_slice(&(m.len() as u32).to_be_bytes());
        f.extend_from_slice(m);
        f
    }

    #[test]
    fn grpc_model_name_is_read_from_the_whole_first_message() {
        let f = framed(0, &message("llama-3-8b"));
        for cut in 0..f.len() {
            assert_eq!(
                from_grpc(&f[..cut], None, MAX, false),
                Extract::NeedMore,
                "cut at {cut}"
            );
        }
        assert_eq!(
            from_grpc(&f, None, MAX, false),
            Extract::Found("llama-3-8b".into())
        );
        // A second message behind the first is not waited for.
        let mut two = f.clone();
        two.extend_from_slice(&framed(0, &message("other"))[..9]);
        assert_eq!(
            from_grpc(&two, None, MAX, false),
            Extract::Found("llama-3-8b".into())
        );
        // A request stream that ends inside its first message is malformed; one with no
        // message at all names nothing.
        for cut in [3, 5, 40] {
            assert!(matches!(
                from_grpc(&f[..cut], None, MAX, true),
                Extract::Unreadable(Unreadable::Malformed(_))
            ));
        }
        assert_eq!(from_grpc(&[], None, MAX, true), Extract::Absent);
    }

    #[test]
    fn a_repeated_grpc_model_name_is_read_as_protobuf_reads_it_the_last_one() {
        // What a client could hand-craft to reach a replica picked for `allowed` with a
        // request the server reads as `other`.
        let mut m = message("allowed");
        prost::encoding::string::encode(1, &"other".to_string(), &mut m);
        assert_eq!(
            from_grpc(&framed(0, &m), None, MAX, false),
            Extract::Found("other".into())
        );
        // A group (an old wire type servers still skip) before the name is skipped too.
        let mut g = Vec::new();
        prost::encoding::encode_key(9, prost::encoding::WireType::StartGroup, &mut g);
        prost::encoding::int32::encode(1, &5, &mut g);
        prost::encoding::encode_key(9, prost::encoding::WireType::EndGroup, &mut g);
        g.extend(message("grouped"));
        assert_eq!(
            from_grpc(&framed(0, &g), None, MAX, false),
            Extract::Found("grouped".into())
        );
    }

    #[test]
    fn compressed_grpc_messages_are_decoded_within_max_body() {
        let m = message("llama");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&m).unwrap();
        let gz = gz.finish().unwrap();
        let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        zl.write_all(&m).unwrap();
        let zl = zl.finish().unwrap();
        assert_eq!(
            from_grpc(&framed(1, &gz), Some("gzip"), MAX, false),
            Extract::Found("llama".into())
        );
        assert_eq!(
            from_grpc(&framed(1, &zl), Some("deflate"), MAX, false),
            Extract::Found("llama".into())
        );
        assert_eq!(
            from_grpc(&framed(1, &gz), Some("snappy"), MAX, false),
            Extract::Unreadable(Unreadable::Encoded("snappy".into()))
        );
        assert!(matches!(
            from_grpc(&framed(1, &gz), None, MAX, false),
            Extract::Unreadable(Unreadable::Encoded(_))
        ));
        assert!(matches!(
            from_grpc(&framed(1, &gz), Some("deflate"), MAX, false),
            Extract::Unreadable(Unreadable::Malformed(_))
        ));
        // A message that inflates past max_body (a few KiB of zeros here) is too large,
        // however small it is compressed.
        assert_eq!(
            from_grpc(&framed(1, &gz), Some("gzip"), 500, false),
            Extract::Unreadable(Unreadable::TooLarge)
        );
    }

    #[test]
    fn a_first_message_over_max_body_is_too_large_from_its_header() {
        let f = framed(0, &message("llama"));
        assert_eq!(
            from_grpc(&f[..5], None, 1000, false),
            Extract::Unreadable(Unreadable::TooLarge)
        );
        assert_eq!(
            from_grpc(&f, None, f.len() - 5, false),
            Extract::Found("llama".into()),
            "exactly max_body is read"
        );
    }

    #[test]
    fn grpc_without_a_name_or_garbage() {
        let mut m = Vec::new();
        prost::encoding::string::encode(3, &"req-1".to_string(), &mut m);
        assert_eq!(from_grpc(&framed(0, &m), None, MAX, false), Extract::Absent);
        for bad in [
            framed(0, &[0xff, 0xff, 0xff]),
            framed(2, &message("m")),
            // Field 1 as a varint, and a name that is not UTF-8.
            framed(0, &[0x08, 0x01]),
            framed(0, &[0x0a, 0x02, 0xc3, 0x28]),
        ] {
            assert!(
                matches!(
                    from_grpc(&bad, None, MAX, false),
                    Extract::Unreadable(Unreadable::Malformed(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn only_model_calls_name_a_model_in_field_one() {
        for m in [
            "ModelInfer",
            "ModelStreamInfer",
            "ModelReady",
            "ModelMetadata",
            "ModelConfig",
            "ModelStatistics",
        ] {
            assert!(names_a_model(&format!(
                "/inference.GRPCInferenceService/{m}"
            )));
        }
        for m in [
            "ServerReady",
            "ServerMetadata",
            "RepositoryModelLoad",
            "CudaSharedMemoryRegister",
            "TraceSetting",
        ] {
            assert!(!names_a_model(&format!(
                "/inference.GRPCInferenceService/{m}"
            )));
        }
    }

    /// A framed `ModelInferRequest` (the generated types of the proto that matches Triton's)
    /// with an `INT32` input and then a `BYTES` input `name` holding `prompt`, in raw contents
    /// (as tritonclient sends them) or in the tensor's `bytes_contents`.
    fn prompted(name: &str, prompt: &str, raw: bool) -> bytes::Bytes {
        use weir_control::kserve::model_infer_request::InferInputTensor;
        use weir_control::kserve::{InferTensorContents, ModelInferRequest};
        let input = |name: &str, datatype: &str, contents| InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: vec![1],
            contents: (!raw).then_some(contents),
            ..Default::default()
        };
        let r = ModelInferRequest {
            model_name: "llama".into(),
            inputs: vec![
                input("max_tokens", "INT32", InferTensorContents::default()),
                input(
                    name,
                    "BYTES",
                    InferTensorContents {
                        bytes_contents: vec![prompt.into(), b"second element".to_vec()],
                        ..Default::default()
                    },
                ),
            ],
            raw_input_contents: if raw {
                let mut element = (prompt.len() as u32).to_le_bytes().to_vec();
                element.extend_from_slice(prompt.as_bytes());
                vec![16i32.to_le_bytes().to_vec(), element]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        framed(0, &r.encode_to_vec()).into()
    }

    #[test]
    fn a_grpc_prompt_is_hashed_from_its_bytes_input() {
        let hash = |name, prompt, raw| grpc_prompt_prefix(prompted(name, prompt, raw), None, 16);
        let a = hash("PROMPT", "You are a careful assistant. Summarise:", true);
        assert!(a.is_some());
        assert_eq!(
            a,
            hash("PROMPT", "You are a careful assistant. Translate:", true),
            "the first 16 bytes are the same"
        );
        assert_ne!(a, hash("PROMPT", "You are terse. Summarise:", true));
        // From the tensor's contents too, the same prompt hashing the same.
        assert_eq!(
            a,
            hash("PROMPT", "You are a careful assistant. Summarise:", false)
        );
        assert_eq!(
            a,
            hash(
                "text_input",
                "You are a careful assistant. Summarise:",
                true
            )
        );
        // Compressed.
        let framed_gz = {
            let plain = prompted("PROMPT", "You are a careful assistant. Summarise:", true);
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&plain[5..]).unwrap();
            bytes::Bytes::from(framed(1, &gz.finish().unwrap()))
        };
        assert_eq!(a, grpc_prompt_prefix(framed_gz, Some("gzip"), 16));
        // No prompt: no BYTES input, no bytes in it, a raw length past its end, n = 0.
        assert_eq!(
            grpc_prompt_prefix(framed(0, &message("llama")).into(), None, 16),
            None
        );
        assert_eq!(hash("PROMPT", "", false), None);
        let mut cut = prompted("PROMPT", "abc", true).to_vec();
        let at = cut.windows(3).position(|w| w == b"abc").unwrap();
        cut[at - 4] = 200;
        assert_eq!(grpc_prompt_prefix(cut.into(), None, 16), None);
        assert_eq!(
            grpc_prompt_prefix(prompted("PROMPT", "abc", true), None, 0),
            None
        );
    }

    #[test]
    fn text_input_is_the_prompt_when_there_is_one() {
        use weir_control::kserve::model_infer_request::InferInputTensor;
        use weir_control::kserve::{InferTensorContents, ModelInferRequest};
        let bytes_input = |name: &str, text: &str| InferInputTensor {
            name: name.into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            contents: Some(InferTensorContents {
                bytes_contents: vec![text.into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = ModelInferRequest {
            model_name: "llama".into(),
            inputs: vec![
                bytes_input("stop_words", "END"),
                bytes_input("text_input", "the prompt"),
            ],
            ..Default::default()
        };
        let framed_r = bytes::Bytes::from(framed(0, &r.encode_to_vec()));
        assert_eq!(
            grpc_prompt_prefix(framed_r, None, 64),
            hash_prefix(b"the prompt", 64)
        );
    }

    #[test]
    fn prompts_sharing_a_prefix_share_a_hash() {
        let chat = |text: &str| {
            serde_json::json!({"model": "m", "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": text}]})
        };
        let a = prompt_prefix(&chat("tell me about rivers and weirs"), 24);
        let b = prompt_prefix(&chat("tell me about lakes"), 24);
        let c = prompt_prefix(&chat("tell me about lakes"), 64);
        assert!(a.is_some());
        assert_eq!(a, b, "the first 24 bytes are the same");
        assert_ne!(b, c, "64 bytes reach the part that differs");
        let p = |prompt: &str| prompt_prefix(&serde_json::json!({"prompt": prompt}), 8);
        assert_eq!(p("abcdefgh-1"), p("abcdefgh-2"));
        assert_ne!(p("abcdefgh"), p("xbcdefgh"));
        assert_eq!(prompt_prefix(&serde_json::json!({"model": "m"}), 8), None);
        assert_eq!(prompt_prefix(&chat("x"), 0), None);
        // Cutting inside a multi-byte character does not panic.
        assert!(p("ééééé").is_some());
        // The same through from_json.
        let body = chat("tell me about lakes").to_string();
        assert_eq!(from_json(body.as_bytes(), 24).1, b);
    }

    #[test]
    fn json_model_is_read_as_python_reads_it() {
        let found = |body: &str| from_json(body.as_bytes(), 0).0;
        assert_eq!(
            found(r#"{"messages": [{"role": "user", "content": "hi"}], "model": "mistral-7b"}"#),
            Extract::Found("mistral-7b".into())
        );
        // Of a repeated key the last counts, in Python's json and in serde_json's Value.
        assert_eq!(
            found(r#"{"model": "allowed", "prompt": "x", "model": "other"}"#),
            Extract::Found("other".into())
        );
        for none in ["", " \r\n", "[1, 2]", "\"llama\""] {
            assert_eq!(found(none), Extract::Absent, "{none:?}");
        }
        for unnamed in [
            r#"{"prompt": "x"}"#,
            r#"{"model": null}"#,
            r#"{"model": ""}"#,
        ] {
            assert_eq!(found(unnamed), Extract::Unnamed, "{unnamed:?}");
        }
        // What weir cannot parse it does not send on: a server that parses more (Python
        // takes NaN and lone surrogates) would read a model weir did not.
        for bad in [
            "not json",
            r#"{"model": "m", "temperature": NaN}"#,
            r#"{"model": "m""#,
            r#"{"model": "m"} trailing"#,
            r#"{"model": 7}"#,
            r#"{"model": "\ud800"}"#,
        ] {
            assert!(
                matches!(found(bad), Extract::Unreadable(Unreadable::Malformed(_))),
                "{bad}: {:?}",
                found(bad)
            );
        }
    }
}
