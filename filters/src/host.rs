//! The host side of the proxy-wasm ABI 0.2.1: every `env` function the proxy-wasm SDK imports,
//! the WASI calls it needs, and `Unimplemented` stubs for anything else a module imports.
//! Host functions never trap on bad guest input: they return a status.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Extern, FuncType, Linker, Module, StoreLimits, Val, ValType};

use crate::abi::{self, BufferType, MapType, Pairs, Status};
use crate::metrics::Registry;
use crate::shared::{QueueOwner, Shared};
use crate::types::{
    Callout, CalloutResult, Callouts, GrpcCall, HttpCall, LocalResponse, PluginConfig, StreamInfo,
};

/// Bits of [`StreamData::dirty`]: which parts filters changed.
pub const DIRTY_REQUEST_HEADERS: u8 = 1;
pub const DIRTY_RESPONSE_HEADERS: u8 = 2;
pub const DIRTY_REQUEST_TRAILERS: u8 = 4;
pub const DIRTY_RESPONSE_TRAILERS: u8 = 8;

/// One stream's data while its filters run.
#[derive(Default)]
pub struct StreamData {
    pub info: Arc<StreamInfo>,
    pub request_headers: Pairs,
    pub request_trailers: Pairs,
    pub response_headers: Pairs,
    pub response_trailers: Pairs,
    /// The body bytes the current body callback sees (buffered ones included).
    pub request_body: Vec<u8>,
    pub response_body: Vec<u8>,
    pub dirty: u8,
    /// Set with `proxy_set_property`.
    pub properties: HashMap<String, Vec<u8>>,
    pub local: Option<LocalResponse>,
    /// `proxy_continue_stream` for the request (0) and the response (1).
    pub resume: [bool; 2],
    pub close: bool,
    /// Callouts made during the current callback, with their tokens.
    pub new_calls: Vec<(u32, Callout)>,
    /// The callout result being delivered.
    pub call_result: Option<CalloutResult>,
}

/// The data of one VM's store.
pub struct HostState {
    pub limits: StoreLimits,
    pub plugin: Arc<PluginConfig>,
    pub shared: Arc<Shared>,
    pub metrics: Arc<Registry>,
    pub callouts: Arc<dyn Callouts>,
    /// Present while a stream callback runs.
    pub stream: Option<StreamData>,
    /// Set by `proxy_set_tick_period_milliseconds`.
    pub tick_period: Option<Duration>,
    pub next_token: u32,
    /// Identifies this VM's root context for shared queue notifications.
    pub queue_owner: QueueOwner,
    /// Tells the owner of a queue that it has data.
    pub notify_queue: Arc<dyn Fn(QueueOwner, u32) + Send + Sync>,
    /// Bytes written to stdout/stderr, logged line by line.
    pub stdio: Vec<u8>,
    /// Callouts a root context made (from `proxy_on_tick` and friends), with their tokens.
    pub root_calls: Vec<(u32, Callout)>,
    /// The callout result being delivered to the root context.
    pub root_call_result: Option<CalloutResult>,
}

impl HostState {
    /// The callout result being delivered, to a stream or to the root context.
    fn call_result(&self) -> Option<&CalloutResult> {
        match &self.stream {
            Some(s) => s.call_result.as_ref(),
            None => self.root_call_result.as_ref(),
        }
    }

    fn map(&self, map: MapType) -> Option<&Pairs> {
        let Some(s) = self.stream.as_ref() else {
            return match (map, self.call_result()) {
                (MapType::CallResponseHeaders, Some(CalloutResult::Http(Some(r)))) => {
                    Some(&r.headers)
                }
                (MapType::CallResponseTrailers, Some(CalloutResult::Http(Some(r)))) => {
                    Some(&r.trailers)
                }
                (MapType::GrpcInitialMetadata, Some(CalloutResult::Grpc(r))) => {
                    Some(&r.initial_metadata)
                }
                (MapType::GrpcTrailingMetadata, Some(CalloutResult::Grpc(r))) => {
                    Some(&r.trailing_metadata)
                }
                _ => None,
            };
        };
        Some(match map {
            MapType::RequestHeaders => &s.request_headers,
            MapType::RequestTrailers => &s.request_trailers,
            MapType::ResponseHeaders => &s.response_headers,
            MapType::ResponseTrailers => &s.response_trailers,
            MapType::CallResponseHeaders => match &s.call_result {
                Some(CalloutResult::Http(Some(r))) => &r.headers,
                _ => return None,
            },
            MapType::CallResponseTrailers => match &s.call_result {
                Some(CalloutResult::Http(Some(r))) => &r.trailers,
                _ => return None,
            },
            MapType::GrpcInitialMetadata => match &s.call_result {
                Some(CalloutResult::Grpc(r)) => &r.initial_metadata,
                _ => return None,
            },
            MapType::GrpcTrailingMetadata => match &s.call_result {
                Some(CalloutResult::Grpc(r)) => &r.trailing_metadata,
                _ => return None,
            },
        })
    }

