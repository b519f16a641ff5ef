//! weir's sockmap fast path. Two eBPF programs (`bpf/redirect.bpf.c`, compiled by `build.rs`
//! with clang, loaded with aya): `sock_ops`, attached to a cgroup v2, puts each established TCP
//! socket between two loopback endpoints into a sockhash when one end's port is in scope (the
//! ports the proxy writes with [`FastPath::set_ports`]); `sk_msg`, attached to that sockhash,
//! hands every message sent on such a socket straight to its peer's receive queue, so bytes
//! between the app and the proxy (and the proxy and a local upstream) skip the loopback TCP
//! stack. The proxy still parses HTTP; only the transport of the bytes changes. A peer that
//! is not in the map is a miss and the message takes the ordinary path.
//!
//! Dropping a [`FastPath`] detaches both programs: no new socket is accelerated. Sockets
//! already accelerated keep their redirect until they close; they are never taken out of the
//! map while live (doing so corrupted bulk transfers in tests on this kernel).

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray, SockHash};
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};
use aya::Ebpf;

/// Where the fast path attaches by default: the root of the cgroup v2 hierarchy (from
/// /proc/mounts: `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid v1/v2 hosts), so
/// every local process's sockets are seen; only those in scope are accelerated.
pub fn default_cgroup() -> PathBuf {
    std::fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|mounts| {
            mounts.lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
            })
        })
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

#[cfg(weir_bpf)]
static PROGRAMS: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/redirect.bpf.o"
)));
#[cfg(not(weir_bpf))]
static PROGRAMS: Option<&[u8]> = None;

/// Why the programs are not in this build, when they are not (no clang at build time).
pub fn unavailable_reason() -> Option<&'static str> {
    match PROGRAMS {
        Some(_) => None,
        None => Some(option_env!("WEIR_BPF_UNAVAILABLE").unwrap_or("not built")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the eBPF programs are not in this build: {0}")]
    NotBuilt(&'static str),
    #[error("cgroup v2 path {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF programs (needs CAP_BPF and CAP_NET_ADMIN): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("{what} (needs CAP_BPF and CAP_NET_ADMIN): {source}")]
    Program {
        what: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("{what}: {source}")]
    Map {
        what: &'static str,
        source: aya::maps::MapError,
    },
}

/// A socket as the programs key it (see `struct sock_key` in the C source).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockKey {
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_port: u32,
    pub remote_port: u32,
}

// SAFETY: plain old data, four u32 with no padding.
unsafe impl aya::Pod for SockKey {}

/// The programs' counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Sockets put into the sockhash.
    pub sockets_inserted: u64,
    /// Sockets in scope that could not be put in (map full, or already there).
    pub insert_failed: u64,
    /// Messages handed straight to the peer socket.
    pub messages_redirected: u64,
    /// Messages whose peer was not in the map: sent the ordinary way.
    pub messages_missed: u64,
    /// Bytes of the redirected messages.
    pub bytes_redirected: u64,
}

impl Counters {
    /// (name, help, value) of each counter, in Prometheus terms.
    pub fn fields(&self) -> [(&'static str, &'static str, u64); 5] {
        [
            (
                "sockets_inserted",
                "Sockets put into the fast path's sockhash.",
                self.sockets_inserted,
            ),
            (
                "insert_failed",
                "Sockets in scope that could not be put into the sockhash.",
                self.insert_failed,
            ),
            (
                "messages_redirected",
                "Messages handed straight to the peer socket.",
                self.messages_redirected,
            ),
            (
                "messages_missed",
                "Messages whose peer socket was not in the sockhash (sent through TCP).",
                self.messages_missed,
            ),
            (
                "bytes_redirected",
                "Bytes of the redirected messages.",
                self.bytes_redirected,
            ),
        ]
    }
}

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, _, v) in self.fields() {
            writeln!(f, "  {name}: {v}")?;
        }
        Ok(())
    }
}

/// The attached fast path. Detached on drop.
pub struct FastPath {
    /// Owns the loaded programs and their links; dropping it detaches both.
    _programs: Ebpf,
    socks: Option<SockHash<MapData, SockKey>>,
    ports: HashMap<MapData, u32, u8>,
    addrs: HashMap<MapData, u32, u8>,
    counters: PerCpuArray<MapData, u64>,
    cgroup: PathBuf,
    in_scope: BTreeSet<u16>,
    local: BTreeSet<Ipv4Addr>,
}

const COUNTERS: u32 = 5;

