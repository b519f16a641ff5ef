//! gRPC specifics the proxy needs: deadlines from `grpc-timeout`, and the status a gRPC client
//! gets when weir answers instead of the upstream.

use std::time::Duration;

/// gRPC status codes weir produces itself or looks for.
pub mod code {
    pub const CANCELLED: u32 = 1;
    pub const UNKNOWN: u32 = 2;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const NOT_FOUND: u32 = 5;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
    pub const DATA_LOSS: u32 = 15;
    pub const UNAUTHENTICATED: u32 = 16;
}

/// A metric label for gRPC status `code`: its number, `other` past the codes gRPC defines.
pub fn label(code: u32) -> &'static str {
    const LABELS: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    LABELS.get(code as usize).copied().unwrap_or("other")
}

/// Parses a `grpc-timeout` value (`1S`, `250m`, `100u`...): at most 8 digits and a unit.
pub fn parse_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC status for a reply weir sends with HTTP status `http` (the mapping of the gRPC
/// spec's "HTTP to gRPC Status Code Mapping", except that weir's own 504 is a deadline).
pub fn status_for_http(http: u16) -> u32 {
    match http {
        400 => code::INTERNAL,
        401 => code::UNAUTHENTICATED,
        403 => code::PERMISSION_DENIED,
        404 => code::UNIMPLEMENTED,
        429 | 502 | 503 => code::UNAVAILABLE,
        504 => code::DEADLINE_EXCEEDED,
        _ => code::UNKNOWN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_rejects_garbage() {
        assert_eq!(parse_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_timeout("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse_timeout("123456789S"), None, "more than 8 digits");
        assert_eq!(parse_timeout("S"), None);
        assert_eq!(parse_timeout("-1S"), None);
        assert_eq!(parse_timeout("1s"), None);
    }

    #[test]
    fn status_labels_are_the_numbers_grpc_defines_then_other() {
        assert_eq!((label(0), label(14), label(16)), ("0", "14", "16"));
        assert_eq!((label(17), label(u32::MAX)), ("other", "other"));
    }

    #[test]
    fn maps_local_replies_to_grpc_statuses() {
        assert_eq!(status_for_http(503), code::UNAVAILABLE);
        assert_eq!(status_for_http(504), code::DEADLINE_EXCEEDED);
        assert_eq!(status_for_http(404), code::UNIMPLEMENTED);
        assert_eq!(status_for_http(500), code::UNKNOWN);
    }
}