    /// The writable maps: the stream's own headers and trailers.
    fn map_mut(&mut self, map: MapType) -> Option<&mut Pairs> {
        let s = self.stream.as_mut()?;
        let (m, bit) = match map {
            MapType::RequestHeaders => (&mut s.request_headers, DIRTY_REQUEST_HEADERS),
            MapType::RequestTrailers => (&mut s.request_trailers, DIRTY_REQUEST_TRAILERS),
            MapType::ResponseHeaders => (&mut s.response_headers, DIRTY_RESPONSE_HEADERS),
            MapType::ResponseTrailers => (&mut s.response_trailers, DIRTY_RESPONSE_TRAILERS),
            _ => return None,
        };
        s.dirty |= bit;
        Some(m)
    }

    fn buffer(&self, kind: BufferType) -> Option<&[u8]> {
        match kind {
            BufferType::VmConfiguration => Some(&self.plugin.vm_config),
            BufferType::PluginConfiguration => Some(&self.plugin.plugin_config),
            _ => {
                let stream = self.stream.as_ref();
                match (kind, self.call_result()) {
                    (BufferType::RequestBody, _) => stream.map(|s| &s.request_body[..]),
                    (BufferType::ResponseBody, _) => stream.map(|s| &s.response_body[..]),
                    (BufferType::CallResponseBody, Some(CalloutResult::Http(Some(r)))) => {
                        Some(&r.body)
                    }
                    (BufferType::GrpcReceive, Some(CalloutResult::Grpc(r))) => r.body.as_deref(),
                    _ => None,
                }
            }
        }
    }

    /// The value of property `path` as Envoy encodes it: strings as bytes, numbers as 8-byte
    /// little-endian integers.
    pub fn property(&self, path: &[String]) -> Option<Vec<u8>> {
        let key = path.join(".");
        let p = &self.plugin;
        match key.as_str() {
            "plugin_name" => return Some(p.name.clone().into_bytes()),
            "plugin_root_id" => return Some(p.root_id.clone().into_bytes()),
            "plugin_vm_id" => return Some(p.vm_id.clone().into_bytes()),
            _ => {}
        }
        let s = self.stream.as_ref()?;
        if let Some(v) = s.properties.get(&key) {
            return Some(v.clone());
        }
        let header =
            |map: &Pairs, name: &str| map.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let req = &s.request_headers;
        let path_value = header(req, ":path");
        let int = |v: i64| Some(v.to_le_bytes().to_vec());
        let addr = |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string().into_bytes());
        let port = |a: Option<std::net::SocketAddr>| a.and_then(|a| int(a.port() as i64));
        match key.as_str() {
            "request.path" => path_value,
            "request.url_path" => path_value.map(|p| {
                let end = p.iter().position(|b| *b == b'?').unwrap_or(p.len());
                p[..end].to_vec()
            }),
            "request.query" => path_value.map(|p| match p.iter().position(|b| *b == b'?') {
                Some(i) => p[i + 1..].to_vec(),
                None => Vec::new(),
            }),
            "request.host" => header(req, ":authority"),
            "request.method" => header(req, ":method"),
            "request.scheme" => header(req, ":scheme"),
            "request.id" => header(req, "x-request-id"),
            "request.useragent" => header(req, "user-agent"),
            "request.referer" => header(req, "referer"),
            "request.protocol" => Some(s.info.protocol.as_bytes().to_vec()),
            "request.time" => s
                .info
                .start
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .and_then(|d| int(d.as_nanos() as i64)),
            "response.code" => header(&s.response_headers, ":status")
                .and_then(|v| String::from_utf8(v).ok()?.parse::<i64>().ok())
                .and_then(int),
            "response.grpc_status" => header(&s.response_trailers, "grpc-status")
                .or_else(|| header(&s.response_headers, "grpc-status"))
                .and_then(|v| String::from_utf8(v).ok()?.parse::<i64>().ok())
                .and_then(int),
            "source.address" => addr(s.info.source),
            "source.port" => port(s.info.source),
            "destination.address" => addr(s.info.destination),
            "destination.port" => port(s.info.destination),
            "xds.route_name" | "route_name" => Some(s.info.route.clone().into_bytes()),
            "xds.cluster_name" | "cluster_name" => Some(s.info.cluster.clone().into_bytes()),
            "xds.listener_name" | "listener_name" => Some(s.info.listener.clone().into_bytes()),
            _ => None,
        }
        .filter(|_| !key.is_empty())
    }
}

