//! A weir config as Envoy's xDS v3 resources: listeners (an HTTP connection manager each, its
//! routes over RDS), route configurations, clusters (endpoints over EDS) and load assignments.
//!
//! weir's semantics are kept where Envoy can express them: routes stay in one ordered list per
//! listener (first match wins) inside a single `*` virtual host, with weir's host condition as an
//! `:authority` match (port-less, case-insensitive, `*.example.com` for any longer name). What
//! Envoy cannot do the way weir does is not approximated: a route to an inference pool answers
//! 503 with the reason, so such requests fail visibly instead of landing elsewhere.
//!
//! proxy-wasm filter chains run in Envoy's own Wasm filter (V8): every chain a listener's routes
//! use is in its HTTP connection manager, disabled, and each route enables the filters of its
//! chain (its own, or its listener's) by name. weir-control reads each module and sends it
//! inline, after checking its `sha256`, so Envoy runs exactly the module weir would; a module
//! it cannot read or verify makes the routes that use it answer 503 with the reason, never
//! run without the filter. `memory_limit_mb` and `callback_deadline` are weir's sandbox and
//! have no Envoy equivalent. Proxy-level
//! settings (`admin`, `fast_path`, `access_log`, `tracing`, `otlp_metrics`) are the Envoy
//! bootstrap's business and are not sent.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as upstream_http;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::envoy::r#type::v3::Int64Range;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use prost::{Message, Name};
use weir_policies::model::{self, Config};

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The four resource types, in the order a change is pushed (clusters before their endpoints,
/// both before the listeners and routes that use them), as xDS asks of an ADS server.
pub const TYPES: [&str; 4] = [CLUSTER, ENDPOINTS, LISTENER, ROUTE];

/// One encoded resource, with the version Envoy sees (a hash of its encoding, computed once
/// here rather than on every push to every Envoy).
#[derive(Debug, Clone, PartialEq)]
pub struct Named {
    pub name: String,
    pub version: String,
    pub resource: Any,
}

impl Named {
    pub fn new(name: String, resource: Any) -> Self {
        let version = format!(
            "{:016x}",
            crate::resources::stable_hash((&resource.type_url, &resource.value))
        );
        Self {
            name,
            version,
            resource,
        }
    }
}

/// Named, encoded resources of every type.
#[derive(Debug, Default, Clone)]
pub struct Resources {
    /// By type URL, sorted by name.
    pub by_type: HashMap<&'static str, Vec<Named>>,
    /// Routes Envoy answers with 503 because it cannot run them as weir does, with why.
    pub not_translated: Vec<String>,
}

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn u32v(value: u32) -> UInt32Value {
    UInt32Value { value }
}

/// `ip:port` (`[v6]:port` too) as an Envoy address; weir validated it already.
fn address(text: &str) -> Result<core::Address, String> {
    let sa: std::net::SocketAddr = text.parse().map_err(|e| format!("address {text:?}: {e}"))?;
    Ok(core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: sa.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(
                sa.port() as u32
            )),
            ..Default::default()
        })),
    })
}

