//! Metrics filters define (`proxy_define_metric`): one registry for the process, so the same
//! name defined by every thread's VM is one metric. Rendered as Prometheus text by the proxy.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::abi::MetricType;

pub struct Metric {
    pub name: String,
    pub kind: MetricType,
    /// Counter or gauge value; histogram sum.
    value: AtomicI64,
    /// Histogram observations.
    count: AtomicU64,
}

#[derive(Default)]
pub struct Registry {
    metrics: Mutex<Vec<Arc<Metric>>>,
}

impl Registry {
    /// The id of `name`, defining it on first use. Ids start at 1.
    pub fn define(&self, name: &str, kind: MetricType) -> u32 {
        let mut all = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = all.iter().position(|m| m.name == name) {
            return i as u32 + 1;
        }
        all.push(Arc::new(Metric {
            name: name.to_owned(),
            kind,
            value: AtomicI64::new(0),
            count: AtomicU64::new(0),
        }));
        all.len() as u32
    }

    pub fn get(&self, id: u32) -> Option<Arc<Metric>> {
        let all = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        all.get((id as usize).wrapping_sub(1)).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Metric>> {
        self.metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Prometheus text for every defined metric, named `weir_wasm_<name>` (sanitised).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for m in self.all() {
            let name: String = m
                .name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let name = format!("weir_wasm_{name}");
            match m.kind {
                MetricType::Counter => {
                    out += &format!("# TYPE {name} counter\n{name} {}\n", m.value())
                }
                MetricType::Gauge => out += &format!("# TYPE {name} gauge\n{name} {}\n", m.value()),
                MetricType::Histogram => {
                    out += &format!(
                        "# TYPE {name} summary\n{name}_sum {}\n{name}_count {}\n",
                        m.value(),
                        m.count.load(Ordering::Relaxed)
                    )
                }
            }
        }
        out
    }
}

impl Metric {
    pub fn value(&self) -> i64 {
        self.value.load(Ordering::Relaxed)
    }

    pub fn increment(&self, by: i64) {
        self.value.fetch_add(by, Ordering::Relaxed);
    }

    pub fn record(&self, v: u64) {
        match self.kind {
            MetricType::Histogram => {
                self.value.fetch_add(v as i64, Ordering::Relaxed);
                self.count.fetch_add(1, Ordering::Relaxed);
            }
            _ => self.value.store(v as i64, Ordering::Relaxed),
        }
    }
}
