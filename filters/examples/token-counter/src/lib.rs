//! Inference token counter: watches streamed responses without holding them back and counts
//! output tokens: one per SSE `data:` event of an OpenAI-style stream (`[DONE]` excluded), one
//! per gRPC message of a streamed gRPC response. Emits the counters
//! `inference_tokens_out` and `inference_streams`, and marks the response with
//! `x-token-counter: on`.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(Root { tokens: 0, streams: 0 }));
}}

struct Root {
    tokens: u32,
    streams: u32,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        self.tokens = proxy_wasm::hostcalls::define_metric(MetricType::Counter, "inference_tokens_out")
            .unwrap_or(0);
        self.streams = proxy_wasm::hostcalls::define_metric(MetricType::Counter, "inference_streams")
            .unwrap_or(0);
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Counter {
            tokens_metric: self.tokens,
            streams_metric: self.streams,
            kind: Kind::Other,
            pending: Vec::new(),
            seen: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

enum Kind {
    Sse,
    Grpc,
    Other,
}

struct Counter {
    tokens_metric: u32,
    streams_metric: u32,
    kind: Kind,
    /// Bytes of an event or message not complete yet.
    pending: Vec<u8>,
    /// Body bytes already looked at.
    seen: usize,
}

impl Counter {
    /// Counts the complete events or messages in `pending`, keeping the incomplete tail.
    fn count(&mut self) -> u64 {
        let mut n = 0;
        match self.kind {
            Kind::Sse => {
                while let Some(end) = find(&self.pending, b"\n\n") {
                    let event: Vec<u8> = self.pending.drain(..end + 2).collect();
                    for line in event.split(|b| *b == b'\n') {
                        if let Some(data) = line.strip_prefix(b"data:") {
                            if data.trim_ascii() != b"[DONE]" {
                                n += 1;
                            }
                        }
                    }
                }
            }
            Kind::Grpc => {
                while self.pending.len() >= 5 {
                    let len = u32::from_be_bytes([
                        self.pending[1],
                        self.pending[2],
                        self.pending[3],
                        self.pending[4],
                    ]) as usize;
                    if self.pending.len() < 5 + len {
                        break;
                    }
                    self.pending.drain(..5 + len);
                    n += 1;
                }
            }
            Kind::Other => self.pending.clear(),
        }
        n
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Context for Counter {}

impl HttpContext for Counter {
    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let ct = self.get_http_response_header("content-type").unwrap_or_default();
        self.kind = if ct.starts_with("text/event-stream") {
            Kind::Sse
        } else if ct.starts_with("application/grpc") {
            Kind::Grpc
        } else {
            Kind::Other
        };
        if !matches!(self.kind, Kind::Other) {
            self.set_http_response_header("x-token-counter", Some("on"));
            let _ = proxy_wasm::hostcalls::increment_metric(self.streams_metric, 1);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, _eos: bool) -> Action {
        // `size` counts only this chunk once earlier chunks went on (Continue): read it all.
        if let Some(chunk) = self.get_http_response_body(0, size) {
            self.seen += chunk.len();
            self.pending.extend_from_slice(&chunk);
        }
        let n = self.count();
        if n > 0 {
            let _ = proxy_wasm::hostcalls::increment_metric(self.tokens_metric, n as i64);
        }
        Action::Continue
    }
}
