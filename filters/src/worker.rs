//! A filter thread: owns one VM per plugin of every installed chain, and the per-stream
//! contexts of the requests it serves. Runs under the `filter` seccomp allowlist; everything
//! it needs from outside (callouts) goes back to the proxy through the reply channel.

use std::collections::HashMap;
use std::mem::take;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::abi::{Pairs, ACTION_CONTINUE};
use crate::host::{
    HostState, StreamData, DIRTY_REQUEST_HEADERS, DIRTY_REQUEST_TRAILERS, DIRTY_RESPONSE_HEADERS,
    DIRTY_RESPONSE_TRAILERS,
};
use crate::queue::JobQueue;
use crate::shared::QueueOwner;
use crate::types::{Callout, CalloutResult, LocalResponse, StreamInfo};
use crate::vm::{Plugin, Vm};
use crate::{Inner, RootCall};

pub enum Job {
    Install {
        chain: u64,
        plugins: Vec<Arc<Plugin>>,
        done: std::sync::mpsc::Sender<Result<(), String>>,
    },
    Remove {
        chain: u64,
    },
    Phase {
        stream: u64,
        chain: u64,
        phase: Phase,
        reply: Option<crate::queue::ReplyTx>,
    },
    QueueReady {
        owner: QueueOwner,
        queue: u32,
    },
    /// The result of a callout a root context made.
    RootCallResult {
        chain: u64,
        filter: usize,
        token: u32,
        result: CalloutResult,
    },
    /// The proxy is done with a stream: `proxy_on_log`, `proxy_on_done`, `proxy_on_delete`.
    /// Queued without a wake-up.
    End {
        stream: u64,
    },
    /// Runs a closure on the thread (tests use it to prove the sandbox).
    Exec(Box<dyn FnOnce() + Send>),
    Stop,
}

pub enum Phase {
    RequestHeaders {
        info: Arc<StreamInfo>,
        headers: Pairs,
        eos: bool,
    },
    RequestBody {
        chunk: Vec<u8>,
        eos: bool,
    },
    RequestTrailers {
        trailers: Pairs,
    },
    ResponseHeaders {
        headers: Pairs,
        eos: bool,
    },
    ResponseBody {
        chunk: Vec<u8>,
        eos: bool,
    },
    ResponseTrailers {
        trailers: Pairs,
    },
    CallResult {
        token: u32,
        result: CalloutResult,
    },
}

#[derive(Debug)]
pub enum Outcome {
    Continue,
    /// Body phase: the filters keep the data for now; nothing goes on.
    Held,
    /// A filter paused the stream; it goes on after a callout result resumes it.
    Paused,
    Respond(LocalResponse),
    Close,
    Fail(String),
}

pub struct Reply {
    pub outcome: Outcome,
    /// The phase's header map or trailers when filters changed them.
    pub headers: Option<Pairs>,
    /// The body bytes that go on (body phases).
    pub body: Option<Vec<u8>>,
    pub calls: Vec<(u32, Callout)>,
}

