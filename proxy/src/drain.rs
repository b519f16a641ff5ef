//! Graceful shutdown, shared by every listener: on SIGTERM, `/ready` turns 503, listeners stop
//! accepting, and the process exits as soon as the requests in flight have finished, or when
//! the drain deadline passes, whichever comes first.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

/// Counts requests in flight and whether the process is draining.
#[derive(Default)]
pub struct Drain {
    in_flight: AtomicUsize,
    draining: AtomicBool,
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one request until the returned guard drops.
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Starts draining: from now on the process exits once nothing is in flight, or at
    /// `deadline` (pingora's grace period, which ends the process too).
    fn start(self: &Arc<Self>, deadline: Duration) {
        self.draining.store(true, Ordering::Relaxed);
        let drain = self.clone();
        std::thread::spawn(move || {
            let end = Instant::now() + deadline;
            // Let the listeners stop first, so a request accepted just now is counted.
            std::thread::sleep(Duration::from_millis(100));
            while drain.in_flight() > 0 && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            tracing::info!(left = drain.in_flight(), "drain finished, exiting");
            std::process::exit(0);
        });
    }
}

/// A request in flight; see [`Drain::track`].
pub struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// pingora's shutdown signal source: SIGTERM drains, SIGINT stops at once.
pub struct DrainSignal {
    pub drain: Arc<Drain>,
    pub deadline: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for DrainSignal {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers; SIGTERM will not drain");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {
                tracing::info!(in_flight = self.drain.in_flight(), deadline = ?self.deadline, "SIGTERM: draining");
                self.drain.start(self.deadline);
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => ShutdownSignal::FastShutdown,
        }
    }
}
