//! OpenTelemetry traces: a server span per request and a client span per upstream attempt
//! (retries show as siblings), W3C `traceparent`/`tracestate` taken from the request or
//! started here, and sent upstream with the attempt's span as parent. Finished spans go
//! through a bounded queue to a background exporter (OTLP over gRPC); a full queue drops
//! spans and counts them, and the request path never waits for export.
//!
//! The API's sampler, id generator and propagator decide and carry the context; a finished
//! span is written as OTLP protobuf, field by field ([`Attrs`] encodes attributes as they are
//! added), on the worker thread that finished it, into batches of protobuf bytes that the
//! exporter frames as an OTLP export request.
//! Only those batches cross threads: handing the exporter the span messages themselves (a
//! few dozen small allocations each) made every worker free memory on another thread, and
//! the allocator then fed the workers fresh pages (a page fault every few requests), which
//! cost more CPU than the spans.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceState,
};
use opentelemetry_proto::tonic::trace::v1::{span, status, SpanFlags};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample,
};
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prost::bytes::BufMut;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use weir_policies::model::Tracing as Config;

/// Spans exported in one OTLP request at most. Each export wakes the exporter, the collector
/// and the HTTP/2 flow control between them, and on a busy machine those wake-ups preempt the
/// proxy's workers: with 512 the worker was preempted 9x as often as without tracing. 2,048
/// spans of a few hundred bytes stay far below a collector's usual 4 MiB message limit.
const BATCH: usize = 2048;
/// Longest a finished span waits before it is exported. The exporter sleeps in between
/// (rather than waiting on the queue) so a request never wakes another thread; it is woken
/// early only when the queue is half full.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Encoded spans waiting for export: each batch is at most [`BATCH`] spans, each span one
/// `ScopeSpans.spans` field (number 2) as protobuf bytes.
#[derive(Default)]
struct Queue {
    batches: VecDeque<Batch>,
    /// Spans in all batches.
    spans: usize,
    /// Buffers of exported batches, for the next ones: a batch that started empty would
    /// grow into fresh memory (page faults) every time.
    free: Vec<Vec<u8>>,
}

#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    spans: usize,
}

/// `ScopeSpans.spans`.
const SPANS_FIELD: u32 = 2;

thread_local! {
    /// [`Attrs::display`]'s text.
    static FORMATTED: RefCell<String> = const { RefCell::new(String::new()) };
    /// The last two addresses [`Attrs::ip`] wrote, as text: a request's client and its
    /// endpoint are nearly always those of the request before.
    static IPS: RefCell<[(Option<std::net::IpAddr>, String); 2]> =
        const { RefCell::new([(None, String::new()), (None, String::new())]) };
    /// Traces of ended requests, their buffers emptied but kept, for the thread's next
    /// [`Tracer::start`] (at most [`SPARE_TRACES`]): the trace's box and its three buffers
    /// were four allocations and frees per request. Boxed as requests hold them (their
    /// context keeps a box, see `RequestCtx::trace`).
    #[allow(clippy::vec_box)]
    static SPARE: RefCell<Vec<Box<RequestTrace>>> = const { RefCell::new(Vec::new()) };
    /// The last two `http://{peer}` origins [`Attrs::url`] wrote.
    static ORIGINS: RefCell<[(Option<std::net::SocketAddr>, String); 2]> =
        const { RefCell::new([(None, String::new()), (None, String::new())]) };
}

/// Looked up and set on every request: a `&str` name is parsed (and, set, copied) per use.
static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
static TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// The tracer shared by every listener.
pub struct Tracer {
    queue: Mutex<Queue>,
    /// Wakes the exporter before its time when the queue is half full.
    half_full: tokio::sync::Notify,
    capacity: usize,
    /// Follows the parent's decision, else `root_sampler`'s.
    sampler: Sampler,
    /// The configured ratio, for requests without a parent.
    root_sampler: Sampler,
    ids: RandomIdGenerator,
    propagator: TraceContextPropagator,
    clock: WallClock,
    pub queued: AtomicU64,
    pub dropped: AtomicU64,
    pub exported: AtomicU64,
    pub export_failures: AtomicU64,
}

/// The background service that exports what the tracer queues.
pub struct Exporter {
    config: Config,
    tracer: Arc<Tracer>,
}

struct HeaderExtractor<'a>(&'a RequestHeader);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.headers.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.headers.keys().map(|k| k.as_str()).collect()
    }
}

/// One request's trace: its server span, and the upstream attempt in progress.
pub struct RequestTrace {
    context: SpanContext,
    /// The caller's span, when the request carried a `traceparent`.
    parent: Option<SpanId>,
    /// When the request started, in nanoseconds since the Unix epoch (as OTLP has it).
    start: u64,
    attempt: Option<Attempt>,
    /// The current attempt's client span attributes ([`Tracer::attempt`]).
    attempt_attributes: Attrs,
    /// The server span's attributes: `server.address` from routing ([`RequestTrace::routed`]),
    /// then those of its end.
    pub attributes: Attrs,
    /// Finished spans, encoded: attempts before a retry, then at the end the last attempt's
    /// and the server span, which go to the queue together.
    spans: Vec<u8>,
    /// How many spans `spans` holds before the end.
    span_count: usize,
}

struct Attempt {
    span: SpanId,
    /// Nanoseconds since the Unix epoch.
    start: u64,
    status: Option<u16>,
    /// Where the attempt goes, for its `url.full`.
    peer: Option<std::net::SocketAddr>,
}

/// Span attributes, encoded as they are added: each is an OTLP `Span.attributes` field (a
/// `KeyValue` message), so a span's attributes allocate nothing but this buffer.
#[derive(Default)]
pub struct Attrs(Vec<u8>);

/// `Span.attributes`.
const ATTRIBUTES_FIELD: u32 = 9;
/// Most traces a thread keeps for reuse ([`RequestTrace::recycle`]): requests in flight on
/// it at once, give or take.
const SPARE_TRACES: usize = 64;
/// A trace whose buffer grew past this (a very long URL) is not kept.
const SPARE_BUFFER_MAX: usize = 4096;

impl Attrs {
    /// The attributes every server span of listener `name` has: `url.scheme` and
    /// `weir.listener`, encoded once ([`Attrs::extend`]).
    pub fn listener(name: &str) -> Self {
        let mut a = Self::default();
        a.str("url.scheme", "http").str("weir.listener", name);
        a
    }

    /// One string attribute, to be copied ([`Attrs::extend`]) into many spans.
    pub fn string(key: &str, value: &str) -> Self {
        let mut a = Self::default();
        a.str(key, value);
        a
    }

    /// The attributes of every client span to `address` of cluster `cluster`:
    /// `server.address`, `server.port` and `weir.cluster`, encoded once per endpoint.
    pub fn endpoint(address: std::net::SocketAddr, cluster: &str) -> Self {
        let mut a = Self::default();
        a.display("server.address", address.ip())
            .int("server.port", i64::from(address.port()))
            .str("weir.cluster", cluster);
        a
    }

    /// `http.request.method`: for a standard method, a copy of its attribute encoded once
    /// ([`Recurring`]).
    pub fn method(&mut self, method: &http::Method) -> &mut Self {
        match RECURRING.methods.iter().find(|(m, _)| m == method) {
            Some((_, encoded)) => self.extend(encoded),
            None => self.str("http.request.method", method.as_str()),
        }
    }

    /// `network.protocol.version` of a request or response in `version`, copied
    /// ([`Recurring`]). (HTTP/0.9 and HTTP/3 do not reach weir's listeners.)
    pub fn protocol_version(&mut self, version: http::Version) -> &mut Self {
        let i = match version {
            http::Version::HTTP_10 => 0,
            http::Version::HTTP_2 => 2,
            _ => 1,
        };
        self.extend(&RECURRING.versions[i])
    }

    /// `http.response.status_code`: a valid status's attribute copied ([`Recurring`]).
    pub fn status_code(&mut self, status: u16) -> &mut Self {
        match RECURRING
            .statuses
            .get(usize::from(status).wrapping_sub(STATUS_MIN))
        {
            Some(encoded) => self.extend(encoded),
            None => self.int("http.response.status_code", i64::from(status)),
        }
    }

    /// Appends attributes encoded before.
    pub fn extend(&mut self, other: &Attrs) -> &mut Self {
        self.0.extend_from_slice(&other.0);
        self
    }