/// Resources of this type come over the ADS stream they were asked on.
fn ads() -> core::ConfigSource {
    core::ConfigSource {
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        resource_api_version: core::ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// A filter chain as Envoy HTTP filters (disabled until a route enables them), or why it
/// cannot run.
type Chain = Result<Vec<hcm::HttpFilter>, String>;

/// The HTTP filter name of filter `index` of chain `chain`.
fn filter_name(chain: &str, index: usize) -> String {
    format!("weir.{chain}.{index}")
}

/// Chain `c` as Envoy Wasm filters, each with its module inline.
fn wasm_chain(c: &model::FilterChain) -> Chain {
    use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
    use envoy_types::pb::envoy::extensions::wasm::v3 as wasm;
    use envoy_types::pb::google::protobuf::StringValue;
    use sha2::{Digest, Sha256};
    // As weir passes them: a string as is, anything else as JSON.
    let text = |v: &Option<serde_json::Value>| -> Option<Any> {
        let value = match v.as_ref()? {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Some(any(&StringValue { value }))
    };
    c.filters
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let code = std::fs::read(&f.module)
                .map_err(|e| format!("filter {}: reading {}: {e}", f.name, f.module))?;
            if let Some(want) = &f.sha256 {
                let have = hex::encode(Sha256::digest(&code));
                if !have.eq_ignore_ascii_case(want) {
                    return Err(format!(
                        "filter {}: {} has sha256 {have}, not {want}",
                        f.name, f.module
                    ));
                }
            }
            let plugin = wasm::PluginConfig {
                name: f.name.clone(),
                root_id: f.root_id.clone(),
                configuration: text(&f.config),
                failure_policy: if f.fail_open {
                    wasm::FailurePolicy::FailOpen
                } else {
                    wasm::FailurePolicy::FailClosed
                } as i32,
                vm: Some(wasm::plugin_config::Vm::VmConfig(wasm::VmConfig {
                    vm_id: f.vm_id.clone(),
                    runtime: "envoy.wasm.runtime.v8".into(),
                    code: Some(core::AsyncDataSource {
                        specifier: Some(core::async_data_source::Specifier::Local(
                            core::DataSource {
                                specifier: Some(core::data_source::Specifier::InlineBytes(code)),
                                ..Default::default()
                            },
                        )),
                    }),
                    configuration: text(&f.vm_config),
                    ..Default::default()
                })),
                ..Default::default()
            };
            Ok(hcm::HttpFilter {
                name: filter_name(&c.name, i),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(&Wasm {
                    config: Some(plugin),
                }))),
                disabled: true,
                ..Default::default()
            })
        })
        .collect()
}

/// Translates `config` (already validated by weir).
pub fn translate(config: &Config) -> Result<Resources, String> {
    let mut out = Resources::default();
    // Each module is read once per translation.
    let chains: HashMap<&str, Chain> = config
        .filter_chains
        .iter()
        .map(|c| (c.name.as_str(), wasm_chain(c)))
        .collect();
    let clusters: Clusters = config
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c))
        .collect();
    let mut listeners = Vec::new();
    let mut routes = Vec::new();
    for l in &config.listeners {
        let mut entries = Vec::new();
        // The chains this listener's routes run, in name order (each route enables its own).
        let mut used = std::collections::BTreeSet::new();
        for r in &config.routes {
            if r.matches.listener.as_deref().is_some_and(|n| n != l.name) {
                continue;
            }
            let chain = r.filter_chain.as_deref().or(l.filter_chain.as_deref());
            let chain = chain.map(|name| {
                used.insert(name);
                let filters = chains
                    .get(name)
                    .ok_or_else(|| format!("no filter chain {name}"))?;
                Ok::<_, String>((name, filters))
            });
            let (entry, why) = route_of(r, chain.transpose()?, &clusters)?;
            if let Some(why) = why {
                out.not_translated
                    .push(format!("route {} on listener {}: {why}", r.name, l.name));
            }
            entries.push(entry);
        }
        let rc = route::RouteConfiguration {
            name: l.name.clone(),
            virtual_hosts: vec![route::VirtualHost {
                name: "all".into(),
                domains: vec!["*".into()],
                routes: entries,
                ..Default::default()
            }],
            ..Default::default()
        };
        routes.push((l.name.clone(), any(&rc)));
        let filters = used
            .iter()
            .filter_map(|name| chains.get(name)?.as_ref().ok())
            .flatten()
            .cloned()
            .collect();
        listeners.push((l.name.clone(), any(&listener_of(l, filters)?)));
    }
    let mut clusters = Vec::new();
    let mut endpoints = Vec::new();
    for c in &config.clusters {
        clusters.push((c.name.clone(), any(&cluster_of(c))));
        if !c.original_dst {
            endpoints.push((
                c.name.clone(),
                any(&load_assignment(&c.name, &c.endpoints)?),
            ));
        }
    }
    for (ty, mut list) in [
        (LISTENER, listeners),
        (ROUTE, routes),
        (CLUSTER, clusters),
        (ENDPOINTS, endpoints),
    ] {
        list.sort_by(|a, b| a.0.cmp(&b.0));
        let list = list.into_iter().map(|(n, r)| Named::new(n, r)).collect();
        out.by_type.insert(ty, list);
    }
    Ok(out)
}