// ---- guest memory ----

type C<'a> = Caller<'a, HostState>;

fn memory(caller: &mut C<'_>) -> Option<wasmtime::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Some(m),
        _ => None,
    }
}

fn read(caller: &mut C<'_>, ptr: i32, len: i32) -> Result<Vec<u8>, Status> {
    let mem = memory(caller).ok_or(Status::InvalidMemoryAccess)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    let data = mem.data(&caller);
    data.get(ptr..ptr.checked_add(len).ok_or(Status::InvalidMemoryAccess)?)
        .map(<[u8]>::to_vec)
        .ok_or(Status::InvalidMemoryAccess)
}

fn read_str(caller: &mut C<'_>, ptr: i32, len: i32) -> Result<String, Status> {
    read(caller, ptr, len).map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn write(caller: &mut C<'_>, ptr: i32, bytes: &[u8]) -> Result<(), Status> {
    let mem = memory(caller).ok_or(Status::InvalidMemoryAccess)?;
    let ptr = ptr as u32 as usize;
    mem.data_mut(caller)
        .get_mut(ptr..ptr + bytes.len())
        .ok_or(Status::InvalidMemoryAccess)?
        .copy_from_slice(bytes);
    Ok(())
}

fn write_u32(caller: &mut C<'_>, ptr: i32, v: u32) -> Result<(), Status> {
    write(caller, ptr, &v.to_le_bytes())
}

/// Copies `bytes` into memory the guest allocates, and stores its address and size at
/// `ptr_ptr` / `size_ptr`. Empty data is returned as (0, 0) without allocating.
fn give(caller: &mut C<'_>, bytes: &[u8], ptr_ptr: i32, size_ptr: i32) -> Result<(), Status> {
    if bytes.is_empty() {
        write_u32(caller, ptr_ptr, 0)?;
        return write_u32(caller, size_ptr, 0);
    }
    let alloc = ["proxy_on_memory_allocate", "malloc"]
        .iter()
        .find_map(|n| caller.get_export(n)?.into_func())
        .ok_or(Status::InternalFailure)?;
    let alloc = alloc
        .typed::<i32, i32>(&caller)
        .map_err(|_| Status::InternalFailure)?;
    let at = alloc
        .call(&mut *caller, bytes.len() as i32)
        .map_err(|_| Status::InternalFailure)?;
    if at == 0 {
        return Err(Status::InternalFailure);
    }
    write(caller, at, bytes)?;
    write_u32(caller, ptr_ptr, at as u32)?;
    write_u32(caller, size_ptr, bytes.len() as u32)
}

fn code(r: Result<(), Status>) -> i32 {
    match r {
        Ok(()) => Status::Ok as i32,
        Err(s) => s as i32,
    }
}

fn map_type(v: i32) -> Result<MapType, Status> {
    MapType::from_abi(v as u32).ok_or(Status::BadArgument)
}

fn stream_mut<'a>(caller: &'a mut C<'_>) -> Result<&'a mut StreamData, Status> {
    caller.data_mut().stream.as_mut().ok_or(Status::NotFound)
}

fn header_of<'a>(map: &'a Pairs, name: &str) -> Option<&'a [u8]> {
    map.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

fn log_line(plugin: &str, level: i32, msg: &str) {
    match level {
        0 => tracing::trace!(plugin, "{msg}"),
        1 => tracing::debug!(plugin, "{msg}"),
        2 => tracing::info!(plugin, "{msg}"),
        3 => tracing::warn!(plugin, "{msg}"),
        _ => tracing::error!(plugin, "{msg}"),
    }
}

