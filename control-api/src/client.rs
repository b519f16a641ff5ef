//! The proxy's side of the discovery stream: connect, apply pushes atomically, ACK or NACK,
//! reconnect with backoff when the control plane goes away.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;
use weir_policies::model::Config;

use crate::pb::discovery_client::DiscoveryClient;
use crate::pb::{DiscoveryRequest, DiscoveryResponse, ErrorDetail, Node};
use crate::resources::ResourceSet;

/// Largest push a proxy accepts; a bigger one ends the stream with an error.
pub const MAX_PUSH_BYTES: usize = 64 << 20;

/// Where and who the proxy is.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `http://host:port`
    pub url: String,
    pub node: Node,
    pub token: Option<String>,
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
    let mut client = DiscoveryClient::new(channel).max_decoding_message_size(MAX_PUSH_BYTES);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(opts.node.clone()),
        version_info: version.to_string(),
        ..Default::default()
    })
    .await
    .map_err(|_| "request channel closed".to_string())?;
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = &opts.token {
        let value: MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the token is not a valid header value".to_string())?;
        req.metadata_mut().insert("authorization", value);
    }
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

/// Follows the control plane forever: every push is applied to the current resources, turned
/// into a config and handed to `apply`; success is ACKed, failure NACKed with its text (and
/// the previous resources kept). Reconnects with exponential backoff (100 ms to 5 s).
pub async fn run<F>(opts: ClientOptions, mut current: Applied, mut apply: F)
where
    F: FnMut(&str, Config) -> Result<(), String> + Send,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match open(&opts, &current.version).await {
            Err(e) => tracing::warn!("control plane: {e}; retrying in {backoff:?}"),
            Ok((tx, mut stream)) => {
                tracing::info!(url = %opts.url, "control plane stream open");
                loop {
                    let resp = match stream.message().await {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            tracing::warn!("control plane closed the stream");
                            break;
                        }
                        Err(s) => {
                            tracing::warn!("control plane stream: {}: {}", s.code(), s.message());
                            break;
                        }
                    };
                    backoff = Duration::from_millis(100);
                    let nonce = resp.nonce.clone();
                    let version = resp.version_info.clone();
                    let mut candidate = current.resources.clone();
                    let result = candidate
                        .apply(resp.full_state, resp.resources, &resp.removed)
                        .and_then(|()| {
                            if version == current.version && candidate == current.resources {
                                Ok(())
                            } else {
                                candidate.to_config().and_then(|c| apply(&version, c))
                            }
                        });
                    let answer = match result {
                        Ok(()) => {
                            current = Applied {
                                version: version.clone(),
                                resources: candidate,
                            };
                            DiscoveryRequest {
                                version_info: version,
                                response_nonce: nonce,
                                ..Default::default()
                            }
                        }
                        Err(e) => {
                            tracing::error!(%version, "rejected push, keeping {}: {e}", current.version);
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
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
