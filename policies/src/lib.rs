//! weir's config and policy model.
//!
//! YAML written by hand is parsed ([`load_str`]) into the raw [`model`], validated and compiled
//! into an immutable [`Snapshot`]. Decisions over a snapshot (which route) are pure functions in
//! [`routing`]. No I/O and no async here: the proxy and the control plane bring their own.

pub mod duration;
pub mod error;
pub mod load;
pub mod model;
mod position;
pub mod routing;
pub mod snapshot;
mod split;
pub mod validate;

pub use error::{ConfigError, ConfigErrors};
pub use load::{
    load_many, load_many_with, load_str, parse, parse_cached, FileSpan, EMBEDDED_DEFAULT,
};
pub use snapshot::Snapshot;
pub use split::ItemCache;

/// Threads worth using for one large config (parse, compile, decode): one per CPU this process
/// may run on, at most 8.
pub fn config_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// `f` of each part, in order: the first part on the calling thread, each other on a scoped
/// thread of its own (a panic in one is passed on). For the large configs split by
/// [`config_threads`].
pub fn on_threads<P: Send, R: Send>(parts: Vec<P>, f: impl Fn(P) -> R + Sync) -> Vec<R> {
    let mut parts = parts.into_iter();
    let Some(first) = parts.next() else {
        return Vec::new();
    };
    let f = &f;
    std::thread::scope(|s| {
        let spawned: Vec<_> = parts.map(|p| s.spawn(move || f(p))).collect();
        let mut out = Vec::with_capacity(spawned.len() + 1);
        out.push(f(first));
        out.extend(
            spawned
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
        );
        out
    })
}

/// Drops `value` on a thread of its own at the lowest CPU priority (nice 19): for a large
/// config that was replaced, whose freeing (several ms at 10,000 routes) should not compete
/// with the work that follows it, the ACK and pushing or serving the new one. Never starved:
/// a busy machine still gives it a small share.
pub fn drop_later<T: Send + 'static>(value: T) {
    type Garbage = Box<dyn Send>;
    static DROPPER: std::sync::LazyLock<Option<std::sync::mpsc::Sender<Garbage>>> =
        std::sync::LazyLock::new(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Garbage>();
            std::thread::Builder::new()
                .name("weir-drop".into())
                .spawn(move || {
                    // On Linux the nice value is per thread, and 0 names the calling one.
                    // SAFETY: setpriority takes no pointers; failing leaves the priority as is.
                    #[cfg(target_os = "linux")]
                    unsafe {
                        libc::setpriority(libc::PRIO_PROCESS, 0, 19)
                    };
                    for garbage in rx {
                        drop(garbage);
                    }
                })
                .ok()
                .map(|_| tx)
        });
    match &*DROPPER {
        // Should the thread be gone, the value comes back in the error and is dropped here.
        Some(tx) => drop(tx.send(Box::new(value))),
        None => drop(value),
    }
}
