//! Live weight reload of one model on one replica, as a pure state machine:
//! `Serving(version) → Draining → Reloading → Warming → Serving(new version)`.
//!
//! Signals come from the control API (`start`, `finished(version)`, `failed`), from readiness
//! polling and from `x-weight-version` response headers; time passes through [`Reload::tick`].
//! The proxy applies the returned [`Action`]s (stop routing, end streams past the drain
//! deadline, send the warm-up request). No I/O here.

use std::time::{Duration, Instant};

use super::picker::ModelState;

/// Where the replica's copy of the model is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// No new streams; in-flight ones run until they end or the deadline passes.
    Draining {
        deadline: Instant,
    },
    /// Drained; the replica is loading new weights.
    Reloading,
    /// New weights loaded; the warm-up request decides.
    Warming {
        version: String,
    },
}

/// A signal about the replica's model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signal {
    /// A reload begins: drain for at most `drain`.
    Start { drain: Duration },
    /// The replica has loaded `version`.
    Finished { version: String },
    /// The reload failed; the replica kept (or went back to) its old weights.
    Failed { reason: String },
    /// The warm-up request's outcome.
    Warmup { ok: bool },
    /// A response said it was produced by weights `version` (`x-weight-version`).
    Observed { version: String },
}

/// What the proxy must do after a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Streams still open at the drain deadline: end them (retry on another replica those
    /// that have not sent a byte yet).
    EndRemainingStreams,
    /// Send the pool's warm-up request to this replica.
    SendWarmup,
    /// The replica serves `version` now.
    Serving { version: String },
}

/// One model on one replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reload {
    pub phase: Phase,
    /// The weights it serves (or served before the reload began).
    pub version: String,
    /// Why the last reload failed, if it did.
    pub last_error: Option<String>,
}

impl Reload {
    pub fn serving(version: &str) -> Self {
        Self {
            phase: Phase::Serving,
            version: version.into(),
            last_error: None,
        }
    }

    /// The picker's view: only `Serving` takes new streams.
    pub fn model_state(&self) -> ModelState {
        match self.phase {
            Phase::Serving => ModelState::Serving,
            Phase::Draining { .. } => ModelState::Draining,
            Phase::Reloading => ModelState::Reloading,
            Phase::Warming { .. } => ModelState::Warming,
        }
    }

    /// Applies `signal` at `now`, with `in_flight` streams open to the replica.
    pub fn on(&mut self, signal: Signal, now: Instant, in_flight: u32) -> Vec<Action> {
        match (&self.phase, signal) {
            (Phase::Serving, Signal::Start { drain }) => {
                self.last_error = None;
                self.phase = Phase::Draining {
                    deadline: now + drain,
                };
                self.tick(now, in_flight)
            }
            // A repeated start changes nothing: the drain already runs or is done.
            (_, Signal::Start { .. }) => Vec::new(),
            // `finished` may come before the drain is over (the orchestrator did not wait) or
            // while reloading; either way the new weights are in: warm up.
            (Phase::Draining { .. } | Phase::Reloading, Signal::Finished { version }) => {
                let mut actions = Vec::new();
                if in_flight > 0 {
                    actions.push(Action::EndRemainingStreams);
                }
                self.phase = Phase::Warming { version };
                actions.push(Action::SendWarmup);
                actions
            }
            (Phase::Warming { version }, Signal::Warmup { ok: true }) => {
                self.version = version.clone();
                self.phase = Phase::Serving;
                vec![Action::Serving {
                    version: self.version.clone(),
                }]
            }
            (Phase::Warming { .. }, Signal::Warmup { ok: false }) => {
                self.last_error = Some("warm-up request failed".into());
                self.phase = Phase::Reloading;
                Vec::new()
            }
            (
                Phase::Draining { .. } | Phase::Reloading | Phase::Warming { .. },
                Signal::Failed { reason },
            ) => {
                self.last_error = Some(reason);
                self.phase = Phase::Serving;
                vec![Action::Serving {
                    version: self.version.clone(),
                }]
            }
            // Weights changed without a signal (a reload we were not told about): believe
            // the replica.
            (Phase::Serving, Signal::Observed { version }) if version != self.version => {
                self.version = version.clone();
                vec![Action::Serving { version }]
            }
            _ => Vec::new(),
        }
    }

