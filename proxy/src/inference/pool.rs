//! The live state of an inference pool: per endpoint, each model's place in the reload cycle
//! and the load the endpoint last reported; and the requests waiting for a replica. The
//! decisions are the pure [`super::picker`] and [`super::reload`]; this module holds their
//! inputs, applies signals and wakes waiters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use weir_policies::snapshot::InferencePool;

use super::load::LoadSample;
use super::picker::{self, Load, ModelState, Need, Pick, Replica, ServedModel, Weights};
use super::reload::{Action, Phase, Reload, Signal};
use crate::state::{EndpointLoad, EndpointState};

/// Where a signal about a reload came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The control API or the admin endpoint: an orchestrator said so.
    Explicit,
    /// Readiness polling saw the model go unready.
    Poll,
}

/// One model on one endpoint.
#[derive(Clone, Debug)]
pub struct ModelSlot {
    pub name: String,
    pub adapters: Vec<String>,
    pub reload: Reload,
    /// Who started the reload in progress; only polling may end a reload polling started
    /// (Triton stays "ready" during an explicit reload).
    pub origin: Origin,
}

/// One endpoint of a pool.
pub struct PoolEndpoint {
    pub address: SocketAddr,
    pub metrics_address: SocketAddr,
    /// The pool cluster's endpoint: `active` counts the streams weir has open to it.
    pub state: Arc<EndpointState>,
    pub max_in_flight: u32,
    pub models: Mutex<Vec<ModelSlot>>,
    pub reported: Mutex<Reported>,
    /// Raised when a drain deadline passes with streams still open: streams that started
    /// before end at their next message.
    pub cut: Arc<AtomicU64>,
}

/// What the endpoint said about itself (metrics scrape, ORCA headers).
#[derive(Clone, Debug, Default)]
pub struct Reported {
    pub queue_depth: u32,
    pub kv_cache: f64,
    pub loaded_adapters: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PoolEndpoint {
    pub fn in_flight(&self) -> u32 {
        self.state.active.load(Ordering::Relaxed)
    }

    pub fn models(&self) -> MutexGuard<'_, Vec<ModelSlot>> {
        lock(&self.models)
    }

    pub fn reported(&self) -> MutexGuard<'_, Reported> {
        lock(&self.reported)
    }

    /// Folds a load report in.
    pub fn report(&self, sample: &LoadSample) {
        let mut r = self.reported();
        let mut load = Load {
            queue_depth: r.queue_depth,
            kv_cache: r.kv_cache,
            ..Load::default()
        };
        sample.apply(&mut load);
        r.queue_depth = load.queue_depth;
        r.kv_cache = load.kv_cache;
        if let Some(adapters) = &sample.adapters {
            r.loaded_adapters.clone_from(adapters);
        }
    }

    /// The model's version now, if the endpoint serves it.
    pub fn version(&self, model: &str) -> Option<String> {
        self.models()
            .iter()
            .find(|m| m.name == model)
            .map(|m| m.reload.version.clone())
    }

    fn replica(&self) -> Replica {
        let reported = self.reported().clone();
        Replica {
            models: self
                .models()
                .iter()
                .map(|m| ServedModel {
                    name: m.name.clone(),
                    version: Some(m.reload.version.clone()).filter(|v| !v.is_empty()),
                    adapters: m.adapters.clone(),
                    state: m.reload.model_state(),
                })
                .collect(),
            loaded_adapters: reported.loaded_adapters,
            load: Load {
                in_flight: self.in_flight(),
                max_in_flight: self.max_in_flight,
                queue_depth: reported.queue_depth,
                kv_cache: reported.kv_cache,
            },
        }
    }
}

/// An inference pool's live state. Survives config reloads for endpoints that stay.
pub struct PoolState {
    pub name: String,
    pub endpoints: Vec<Arc<PoolEndpoint>>,
    pub weights: Weights,
    /// Requests waiting for a replica now.
    pub waiting: Arc<AtomicU32>,
    /// Woken whenever a replica may have become free: a stream ended, a reload moved on.
    pub changed: Arc<Notify>,
    pub counters: Arc<PoolCounters>,
}

