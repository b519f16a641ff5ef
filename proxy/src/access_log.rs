//! The access log: the proxy formats one JSON line per request at its end and hands it to a
//! writer thread through a bounded queue. A full queue drops the line and counts it; a
//! request never waits for the log. The writer flushes whenever the queue runs dry. It
//! counts a line before it writes it, so a reader of the file never sees more lines than
//! `weir_access_log_lines_total` says.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use serde_json::Value;
use weir_policies::model::{AccessLog as Config, AccessLogField};

/// The running access log.
pub struct AccessLog {
    tx: SyncSender<String>,
    /// Lines the writer has taken from the queue to write.
    pub written: Arc<AtomicU64>,
    pub dropped: AtomicU64,
}

/// What a finished request offers to its log line; each field is taken only when configured.
pub struct Entry<'a> {
    pub listener: &'a str,
    pub route: &'a str,
    pub cluster: &'a str,
    pub upstream: Option<String>,
    pub tries: u32,
    pub downstream: Option<String>,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub status: u16,
    /// gRPC calls only.
    pub grpc_status: Option<u32>,
    pub duration_ms: f64,
    pub request_bytes: usize,
    pub response_bytes: usize,
    pub user_agent: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub model: Option<&'a str>,
    pub model_version: Option<&'a str>,
    pub usage: Option<crate::inference::usage::Usage>,
    pub error: Option<String>,
}

impl AccessLog {
    /// Opens the log `config` names and starts its writer thread.
    pub fn start(config: &Config) -> std::io::Result<Arc<Self>> {
        let out: Box<dyn Write + Send> = if config.path == "stdout" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&config.path)?,
            )
        };
        let (tx, rx) = sync_channel(config.buffer as usize);
        let written = Arc::new(AtomicU64::new(0));
        let count = written.clone();
        std::thread::Builder::new()
            .name("weir-access-log".into())
            .spawn(move || write_lines(rx, out, &count))?;
        Ok(Arc::new(Self {
            tx,
            written,
            dropped: AtomicU64::new(0),
        }))
    }

    /// Queues the line for `entry` with `fields`; drops it when the queue is full.
    pub fn log(&self, fields: &[AccessLogField], entry: &Entry<'_>) {
        let line = format_line(fields, entry);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The access log's Prometheus metrics.
    pub fn render(&self, out: &mut String) {
        use crate::metrics::write_plain;
        write_plain(
            out,
            "counter",
            "weir_access_log_lines_total",
            "Access log lines written (counted as the writer takes them).",
            self.written.load(Ordering::Relaxed),
        );
        write_plain(
            out,
            "counter",
            "weir_access_log_dropped_total",
            "Access log lines dropped because the writer was behind.",
            self.dropped.load(Ordering::Relaxed),
        );
    }
}

fn write_lines(rx: Receiver<String>, out: Box<dyn Write + Send>, written: &AtomicU64) {
    let mut out = std::io::BufWriter::with_capacity(64 << 10, out);
    while let Ok(line) = rx.recv() {
        let mut next = Some(line);
        while let Some(line) = next {
            written.fetch_add(1, Ordering::Relaxed);
            if out
                .write_all(line.as_bytes())
                .and_then(|()| out.write_all(b"\n"))
                .is_err()
            {
                // A log that cannot be written must not take the proxy down; keep draining.
                break;
            }
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
    }
}

/// The JSON line for `entry` with `fields`, in order.
pub fn format_line(fields: &[AccessLogField], e: &Entry<'_>) -> String {
    use AccessLogField as F;
    let mut line = String::with_capacity(64 * fields.len());
    line.push('{');
    for (i, f) in fields.iter().enumerate() {
        let (key, value): (&str, Value) = match f {
            F::Time => (
                "time",
                humantime::format_rfc3339_millis(std::time::SystemTime::now())
                    .to_string()
                    .into(),
            ),
            F::Listener => ("listener", e.listener.into()),
            F::Route => ("route", e.route.into()),
            F::Cluster => ("cluster", e.cluster.into()),
            F::Upstream => ("upstream", e.upstream.clone().into()),
            F::Tries => ("tries", e.tries.into()),
            F::Downstream => ("downstream", e.downstream.clone().into()),
            F::Method => ("method", e.method.into()),
            F::Authority => ("authority", e.authority.into()),
            F::Path => ("path", e.path.into()),
            F::Protocol => ("protocol", e.protocol.into()),
            F::Status => ("status", e.status.into()),
            F::GrpcStatus => ("grpc_status", e.grpc_status.into()),
            F::DurationMs => (
                "duration_ms",
                ((e.duration_ms * 1000.0).round() / 1000.0).into(),
            ),
            F::RequestBytes => ("request_bytes", e.request_bytes.into()),
            F::ResponseBytes => ("response_bytes", e.response_bytes.into()),
            F::UserAgent => ("user_agent", e.user_agent.into()),
            F::RequestId => ("request_id", e.request_id.into()),
            F::Model => ("model", e.model.into()),
            F::ModelVersion => ("model_version", e.model_version.into()),
            F::InputTokens => ("input_tokens", e.usage.map(|u| u.input).into()),
            F::OutputTokens => ("output_tokens", e.usage.map(|u| u.output).into()),
            F::Error => ("error", e.error.clone().into()),
        };
        if i > 0 {
            line.push(',');
        }
        // Keys are fixed ASCII; values are escaped by serde_json.
        line.push('"');
        line.push_str(key);
        line.push_str("\":");
        line.push_str(&value.to_string());
    }
    line.push('}');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            listener: "main",
            route: "api",
            cluster: "backend",
            upstream: Some("127.0.0.1:8080".into()),
            tries: 2,
            downstream: Some("127.0.0.1:50000".into()),
            method: "POST",
            authority: "example.com",
            path: "/v1/x?y=1",
            protocol: "HTTP/1.1",
            status: 200,
            grpc_status: None,
            duration_ms: 1.23456,
            request_bytes: 10,
            response_bytes: 20,
            user_agent: Some("curl/8"),
            request_id: None,
            model: None,
            model_version: None,
            usage: None,
            error: None,
        }
    }

    #[test]
    fn a_line_has_the_configured_fields_in_order() {
        use AccessLogField as F;
        let line = format_line(
            &[
                F::Method,
                F::Path,
                F::Status,
                F::DurationMs,
                F::Tries,
                F::RequestId,
            ],
            &entry(),
        );
        assert_eq!(
            line,
            r#"{"method":"POST","path":"/v1/x?y=1","status":200,"duration_ms":1.235,"tries":2,"request_id":null}"#
        );
        let v: Value = serde_json::from_str(&format_line(&[F::Time], &entry())).unwrap();
        let t = v["time"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(t).is_ok(), "{t}");
    }
}