    /// Lets time pass: a drain ends when the last stream closes or at its deadline.
    pub fn tick(&mut self, now: Instant, in_flight: u32) -> Vec<Action> {
        match self.phase {
            Phase::Draining { .. } if in_flight == 0 => {
                self.phase = Phase::Reloading;
                Vec::new()
            }
            Phase::Draining { deadline } if now >= deadline => {
                self.phase = Phase::Reloading;
                vec![Action::EndRemainingStreams]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRAIN: Duration = Duration::from_secs(30);

    #[test]
    fn a_reload_drains_reloads_warms_up_and_serves_the_new_version() {
        let t0 = Instant::now();
        let mut r = Reload::serving("v1");
        assert_eq!(r.on(Signal::Start { drain: DRAIN }, t0, 3), vec![]);
        assert_eq!(r.model_state(), ModelState::Draining);
        // Streams end on their own before the deadline: nothing is cut.
        assert_eq!(r.tick(t0 + Duration::from_secs(5), 1), vec![]);
        assert_eq!(r.tick(t0 + Duration::from_secs(6), 0), vec![]);
        assert_eq!(r.phase, Phase::Reloading);
        assert_eq!(
            r.on(
                Signal::Finished {
                    version: "v2".into()
                },
                t0 + Duration::from_secs(40),
                0
            ),
            vec![Action::SendWarmup]
        );
        assert_eq!(r.model_state(), ModelState::Warming);
        assert_eq!(r.version, "v1", "still v1 until warmed up");
        assert_eq!(
            r.on(Signal::Warmup { ok: true }, t0, 0),
            vec![Action::Serving {
                version: "v2".into()
            }]
        );
        assert_eq!(
            (r.model_state(), r.version.as_str()),
            (ModelState::Serving, "v2")
        );
    }

    #[test]
    fn the_drain_deadline_ends_streams_that_are_still_open() {
        let t0 = Instant::now();
        let mut r = Reload::serving("v1");
        r.on(Signal::Start { drain: DRAIN }, t0, 2);
        assert_eq!(r.tick(t0 + DRAIN - Duration::from_millis(1), 2), vec![]);
        assert_eq!(r.tick(t0 + DRAIN, 2), vec![Action::EndRemainingStreams]);
        assert_eq!(r.phase, Phase::Reloading);
        let mut idle = Reload::serving("v1");
        idle.on(Signal::Start { drain: DRAIN }, t0, 0);
        assert_eq!(idle.phase, Phase::Reloading, "nothing to drain");
    }

    #[test]
    fn failures_go_back_to_the_old_weights_and_say_why() {
        let t0 = Instant::now();
        let mut r = Reload::serving("v1");
        r.on(Signal::Start { drain: DRAIN }, t0, 0);
        assert_eq!(
            r.on(
                Signal::Failed {
                    reason: "OOM loading shard 3".into()
                },
                t0,
                0
            ),
            vec![Action::Serving {
                version: "v1".into()
            }]
        );
        assert_eq!(r.last_error.as_deref(), Some("OOM loading shard 3"));
        r.on(Signal::Start { drain: DRAIN }, t0, 0);
        r.on(
            Signal::Finished {
                version: "v2".into(),
            },
            t0,
            0,
        );
        assert_eq!(r.on(Signal::Warmup { ok: false }, t0, 0), vec![]);
        assert_eq!(
            r.model_state(),
            ModelState::Reloading,
            "a failed warm-up does not serve"
        );
        r.on(
            Signal::Finished {
                version: "v2".into(),
            },
            t0,
            0,
        );
        r.on(Signal::Warmup { ok: true }, t0, 0);
        assert_eq!(r.version, "v2");
    }

    #[test]
    fn early_finish_repeated_start_and_observed_versions() {
        let t0 = Instant::now();
        let mut r = Reload::serving("v1");
        r.on(Signal::Start { drain: DRAIN }, t0, 4);
        assert_eq!(
            r.on(Signal::Start { drain: DRAIN }, t0, 4),
            vec![],
            "idempotent"
        );
        assert_eq!(
            r.on(
                Signal::Finished {
                    version: "v2".into()
                },
                t0,
                4
            ),
            vec![Action::EndRemainingStreams, Action::SendWarmup],
            "finished before the drain ended"
        );
        r.on(Signal::Warmup { ok: true }, t0, 0);
        assert_eq!(
            r.on(
                Signal::Observed {
                    version: "v2".into()
                },
                t0,
                0
            ),
            vec![]
        );
        assert_eq!(
            r.on(
                Signal::Observed {
                    version: "v3".into()
                },
                t0,
                0
            ),
            vec![Action::Serving {
                version: "v3".into()
            }],
            "a reload nobody announced"
        );
        // Signals out of turn change nothing.
        let mut s = Reload::serving("v1");
        assert_eq!(
            s.on(
                Signal::Finished {
                    version: "v9".into()
                },
                t0,
                0
            ),
            vec![]
        );
        assert_eq!(s.on(Signal::Warmup { ok: true }, t0, 0), vec![]);
        assert_eq!(s, Reload::serving("v1"));
    }
}