/// Listener `l` with `filters` (the Wasm filters its routes may enable) before the router.
fn listener_of(
    l: &model::Listener,
    mut filters: Vec<hcm::HttpFilter>,
) -> Result<listener::Listener, String> {
    filters.push(hcm::HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
            &Router::default(),
        ))),
        ..Default::default()
    });
    let manager = hcm::HttpConnectionManager {
        stat_prefix: l.name.clone(),
        codec_type: hcm::http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: Some(ads()),
                route_config_name: l.name.clone(),
            },
        )),
        http_filters: filters,
        max_request_headers_kb: Some(u32v(l.max_request_headers_kb)),
        // The same meaning in both, 0 turning each off. Envoy's own stream idle timeout (5 min
        // unless set) would cut quiet gRPC streams and WebSockets weir keeps: it gets the
        // connection's.
        common_http_protocol_options: Some(core::HttpProtocolOptions {
            idle_timeout: Some(duration(l.idle_timeout)),
            ..Default::default()
        }),
        stream_idle_timeout: Some(duration(l.idle_timeout)),
        request_headers_timeout: Some(duration(l.request_headers_timeout)),
        ..Default::default()
    };
    Ok(listener::Listener {
        name: l.name.clone(),
        address: Some(address(&l.address)?),
        filter_chains: vec![listener::FilterChain {
            filters: vec![listener::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(any(&manager))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn string_match(pattern: matcher::string_matcher::MatchPattern) -> matcher::StringMatcher {
    matcher::StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: false,
    }
}

fn regex(text: String) -> matcher::RegexMatcher {
    #[allow(deprecated)]
    matcher::RegexMatcher {
        regex: text,
        ..Default::default()
    }
}

/// weir's host condition as a full-match regex on `:authority`: no port, any case.
pub(crate) fn host_regex(host: &str) -> Option<String> {
    let port = r"(:[0-9]+)?";
    if host == "*" {
        None
    } else if let Some(rest) = host.strip_prefix('*') {
        Some(format!("(?i).+{}{port}", regex::escape(rest)))
    } else {
        Some(format!("(?i){}{port}", regex::escape(host)))
    }
}

fn header_matcher(h: &model::HeaderMatch) -> route::HeaderMatcher {
    use matcher::string_matcher::MatchPattern;
    use route::header_matcher::HeaderMatchSpecifier;
    let spec = if let Some(v) = &h.exact {
        HeaderMatchSpecifier::StringMatch(string_match(MatchPattern::Exact(v.clone())))
    } else if let Some(v) = &h.prefix {
        HeaderMatchSpecifier::StringMatch(string_match(MatchPattern::Prefix(v.clone())))
    } else if let Some(v) = &h.regex {
        HeaderMatchSpecifier::StringMatch(string_match(MatchPattern::SafeRegex(regex(v.clone()))))
    } else {
        HeaderMatchSpecifier::PresentMatch(h.present.unwrap_or(true))
    };
    route::HeaderMatcher {
        name: h.name.clone(),
        header_match_specifier: Some(spec),
        invert_match: h.invert,
        ..Default::default()
    }
}

fn route_match(m: &model::RouteMatch) -> route::RouteMatch {
    use route::route_match::PathSpecifier;
    let mut path = match &m.path {
        Some(model::PathMatch { exact: Some(p), .. }) => PathSpecifier::Path(p.clone()),
        Some(model::PathMatch {
            prefix: Some(p), ..
        }) => PathSpecifier::Prefix(p.clone()),
        Some(model::PathMatch { regex: Some(r), .. }) => PathSpecifier::SafeRegex(regex(r.clone())),
        _ => PathSpecifier::Prefix("/".into()),
    };
    let mut headers: Vec<route::HeaderMatcher> = m.headers.iter().map(header_matcher).collect();
    if let Some(re) = m.host.as_deref().and_then(host_regex) {
        headers.push(header_matcher(&model::HeaderMatch {
            name: ":authority".into(),
            exact: None,
            prefix: None,
            regex: Some(re),
            present: None,
            invert: false,
        }));
    }
    let mut grpc = None;
    if let Some(g) = &m.grpc {
        grpc = Some(route::route_match::GrpcRouteMatchOptions {});
        // The gRPC path is `/service/method`; with a path condition as well, both must hold.
        let grpc_path = match &g.method {
            Some(method) => format!("/{}/{method}", g.service),
            None => format!("/{}/", g.service),
        };
        let as_header = |pattern| route::HeaderMatcher {
            name: ":path".into(),
            header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(
                string_match(pattern),
            )),
            ..Default::default()
        };
        use matcher::string_matcher::MatchPattern;
        let pattern = if g.method.is_some() {
            MatchPattern::Exact(grpc_path.clone())
        } else {
            MatchPattern::Prefix(grpc_path.clone())
        };
        if m.path.is_none() {
            path = match pattern {
                MatchPattern::Exact(p) => PathSpecifier::Path(p),
                MatchPattern::Prefix(p) => PathSpecifier::Prefix(p),
                _ => unreachable!("only exact and prefix are built above"),
            };
        } else {
            headers.push(as_header(pattern));
        }
    }
    route::RouteMatch {
        path_specifier: Some(path),
        headers,
        grpc,
        ..Default::default()
    }
}

fn header_options(m: &model::HeaderMutation) -> Vec<core::HeaderValueOption> {
    m.add
        .iter()
        .map(|h| core::HeaderValueOption {
            header: Some(core::HeaderValue {
                key: h.name.clone(),
                value: h.value.clone(),
                ..Default::default()
            }),
            // weir's `add` sets, replacing any value the message had.
            append_action: core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd
                as i32,
            ..Default::default()
        })
        .collect()
}

/// One weir route as an Envoy route, and why it answers 503 when Envoy cannot run it.
/// `chain`: the filter chain its requests go through (its own or its listener's).
fn route_of(
    r: &model::Route,
    chain: Option<(&str, &Chain)>,
    clusters: &Clusters,
) -> Result<(route::Route, Option<String>), String> {
    let a = &r.action;
    // Prost writes a map in its iteration order: one hasher state for the whole process makes
    // two translations of the same chains the same bytes (so the same resource version).
    static ORDER: std::sync::LazyLock<std::hash::RandomState> =
        std::sync::LazyLock::new(std::hash::RandomState::new);
    let mut enabled = HashMap::with_hasher(ORDER.clone());
    let why = match chain {
        Some((name, Err(e))) => Some(format!("its filter chain {name} cannot run: {e}")),
        Some((name, Ok(filters))) => {
            for i in 0..filters.len() {
                // A present but empty `config` is how Envoy enables a filter its connection
                // manager has disabled (no config at all is refused).
                let on = route::FilterConfig {
                    config: Some(Any::default()),
                    ..Default::default()
                };
                enabled.insert(filter_name(name, i), any(&on));
            }
            None
        }
        None => None,
    };
    let why = why.or_else(|| {
        a.pool.as_ref().map(|pool| {
            format!("it routes to inference pool {pool}, which only weir can pick replicas for")
        })
    });
    // weir's original destination comes from its eBPF capture; an Envoy without a redirect
    // and the original_dst listener filter would send such requests back to itself.
    let why = why.or_else(|| {
        targets(a, clusters).find(|c| c.original_dst).map(|c| {
            format!(
                "its cluster {} sends to the original destination of weir's eBPF capture, which Envoy does not have",
                c.name
            )
        })
    });
    let action = match &why {
        Some(why) => route::route::Action::DirectResponse(route::DirectResponseAction {
            status: 503,
            body: Some(core::DataSource {
                specifier: Some(core::data_source::Specifier::InlineString(format!(
                    "weir-control: route {} is not served by Envoy: {why}\n",
                    r.name
                ))),
                ..Default::default()
            }),
            ..Default::default()
        }),
        None => route::route::Action::Route(route_action(a, clusters)?),
    };
    Ok((
        route::Route {
            name: r.name.clone(),
            r#match: Some(route_match(&r.matches)),
            action: Some(action),
            request_headers_to_add: header_options(&a.request_headers),
            request_headers_to_remove: a.request_headers.remove.clone(),
            response_headers_to_add: header_options(&a.response_headers),
            response_headers_to_remove: a.response_headers.remove.clone(),
            typed_per_filter_config: enabled,
            ..Default::default()
        },
        why,
    ))
}

/// Clusters by name.
type Clusters<'a> = HashMap<&'a str, &'a model::Cluster>;

/// The clusters a route sends to (its cluster, or its weighted ones).
fn targets<'a>(
    a: &'a model::RouteAction,
    clusters: &'a Clusters,
) -> impl Iterator<Item = &'a model::Cluster> + 'a {
    a.cluster
        .iter()
        .chain(a.weighted_clusters.iter().map(|w| &w.cluster))
        .filter_map(|name| clusters.get(name.as_str()).copied())
}

fn route_action(a: &model::RouteAction, clusters: &Clusters) -> Result<route::RouteAction, String> {
    use route::route_action::ClusterSpecifier;
    let target = if let Some(c) = &a.cluster {
        ClusterSpecifier::Cluster(c.clone())
    } else if !a.weighted_clusters.is_empty() {
        ClusterSpecifier::WeightedClusters(route::WeightedCluster {
            clusters: a
                .weighted_clusters
                .iter()
                .map(|w| route::weighted_cluster::ClusterWeight {
                    name: w.cluster.clone(),
                    weight: Some(u32v(w.weight)),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    } else {
        return Err("a route without a cluster, weighted clusters or pool".into());
    };
    // Ring hash is a cluster setting in weir and a route one in Envoy: the hash header of the
    // cluster this route sends to.
    let hashed = targets(a, clusters).find_map(|c| match &c.lb {
        model::LbPolicy::RingHash { ring_hash } => Some(ring_hash.header.clone()),
        model::LbPolicy::Simple(_) => None,
    });
    Ok(route::RouteAction {
        cluster_specifier: Some(target),
        // weir's timeout bounds each wait on the upstream (the response's start, each later
        // read), so a long stream lives: Envoy's per-route idle timeout. Its whole-response
        // `timeout` (15 s by default) is off, as weir has none.
        timeout: Some(duration(Duration::ZERO)),
        idle_timeout: a.timeout.map(duration),
        retry_policy: a.retry.as_ref().map(|r| route::RetryPolicy {
            retry_on: r.retry_on.join(","),
            num_retries: Some(u32v(r.retries)),
            per_try_timeout: r.per_try_timeout.map(duration),
            retriable_status_codes: r.retriable_status_codes.iter().map(|c| *c as u32).collect(),
            ..Default::default()
        }),
        prefix_rewrite: a.prefix_rewrite.clone().unwrap_or_default(),
        hash_policy: hashed
            .map(|header_name| {
                vec![route::route_action::HashPolicy {
                    policy_specifier: Some(
                        route::route_action::hash_policy::PolicySpecifier::Header(
                            route::route_action::hash_policy::Header {
                                header_name,
                                ..Default::default()
                            },
                        ),
                    ),
                    ..Default::default()
                }]
            })
            .unwrap_or_default(),
        ..Default::default()
    })
}

fn cluster_of(c: &model::Cluster) -> cluster::Cluster {
    use cluster::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
    let (kind, lb) = if c.original_dst {
        (DiscoveryType::OriginalDst, LbPolicy::ClusterProvided)
    } else {
        let lb = match &c.lb {
            model::LbPolicy::Simple(model::SimpleLb::RoundRobin) => LbPolicy::RoundRobin,
            model::LbPolicy::Simple(model::SimpleLb::LeastRequest) => LbPolicy::LeastRequest,
            model::LbPolicy::RingHash { .. } => LbPolicy::RingHash,
        };
        (DiscoveryType::Eds, lb)
    };
    let mut options = HashMap::new();
    if c.protocol == model::UpstreamProtocol::H2c {
        use upstream_http::http_protocol_options::{
            explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions,
        };
        options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            any(&upstream_http::HttpProtocolOptions {
                upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                    ExplicitHttpConfig {
                        protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                            core::Http2ProtocolOptions::default(),
                        )),
                    },
                )),
                ..Default::default()
            }),
        );
    }
    let limit = c.circuit_breaker.max_requests;
    cluster::Cluster {
        name: c.name.clone(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(kind as i32)),
        eds_cluster_config: (!c.original_dst).then(|| cluster::cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        connect_timeout: Some(duration(c.connect_timeout)),
        lb_policy: lb as i32,
        typed_extension_protocol_options: options,
        health_checks: c.health_check.iter().map(health_check).collect(),
        // weir fails fast past `max_requests` and has no connection limit of its own.
        circuit_breakers: Some(cluster::CircuitBreakers {
            thresholds: vec![cluster::circuit_breakers::Thresholds {
                max_connections: Some(u32v(limit)),
                max_pending_requests: Some(u32v(limit)),
                max_requests: Some(u32v(limit)),
                max_retries: Some(u32v(c.circuit_breaker.max_retries)),
                ..Default::default()
            }],
            ..Default::default()
        }),
        outlier_detection: c
            .outlier_detection
            .as_ref()
            .map(|o| cluster::OutlierDetection {
                consecutive_5xx: Some(u32v(o.consecutive_5xx)),
                base_ejection_time: Some(duration(o.base_ejection_time)),
                max_ejection_percent: Some(u32v(o.max_ejection_percent)),
                ..Default::default()
            }),
        ..Default::default()
    }
}

fn health_check(h: &model::HealthCheck) -> core::HealthCheck {
    use core::health_check::{GrpcHealthCheck, HealthChecker, HttpHealthCheck, TcpHealthCheck};
    let checker = if let Some(http) = &h.http {
        HealthChecker::HttpHealthCheck(HttpHealthCheck {
            path: http.path.clone(),
            host: http.host.clone().unwrap_or_default(),
            expected_statuses: http
                .expected_statuses
                .iter()
                .map(|s| Int64Range {
                    start: *s as i64,
                    end: *s as i64 + 1,
                })
                .collect(),
            ..Default::default()
        })
    } else if let Some(grpc) = &h.grpc {
        HealthChecker::GrpcHealthCheck(GrpcHealthCheck {
            service_name: grpc.service.clone(),
            ..Default::default()
        })
    } else {
        HealthChecker::TcpHealthCheck(TcpHealthCheck::default())
    };
    core::HealthCheck {
        interval: Some(duration(h.interval)),
        timeout: Some(duration(h.timeout)),
        unhealthy_threshold: Some(u32v(h.unhealthy_threshold)),
        healthy_threshold: Some(u32v(h.healthy_threshold)),
        health_checker: Some(checker),
        ..Default::default()
    }
}

/// Cluster `name`'s endpoints as Envoy's load assignment, encoded.
pub fn endpoints_of(name: &str, endpoints: &[model::Endpoint]) -> Result<Any, String> {
    Ok(any(&load_assignment(name, endpoints)?))
}

fn load_assignment(
    name: &str,
    endpoints: &[model::Endpoint],
) -> Result<endpoint::ClusterLoadAssignment, String> {
    let lb_endpoints = endpoints
        .iter()
        .map(|e| {
            Ok(endpoint::LbEndpoint {
                host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                    endpoint::Endpoint {
                        address: Some(address(&e.address)?),
                        ..Default::default()
                    },
                )),
                load_balancing_weight: Some(u32v(e.weight)),
                ..Default::default()
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(endpoint::ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: vec![endpoint::LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }],
        ..Default::default()
    })
}