impl Reply {
    fn of(outcome: Outcome) -> Self {
        Reply {
            outcome,
            headers: None,
            body: None,
            calls: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    Request = 0,
    Response = 1,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Headers,
    Body,
    Trailers,
}

struct Paused {
    dir: Dir,
    kind: Kind,
    /// Position in the phase's filter order of the filter that paused.
    pos: usize,
    eos: bool,
    /// Body phases: the data the paused filter holds.
    body: Vec<u8>,
}

struct Stream {
    chain: u64,
    /// Per filter: (VM generation, context id); `None` when the filter is out of this stream
    /// (it failed and is fail-open).
    ctx: Vec<Option<(u64, u32)>>,
    data: StreamData,
    paused: Option<Paused>,
    /// Body bytes held by buffering filters, per direction: (position, bytes), ascending.
    held: [Vec<(usize, Vec<u8>)>; 2],
    /// Pending callouts: token → filter index.
    calls: HashMap<u32, usize>,
    /// Callouts made since the last reply.
    new_calls: Vec<(u32, Callout)>,
}

struct Chain {
    plugins: Vec<Arc<Plugin>>,
    vms: Vec<Vm>,
}

enum Step {
    Next,
    Pause,
    Stop(Outcome),
}

/// Longest delay of `proxy_on_log` after a stream ends, when the thread is otherwise idle.
const END_FLUSH: Duration = Duration::from_millis(5);

pub struct Worker {
    pub index: usize,
    pub inner: Arc<Inner>,
    chains: HashMap<u64, Chain>,
    streams: HashMap<u64, Stream>,
    generation: u64,
}

impl Worker {
    pub fn new(index: usize, inner: Arc<Inner>) -> Self {
        Self {
            index,
            inner,
            chains: HashMap::new(),
            streams: HashMap::new(),
            generation: 0,
        }
    }

    pub fn run(mut self) {
        let inner = self.inner.clone();
        let jobs = &inner.threads[self.index];
        jobs.attach();
        // However the thread ends, jobs sent to it from now on fail instead of waiting.
        struct Close<'a>(&'a JobQueue);
        impl Drop for Close<'_> {
            fn drop(&mut self) {
                self.0.close();
            }
        }
        let _close = Close(jobs);
        loop {
            match self.next_job(jobs) {
                Some(Job::Stop) => return,
                Some(job) => self.handle(job),
                None => {}
            }
            self.ticks();
            self.send_root_calls();
            self.recreate_failed();
        }
    }

    /// The next job, or `None` when a tick or pending stream ends are due. The thread never
    /// polls: it shares its CPU with the proxy threads that send it work, and a poll there
    /// would only keep them from running.
    fn next_job(&self, jobs: &JobQueue) -> Option<Job> {
        if let Some(job) = jobs.pop() {
            return Some(job);
        }
        let mut wait = self.next_tick_in();
        if !self.streams.is_empty() {
            // Streams that end are queued without waking this thread; look at least this often.
            wait = Some(wait.map_or(END_FLUSH, |w| w.min(END_FLUSH)));
        }
        jobs.wait(wait);
        jobs.pop()
    }

    /// Hands callouts root contexts made to the proxy side, which runs them and sends the
    /// results back as [`Job::RootCallResult`].
    fn send_root_calls(&mut self) {
        for (&chain, c) in &mut self.chains {
            for (filter, vm) in c.vms.iter_mut().enumerate() {
                for (token, call) in vm.store.data_mut().root_calls.drain(..) {
                    self.inner.start_root_call(RootCall {
                        thread: self.index,
                        chain,
                        filter,
                        token,
                        call,
                    });
                }
            }
        }
    }

    /// Runs `proxy_on_log`/`done`/`delete` for a stream that ended.
    fn end_stream(&mut self, id: u64) {
        if let Some(mut stream) = self.streams.remove(&id) {
            if let Some(chain) = self.chains.get_mut(&stream.chain) {
                end(chain, &mut stream);
            }
        }
    }

    fn next_tick_in(&self) -> Option<Duration> {
        let next = self
            .chains
            .values()
            .flat_map(|c| c.vms.iter())
            .filter_map(|vm| vm.next_tick)
            .min()?;
        Some(next.saturating_duration_since(Instant::now()))
    }

    fn ticks(&mut self) {
        let now = Instant::now();
        for chain in self.chains.values_mut() {
            for vm in &mut chain.vms {
                vm.tick_if_due(now);
            }
        }
    }

    fn new_vm(&mut self, chain: u64, filter: usize, plugin: &Plugin) -> Result<Vm, String> {
        self.generation += 1;
        let inner = &self.inner;
        let state = HostState {
            limits: Default::default(),
            plugin: plugin.config.clone(),
            shared: inner.shared.clone(),
            metrics: inner.metrics.clone(),
            callouts: inner.callouts.clone(),
            stream: None,
            tick_period: None,
            next_token: 0,
            queue_owner: QueueOwner {
                thread: self.index,
                chain,
                filter,
                root_context: 1,
            },
            notify_queue: inner.notify_queue(),
            stdio: Vec::new(),
            root_calls: Vec::new(),
            root_call_result: None,
        };
        let limits = plugin.config.limits;
        Vm::new(
            &inner.engine,
            plugin,
            state,
            limits.memory_bytes,
            limits.callback_deadline,
            self.generation,
        )
    }

