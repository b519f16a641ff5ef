//! Token usage reported by OpenAI-compatible servers, read from the response as it streams by:
//! the `usage` object of a JSON reply, or of an SSE event (OpenAI sends it in the last event
//! when asked with `stream_options.include_usage`; vLLM's `continuous_usage_stats` in every
//! one, cumulative). The server tokenized the prompt, so its count is the one to trust.
//!
//! Nothing is buffered: each chunk is searched for `"usage"` and only the object that follows
//! is kept across a chunk boundary (at most [`MAX_OBJECT`] bytes).

use memchr::memmem;
use serde::Deserialize;

const NEEDLE: &[u8] = b"\"usage\"";
/// A usage object longer than this is not one (and is skipped).
const MAX_OBJECT: usize = 4096;

/// Prompt (input) and completion (output) tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
}

#[derive(Deserialize)]
struct Raw {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    /// The Responses API's names.
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

/// Follows one response body; [`UsageScanner::last`] is the newest usage object seen (the
/// counts are cumulative, so the last one is the total).
#[derive(Debug, Default)]
pub struct UsageScanner {
    /// The body's last bytes, which may begin the needle (fewer than its length).
    tail: [u8; NEEDLE.len() - 1],
    tail_len: usize,
    /// Everything from a needle whose object has not ended yet.
    pending: Vec<u8>,
    pub last: Option<Usage>,
}

/// What follows a `"usage"` key.
enum Object {
    /// The object's bytes (from `{` to its `}`).
    Complete(std::ops::Range<usize>),
    /// `null`, a number, or `"usage"` that is not a key: nothing to read.
    Other,
    /// The chunk ended first.
    Incomplete,
}

/// Finds the object after the needle ending at `at`.
fn object_after(buf: &[u8], at: usize) -> Object {
    let mut i = at;
    let skip_ws = |i: &mut usize| {
        while *i < buf.len() && buf[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    skip_ws(&mut i);
    match buf.get(i) {
        None => return Object::Incomplete,
        Some(b':') => i += 1,
        Some(_) => return Object::Other,
    }
    skip_ws(&mut i);
    match buf.get(i) {
        None => return Object::Incomplete,
        Some(b'{') => {}
        Some(_) => return Object::Other,
    }
    let start = i;
    let (mut depth, mut in_string, mut escaped) = (0u32, false, false);
    for (j, &c) in buf.iter().enumerate().skip(start) {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Object::Complete(start..j + 1);
                }
            }
            _ => {}
        }
    }
    Object::Incomplete
}

