//! The live state the data path reads: one immutable [`Snapshot`] plus per-cluster and
//! per-endpoint counters. A config reload builds a new [`Runtime`] and swaps it in; endpoint
//! state (health, load, ejection) carries over for endpoints that stay.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use weir_policies::model::{LbPolicy, SimpleLb};
use weir_policies::Snapshot;

use crate::inference::pool::PoolState;
use crate::lb::{self, Candidate, Ring};
use crate::outlier::{self, Verdict};

/// Milliseconds since the process started; compact enough for atomics.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The state every request reads once at its start.
pub struct Runtime {
    pub snapshot: Arc<Snapshot>,
    /// Same order as `snapshot.clusters`.
    pub clusters: Vec<Arc<ClusterState>>,
    /// Installed filter chains, same order as `snapshot.filter_chains`.
    pub filter_chains: Vec<Arc<weir_filters::Chain>>,
    /// Inference pool state, same order as `snapshot.pools`.
    pub pools: Vec<Arc<PoolState>>,
    /// Same order as `snapshot.routes`.
    pub routes: Vec<RouteState>,
}

/// What requests on one route share while the config stands.
#[derive(Default)]
pub struct RouteState {
    /// The server span's `weir.route`, encoded by the first traced request.
    pub(crate) trace_attrs: OnceLock<crate::telemetry::Attrs>,
}

/// Where the current [`Runtime`] lives; readers never block writers.
pub type SharedRuntime = Arc<ArcSwap<Runtime>>;

impl Runtime {
    /// Builds the runtime for `snapshot`, reusing endpoint state from `previous` for endpoints
    /// with the same cluster name and address. `filter_chains` are the snapshot's chains as
    /// installed ([`crate::filters::Filters::install`]).
    pub fn new(
        snapshot: Arc<Snapshot>,
        previous: Option<&Runtime>,
        filter_chains: Vec<Arc<weir_filters::Chain>>,
    ) -> Self {
        let clusters = snapshot
            .clusters
            .iter()
            .map(|c| {
                let old = previous.and_then(|p| p.clusters.iter().find(|o| o.name == c.name));
                let endpoints = c
                    .endpoints
                    .iter()
                    .map(|e| {
                        old.and_then(|o| o.endpoints.iter().find(|x| x.address == e.address))
                            .cloned()
                            .unwrap_or_else(|| Arc::new(EndpointState::new(e.address)))
                    })
                    .collect::<Vec<_>>();
                let ring = match &c.lb {
                    LbPolicy::RingHash { .. } => Some(Ring::new(
                        &c.endpoints
                            .iter()
                            .map(|e| (e.address, e.weight))
                            .collect::<Vec<_>>(),
                    )),
                    _ => None,
                };
                Arc::new(ClusterState {
                    name: c.name.clone(),
                    weights: c.endpoints.iter().map(|e| e.weight).collect(),
                    endpoints,
                    ring,
                    rr: AtomicU64::new(fastrand::u64(..)),
                    active_requests: old.map_or_else(
                        || Arc::new(AtomicU32::new(0)),
                        |o| o.active_requests.clone(),
                    ),
                    active_retries: old
                        .map_or_else(|| Arc::new(AtomicU32::new(0)), |o| o.active_retries.clone()),
                    trace_attrs: OnceLock::new(),
                })
            })
            .collect::<Vec<Arc<ClusterState>>>();
        let pools = snapshot
            .pools
            .iter()
            .map(|p| {
                let old = previous.and_then(|r| r.pools.iter().find(|o| o.name == p.name));
                Arc::new(PoolState::new(
                    p,
                    &clusters[p.cluster].endpoints,
                    old.map(|o| &**o),
                ))
            })
            .collect();
        let routes = snapshot
            .routes
            .iter()
            .map(|_| RouteState::default())
            .collect();
        Self {
            snapshot,
            clusters,
            filter_chains,
            pools,
            routes,
        }
    }
}

