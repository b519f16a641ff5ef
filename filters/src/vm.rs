//! One instance of one plugin's module: a wasmtime store with its limits, the exported
//! callbacks, and the root context.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Instance, InstancePre, Store, StoreLimitsBuilder, TypedFunc};

use crate::host::HostState;
use crate::types::PluginConfig;

/// A plugin compiled once and ready to instantiate on any thread.
pub struct Plugin {
    pub config: Arc<PluginConfig>,
    pub pre: InstancePre<HostState>,
}

type F<P, R> = Option<TypedFunc<P, R>>;

/// The callbacks a module exports (any may be missing; a missing one is a no-op).
pub struct Exports {
    pub context_create: F<(i32, i32), ()>,
    pub vm_start: F<(i32, i32), i32>,
    pub configure: F<(i32, i32), i32>,
    pub tick: F<i32, ()>,
    pub queue_ready: F<(i32, i32), ()>,
    pub request_headers: F<(i32, i32, i32), i32>,
    pub request_body: F<(i32, i32, i32), i32>,
    pub request_trailers: F<(i32, i32), i32>,
    pub response_headers: F<(i32, i32, i32), i32>,
    pub response_body: F<(i32, i32, i32), i32>,
    pub response_trailers: F<(i32, i32), i32>,
    pub log: F<i32, ()>,
    pub done: F<i32, i32>,
    pub delete: F<i32, ()>,
    pub http_call_response: F<(i32, i32, i32, i32, i32), ()>,
    pub grpc_receive: F<(i32, i32, i32), ()>,
    pub grpc_close: F<(i32, i32, i32), ()>,
}

pub struct Vm {
    pub store: Store<HostState>,
    pub f: Exports,
    pub root_context: u32,
    next_context: u32,
    /// Bumped each time the VM is recreated; contexts of an older generation are gone.
    pub generation: u64,
    /// A callback trapped or ran out of time: recreate before the next use.
    pub failed: bool,
    pub next_tick: Option<Instant>,
    /// Epoch ticks one callback may use.
    deadline_ticks: u64,
}

/// How often the ticker advances the epoch; the granularity of CPU deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(2);

fn get<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
    store: &mut Store<HostState>,
    instance: &Instance,
    name: &str,
) -> F<P, R> {
    instance.get_typed_func::<P, R>(&mut *store, name).ok()
}