/// Totals for `/stats/prometheus`.
#[derive(Default)]
pub struct PoolCounters {
    pub queued: AtomicU64,
    pub shed: AtomicU64,
    pub reload_waits: AtomicU64,
    pub unknown_model: AtomicU64,
    pub streams_cut: AtomicU64,
    /// Requests whose client left while they waited for a replica.
    pub abandoned: AtomicU64,
}

impl PoolState {
    /// The state for `pool`, whose cluster endpoints are `states` (same order), keeping what
    /// `previous` knew about endpoints and models that stay.
    pub fn new(
        pool: &InferencePool,
        states: &[Arc<EndpointState>],
        previous: Option<&PoolState>,
    ) -> Self {
        let endpoints = pool
            .endpoints
            .iter()
            .zip(states)
            .map(|(e, state)| {
                let old =
                    previous.and_then(|p| p.endpoints.iter().find(|o| o.address == e.address));
                let old_models = old.map(|o| o.models().clone()).unwrap_or_default();
                let models = e
                    .models
                    .iter()
                    .map(|m| {
                        old_models
                            .iter()
                            .find(|o| o.name == m.name)
                            .map(|o| ModelSlot {
                                adapters: m.adapters.clone(),
                                ..o.clone()
                            })
                            .unwrap_or_else(|| ModelSlot {
                                name: m.name.clone(),
                                adapters: m.adapters.clone(),
                                reload: Reload::serving(m.version.as_deref().unwrap_or("")),
                                origin: Origin::Explicit,
                            })
                    })
                    .collect();
                Arc::new(PoolEndpoint {
                    address: e.address,
                    metrics_address: e.metrics_address,
                    state: state.clone(),
                    max_in_flight: e.max_in_flight,
                    models: Mutex::new(models),
                    reported: Mutex::new(old.map(|o| o.reported().clone()).unwrap_or_default()),
                    cut: old.map_or_else(|| Arc::new(AtomicU64::new(0)), |o| o.cut.clone()),
                })
            })
            .collect();
        Self {
            name: pool.name.clone(),
            endpoints,
            weights: pool.picker,
            waiting: previous.map_or_else(Default::default, |p| p.waiting.clone()),
            changed: previous.map_or_else(Default::default, |p| p.changed.clone()),
            counters: previous.map_or_else(Default::default, |p| p.counters.clone()),
        }
    }

    /// Picks now, without waiting. Endpoints in `avoid` (tried already) count as draining.
    pub fn pick(&self, need: &Need, avoid: &[usize]) -> Pick {
        let mut replicas: Vec<Replica> = self.endpoints.iter().map(|e| e.replica()).collect();
        for i in avoid {
            if let Some(r) = replicas.get_mut(*i) {
                for m in &mut r.models {
                    m.state = ModelState::Draining;
                }
            }
        }
        picker::pick(need, &replicas, &self.weights)
    }

    /// Resolves what a request named: a model of the pool, or a LoRA adapter of one (as vLLM
    /// serves adapters under their own names). `None`: no endpoint knows the name.
    pub fn resolve(&self, name: &str) -> Option<(String, Option<String>)> {
        for e in &self.endpoints {
            for m in e.models().iter() {
                if m.name == name {
                    return Some((name.to_string(), None));
                }
                if m.adapters.iter().any(|a| a == name) {
                    return Some((m.name.clone(), Some(name.to_string())));
                }
            }
        }
        None
    }

    /// Every model and LoRA adapter the pool's endpoints serve, sorted, each once: the
    /// adapter with its model (OpenAI's `parent`).
    pub fn models(&self) -> Vec<(String, Option<String>)> {
        let mut all = std::collections::BTreeMap::new();
        for e in &self.endpoints {
            for m in e.models().iter() {
                all.entry(m.name.clone()).or_insert(None);
                for a in &m.adapters {
                    all.entry(a.clone()).or_insert_with(|| Some(m.name.clone()));
                }
            }
        }
        all.into_iter().collect()
    }

