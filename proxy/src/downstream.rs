//! Checks on a downstream request before it is routed.

/// Whether raw HTTP/1 request headers carry both `Content-Length` and `Transfer-Encoding`: an
/// ambiguous framing used for request smuggling, refused with 400 (as Envoy does by default)
/// instead of being "fixed up".
pub fn has_framing_conflict(raw_headers: &[u8]) -> bool {
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
