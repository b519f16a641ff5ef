//! Route selection: pure functions over a [`Snapshot`] and a view of the request.

use http::HeaderMap;

use crate::snapshot::*;

/// What routing looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The listener the request arrived on.
    pub listener: &'a str,
    /// `Host` or `:authority`, possibly with a port.
    pub authority: Option<&'a str>,
    /// The path without the query.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

impl RequestView<'_> {
    /// Whether this is a gRPC request (`content-type: application/grpc`, `+proto` etc.).
    pub fn is_grpc(&self) -> bool {
        is_grpc(self.headers)
    }
}

/// Whether `headers` carry a gRPC content type.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The first route (index and route) whose match accepts `req`.
pub fn select<'s>(snapshot: &'s Snapshot, req: &RequestView) -> Option<(usize, &'s Route)> {
    snapshot
        .routes
        .iter()
        .enumerate()
        .find(|(_, r)| matches(r, req))
}

/// Whether `route`'s match accepts `req`.
pub fn matches(route: &Route, req: &RequestView) -> bool {
    if route.listener.as_deref().is_some_and(|l| l != req.listener) {
        return false;
    }
    if let Some(h) = &route.host {
        if !host_matches(h, req.authority) {
            return false;
        }
    }
    if let Some(p) = &route.path {
        let ok = match p {
            PathMatch::Exact(e) => req.path == e,
            PathMatch::Prefix(pre) => req.path.starts_with(pre.as_str()),
            PathMatch::Regex(r) => r.is_match(req.path),
        };
        if !ok {
            return false;
        }
    }
    if let Some(g) = &route.grpc_path {
        let ok = req.is_grpc()
            && match g {
                GrpcPathMatch::Service(prefix) => {
                    req.path.starts_with(prefix.as_str()) && !req.path[prefix.len()..].contains('/')
                }
                GrpcPathMatch::Method(full) => req.path == full,
            };
        if !ok {
            return false;
        }
    }
    route.headers.iter().all(|h| header_matches(h, req.headers))
}