    /// Applies a signal about `model` on endpoint `index`; returns what the caller must do
    /// (warm-ups to send). Wakes waiters when the endpoint may take requests again.
    pub fn signal(
        &self,
        index: usize,
        model: &str,
        signal: Signal,
        origin: Origin,
    ) -> Result<Vec<Action>, String> {
        let e = self
            .endpoints
            .get(index)
            .ok_or_else(|| format!("pool {:?} has no endpoint {index}", self.name))?;
        let in_flight = e.in_flight();
        let actions = {
            let mut models = e.models();
            let slot = models.iter_mut().find(|m| m.name == model).ok_or_else(|| {
                format!(
                    "endpoint {} of pool {:?} does not serve model {model:?}",
                    e.address, self.name
                )
            })?;
            // Polling does not end a reload it did not start.
            let ends = matches!(signal, Signal::Finished { .. } | Signal::Failed { .. });
            if origin == Origin::Poll && ends && slot.origin != Origin::Poll {
                return Ok(Vec::new());
            }
            if matches!(signal, Signal::Start { .. }) && slot.reload.phase == Phase::Serving {
                slot.origin = origin;
            }
            let before = slot.reload.phase.clone();
            let actions = slot.reload.on(signal, Instant::now(), in_flight);
            if before != slot.reload.phase {
                tracing::info!(pool = %self.name, endpoint = %e.address, model, from = ?before, to = ?slot.reload.phase, version = %slot.reload.version, "reload state");
            }
            actions
        };
        self.after(e, &actions);
        Ok(actions)
    }

    /// Lets time pass for every reload in progress (drains end when streams close or at their
    /// deadline). Returns nothing to do: ending streams is handled here.
    pub fn tick(&self) {
        let now = Instant::now();
        for e in &self.endpoints {
            let in_flight = e.in_flight();
            let actions: Vec<Action> = e
                .models()
                .iter_mut()
                .flat_map(|m| m.reload.tick(now, in_flight))
                .collect();
            self.after(e, &actions);
        }
    }

    fn after(&self, e: &PoolEndpoint, actions: &[Action]) {
        for a in actions {
            match a {
                Action::EndRemainingStreams => {
                    e.cut.fetch_add(1, Ordering::AcqRel);
                    self.counters
                        .streams_cut
                        .fetch_add(u64::from(e.in_flight()), Ordering::Relaxed);
                }
                Action::Serving { .. } => self.changed.notify_waiters(),
                Action::SendWarmup => {}
            }
        }
    }

    /// The version a new request for `model` runs on under the pool's `split` (version,
    /// weight): one of the split's versions some endpoint serves now, by weight; `None` when
    /// none of them is being served.
    pub fn split_version(&self, model: &str, split: &[(String, u32)]) -> Option<String> {
        let serving: Vec<String> = self
            .endpoints
            .iter()
            .filter_map(|e| {
                e.models()
                    .iter()
                    .find(|m| m.name == model && m.reload.phase == Phase::Serving)
                    .map(|m| m.reload.version.clone())
            })
            .collect();
        pick_weighted(
            split.iter().filter(|(v, _)| serving.contains(v)),
            fastrand::u32(..),
        )
    }

    /// Whether any model of any endpoint is mid-reload (the driver ticks faster then).
    pub fn reloading(&self) -> bool {
        self.endpoints
            .iter()
            .any(|e| e.models().iter().any(|m| m.reload.phase != Phase::Serving))
    }
}

/// A stream's hold on a pool endpoint: counts it in flight, and wakes waiting requests when
/// it ends.
pub struct Lease {
    load: Option<EndpointLoad>,
    changed: Arc<Notify>,
    /// The endpoint's `cut` when the stream started.
    pub cut_at: u64,
    pub endpoint: Arc<PoolEndpoint>,
}

impl Lease {
    pub fn new(pool: &PoolState, index: usize) -> Self {
        let endpoint = pool.endpoints[index].clone();
        Self {
            load: Some(EndpointLoad::new(&endpoint.state)),
            changed: pool.changed.clone(),
            cut_at: endpoint.cut.load(Ordering::Acquire),
            endpoint,
        }
    }

    /// Whether a drain deadline ended this stream.
    pub fn is_cut(&self) -> bool {
        self.endpoint.cut.load(Ordering::Acquire) != self.cut_at
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.load.take());
        self.changed.notify_waiters();
    }
}