    /// Replaces VMs that trapped with fresh ones, so the next request finds a working filter.
    fn recreate_failed(&mut self) {
        let failed: Vec<(u64, usize)> = self
            .chains
            .iter()
            .flat_map(|(id, c)| {
                c.vms
                    .iter()
                    .enumerate()
                    .filter(|(_, vm)| vm.failed)
                    .map(move |(i, _)| (*id, i))
            })
            .collect();
        for (chain, i) in failed {
            let plugin = self.chains[&chain].plugins[i].clone();
            match self.new_vm(chain, i, &plugin) {
                Ok(vm) => {
                    tracing::info!(plugin = %plugin.config.name, thread = self.index, "filter VM recreated");
                    self.inner
                        .vm_restarts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Some(c) = self.chains.get_mut(&chain) {
                        c.vms[i] = vm;
                    }
                }
                Err(e) => {
                    // Keep the failed VM: its stream callbacks fail (or pass, fail-open) until a
                    // later attempt works.
                    tracing::error!(plugin = %plugin.config.name, "recreating the filter VM failed: {e}");
                }
            }
        }
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Install {
                chain,
                plugins,
                done,
            } => {
                let mut vms = Vec::new();
                for (i, p) in plugins.iter().enumerate() {
                    match self.new_vm(chain, i, p) {
                        Ok(vm) => vms.push(vm),
                        Err(e) => {
                            let _ = done.send(Err(format!("plugin {:?}: {e}", p.config.name)));
                            return;
                        }
                    }
                }
                self.chains.insert(chain, Chain { plugins, vms });
                let _ = done.send(Ok(()));
            }
            Job::Remove { chain } => {
                self.chains.remove(&chain);
                self.streams.retain(|_, s| s.chain != chain);
            }
            Job::Phase {
                stream,
                chain,
                phase,
                reply,
            } => {
                let r = self.phase(stream, chain, phase);
                if let Some(tx) = reply {
                    tx.send(r);
                }
            }
            Job::QueueReady { owner, queue } => {
                if let Some(vm) = self
                    .chains
                    .get_mut(&owner.chain)
                    .and_then(|c| c.vms.get_mut(owner.filter))
                {
                    if let Some(f) = vm.f.queue_ready.clone() {
                        let root = owner.root_context as i32;
                        if let Err(e) = vm.call(|s| f.call(s, (root, queue as i32))) {
                            tracing::warn!("proxy_on_queue_ready: {e}");
                        }
                    }
                }
            }
            Job::RootCallResult {
                chain,
                filter,
                token,
                result,
            } => {
                if let Some(vm) = self
                    .chains
                    .get_mut(&chain)
                    .and_then(|c| c.vms.get_mut(filter))
                {
                    let sizes = CallSizes::of(&result);
                    vm.store.data_mut().root_call_result = Some(result);
                    let root = vm.root_context as i32;
                    if let Err(e) = call_result_callback(vm, root, token, sizes) {
                        tracing::warn!("callout response to a root context: filter {e}");
                    }
                    vm.store.data_mut().root_call_result = None;
                }
            }
            Job::End { stream } => self.end_stream(stream),
            Job::Exec(f) => f(),
            Job::Stop => {}
        }
    }

    fn phase(&mut self, id: u64, chain_id: u64, phase: Phase) -> Reply {
        let Some(chain) = self.chains.get_mut(&chain_id) else {
            return Reply::of(Outcome::Fail("filter chain is gone".into()));
        };
        if let Phase::RequestHeaders { info, headers, eos } = phase {
            let mut stream = Stream {
                chain: chain_id,
                ctx: Vec::with_capacity(chain.vms.len()),
                data: StreamData {
                    info,
                    request_headers: headers,
                    ..Default::default()
                },
                paused: None,
                held: [Vec::new(), Vec::new()],
                calls: HashMap::new(),
                new_calls: Vec::new(),
            };
            for (i, vm) in chain.vms.iter_mut().enumerate() {
                let ctx = vm.new_context();
                let root = vm.root_context as i32;
                let created = match vm.f.context_create.clone() {
                    Some(f) => vm.call(|s| f.call(s, (ctx as i32, root))),
                    None => Ok(()),
                };
                match created {
                    Ok(()) => stream.ctx.push(Some((vm.generation, ctx))),
                    Err(e) => {
                        let plugin = &chain.plugins[i].config;
                        tracing::warn!(plugin = %plugin.name, "proxy_on_context_create {e}");
                        self.inner.count_failure();
                        if !plugin.fail_open {
                            return Reply::of(Outcome::Fail(format!(
                                "filter {:?} {e}",
                                plugin.name
                            )));
                        }
                        stream.ctx.push(None);
                    }
                }
            }
            let mut reply = run(
                chain,
                &mut stream,
                Dir::Request,
                Kind::Headers,
                0,
                eos,
                &self.inner,
            );
            finish(&mut stream, &mut reply, Dir::Request, Kind::Headers);
            self.streams.insert(id, stream);
            return reply;
        }
        let Some(stream) = self.streams.get_mut(&id) else {
            return Reply::of(Outcome::Continue);
        };
        let (dir, kind, mut reply) = match phase {
            Phase::RequestHeaders { .. } => unreachable!("handled above"),
            Phase::RequestBody { chunk, eos } => (
                Dir::Request,
                Kind::Body,
                body(chain, stream, Dir::Request, chunk, eos, &self.inner),
            ),
            Phase::ResponseBody { chunk, eos } => (
                Dir::Response,
                Kind::Body,
                body(chain, stream, Dir::Response, chunk, eos, &self.inner),
            ),
            Phase::RequestTrailers { trailers } => {
                stream.data.request_trailers = trailers;
                map_phase(
                    chain,
                    stream,
                    Dir::Request,
                    Kind::Trailers,
                    true,
                    &self.inner,
                )
            }
            Phase::ResponseHeaders { headers, eos } => {
                stream.data.response_headers = headers;
                map_phase(
                    chain,
                    stream,
                    Dir::Response,
                    Kind::Headers,
                    eos,
                    &self.inner,
                )
            }
            Phase::ResponseTrailers { trailers } => {
                stream.data.response_trailers = trailers;
                map_phase(
                    chain,
                    stream,
                    Dir::Response,
                    Kind::Trailers,
                    true,
                    &self.inner,
                )
            }
            Phase::CallResult { token, result } => {
                let (dir, kind) = stream
                    .paused
                    .as_ref()
                    .map_or((Dir::Request, Kind::Headers), |p| (p.dir, p.kind));
                (
                    dir,
                    kind,
                    deliver(chain, stream, token, result, &self.inner),
                )
            }
        };
        finish(stream, &mut reply, dir, kind);
        reply
    }
}

