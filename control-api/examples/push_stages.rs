//! The CPU cost of the stages of a 10,000-route push that do not involve the network, each
//! timed alone (medians of 30, every route changed each time, regexes already compiled):
//! the compile (the control plane validates, the proxy builds its snapshot), splitting the
//! config into resources (control plane) and applying a delta of every route (proxy).
//! `weir-bench xds` gives the end-to-end figure; this one is for comparing two builds, whose
//! difference the VM's noise hides there. Run: `cargo run --release -p weir-control --example
//! push_stages`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::fmt::Write;
use std::time::Instant;
use weir_control::resources::ResourceSet;
fn policy(routes: usize, generation: usize) -> String {
    let mut out =
        String::from("listeners: [{ name: main, address: \"127.0.0.1:15001\" }]\nroutes:\n");
    for i in 0..routes {
        let _ = writeln!(out, "  - {{ name: r{i}, match: {{ path: {{ prefix: /g{generation}/r{i}/ }}, headers: [{{ name: x-tenant, regex: \"t{i}-.*\" }}] }}, route: {{ cluster: c{} }} }}", i % 10);
    }
    out.push_str("clusters:\n");
    for c in 0..10 {
        let _ = writeln!(out, "  - {{ name: c{c}, endpoints: [{{ address: \"10.0.0.{c}:8080\" }}, {{ address: \"10.0.1.{c}:8080\" }}] }}");
    }
    out
}
fn med(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
fn main() {
    let n = 30;
    let (mut compile, mut sets, mut apply) = (vec![], vec![], vec![]);
    let mut prev = ResourceSet::from_config(&weir_policies::parse("x", &policy(10000, 0)).unwrap());
    let _ = weir_policies::validate::compile(weir_policies::parse("x", &policy(10000, 0)).unwrap());
    for g in 1..=n {
        let c = weir_policies::parse("x", &policy(10000, g)).unwrap();
        let c2 = c.clone();
        let t = Instant::now();
        let s = weir_policies::validate::compile(c).unwrap();
        compile.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let set = ResourceSet::from_config(&c2);
        sets.push(t.elapsed().as_secs_f64() * 1e3);
        let (changed, removed) = prev.diff(&set);
        let mut cand = prev.clone();
        let t = Instant::now();
        cand.apply(false, changed, &removed).unwrap();
        apply.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(cand == set);
        weir_policies::drop_later((s, prev));
        prev = cand;
    }
    println!("medians of {n}, ms: compile {:.2}, split into resources {:.2}, apply all routes changed {:.2}", med(compile), med(sets), med(apply));
}
