//! Replica load as model servers report it: a vLLM-style Prometheus `/metrics` page (scraped
//! periodically) and ORCA load reports (free with every response that weir asks one of).
//! Pure parsers; the picker reads the result through [`super::picker::Load`].

use super::picker::Load;
use weir_policies::snapshot::PoolScrape;

/// What one report said; `None` where it said nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadSample {
    /// Requests waiting in the server's queue.
    pub waiting: Option<f64>,
    /// Requests it is running.
    pub running: Option<f64>,
    /// KV-cache use, 0.0 to 1.0.
    pub kv_cache: Option<f64>,
    /// LoRA adapters in the server's memory now (running or waiting requests use them).
    pub adapters: Option<Vec<String>>,
}

impl LoadSample {
    /// Folds the sample into `load` (fields the sample lacks keep their value).
    pub fn apply(&self, load: &mut Load) {
        if let Some(w) = self.waiting {
            load.queue_depth = w.max(0.0).round() as u32;
        }
        if let Some(k) = self.kv_cache {
            load.kv_cache = k.clamp(0.0, 1.0);
        }
    }
}

/// Reads a model server's gauges from its Prometheus text page: `vllm:num_requests_waiting`,
/// `vllm:num_requests_running` (summed over label sets, e.g. per model),
/// `vllm:kv_cache_usage_perc` (older vLLM: `vllm:gpu_cache_usage_perc`; the highest reported),
/// or the same under SGLang's, trtllm-serve's or Triton TensorRT-LLM's names, or under the
/// names the pool's `scrape` gives (for any other server: those replace the known names),
/// and the LoRA adapters loaded now: `vllm:lora_requests_info`'s `running_lora_adapters` and
/// `waiting_lora_adapters` (comma-separated), of its newest label set (the value is when vLLM
/// set it; older sets stay on the page).
pub fn from_prometheus(text: &str, scrape: Option<&PoolScrape>) -> Result<LoadSample, String> {
    use openmetrics_parser::PrometheusValue;
    let page = openmetrics_parser::prometheus::parse_prometheus(&typed(text))
        .map_err(|e| format!("metrics page: {e:?}"))?;
    let named_waiting = scrape.and_then(|s| s.waiting.as_ref());
    let named_kv_cache = scrape.and_then(|s| s.kv_cache.as_ref());
    let mut sample = LoadSample::default();
    let mut lora_newest = f64::NEG_INFINITY;
    for (name, family) in &page.families {
        if name == "vllm:lora_requests_info" {
            for s in family.iter_samples() {
                let (PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n)) = &s.value else {
                    continue;
                };
                let (Ok(labels), at) = (s.get_labelset(), n.as_f64()) else {
                    continue;
                };
                if at >= lora_newest {
                    lora_newest = at;
                    let names = ["running_lora_adapters", "waiting_lora_adapters"];
                    let mut adapters: Vec<String> = names
                        .iter()
                        .filter_map(|l| labels.get_label_value(l))
                        .flat_map(|v| v.split(','))
                        .map(str::trim)
                        .filter(|a| !a.is_empty())
                        .map(str::to_string)
                        .collect();
                    adapters.sort();
                    adapters.dedup();
                    sample.adapters = Some(adapters);
                }
            }
            continue;
        }
        for s in family.iter_samples() {
            let v = match &s.value {
                PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => n.as_f64(),
                _ => continue,
            };
            let labels = s.get_labelset().ok();
            let label = |l: &str| labels.as_ref().and_then(|set| set.get_label_value(l));
            // The same three numbers under each server's names (vLLM, SGLang, trtllm-serve,
            // Triton's TensorRT-LLM backend), as the Gateway API inference extension reads them.
            let known = match name.as_str() {
                "vllm:num_requests_waiting"
                | "sglang:num_queue_reqs"
                | "trtllm_num_requests_waiting" => Some(Gauge::Waiting),
                "vllm:num_requests_running"
                | "sglang:num_running_reqs"
                | "trtllm_num_requests_running" => Some(Gauge::Running),
                "nv_trt_llm_request_metrics" => match label("request_type") {
                    Some("waiting") => Some(Gauge::Waiting),
                    Some("scheduled") => Some(Gauge::Running),
                    _ => None,
                },
                "vllm:kv_cache_usage_perc"
                | "vllm:gpu_cache_usage_perc"
                | "sglang:token_usage"
                | "trtllm_kv_cache_utilization" => Some(Gauge::KvCache),
                "nv_trt_llm_kv_cache_block_metrics"
                    if label("kv_cache_block_type") == Some("fraction") =>
                {
                    Some(Gauge::KvCache)
                }
                _ => None,
            };
            let sum = |slot: &mut Option<f64>| *slot = Some(slot.unwrap_or(0.0) + v);
            let max = |slot: &mut Option<f64>| *slot = Some(slot.map_or(v, |k: f64| k.max(v)));
            match named_waiting {
                Some(spec) if spec.matches(name, label) => sum(&mut sample.waiting),
                None if known == Some(Gauge::Waiting) => sum(&mut sample.waiting),
                _ => {}
            }
            match named_kv_cache {
                Some(spec) if spec.matches(name, label) => max(&mut sample.kv_cache),
                None if known == Some(Gauge::KvCache) => max(&mut sample.kv_cache),
                _ => {}
            }
            if known == Some(Gauge::Running) {
                sum(&mut sample.running);
            }
        }
    }
    Ok(sample)
}