/// A header or trailer phase from its start; the map is already in the stream's data.
fn map_phase(
    chain: &mut Chain,
    stream: &mut Stream,
    dir: Dir,
    kind: Kind,
    eos: bool,
    inner: &Inner,
) -> (Dir, Kind, Reply) {
    (dir, kind, run(chain, stream, dir, kind, 0, eos, inner))
}

/// Moves the phase's changed map and the new callouts into the reply.
fn finish(stream: &mut Stream, reply: &mut Reply, dir: Dir, kind: Kind) {
    let d = &mut stream.data;
    let (bit, map) = match (dir, kind) {
        (Dir::Request, Kind::Headers) => (DIRTY_REQUEST_HEADERS, &d.request_headers),
        (Dir::Request, Kind::Trailers) => (DIRTY_REQUEST_TRAILERS, &d.request_trailers),
        (Dir::Response, Kind::Headers) => (DIRTY_RESPONSE_HEADERS, &d.response_headers),
        (Dir::Response, Kind::Trailers) => (DIRTY_RESPONSE_TRAILERS, &d.response_trailers),
        (_, Kind::Body) => (0, &d.request_headers),
    };
    if bit != 0 && d.dirty & bit != 0 && matches!(reply.outcome, Outcome::Continue) {
        reply.headers = Some(map.clone());
        d.dirty &= !bit;
    }
    reply.calls = take(&mut stream.new_calls);
}