/// Builds the linker with every host function.
pub fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut l = Linker::new(engine);
    let env = "env";

    l.func_wrap(
        env,
        "proxy_log",
        |mut c: C<'_>, level: i32, ptr: i32, len: i32| {
            code(read_str(&mut c, ptr, len).map(|msg| log_line(&c.data().plugin.name, level, &msg)))
        },
    )?;
    l.func_wrap(env, "proxy_get_log_level", |mut c: C<'_>, ret: i32| {
        let level = if tracing::enabled!(tracing::Level::TRACE) {
            0
        } else if tracing::enabled!(tracing::Level::DEBUG) {
            1
        } else {
            2
        };
        code(write_u32(&mut c, ret, level))
    })?;
    l.func_wrap(
        env,
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ret: i32| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            code(write(&mut c, ret, &now.to_le_bytes()))
        },
    )?;
    l.func_wrap(
        env,
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, ms: i32| {
            c.data_mut().tick_period = (ms != 0).then(|| Duration::from_millis(ms as u32 as u64));
            Status::Ok as i32
        },
    )?;

    // ---- buffers ----
    l.func_wrap(
        env,
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, max: i32, ret_ptr: i32, ret_size: i32| {
            let r = (|| {
                let kind = BufferType::from_abi(kind as u32).ok_or(Status::BadArgument)?;
                let buf = c.data().buffer(kind).ok_or(Status::NotFound)?;
                let start = start as u32 as usize;
                if start > buf.len() {
                    return Err(Status::BadArgument);
                }
                let end = start.saturating_add(max as u32 as usize).min(buf.len());
                let bytes = buf[start..end].to_vec();
                give(&mut c, &bytes, ret_ptr, ret_size)
            })();
            code(r)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, size: i32, ptr: i32, len: i32| {
            let r = (|| {
                let kind = BufferType::from_abi(kind as u32).ok_or(Status::BadArgument)?;
                let data = read(&mut c, ptr, len)?;
                let s = stream_mut(&mut c)?;
                let buf = match kind {
                    BufferType::RequestBody => &mut s.request_body,
                    BufferType::ResponseBody => &mut s.response_body,
                    _ => return Err(Status::BadArgument),
                };
                let start = (start as u32 as usize).min(buf.len());
                let end = start.saturating_add(size as u32 as usize).min(buf.len());
                buf.splice(start..end, data);
                Ok(())
            })();
            code(r)
        },
    )?;

    // ---- header maps ----
    l.func_wrap(
        env,
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, map: i32, ret_ptr: i32, ret_size: i32| {
            let r = (|| {
                let map = c.data().map(map_type(map)?).ok_or(Status::NotFound)?;
                let bytes = abi::encode_pairs(map.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
                give(&mut c, &bytes, ret_ptr, ret_size)
            })();
            code(r)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, map: i32, ptr: i32, len: i32| {
            let r = (|| {
                let kind = map_type(map)?;
                let pairs = abi::decode_pairs(&read(&mut c, ptr, len)?)
                    .ok_or(Status::SerializationFailure)?;
                *c.data_mut().map_mut(kind).ok_or(Status::BadArgument)? = pairs;
                Ok(())
            })();
            code(r)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_get_header_map_value",
        |mut c: C<'_>, map: i32, kptr: i32, klen: i32, ret_ptr: i32, ret_size: i32| {
            let r = (|| {
                let kind = map_type(map)?;
                let key = read_str(&mut c, kptr, klen)?;
                let map = c.data().map(kind).ok_or(Status::NotFound)?;
                let value = header_of(map, &key).ok_or(Status::NotFound)?.to_vec();
                give(&mut c, &value, ret_ptr, ret_size)
            })();
            code(r)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_replace_header_map_value",
        |mut c: C<'_>, map: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| {
            let r = (|| {
                let kind = map_type(map)?;
                let key = read_str(&mut c, kptr, klen)?.to_ascii_lowercase();
                let value = read(&mut c, vptr, vlen)?;
                let m = c.data_mut().map_mut(kind).ok_or(Status::BadArgument)?;
                match m.iter().position(|(k, _)| *k == key) {
                    Some(i) => {
                        m[i].1 = value;
                        let mut seen = false;
                        m.retain(|(k, _)| {
                            let dup = *k == key && seen;
                            seen |= *k == key;
                            !dup
                        });
                    }
                    None => m.push((key, value)),
                }
                Ok(())
            })();
            code(r)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_add_header_map_value",
        |mut c: C<'_>, map: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| {
            let r = (|| {
                let kind = map_type(map)?;
                let key = read_str(&mut c, kptr, klen)?.to_ascii_lowercase();
                let value = read(&mut c, vptr, vlen)?;
                let m = c.data_mut().map_mut(kind).ok_or(Status::BadArgument)?;
                m.push((key, value));
                Ok(())
            })();
            code(r)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_remove_header_map_value",
        |mut c: C<'_>, map: i32, kptr: i32, klen: i32| {
            let r = (|| {
                let kind = map_type(map)?;
                let key = read_str(&mut c, kptr, klen)?.to_ascii_lowercase();
                let m = c.data_mut().map_mut(kind).ok_or(Status::BadArgument)?;
                m.retain(|(k, _)| *k != key);
                Ok(())
            })();
            code(r)
        },
    )?;

    // ---- properties ----
    l.func_wrap(
        env,
        "proxy_get_property",
        |mut c: C<'_>, ptr: i32, len: i32, ret_ptr: i32, ret_size: i32| {
            let r = (|| {
                let path = abi::property_path(&read(&mut c, ptr, len)?);
                let value = c.data().property(&path).ok_or(Status::NotFound)?;
                give(&mut c, &value, ret_ptr, ret_size)
            })();
            code(r)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_set_property",
        |mut c: C<'_>, ptr: i32, len: i32, vptr: i32, vlen: i32| {
            let r = (|| {
                let path = abi::property_path(&read(&mut c, ptr, len)?).join(".");
                let value = read(&mut c, vptr, vlen)?;
                stream_mut(&mut c)?.properties.insert(path, value);
                Ok(())
            })();
            code(r)
        },
    )?;

    // ---- shared data and queues ----
    l.func_wrap(
        env,
        "proxy_get_shared_data",
        |mut c: C<'_>, kptr: i32, klen: i32, ret_ptr: i32, ret_size: i32, ret_cas: i32| {
            let r = (|| {
                let key = read_str(&mut c, kptr, klen)?;
                let (value, cas) = c
                    .data()
                    .shared
                    .get(&c.data().plugin.vm_id, &key)
                    .ok_or(Status::NotFound)?;
                give(&mut c, &value, ret_ptr, ret_size)?;
                write_u32(&mut c, ret_cas, cas)
            })();
            code(r)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_set_shared_data",
        |mut c: C<'_>, kptr: i32, klen: i32, vptr: i32, vlen: i32, cas: i32| {
            let r = (|| {
                let key = read_str(&mut c, kptr, klen)?;
                let value = read(&mut c, vptr, vlen)?;
                let d = c.data();
                match d.shared.set(&d.plugin.vm_id, &key, value, cas as u32) {
                    Status::Ok => Ok(()),
                    s => Err(s),
                }
            })();
            code(r)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_register_shared_queue",
        |mut c: C<'_>, ptr: i32, len: i32, ret_id: i32| {
            let r = (|| {
                let name = read_str(&mut c, ptr, len)?;
                let d = c.data();
                let id = d
                    .shared
                    .register_queue(&d.plugin.vm_id, &name, d.queue_owner.clone());
                write_u32(&mut c, ret_id, id)
            })();
            code(r)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, vptr: i32, vlen: i32, nptr: i32, nlen: i32, ret_id: i32| {
            let r = (|| {
                let mut vm_id = read_str(&mut c, vptr, vlen)?;
                let name = read_str(&mut c, nptr, nlen)?;
                if vm_id.is_empty() {
                    vm_id = c.data().plugin.vm_id.clone();
                }
                let id = c
                    .data()
                    .shared
                    .resolve_queue(&vm_id, &name)
                    .ok_or(Status::NotFound)?;
                write_u32(&mut c, ret_id, id)
            })();
            code(r)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_dequeue_shared_queue",
        |mut c: C<'_>, id: i32, ret_ptr: i32, ret_size: i32| {
            let r = (|| {
                let value = c.data().shared.dequeue(id as u32)?;
                give(&mut c, &value, ret_ptr, ret_size)
            })();
            code(r)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_enqueue_shared_queue",
        |mut c: C<'_>, id: i32, ptr: i32, len: i32| {
            let r = (|| {
                let value = read(&mut c, ptr, len)?;
                let owner = c.data().shared.enqueue(id as u32, value)?;
                (c.data().notify_queue)(owner, id as u32);
                Ok(())
            })();
            code(r)
        },
    )?;

    // ---- stream control ----
    l.func_wrap(env, "proxy_continue_stream", |mut c: C<'_>, which: i32| {
        let r = (|| {
            let s = stream_mut(&mut c)?;
            match which as u32 {
                abi::STREAM_REQUEST => s.resume[0] = true,
                abi::STREAM_RESPONSE => s.resume[1] = true,
                _ => return Err(Status::BadArgument),
            }
            Ok(())
        })();
        code(r)
    })?;
    l.func_wrap(env, "proxy_close_stream", |mut c: C<'_>, _which: i32| {
        code(stream_mut(&mut c).map(|s| s.close = true))
    })?;
    l.func_wrap(
        env,
        "proxy_send_local_response",
        |mut c: C<'_>,
         status: i32,
         dptr: i32,
         dlen: i32,
         bptr: i32,
         blen: i32,
         hptr: i32,
         hlen: i32,
         grpc: i32| {
            let r = (|| {
                let details = read_str(&mut c, dptr, dlen)?;
                let body = read(&mut c, bptr, blen)?;
                let headers = abi::decode_pairs(&read(&mut c, hptr, hlen)?)
                    .ok_or(Status::SerializationFailure)?;
                let status = u16::try_from(status)
                    .ok()
                    .filter(|s| (200..=599).contains(s))
                    .ok_or(Status::BadArgument)?;
                stream_mut(&mut c)?.local = Some(LocalResponse {
                    status,
                    headers,
                    body,
                    grpc_status: u32::try_from(grpc).ok(),
                    details,
                });
                Ok(())
            })();
            code(r)
        },
    )?;

    // ---- callouts ----
    l.func_wrap(
        env,
        "proxy_http_call",
        |mut c: C<'_>,
         uptr: i32,
         ulen: i32,
         hptr: i32,
         hlen: i32,
         bptr: i32,
         blen: i32,
         tptr: i32,
         tlen: i32,
         timeout: i32,
         ret_token: i32| {
            let r = (|| {
                let cluster = read_str(&mut c, uptr, ulen)?;
                let headers = abi::decode_pairs(&read(&mut c, hptr, hlen)?)
                    .ok_or(Status::SerializationFailure)?;
                let body = read(&mut c, bptr, blen)?;
                let trailers = abi::decode_pairs(&read(&mut c, tptr, tlen)?)
                    .ok_or(Status::SerializationFailure)?;
                let required = [":method", ":path", ":authority"];
                if !c.data().callouts.has_cluster(&cluster)
                    || required.iter().any(|h| header_of(&headers, h).is_none())
                {
                    return Err(Status::BadArgument);
                }
                let call = Callout::Http(HttpCall {
                    cluster,
                    headers,
                    body,
                    trailers,
                    timeout: Duration::from_millis(timeout as u32 as u64),
                });
                let token = start_call(&mut c, call)?;
                write_u32(&mut c, ret_token, token)
            })();
            code(r)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_grpc_call",
        |mut c: C<'_>,
         uptr: i32,
         ulen: i32,
         sptr: i32,
         slen: i32,
         mptr: i32,
         mlen: i32,
         hptr: i32,
         hlen: i32,
         bptr: i32,
         blen: i32,
         timeout: i32,
         ret_token: i32| {
            let r = (|| {
                let cluster = read_str(&mut c, uptr, ulen)?;
                let service = read_str(&mut c, sptr, slen)?;
                let method = read_str(&mut c, mptr, mlen)?;
                let metadata = abi::decode_pairs(&read(&mut c, hptr, hlen)?)
                    .ok_or(Status::SerializationFailure)?;
                let message = read(&mut c, bptr, blen)?;
                if !c.data().callouts.has_cluster(&cluster) {
                    return Err(Status::BadArgument);
                }
                let call = Callout::Grpc(GrpcCall {
                    cluster,
                    service,
                    method,
                    metadata,
                    message,
                    timeout: Duration::from_millis(timeout as u32 as u64),
                });
                let token = start_call(&mut c, call)?;
                write_u32(&mut c, ret_token, token)
            })();
            code(r)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_get_status",
        |mut c: C<'_>, ret_code: i32, ret_ptr: i32, ret_size: i32| {
            let r = (|| {
                let (status, message) = match c.data().call_result() {
                    Some(CalloutResult::Grpc(g)) => (g.status, g.message.clone()),
                    _ => return Err(Status::NotFound),
                };
                write_u32(&mut c, ret_code, status)?;
                give(&mut c, message.as_bytes(), ret_ptr, ret_size)
            })();
            code(r)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_set_effective_context",
        |_c: C<'_>, _ctx: i32| Status::Ok as i32,
    )?;
    l.func_wrap(env, "proxy_done", |_c: C<'_>| Status::Ok as i32)?;
    l.func_wrap(
        env,
        "proxy_call_foreign_function",
        |_c: C<'_>, _np: i32, _nl: i32, _ap: i32, _al: i32, _rp: i32, _rs: i32| {
            Status::NotFound as i32
        },
    )?;

    // ---- metrics ----
    l.func_wrap(
        env,
        "proxy_define_metric",
        |mut c: C<'_>, kind: i32, ptr: i32, len: i32, ret_id: i32| {
            let r = (|| {
                let kind = abi::MetricType::from_abi(kind as u32).ok_or(Status::BadArgument)?;
                let name = read_str(&mut c, ptr, len)?;
                let id = c.data().metrics.define(&name, kind);
                write_u32(&mut c, ret_id, id)
            })();
            code(r)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_increment_metric",
        |c: C<'_>, id: i32, by: i64| match c.data().metrics.get(id as u32) {
            Some(m) => {
                m.increment(by);
                Status::Ok as i32
            }
            None => Status::NotFound as i32,
        },
    )?;
    l.func_wrap(
        env,
        "proxy_record_metric",
        |c: C<'_>, id: i32, v: i64| match c.data().metrics.get(id as u32) {
            Some(m) => {
                m.record(v as u64);
                Status::Ok as i32
            }
            None => Status::NotFound as i32,
        },
    )?;
    l.func_wrap(
        env,
        "proxy_get_metric",
        |mut c: C<'_>, id: i32, ret: i32| {
            let r = (|| {
                let m = c.data().metrics.get(id as u32).ok_or(Status::NotFound)?;
                write(&mut c, ret, &(m.value() as u64).to_le_bytes())
            })();
            code(r)
        },
    )?;

    // ---- WASI, the calls Rust's std makes on wasm32-wasip1 ----
    let wasi = "wasi_snapshot_preview1";
    const ERRNO_BADF: i32 = 8;
    const ERRNO_FAULT: i32 = 21;
    l.func_wrap(
        wasi,
        "fd_write",
        |mut c: C<'_>, fd: i32, iovs: i32, iovs_len: i32, ret_written: i32| {
            if fd != 1 && fd != 2 {
                return ERRNO_BADF;
            }
            let mut written = 0u32;
            for i in 0..iovs_len.max(0) {
                let Ok(iov) = read(&mut c, iovs.wrapping_add(i * 8), 8) else {
                    return ERRNO_FAULT;
                };
                let (ptr, len) = (
                    i32::from_le_bytes(iov[0..4].try_into().unwrap_or_default()),
                    i32::from_le_bytes(iov[4..8].try_into().unwrap_or_default()),
                );
                let Ok(bytes) = read(&mut c, ptr, len) else {
                    return ERRNO_FAULT;
                };
                written += bytes.len() as u32;
                c.data_mut().stdio.extend_from_slice(&bytes);
            }
            // Log whole lines; keep a partial one for the next write (bounded).
            let d = c.data_mut();
            while let Some(end) = d.stdio.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = d.stdio.drain(..=end).collect();
                log_line(
                    &d.plugin.name,
                    if fd == 2 { 3 } else { 2 },
                    String::from_utf8_lossy(&line).trim_end(),
                );
            }
            if d.stdio.len() > 4096 {
                let line = std::mem::take(&mut d.stdio);
                log_line(&d.plugin.name, 2, &String::from_utf8_lossy(&line));
            }
            if write_u32(&mut c, ret_written, written).is_err() {
                return ERRNO_FAULT;
            }
            0
        },
    )?;
    l.func_wrap(wasi, "environ_get", |_c: C<'_>, _env: i32, _buf: i32| 0)?;
    l.func_wrap(
        wasi,
        "environ_sizes_get",
        |mut c: C<'_>, ret_count: i32, ret_size: i32| {
            if write_u32(&mut c, ret_count, 0).is_err() || write_u32(&mut c, ret_size, 0).is_err() {
                return ERRNO_FAULT;
            }
            0
        },
    )?;
    l.func_wrap(
        wasi,
        "proc_exit",
        |_c: C<'_>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::msg(format!(
                "filter called proc_exit({code})"
            )))
        },
    )?;
    l.func_wrap(
        wasi,
        "clock_time_get",
        |mut c: C<'_>, id: i32, _precision: i64, ret: i32| {
            let ns = if id == 0 {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            } else {
                monotonic_ns()
            };
            if write(&mut c, ret, &ns.to_le_bytes()).is_err() {
                return ERRNO_FAULT;
            }
            0
        },
    )?;
    l.func_wrap(wasi, "random_get", |mut c: C<'_>, ptr: i32, len: i32| {
        let mut buf = vec![0u8; len.max(0) as usize];
        fill_random(&mut buf);
        if write(&mut c, ptr, &buf).is_err() {
            return ERRNO_FAULT;
        }
        0
    })?;
    Ok(l)
}

