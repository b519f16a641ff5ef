//! Inference traffic: which model a request asks for, choosing a replica of an inference pool
//! for it (load, prefix and LoRA affinity, queueing), the weight-reload state machine, and the
//! jobs that feed them (metrics scrapes, readiness polls, warm-ups, reload signals).

pub mod driver;
pub mod load;
pub mod model;
pub mod picker;
pub mod pool;
pub mod reload;
pub mod usage;