fn order(dir: Dir, n: usize, pos: usize) -> usize {
    match dir {
        Dir::Request => pos,
        Dir::Response => n - 1 - pos,
    }
}

/// Runs one callback of filter `i` for `stream`, with the stream's data moved into the VM.
fn callback(
    chain: &mut Chain,
    stream: &mut Stream,
    i: usize,
    inner: &Inner,
    f: impl FnOnce(&mut Vm, i32) -> Result<i32, String>,
) -> Step {
    let Some((generation, ctx)) = stream.ctx[i] else {
        return Step::Next;
    };
    let plugin = &chain.plugins[i].config;
    let vm = &mut chain.vms[i];
    let result = if vm.generation != generation {
        Err("lost its VM (restarted after another request's failure)".to_string())
    } else {
        vm.store.data_mut().stream = Some(take(&mut stream.data));
        let r = f(vm, ctx as i32);
        stream.data = vm.store.data_mut().stream.take().unwrap_or_default();
        r
    };
    stream
        .new_calls
        .extend(stream.data.new_calls.drain(..).inspect(|(token, _)| {
            stream.calls.insert(*token, i);
        }));
    match result {
        Err(e) => {
            inner.count_failure();
            tracing::warn!(plugin = %plugin.name, "filter {e}");
            if plugin.fail_open {
                stream.ctx[i] = None;
                Step::Next
            } else {
                Step::Stop(Outcome::Fail(format!("filter {:?} {e}", plugin.name)))
            }
        }
        Ok(action) => {
            if let Some(local) = stream.data.local.take() {
                Step::Stop(Outcome::Respond(local))
            } else if stream.data.close {
                Step::Stop(Outcome::Close)
            } else if action == ACTION_CONTINUE as i32 {
                Step::Next
            } else {
                Step::Pause
            }
        }
    }
}

/// Runs the header or trailer callbacks from position `from` in the phase's filter order.
fn run(
    chain: &mut Chain,
    stream: &mut Stream,
    dir: Dir,
    kind: Kind,
    from: usize,
    eos: bool,
    inner: &Inner,
) -> Reply {
    let n = chain.vms.len();
    for pos in from..n {
        let i = order(dir, n, pos);
        let count = |d: &StreamData| match (dir, kind) {
            (Dir::Request, Kind::Headers) => d.request_headers.len(),
            (Dir::Request, _) => d.request_trailers.len(),
            (Dir::Response, Kind::Headers) => d.response_headers.len(),
            (Dir::Response, _) => d.response_trailers.len(),
        } as i32;
        let num = count(&stream.data);
        let step = callback(chain, stream, i, inner, |vm, ctx| {
            let f = match (dir, kind) {
                (Dir::Request, Kind::Headers) => vm.f.request_headers.clone().map(Ok),
                (Dir::Response, Kind::Headers) => vm.f.response_headers.clone().map(Ok),
                (Dir::Request, _) => vm.f.request_trailers.clone().map(Err),
                (Dir::Response, _) => vm.f.response_trailers.clone().map(Err),
            };
            match f {
                None => Ok(ACTION_CONTINUE as i32),
                Some(Ok(h)) => vm.call(|s| h.call(s, (ctx, num, eos as i32))),
                Some(Err(t)) => vm.call(|s| t.call(s, (ctx, num))),
            }
        });
        match step {
            Step::Next => {}
            Step::Pause => {
                stream.paused = Some(Paused {
                    dir,
                    kind,
                    pos,
                    eos,
                    body: Vec::new(),
                });
                return Reply::of(Outcome::Paused);
            }
            Step::Stop(o) => return Reply::of(o),
        }
    }
    Reply::of(Outcome::Continue)
}

