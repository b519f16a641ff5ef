//! The endpoint picker for inference pools: a pure function from a request's model needs and
//! each replica's state and load to a decision. No I/O; the proxy feeds it what health checks,
//! metric scrapes (`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`), ORCA load reports
//! and weight-reload signals told it.
//!
//! Order of the decision:
//! 1. Only replicas that serve the model (and the version and LoRA adapter, when asked) count.
//!    None: [`Pick::UnknownModel`].
//! 2. Of those, only replicas whose model is `Serving` take new requests. None (all draining,
//!    reloading or warming): [`Pick::WaitForReload`] — the caller waits, bounded, instead of
//!    failing.
//! 3. Of those, replicas at their concurrency limit or with a full KV cache are skipped. None:
//!    [`Pick::Queue`].
//! 4. The rest are scored by load (in-flight streams, queue depth, KV-cache use); the replica
//!    that already holds the prompt's prefix (rendezvous hash of the prefix, kept only while its
//!    load stays within a bound of the average) and replicas with the adapter already loaded get
//!    a bonus. Lowest score wins; ties go to the lowest index, so the result is deterministic.

/// Where a replica's copy of a model is in the weight-reload cycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelState {
    Serving,
    /// Finishing in-flight streams; takes no new ones.
    Draining,
    Reloading,
    /// Loaded, running its warm-up request.
    Warming,
}

/// One model on one replica.
#[derive(Clone, Debug)]
pub struct ServedModel {
    pub name: String,
    pub version: Option<String>,
    /// LoRA adapters this replica can serve for the model.
    pub adapters: Vec<String>,
    pub state: ModelState,
}

/// A replica's load, as last reported.
#[derive(Clone, Copy, Debug, Default)]
pub struct Load {
    /// Streams weir has open to it.
    pub in_flight: u32,
    /// Most streams it takes at once (0: no limit).
    pub max_in_flight: u32,
    /// Requests waiting in its own queue (`vllm:num_requests_waiting`).
    pub queue_depth: u32,
    /// KV-cache use, 0.0 to 1.0 (`vllm:kv_cache_usage_perc`).
    pub kv_cache: f64,
}

/// A replica as the picker sees it.
#[derive(Clone, Debug)]
pub struct Replica {
    pub models: Vec<ServedModel>,
    /// LoRA adapters loaded in its memory now (serving them needs no swap).
    pub loaded_adapters: Vec<String>,
    pub load: Load,
}

/// What a request needs.
#[derive(Clone, Copy, Debug)]
pub struct Need<'a> {
    pub model: &'a str,
    pub version: Option<&'a str>,
    pub adapter: Option<&'a str>,
    /// Hash of the prompt's leading tokens, for prefix-cache affinity.
    pub prefix: Option<u64>,
}

/// How much each signal weighs: the pool's `picker` settings.
pub use weir_policies::model::PickerSettings as Weights;

/// The picker's decision.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Pick {
    /// Send it to this replica (index into the slice given).
    Replica(usize),
    /// Replicas serve the model but all are busy: queue it (up to the pool's limit, then shed
    /// with 429 / RESOURCE_EXHAUSTED).
    Queue,
    /// Every replica of the model is draining, reloading or warming: wait for one (bounded).
    WaitForReload,
    /// No replica serves this model, version or adapter (404 / NOT_FOUND).
    UnknownModel,
}

fn serves<'a>(r: &'a Replica, need: &Need) -> Option<&'a ServedModel> {
    r.models.iter().find(|m| {
        m.name == need.model
            && need.version.is_none_or(|v| m.version.as_deref() == Some(v))
            && need
                .adapter
                .is_none_or(|a| m.adapters.iter().any(|x| x == a))
    })
}

fn full(r: &Replica, w: &Weights) -> bool {
    (r.load.max_in_flight > 0 && r.load.in_flight >= r.load.max_in_flight)
        || r.load.kv_cache >= w.kv_cache_full
}

/// The load the score and the prefix bound compare.
fn load_score(r: &Replica, w: &Weights) -> f64 {
    let fill = if r.load.max_in_flight > 0 {
        f64::from(r.load.in_flight) / f64::from(r.load.max_in_flight)
    } else {
        f64::from(r.load.in_flight)
    };
    w.in_flight * fill + w.queue * f64::from(r.load.queue_depth) + w.kv_cache * r.load.kv_cache
}

