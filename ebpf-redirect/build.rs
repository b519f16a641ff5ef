//! Compiles `bpf/redirect.bpf.c` with clang into `$OUT_DIR/redirect.bpf.o`. Without clang (or
//! the libbpf headers) the crate still builds: the fast path then reports itself unavailable
//! with the reason. Under `CI=true` a failed compile is an error, so CI never skips it quietly.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/redirect.bpf.c";
    println!("cargo::rerun-if-changed={src}");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rustc-check-cfg=cfg(weir_bpf)");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("redirect.bpf.o");
    let arch_include = format!(
        "/usr/include/{}-linux-gnu",
        std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into())
    );
    let result = Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{arch_include}"))
        .args(["-c", src, "-o"])
        .arg(&out)
        .output();
    let why = match result {
        Ok(o) if o.status.success() => {
            println!("cargo::rustc-cfg=weir_bpf");
            return;
        }
        Ok(o) => format!(
            "clang could not compile {src}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("clang is not installed ({e}); apt-get install clang libbpf-dev"),
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the eBPF fast path cannot be built under CI=true: {why}");
    }
    println!("cargo::warning=eBPF fast path unavailable: {why}");
    println!(
        "cargo::rustc-env=WEIR_BPF_UNAVAILABLE={}",
        why.replace('\n', " ")
    );
}
