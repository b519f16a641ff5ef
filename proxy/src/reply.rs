//! Replies weir writes itself (no route, no healthy upstream, timeouts...), as plain HTTP or as
//! gRPC trailers-only responses, and the status each upstream error maps to.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::protocols::http::HttpTask;
use pingora::proxy::Session;
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::grpc;

/// The HTTP status for a failed request, or 0 when the client is gone and nothing can be sent.
pub fn status_for_error(etype: &ErrorType, source: &ErrorSource) -> u16 {
    use ErrorType::*;
    if let HTTPStatus(code) = etype {
        return *code;
    }
    match source {
        ErrorSource::Upstream => match etype {
            ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError
            | ConnectProxyFailure | BindError | SocketError => 503,
            ReadTimedout | WriteTimedout => 504,
            _ => 502,
        },
        ErrorSource::Downstream => match etype {
            ReadError | WriteError | ConnectionClosed => 0,
            ReadTimedout => 408,
            _ => 400,
        },
        ErrorSource::Internal | ErrorSource::Unset => 500,
    }
}

/// A short reason for a local reply, shown to HTTP clients and as `grpc-message`.
pub fn reason(status: u16, etype: &ErrorType) -> &'static str {
    match (status, etype) {
        (503, ErrorType::HTTPStatus(_)) => "no healthy upstream",
        (503, _) => "upstream connect error",
        (504, _) => "upstream request timeout",
        (502, _) => "upstream reset or protocol error",
        (400, _) => "bad request",
        (404, _) => "no route",
        _ => "error",
    }
}

/// Writes a complete reply: for gRPC clients an HTTP 200 trailers-only response carrying the
/// mapped `grpc-status`, otherwise `status` with `message` as a text body.
pub async fn send(
    session: &mut Session,
    grpc: bool,
    status: u16,
    message: &str,
    extra: &[(&str, &str)],
) -> Result<()> {
    let mut resp;
    let body;
    if grpc {
        resp = ResponseHeader::build(200, Some(4))?;
        resp.insert_header("content-type", "application/grpc")?;
        resp.insert_header("grpc-status", grpc::status_for_http(status).to_string())?;
        resp.insert_header("grpc-message", message)?;
        body = None;
    } else {
        resp = ResponseHeader::build(status, Some(3))?;
        resp.insert_header("content-type", "text/plain")?;
        resp.insert_header("content-length", (message.len() + 1).to_string())?;
        body = Some(Bytes::from(format!("{message}\n")));
    }
    for (k, v) in extra {
        resp.insert_header(k.to_string(), *v)?;
    }
    write(session, resp, body).await
}

/// Writes a reply a filter asked for (`proxy_send_local_response`), as Envoy does: for gRPC
/// clients a trailers-only response with the filter's gRPC status (or one mapped from the HTTP
/// status) and the body as `grpc-message`; otherwise the status, the filter's headers and the
/// body, `text/plain` unless the filter set a content type.
pub async fn send_local(
    session: &mut Session,
    grpc: bool,
    r: &weir_filters::LocalResponse,
) -> Result<()> {
    let mut resp;
    let mut body = None;
    if grpc {
        resp = ResponseHeader::build(200, Some(4 + r.headers.len()))?;
        resp.insert_header("content-type", "application/grpc")?;
        let status = r
            .grpc_status
            .unwrap_or_else(|| grpc::status_for_http(r.status));
        resp.insert_header("grpc-status", status.to_string())?;
        let message = String::from_utf8_lossy(&r.body);
        if !message.is_empty() {
            resp.insert_header("grpc-message", message.trim_end())?;
        }
    } else {
        resp = ResponseHeader::build(r.status, Some(3 + r.headers.len()))?;
        resp.insert_header("content-length", r.body.len().to_string())?;
        if !r.body.is_empty() && !r.headers.iter().any(|(k, _)| k == "content-type") {
            resp.insert_header("content-type", "text/plain")?;
        }
        body = (!r.body.is_empty()).then(|| Bytes::from(r.body.clone()));
    }
    for (k, v) in &r.headers {
        if k.starts_with(':') || k == "content-length" {
            continue;
        }
        let v = http::HeaderValue::from_bytes(v).map_err(|_| {
            Error::explain(ErrorType::InternalError, "filter reply header is invalid")
        })?;
        resp.append_header(k.clone(), v)?;
    }
    write(session, resp, body).await
}

/// Writes `resp` and, when there is one, `body`, ending the response.
async fn write(session: &mut Session, resp: ResponseHeader, body: Option<Bytes>) -> Result<()> {
    let mut tasks = vec![HttpTask::Header(Box::new(resp), body.is_none())];
    if let Some(b) = body {
        tasks.push(HttpTask::Body(Some(b), true));
    }
    session
        .as_downstream_mut()
        .response_duplex_vec(tasks)
        .await?;
    Ok(())
}

/// An error that makes pingora reply with `status` (through `fail_to_proxy`).
pub fn error(status: u16, why: &'static str) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(status), why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_errors_map_like_envoy() {
        let up = ErrorSource::Upstream;
        assert_eq!(status_for_error(&ErrorType::ConnectRefused, &up), 503);
        assert_eq!(status_for_error(&ErrorType::ConnectTimedout, &up), 503);
        assert_eq!(status_for_error(&ErrorType::ReadTimedout, &up), 504);
        assert_eq!(status_for_error(&ErrorType::ConnectionClosed, &up), 502);
        assert_eq!(status_for_error(&ErrorType::InvalidHTTPHeader, &up), 502);
        assert_eq!(status_for_error(&ErrorType::HTTPStatus(429), &up), 429);
    }

    #[test]
    fn downstream_errors_reply_400_or_nothing() {
        let down = ErrorSource::Downstream;
        assert_eq!(status_for_error(&ErrorType::InvalidHTTPHeader, &down), 400);
        assert_eq!(status_for_error(&ErrorType::ConnectionClosed, &down), 0);
        assert_eq!(status_for_error(&ErrorType::ReadTimedout, &down), 408);
    }
}