/// `text` with a `# TYPE <name> untyped` line before each series that no `# TYPE` or `# HELP`
/// line introduced. The Prometheus text format allows such series (a hand-written exporter's
/// page may hold nothing else); the parser takes each one for a sample of the family above it
/// and refuses the whole page.
fn typed(text: &str) -> std::borrow::Cow<'_, str> {
    // The family the comments above introduced, and the suffixes of its samples' names.
    let mut family = "";
    let belongs = |name: &str, family: &str| {
        name.strip_prefix(family).is_some_and(|rest| {
            ["", "_bucket", "_sum", "_count", "_total", "_created"].contains(&rest)
        }) && !family.is_empty()
    };
    let mut out = String::new();
    let mut copied = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if let Some(comment) = trimmed.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            if let (Some("TYPE" | "HELP"), Some(name)) = (words.next(), words.next()) {
                family = name;
            }
        } else if !trimmed.trim().is_empty() {
            let name = trimmed
                .split(|c: char| c == '{' || c.is_whitespace())
                .next()
                .unwrap_or_default();
            if !belongs(name, family) {
                out.push_str(&text[copied..at]);
                out.push_str("# TYPE ");
                out.push_str(name);
                out.push_str(" untyped\n");
                copied = at;
                family = name;
            }
        }
        at += line.len();
    }
    if out.is_empty() {
        return std::borrow::Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
}

/// Which of the numbers a server's series is, by the names weir knows.
#[derive(Clone, Copy, PartialEq)]
enum Gauge {
    Waiting,
    Running,
    KvCache,
}

/// The response header a server reports its load in (ORCA).
pub const ORCA_HEADER: &str = "endpoint-load-metrics";
/// The same report as a serialized `OrcaLoadReport` (gRPC's per-call reports, in trailers).
pub const ORCA_BIN_HEADER: &str = "endpoint-load-metrics-bin";
/// The request header that asks a server for [`ORCA_HEADER`]: vLLM and Triton report only
/// when asked.
pub const ORCA_FORMAT_HEADER: &str = "endpoint-load-metrics-format";

/// The ORCA report among `headers` (response headers or trailers): [`ORCA_HEADER`] in any of
/// its forms, else [`ORCA_BIN_HEADER`] (base64, padded or not, as gRPC writes binary
/// metadata).
pub fn orca_sample(headers: &http::HeaderMap) -> Option<LoadSample> {
    if let Some(v) = headers.get(ORCA_HEADER) {
        return from_orca(v.to_str().ok()?);
    }
    from_orca_report(&base64_decode(headers.get(ORCA_BIN_HEADER)?.as_bytes())?)
}

fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    use base64::engine::{general_purpose, DecodePaddingMode, Engine, GeneralPurpose};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        general_purpose::GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(text.trim_ascii()).ok()
}