/// A body chunk through the chain. A filter that pauses before the end of the stream buffers:
/// it gets the whole buffer again with the next chunk (Envoy's StopIterationAndBuffer).
fn body(
    chain: &mut Chain,
    stream: &mut Stream,
    dir: Dir,
    chunk: Vec<u8>,
    eos: bool,
    inner: &Inner,
) -> Reply {
    let holds = take(&mut stream.held[dir as usize]);
    run_body(chain, stream, dir, 0, Some(chunk), holds, eos, inner)
}

#[allow(clippy::too_many_arguments)]
fn run_body(
    chain: &mut Chain,
    stream: &mut Stream,
    dir: Dir,
    from: usize,
    mut buf: Option<Vec<u8>>,
    holds: Vec<(usize, Vec<u8>)>,
    eos: bool,
    inner: &Inner,
) -> Reply {
    let n = chain.vms.len();
    let mut holds = holds.into_iter().peekable();
    let mut kept = Vec::new();
    for pos in from..n {
        if let Some((_, held)) = holds.next_if(|(p, _)| *p == pos) {
            match buf.take() {
                Some(b) => {
                    let mut all = held;
                    all.extend(b);
                    buf = Some(all);
                }
                None => {
                    kept.push((pos, held));
                    continue;
                }
            }
        }
        let Some(b) = buf.as_mut() else {
            continue;
        };
        let i = order(dir, n, pos);
        let size = b.len() as i32;
        match dir {
            Dir::Request => stream.data.request_body = take(b),
            Dir::Response => stream.data.response_body = take(b),
        }
        let step = callback(chain, stream, i, inner, |vm, ctx| {
            let f = match dir {
                Dir::Request => vm.f.request_body.clone(),
                Dir::Response => vm.f.response_body.clone(),
            };
            match f {
                None => Ok(ACTION_CONTINUE as i32),
                Some(f) => vm.call(|s| f.call(s, (ctx, size, eos as i32))),
            }
        });
        *b = match dir {
            Dir::Request => take(&mut stream.data.request_body),
            Dir::Response => take(&mut stream.data.response_body),
        };
        match step {
            Step::Next => {}
            Step::Pause if !eos => {
                kept.push((pos, buf.take().unwrap_or_default()));
            }
            Step::Pause => {
                kept.extend(holds);
                stream.held[dir as usize] = kept;
                stream.paused = Some(Paused {
                    dir,
                    kind: Kind::Body,
                    pos,
                    eos,
                    body: buf.take().unwrap_or_default(),
                });
                return Reply::of(Outcome::Paused);
            }
            Step::Stop(o) => {
                stream.held[dir as usize] = kept;
                return Reply::of(o);
            }
        }
    }
    stream.held[dir as usize] = kept;
    match buf {
        Some(b) => Reply {
            body: Some(b),
            ..Reply::of(Outcome::Continue)
        },
        None => Reply::of(Outcome::Held),
    }
}