/// Why a request got no replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoReplica {
    /// The queue is full or the wait ran out: 429 / RESOURCE_EXHAUSTED.
    Shed,
    /// Every replica of the model stayed mid-reload for the whole wait: 503 / UNAVAILABLE.
    Reloading,
    /// No replica serves it: 404 / NOT_FOUND.
    UnknownModel,
    /// The request's own deadline (the route's `timeout`, a gRPC client's `grpc-timeout`)
    /// passed first: 504 / DEADLINE_EXCEEDED, as any other timeout of the request.
    DeadlineExceeded,
}

/// Waits (bounded by the pool's queue and reload settings and `deadline`) for a replica that
/// can take `need`, and leases it.
pub async fn acquire(
    pool: &PoolState,
    cfg: &InferencePool,
    need: &Need<'_>,
    deadline: Option<Instant>,
) -> Result<(usize, Lease), NoReplica> {
    let start = Instant::now();
    let mut counted: Option<WaitSlot> = None;
    loop {
        let notified = pool.changed.notified();
        tokio::pin!(notified);
        // Registered before the pick, so a stream ending in between still wakes us.
        notified.as_mut().enable();
        let (limit, outcome) = match pool.pick(need, &[]) {
            Pick::Replica(i) => return Ok((i, Lease::new(pool, i))),
            Pick::UnknownModel => {
                pool.counters.unknown_model.fetch_add(1, Ordering::Relaxed);
                return Err(NoReplica::UnknownModel);
            }
            Pick::Queue => (cfg.queue.max_wait, NoReplica::Shed),
            Pick::WaitForReload => (cfg.reload.max_wait, NoReplica::Reloading),
        };
        if counted.is_none() {
            match WaitSlot::take(&pool.waiting, cfg.queue.max_waiting) {
                Some(slot) => {
                    let counter = if outcome == NoReplica::Shed {
                        &pool.counters.queued
                    } else {
                        &pool.counters.reload_waits
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    counted = Some(slot);
                }
                None => {
                    pool.counters.shed.fetch_add(1, Ordering::Relaxed);
                    return Err(NoReplica::Shed);
                }
            }
        }
        let mut until = start + limit;
        if let Some(d) = deadline {
            until = until.min(d);
        }
        let now = Instant::now();
        if now >= until {
            if deadline.is_some_and(|d| d < start + limit) {
                return Err(NoReplica::DeadlineExceeded);
            }
            if outcome == NoReplica::Shed {
                pool.counters.shed.fetch_add(1, Ordering::Relaxed);
            }
            return Err(outcome);
        }
        // Also wake now and then: load reports change without a notification.
        let nap = (until - now).min(Duration::from_millis(50));
        let _ = tokio::time::timeout(nap, notified).await;
    }
}

/// A place in the pool's queue, given back on drop.
struct WaitSlot(Arc<AtomicU32>);

impl WaitSlot {
    fn take(counter: &Arc<AtomicU32>, limit: u32) -> Option<Self> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(counter.clone()))
    }
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The entry of `items` (version, weight) that `roll` falls on, each taking a share of the
/// total weight in order.
fn pick_weighted<'a>(
    items: impl Iterator<Item = &'a (String, u32)> + Clone,
    roll: u32,
) -> Option<String> {
    let total: u64 = items.clone().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut at = u64::from(roll) % total;
    for (v, w) in items {
        if at < u64::from(*w) {
            return Some(v.clone());
        }
        at -= u64::from(*w);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::pick_weighted;

    #[test]
    fn weighted_pick_gives_each_entry_its_share() {
        let split = [("1".to_string(), 3), ("2".to_string(), 1)];
        let picks: Vec<Option<String>> = (0..4).map(|r| pick_weighted(split.iter(), r)).collect();
        assert_eq!(
            picks,
            ["1", "1", "1", "2"].map(|v| Some(v.to_string())).to_vec()
        );
        assert_eq!(pick_weighted(split[1..].iter(), 12345), Some("2".into()));
        assert_eq!(pick_weighted([].iter(), 7), None);
        let zero = [("1".to_string(), 0)];
        assert_eq!(pick_weighted(zero.iter(), 7), None);
    }
}