    /// `KeyValue { key, value: AnyValue { ... } }`, the `AnyValue` message being the
    /// concatenation of `value`'s parts. Always inlined, with its callers, so a constant key
    /// is copied as the constant it is: out of line, an attribute cost ~100 instructions, most
    /// of them calls and length checks (the compiler did not inline it when asked). Only the
    /// common case is inlined: with the rest inlined at every attribute too, the function
    /// that writes a server span's attributes was 29 KB of code (22 KB without).
    #[inline(always)]
    fn put<const N: usize>(&mut self, key: &str, value: [&[u8]; N]) {
        let k = key.len();
        let value_len: usize = value.iter().map(|v| v.len()).sum();
        // A key and value of a few dozen bytes: every length fits one byte, and the
        // attribute is four fixed header bytes, the key, two more and the value.
        let kv = 2 + k + 2 + value_len;
        if kv >= 0x80 {
            return self.put_long(key, &value);
        }
        let out = &mut self.0;
        out.reserve(2 + kv);
        out.extend_from_slice(&[tag_byte(ATTRIBUTES_FIELD), kv as u8, tag_byte(1), k as u8]);
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(&[tag_byte(2), value_len as u8]);
        for v in value {
            out.extend_from_slice(v);
        }
    }

    /// [`Attrs::put`] of an attribute with a length of two bytes or more.
    #[cold]
    #[inline(never)]
    fn put_long(&mut self, key: &str, value: &[&[u8]]) {
        let value_len: usize = value.iter().map(|v| v.len()).sum();
        let out = &mut self.0;
        let kv = len_delimited(1, key.len()) + len_delimited(2, value_len);
        put_header(ATTRIBUTES_FIELD, kv, out);
        put_len_delimited(1, key.as_bytes(), out);
        put_header(2, value_len, out);
        for v in value {
            out.extend_from_slice(v);
        }
    }

    /// A string attribute (`AnyValue.string_value`, field 1).
    #[inline(always)]
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.joined(key, value.as_bytes(), &[])
    }

    /// A string attribute whose value is `first` and `second` joined (a constant empty
    /// `second` costs nothing, inlined). A short value's length is one byte: its head is
    /// a copy of constant size, where one of a size known only at run time is a `memcpy`.
    #[inline(always)]
    fn joined(&mut self, key: &str, first: &[u8], second: &[u8]) -> &mut Self {
        let len = first.len() + second.len();
        if len < 0x80 {
            self.put(key, [&[tag_byte(1), len as u8], first, second]);
        } else {
            let head = Head::new(tag_byte(1), len as u64);
            self.put_long(key, &[head.as_slice(), first, second]);
        }
        self
    }

    /// A string attribute written by `Display` (an address, a number), without a `String`.
    pub fn display(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        use std::fmt::Write;
        FORMATTED.with_borrow_mut(|f| {
            f.clear();
            let _ = write!(f, "{value}");
            self.str(key, f);
        });
        self
    }

    /// An address attribute: [`Attrs::display`] of `ip`, formatted once while the same
    /// addresses recur.
    pub fn ip(&mut self, key: &str, ip: std::net::IpAddr) -> &mut Self {
        IPS.with_borrow_mut(|ips| self.str(key, cached_text(ips, ip, |t| format!("{t}"))));
        self
    }

    /// A URL attribute, `http://{peer}{target}`: the origin formatted once while the same
    /// peers recur (formatting the whole URL per request cost ~1,500 instructions).
    pub fn url(&mut self, key: &str, peer: std::net::SocketAddr, target: &str) -> &mut Self {
        ORIGINS.with_borrow_mut(|origins| {
            let origin = cached_text(origins, peer, |p| format!("http://{p}"));
            self.joined(key, origin.as_bytes(), target.as_bytes());
        });
        self
    }

    /// An integer attribute (`AnyValue.int_value`, field 3).
    #[inline(always)]
    pub fn int(&mut self, key: &str, value: i64) -> &mut Self {
        // int64 is a varint of the two's complement (ten bytes for a negative number).
        let head = Head::new(3 << 3 | WireType::Varint as u8, value as u64);
        self.put(key, [head.as_slice()]);
        self
    }

    /// A floating-point attribute (`AnyValue.double_value`, field 4).
    pub fn double(&mut self, key: &str, value: f64) -> &mut Self {
        let mut field = [0; 9];
        field[0] = 4 << 3 | WireType::SixtyFourBit as u8;
        field[1..].copy_from_slice(&value.to_le_bytes());
        self.put(key, [&field]);
        self
    }
}

/// Attributes that take one of a few values on every request, each value encoded once:
/// copying one cost about half as much as writing it (callgrind, ~45 instructions a copy).
struct Recurring {
    /// `http.request.method` of the methods `http` has constants for.
    methods: [(http::Method, Attrs); 9],
    /// `network.protocol.version`: `1.0`, `1.1` and `2`.
    versions: [Attrs; 3],
    /// `http.response.status_code` of 100 (`STATUS_MIN`) to 599.
    statuses: Vec<Attrs>,
}

const STATUS_MIN: usize = 100;

static RECURRING: std::sync::LazyLock<Recurring> = std::sync::LazyLock::new(|| {
    use http::Method;
    let string = Attrs::string;
    let methods = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
        Method::CONNECT,
        Method::TRACE,
    ]
    .map(|m| {
        let encoded = string("http.request.method", m.as_str());
        (m, encoded)
    });
    let versions = ["1.0", "1.1", "2"].map(|v| string("network.protocol.version", v));
    let statuses = (STATUS_MIN..600)
        .map(|s| {
            let mut a = Attrs::default();
            a.int("http.response.status_code", s as i64);
            a
        })
        .collect();
    Recurring {
        methods,
        versions,
        statuses,
    }
});

/// A field's one-byte key and a varint (a length, or a varint field's value), on the stack.
struct Head {
    bytes: [u8; 11],
    len: usize,
}

