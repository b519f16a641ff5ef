//! The proxy's side of the discovery stream: connect, apply pushes atomically, ACK or NACK,
//! reconnect with backoff when the control plane goes away.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use weir_policies::model::{self, Config};

use crate::pb::discovery_client::DiscoveryClient;
use crate::pb::{DiscoveryRequest, DiscoveryResponse, ErrorDetail, Node};
use crate::resources::{ResourceSet, ENDPOINTS};

/// Largest push a proxy accepts; a bigger one ends the stream with an error.
pub const MAX_PUSH_BYTES: usize = 64 << 20;

/// Where and who the proxy is.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `http://host:port`
    pub url: String,
    pub node: Node,
    pub token: Option<String>,
    /// Largest push accepted ([`MAX_PUSH_BYTES`] normally); a bigger one ends the stream
    /// with an error and the proxy keeps its config.
    pub max_push_bytes: usize,
}

/// A push as the proxy applies it.
#[derive(Debug)]
pub enum Update {
    /// The whole config.
    Full(Config),
    /// Only these clusters' endpoints changed (the config is otherwise the current one).
    Endpoints(Vec<(String, Vec<model::Endpoint>)>),
}

/// What the proxy runs now: the resources and the control plane's version for them.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub version: String,
    pub resources: ResourceSet,
}

async fn open(
    opts: &ClientOptions,
    version: &str,
) -> Result<
    (
        mpsc::Sender<DiscoveryRequest>,
        tonic::Streaming<DiscoveryResponse>,
    ),
    String,
> {
    let channel = Endpoint::from_shared(opts.url.clone())
        .map_err(|e| format!("bad control plane URL {:?}: {e}", opts.url))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", opts.url))?;
    let mut client = DiscoveryClient::new(channel).max_decoding_message_size(opts.max_push_bytes);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(opts.node.clone()),
        version_info: version.to_string(),
        ..Default::default()
    })
    .await
    .map_err(|_| "request channel closed".to_string())?;
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    crate::auth::authorize(&mut req, opts.token.as_deref())?;
    let stream = client
        .stream(req)
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    Ok((tx, stream))
}

/// Connects once and returns the first push applied to an empty set (for start-up), without
/// ACKing it: the long-running [`run`] stream does that.
pub async fn fetch_initial(opts: &ClientOptions) -> Result<(Applied, Config), String> {
    let (_tx, mut stream) = open(opts, "").await?;
    let resp = stream
        .message()
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .ok_or("the control plane closed the stream before the first push")?;
    let mut applied = Applied::default();
    applied
        .resources
        .apply(resp.full_state, resp.resources, &resp.removed)?;
    applied.version = resp.version_info;
    let config = applied.resources.to_config()?;
    Ok((applied, config))
}

