//! Which model a request asks for, read from the request itself: the `model_name` of the first
//! KServe v2 gRPC message (field 1 of `ModelInferRequest`), or the `model` field of an
//! OpenAI-style JSON body. Pure functions over the bytes seen so far, so the proxy can read just
//! enough of a stream and hold nothing else back. A header (`x-weir-model`) may override both.

use prost::encoding::{decode_key, decode_varint, WireType};

/// The header that names the model and overrides the body.
pub const MODEL_HEADER: &str = "x-weir-model";

/// What the bytes seen so far say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Extract {
    Found(String),
    /// Not decided yet: read more of the body.
    NeedMore,
    /// The request names no model (or cannot: compressed, not JSON...).
    Absent,
}

/// `model_name` from the start of a gRPC request body (5-byte frame header, then a
/// `ModelInferRequest`). Reads only up to the field; a compressed first message is `Absent`.
pub fn from_grpc(body: &[u8]) -> Extract {
    if body.len() < 5 {
        return Extract::NeedMore;
    }
    if body[0] != 0 {
        return Extract::Absent;
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let complete = body.len() >= 5 + len;
    let mut msg = &body[5..body.len().min(5 + len)];
    let more = || {
        if complete {
            Extract::Absent
        } else {
            Extract::NeedMore
        }
    };
    while !msg.is_empty() {
        let Ok((tag, wire)) = decode_key(&mut msg) else {
            return more();
        };
        match wire {
            WireType::LengthDelimited => {
                let Ok(n) = decode_varint(&mut msg) else {
                    return more();
                };
                let n = n as usize;
                if msg.len() < n {
                    return more();
                }
                if tag == 1 {
                    return match std::str::from_utf8(&msg[..n]) {
                        Ok(name) if !name.is_empty() => Extract::Found(name.to_string()),
                        _ => Extract::Absent,
                    };
                }
                msg = &msg[n..];
            }
            WireType::Varint => {
                if decode_varint(&mut msg).is_err() {
                    return more();
                }
            }
            WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                let n = if wire == WireType::SixtyFourBit { 8 } else { 4 };
                if msg.len() < n {
                    return more();
                }
                msg = &msg[n..];
            }
            WireType::StartGroup | WireType::EndGroup => return Extract::Absent,
        }
    }
    more()
}

/// The `model` field of a JSON request body (`/v1/chat/completions`, `/v1/completions`).
/// `complete` says whether `body` is the whole body.
pub fn from_json(body: &[u8], complete: bool) -> Extract {
    #[derive(serde::Deserialize)]
    struct Model {
        model: Option<String>,
    }
    match serde_json::from_slice::<Model>(body) {
        Ok(Model { model: Some(m) }) if !m.is_empty() => Extract::Found(m),
        Ok(_) => Extract::Absent,
        Err(e) if e.is_eof() && !complete => Extract::NeedMore,
        Err(_) => Extract::Absent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gRPC frame of a `ModelInferRequest` with `id` (field 3) before `model_name`, as
    /// clients are free to order fields.
    fn frame(model: &str) -> Vec<u8> {
        let mut m = Vec::new();
        prost::encoding::string::encode(3, &"req-1".to_string(), &mut m);
        prost::encoding::int64::encode(99, &7, &mut m);
        prost::encoding::string::encode(1, &model.to_string(), &mut m);
        prost::encoding::bytes::encode(7, &vec![0u8; 1000], &mut m);
        let mut f = vec![0];
        f.extend_from_slice(&(m.len() as u32).to_be_bytes());
        f.extend(m);
        f
    }

    #[test]
    fn grpc_model_name_is_read_from_the_first_bytes_only() {
        let f = frame("llama-3-8b");
        // Enough bytes for the name: found without the 1000-byte tensor behind it.
        let upto = f.windows(10).position(|w| w == b"llama-3-8b").unwrap() + 10;
        assert_eq!(from_grpc(&f[..upto]), Extract::Found("llama-3-8b".into()));
        for cut in 0..upto {
            assert_eq!(from_grpc(&f[..cut]), Extract::NeedMore, "cut at {cut}");
        }
        assert_eq!(from_grpc(&f), Extract::Found("llama-3-8b".into()));
    }

    #[test]
    fn grpc_without_a_name_compressed_or_garbage_is_absent() {
        let mut m = Vec::new();
        prost::encoding::string::encode(3, &"req-1".to_string(), &mut m);
        let mut f = vec![0];
        f.extend_from_slice(&(m.len() as u32).to_be_bytes());
        f.extend(m);
        assert_eq!(from_grpc(&f), Extract::Absent);
        let mut compressed = frame("m");
        compressed[0] = 1;
        assert_eq!(from_grpc(&compressed), Extract::Absent);
        assert_eq!(
            from_grpc(&[0, 0, 0, 0, 3, 0xff, 0xff, 0xff]),
            Extract::Absent
        );
    }

    #[test]
    fn json_model_waits_for_enough_of_the_body() {
        let body = br#"{"messages": [{"role": "user", "content": "hi"}], "model": "mistral-7b", "stream": true}"#;
        assert_eq!(from_json(body, true), Extract::Found("mistral-7b".into()));
        assert_eq!(from_json(&body[..20], false), Extract::NeedMore);
        assert_eq!(
            from_json(&body[..20], true),
            Extract::Absent,
            "truncated body"
        );
        assert_eq!(from_json(br#"{"prompt": "x"}"#, true), Extract::Absent);
        assert_eq!(from_json(b"not json", true), Extract::Absent);
    }
}