impl Head {
    /// A field's key and a varint, `v`. A loop of its own: prost's `encode_varint` writing
    /// into the array (through `BufMut` for `&mut [u8]`) cost ~500 more instructions per
    /// traced request (callgrind, +7,040 -> +7,539). Built in place: a `Head` passed from
    /// one builder method to the next was copied byte by byte.
    #[inline(always)]
    fn new(key: u8, mut v: u64) -> Self {
        let mut head = Self {
            bytes: [0; 11],
            len: 1,
        };
        head.bytes[0] = key;
        while v >= 0x80 {
            head.bytes[head.len] = v as u8 | 0x80;
            head.len += 1;
            v >>= 7;
        }
        head.bytes[head.len] = v as u8;
        head.len += 1;
        head
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// `key`'s text from a cache of the last two keys written (the newer first), writing it with
/// `text` when it is not there.
fn cached_text<K: Copy + PartialEq>(
    cache: &mut [(Option<K>, String); 2],
    key: K,
    text: impl FnOnce(K) -> String,
) -> &str {
    let slot = match cache.iter().position(|(k, _)| *k == Some(key)) {
        Some(i) => i,
        None => {
            cached_text_miss(cache, key, text);
            0
        }
    };
    &cache[slot].1
}

/// [`cached_text`]'s miss, out of the way of its hit: the older entry makes way, the newer
/// moves to the front.
#[cold]
#[inline(never)]
fn cached_text_miss<K: Copy>(
    cache: &mut [(Option<K>, String); 2],
    key: K,
    text: impl FnOnce(K) -> String,
) {
    cache.swap(0, 1);
    cache[0] = (Some(key), text(key));
}

/// The encoded size of length-delimited field `tag` holding `len` bytes.
#[inline]
fn len_delimited(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// The key byte of length-delimited field `tag` (under 16).
const fn tag_byte(tag: u32) -> u8 {
    (tag << 3 | WireType::LengthDelimited as u32) as u8
}

/// A length-delimited field's key and length: two or three bytes in the common cases (a
/// field number under 16, a length under 16 KiB), prost's encoding otherwise.
#[inline]
fn put_header(tag: u32, len: usize, out: &mut Vec<u8>) {
    if tag < 16 && len < 0x80 {
        out.extend_from_slice(&[tag_byte(tag), len as u8]);
    } else if tag < 16 && len < 0x4000 {
        out.extend_from_slice(&[tag_byte(tag), len as u8 | 0x80, (len >> 7) as u8]);
    } else {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(len as u64, out);
    }
}

/// A length-delimited field (bytes, a string, or a message already encoded).
#[inline(always)]
fn put_len_delimited(tag: u32, v: &[u8], out: &mut Vec<u8>) {
    put_header(tag, v.len(), out);
    out.put_slice(v);
}

impl RequestTrace {
    pub fn sampled(&self) -> bool {
        self.context.is_sampled()
    }

    /// An empty trace: one this thread gave back ([`RequestTrace::recycle`]), or a new one.
    fn reused() -> Box<Self> {
        SPARE
            .with_borrow_mut(|spare| spare.pop())
            .unwrap_or_else(|| {
                Box::new(Self {
                    context: SpanContext::empty_context(),
                    parent: None,
                    start: 0,
                    attempt: None,
                    attempt_attributes: Attrs::default(),
                    attributes: Attrs::default(),
                    spans: Vec::new(),
                    span_count: 0,
                })
            })
    }

    /// Gives the trace to the thread's next [`Tracer::start`], emptied, its buffers kept
    /// (unless one grew very large).
    pub fn recycle(mut self: Box<Self>) {
        let buffers = [
            &mut self.attempt_attributes.0,
            &mut self.attributes.0,
            &mut self.spans,
        ];
        if buffers.iter().any(|b| b.capacity() > SPARE_BUFFER_MAX) {
            return;
        }
        for b in buffers {
            b.clear();
        }
        self.attempt = None;
        self.span_count = 0;
        SPARE.with_borrow_mut(|spare| {
            if spare.len() < SPARE_TRACES {
                spare.push(self);
            }
        });
    }

    /// Records the authority the request is routed by (a `Host`, or an absolute URI's) as
    /// the server span's `server.address`: the host without its port, an IPv6 address
    /// without its brackets. Replaces what an earlier routing recorded (filters that change
    /// the headers route the request again). Taken from routing, the header is read once.
    pub fn routed(&mut self, authority: Option<&str>) {
        if !self.sampled() {
            return;
        }
        // Nothing else is written before the request ends.
        self.attributes.0.clear();
        if let Some(a) = authority {
            self.attributes
                .str("server.address", weir_policies::routing::strip_port(a));
        }
    }
}

impl Tracer {
    /// The tracer and the exporter service it feeds.
    pub fn new(config: &Config) -> (Arc<Self>, Exporter) {
        let root_sampler = Sampler::TraceIdRatioBased(config.sampling.clamp(0.0, 1.0));
        let tracer = Arc::new(Self {
            queue: Mutex::default(),
            half_full: tokio::sync::Notify::new(),
            capacity: config.queue.max(1) as usize,
            sampler: Sampler::ParentBased(Box::new(root_sampler.clone())),
            root_sampler,
            ids: RandomIdGenerator::default(),
            propagator: TraceContextPropagator::new(),
            clock: WallClock::new(),
            queued: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            exported: AtomicU64::new(0),
            export_failures: AtomicU64::new(0),
        });
        let exporter = Exporter {
            config: config.clone(),
            tracer: tracer.clone(),
        };
        (tracer, exporter)
    }

    /// Starts the trace of a request that started at `started`: continues the caller's
    /// (`traceparent`) or starts one; sampled as the caller decided, otherwise by the
    /// configured ratio.
    pub fn start(&self, req: &RequestHeader, started: Instant) -> Box<RequestTrace> {
        // Without a `traceparent` there is nothing to extract (the common case at an edge),
        // and no context to build.
        let parent_cx = req
            .headers
            .contains_key(&TRACEPARENT)
            .then(|| self.propagator.extract(&HeaderExtractor(req)))
            .filter(|cx| cx.span().span_context().is_valid());
        let (trace_id, parent_span, state) = match &parent_cx {
            Some(cx) => {
                let parent = cx.span();
                let parent = parent.span_context();
                (
                    parent.trace_id(),
                    Some(parent.span_id()),
                    parent.trace_state().clone(),
                )
            }
            None => (self.ids.new_trace_id(), None, TraceState::default()),
        };
        // A request with a parent follows the parent's decision (`ParentBased`); one without
        // goes straight to the ratio, not through `ParentBased`'s layer.
        let sampler = if parent_cx.is_some() {
            &self.sampler
        } else {
            &self.root_sampler
        };
        let decision = sampler
            .should_sample(
                parent_cx.as_ref(),
                trace_id,
                "",
                &SpanKind::Server,
                &[],
                &[],
            )
            .decision;
        let flags = if decision == SamplingDecision::RecordAndSample {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let mut t = RequestTrace::reused();
        t.context = SpanContext::new(trace_id, self.ids.new_span_id(), flags, false, state);
        t.parent = parent_span;
        t.start = self.clock.unix_nanos(started);
        t
    }

    /// Starts a client span for an upstream attempt to `peer` at `now` (ending the previous
    /// attempt's). Returns the span's attribute buffer, empty, when the trace is sampled (an
    /// unsampled attempt still gets a span id, the upstream's parent, but nothing reads
    /// attributes).
    pub fn attempt<'t>(
        &self,
        t: &'t mut RequestTrace,
        peer: Option<std::net::SocketAddr>,
        now: Instant,
    ) -> Option<&'t mut Attrs> {
        let now = self.clock.unix_nanos(now);
        if let Some(done) = t.attempt.take().filter(|_| t.sampled()) {
            end_attempt(
                &t.context,
                done,
                &mut t.attempt_attributes,
                None,
                now,
                &mut t.spans,
            );
            t.span_count += 1;
        }
        t.attempt = Some(Attempt {
            span: self.ids.new_span_id(),
            start: now,
            status: None,
            peer,
        });
        t.sampled().then_some(&mut t.attempt_attributes)
    }

    /// Records what the attempt sends, once its request is final (a route's prefix rewrite
    /// done): `http.request.method` and `url.full`, as the HTTP client-span conventions ask.
    pub fn attempt_request(&self, t: &mut RequestTrace, upstream: &RequestHeader) {
        let Some(a) = t.attempt.as_ref().filter(|_| t.context.is_sampled()) else {
            return;
        };
        t.attempt_attributes.method(&upstream.method);
        if let Some(peer) = a.peer {
            let target = upstream.uri.path_and_query().map_or("/", |p| p.as_str());
            t.attempt_attributes.url("url.full", peer, target);
        }
    }

    /// Records the attempt's response status.
    pub fn attempt_status(&self, t: &mut RequestTrace, status: u16) {
        if let Some(a) = t.attempt.as_mut() {
            a.status = Some(status);
        }
    }

    /// Sets `traceparent` (and `tracestate`, when the trace has one) on the upstream request:
    /// the current attempt's span is the parent of what the upstream does. The header is the
    /// W3C propagator's, written into a stack buffer: going through the propagator built a
    /// `Context` and two `String`s per request, about a microsecond.
    pub fn inject(&self, t: &RequestTrace, upstream: &mut RequestHeader) {
        let span = t.attempt.as_ref().map_or(t.context.span_id(), |a| a.span);
        // `00-{trace id}-{span id}-{flags}`, in lowercase hex (`core::fmt`'s padded hex
        // formatting was most of the cost), the three fields by one call on 32 bytes (padded),
        // the size `const-hex`'s vector code takes whole: three calls on 16, 8 and 1 bytes cost
        // ten times as much.
        let mut fields = [0u8; 32];
        fields[..16].copy_from_slice(&t.context.trace_id().to_bytes());
        fields[16..24].copy_from_slice(&span.to_bytes());
        fields[24] = (t.context.trace_flags() & TraceFlags::SAMPLED).to_u8();
        let mut hex = [0u8; 64];
        let encoded = const_hex::encode_to_slice(fields, &mut hex);
        debug_assert!(encoded.is_ok(), "64 bytes hold 32 in hex");
        let mut traceparent = *b"00-00000000000000000000000000000000-0000000000000000-00";
        traceparent[3..35].copy_from_slice(&hex[..32]);
        traceparent[36..52].copy_from_slice(&hex[32..48]);
        traceparent[53..55].copy_from_slice(&hex[48..50]);
        // A static name is neither parsed nor copied (pingora-http's weir patch).
        if let Ok(v) = http::HeaderValue::from_bytes(&traceparent) {
            upstream.insert_static_header(&TRACEPARENT, v);
        }
        if *t.context.trace_state() != TraceState::NONE {
            if let Ok(v) = http::HeaderValue::try_from(t.context.trace_state().header()) {
                upstream.insert_static_header(&TRACESTATE, v);
            }
        }
    }

    /// Ends the request's spans, `took` after it started, and queues them for export
    /// (dropping them if the queue is full). The server span's name is `name`'s parts
    /// joined, its attributes the trace's.
    pub fn finish(
        &self,
        mut t: Box<RequestTrace>,
        name: &[&str],
        error: Option<&str>,
        failed: bool,
        took: Duration,
    ) {
        let attempt = t.attempt.take();
        if !t.sampled() {
            return t.recycle();
        }
        let status = failed.then(|| error.unwrap_or("request failed"));
        // The request and its last attempt end together.
        let end = t.start + took.as_nanos() as u64;
        // The spans are encoded after the earlier attempts' (outside the queue's lock), then
        // copied into the batch.
        let mut n = t.span_count;
        if let Some(a) = attempt {
            end_attempt(
                &t.context,
                a,
                &mut t.attempt_attributes,
                error,
                end,
                &mut t.spans,
            );
            n += 1;
        }
        encode_span(
            &mut t.spans,
            SpanFields {
                trace: &t.context,
                id: t.context.span_id(),
                parent: t.parent.unwrap_or(SpanId::INVALID),
                parent_remote: t.parent.is_some(),
                kind: span::SpanKind::Server,
                name,
                start: t.start,
                end,
                attributes: &t.attributes.0,
                status,
            },
        );
        n += 1;
        let queued = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.spans + n > self.capacity {
                Err(n)
            } else {
                if q.batches.back().is_none_or(|b| b.spans + n > BATCH) {
                    let bytes = q.free.pop().unwrap_or_default();
                    q.batches.push_back(Batch { bytes, spans: 0 });
                }
                let batch = q.batches.back_mut().expect("pushed above");
                batch.bytes.extend_from_slice(&t.spans);
                batch.spans += n;
                q.spans += n;
                Ok((n, q.spans))
            }
        };
        t.recycle();
        match queued {
            Ok((n, total)) => {
                self.queued.fetch_add(n as u64, Ordering::Relaxed);
                if total >= self.capacity / 2 {
                    self.half_full.notify_one();
                }
            }
            Err(n) => {
                self.dropped.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }

    /// The oldest batch of queued spans.
    fn next_batch(&self) -> Option<Batch> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let batch = q.batches.pop_front()?;
        q.spans -= batch.spans;
        Some(batch)
    }

    /// Takes back the buffer of a batch that was exported.
    fn recycle(&self, mut bytes: Vec<u8>) {
        bytes.clear();
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.free.len() < self.capacity.div_ceil(BATCH) {
            q.free.push(bytes);
        }
    }

    /// The tracer's Prometheus metrics.
    pub fn render(&self, out: &mut String) {
        for (name, help, v) in [
            ("queued", "Finished spans queued for export.", &self.queued),
            (
                "dropped",
                "Finished spans dropped because the export queue was full.",
                &self.dropped,
            ),
            ("exported", "Spans the collector accepted.", &self.exported),
            (
                "export_failures",
                "OTLP export calls that failed (their spans are lost).",
                &self.export_failures,
            ),
        ] {
            crate::metrics::write_plain(
                out,
                "counter",
                &format!("weir_trace_spans_{name}_total"),
                help,
                v.load(Ordering::Relaxed),
            );
        }
    }
}

/// Ends attempt `a` of the sampled trace `trace`: its client span, encoded into `out`.
fn end_attempt(
    trace: &SpanContext,
    a: Attempt,
    attributes: &mut Attrs,
    error: Option<&str>,
    end: u64,
    out: &mut Vec<u8>,
) {
    if let Some(s) = a.status {
        attributes.status_code(s);
    }
    let failed = error.is_some() || a.status.is_none_or(|s| s >= 500);
    encode_span(
        out,
        SpanFields {
            trace,
            id: a.span,
            parent: trace.span_id(),
            parent_remote: false,
            kind: span::SpanKind::Client,
            name: &["upstream"],
            start: a.start,
            end,
            attributes: &attributes.0,
            status: failed.then(|| error.unwrap_or("upstream attempt failed")),
        },
    );
    attributes.0.clear();
}

/// What a finished span is made of.
struct SpanFields<'a> {
    trace: &'a SpanContext,
    id: SpanId,
    parent: SpanId,
    parent_remote: bool,
    kind: span::SpanKind,
    name: &'a [&'a str],
    /// Nanoseconds since the Unix epoch.
    start: u64,
    end: u64,
    /// Encoded `Span.attributes` fields ([`Attrs`]).
    attributes: &'a [u8],
    /// The error's description when the span failed.
    status: Option<&'a str>,
}