/// Reads an ORCA `endpoint-load-metrics` header in its TEXT
/// (`TEXT cpu_utilization=0.3, named_metrics.kv_cache_utilization=0.4`), JSON
/// (`JSON {"named_metrics": {"kv_cache_utilization": 0.4}}`) or BIN (`BIN ` and a base64
/// `OrcaLoadReport`) form. Of the named metrics, `kv_cache_usage_perc` (vLLM's name) or
/// `kv_cache_utilization` (Triton's), `num_requests_waiting` and `num_requests_running` are
/// used; malformed values give `None`.
pub fn from_orca(header: &str) -> Option<LoadSample> {
    let header = header.trim();
    let named: Vec<(String, f64)> = if let Some(text) = header.strip_prefix("TEXT ") {
        let mut out = Vec::new();
        for pair in text.split(',') {
            let (k, v) = pair.trim().split_once('=')?;
            let v: f64 = v.trim().parse().ok()?;
            if let Some(name) = k.trim().strip_prefix("named_metrics.") {
                out.push((name.to_owned(), v));
            }
        }
        out
    } else if let Some(json) = header.strip_prefix("JSON ") {
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        v.get("named_metrics")
            .and_then(|m| m.as_object())
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default()
    } else if let Some(bin) = header.strip_prefix("BIN ") {
        return from_orca_report(&base64_decode(bin.as_bytes())?);
    } else {
        return None;
    };
    Some(sample(named))
}

/// A serialized `xds.data.orca.v3.OrcaLoadReport`, of which only `named_metrics` is read.
pub fn from_orca_report(bytes: &[u8]) -> Option<LoadSample> {
    #[derive(Clone, PartialEq, prost::Message)]
    struct OrcaLoadReport {
        #[prost(map = "string, double", tag = "8")]
        named_metrics: std::collections::HashMap<String, f64>,
    }
    let report = <OrcaLoadReport as prost::Message>::decode(bytes).ok()?;
    Some(sample(report.named_metrics.into_iter().collect()))
}

