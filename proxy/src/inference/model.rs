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

/// A hash of the first `n` bytes of an OpenAI request's prompt (`prompt`, or the `messages`'
/// contents in order), for prefix-cache affinity: requests that share a prompt prefix share a
/// hash. `None` when the body has no prompt or `n` is 0.
pub fn prompt_prefix(body: &[u8], n: usize) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    if n == 0 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
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
    if text.is_empty() {
        return None;
    }
    let mut end = n.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text[..end].hash(&mut h);
    Some(h.finish())
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
    fn prompts_sharing_a_prefix_share_a_hash() {
        let chat = |text: &str| {
            serde_json::json!({"model": "m", "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": text}]})
            .to_string()
        };
        let a = prompt_prefix(chat("tell me about rivers and weirs").as_bytes(), 24);
        let b = prompt_prefix(chat("tell me about lakes").as_bytes(), 24);
        let c = prompt_prefix(chat("tell me about lakes").as_bytes(), 64);
        assert!(a.is_some());
        assert_eq!(a, b, "the first 24 bytes are the same");
        assert_ne!(b, c, "64 bytes reach the part that differs");
        let p = |prompt: &str| {
            prompt_prefix(
                serde_json::json!({"prompt": prompt}).to_string().as_bytes(),
                8,
            )
        };
        assert_eq!(p("abcdefgh-1"), p("abcdefgh-2"));
        assert_ne!(p("abcdefgh"), p("xbcdefgh"));
        assert_eq!(prompt_prefix(br#"{"model": "m"}"#, 8), None);
        assert_eq!(prompt_prefix(b"not json", 8), None);
        assert_eq!(prompt_prefix(chat("x").as_bytes(), 0), None);
        // Cutting inside a multi-byte character does not panic.
        assert!(prompt_prefix(
            serde_json::json!({"prompt": "ééé"}).to_string().as_bytes(),
            3
        )
        .is_some());
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