/// Appends the span to `out` as a `ScopeSpans.spans` field: the OTLP `Span` message written
/// field by field (no message structs, no allocation once the buffers have grown), straight
/// into `out` behind its length, which is worked out first (encoding into a buffer of its own
/// and copying that was a copy of every span). The fixed-size fields come first, as one block
/// built on the stack (protobuf lets fields come in any order; written in field order, field
/// by field through prost's encoders, a span cost ~600 instructions).
fn encode_span(out: &mut Vec<u8>, f: SpanFields<'_>) {
    // Trace id (1), span id (2), kind (6), start and end (7, 8, fixed64), flags (16, fixed32,
    // a two-byte key); then the parent's id (4) when there is one. Each block has a constant
    // size (a copy of a size known only at run time is a `memcpy` call).
    let mut fixed = [0u8; 28 + 20 + 6];
    fixed[..2].copy_from_slice(&[tag_byte(1), 16]);
    fixed[2..18].copy_from_slice(&f.trace.trace_id().to_bytes());
    fixed[18..20].copy_from_slice(&[tag_byte(2), 8]);
    fixed[20..28].copy_from_slice(&f.id.to_bytes());
    // `SpanKind` is 1..=5: a one-byte varint.
    fixed[28..30].copy_from_slice(&[6 << 3 | WireType::Varint as u8, f.kind as u8]);
    fixed[30] = 7 << 3 | WireType::SixtyFourBit as u8;
    fixed[31..39].copy_from_slice(&f.start.to_le_bytes());
    fixed[39] = 8 << 3 | WireType::SixtyFourBit as u8;
    fixed[40..48].copy_from_slice(&f.end.to_le_bytes());
    // W3C trace flags, plus OTLP's "the parent's remoteness is known" and "it is remote".
    let mut flags =
        u32::from(f.trace.trace_flags().to_u8()) | SpanFlags::ContextHasIsRemoteMask as u32;
    if f.parent_remote {
        flags |= SpanFlags::ContextIsRemoteMask as u32;
    }
    fixed[48..50].copy_from_slice(&[16 << 3 | WireType::ThirtyTwoBit as u8 | 0x80, 1]);
    fixed[50..54].copy_from_slice(&flags.to_le_bytes());
    let parent = (f.parent != SpanId::INVALID).then(|| {
        let mut parent = [tag_byte(4), 8, 0, 0, 0, 0, 0, 0, 0, 0];
        parent[2..].copy_from_slice(&f.parent.to_bytes());
        parent
    });

    // Most traces carry no `tracestate`: its header is not built for them.
    let state =
        (*f.trace.trace_state() != TraceState::NONE).then(|| f.trace.trace_state().header());
    let state_len = state.as_ref().map_or(0, |s| len_delimited(3, s.len()));
    let name_len: usize = f.name.iter().map(|p| p.len()).sum();
    // Status (15): empty (unset) unless the span failed: then a message and ERROR (2).
    let status_len = f.status.map_or(0, |e| len_delimited(2, e.len()) + 2);
    let len = fixed.len()
        + parent.map_or(0, |p| p.len())
        + state_len
        + len_delimited(5, name_len)
        + f.attributes.len()
        + len_delimited(15, status_len);
    out.reserve(len_delimited(SPANS_FIELD, len));
    put_header(SPANS_FIELD, len, out);
    let start = out.len();
    out.extend_from_slice(&fixed);
    if let Some(parent) = &parent {
        out.extend_from_slice(parent);
    }
    if let Some(state) = &state {
        put_len_delimited(3, state.as_bytes(), out);
    }
    put_header(5, name_len, out);
    for part in f.name {
        out.extend_from_slice(part.as_bytes());
    }
    out.extend_from_slice(f.attributes);
    put_header(15, status_len, out);
    if let Some(e) = f.status {
        put_len_delimited(2, e.as_bytes(), out);
        out.extend_from_slice(&[
            3 << 3 | WireType::Varint as u8,
            status::StatusCode::Error as u8,
        ]);
    }
    debug_assert_eq!(out.len() - start, len, "the span is as long as worked out");
}

/// The fields of an OTLP `ExportTraceServiceRequest` that come before its spans: one
/// `ResourceSpans` (weir's resource) holding one `ScopeSpans` (weir's scope).
struct RequestFraming {
    /// `ResourceSpans.resource` (field 1), encoded.
    resource: Vec<u8>,
    /// `ScopeSpans.scope` (field 1), encoded.
    scope: Vec<u8>,
}