/// Applies `resp` to `current` and hands the result to `apply`: endpoint-only deltas as
/// [`Update::Endpoints`] (in place, O(change)), everything else as a whole config. On failure
/// `current` is left as it was.
fn handle<F>(current: &mut Applied, resp: DiscoveryResponse, apply: &mut F) -> Result<(), String>
where
    F: FnMut(&str, Update) -> Result<(), String>,
{
    let version = resp.version_info;
    let endpoints_only = !resp.full_state
        && resp.removed.is_empty()
        && !resp.resources.is_empty()
        && resp.resources.iter().all(|r| r.r#type == ENDPOINTS);
    if endpoints_only {
        let names: Vec<String> = resp.resources.iter().map(|r| r.name.clone()).collect();
        let undo = current.resources.apply_in_place(resp.resources)?;
        let result = names
            .into_iter()
            .map(|n| {
                let eps = current
                    .resources
                    .endpoints(&n)
                    .ok_or_else(|| format!("no endpoints for {n:?}"))?;
                Ok((n, eps))
            })
            .collect::<Result<Vec<_>, String>>()
            .and_then(|changes| apply(&version, Update::Endpoints(changes)));
        match result {
            Ok(()) => current.version = version,
            Err(_) => current.resources.undo(undo),
        }
        return result;
    }
    let mut candidate = current.resources.clone();
    candidate.apply(resp.full_state, resp.resources, &resp.removed)?;
    if version != current.version || candidate != current.resources {
        apply(&version, Update::Full(candidate.to_config()?))?;
    }
    // The resources replaced (at 10,000 routes, ms of freeing) go after the ACK.
    drop_later(std::mem::replace(
        current,
        Applied {
            version,
            resources: candidate,
        },
    ));
    Ok(())
}

/// Drops the state a push replaced where its freeing does not delay the ACK or requests
/// ([`weir_policies::drop_later`]).
pub use weir_policies::drop_later;

/// Where the proxy's discovery stream stands, for metrics and the admin endpoint; [`run`]
/// keeps it current.
#[derive(Debug, Default)]
pub struct StreamStatus {
    inner: Mutex<StreamState>,
}

/// A copy of [`StreamStatus`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamState {
    /// The stream is open now.
    pub connected: bool,
    /// Streams opened since start (1 plus the reconnects).
    pub streams_opened: u64,
    /// Why the last attempt to connect, or the last open stream, failed.
    pub last_stream_error: Option<String>,
    /// Pushes ACKed and NACKed since start.
    pub acks: u64,
    pub nacks: u64,
    /// The version of the last push ACKed (the config this proxy runs).
    pub acked_version: Option<String>,
    /// The newest push, when it was NACKed: its version and the reason. Cleared by the next ACK.
    pub rejected: Option<Rejected>,
}

/// A push the proxy refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejected {
    pub version: String,
    pub error: String,
}

impl StreamStatus {
    pub fn get(&self) -> StreamState {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StreamState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn disconnected(&self, error: String) {
        let mut s = self.lock();
        s.connected = false;
        s.last_stream_error = Some(error);
    }
}

/// Follows the control plane forever: every push is applied (see [`Update`]) and handed to
/// `apply`; success is ACKed, failure NACKed with its text (and the previous state kept).
/// Reconnects with exponential backoff (100 ms to 5 s). `status` follows along.
pub async fn run<F>(
    opts: ClientOptions,
    mut current: Applied,
    status: Arc<StreamStatus>,
    mut apply: F,
) where
    F: FnMut(&str, Update) -> Result<(), String> + Send,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match open(&opts, &current.version).await {
            Err(e) => {
                tracing::warn!("control plane: {e}; retrying in {backoff:?}");
                status.disconnected(e);
            }
            Ok((tx, mut stream)) => {
                tracing::info!(url = %opts.url, "control plane stream open");
                {
                    let mut s = status.lock();
                    s.connected = true;
                    s.streams_opened += 1;
                }
                loop {
                    let resp = match stream.message().await {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            tracing::warn!("control plane closed the stream");
                            status.disconnected("the control plane closed the stream".into());
                            break;
                        }
                        Err(s) => {
                            let e = format!("{}: {}", s.code(), s.message());
                            tracing::warn!("control plane stream: {e}");
                            status.disconnected(e);
                            break;
                        }
                    };
                    backoff = Duration::from_millis(100);
                    let nonce = resp.nonce.clone();
                    let version = resp.version_info.clone();
                    let answer = match handle(&mut current, resp, &mut apply) {
                        Ok(()) => {
                            let mut s = status.lock();
                            s.acks += 1;
                            s.acked_version = Some(version.clone());
                            s.rejected = None;
                            DiscoveryRequest {
                                version_info: version,
                                response_nonce: nonce,
                                ..Default::default()
                            }
                        }
                        Err(e) => {
                            tracing::error!(%version, "rejected push, keeping {}: {e}", current.version);
                            let mut s = status.lock();
                            s.nacks += 1;
                            s.rejected = Some(Rejected {
                                version: version.clone(),
                                error: e.clone(),
                            });
                            drop(s);
                            DiscoveryRequest {
                                version_info: current.version.clone(),
                                response_nonce: nonce,
                                error_detail: Some(ErrorDetail {
                                    code: tonic::Code::InvalidArgument as i32,
                                    message: e,
                                }),
                                ..Default::default()
                            }
                        }
                    };
                    if tx.send(answer).await.is_err() {
                        status.disconnected("the stream's request side closed".into());
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
