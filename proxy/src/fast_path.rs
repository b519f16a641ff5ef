//! The eBPF sockmap fast path in the running proxy: attached at start when the config asks
//! for it (`fast_path: sockmap`) and the process may load BPF, otherwise logged and left off;
//! its scope follows the config (listener ports and the ports policy adds, plus this process's
//! own connections to local upstreams); its state and
//! counters are on the admin endpoint (`/ebpf`, `/stats/prometheus`). With
//! `fast_path.outbound`, apps' outbound connects are captured to a listener of this proxy, and
//! an `original_dst` cluster sends each request where its connection was going.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::json;
use weir_policies::model::FastPathMode;
use weir_policies::Snapshot;

use crate::metrics::write_plain;
use crate::state::SharedRuntime;

/// The fast path's state in this proxy.
pub struct FastPathState {
    attached: Mutex<Option<weir_ebpf::FastPath>>,
    /// Why the configured fast path is not attached.
    unavailable: Option<String>,
    configured: bool,
    /// Captured connections' original destinations (read without the lock, per request).
    original: Option<weir_ebpf::OriginalDestinations>,
}

/// What `fast_path.outbound` asks of the programs (`None`: no capture). Validation made sure
/// the listener is an IPv4 address; one on 0.0.0.0 is reached on 127.0.0.1.
pub fn outbound(snapshot: &Snapshot) -> Option<weir_ebpf::Outbound> {
    let out = snapshot.source.fast_path.as_ref()?.outbound()?;
    let SocketAddr::V4(listener) = out.listener.parse().ok()? else {
        return None;
    };
    let listener = if listener.ip().is_unspecified() {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, listener.port())
    } else {
        listener
    };
    let ports = if out.ports.is_empty() {
        weir_ebpf::Ports::AllBut(out.exclude_ports.iter().copied().collect())
    } else {
        weir_ebpf::Ports::Only(out.ports.iter().copied().collect())
    };
    Some(weir_ebpf::Outbound { listener, ports })
}

/// The addresses local to this node besides loopback: the node's interface addresses (IPv4
/// and IPv6) and those the config adds (pods on the node, for a node proxy).
pub fn addresses(snapshot: &Snapshot) -> BTreeSet<IpAddr> {
    let interfaces = if_addrs::get_if_addrs()
        .map_err(|e| tracing::warn!("listing interface addresses: {e}"))
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip());
    let configured = snapshot
        .source
        .fast_path
        .iter()
        .flat_map(|f| f.addresses().iter().copied());
    interfaces
        .chain(configured)
        .filter(|a| !a.is_loopback())
        .collect()
}

/// The ports whose local connections go through the fast path whoever makes them: every
/// listener's, and those the config adds (app-to-app traffic that policy allows). weir's own
/// upstream connections need no port: the programs know them by this process's id.
pub fn ports(snapshot: &Snapshot) -> BTreeSet<u16> {
    let listeners = snapshot.listeners.iter().map(|l| l.address.port());
    let allowed = snapshot
        .source
        .fast_path
        .iter()
        .flat_map(|f| f.ports().iter().copied());
    listeners.chain(allowed).collect()
}

impl FastPathState {
    /// Attaches the fast path if `snapshot` asks for it; logs why not when it cannot.
    pub fn start(snapshot: &Snapshot) -> Arc<Self> {
        let config = snapshot.source.fast_path.as_ref();
        let configured = config.is_some_and(|f| f.mode() == FastPathMode::Sockmap);
        if !configured {
            return Arc::new(Self {
                attached: Mutex::new(None),
                unavailable: None,
                configured,
                original: None,
            });
        }
        let cgroup = config
            .and_then(|f| f.cgroup().map(|p| p.to_path_buf()))
            .unwrap_or_else(weir_ebpf::default_cgroup);
        let attached = weir_ebpf::FastPath::attach(&cgroup).and_then(|mut f| {
            f.set_proxy_pid(std::process::id())?;
            f.set_ports(ports(snapshot))?;
            f.set_addresses(addresses(snapshot))?;
            f.set_outbound(outbound(snapshot))?;
            Ok(f)
        });
        let (attached, unavailable) = match attached {
            Ok(f) => {
                tracing::info!(cgroup = %cgroup.display(), ports = ?f.ports(), addresses = ?f.addresses(), outbound = ?f.outbound(), "sockmap fast path attached");
                (Some(f), None)
            }
            Err(e) => {
                tracing::warn!("sockmap fast path unavailable, running without it: {e}");
                (None, Some(e.to_string()))
            }
        };
        let original = attached.as_ref().map(|f| f.original_destinations());
        Arc::new(Self {
            attached: Mutex::new(attached),
            unavailable,
            configured,
            original,
        })
    }