impl RequestFraming {
    fn new(service_name: &str) -> Self {
        use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
        use opentelemetry_proto::tonic::resource::v1::Resource;
        use otlp_metrics::string;
        let resource = Resource {
            attributes: vec![
                string("service.name", service_name),
                string("telemetry.sdk.name", "weir"),
                string("telemetry.sdk.language", "rust"),
                string("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
            ],
            ..Default::default()
        };
        let scope = InstrumentationScope {
            name: "weir".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        let (mut r, mut s) = (Vec::new(), Vec::new());
        prost::encoding::message::encode(1, &resource, &mut r);
        prost::encoding::message::encode(1, &scope, &mut s);
        Self {
            resource: r,
            scope: s,
        }
    }

    /// The export request's bytes up to its spans: `spans_len` bytes of encoded
    /// `ScopeSpans.spans` fields follow them.
    fn head(&self, spans_len: usize) -> Vec<u8> {
        let scope_spans = self.scope.len() + spans_len;
        let resource_spans = self.resource.len() + len_delimited(2, scope_spans);
        let mut out = Vec::with_capacity(len_delimited(1, resource_spans) - spans_len);
        // ExportTraceServiceRequest.resource_spans (1) { resource (1), scope_spans (2) {
        // scope (1), spans (2)... } }
        encode_key(1, WireType::LengthDelimited, &mut out);
        encode_varint(resource_spans as u64, &mut out);
        out.put_slice(&self.resource);
        encode_key(2, WireType::LengthDelimited, &mut out);
        encode_varint(scope_spans as u64, &mut out);
        out.put_slice(&self.scope);
        out
    }

    /// The whole export request, as [`EncodedExport`] writes it.
    #[cfg(test)]
    fn request(&self, spans: &[u8]) -> Vec<u8> {
        let mut out = self.head(spans.len());
        out.extend_from_slice(spans);
        out
    }
}

/// gRPC codec of the OTLP export call for a request already encoded: its head
/// ([`RequestFraming::head`]) is the codec's, its spans are the call's message, written into
/// the gRPC frame as they are (a batch is not copied into a request of its own first); the
/// answer is decoded as usual.
struct EncodedExport {
    head: Vec<u8>,
}

impl tonic::codec::Codec for EncodedExport {
    type Encode = Arc<Vec<u8>>;
    type Decode = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
    type Encoder = EncodedExport;
    type Decoder = EncodedExport;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedExport {
            head: std::mem::take(&mut self.head),
        }
    }

    fn decoder(&mut self) -> Self::Decoder {
        EncodedExport { head: Vec::new() }
    }
}

impl tonic::codec::Encoder for EncodedExport {
    type Item = Arc<Vec<u8>>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        spans: Arc<Vec<u8>>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        // Room for the whole message at once: grown by doubling, the buffer copied a batch
        // of hundreds of KiB several times over.
        dst.reserve(self.head.len() + spans.len());
        dst.put_slice(&self.head);
        dst.put_slice(&spans);
        Ok(())
    }
}

impl tonic::codec::Decoder for EncodedExport {
    type Item = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, tonic::Status> {
        prost::Message::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("OTLP export answer: {e}")))
    }
}

#[async_trait]
impl BackgroundService for Exporter {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
        let channel =
            match tonic::transport::Endpoint::from_shared(self.config.otlp_endpoint.clone()) {
                Ok(e) => e.timeout(Duration::from_secs(5)).connect_lazy(),
                Err(e) => {
                    tracing::error!("tracing.otlp_endpoint: {e}; spans will be dropped");
                    return;
                }
            };
        let mut client = tonic::client::Grpc::new(channel);
        let framing = RequestFraming::new(&self.config.service_name);
        loop {
            let done = tokio::select! {
                _ = shutdown.changed() => true,
                _ = tokio::time::sleep(FLUSH_EVERY) => false,
                _ = self.tracer.half_full.notified() => false,
            };
            self.tracer.clock.anchor();
            // Everything queued now, a batch per request.
            while let Some(batch) = self.tracer.next_batch() {
                let n = batch.spans as u64;
                let codec = EncodedExport {
                    head: framing.head(batch.bytes.len()),
                };
                let spans = Arc::new(batch.bytes);
                let answer = match client.ready().await {
                    Ok(()) => {
                        client
                            .unary(
                                tonic::Request::new(spans.clone()),
                                http::uri::PathAndQuery::from_static(EXPORT),
                                codec,
                            )
                            .await
                    }
                    Err(e) => Err(tonic::Status::unavailable(e.to_string())),
                };
                // The call has written (or dropped) its message: the batch's buffer is ours
                // again, for a later batch.
                if let Ok(bytes) = Arc::try_unwrap(spans) {
                    self.tracer.recycle(bytes);
                }
                match answer {
                    Ok(answer) => {
                        // A collector may take part of a batch (OTLP partial success).
                        let rejected = answer
                            .into_inner()
                            .partial_success
                            .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0));
                        self.tracer
                            .exported
                            .fetch_add(n.saturating_sub(rejected), Ordering::Relaxed)
                    }
                    Err(e) => {
                        tracing::debug!("OTLP export of {n} spans failed: {e}");
                        self.tracer.export_failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            if done {
                return;
            }
        }
    }
}

/// Pushes every metric of [`crate::admin::Exposition`] to an OTLP/gRPC collector at an
/// interval: the numbers `/stats/prometheus` shows, as cumulative OTLP sums, gauges and
/// histograms.
pub struct MetricsExport {
    pub config: weir_policies::model::OtlpMetrics,
    pub exposition: Arc<crate::admin::Exposition>,
}

#[async_trait]
impl BackgroundService for MetricsExport {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
        let channel = match tonic::transport::Endpoint::from_shared(self.config.endpoint.clone()) {
            Ok(e) => e.timeout(Duration::from_secs(5)).connect_lazy(),
            Err(e) => {
                tracing::error!("otlp_metrics.endpoint: {e}");
                return;
            }
        };
        let mut client = MetricsServiceClient::new(channel);
        let started = unix_nanos(SystemTime::now());
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(self.config.interval) => {}
            }
            let text = self.exposition.render();
            match otlp_metrics::request(&text, &self.config.service_name, started) {
                Ok(req) => {
                    if let Err(e) = client.export(req).await {
                        tracing::debug!("OTLP metrics export failed: {e}");
                    }
                }
                Err(e) => tracing::warn!("metrics not exported: {e}"),
            }
        }
    }
}

/// Span times from the `Instant`s the proxy reads anyway (a request's start, an attempt's, a
/// request's duration) rather than a `SystemTime` read for each (three clock reads per traced
/// request): Unix time is an `Instant`'s distance from `base` plus an offset, taken again
/// each time the exporter wakes ([`WallClock::anchor`], at least every second), so a step of
/// the system clock shows in spans within a second. A span's duration is the monotonic
/// clock's either way.
struct WallClock {
    base: Instant,
    /// Unix time at `base`, in nanoseconds, as last measured.
    offset: AtomicU64,
}

impl WallClock {
    fn new() -> Self {
        let clock = Self {
            base: Instant::now(),
            offset: AtomicU64::new(0),
        };
        clock.anchor();
        clock
    }

    /// Measures the offset again.
    fn anchor(&self) {
        let wall = unix_nanos(SystemTime::now());
        let since_base = self.base.elapsed().as_nanos() as u64;
        self.offset
            .store(wall.saturating_sub(since_base), Ordering::Relaxed);
    }

