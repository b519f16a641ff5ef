//! Checks on a downstream request before it is routed.

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderValue, Method, Version};
use pingora::http::RequestHeader;

/// What RFC 9112 asks of an HTTP/1.x request head beyond pingora's own checks, with the status
/// weir answers (Envoy's): an HTTP/1.1 request needs `Host` (400); the target is a path, `*`
/// for `OPTIONS`, or an absolute URI (400: `GET admin` would reach an upstream that reads it
/// as `/admin` past weir's path-based routing); the only transfer coding weir forwards is
/// `chunked` (501: pingora re-frames the body as chunked and would drop `gzip` from
/// `gzip, chunked`, handing the upstream coded bytes as plain ones); `Content-Length` and
/// `Transfer-Encoding` together are refused (400, see `has_framing_conflict`; `raw_head` is
/// the head as received). A `Content-Length` repeated or listed with one value is forwarded
/// once, as RFC 9110 8.6 asks of a proxy (pingora refuses differing values itself).
pub fn check_h1_request(
    req: &mut RequestHeader,
    raw_head: &[u8],
) -> Result<(), (u16, &'static str)> {
    if req.version == Version::HTTP_11 && !req.headers.contains_key(HOST) {
        return Err((400, "HTTP/1.1 request without Host"));
    }
    // pingora routes a target like `admin` or `?x` as `/` but forwards it as sent.
    let target = req.raw_path();
    let starts = |prefix: &[u8]| {
        target
            .get(..prefix.len())
            .is_some_and(|t| t.eq_ignore_ascii_case(prefix))
    };
    if !(target.first() == Some(&b'/')
        || (target == b"*" && req.method == Method::OPTIONS)
        || starts(b"http://")
        || starts(b"https://"))
    {
        return Err((400, "request target is not a path, * or an absolute URI"));
    }
    if req.headers.contains_key(TRANSFER_ENCODING) {
        if !chunked_alone(&req.headers) {
            return Err((501, "transfer coding other than chunked"));
        }
        // pingora drops Content-Length when Transfer-Encoding is there too, so the raw head
        // tells; a request without Transfer-Encoding (nearly all) cannot conflict.
        if has_framing_conflict(raw_head) {
            return Err((400, "both Content-Length and Transfer-Encoding"));
        }
    }
    let mut lengths = req.headers.get_all(CONTENT_LENGTH).iter();
    if lengths
        .next()
        .is_some_and(|v| lengths.next().is_some() || v.as_bytes().contains(&b','))
    {
        let single = {
            let mut values = list(&req.headers, CONTENT_LENGTH);
            let first = values.next().unwrap_or_default();
            if first.is_empty() || values.any(|v| v != first) {
                return Err((400, "conflicting Content-Length values"));
            }
            HeaderValue::from_bytes(first).map_err(|_| (400, "bad Content-Length"))?
        };
        req.insert_header(CONTENT_LENGTH, single)
            .map_err(|_| (400, "bad Content-Length"))?;
    }
    Ok(())
}

/// Whether `headers`' `Transfer-Encoding` names `chunked` and nothing else: the only transfer
/// coding weir forwards, in a request (above) or a response (`upstream_response_filter`).
/// pingora takes the body's framing from it and writes its own; any other coding would reach
/// the far side as plain bytes, or in a coding it may not know.
pub fn chunked_alone(headers: &http::HeaderMap) -> bool {
    let mut codings = list(headers, TRANSFER_ENCODING);
    codings
        .next()
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none()
}

/// The comma-separated elements of every `name` field of `headers`, trimmed.
fn list(headers: &http::HeaderMap, name: http::HeaderName) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|c| c.trim_ascii())
}

/// Whether raw HTTP/1 request headers carry both `Content-Length` and `Transfer-Encoding`: an
/// ambiguous framing used for request smuggling, refused with 400 (as Envoy does by default)
/// instead of being "fixed up".
fn has_framing_conflict(raw_headers: &[u8]) -> bool {
    let mut cl = false;
    let mut te = false;
    for line in raw_headers.split(|b| *b == b'\n') {
        let name = match line.iter().position(|b| *b == b':') {
            Some(i) => &line[..i],
            None => continue,
        };
        let name = name.trim_ascii();
        cl |= name.eq_ignore_ascii_case(b"content-length");
        te |= name.eq_ignore_ascii_case(b"transfer-encoding");
    }
    cl && te
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(head: &[(&str, &str)], target: &str, method: &str) -> Result<RequestHeader, u16> {
        let mut req = RequestHeader::build(method, target.as_bytes(), None).unwrap();
        for (name, value) in head {
            req.append_header(name.to_string(), *value).unwrap();
        }
        check_h1_request(&mut req, b"")
            .map(|()| req)
            .map_err(|(s, _)| s)
    }

    #[test]
    fn h1_heads_that_rfc_9112_refuses() {
        let host = ("Host", "a");
        assert!(checked(&[host], "/x", "GET").is_ok());
        assert_eq!(checked(&[], "/x", "GET").unwrap_err(), 400);
        assert!(checked(&[host], "*", "OPTIONS").is_ok());
        assert_eq!(checked(&[host], "*", "GET").unwrap_err(), 400);
        assert_eq!(checked(&[host], "admin", "GET").unwrap_err(), 400);
        assert!(checked(&[host], "http://a/x", "GET").is_ok());
        assert!(checked(&[host], "HTTPS://a", "GET").is_ok());
        for target in ["?x", "a/b", "foo:bar://host/admin"] {
            assert_eq!(
                checked(&[host], target, "GET").unwrap_err(),
                400,
                "{target}"
            );
        }
        let te = |v| checked(&[host, ("Transfer-Encoding", v)], "/", "POST");
        assert!(te("chunked").is_ok());
        assert!(te("Chunked").is_ok());
        assert_eq!(te("gzip, chunked").unwrap_err(), 501);
        assert_eq!(te("chunked, chunked").unwrap_err(), 501);
        assert_eq!(
            checked(
                &[
                    host,
                    ("Transfer-Encoding", "gzip"),
                    ("Transfer-Encoding", "chunked")
                ],
                "/",
                "POST"
            )
            .unwrap_err(),
            501
        );
    }

    #[test]
    fn a_repeated_content_length_is_forwarded_once() {
        let host = ("Host", "a");
        let cl = |values: &[&'static str]| {
            let head: Vec<_> = std::iter::once(host)
                .chain(values.iter().map(|v| ("Content-Length", *v)))
                .collect();
            checked(&head, "/", "POST").map(|r| {
                let all: Vec<_> = r.headers.get_all(CONTENT_LENGTH).iter().cloned().collect();
                all
            })
        };
        assert_eq!(cl(&["5"]).unwrap(), ["5"]);
        assert_eq!(cl(&["5", "5"]).unwrap(), ["5"]);
        assert_eq!(cl(&["5, 5"]).unwrap(), ["5"]);
        assert_eq!(cl(&["5, 6"]).unwrap_err(), 400);
        assert_eq!(cl(&["5", "6"]).unwrap_err(), 400);
        assert_eq!(cl(&[","]).unwrap_err(), 400);
    }

    #[test]
    fn detects_cl_te_in_any_case() {
        assert!(has_framing_conflict(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
        ));
        assert!(!has_framing_conflict(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"
        ));
        assert!(!has_framing_conflict(
            b"POST / HTTP/1.1\r\nX-Transfer-Encoding-Note: a\r\nContent-Length: 5\r\n\r\n"
        ));
    }
}
