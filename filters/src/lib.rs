//! weir's proxy-wasm host: filters built with the proxy-wasm SDK for Envoy (ABI 0.2.1) run on
//! wasmtime, on dedicated filter threads locked down with seccomp.
//!
//! The proxy installs a filter chain once per config ([`FilterHost::install`]) and opens a
//! [`FilterStream`] per request. Each phase of the request is one round trip to the stream's
//! filter thread; callouts the filters make (`proxy_http_call`, `proxy_grpc_call`) come back
//! to the proxy, which runs them through [`Callouts`] and delivers the results.

pub mod abi;
mod host;
pub mod metrics;
mod queue;
pub mod sandbox;
mod shared;
mod types;
mod vm;
mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use wasmtime::{Engine, Linker, Module};

pub use abi::Pairs;
pub use types::*;

use host::HostState;
use shared::{QueueOwner, Shared};
use vm::{Plugin, EPOCH_TICK};
use worker::{Job, Outcome, Phase, Reply, Worker};

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("filter sandbox: {0}")]
    Sandbox(#[from] sandbox::SandboxError),
    #[error("wasm engine: {0}")]
    Engine(String),
    #[error("filter thread: {0}")]
    Thread(String),
    #[error("reading wasm module {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("wasm module {path}: sha256 is {actual}, the config says {expected}")]
    Digest {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("wasm module {path}: {error}")]
    Compile { path: String, error: String },
    #[error("filter chain {chain:?}: {error}")]
    Start { chain: String, error: String },
}

/// Checks a module without running it: reads it, verifies `sha256` when given, and compiles
/// it (`weir validate` uses this so a bad module is found before deployment).
pub fn check_module(path: &std::path::Path, sha256: Option<&str>) -> Result<(), FilterError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|error| FilterError::Read {
        path: shown.clone(),
        error,
    })?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if let Some(expected) = sha256 {
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(FilterError::Digest {
                path: shown,
                expected: expected.into(),
                actual,
            });
        }
    }
    let engine = Engine::default();
    Module::validate(&engine, &bytes).map_err(|e| FilterError::Compile {
        path: shown,
        error: format!("{e:#}"),
    })
}

/// State shared by the proxy side and every filter thread.
pub struct Inner {
    engine: Engine,
    linker: Linker<HostState>,
    modules: Mutex<HashMap<[u8; 32], Module>>,
    threads: Vec<queue::JobQueue>,
    /// Per filter thread: the CPU it is pinned to, if pinning worked.
    thread_cpu: Vec<Option<usize>>,
    /// Per CPU number: the filter threads pinned to it.
    by_cpu: Vec<Vec<usize>>,
    thread_ids: Mutex<Vec<i32>>,
    next_thread: AtomicUsize,
    next_stream: AtomicU64,
    next_chain: AtomicU64,
    shared: Arc<Shared>,
    metrics: Arc<metrics::Registry>,
    callouts: Arc<dyn Callouts>,
    root_calls: tokio::sync::mpsc::UnboundedSender<RootCall>,
    failures: AtomicU64,
    vm_restarts: AtomicU64,
    stop: Arc<AtomicBool>,
}

impl Inner {
    fn send(&self, thread: usize, job: Job) {
        self.threads[thread].push(job);
    }

    fn count_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    fn notify_queue(self: &Arc<Self>) -> Arc<dyn Fn(QueueOwner, u32) + Send + Sync> {
        let weak = Arc::downgrade(self);
        Arc::new(move |owner: QueueOwner, queue| {
            if let Some(inner) = weak.upgrade() {
                let thread = owner.thread;
                inner.send(thread, Job::QueueReady { owner, queue });
            }
        })
    }
}

/// A callout a root context made, run by the proxy side's callout thread.
pub(crate) struct RootCall {
    pub thread: usize,
    pub chain: u64,
    pub filter: usize,
    pub token: u32,
    pub call: Callout,
}

impl Inner {
    fn start_root_call(&self, call: RootCall) {
        // Gone only at shutdown.
        let _ = self.root_calls.send(call);
    }
}

/// Runs root-context callouts on a thread of its own (not sandboxed: it opens sockets), with a
/// small runtime, and sends each result back to the filter thread that asked.
fn run_root_calls(
    inner: std::sync::Weak<Inner>,
    mut calls: tokio::sync::mpsc::UnboundedReceiver<RootCall>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("root-context callouts unavailable: {e}");
            return;
        }
    };
    rt.block_on(async move {
        while let Some(rc) = calls.recv().await {
            let Some(strong) = inner.upgrade() else {
                return;
            };
            let fut = strong.callouts.call(rc.call);
            drop(strong);
            let inner = inner.clone();
            tokio::spawn(async move {
                let result = fut.await;
                if let Some(inner) = inner.upgrade() {
                    inner.send(
                        rc.thread,
                        Job::RootCallResult {
                            chain: rc.chain,
                            filter: rc.filter,
                            token: rc.token,
                            result,
                        },
                    );
                }
            });
        }
    });
}