    /// `t` in nanoseconds since the Unix epoch.
    fn unix_nanos(&self, t: Instant) -> u64 {
        self.offset.load(Ordering::Relaxed)
            + t.saturating_duration_since(self.base).as_nanos() as u64
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Prometheus text exposition → OTLP `ExportMetricsServiceRequest`.
pub mod otlp_metrics {
    use std::collections::BTreeMap;

    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{
        any_value, AnyValue, InstrumentationScope, KeyValue,
    };
    use opentelemetry_proto::tonic::metrics::v1::{
        metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
        Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use prometheus_parse::{Scrape, Value};

    /// A string attribute.
    pub(super) fn string(key: &str, v: &str) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.to_string())),
            }),
            ..Default::default()
        }
    }

    /// The request carrying every metric of `text`; `start` is when counting began.
    pub fn request(
        text: &str,
        service: &str,
        start: u64,
    ) -> Result<ExportMetricsServiceRequest, String> {
        let now = super::unix_nanos(std::time::SystemTime::now());
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .map_err(|e| format!("the exposition does not parse: {e}"))?;
        let labels_key = |l: &prometheus_parse::Labels| {
            let mut v: Vec<(String, String)> =
                l.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort();
            v
        };
        // Histogram sums arrive as their own `<name>_sum` samples.
        let sums: BTreeMap<(String, Vec<(String, String)>), f64> = scrape
            .samples
            .iter()
            .filter_map(|s| {
                let base = s.metric.strip_suffix("_sum")?;
                let v = match s.value {
                    Value::Untyped(v) | Value::Counter(v) | Value::Gauge(v) => v,
                    _ => return None,
                };
                Some(((base.to_string(), labels_key(&s.labels)), v))
            })
            .collect();
        let histograms: std::collections::HashSet<&str> = scrape
            .samples
            .iter()
            .filter(|s| matches!(s.value, Value::Histogram(_)))
            .map(|s| s.metric.as_str())
            .collect();
        let mut metrics: BTreeMap<String, Metric> = BTreeMap::new();
        for s in &scrape.samples {
            let is_part = ["_sum", "_count"].iter().any(|suffix| {
                s.metric
                    .strip_suffix(suffix)
                    .is_some_and(|b| histograms.contains(b))
            });
            if is_part {
                continue;
            }
            let attributes: Vec<KeyValue> = labels_key(&s.labels)
                .iter()
                .map(|(k, v)| string(k, v))
                .collect();
            let point = |v: f64| NumberDataPoint {
                attributes: attributes.clone(),
                start_time_unix_nano: start,
                time_unix_nano: now,
                value: Some(number_data_point::Value::AsDouble(v)),
                ..Default::default()
            };
            let entry = metrics.entry(s.metric.clone()).or_insert_with(|| Metric {
                name: s.metric.clone(),
                description: scrape.docs.get(&s.metric).cloned().unwrap_or_default(),
                ..Default::default()
            });
            match (&s.value, &mut entry.data) {
                (Value::Counter(v), None) => {
                    entry.data = Some(metric::Data::Sum(Sum {
                        data_points: vec![point(*v)],
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        is_monotonic: true,
                    }))
                }
                (Value::Counter(v), Some(metric::Data::Sum(sum))) => {
                    sum.data_points.push(point(*v))
                }
                (Value::Gauge(v) | Value::Untyped(v), None) => {
                    entry.data = Some(metric::Data::Gauge(Gauge {
                        data_points: vec![point(*v)],
                    }))
                }
                (Value::Gauge(v) | Value::Untyped(v), Some(metric::Data::Gauge(g))) => {
                    g.data_points.push(point(*v))
                }
                (Value::Histogram(buckets), data) => {
                    let mut buckets = buckets.clone();
                    buckets.sort_by(|a, b| a.less_than.total_cmp(&b.less_than));
                    let count = buckets.last().map_or(0.0, |b| b.count) as u64;
                    let mut before = 0.0;
                    let bucket_counts: Vec<u64> = buckets
                        .iter()
                        .map(|b| {
                            let n = (b.count - before).max(0.0) as u64;
                            before = b.count;
                            n
                        })
                        .collect();
                    let dp = HistogramDataPoint {
                        attributes: attributes.clone(),
                        start_time_unix_nano: start,
                        time_unix_nano: now,
                        count,
                        sum: sums
                            .get(&(s.metric.clone(), labels_key(&s.labels)))
                            .copied(),
                        bucket_counts,
                        explicit_bounds: buckets
                            .iter()
                            .map(|b| b.less_than)
                            .filter(|b| b.is_finite())
                            .collect(),
                        ..Default::default()
                    };
                    match data {
                        Some(metric::Data::Histogram(h)) => h.data_points.push(dp),
                        _ => {
                            *data = Some(metric::Data::Histogram(Histogram {
                                data_points: vec![dp],
                                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            }))
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![string("service.name", service)],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope {
                        name: "weir".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    metrics: metrics.into_values().collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::Context;
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;

    /// Tracing to a collector that is not there (these tests read the queue themselves).
    fn tracing_config(sampling: f64, queue: u32) -> weir_policies::model::Tracing {
        weir_policies::model::Tracing {
            otlp_endpoint: "http://127.0.0.1:1".into(),
            sampling,
            service_name: "svc".into(),
            queue,
        }
    }

    /// What the worker threads queue and the exporter frames is an OTLP export request: a
    /// collector decodes every span, in order, under weir's resource and scope; batches hold
    /// at most `BATCH` spans, and a full queue drops whole requests' spans and counts them.
    #[test]
    fn queued_spans_frame_as_an_otlp_export_request() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use pingora::http::RequestHeader;
        use prost::Message;

        let config = tracing_config(1.0, 2 * super::BATCH as u32 + 10);
        let (tracer, _) = super::Tracer::new(&config);
        let req = RequestHeader::build("GET", b"/x", None).unwrap();
        // Requests of two spans each (one attempt), until the queue is full.
        let requests = super::BATCH + 10;
        for i in 0..requests {
            let mut t = tracer.start(&req, Instant::now());
            let attempt = tracer
                .attempt(&mut t, None, Instant::now())
                .expect("sampled");
            attempt.int("attempt", i as i64);
            tracer.attempt_status(&mut t, 200);
            t.attributes.int("i", i as i64);
            tracer.finish(t, &["GET r", &i.to_string()], None, false, Duration::ZERO);
        }
        let queued = (2 * super::BATCH + 10) / 2 * 2;
        assert_eq!(
            tracer.queued.load(std::sync::atomic::Ordering::Relaxed),
            queued as u64
        );
        assert_eq!(
            tracer.dropped.load(std::sync::atomic::Ordering::Relaxed),
            (2 * requests - queued) as u64
        );

        let framing = super::RequestFraming::new("svc");
        let mut names = Vec::new();
        while let Some(batch) = tracer.next_batch() {
            assert!(batch.spans <= super::BATCH);
            let req =
                ExportTraceServiceRequest::decode(&framing.request(&batch.bytes)[..]).unwrap();
            assert_eq!(req.resource_spans.len(), 1);
            let rs = &req.resource_spans[0];
            let service = &rs.resource.as_ref().unwrap().attributes[0];
            assert_eq!(service.key, "service.name");
            assert_eq!(rs.scope_spans[0].scope.as_ref().unwrap().name, "weir");
            let spans = &rs.scope_spans[0].spans;
            assert_eq!(spans.len(), batch.spans);
            for pair in spans.chunks(2) {
                // The attempt, then its request's server span, its parent.
                assert_eq!(pair[0].name, "upstream");
                assert_eq!(pair[0].parent_span_id, pair[1].span_id);
                assert_eq!(pair[0].trace_id, pair[1].trace_id);
                names.push(pair[1].name.clone());
            }
            tracer.recycle(batch.bytes);
        }
        let expected: Vec<String> = (0..queued / 2).map(|i| format!("GET r{i}")).collect();
        assert_eq!(names, expected);

        // The next batch reuses an exported batch's buffer.
        let t = tracer.start(&req, Instant::now());
        tracer.finish(t, &["GET again"], None, false, Duration::ZERO);
        let batch = tracer.next_batch().unwrap();
        assert_eq!(batch.spans, 1);
        assert!(batch.bytes.capacity() > 2 * batch.bytes.len());
    }

    /// Spans written field by field decode as the OTLP messages they describe: ids and
    /// parent links (a remote caller, a retried attempt), every attribute type, status,
    /// flags and times.
    /// The upstream's `traceparent` and `tracestate` are what OpenTelemetry's W3C propagator
    /// writes for the attempt's span (and read back as that span), sampled or not, with a
    /// caller's trace state or none; an empty state sends no `tracestate` header.
    #[test]
    fn injected_headers_are_the_w3c_propagators() {
        use opentelemetry::propagation::{Injector, TextMapPropagator};
        use opentelemetry::trace::TraceContextExt;
        use opentelemetry_sdk::propagation::TraceContextPropagator;
        use pingora::http::RequestHeader;

        struct Headers(std::collections::HashMap<String, String>);
        impl Injector for Headers {
            fn set(&mut self, key: &str, value: String) {
                self.0.insert(key.to_string(), value);
            }
        }
        let propagator = TraceContextPropagator::new();
        for (sampling, caller) in [
            (1.0, None),
            (0.0, None),
            (
                1.0,
                Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ),
            (
                1.0,
                Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),
            ),
        ] {
            let config = tracing_config(sampling, 100);
            let (tracer, _) = super::Tracer::new(&config);
            let mut req = RequestHeader::build("GET", b"/", None).unwrap();
            if let Some(c) = caller {
                req.insert_header("traceparent", c).unwrap();
                req.insert_header("tracestate", "vendor=x,other=y").unwrap();
            }
            let mut t = tracer.start(&req, Instant::now());
            tracer.attempt(&mut t, None, Instant::now());
            let mut upstream = RequestHeader::build("GET", b"/", None).unwrap();
            tracer.inject(&t, &mut upstream);

            let attempt = t.attempt.as_ref().unwrap().span;
            let sc = SpanContext::new(
                t.context.trace_id(),
                attempt,
                t.context.trace_flags(),
                true,
                t.context.trace_state().clone(),
            );
            let mut want = Headers(Default::default());
            propagator.inject_context(&Context::new().with_remote_span_context(sc), &mut want);
            let got = |name: &str| {
                upstream
                    .headers
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_string())
            };
            assert_eq!(got("traceparent").as_ref(), want.0.get("traceparent"));
            let state = want.0.get("tracestate").filter(|s| !s.is_empty());
            assert_eq!(got("tracestate").as_ref(), state, "{caller:?}");
            assert_eq!(state.is_some(), caller.is_some());
            let read = propagator.extract(&HeaderExtractor(&upstream));
            let read = read.span().span_context().clone();
            assert_eq!(read.span_id(), attempt);
            assert_eq!(read.trace_id(), t.context.trace_id());
            assert_eq!(read.is_sampled(), t.sampled());
        }
    }

    /// `Attrs::ip` writes what `Attrs::display` writes, whichever addresses came before.
    #[test]
    fn ip_attributes_are_their_addresses_text() {
        let ips: Vec<std::net::IpAddr> = vec![
            [127, 0, 0, 1].into(),
            [10, 0, 0, 7].into(),
            [127, 0, 0, 1].into(),
            "::1".parse().unwrap(),
            [10, 0, 0, 7].into(),
            [10, 0, 0, 7].into(),
            "2001:db8::2".parse().unwrap(),
            [127, 0, 0, 1].into(),
        ];
        for ip in ips {
            let (mut cached, mut plain) = (Attrs::default(), Attrs::default());
            cached.ip("client.address", ip);
            plain.display("client.address", ip);
            assert_eq!(cached.0, plain.0, "{ip}");
        }
    }

    #[test]
    fn an_ended_trace_is_reused_empty_with_its_buffers() {
        use pingora::http::RequestHeader;
        let config = tracing_config(1.0, 100);
        let (tracer, _) = super::Tracer::new(&config);
        let req = RequestHeader::build("GET", b"/", None).unwrap();
        let mut t = tracer.start(&req, Instant::now());
        t.routed(Some("example.com"));
        let attempt = tracer
            .attempt(&mut t, None, Instant::now())
            .expect("sampled");
        attempt.str("weir.cluster", "a");
        let buffer = attempt.0.as_ptr();
        // A retry: the first attempt's span is encoded, its buffer emptied for the next.
        let again = tracer
            .attempt(&mut t, None, Instant::now())
            .expect("sampled");
        assert!(again.0.is_empty());
        assert_eq!(again.0.as_ptr(), buffer, "the ended attempt's buffer");
        let trace = &*t as *const RequestTrace;
        tracer.finish(t, &["GET"], None, false, Duration::ZERO);
        let next = tracer.start(&req, Instant::now());
        assert_eq!(&*next as *const RequestTrace, trace, "the ended trace");
        assert!(next.attempt.is_none() && next.span_count == 0);
        assert!(next.attributes.0.is_empty() && next.attempt_attributes.0.is_empty());
        assert!(next.spans.is_empty() && next.attempt_attributes.0.capacity() > 0);
        assert_ne!(
            next.context.span_id(),
            SpanId::INVALID,
            "a context of its own"
        );
        // One that grew very large is let go.
        let mut big = next;
        big.attributes
            .str("url.path", &"x".repeat(super::SPARE_BUFFER_MAX));
        big.recycle();
        let after = tracer.start(&req, Instant::now());
        assert_eq!(after.attributes.0.capacity(), 0, "a new trace");
    }

    #[test]
    fn spans_encode_as_the_otlp_messages_they_describe() {
        use opentelemetry::trace::SpanId;
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};
        use pingora::http::RequestHeader;
        use prost::Message;

        let config = tracing_config(1.0, 100);
        let (tracer, _) = super::Tracer::new(&config);
        let mut req = RequestHeader::build("POST", b"/a", None).unwrap();
        let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        req.insert_header("traceparent", caller).unwrap();
        req.insert_header("tracestate", "vendor=x").unwrap();
        // Span times are the instants the proxy passes, in Unix time.
        let wall = super::unix_nanos(std::time::SystemTime::now());
        let started = Instant::now();
        let ms = Duration::from_millis;
        let mut t = tracer.start(&req, started);
        let first = tracer
            .attempt(&mut t, None, started + ms(1))
            .expect("sampled");
        first.display("server.address", std::net::Ipv4Addr::new(10, 0, 0, 7));
        tracer.attempt_status(&mut t, 503);
        let second = tracer
            .attempt(&mut t, None, started + ms(3))
            .expect("sampled");
        second.int("http.request.resend_count", 1);
        // Long enough that the attribute's and the span's lengths take three bytes.
        let long = "x".repeat(20_000);
        t.attributes
            .str("url.path", &long)
            .int("http.response.status_code", -1)
            .double("ttft", 0.25);
        tracer.finish(t, &["POST", " ", "r"], Some("upstream reset"), true, ms(10));

        let batch = tracer.next_batch().unwrap();
        let framing = super::RequestFraming::new("svc");
        let req = ExportTraceServiceRequest::decode(&framing.request(&batch.bytes)[..]).unwrap();
        let spans = &req.resource_spans[0].scope_spans[0].spans;
        assert_eq!(spans.len(), 3);
        let (a1, a2, server) = (&spans[0], &spans[1], &spans[2]);
        let caller_trace =
            opentelemetry::trace::TraceId::from_hex("0af7651916cd43dd8448eb211c80319c")
                .unwrap()
                .to_bytes()
                .to_vec();
        for s in spans {
            assert_eq!(s.trace_id, caller_trace);
            assert_eq!(s.trace_state, "vendor=x");
            assert_eq!(s.span_id.len(), 8);
        }
        let start = server.start_time_unix_nano;
        assert!(
            start.abs_diff(wall) < 60_000_000_000,
            "{start} is Unix time ({wall})"
        );
        let ms = |n: u64| n * 1_000_000;
        let times = |s: &opentelemetry_proto::tonic::trace::v1::Span| {
            (s.start_time_unix_nano - start, s.end_time_unix_nano - start)
        };
        assert_eq!(times(server), (0, ms(10)));
        assert_eq!(times(a1), (ms(1), ms(3)), "ended by the retry");
        assert_eq!(times(a2), (ms(3), ms(10)), "ended with the request");
        assert_eq!(
            server.parent_span_id,
            SpanId::from_hex("b7ad6b7169203331")
                .unwrap()
                .to_bytes()
                .to_vec()
        );
        assert_eq!(
            server.flags, 0x301,
            "sampled, parent remote and known to be"
        );
        assert_eq!(server.kind, SpanKind::Server as i32);
        assert_eq!(server.name, "POST r");
        let status = server.status.as_ref().unwrap();
        assert_eq!(
            (status.code, status.message.as_str()),
            (StatusCode::Error as i32, "upstream reset")
        );
        let value = |s: &opentelemetry_proto::tonic::trace::v1::Span, k: &str| {
            s.attributes
                .iter()
                .find(|kv| kv.key == k)
                .and_then(|kv| kv.value.clone()?.value)
        };
        assert_eq!(value(server, "url.path"), Some(Value::StringValue(long)));
        assert_eq!(
            value(server, "http.response.status_code"),
            Some(Value::IntValue(-1))
        );
        assert_eq!(value(server, "ttft"), Some(Value::DoubleValue(0.25)));
        assert_eq!(server.attributes.len(), 3);

        for a in [a1, a2] {
            assert_eq!(a.parent_span_id, server.span_id);
            assert_eq!(
                (a.kind, a.name.as_str()),
                (SpanKind::Client as i32, "upstream")
            );
            assert_eq!(a.flags, 0x101, "sampled, parent local");
        }
        assert_ne!(a1.span_id, a2.span_id);
        assert_eq!(
            value(a1, "server.address"),
            Some(Value::StringValue("10.0.0.7".into()))
        );
        assert_eq!(
            value(a1, "http.response.status_code"),
            Some(Value::IntValue(503))
        );
        let failed = a1.status.as_ref().unwrap();
        assert_eq!(
            (failed.code, failed.message.as_str()),
            (StatusCode::Error as i32, "upstream attempt failed")
        );
        // The last attempt ends with the request and its error.
        assert_eq!(
            value(a2, "http.request.resend_count"),
            Some(Value::IntValue(1))
        );
        assert_eq!(a2.status.as_ref().unwrap().message, "upstream reset");

        // An unsampled trace queues nothing.
        let config = weir_policies::model::Tracing {
            sampling: 0.0,
            ..config
        };
        let (tracer, _) = super::Tracer::new(&config);
        let plain = RequestHeader::build("GET", b"/", None).unwrap();
        let t = tracer.start(&plain, Instant::now());
        assert!(!t.sampled());
        tracer.finish(t, &["GET"], None, false, Duration::ZERO);
        assert!(tracer.next_batch().is_none());
        // A successful span's status is present and unset.
        let (tracer, _) = super::Tracer::new(&weir_policies::model::Tracing {
            sampling: 1.0,
            ..config
        });
        tracer.finish(
            tracer.start(&plain, Instant::now()),
            &["GET"],
            None,
            false,
            Duration::ZERO,
        );
        let batch = tracer.next_batch().unwrap();
        let req = ExportTraceServiceRequest::decode(&framing.request(&batch.bytes)[..]).unwrap();
        let span = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.status.as_ref().unwrap().code, StatusCode::Unset as i32);
        assert!(span.parent_span_id.is_empty());
        assert_eq!(span.flags, 0x101);
    }

    #[test]
    fn a_url_attribute_is_the_string_of_its_origin_and_target() {
        // Three peers through a cache of two, each twice, and a target long enough that the
        // attribute's lengths take two bytes.
        let long = format!("/{}", "x".repeat(200));
        for (peer, target) in [
            ("127.0.0.1:8080", "/a?b=1"),
            ("[::1]:9000", "/"),
            ("10.0.0.2:80", long.as_str()),
            ("127.0.0.1:8080", long.as_str()),
            ("[::1]:9000", "/c"),
            ("10.0.0.2:80", "/d"),
        ] {
            let mut url = super::Attrs::default();
            url.url("url.full", peer.parse().unwrap(), target);
            let mut plain = super::Attrs::default();
            plain.str("url.full", &format!("http://{peer}{target}"));
            assert_eq!(url.0, plain.0, "{peer}{target}");
        }
    }

    #[test]
    fn string_attributes_encode_as_prost_does_on_both_sides_of_the_one_byte_lengths() {
        use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
        use prost::Message;
        // An attribute is a `Span.attributes` field: key and length, then the `KeyValue`.
        #[derive(Message)]
        struct Span {
            #[prost(message, repeated, tag = "9")]
            attributes: Vec<KeyValue>,
        }
        for (k, v) in [
            (1, 0),
            (10, 111),
            (10, 112),
            (10, 113),
            (1, 121),
            (3, 200),
            (130, 2),
        ] {
            let (key, value) = ("k".repeat(k), "v".repeat(v));
            let mut attrs = super::Attrs::default();
            attrs.str(&key, &value);
            let expected = Span {
                attributes: vec![KeyValue {
                    key,
                    value: Some(AnyValue {
                        value: Some(Value::StringValue(value)),
                    }),
                    ..Default::default()
                }],
            };
            assert_eq!(
                attrs.0,
                expected.encode_to_vec(),
                "key {k} bytes, value {v}"
            );
        }
    }

    #[test]
    fn number_attributes_encode_as_prost_does() {
        use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
        use prost::Message;
        #[derive(Message)]
        struct Span {
            #[prost(message, repeated, tag = "9")]
            attributes: Vec<KeyValue>,
        }
        let kv = |key: &str, value| KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        };
        // Varints of one to ten bytes (a negative int64 takes ten), a double, and a key long
        // enough that the attribute's lengths take two bytes.
        let long = "k".repeat(130);
        for key in ["k", long.as_str()] {
            for n in [0, 1, 127, 128, 16_384, -1, i64::MAX, i64::MIN] {
                let mut attrs = super::Attrs::default();
                attrs.int(key, n);
                let expected = Span {
                    attributes: vec![kv(key, Value::IntValue(n))],
                };
                assert_eq!(attrs.0, expected.encode_to_vec(), "{n}");
            }
            let mut attrs = super::Attrs::default();
            attrs.double(key, -0.125);
            let expected = Span {
                attributes: vec![kv(key, Value::DoubleValue(-0.125))],
            };
            assert_eq!(attrs.0, expected.encode_to_vec());
        }
    }

    #[test]
    fn the_wall_clock_of_an_instant_is_unix_time() {
        let clock = WallClock::new();
        let now = || (Instant::now(), unix_nanos(SystemTime::now()));
        let (instant, wall) = now();
        assert!(clock.unix_nanos(instant).abs_diff(wall) < 50_000_000);
        let later = instant + Duration::from_secs(5);
        assert_eq!(
            clock.unix_nanos(later) - clock.unix_nanos(instant),
            5_000_000_000
        );
        // Measured again (as the exporter does), still Unix time.
        clock.anchor();
        let (instant, wall) = now();
        assert!(clock.unix_nanos(instant).abs_diff(wall) < 50_000_000);
    }

    #[test]
    fn a_request_routed_again_has_the_last_routings_server_address() {
        let (tracer, _) = Tracer::new(&tracing_config(1.0, 16));
        let req = RequestHeader::build("GET", b"/", None).unwrap();
        let mut t = tracer.start(&req, Instant::now());
        t.routed(Some("example.com:8080"));
        // A filter changed the headers: routed again.
        t.routed(Some("[::1]:8080"));
        let mut expected = Attrs::default();
        expected.str("server.address", "::1");
        assert_eq!(t.attributes.0, expected.0);
        t.routed(None);
        assert!(t.attributes.0.is_empty(), "no authority, no address");
        // An unsampled trace records nothing.
        let (tracer, _) = Tracer::new(&tracing_config(0.0, 16));
        let mut t = tracer.start(&req, Instant::now());
        t.routed(Some("example.com"));
        assert!(t.attributes.0.is_empty());
    }

    #[test]
    fn recurring_attributes_are_the_ones_written_in_full() {
        use http::{Method, Version};
        let method = |m: &Method| {
            let (mut copied, mut written) = (Attrs::default(), Attrs::default());
            copied.method(m);
            written.str("http.request.method", m.as_str());
            (copied.0, written.0)
        };
        let extension = Method::from_bytes(b"PURGE").expect("a token");
        for m in [Method::GET, Method::POST, Method::TRACE, extension] {
            let (copied, written) = method(&m);
            assert_eq!(copied, written, "{m}");
        }
        for (v, text) in [
            (Version::HTTP_10, "1.0"),
            (Version::HTTP_11, "1.1"),
            (Version::HTTP_2, "2"),
        ] {
            let (mut copied, mut written) = (Attrs::default(), Attrs::default());
            copied.protocol_version(v);
            written.str("network.protocol.version", text);
            assert_eq!(copied.0, written.0, "{v:?}");
        }
        // Either side of the table, and no response at all (0).
        for s in [0, 99, 100, 127, 128, 200, 599, 600, 999] {
            let (mut copied, mut written) = (Attrs::default(), Attrs::default());
            copied.status_code(s);
            written.int("http.response.status_code", i64::from(s));
            assert_eq!(copied.0, written.0, "{s}");
        }
    }

    #[test]
    fn the_exposition_becomes_otlp_sums_gauges_and_histograms() {
        let text = "# HELP c_total A counter.\n# TYPE c_total counter\nc_total{route=\"a\"} 3\nc_total{route=\"b\"} 4\n\
            # HELP g A gauge.\n# TYPE g gauge\ng 7\n\
            # HELP h A histogram.\n# TYPE h histogram\nh_bucket{le=\"0.1\"} 2\nh_bucket{le=\"1\"} 5\nh_bucket{le=\"+Inf\"} 6\nh_sum 2.5\nh_count 6\n";
        let req = super::otlp_metrics::request(text, "weir", 1).unwrap();
        let metrics = &req.resource_metrics[0].scope_metrics[0].metrics;
        let by = |n: &str| metrics.iter().find(|m| m.name == n).unwrap();
        match by("c_total").data.as_ref().unwrap() {
            Data::Sum(s) => {
                assert!(s.is_monotonic);
                assert_eq!(s.data_points.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(by("g").data, Some(Data::Gauge(_))));
        match by("h").data.as_ref().unwrap() {
            Data::Histogram(h) => {
                let p = &h.data_points[0];
                assert_eq!((p.count, p.sum), (6, Some(2.5)));
                assert_eq!(p.explicit_bounds, vec![0.1, 1.0]);
                assert_eq!(p.bucket_counts, vec![2, 3, 1]);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            !metrics
                .iter()
                .any(|m| m.name == "h_sum" || m.name == "h_count"),
            "a histogram's parts are not metrics of their own"
        );
        assert_eq!(by("c_total").description, "A counter.");
    }
}
