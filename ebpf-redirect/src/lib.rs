//! weir's sockmap fast path. eBPF programs (`bpf/redirect.bpf.c`, compiled by `build.rs` with
//! clang, loaded with aya): `sock_ops`, attached to a cgroup v2, puts each established TCP
//! socket (IPv4 or IPv6) between two local endpoints into a sockhash when it is the proxy's:
//! one end's port is in scope (the ports the proxy writes with [`FastPath::set_ports`]: its
//! listeners, and what policy adds), or the proxy's process opened it
//! ([`FastPath::set_proxy_pid`]; marked by the `cgroup/connect4` and `connect6` programs at
//! connect time); `sk_msg`, attached to that sockhash,
//! hands every message sent on such a socket straight to its peer's receive queue, so bytes
//! between the app and the proxy (and the proxy and a local upstream) skip the loopback TCP
//! stack. The proxy still parses HTTP; only the transport of the bytes changes. A peer that
//! is not in the map is a miss and the message takes the ordinary path. Nothing bounds what
//! waits for a peer that reads slowly but the kernel's socket memory accounting (README: the
//! two ways of sending a direction through TCP past a bound both broke readers on Linux 6.18).
//!
//! Dropping a [`FastPath`] detaches the programs: no new socket is accelerated. Sockets
//! already accelerated keep their redirect until they close; they are never taken out of the
//! map while live (doing so corrupted bulk transfers in tests on this kernel).
//!
//! Outbound capture (a sidecar without iptables): with [`FastPath::set_outbound`], the
//! `cgroup/connect4` program also sends apps' outbound TCP connects in scope to the proxy's
//! outbound listener (`cgroup/getpeername4` still shows the app the original destination as
//! its peer), and keeps each one's original destination in a map the proxy reads
//! through [`OriginalDestinations`] (keyed by the app socket's address, the proxy's peer).

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, SockHash};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkMsg, SockOps};
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

/// The programs an attached [`FastPath`] has in the kernel (attach type and name).
pub const PROGRAMS_ATTACHED: [&str; 5] = [
    "sock_ops weir_sockops",
    "sk_msg weir_msg",
    "cgroup/connect4 weir_connect4",
    "cgroup/connect6 weir_connect6",
    "cgroup/getpeername4 weir_getpeername4",
];

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

/// An address as the programs key it (`struct ip` in the C source): IPv6 octets, IPv4 as
/// `::ffff:a.b.c.d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpKey([u8; 16]);

// SAFETY: plain old data, 16 bytes.
unsafe impl aya::Pod for IpKey {}

impl From<IpAddr> for IpKey {
    fn from(a: IpAddr) -> Self {
        Self(match a {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        })
    }
}

/// A socket as the programs key it (see `struct sock_key` in the C source).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockKey {
    pub local: IpKey,
    pub remote: IpKey,
    pub local_port: u32,
    pub remote_port: u32,
}

// SAFETY: plain old data, two 16-byte arrays and two u32, no padding.
unsafe impl aya::Pod for SockKey {}

/// An IPv4 address and port as the programs keep them (`struct addr4` in the C source): the
/// address in network order, the port in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Addr4 {
    ip4: u32,
    port: u32,
}

// SAFETY: plain old data, two u32 with no padding.
unsafe impl aya::Pod for Addr4 {}

impl From<SocketAddrV4> for Addr4 {
    fn from(a: SocketAddrV4) -> Self {
        Self {
            ip4: u32::from_ne_bytes(a.ip().octets()),
            port: u32::from(a.port()),
        }
    }
}

impl From<Addr4> for SocketAddrV4 {
    fn from(a: Addr4) -> Self {
        SocketAddrV4::new(Ipv4Addr::from(a.ip4.to_ne_bytes()), a.port as u16)
    }
}

/// The proxy's settings as the programs read them (`struct weir_cfg`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Cfg {
    proxy_tgid: u32,
    capture: u32,
    listener_ip4: u32,
    listener_port: u32,
    all_ports: u32,
}

