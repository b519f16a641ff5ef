//! The one retry policy: which failures a route's [`RetryPolicy`] retries. Whether a retry is
//! *safe* (nothing sent downstream yet, request body replayable) is the caller's check.

use weir_policies::snapshot::RetryPolicy;

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection to the endpoint (refused, unreachable, connect timeout).
    Connect,
    /// The connection broke before a response started.
    Reset,
    /// No response within the per-try or route timeout.
    Timeout,
    /// A complete response header with this status.
    Status(u16),
    /// A gRPC response whose headers carried this `grpc-status` (trailers-only).
    Grpc(u32),
}

/// Whether `policy` retries `failure` (attempt counting is separate).
pub fn retries(policy: &RetryPolicy, failure: Failure) -> bool {
    let on = &policy.on;
    match failure {
        Failure::Connect => on.connect_failure || on.server_error || on.gateway_error,
        Failure::Reset => on.reset || on.server_error,
        Failure::Timeout => on.server_error || on.gateway_error,
        Failure::Status(s) => {
            (on.server_error && (500..600).contains(&s))
                || (on.gateway_error && matches!(s, 502..=504))
                || on.statuses.contains(&s)
        }
        Failure::Grpc(code) => on.grpc_statuses.contains(&code),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_policies::snapshot::RetryOn;

    fn policy(on: RetryOn) -> RetryPolicy {
        RetryPolicy {
            retries: 1,
            on,
            per_try_timeout: None,
        }
    }

    #[test]
    fn conditions_cover_what_envoy_users_expect() {
        let p5xx = policy(RetryOn {
            server_error: true,
            ..Default::default()
        });
        assert!(retries(&p5xx, Failure::Status(500)));
        assert!(retries(&p5xx, Failure::Connect));
        assert!(retries(&p5xx, Failure::Reset));
        assert!(retries(&p5xx, Failure::Timeout));
        assert!(!retries(&p5xx, Failure::Status(404)));
        assert!(!retries(&p5xx, Failure::Grpc(14)));

        let gw = policy(RetryOn {
            gateway_error: true,
            ..Default::default()
        });
        assert!(retries(&gw, Failure::Status(503)));
        assert!(!retries(&gw, Failure::Status(500)));
        assert!(!retries(&gw, Failure::Reset));

        let connect = policy(RetryOn {
            connect_failure: true,
            ..Default::default()
        });
        assert!(retries(&connect, Failure::Connect));
        assert!(!retries(&connect, Failure::Status(503)));

        let codes = policy(RetryOn {
            statuses: vec![409],
            grpc_statuses: vec![14],
            ..Default::default()
        });
        assert!(retries(&codes, Failure::Status(409)));
        assert!(retries(&codes, Failure::Grpc(14)));
        assert!(!retries(&codes, Failure::Grpc(13)));
    }
}