fn host_matches(m: &HostMatch, authority: Option<&str>) -> bool {
    let Some(authority) = authority else {
        return matches!(m, HostMatch::Any);
    };
    // Compared without regard to case (the route's host is lowercase already), without
    // lowercasing a copy per route tried.
    let host = strip_port(authority).as_bytes();
    match m {
        HostMatch::Any => true,
        HostMatch::Exact(e) => host.eq_ignore_ascii_case(e.as_bytes()),
        HostMatch::Suffix(s) => {
            host.len() > s.len() && host[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
        }
    }
}

/// The host of an authority (`Host` header, `:authority`): without its port, an IPv6 address
/// without its brackets.
pub fn strip_port(authority: &str) -> &str {
    if let Some(bracketed) = authority.strip_prefix('[') {
        // [::1]:8080
        return bracketed.split_once(']').map_or(authority, |(h, _)| h);
    }
    // The port: the digits after the last colon, counted from the end.
    let digits = authority
        .bytes()
        .rev()
        .take_while(u8::is_ascii_digit)
        .count();
    match authority.len().checked_sub(digits + 1) {
        Some(colon) if authority.as_bytes()[colon] == b':' => &authority[..colon],
        _ => authority,
    }
}

fn header_matches(m: &HeaderMatch, headers: &HeaderMap) -> bool {
    let mut values = headers
        .get_all(m.name.as_str())
        .iter()
        .filter_map(|v| v.to_str().ok());
    let hit = match &m.rule {
        HeaderRule::Present(want) => headers.contains_key(m.name.as_str()) == *want,
        HeaderRule::Exact(e) => values.any(|v| v == e),
        HeaderRule::Prefix(p) => values.any(|v| v.starts_with(p.as_str())),
        HeaderRule::Regex(r) => values.any(|v| r.is_match(v)),
    };
    hit != m.invert
}

/// Picks a cluster of `action` by weight; `roll` is any number, reduced modulo the total weight
/// (callers pass a random one).
pub fn pick_cluster(action: &RouteAction, roll: u64) -> usize {
    let mut point = roll % action.total_weight.max(1);
    for (id, w) in &action.clusters {
        let w = u64::from(*w);
        if point < w {
            return *id;
        }
        point -= w;
    }
    action.clusters[0].0
}

/// The upstream path after `prefix_rewrite`, or `None` if the route does not rewrite.
/// `path_and_query` is the original request target.
pub fn rewrite_path(route: &Route, path_and_query: &str) -> Option<String> {
    let new_prefix = route.action.prefix_rewrite.as_deref()?;
    let Some(PathMatch::Prefix(old)) = &route.path else {
        return None;
    };
    let rest = path_and_query.strip_prefix(old.as_str())?;
    let mut out = String::with_capacity(new_prefix.len() + rest.len() + 1);
    out.push_str(new_prefix);
    // Avoid "//x" when both the new prefix ends and the rest starts with a slash.
    if out.ends_with('/') && rest.starts_with('/') {
        out.push_str(&rest[1..]);
    } else {
        out.push_str(rest);
    }
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load_str;

    const CONFIG: &str = r#"
listeners:
  - { name: outbound, address: "127.0.0.1:15001" }
  - { name: inbound, address: "127.0.0.1:15006" }
clusters:
  - { name: a, endpoints: [{ address: "127.0.0.1:1" }] }
  - { name: b, endpoints: [{ address: "127.0.0.1:2" }], protocol: h2c }
routes:
  - name: inbound-only
    match: { listener: inbound }
    route: { cluster: a }
  - name: grpc-method
    match: { grpc: { service: pkg.Svc, method: Get } }
    route: { cluster: b }
  - name: grpc-service
    match: { grpc: { service: pkg.Svc } }
    route: { cluster: b }
  - name: host-wildcard
    match: { host: "*.example.com", path: { prefix: /api/ } }
    route: { cluster: b, prefix_rewrite: /v2/ }
  - name: host-exact
    match: { host: "Exact.Example.ORG" }
    route: { cluster: a }
  - name: canary-header
    match:
      path: { regex: "/items/[0-9]+" }
      headers: [{ name: x-canary, exact: "1" }]
    route: { cluster: b }
  - name: not-internal
    match:
      path: { exact: /items/1 }
      headers: [{ name: x-internal, present: true, invert: true }]
    route: { cluster: a }
  - name: split
    match: { path: { prefix: / } }
    route:
      weighted_clusters: [{ cluster: a, weight: 3 }, { cluster: b, weight: 1 }]
"#;

    fn route_name(
        listener: &str,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Option<String> {
        let snap = load_str("test.yaml", CONFIG).expect("valid");
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let req = RequestView {
            listener,
            authority: Some(authority),
            path,
            headers: &map,
        };
        select(&snap, &req).map(|(_, r)| r.name.clone())
    }

    #[test]
    fn listener_condition_restricts_route() {
        assert_eq!(
            route_name("inbound", "x", "/", &[]).as_deref(),
            Some("inbound-only")
        );
        assert_eq!(
            route_name("outbound", "x", "/", &[]).as_deref(),
            Some("split")
        );
    }

    #[test]
    fn grpc_matches_method_then_service_and_needs_grpc_content_type() {
        let grpc = [("content-type", "application/grpc")];
        assert_eq!(
            route_name("outbound", "x", "/pkg.Svc/Get", &grpc).as_deref(),
            Some("grpc-method")
        );
        assert_eq!(
            route_name("outbound", "x", "/pkg.Svc/List", &grpc).as_deref(),
            Some("grpc-service")
        );
        assert_eq!(
            route_name("outbound", "x", "/pkg.Svc/Get", &[]).as_deref(),
            Some("split")
        );
        let plus = [("content-type", "application/grpc+proto")];
        assert_eq!(
            route_name("outbound", "x", "/pkg.Svc/Get", &plus).as_deref(),
            Some("grpc-method")
        );
    }

    #[test]
    fn an_authority_loses_its_port_and_an_ipv6_address_its_brackets() {
        for (authority, host) in [
            ("example.com:8080", "example.com"),
            ("example.com", "example.com"),
            ("example.com:", "example.com"),
            ("10.0.0.1:80", "10.0.0.1"),
            ("a:b:80", "a:b"),
            ("host:port", "host:port"),
            ("8080", "8080"),
            ("", ""),
            ("[::1]:8080", "::1"),
            ("[::1]", "::1"),
            ("[::1", "[::1"),
        ] {
            assert_eq!(super::strip_port(authority), host, "{authority}");
        }
    }

    #[test]
    fn host_wildcard_ignores_port_and_case() {
        assert_eq!(
            route_name("outbound", "API.example.com:8080", "/api/x", &[]).as_deref(),
            Some("host-wildcard")
        );
        assert_eq!(
            route_name("outbound", "example.com", "/api/x", &[]).as_deref(),
            Some("split")
        );
        for (authority, route) in [
            ("exact.example.org", "host-exact"),
            ("EXACT.example.Org:443", "host-exact"),
            ("sub.exact.example.org", "split"),
            ("example.org", "split"),
        ] {
            assert_eq!(
                route_name("outbound", authority, "/x", &[]).as_deref(),
                Some(route),
                "{authority}"
            );
        }
    }

    #[test]
    fn regex_is_anchored_and_headers_combine() {
        let canary = [("x-canary", "1")];
        assert_eq!(
            route_name("outbound", "x", "/items/42", &canary).as_deref(),
            Some("canary-header")
        );
        assert_eq!(
            route_name("outbound", "x", "/items/42/x", &canary).as_deref(),
            Some("split")
        );
        assert_eq!(
            route_name("outbound", "x", "/items/1", &[]).as_deref(),
            Some("not-internal")
        );
        assert_eq!(
            route_name("outbound", "x", "/items/1", &[("x-internal", "y")]).as_deref(),
            Some("split")
        );
    }

    #[test]
    fn weighted_pick_follows_weights_exactly() {
        let snap = load_str("test.yaml", CONFIG).unwrap();
        let split = &snap
            .routes
            .iter()
            .find(|r| r.name == "split")
            .unwrap()
            .action;
        let mut counts = [0; 2];
        for roll in 0..4000 {
            counts[pick_cluster(split, roll)] += 1;
        }
        assert_eq!(counts, [3000, 1000]);
    }

    #[test]
    fn prefix_rewrite_replaces_matched_prefix_and_keeps_query() {
        let snap = load_str("test.yaml", CONFIG).unwrap();
        let r = snap
            .routes
            .iter()
            .find(|r| r.name == "host-wildcard")
            .unwrap();
        assert_eq!(
            rewrite_path(r, "/api/users?id=1").as_deref(),
            Some("/v2/users?id=1")
        );
        let plain = snap.routes.iter().find(|r| r.name == "split").unwrap();
        assert_eq!(rewrite_path(plain, "/x"), None);
    }
}