// SAFETY: plain old data, five u32 with no padding.
unsafe impl aya::Pod for Cfg {}

/// Which destination ports outbound capture takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ports {
    /// Only these.
    Only(BTreeSet<u16>),
    /// Every port but these.
    AllBut(BTreeSet<u16>),
}

/// Outbound capture: TCP connects from processes in the cgroup to a non-loopback IPv4
/// destination whose port is in `ports` go to `listener` instead, except the proxy's own
/// ([`FastPath::set_proxy_pid`]: it forwards them to where they were going).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outbound {
    pub listener: SocketAddrV4,
    pub ports: Ports,
}

/// The original destinations of captured connections, by the app socket's address (the peer
/// address the proxy sees). Cheap to clone; works after the fast path is detached, for the
/// connections captured before.
#[derive(Clone)]
pub struct OriginalDestinations(Arc<HashMap<MapData, Addr4, Addr4>>);

impl OriginalDestinations {
    /// Where the connection from `peer` was going before it was captured; `None` for a
    /// connection that was not captured (or has closed).
    pub fn get(&self, peer: SocketAddrV4) -> Option<SocketAddrV4> {
        self.0
            .get(&Addr4::from(peer), 0)
            .ok()
            .map(SocketAddrV4::from)
    }

    /// Captured connections open now.
    pub fn len(&self) -> usize {
        self.0.keys().filter(Result::is_ok).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for OriginalDestinations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OriginalDestinations")
    }
}

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
    /// Outbound connects sent to the proxy's outbound listener.
    pub connects_captured: u64,
    /// Outbound connects in scope left alone because their destination could not be kept.
    pub capture_failed: u64,
}

impl Counters {
    /// (name, help, value) of each counter, in Prometheus terms.
    pub fn fields(&self) -> [(&'static str, &'static str, u64); COUNTERS as usize] {
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
            (
                "connects_captured",
                "Outbound connects sent to the proxy's outbound listener.",
                self.connects_captured,
            ),
            (
                "capture_failed",
                "Outbound connects in scope left alone: their destination could not be kept.",
                self.capture_failed,
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
    /// Owns the loaded programs and their links; dropping it detaches them.
    _programs: Ebpf,
    socks: Option<SockHash<MapData, SockKey>>,
    ports: HashMap<MapData, u32, u8>,
    addrs: HashMap<MapData, IpKey, u8>,
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, Cfg>,
    out_ports: HashMap<MapData, u32, u8>,
    original: OriginalDestinations,
    cgroup: PathBuf,
    in_scope: BTreeSet<u16>,
    local: BTreeSet<IpAddr>,
    /// What `config` holds now.
    cfg: Cfg,
    outbound: Option<Outbound>,
}

const COUNTERS: u32 = 7;

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
        let config = take_map(&mut bpf, "weir_config")?;
        let out_ports = take_map(&mut bpf, "weir_out_ports")?;
        let original = OriginalDestinations(Arc::new(take_map(&mut bpf, "weir_orig_dst")?));
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
        // The sock_addr programs: idle (a map lookup per call) until a proxy pid or outbound
        // capture is set.
        for (name, loading, attaching) in [
            (
                "weir_connect4",
                "loading cgroup/connect4",
                "attaching cgroup/connect4 to the cgroup",
            ),
            (
                "weir_connect6",
                "loading cgroup/connect6",
                "attaching cgroup/connect6 to the cgroup",
            ),
            (
                "weir_getpeername4",
                "loading cgroup/getpeername4",
                "attaching cgroup/getpeername4 to the cgroup",
            ),
        ] {
            let p: &mut CgroupSockAddr = bpf
                .program_mut(name)
                .expect("every program is in the object")
                .try_into()
                .map_err(program(name))?;
            p.load().map_err(program(loading))?;
            p.attach(&cgroup_dir, CgroupAttachMode::Single)
                .map_err(program(attaching))?;
        }
        Ok(Self {
            _programs: bpf,
            socks: Some(socks),
            ports,
            addrs,
            counters,
            config,
            out_ports,
            original,
            cgroup: cgroup.to_path_buf(),
            in_scope: BTreeSet::new(),
            local: BTreeSet::new(),
            cfg: Cfg::default(),
            outbound: None,
        })
    }