impl FastPath {
    /// Loads the programs, attaches `sock_ops` to the cgroup v2 at `cgroup` (alongside any
    /// other programs there, with a BPF link) and `sk_msg` to the sockhash. No port is in scope until
    /// [`FastPath::set_ports`].
    pub fn attach(cgroup: &Path) -> Result<Self, Error> {
        let bytes = PROGRAMS.ok_or_else(|| Error::NotBuilt(unavailable_reason().unwrap_or("")))?;
        let cgroup_dir = std::fs::File::open(cgroup).map_err(|source| Error::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        let mut bpf = Ebpf::load(bytes)?;
        let socks: SockHash<MapData, SockKey> = take_map(&mut bpf, "weir_socks")?;
        let ports = take_map(&mut bpf, "weir_ports")?;
        let addrs = take_map(&mut bpf, "weir_addrs")?;
        let counters = take_map(&mut bpf, "weir_counters")?;
        let program = |what: &'static str| move |source| Error::Program { what, source };
        let msg: &mut SkMsg = bpf
            .program_mut("weir_msg")
            .expect("weir_msg is in the object")
            .try_into()
            .map_err(program("weir_msg"))?;
        msg.load().map_err(program("loading sk_msg"))?;
        msg.attach(socks.fd())
            .map_err(program("attaching sk_msg to the sockhash"))?;
        let ops: &mut SockOps = bpf
            .program_mut("weir_sockops")
            .expect("weir_sockops is in the object")
            .try_into()
            .map_err(program("weir_sockops"))?;
        ops.load().map_err(program("loading sock_ops"))?;
        // On this kernel (5.7+) aya attaches with a BPF link: links to one cgroup always
        // coexist with other programs there, and the kernel refuses any flag on them.
        ops.attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(program("attaching sock_ops to the cgroup"))?;
        Ok(Self {
            _programs: bpf,
            socks: Some(socks),
            ports,
            addrs,
            counters,
            cgroup: cgroup.to_path_buf(),
            in_scope: BTreeSet::new(),
            local: BTreeSet::new(),
        })
    }

    /// Makes exactly `ports` the ports whose new local connections are accelerated. Sockets
    /// already accelerated stay so until they close.
    pub fn set_ports(&mut self, ports: impl IntoIterator<Item = u16>) -> Result<(), Error> {
        let want: BTreeSet<u16> = ports.into_iter().collect();
        let map_err = |source| Error::Map {
            what: "weir_ports",
            source,
        };
        for gone in self.in_scope.difference(&want) {
            self.ports.remove(&u32::from(*gone)).map_err(map_err)?;
        }
        for new in want.difference(&self.in_scope) {
            self.ports.insert(u32::from(*new), 1, 0).map_err(map_err)?;
        }
        self.in_scope = want;
        Ok(())
    }

    /// Makes exactly `addrs` the local addresses, besides 127.0.0.0/8, whose connections may
    /// be accelerated (both ends must be local; a port in scope decides). A node proxy gives
    /// the node's own addresses here.
    pub fn set_addresses(
        &mut self,
        addrs: impl IntoIterator<Item = Ipv4Addr>,
    ) -> Result<(), Error> {
        let want: BTreeSet<Ipv4Addr> = addrs.into_iter().filter(|a| !a.is_loopback()).collect();
        let map_err = |source| Error::Map {
            what: "weir_addrs",
            source,
        };
        // Keys in network order, as the programs see addresses.
        let key = |a: &Ipv4Addr| u32::from_ne_bytes(a.octets());
        for gone in self.local.difference(&want) {
            self.addrs.remove(&key(gone)).map_err(map_err)?;
        }
        for new in want.difference(&self.local) {
            self.addrs.insert(key(new), 1, 0).map_err(map_err)?;
        }
        self.local = want;
        Ok(())
    }

    /// The local addresses in scope now, besides loopback.
    pub fn addresses(&self) -> &BTreeSet<Ipv4Addr> {
        &self.local
    }

    /// The ports in scope now.
    pub fn ports(&self) -> &BTreeSet<u16> {
        &self.in_scope
    }

    /// The cgroup `sock_ops` is attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Sockets in the sockhash now (the kernel takes each out when it closes).
    pub fn sockets(&self) -> usize {
        self.socks
            .as_ref()
            .map_or(0, |s| s.keys().filter(Result::is_ok).count())
    }

    /// The programs' counters now.
    pub fn counters(&self) -> Result<Counters, Error> {
        let mut v = [0u64; COUNTERS as usize];
        for (i, slot) in v.iter_mut().enumerate() {
            *slot = self
                .counters
                .get(&(i as u32), 0)
                .map_err(|source| Error::Map {
                    what: "weir_counters",
                    source,
                })?
                .iter()
                .sum();
        }
        Ok(Counters {
            sockets_inserted: v[0],
            insert_failed: v[1],
            messages_redirected: v[2],
            messages_missed: v[3],
            bytes_redirected: v[4],
        })
    }
}

/// Takes the map `name` out of `bpf` as a typed map.
fn take_map<T: TryFrom<Map, Error = MapError>>(
    bpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, Error> {
    let map = bpf.take_map(name).ok_or(Error::Map {
        what: name,
        source: MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| Error::Map { what: name, source })
}

impl Drop for FastPath {
    fn drop(&mut self) {
        // The programs detach when `_programs` drops. The sockhash is left to the kernel:
        // sockets in it keep their redirect until they close and leave it by themselves, so no
        // live socket is ever taken out. Its fd is the one thing kept (one per attach).
        if let Some(socks) = self.socks.take() {
            std::mem::forget(socks);
        }
    }
}