/// One cluster's live state.
pub struct ClusterState {
    pub name: String,
    pub endpoints: Vec<Arc<EndpointState>>,
    /// Same order as `endpoints`.
    pub weights: Vec<u32>,
    ring: Option<Ring>,
    rr: AtomicU64,
    /// Shared across reloads so circuit-breaker limits hold while old requests finish.
    pub active_requests: Arc<AtomicU32>,
    pub active_retries: Arc<AtomicU32>,
    /// The server span's `weir.cluster`, encoded by the first traced request.
    pub(crate) trace_attrs: OnceLock<crate::telemetry::Attrs>,
}

impl ClusterState {
    fn candidates(&self, now: u64, avoid: &[usize]) -> Vec<Candidate> {
        self.endpoints
            .iter()
            .zip(&self.weights)
            .enumerate()
            .map(|(i, (e, w))| Candidate {
                weight: *w,
                active: e.active.load(Ordering::Relaxed),
                available: e.is_available(now) && !avoid.contains(&i),
            })
            .collect()
    }

    /// Picks an endpoint by `policy`. Endpoints in `avoid` (already tried by this request) are
    /// used only if nothing else is available. `hash_key` feeds ring hash.
    pub fn pick(
        &self,
        policy: &LbPolicy,
        hash_key: Option<&[u8]>,
        avoid: &[usize],
    ) -> Option<usize> {
        let now = now_ms();
        let mut cands = self.candidates(now, avoid);
        if !cands.iter().any(|c| c.available) && !avoid.is_empty() {
            cands = self.candidates(now, &[]);
        }
        match (policy, &self.ring, hash_key) {
            (LbPolicy::RingHash { .. }, Some(ring), Some(key)) => {
                ring.pick(lb::hash_of(key), &cands)
            }
            (LbPolicy::Simple(SimpleLb::LeastRequest), ..) => {
                lb::least_request(&cands, fastrand::u64(..), fastrand::u64(..))
            }
            _ => lb::round_robin(&cands, self.rr.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// Endpoints currently ejected by outlier detection.
    pub fn ejected_count(&self) -> usize {
        let now = now_ms();
        self.endpoints.iter().filter(|e| e.is_ejected(now)).count()
    }
}

/// One endpoint's live state, shared by every runtime that contains it.
pub struct EndpointState {
    pub address: SocketAddr,
    pub active: AtomicU32,
    /// Active health: false once `unhealthy_threshold` checks failed in a row.
    pub healthy: AtomicBool,
    pub(crate) check_successes: AtomicU32,
    pub(crate) check_failures: AtomicU32,
    /// `now_ms()` of the next active health check, and whether one is running.
    pub(crate) next_check: AtomicU64,
    pub(crate) checking: AtomicBool,
    consecutive_failures: AtomicU32,
    times_ejected: AtomicU32,
    /// `now_ms()` until which the endpoint is ejected; 0 when it is not.
    ejected_until: AtomicU64,
    /// Upstream connections opened to the endpoint, and requests sent on a pooled one.
    pub connections_opened: AtomicU64,
    pub connections_reused: AtomicU64,
    /// Upstream connections to the endpoint open now, pooled or in use (see [`OpenConnections`]).
    pub connections_open: AtomicU64,
    /// The endpoint's Prometheus series, looked up on its first response: a lookup formats
    /// the address and hashes every label, per request.
    pub(crate) series: std::sync::OnceLock<EndpointSeries>,
    /// The attributes of every client span to the endpoint, encoded on its first traced
    /// attempt ([`crate::telemetry::Attrs::endpoint`]).
    pub(crate) trace_attrs: std::sync::OnceLock<crate::telemetry::Attrs>,
}

/// An endpoint's request duration histogram and its responses by class: `1xx` to `5xx`, then
/// `none` (no response).
pub(crate) struct EndpointSeries {
    pub duration: prometheus::Histogram,
    by_class: [prometheus::IntCounter; 6],
}

impl EndpointSeries {
    pub const CLASSES: [&'static str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

    pub fn new(metrics: &crate::metrics::Metrics, cluster: &str, address: SocketAddr) -> Self {
        let addr = address.to_string();
        Self {
            duration: metrics
                .endpoint_duration
                .with_label_values(&[cluster, addr.as_str()]),
            by_class: Self::CLASSES.map(|class| {
                metrics
                    .endpoint_responses
                    .with_label_values(&[cluster, addr.as_str(), class])
            }),
        }
    }

    /// The responses counter of `status` (0: none).
    pub fn responses(&self, status: u16) -> &prometheus::IntCounter {
        match status {
            100..=599 => &self.by_class[usize::from(status / 100 - 1)],
            _ => &self.by_class[5],
        }
    }
}

impl EndpointState {
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            active: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            check_successes: AtomicU32::new(0),
            check_failures: AtomicU32::new(0),
            next_check: AtomicU64::new(0),
            checking: AtomicBool::new(false),
            consecutive_failures: AtomicU32::new(0),
            times_ejected: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            connections_opened: AtomicU64::new(0),
            connections_reused: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            series: std::sync::OnceLock::new(),
            trace_attrs: std::sync::OnceLock::new(),
        }
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    pub fn is_available(&self, now: u64) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.is_ejected(now)
    }

    /// Feeds one result into outlier detection (no-op for clusters without it).
    pub fn record_result(
        &self,
        cluster: &ClusterState,
        cfg: Option<&weir_policies::model::OutlierDetection>,
        failed: bool,
    ) {
        let Some(cfg) = cfg else { return };
        if !failed {
            // The common case, kept off the O(endpoints) ejection count below.
            self.consecutive_failures.store(0, Ordering::Relaxed);
            return;
        }
        let verdict = outlier::judge(
            cfg,
            failed,
            self.consecutive_failures.load(Ordering::Relaxed),
            self.times_ejected.load(Ordering::Relaxed),
            cluster.ejected_count(),
            cluster.endpoints.len(),
        );
        match verdict {
            Verdict::Keep {
                consecutive_failures,
            } => self
                .consecutive_failures
                .store(consecutive_failures, Ordering::Relaxed),
            Verdict::Eject(d) => {
                self.consecutive_failures.store(0, Ordering::Relaxed);
                self.times_ejected.fetch_add(1, Ordering::Relaxed);
                self.ejected_until
                    .store(now_ms() + d.as_millis() as u64, Ordering::Relaxed);
                tracing::warn!(endpoint = %self.address, cluster = %cluster.name, ejected_for = ?d, "outlier ejected");
            }
        }
    }

    /// Time left in the current ejection.
    pub fn ejected_for(&self) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let now = now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }
}

/// Counts an endpoint's open upstream connections. Set on the peer of every attempt, pingora
/// keeps it with the connection it opens and calls it once when the connection is up and once
/// when it is dropped: closed by either side, or evicted from the pool.
pub struct OpenConnections(pub Arc<EndpointState>);

impl std::fmt::Debug for OpenConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OpenConnections({})", self.0.address)
    }
}

impl pingora::upstreams::peer::Tracing for OpenConnections {
    fn on_connected(&self) {
        self.0.connections_open.fetch_add(1, Ordering::Relaxed);
    }

    fn on_disconnected(&self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    fn boxed_clone(&self) -> Box<dyn pingora::upstreams::peer::Tracing> {
        Box::new(Self(self.0.clone()))
    }
}

/// Increments a counter now and decrements it when dropped.
pub struct Gauge(Arc<AtomicU32>);

impl Gauge {
    /// Increments unless that would exceed `limit`; `None` when the limit is reached.
    pub fn try_acquire(counter: &Arc<AtomicU32>, limit: u32) -> Option<Self> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(counter.clone()))
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a request in flight on an endpoint for least-request balancing.
pub struct EndpointLoad(Arc<EndpointState>);

impl EndpointLoad {
    pub fn new(e: &Arc<EndpointState>) -> Self {
        e.active.fetch_add(1, Ordering::AcqRel);
        Self(e.clone())
    }
}

impl Drop for EndpointLoad {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}