    /// Writes `cfg` for the programs.
    fn write_config(&mut self, cfg: Cfg) -> Result<(), Error> {
        self.config.set(0, cfg, 0).map_err(|source| Error::Map {
            what: "weir_config",
            source,
        })?;
        self.cfg = cfg;
        Ok(())
    }

    /// Makes `pid` the proxy: its connections to local addresses are accelerated from now on
    /// (both ends, whatever the port: its upstream connections), and outbound capture never
    /// takes them.
    pub fn set_proxy_pid(&mut self, pid: u32) -> Result<(), Error> {
        self.write_config(Cfg {
            proxy_tgid: pid,
            ..self.cfg
        })
    }

    /// Captures outbound connects as `outbound` says, from now on (`None`: none).
    /// Connections captured before keep their original destination.
    pub fn set_outbound(&mut self, outbound: Option<Outbound>) -> Result<(), Error> {
        if outbound == self.outbound {
            return Ok(());
        }
        // Off while the ports change, so no connect sees half a list.
        let off = Cfg {
            proxy_tgid: self.cfg.proxy_tgid,
            ..Cfg::default()
        };
        self.write_config(off)?;
        self.outbound = None;
        let Some(out) = outbound else {
            return Ok(());
        };
        let (all_ports, listed) = match &out.ports {
            Ports::Only(p) => (0, p),
            Ports::AllBut(p) => (1, p),
        };
        let ports_err = |source| Error::Map {
            what: "weir_out_ports",
            source,
        };
        let old: Vec<u32> = self.out_ports.keys().filter_map(Result::ok).collect();
        for port in old {
            self.out_ports.remove(&port).map_err(ports_err)?;
        }
        for port in listed {
            self.out_ports
                .insert(u32::from(*port), 1, 0)
                .map_err(ports_err)?;
        }
        let listener = Addr4::from(out.listener);
        self.write_config(Cfg {
            capture: 1,
            listener_ip4: listener.ip4,
            listener_port: listener.port,
            all_ports,
            ..off
        })?;
        self.outbound = Some(out);
        Ok(())
    }

    /// Outbound capture's settings now (`None`: off).
    pub fn outbound(&self) -> Option<&Outbound> {
        self.outbound.as_ref()
    }

    /// The original destinations of captured connections.
    pub fn original_destinations(&self) -> OriginalDestinations {
        self.original.clone()
    }

    /// Makes exactly `ports` the ports whose new local connections are accelerated, whichever
    /// processes make them (the proxy's listeners, and app-to-app ports policy allows).
    /// Sockets already accelerated stay so until they close.
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

    /// Makes exactly `addrs` the local addresses, besides 127.0.0.0/8 and ::1, whose
    /// connections may be accelerated (both ends must be local, and the connection the
    /// proxy's). A node proxy gives the node's own addresses here.
    pub fn set_addresses(&mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Result<(), Error> {
        let want: BTreeSet<IpAddr> = addrs.into_iter().filter(|a| !a.is_loopback()).collect();
        let map_err = |source| Error::Map {
            what: "weir_addrs",
            source,
        };
        for gone in self.local.difference(&want) {
            self.addrs.remove(&IpKey::from(*gone)).map_err(map_err)?;
        }
        for new in want.difference(&self.local) {
            self.addrs
                .insert(IpKey::from(*new), 1, 0)
                .map_err(map_err)?;
        }
        self.local = want;
        Ok(())
    }

    /// The local addresses in scope now, besides loopback.
    pub fn addresses(&self) -> &BTreeSet<IpAddr> {
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
            connects_captured: v[5],
            capture_failed: v[6],
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