impl UsageScanner {
    /// Reads the next chunk of the response body. A chunk is searched where it lies; bytes
    /// are copied only when a needle or its object straddles two chunks.
    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.pending.is_empty() {
            let mut buf = std::mem::take(&mut self.pending);
            buf.extend_from_slice(chunk);
            self.scan_then_keep_tail(&buf);
            return;
        }
        // A needle that begins in the last chunk's tail and ends in this one.
        let old = self.tail_len;
        if old > 0 {
            let head = chunk.len().min(NEEDLE.len() - 1);
            let mut window = [0u8; 2 * (NEEDLE.len() - 1)];
            window[..old].copy_from_slice(&self.tail[..old]);
            window[old..old + head].copy_from_slice(&chunk[..head]);
            if let Some(at) = memmem::find(&window[..old + head], NEEDLE).filter(|&at| at < old) {
                let mut buf = Vec::with_capacity(old - at + chunk.len());
                buf.extend_from_slice(&self.tail[at..old]);
                buf.extend_from_slice(chunk);
                self.scan_then_keep_tail(&buf);
                return;
            }
        }
        self.scan(chunk);
        if self.pending.is_empty() {
            // The new tail: the last bytes of the old tail and this chunk together.
            let mut joined = [0u8; 2 * (NEEDLE.len() - 1)];
            let take = chunk.len().min(NEEDLE.len() - 1);
            joined[..old].copy_from_slice(&self.tail[..old]);
            joined[old..old + take].copy_from_slice(&chunk[chunk.len() - take..]);
            self.keep_tail(&joined[..old + take]);
        }
    }

    fn scan_then_keep_tail(&mut self, buf: &[u8]) {
        self.scan(buf);
        if self.pending.is_empty() {
            self.keep_tail(buf);
        }
    }

    fn keep_tail(&mut self, buf: &[u8]) {
        let keep = buf.len().min(NEEDLE.len() - 1);
        self.tail[..keep].copy_from_slice(&buf[buf.len() - keep..]);
        self.tail_len = keep;
    }

    /// Reads every usage object in `buf`; one cut off at its end is kept in `pending`.
    fn scan(&mut self, buf: &[u8]) {
        let finder = memmem::Finder::new(NEEDLE);
        let mut from = 0;
        while let Some(found) = finder.find(&buf[from..]) {
            let key = from + found;
            match object_after(buf, key + NEEDLE.len()) {
                Object::Complete(range) => {
                    if let Ok(raw) = serde_json::from_slice::<Raw>(&buf[range.clone()]) {
                        if let Some(input) = raw.prompt_tokens.or(raw.input_tokens) {
                            self.last = Some(Usage {
                                input,
                                output: raw.completion_tokens.or(raw.output_tokens).unwrap_or(0),
                            });
                        }
                    }
                    from = range.end;
                }
                Object::Other => from = key + NEEDLE.len(),
                Object::Incomplete => {
                    if buf.len() - key <= MAX_OBJECT {
                        self.pending = buf[key..].to_vec();
                    }
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> Option<Usage> {
        let mut s = UsageScanner::default();
        for c in chunks {
            s.feed(c);
        }
        s.last
    }

    #[test]
    fn json_reply_and_sse_final_event_give_their_usage() {
        let json = br#"{"id":"x","choices":[{"text":"hi"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":0}}}"#;
        assert_eq!(
            scan(&[json]),
            Some(Usage {
                input: 12,
                output: 3
            })
        );
        let sse: &[&[u8]] = &[
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
        ];
        assert_eq!(
            scan(sse),
            Some(Usage {
                input: 7,
                output: 2
            })
        );
        assert_eq!(
            scan(&[br#"{"usage":{"input_tokens":4,"output_tokens":9}}"#]),
            Some(Usage {
                input: 4,
                output: 9
            }),
            "the Responses API's names"
        );
    }

    #[test]
    fn cumulative_usage_in_every_event_keeps_the_last() {
        let events: Vec<Vec<u8>> = (1..=5)
            .map(|i| {
                format!("data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":10,\"completion_tokens\":{i}}}}}\n\n")
                    .into_bytes()
            })
            .collect();
        let chunks: Vec<&[u8]> = events.iter().map(|e| e.as_slice()).collect();
        assert_eq!(
            scan(&chunks),
            Some(Usage {
                input: 10,
                output: 5
            })
        );
    }

    #[test]
    fn an_object_split_anywhere_across_chunks_is_still_read() {
        let body = br#"data: {"choices":[],"usage":{"prompt_tokens":31,"completion_tokens":8}}"#;
        for cut in 1..body.len() {
            for cut2 in cut..body.len() {
                let got = scan(&[&body[..cut], &body[cut..cut2], &body[cut2..]]);
                assert_eq!(
                    got,
                    Some(Usage {
                        input: 31,
                        output: 8
                    }),
                    "cut at {cut}, {cut2}"
                );
            }
        }
    }

    #[test]
    fn a_body_fed_one_byte_at_a_time_is_still_read() {
        let body = b"data: {\"choices\":[],\"usage\":null}\n\ndata: {\"usage\": {\"prompt_tokens\": 6, \"completion_tokens\": 5}}\n\n";
        let chunks: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(
            scan(&chunks),
            Some(Usage {
                input: 6,
                output: 5
            })
        );
        for size in 2..12 {
            let chunks: Vec<&[u8]> = body.chunks(size).collect();
            assert_eq!(
                scan(&chunks),
                Some(Usage {
                    input: 6,
                    output: 5
                }),
                "{size}"
            );
        }
    }

    #[test]
    fn text_that_mentions_usage_and_garbage_give_nothing() {
        assert_eq!(
            scan(&[br#"{"text":"the \"usage\": {\"prompt_tokens\": 5} field"}"#]),
            None,
            "an escaped quote inside a string is not a key"
        );
        assert_eq!(scan(&[b"\"usage\": {\"prompt_tokens\": \"many\"}"]), None);
        assert_eq!(scan(&[b"\"usage\": 5, \"usage\"", b": {"]), None);
        let mut s = UsageScanner::default();
        s.feed(b"\"usage\": {");
        for _ in 0..100 {
            s.feed(&[b' '; 100]);
        }
        assert!(
            s.pending.len() <= MAX_OBJECT,
            "an endless object is dropped, not kept"
        );
        s.feed(br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#);
        assert_eq!(
            s.last,
            Some(Usage {
                input: 1,
                output: 1
            })
        );
    }
}