    /// Where the connection from `peer` was going before outbound capture sent it here;
    /// `None` when it was not captured (or the fast path is off).
    pub fn original_destination(&self, peer: SocketAddr) -> Option<SocketAddr> {
        match (peer, &self.original) {
            (SocketAddr::V4(peer), Some(original)) => original.get(peer).map(SocketAddr::V4),
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<weir_ebpf::FastPath>> {
        self.attached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the scope in line with `snapshot`.
    fn follow(&self, snapshot: &Snapshot) {
        if let Some(f) = self.lock().as_mut() {
            let local = addresses(snapshot);
            let want = ports(snapshot);
            let capture = outbound(snapshot);
            if *f.ports() != want || *f.addresses() != local || f.outbound() != capture.as_ref() {
                match f
                    .set_ports(want)
                    .and_then(|()| f.set_addresses(local))
                    .and_then(|()| f.set_outbound(capture))
                {
                    Ok(()) => {
                        tracing::info!(ports = ?f.ports(), addresses = ?f.addresses(), outbound = ?f.outbound(), "sockmap fast path scope")
                    }
                    Err(e) => tracing::warn!("sockmap fast path scope not updated: {e}"),
                }
            }
        }
    }

    /// What `/ebpf` shows.
    pub fn status(&self) -> serde_json::Value {
        let attached = self.lock();
        let mode = if self.configured { "sockmap" } else { "off" };
        match attached.as_ref() {
            None => json!({
                "mode": mode,
                "attached": false,
                "reason": self.unavailable.clone().unwrap_or_else(|| "not configured (fast_path: sockmap)".into()),
            }),
            Some(f) => {
                let counters = f.counters().map(|c| {
                    c.fields()
                        .iter()
                        .map(|(name, _, v)| (name.to_string(), json!(v)))
                        .collect::<serde_json::Map<_, _>>()
                });
                let outbound = f.outbound().map(|o| {
                    let (key, ports) = match &o.ports {
                        weir_ebpf::Ports::Only(p) => ("ports", p),
                        weir_ebpf::Ports::AllBut(p) => ("exclude_ports", p),
                    };
                    json!({
                        "listener": o.listener.to_string(),
                        key: ports,
                        "open_connections": self.original.as_ref().map_or(0, |d| d.len()),
                    })
                });
                json!({
                    "mode": mode,
                    "attached": true,
                    "programs": weir_ebpf::PROGRAMS_ATTACHED,
                    "outbound": outbound,
                    "cgroup": f.cgroup().display().to_string(),
                    "ports": f.ports(),
                    "addresses": f.addresses(),
                    "sockets": f.sockets(),
                    "counters": counters.map_or_else(|e| json!({"error": e.to_string()}), serde_json::Value::Object),
                })
            }
        }
    }

    /// The fast path's Prometheus metrics.
    pub fn render(&self, out: &mut String) {
        let attached = self.lock();
        write_plain(
            out,
            "gauge",
            "weir_sockmap_attached",
            "Whether the eBPF sockmap fast path is attached.",
            u8::from(attached.is_some()),
        );
        let Some(f) = attached.as_ref() else { return };
        write_plain(
            out,
            "gauge",
            "weir_sockmap_sockets",
            "Sockets in the fast path's sockhash now.",
            f.sockets(),
        );
        if let Ok(c) = f.counters() {
            for (name, help, v) in c.fields() {
                write_plain(
                    out,
                    "counter",
                    &format!("weir_sockmap_{name}_total"),
                    help,
                    v,
                );
            }
        }
    }
}

/// Keeps the fast path's scope in line with the config as it reloads.
pub struct ScopeSync {
    pub state: Arc<FastPathState>,
    pub runtime: SharedRuntime,
}

#[async_trait]
impl BackgroundService for ScopeSync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if self.state.lock().is_none() {
            return;
        }
        let mut seen = String::new();
        loop {
            let rt = self.runtime.load_full();
            if rt.snapshot.version != seen {
                seen = rt.snapshot.version.clone();
                self.state.follow(&rt.snapshot);
            }
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        // Detach at shutdown: accelerated connections finish on their own.
        self.state.lock().take();
    }
}