impl Vm {
    /// Instantiates `plugin` and runs its start-up: `_initialize` (or `_start`), the root
    /// context, `proxy_on_vm_start` and `proxy_on_configure`. An error says which step failed.
    pub fn new(
        engine: &wasmtime::Engine,
        plugin: &Plugin,
        mut state: HostState,
        memory_bytes: usize,
        deadline: Duration,
        generation: u64,
    ) -> Result<Self, String> {
        state.limits = StoreLimitsBuilder::new()
            .memory_size(memory_bytes)
            .instances(1)
            .tables(4)
            .memories(1)
            .build();
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        let deadline_ticks = (deadline.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1;
        store.set_epoch_deadline(deadline_ticks);
        let instance = plugin
            .pre
            .instantiate(&mut store)
            .map_err(|e| format!("instantiating the module failed: {e:#}"))?;
        if instance
            .get_func(&mut store, "proxy_abi_version_0_2_1")
            .or_else(|| instance.get_func(&mut store, "proxy_abi_version_0_2_0"))
            .is_none()
        {
            return Err(
                "the module exports no proxy_abi_version_0_2_x: not a proxy-wasm 0.2 filter".into(),
            );
        }
        let f = Exports {
            context_create: get(&mut store, &instance, "proxy_on_context_create"),
            vm_start: get(&mut store, &instance, "proxy_on_vm_start"),
            configure: get(&mut store, &instance, "proxy_on_configure"),
            tick: get(&mut store, &instance, "proxy_on_tick"),
            queue_ready: get(&mut store, &instance, "proxy_on_queue_ready"),
            request_headers: get(&mut store, &instance, "proxy_on_request_headers"),
            request_body: get(&mut store, &instance, "proxy_on_request_body"),
            request_trailers: get(&mut store, &instance, "proxy_on_request_trailers"),
            response_headers: get(&mut store, &instance, "proxy_on_response_headers"),
            response_body: get(&mut store, &instance, "proxy_on_response_body"),
            response_trailers: get(&mut store, &instance, "proxy_on_response_trailers"),
            log: get(&mut store, &instance, "proxy_on_log"),
            done: get(&mut store, &instance, "proxy_on_done"),
            delete: get(&mut store, &instance, "proxy_on_delete"),
            http_call_response: get(&mut store, &instance, "proxy_on_http_call_response"),
            grpc_receive: get(&mut store, &instance, "proxy_on_grpc_receive"),
            grpc_close: get(&mut store, &instance, "proxy_on_grpc_close"),
        };
        let init = get::<(), ()>(&mut store, &instance, "_initialize")
            .or_else(|| get::<(), ()>(&mut store, &instance, "_start"));
        let mut vm = Vm {
            store,
            f,
            root_context: 1,
            next_context: 2,
            generation,
            failed: false,
            next_tick: None,
            deadline_ticks,
        };
        if let Some(init) = init {
            vm.call(|s| init.call(s, ()))
                .map_err(|e| format!("_initialize failed: {e}"))?;
        }
        let root = vm.root_context as i32;
        if let Some(f) = vm.f.context_create.clone() {
            vm.call(|s| f.call(s, (root, 0)))
                .map_err(|e| format!("proxy_on_context_create (root) failed: {e}"))?;
        }
        let (vm_len, plugin_len) = (
            plugin.config.vm_config.len() as i32,
            plugin.config.plugin_config.len() as i32,
        );
        if let Some(f) = vm.f.vm_start.clone() {
            if vm
                .call(|s| f.call(s, (root, vm_len)))
                .map_err(|e| format!("proxy_on_vm_start failed: {e}"))?
                == 0
            {
                return Err("proxy_on_vm_start returned false (the VM config was rejected)".into());
            }
        }
        if let Some(f) = vm.f.configure.clone() {
            if vm
                .call(|s| f.call(s, (root, plugin_len)))
                .map_err(|e| format!("proxy_on_configure failed: {e}"))?
                == 0
            {
                return Err(
                    "proxy_on_configure returned false (the plugin config was rejected)".into(),
                );
            }
        }
        vm.schedule_tick();
        Ok(vm)
    }

    /// Runs one guest call under the CPU deadline. A trap (including the deadline and memory
    /// limits) marks the VM failed; the error names the cause.
    pub fn call<R>(
        &mut self,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, String> {
        if self.failed {
            return Err("the filter VM failed earlier".into());
        }
        self.store.set_epoch_deadline(self.deadline_ticks);
        match f(&mut self.store) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.failed = true;
                let why = match e.downcast_ref::<wasmtime::Trap>() {
                    Some(wasmtime::Trap::Interrupt) => "exceeded its CPU deadline".to_string(),
                    Some(t) => format!("trapped: {t}"),
                    None => format!("failed: {e:#}"),
                };
                Err(why)
            }
        }
    }

    pub fn new_context(&mut self) -> u32 {
        let id = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(2);
        id
    }

    /// Sets the next tick from the period the filter asked for.
    pub fn schedule_tick(&mut self) {
        self.next_tick = self.store.data().tick_period.map(|p| Instant::now() + p);
    }

    /// Runs `proxy_on_tick` if it is due.
    pub fn tick_if_due(&mut self, now: Instant) {
        if self.failed || self.next_tick.is_none_or(|t| t > now) {
            return;
        }
        if let Some(f) = self.f.tick.clone() {
            let root = self.root_context as i32;
            if let Err(e) = self.call(|s| f.call(s, root)) {
                tracing::warn!(plugin = %self.store.data().plugin.name, "proxy_on_tick: {e}");
            }
        }
        self.schedule_tick();
    }
}
