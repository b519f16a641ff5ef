//! Active health checks: HTTP `GET` or the gRPC health protocol, per endpoint, on the
//! cluster's interval. Results flip `EndpointState::healthy` after the configured thresholds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use weir_policies::snapshot::{HealthCheck, HealthCheckKind};

use crate::state::{now_ms, EndpointState, SharedRuntime};

/// How often the checker looks for endpoints that are due.
const TICK: Duration = Duration::from_millis(50);

/// The next `(healthy, successes, failures)` after one check that `passed` or not.
pub fn next_state(
    healthy: bool,
    successes: u32,
    failures: u32,
    passed: bool,
    hc: &HealthCheck,
) -> (bool, u32, u32) {
    if passed {
        let successes = successes.saturating_add(1);
        (healthy || successes >= hc.healthy_threshold, successes, 0)
    } else {
        let failures = failures.saturating_add(1);
        (healthy && failures < hc.unhealthy_threshold, 0, failures)
    }
}

/// The background service running every cluster's health checks.
pub struct HealthChecker {
    runtime: SharedRuntime,
    http: Client<HttpConnector, Empty<Bytes>>,
    grpc: Mutex<HashMap<SocketAddr, Channel>>,
}

impl HealthChecker {
    pub fn new(runtime: SharedRuntime) -> Self {
        Self {
            runtime,
            http: Client::builder(TokioExecutor::new()).build_http(),
            grpc: Mutex::default(),
        }
    }

    fn tick(&self) {
        let rt = self.runtime.load();
        let now = now_ms();
        for (cluster, state) in rt.snapshot.clusters.iter().zip(&rt.clusters) {
            let Some(hc) = &cluster.health_check else {
                // Without active checks an endpoint counts as healthy (e.g. after a reload
                // removed the health check).
                for e in &state.endpoints {
                    e.healthy.store(true, Ordering::Relaxed);
                }
                continue;
            };
            for e in &state.endpoints {
                if now < e.next_check.load(Ordering::Relaxed)
                    || e.checking.swap(true, Ordering::AcqRel)
                {
                    continue;
                }
                e.next_check
                    .store(now + hc.interval.as_millis() as u64, Ordering::Relaxed);
                let probe = self.probe(e.address, hc);
                let (e, hc, cluster) = (e.clone(), hc.clone(), cluster.name.clone());
                tokio::spawn(async move {
                    let passed = matches!(tokio::time::timeout(hc.timeout, probe).await, Ok(true));
                    apply(&e, &hc, passed, &cluster);
                    e.checking.store(false, Ordering::Release);
                });
            }
        }
    }

    fn probe(
        &self,
        addr: SocketAddr,
        hc: &HealthCheck,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> {
        match &hc.kind {
            HealthCheckKind::Http {
                path,
                host,
                expected_statuses,
            } => {
                let req = http::Request::get(format!("http://{addr}{path}"))
                    .header(
                        http::header::HOST,
                        host.clone().unwrap_or_else(|| addr.to_string()),
                    )
                    .header(http::header::USER_AGENT, "weir-health-check")
                    .body(Empty::new());
                let client = self.http.clone();
                let expected = expected_statuses.clone();
                Box::pin(async move {
                    let Ok(req) = req else { return false };
                    match client.request(req).await {
                        Ok(resp) => expected.contains(&resp.status().as_u16()),
                        Err(_) => false,
                    }
                })
            }
            HealthCheckKind::Grpc { service } => {
                let channel = self.grpc_channel(addr, hc.timeout);
                let service = service.clone();
                Box::pin(async move {
                    let Some(channel) = channel else { return false };
                    let mut client = HealthClient::new(channel);
                    match client.check(HealthCheckRequest { service }).await {
                        Ok(resp) => resp.into_inner().status == ServingStatus::Serving as i32,
                        Err(_) => false,
                    }
                })
            }
        }
    }

    fn grpc_channel(&self, addr: SocketAddr, connect_timeout: Duration) -> Option<Channel> {
        let mut channels = self.grpc.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(&addr) {
            return Some(c.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(connect_timeout)
            .connect_lazy();
        channels.insert(addr, channel.clone());
        Some(channel)
    }
}

fn apply(e: &EndpointState, hc: &HealthCheck, passed: bool, cluster: &str) {
    let was = e.healthy.load(Ordering::Relaxed);
    let (healthy, s, f) = next_state(
        was,
        e.check_successes.load(Ordering::Relaxed),
        e.check_failures.load(Ordering::Relaxed),
        passed,
        hc,
    );
    e.check_successes.store(s, Ordering::Relaxed);
    e.check_failures.store(f, Ordering::Relaxed);
    e.healthy.store(healthy, Ordering::Relaxed);
    if was != healthy {
        tracing::warn!(cluster, endpoint = %e.address, healthy, "health changed");
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(TICK) => self.tick(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc(unhealthy: u32, healthy: u32) -> HealthCheck {
        HealthCheck {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: unhealthy,
            healthy_threshold: healthy,
            kind: HealthCheckKind::Grpc {
                service: String::new(),
            },
        }
    }

    #[test]
    fn thresholds_flip_health_both_ways() {
        let h = hc(2, 3);
        let s = next_state(true, 0, 0, false, &h);
        assert_eq!(s, (true, 0, 1));
        let s = next_state(s.0, s.1, s.2, false, &h);
        assert_eq!(s, (false, 0, 2));
        let s = next_state(s.0, s.1, s.2, true, &h);
        assert_eq!(s, (false, 1, 0));
        let s = next_state(s.0, s.1, s.2, true, &h);
        let s = next_state(s.0, s.1, s.2, true, &h);
        assert_eq!(s, (true, 3, 0));
    }
}