fn sample(named: Vec<(String, f64)>) -> LoadSample {
    let get = |names: &[&str]| {
        named
            .iter()
            .find(|(k, _)| names.contains(&k.as_str()))
            .map(|(_, v)| *v)
            .filter(|v| v.is_finite())
    };
    LoadSample {
        waiting: get(&["num_requests_waiting"]),
        running: get(&["num_requests_running"]),
        kv_cache: get(&["kv_cache_usage_perc", "kv_cache_utilization"]),
        adapters: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="llama"} 3.0
vllm:num_requests_running{model_name="llama-sql-lora"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="llama"} 5.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="llama"} 0.42
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model_name="llama"} 12345.0
"#;

    #[test]
    fn vllm_metrics_page_gives_queue_running_and_kv_cache() {
        let s = from_prometheus(VLLM, None).unwrap();
        assert_eq!(
            s,
            LoadSample {
                waiting: Some(5.0),
                running: Some(4.0),
                kv_cache: Some(0.42),
                adapters: None,
            }
        );
        let mut load = Load::default();
        s.apply(&mut load);
        assert_eq!((load.queue_depth, load.kv_cache), (5, 0.42));
        let old = from_prometheus("vllm:gpu_cache_usage_perc 0.9\n", None).unwrap();
        assert_eq!(old.kv_cache, Some(0.9), "older vLLM name");
        assert_eq!(
            from_prometheus("up 1\n", None).unwrap(),
            LoadSample::default()
        );
    }

    #[test]
    fn sglang_trtllm_serve_and_triton_pages_give_the_same_numbers() {
        let sglang = "# TYPE sglang:num_queue_reqs gauge\n\
            sglang:num_queue_reqs{model_name=\"m\"} 6.0\n\
            # TYPE sglang:num_running_reqs gauge\n\
            sglang:num_running_reqs{model_name=\"m\"} 2.0\n\
            # TYPE sglang:token_usage gauge\n\
            sglang:token_usage{model_name=\"m\"} 0.31\n";
        let trtllm_serve = "# TYPE trtllm_num_requests_waiting gauge\n\
            trtllm_num_requests_waiting 6\n\
            # TYPE trtllm_num_requests_running gauge\n\
            trtllm_num_requests_running 2\n\
            # TYPE trtllm_kv_cache_utilization gauge\n\
            trtllm_kv_cache_utilization 0.31\n";
        // Triton's TensorRT-LLM backend: one family per kind, told apart by a label.
        let triton = "# TYPE nv_trt_llm_request_metrics gauge\n\
            nv_trt_llm_request_metrics{model=\"tensorrt_llm\",request_type=\"context\",version=\"1\"} 1\n\
            nv_trt_llm_request_metrics{model=\"tensorrt_llm\",request_type=\"scheduled\",version=\"1\"} 2\n\
            nv_trt_llm_request_metrics{model=\"tensorrt_llm\",request_type=\"waiting\",version=\"1\"} 6\n\
            nv_trt_llm_request_metrics{model=\"tensorrt_llm\",request_type=\"max\",version=\"1\"} 64\n\
            # TYPE nv_trt_llm_kv_cache_block_metrics gauge\n\
            nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\",model=\"tensorrt_llm\",version=\"1\"} 4096\n\
            nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\",model=\"tensorrt_llm\",version=\"1\"} 0.31\n";
        for page in [sglang, trtllm_serve, triton] {
            let s = from_prometheus(page, None).unwrap();
            assert_eq!(
                (s.waiting, s.running, s.kv_cache),
                (Some(6.0), Some(2.0), Some(0.31)),
                "{page}"
            );
        }
    }

    #[test]
    fn series_the_pool_names_replace_the_known_names() {
        // TGI's queue gauge, a KV-cache gauge per device, and vLLM's names beside them.
        let page = "# TYPE tgi_queue_size gauge\n\
            tgi_queue_size 7\n\
            # TYPE vllm:num_requests_waiting gauge\n\
            vllm:num_requests_waiting 3\n\
            # TYPE vllm:kv_cache_usage_perc gauge\n\
            vllm:kv_cache_usage_perc 0.1\n\
            # TYPE cache_use gauge\n\
            cache_use{device=\"gpu0\",kind=\"kv\"} 0.2\n\
            cache_use{device=\"gpu1\",kind=\"kv\"} 0.6\n\
            cache_use{device=\"cpu\",kind=\"swap\"} 0.9\n\
            # TYPE queue gauge\n\
            queue{model=\"a\"} 2\n\
            queue{model=\"b\"} 5\n";
        let scrape = |waiting: Option<&str>, kv_cache: Option<&str>| PoolScrape {
            path: "/metrics".into(),
            interval: std::time::Duration::from_secs(1),
            waiting: waiting.map(|w| w.parse().unwrap()),
            kv_cache: kv_cache.map(|k| k.parse().unwrap()),
        };
        let read = |waiting, kv_cache| {
            let s = from_prometheus(page, Some(&scrape(waiting, kv_cache))).unwrap();
            (s.waiting, s.kv_cache)
        };
        assert_eq!(read(None, None), (Some(3.0), Some(0.1)), "the known names");
        assert_eq!(read(Some("tgi_queue_size"), None), (Some(7.0), Some(0.1)));
        // Every matching series: summed for the queue, the highest for the KV cache.
        assert_eq!(
            read(Some("queue"), Some("cache_use")),
            (Some(7.0), Some(0.9))
        );
        assert_eq!(
            read(Some("queue{model=b}"), Some("cache_use{kind=\"kv\"}")),
            (Some(5.0), Some(0.6))
        );
        // A name the page lacks: nothing said (the known names are not read instead).
        assert_eq!(
            read(Some("absent"), Some("cache_use{kind=gpu}")),
            (None, None)
        );
    }

    #[test]
    fn series_without_a_type_line_are_read() {
        // Allowed by the Prometheus text format: untyped series, alone or after typed ones.
        let page = "tgi_queue_size 7\ncache_use{kind=\"kv\"} 0.4\n\
            # TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 3\n\
            queue{model=\"a\"} 2\nqueue{model=\"b\"} 5\n";
        let scrape = |waiting: &str, kv_cache: &str| PoolScrape {
            path: "/metrics".into(),
            interval: std::time::Duration::from_secs(1),
            waiting: Some(waiting.parse().unwrap()),
            kv_cache: Some(kv_cache.parse().unwrap()),
        };
        let s = from_prometheus(page, Some(&scrape("tgi_queue_size", "cache_use"))).unwrap();
        assert_eq!((s.waiting, s.kv_cache), (Some(7.0), Some(0.4)));
        let s = from_prometheus(page, Some(&scrape("queue", "cache_use"))).unwrap();
        assert_eq!(s.waiting, Some(7.0));
        assert_eq!(from_prometheus(page, None).unwrap().waiting, Some(3.0));
        // A typed page is parsed as it is.
        assert!(matches!(typed(VLLM), std::borrow::Cow::Borrowed(_)));
        assert_eq!(
            typed("# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\nu 2\n"),
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n# TYPE u untyped\nu 2\n"
        );
    }

    #[test]
    fn loaded_lora_adapters_come_from_the_newest_lora_requests_info() {
        let page = r#"# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql-lora",waiting_lora_adapters=""} 1.7643e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="chat-lora,sql-lora",waiting_lora_adapters="math-lora"} 1.7644e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.7642e+09
"#;
        let s = from_prometheus(page, None).unwrap();
        assert_eq!(
            s.adapters,
            Some(vec![
                "chat-lora".into(),
                "math-lora".into(),
                "sql-lora".into()
            ])
        );
        // None loaded now: an empty list, which clears what an earlier scrape said.
        let idle = from_prometheus(
            "vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"} 1.8e+09\n",
            None,
        )
        .unwrap();
        assert_eq!(idle.adapters, Some(vec![]));
        assert_eq!(from_prometheus(VLLM, None).unwrap().adapters, None);
    }

    #[test]
    fn orca_text_json_and_bin_headers() {
        let s = from_orca("TEXT cpu_utilization=0.3, named_metrics.kv_cache_utilization=0.25, named_metrics.num_requests_waiting=2").unwrap();
        assert_eq!(
            (s.kv_cache, s.waiting, s.running),
            (Some(0.25), Some(2.0), None)
        );
        let s = from_orca(
            r#"JSON {"cpu_utilization": 0.3, "named_metrics": {"kv_cache_utilization": 0.5}}"#,
        )
        .unwrap();
        assert_eq!(s.kv_cache, Some(0.5));
        // vLLM's names.
        let s = from_orca(
            "TEXT named_metrics.kv_cache_usage_perc=0.75, named_metrics.num_requests_waiting=3.0",
        )
        .unwrap();
        assert_eq!((s.kv_cache, s.waiting), (Some(0.75), Some(3.0)));
        assert_eq!(
            from_orca("TEXT named_metrics.kv_cache_utilization=NaN")
                .unwrap()
                .kv_cache,
            None
        );
        assert_eq!(
            from_orca("TEXT named_metrics.kv_cache_utilization=lots"),
            None
        );
        // A sample without a field leaves the load's value alone; values are clamped.
        let mut load = Load {
            queue_depth: 7,
            ..Load::default()
        };
        from_orca("TEXT named_metrics.kv_cache_utilization=1.7")
            .unwrap()
            .apply(&mut load);
        assert_eq!((load.queue_depth, load.kv_cache), (7, 1.0));
    }

    /// `named_metrics` as protobuf writes the map: entries of field 8, each a key (1) and a
    /// double (2).
    fn report(metrics: &[(&str, f64)]) -> Vec<u8> {
        let mut out = Vec::new();
        let map: std::collections::HashMap<String, f64> =
            metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        prost::encoding::hash_map::encode(
            prost::encoding::string::encode,
            prost::encoding::string::encoded_len,
            prost::encoding::double::encode,
            prost::encoding::double::encoded_len,
            8,
            &map,
            &mut out,
        );
        // cpu_utilization (1) before it, as servers write it.
        let mut with_cpu = Vec::new();
        prost::encoding::double::encode(1, &0.3, &mut with_cpu);
        with_cpu.extend(out);
        with_cpu
    }

    #[test]
    fn orca_binary_reports_in_either_header() {
        use base64::Engine;
        let bytes = report(&[("kv_cache_usage_perc", 0.5), ("num_requests_waiting", 4.0)]);
        let padded = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let s = from_orca(&format!("BIN {padded}")).unwrap();
        assert_eq!((s.kv_cache, s.waiting), (Some(0.5), Some(4.0)));
        // gRPC binary metadata: its own header, base64 without padding.
        let mut headers = http::HeaderMap::new();
        let unpadded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&bytes);
        headers.insert(ORCA_BIN_HEADER, unpadded.parse().unwrap());
        assert_eq!(orca_sample(&headers), Some(s.clone()));
        // The text header wins when both are there.
        headers.insert(
            ORCA_HEADER,
            "TEXT named_metrics.num_requests_waiting=9".parse().unwrap(),
        );
        assert_eq!(orca_sample(&headers).unwrap().waiting, Some(9.0));
        assert_eq!(from_orca("BIN not base64!"), None);
        assert_eq!(from_orca("BIN AAAA"), None, "not a report");
        assert_eq!(orca_sample(&http::HeaderMap::new()), None);
    }
}