/// The filter runtime: the wasm engine, the module cache and the sandboxed filter threads.
#[derive(Clone)]
pub struct FilterHost {
    inner: Arc<Inner>,
}

impl FilterHost {
    /// Starts `threads` filter threads (each installs the `filter` seccomp allowlist first)
    /// and the epoch ticker. Fails if the sandbox cannot be installed.
    pub fn start(threads: usize, callouts: Arc<dyn Callouts>) -> Result<Self, FilterError> {
        sandbox::check()?;
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        // Copy-on-write images need memfd_create, which the filter threads' sandbox denies;
        // data segments are copied at instantiation instead (once per VM).
        config.memory_init_cow(false);
        let engine = Engine::new(&config).map_err(|e| FilterError::Engine(format!("{e:#}")))?;
        let linker = host::linker(&engine).map_err(|e| FilterError::Engine(format!("{e:#}")))?;
        let cpus = allowed_cpus();
        let thread_cpu: Vec<Option<usize>> = (0..threads.max(1))
            .map(|i| (!cpus.is_empty()).then(|| cpus[i % cpus.len()]))
            .collect();
        let mut by_cpu = vec![Vec::new(); cpus.iter().max().map_or(0, |m| m + 1)];
        for (i, cpu) in thread_cpu.iter().enumerate() {
            if let Some(cpu) = cpu {
                by_cpu[*cpu].push(i);
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (root_calls, root_calls_rx) = tokio::sync::mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            engine: engine.clone(),
            linker,
            modules: Mutex::default(),
            threads: (0..threads.max(1)).map(|_| Default::default()).collect(),
            thread_cpu: thread_cpu.clone(),
            by_cpu,
            thread_ids: Mutex::default(),
            next_thread: AtomicUsize::new(0),
            next_stream: AtomicU64::new(1),
            next_chain: AtomicU64::new(1),
            shared: Arc::default(),
            metrics: Arc::default(),
            callouts,
            root_calls,
            failures: AtomicU64::new(0),
            vm_restarts: AtomicU64::new(0),
            stop: stop.clone(),
        });

        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("weir-callouts".into())
            .spawn(move || run_root_calls(weak, root_calls_rx))
            .map_err(|e| FilterError::Thread(e.to_string()))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<i32, String>>();
        let ticker_ready = ready_tx.clone();
        std::thread::Builder::new()
            .name("weir-epoch".into())
            .spawn(move || {
                if let Err(e) = sandbox::install(sandbox::ThreadKind::Ticker) {
                    let _ = ticker_ready.send(Err(e.to_string()));
                    return;
                }
                let _ = ticker_ready.send(Ok(unsafe { libc::gettid() }));
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .map_err(|e| FilterError::Thread(e.to_string()))?;
        for (index, &cpu) in thread_cpu.iter().enumerate() {
            let worker = Worker::new(index, inner.clone());
            let ready = ready_tx.clone();
            std::thread::Builder::new()
                .name(format!("weir-filter-{index}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_to(cpu);
                    }
                    if let Err(e) = sandbox::install(sandbox::ThreadKind::Filter) {
                        let _ = ready.send(Err(e.to_string()));
                        return;
                    }
                    let _ = ready.send(Ok(unsafe { libc::gettid() }));
                    worker.run();
                })
                .map_err(|e| FilterError::Thread(e.to_string()))?;
        }
        drop(ready_tx);
        let mut tids = Vec::new();
        for _ in 0..=threads.max(1) {
            match ready_rx.recv() {
                Ok(Ok(tid)) => tids.push(tid),
                Ok(Err(e)) => return Err(FilterError::Thread(e)),
                Err(_) => return Err(FilterError::Thread("a thread died at start".into())),
            }
        }
        *inner.thread_ids.lock().unwrap_or_else(|e| e.into_inner()) = tids;
        Ok(Self { inner })
    }

    /// Linux thread ids of the sandboxed threads (filter threads and the ticker).
    pub fn thread_ids(&self) -> Vec<i32> {
        self.inner
            .thread_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Metrics filters defined.
    pub fn metrics(&self) -> &metrics::Registry {
        &self.inner.metrics
    }

    /// Filter failures (traps, deadlines, memory) so far.
    pub fn failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// Filter VMs recreated after a failure so far.
    pub fn vm_restarts(&self) -> u64 {
        self.inner.vm_restarts.load(Ordering::Relaxed)
    }

    /// Runs `f` on every filter thread and returns what each returned (tests use it to check
    /// what the sandbox allows).
    #[doc(hidden)]
    pub fn exec_on_filter_threads<R: Send + 'static>(
        &self,
        f: impl Fn() -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let f = Arc::new(f);
        let (tx, rx) = std::sync::mpsc::channel();
        for t in 0..self.inner.threads.len() {
            let (f, tx) = (f.clone(), tx.clone());
            self.inner.send(
                t,
                Job::Exec(Box::new(move || {
                    let _ = tx.send(f());
                })),
            );
        }
        drop(tx);
        rx.iter().collect()
    }

    /// Loads (or finds in the cache, by sha256) a module and checks its digest.
    fn module(&self, config: &PluginConfig) -> Result<(Module, [u8; 32]), FilterError> {
        let path = config.module.display().to_string();
        let bytes = std::fs::read(&config.module).map_err(|error| FilterError::Read {
            path: path.clone(),
            error,
        })?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if let Some(expected) = &config.sha256 {
            let actual = hex::encode(digest);
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(FilterError::Digest {
                    path,
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        let mut cache = self.inner.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = cache.get(&digest) {
            return Ok((m.clone(), digest));
        }
        let module = Module::new(&self.inner.engine, &bytes).map_err(|e| FilterError::Compile {
            path: path.clone(),
            error: format!("{e:#}"),
        })?;
        cache.insert(digest, module.clone());
        Ok((module, digest))
    }

    /// Compiles the chain's modules and starts a VM per plugin on every filter thread
    /// (`proxy_on_vm_start`, `proxy_on_configure`). Blocks until all threads are done; an error
    /// names the plugin and the step that failed, and nothing is left installed.
    ///
    /// With `reuse`, an installed chain with the same plugins and module files is returned as
    /// is (its VMs keep their state).
    pub fn install(
        &self,
        name: &str,
        plugins: &[PluginConfig],
        reuse: Option<&Arc<Chain>>,
    ) -> Result<Arc<Chain>, FilterError> {
        let mut compiled = Vec::new();
        let mut digests = Vec::new();
        let mut modules = Vec::new();
        for config in plugins {
            let (module, digest) = self.module(config)?;
            digests.push(digest);
            modules.push(module);
        }
        if let Some(old) = reuse {
            if old.name == name && old.plugins == plugins && old.digests == digests {
                return Ok(old.clone());
            }
        }
        for (config, module) in plugins.iter().zip(modules) {
            let mut linker = self.inner.linker.clone();
            let stubbed = host::stub_unknown_imports(&mut linker, &module).map_err(|e| {
                FilterError::Compile {
                    path: config.module.display().to_string(),
                    error: format!("{e:#}"),
                }
            })?;
            if !stubbed.is_empty() {
                tracing::info!(plugin = %config.name, "imports weir does not implement (they return Unimplemented): {}", stubbed.join(", "));
            }
            let pre = linker
                .instantiate_pre(&module)
                .map_err(|e| FilterError::Compile {
                    path: config.module.display().to_string(),
                    error: format!("{e:#}"),
                })?;
            compiled.push(Arc::new(Plugin {
                config: Arc::new(config.clone()),
                pre,
            }));
        }
        let id = self.inner.next_chain.fetch_add(1, Ordering::Relaxed);
        let chain = Arc::new(Chain {
            id,
            name: name.to_owned(),
            plugins: plugins.to_vec(),
            digests,
            inner: self.inner.clone(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        for t in 0..self.inner.threads.len() {
            self.inner.send(
                t,
                Job::Install {
                    chain: id,
                    plugins: compiled.clone(),
                    done: tx.clone(),
                },
            );
        }
        drop(tx);
        for _ in 0..self.inner.threads.len() {
            match rx.recv() {
                Ok(Ok(())) => {}
                // Dropping `chain` removes what the other threads installed.
                Ok(Err(error)) => {
                    return Err(FilterError::Start {
                        chain: name.into(),
                        error,
                    })
                }
                Err(_) => {
                    return Err(FilterError::Start {
                        chain: name.into(),
                        error: "a filter thread stopped".into(),
                    })
                }
            }
        }
        Ok(chain)
    }
}

/// An installed filter chain. Dropping the last reference removes its VMs from the threads.
pub struct Chain {
    id: u64,
    name: String,
    plugins: Vec<PluginConfig>,
    digests: Vec<[u8; 32]>,
    inner: Arc<Inner>,
}

impl Chain {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugins as installed; a new config with equal plugins can keep this chain.
    pub fn plugins(&self) -> &[PluginConfig] {
        &self.plugins
    }

    /// Opens a stream on a filter thread pinned to the CPU the caller runs on, so that each
    /// phase hands the CPU over and back instead of waking another CPU (round robin over all
    /// threads when none is pinned there).
    pub fn stream(self: &Arc<Self>) -> FilterStream {
        let inner = &self.inner;
        let next = inner.next_thread.fetch_add(1, Ordering::Relaxed);
        let thread = match current_cpu().and_then(|cpu| inner.by_cpu.get(cpu)) {
            Some(local) if !local.is_empty() => local[next % local.len()],
            _ => next % inner.threads.len(),
        };
        FilterStream {
            chain: self.clone(),
            thread,
            id: self.inner.next_stream.fetch_add(1, Ordering::Relaxed),
            started: false,
            ended: false,
        }
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        for t in 0..self.inner.threads.len() {
            self.inner.send(t, Job::Remove { chain: self.id });
        }
    }
}

/// One request's pass through a filter chain. Every phase is one round trip to the stream's
/// filter thread, plus one per callout result when a filter pauses for a callout.
pub struct FilterStream {
    chain: Arc<Chain>,
    thread: usize,
    id: u64,
    started: bool,
    ended: bool,
}

impl FilterStream {
    /// Sends a phase and waits for the reply by blocking this thread. A filter callback takes
    /// microseconds (at most the callback deadline): handing the CPU straight to the filter
    /// thread pinned to it and back costs far less than going through the async scheduler,
    /// and no other task could use those microseconds anyway.
    fn send(&self, phase: Phase) -> Reply {
        let (tx, rx) = queue::reply_channel();
        self.chain.inner.send(
            self.thread,
            Job::Phase {
                stream: self.id,
                chain: self.chain.id,
                phase,
                reply: Some(tx),
            },
        );
        let local =
            self.chain.inner.thread_cpu[self.thread].is_some_and(|c| Some(c) == current_cpu());
        rx.recv(local).unwrap_or_else(|| Reply {
            outcome: Outcome::Fail("the filter thread is gone".into()),
            headers: None,
            body: None,
            calls: Vec::new(),
        })
    }

    /// Delivers a callout result without waiting (the stream did not pause for it).
    fn deliver_later(&self, token: u32, call: Callout) {
        let fut = self.chain.inner.callouts.call(call);
        let (inner, thread, stream, chain) = (
            self.chain.inner.clone(),
            self.thread,
            self.id,
            self.chain.id,
        );
        tokio::spawn(async move {
            let result = fut.await;
            inner.send(
                thread,
                Job::Phase {
                    stream,
                    chain,
                    phase: Phase::CallResult { token, result },
                    reply: None,
                },
            );
        });
    }

    /// Sends a phase, and while a filter holds the stream for callouts, runs them and
    /// delivers their results.
    async fn phase(&self, phase: Phase) -> Reply {
        let reply = self.send(phase);
        self.drive(reply).await
    }

    /// Runs the callouts of `reply` while the stream is paused for them.
    async fn drive(&self, mut reply: Reply) -> Reply {
        loop {
            let mut calls = std::mem::take(&mut reply.calls).into_iter();
            if !matches!(reply.outcome, Outcome::Paused) {
                for (token, call) in calls {
                    self.deliver_later(token, call);
                }
                return reply;
            }
            let Some((token, call)) = calls.next() else {
                return Reply {
                    outcome: Outcome::Fail(
                        "a filter paused the stream with no callout pending".into(),
                    ),
                    ..reply
                };
            };
            let result = self.chain.inner.callouts.call(call).await;
            let pending: Vec<_> = calls.collect();
            reply = self.send(Phase::CallResult { token, result });
            reply.calls.splice(0..0, pending);
        }
    }

    fn verdict<T>(reply: Reply, value: impl FnOnce(Reply) -> T) -> Verdict<T> {
        match reply.outcome {
            Outcome::Continue | Outcome::Held => Verdict::Continue(value(reply)),
            Outcome::Respond(r) => Verdict::Respond(r),
            Outcome::Close => Verdict::Close,
            Outcome::Fail(why) => Verdict::Fail(why),
            Outcome::Paused => Verdict::Fail("stream left paused".into()),
        }
    }

    /// Request headers (pseudo-headers first: `:method`, `:path`, `:authority`, `:scheme`).
    /// `Continue(Some(headers))` when filters changed them.
    pub async fn request_headers(
        &mut self,
        info: StreamInfo,
        headers: Pairs,
        end_of_stream: bool,
    ) -> Verdict<Option<Pairs>> {
        self.started = true;
        let reply = self
            .phase(Phase::RequestHeaders {
                info: Arc::new(info),
                headers,
                eos: end_of_stream,
            })
            .await;
        Self::verdict(reply, |r| r.headers)
    }

    /// A request body chunk. `Continue(None)`: the filters hold it for now.
    pub async fn request_body(
        &mut self,
        chunk: Vec<u8>,
        end_of_stream: bool,
    ) -> Verdict<Option<Vec<u8>>> {
        let reply = self
            .phase(Phase::RequestBody {
                chunk,
                eos: end_of_stream,
            })
            .await;
        Self::verdict(reply, |r| r.body)
    }

    pub async fn request_trailers(&mut self, trailers: Pairs) -> Verdict<Option<Pairs>> {
        let reply = self.phase(Phase::RequestTrailers { trailers }).await;
        Self::verdict(reply, |r| r.headers)
    }

    /// Response headers, `:status` first.
    pub async fn response_headers(
        &mut self,
        headers: Pairs,
        end_of_stream: bool,
    ) -> Verdict<Option<Pairs>> {
        let reply = self
            .phase(Phase::ResponseHeaders {
                headers,
                eos: end_of_stream,
            })
            .await;
        Self::verdict(reply, |r| r.headers)
    }

    pub async fn response_body(
        &mut self,
        chunk: Vec<u8>,
        end_of_stream: bool,
    ) -> Verdict<Option<Vec<u8>>> {
        let reply = self
            .phase(Phase::ResponseBody {
                chunk,
                eos: end_of_stream,
            })
            .await;
        Self::verdict(reply, |r| r.body)
    }

    /// [`Self::response_body`] for synchronous callers on a runtime thread (pingora's
    /// response body phase). Only a filter that pauses for a callout here needs the runtime;
    /// that rare case goes through `block_in_place`.
    pub fn response_body_blocking(
        &mut self,
        chunk: Vec<u8>,
        end_of_stream: bool,
    ) -> Verdict<Option<Vec<u8>>> {
        let mut reply = self.send(Phase::ResponseBody {
            chunk,
            eos: end_of_stream,
        });
        if matches!(reply.outcome, Outcome::Paused) {
            reply = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(self.drive(reply))
            });
        } else if !reply.calls.is_empty() {
            for (token, call) in std::mem::take(&mut reply.calls) {
                self.deliver_later(token, call);
            }
        }
        Self::verdict(reply, |r| r.body)
    }

    pub async fn response_trailers(&mut self, trailers: Pairs) -> Verdict<Option<Pairs>> {
        let reply = self.phase(Phase::ResponseTrailers { trailers }).await;
        Self::verdict(reply, |r| r.headers)
    }

    /// Ends the stream: `proxy_on_log`, `proxy_on_done`, `proxy_on_delete`, run by the filter
    /// thread with its next job (or within a few milliseconds when idle). Does not wait.
    pub fn end(&mut self) {
        if self.started && !self.ended {
            self.ended = true;
            self.chain.inner.threads[self.thread].push_quiet(Job::End { stream: self.id });
        }
    }
}

/// One filter thread per CPU this process may run on: every proxy thread then finds one pinned
/// to its CPU.
pub fn default_threads() -> usize {
    allowed_cpus().len().max(1)
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread to `cpu` (a failure leaves it unpinned, which costs speed only).
fn pin_to(cpu: usize) {
    // SAFETY: as above; sched_setaffinity reads the set.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        tracing::warn!(
            cpu,
            "pinning a filter thread: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The CPU the calling thread runs on now (vDSO, no system call).
fn current_cpu() -> Option<usize> {
    // SAFETY: no arguments, no memory.
    usize::try_from(unsafe { libc::sched_getcpu() }).ok()
}

impl Drop for FilterStream {
    fn drop(&mut self) {
        self.end();
    }
}

impl FilterHost {
    /// Stops the filter threads and the ticker (they live as long as the host otherwise, which
    /// for weir is the process).
    pub fn shutdown(&self) {
        for t in 0..self.inner.threads.len() {
            self.inner.send(t, Job::Stop);
        }
        self.inner.stop.store(true, Ordering::Relaxed);
    }
}

// The proxy keeps streams in its per-request context and the host in shared state.
const _: () = {
    const fn is<T: Send + Sync>() {}
    is::<FilterStream>();
    is::<FilterHost>();
};