/// Rendezvous (highest random weight) hash of a prefix and a replica: the same prefix keeps
/// the same replica while the set is unchanged, and only its keys move when one leaves.
fn rendezvous(prefix: u64, replica: usize) -> u64 {
    // splitmix64 of the pair: cheap and well mixed.
    let mut z = prefix ^ (replica as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Picks a replica for `need`; see the module doc for the order of the decision.
pub fn pick(need: &Need, replicas: &[Replica], w: &Weights) -> Pick {
    let serving: Vec<usize> = replicas
        .iter()
        .enumerate()
        .filter(|(_, r)| serves(r, need).is_some())
        .map(|(i, _)| i)
        .collect();
    if serving.is_empty() {
        return Pick::UnknownModel;
    }
    let ready: Vec<usize> = serving
        .into_iter()
        .filter(|i| serves(&replicas[*i], need).is_some_and(|m| m.state == ModelState::Serving))
        .collect();
    if ready.is_empty() {
        return Pick::WaitForReload;
    }
    let open: Vec<usize> = ready
        .into_iter()
        .filter(|i| !full(&replicas[*i], w))
        .collect();
    if open.is_empty() {
        return Pick::Queue;
    }
    let loads: Vec<f64> = open.iter().map(|i| load_score(&replicas[*i], w)).collect();
    let average = loads.iter().sum::<f64>() / loads.len() as f64;
    // The prefix's replica, among all ready ones, so it does not move when others fill up.
    let home = need.prefix.and_then(|p| {
        open.iter()
            .copied()
            .max_by_key(|i| (rendezvous(p, *i), std::cmp::Reverse(*i)))
    });
    let mut best: Option<(f64, usize)> = None;
    for (k, &i) in open.iter().enumerate() {
        let r = &replicas[i];
        let mut score = loads[k];
        // Bounded load: the home replica keeps its pull only while it is not much busier
        // than the rest.
        if home == Some(i) && loads[k] <= w.bounded_load * average + f64::EPSILON {
            score -= w.prefix_affinity;
        }
        if need
            .adapter
            .is_some_and(|a| r.loaded_adapters.iter().any(|x| x == a))
        {
            score -= w.lora_affinity;
        }
        if best.is_none_or(|(s, _)| score < s) {
            best = Some((score, i));
        }
    }
    best.map_or(Pick::Queue, |(_, i)| Pick::Replica(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, version: &str, state: ModelState) -> ServedModel {
        ServedModel {
            name: name.into(),
            version: Some(version.into()),
            adapters: vec!["sql-lora".into(), "chat-lora".into()],
            state,
        }
    }

    fn replica(models: Vec<ServedModel>, in_flight: u32, kv: f64) -> Replica {
        Replica {
            models,
            loaded_adapters: Vec::new(),
            load: Load {
                in_flight,
                max_in_flight: 8,
                queue_depth: 0,
                kv_cache: kv,
            },
        }
    }

    fn need(model: &str) -> Need<'_> {
        Need {
            model,
            version: None,
            adapter: None,
            prefix: None,
        }
    }

    fn serving(name: &str) -> Vec<ServedModel> {
        vec![model(name, "v1", ModelState::Serving)]
    }

    #[test]
    fn only_replicas_serving_the_model_version_and_adapter_count() {
        let rs = vec![
            replica(serving("llama"), 0, 0.0),
            replica(vec![model("llama", "v2", ModelState::Serving)], 3, 0.5),
            replica(serving("mistral"), 0, 0.0),
        ];
        let w = Weights::default();
        assert_eq!(pick(&need("llama"), &rs, &w), Pick::Replica(0));
        let v2 = Need {
            version: Some("v2"),
            ..need("llama")
        };
        assert_eq!(
            pick(&v2, &rs, &w),
            Pick::Replica(1),
            "only replica 1 has v2"
        );
        assert_eq!(pick(&need("mistral"), &rs, &w), Pick::Replica(2));
        assert_eq!(pick(&need("gpt"), &rs, &w), Pick::UnknownModel);
        let no_adapter = Need {
            adapter: Some("other-lora"),
            ..need("llama")
        };
        assert_eq!(pick(&no_adapter, &rs, &w), Pick::UnknownModel);
    }

    #[test]
    fn draining_and_reloading_replicas_get_no_new_requests() {
        let mut rs = vec![
            replica(vec![model("m", "v1", ModelState::Draining)], 0, 0.0),
            replica(vec![model("m", "v1", ModelState::Serving)], 7, 0.9),
        ];
        let w = Weights::default();
        assert_eq!(
            pick(&need("m"), &rs, &w),
            Pick::Replica(1),
            "busy but serving beats idle but draining"
        );
        rs[1].models[0].state = ModelState::Reloading;
        assert_eq!(pick(&need("m"), &rs, &w), Pick::WaitForReload);
        rs[1].models[0].state = ModelState::Warming;
        assert_eq!(pick(&need("m"), &rs, &w), Pick::WaitForReload);
        rs[0].models[0].state = ModelState::Serving;
        assert_eq!(pick(&need("m"), &rs, &w), Pick::Replica(0));
    }

    #[test]
    fn full_replicas_are_skipped_and_all_full_means_queue() {
        let mut rs = vec![
            replica(serving("m"), 8, 0.1),
            replica(serving("m"), 2, 0.99),
        ];
        let w = Weights::default();
        assert_eq!(
            pick(&need("m"), &rs, &w),
            Pick::Queue,
            "one at its limit, one with a full KV cache"
        );
        rs[1].load.kv_cache = 0.5;
        assert_eq!(pick(&need("m"), &rs, &w), Pick::Replica(1));
    }

    #[test]
    fn least_loaded_wins_counting_streams_queue_and_kv_cache() {
        let mut rs = vec![
            replica(serving("m"), 4, 0.2),
            replica(serving("m"), 1, 0.2),
            replica(serving("m"), 1, 0.2),
        ];
        rs[1].load.queue_depth = 3;
        let w = Weights::default();
        assert_eq!(
            pick(&need("m"), &rs, &w),
            Pick::Replica(2),
            "1 busy with a queue"
        );
        rs[2].load.kv_cache = 0.95;
        assert_eq!(
            pick(&need("m"), &rs, &w),
            Pick::Replica(0),
            "2's cache is nearly full"
        );
    }

    #[test]
    fn a_prefix_sticks_to_one_replica_until_it_is_too_busy() {
        let mut rs: Vec<Replica> = (0..4).map(|_| replica(serving("m"), 2, 0.3)).collect();
        let w = Weights::default();
        let mut homes = std::collections::HashSet::new();
        for prefix in 0..64u64 {
            let n = Need {
                prefix: Some(prefix),
                ..need("m")
            };
            let first = pick(&n, &rs, &w);
            assert_eq!(pick(&n, &rs, &w), first, "stable for prefix {prefix}");
            homes.insert(first);
        }
        assert_eq!(
            homes.len(),
            4,
            "prefixes spread over all replicas: {homes:?}"
        );
        let n = Need {
            prefix: Some(7),
            ..need("m")
        };
        let Pick::Replica(home) = pick(&n, &rs, &w) else {
            panic!("no replica")
        };
        // Busier than the bound allows: the prefix goes elsewhere, and comes back when it eases.
        rs[home].load.in_flight = 7;
        assert_ne!(pick(&n, &rs, &w), Pick::Replica(home));
        rs[home].load.in_flight = 2;
        assert_eq!(pick(&n, &rs, &w), Pick::Replica(home));
        // Removing another replica does not move this prefix (rendezvous hashing).
        let other = (home + 1) % 4;
        rs[other].models[0].state = ModelState::Draining;
        assert_eq!(pick(&n, &rs, &w), Pick::Replica(home));
    }

    #[test]
    fn a_loaded_adapter_attracts_its_requests() {
        let mut rs = vec![replica(serving("m"), 1, 0.2), replica(serving("m"), 1, 0.2)];
        rs[1].loaded_adapters = vec!["sql-lora".into()];
        let w = Weights::default();
        let n = Need {
            adapter: Some("sql-lora"),
            ..need("m")
        };
        assert_eq!(pick(&n, &rs, &w), Pick::Replica(1));
        assert_eq!(
            pick(&need("m"), &rs, &w),
            Pick::Replica(0),
            "no adapter: plain tie, lowest index"
        );
        rs[1].load.in_flight = 6;
        assert_eq!(
            pick(&n, &rs, &w),
            Pick::Replica(0),
            "affinity does not beat a real load gap"
        );
    }
}