fn monotonic_ns() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

fn fill_random(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most `buf.len() - done` bytes into the rest of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n <= 0 {
            // No kernel randomness (should not happen): fall back rather than loop forever.
            buf[done..].iter_mut().for_each(|b| *b = fastrand::u8(..));
            return;
        }
        done += n as usize;
    }
}

fn start_call(c: &mut C<'_>, call: Callout) -> Result<u32, Status> {
    let d = c.data_mut();
    d.next_token = d.next_token.wrapping_add(1).max(1);
    match d.stream.as_mut() {
        Some(stream) => stream.new_calls.push((d.next_token, call)),
        // A root context's call (from on_tick, say) has no request to carry it.
        None => d.root_calls.push((d.next_token, call)),
    }
    Ok(d.next_token)
}

/// Defines every import of `module` the host does not provide: functions that return the
/// ABI's `Unimplemented` status (or WASI's ENOSYS), so an unknown call never traps the host.
pub fn stub_unknown_imports(
    linker: &mut Linker<HostState>,
    module: &Module,
) -> wasmtime::Result<Vec<String>> {
    let mut stubbed = Vec::new();
    let mut store = wasmtime::Store::new(linker.engine(), dummy());
    for import in module.imports() {
        let wasmtime::ExternType::Func(ty) = import.ty() else {
            continue;
        };
        if linker.get_by_import(&mut store, &import).is_some() {
            continue;
        }
        let ret: i32 = if import.module() == "wasi_snapshot_preview1" {
            52 // ENOSYS
        } else {
            Status::Unimplemented as i32
        };
        let results: Vec<ValType> = ty.results().collect();
        let name = format!("{}.{}", import.module(), import.name());
        let func_ty = FuncType::new(linker.engine(), ty.params(), results.clone());
        linker.func_new(
            import.module(),
            import.name(),
            func_ty,
            move |_c, _params, out| {
                for (slot, t) in out.iter_mut().zip(&results) {
                    *slot = match t {
                        ValType::I32 => Val::I32(ret),
                        ValType::I64 => Val::I64(ret as i64),
                        ValType::F32 => Val::F32(0),
                        ValType::F64 => Val::F64(0),
                        _ => Val::null_func_ref(),
                    };
                }
                Ok(())
            },
        )?;
        stubbed.push(name);
    }
    Ok(stubbed)
}

/// A host state for looking imports up; never runs guest code.
fn dummy() -> HostState {
    HostState {
        limits: StoreLimits::default(),
        plugin: Arc::new(PluginConfig {
            name: String::new(),
            root_id: String::new(),
            vm_id: String::new(),
            module: Default::default(),
            sha256: None,
            vm_config: Vec::new(),
            plugin_config: Vec::new(),
            fail_open: false,
            limits: Default::default(),
        }),
        shared: Default::default(),
        metrics: Default::default(),
        callouts: Arc::new(crate::types::NoCallouts),
        stream: None,
        tick_period: None,
        next_token: 0,
        queue_owner: QueueOwner {
            thread: 0,
            chain: 0,
            filter: 0,
            root_context: 0,
        },
        notify_queue: Arc::new(|_, _| {}),
        stdio: Vec::new(),
        root_calls: Vec::new(),
        root_call_result: None,
    }
}