/// Delivers a callout result, then resumes the paused phase if the filter asked to.
fn deliver(
    chain: &mut Chain,
    stream: &mut Stream,
    token: u32,
    result: CalloutResult,
    inner: &Inner,
) -> Reply {
    let Some(i) = stream.calls.remove(&token) else {
        return Reply::of(if stream.paused.is_some() {
            Outcome::Paused
        } else {
            Outcome::Continue
        });
    };
    let sizes = CallSizes::of(&result);
    stream.data.call_result = Some(result);
    let step = callback(chain, stream, i, inner, |vm, ctx| {
        call_result_callback(vm, ctx, token, sizes).map(|_| 0)
    });
    stream.data.call_result = None;
    match step {
        Step::Stop(o) => return Reply::of(o),
        Step::Next | Step::Pause => {}
    }
    let Some(p) = stream.paused.take() else {
        return Reply::of(Outcome::Continue);
    };
    if !take(&mut stream.data.resume[p.dir as usize]) {
        stream.paused = Some(p);
        return Reply::of(Outcome::Paused);
    }
    match p.kind {
        Kind::Body => {
            let holds = take(&mut stream.held[p.dir as usize]);
            run_body(
                chain,
                stream,
                p.dir,
                p.pos + 1,
                Some(p.body),
                holds,
                p.eos,
                inner,
            )
        }
        kind => run(chain, stream, p.dir, kind, p.pos + 1, p.eos, inner),
    }
}

/// What the callout-result callbacks are told about a result.
#[derive(Clone, Copy)]
enum CallSizes {
    /// Headers, body bytes and trailers of an HTTP reply (zeros: the call failed).
    Http(i32, i32, i32),
    /// A gRPC reply message of this size.
    GrpcMessage(i32),
    /// A gRPC call that ended with this status and no message.
    GrpcClosed(u32),
}

impl CallSizes {
    fn of(r: &CalloutResult) -> Self {
        match r {
            CalloutResult::Http(resp) => {
                let (h, b, t) = resp.as_ref().map_or((0, 0, 0), |r| {
                    (
                        r.headers.len() as i32,
                        r.body.len() as i32,
                        r.trailers.len() as i32,
                    )
                });
                Self::Http(h, b, t)
            }
            CalloutResult::Grpc(g) => match (&g.body, g.status) {
                (Some(body), 0) => Self::GrpcMessage(body.len() as i32),
                _ => Self::GrpcClosed(g.status),
            },
        }
    }
}

/// Tells context `ctx` of `vm` about a callout's result (already placed where the host calls
/// read it): `proxy_on_http_call_response`, or `proxy_on_grpc_receive` / `proxy_on_grpc_close`.
fn call_result_callback(vm: &mut Vm, ctx: i32, token: u32, sizes: CallSizes) -> Result<(), String> {
    let token = token as i32;
    match sizes {
        CallSizes::Http(h, b, t) => match vm.f.http_call_response.clone() {
            Some(f) => vm.call(|s| f.call(s, (ctx, token, h, b, t))),
            None => Ok(()),
        },
        CallSizes::GrpcMessage(size) => match vm.f.grpc_receive.clone() {
            Some(f) => vm.call(|s| f.call(s, (ctx, token, size))),
            None => Ok(()),
        },
        CallSizes::GrpcClosed(status) => match vm.f.grpc_close.clone() {
            Some(f) => vm.call(|s| f.call(s, (ctx, token, status as i32))),
            None => Ok(()),
        },
    }
}

/// `proxy_on_log`, `proxy_on_done`, `proxy_on_delete` for every filter of the stream.
fn end(chain: &mut Chain, stream: &mut Stream) {
    for i in 0..chain.vms.len() {
        let Some((generation, ctx)) = stream.ctx[i] else {
            continue;
        };
        let vm = &mut chain.vms[i];
        if vm.generation != generation || vm.failed {
            continue;
        }
        vm.store.data_mut().stream = Some(take(&mut stream.data));
        let ctx = ctx as i32;
        let mut result = Ok(());
        if let Some(f) = vm.f.log.clone() {
            result = result.and_then(|_| vm.call(|s| f.call(s, ctx)));
        }
        if let Some(f) = vm.f.done.clone() {
            result = result.and_then(|_| vm.call(|s| f.call(s, ctx)).map(|_| ()));
        }
        if let Some(f) = vm.f.delete.clone() {
            result = result.and_then(|_| vm.call(|s| f.call(s, ctx)));
        }
        stream.data = vm.store.data_mut().stream.take().unwrap_or_default();
        if let Err(e) = result {
            tracing::warn!(plugin = %chain.plugins[i].config.name, "end of stream: filter {e}");
        }
    }
}
