//! The listening sockets of `[sockets.*]`: bound once at start and held for clusterd's whole
//! life, so their accept queues outlive any worker. Workers receive duplicates at fds 3, 4, ...
//!
//! TCP sockets get the manifest's `tcp_nodelay`, `keepalive` and `reuseport` before they bind.
//!
//! When clusterd is itself socket-activated (systemd passes `LISTEN_FDS`, `LISTEN_PID` and
//! `LISTEN_FDNAMES`), a socket whose name matches an inherited one is taken over as it is
//! instead of being bound: name the `.socket` unit's sockets with `FileDescriptorName=`.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use clusterd_manifest::{Keepalive, Listen, SocketConfig};
use socket2::{Domain, SockAddr, Socket, Type};

/// A bound, listening socket.
#[derive(Debug)]
pub struct BoundSocket {
    fd: OwnedFd,
    /// What it is bound to, for logs and status: `127.0.0.1:8000` or `unix:/path`.
    pub address: String,
    /// Inherited from clusterd's own manager (socket activation).
    pub inherited: bool,
    /// The socket file clusterd created, removed again at exit.
    unix_path: Option<PathBuf>,
    /// Bound on demand for an intercepted app (not in the manifest).
    pub on_demand: Option<OnDemand>,
}

/// A socket clusterd bound when a worker of an intercepted app bound an address that no
/// `[sockets.*]` declares (as Node's cluster primary does): named `port-PORT`, kept until the
/// app is removed or clusterd exits, never given to another app.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnDemand {
    /// The app it was bound for.
    pub app: String,
    /// Each worker listens on a steered socket of its own (clusterd's only reserves the
    /// address).
    pub steered: bool,
}

/// Why a socket could not be bound on demand: `errno` is what the worker's own `bind()` gets.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}")]
pub struct OnDemandError {
    /// The address.
    pub address: std::net::SocketAddr,
    /// The error number of the failed call.
    pub errno: i32,
    /// What went wrong (with who holds the port, when it is in use).
    #[source]
    pub cause: io::Error,
}

impl BoundSocket {
    /// Its address as the log says it: with ` (inherited)` after an inherited one's.
    pub fn described(&self) -> String {
        match self.inherited {
            true => format!("{}{INHERITED}", self.address),
            false => self.address.clone(),
        }
    }

    /// The raw fd, to hand to a spawn.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A duplicate of the socket.
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Its TCP address (`None` for unix sockets).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        socket2::SockRef::from(&self.fd)
            .local_addr()
            .ok()?
            .as_socket()
    }

    /// `IPV6_V6ONLY` of an IPv6 socket (false for others).
    pub fn only_v6(&self) -> bool {
        self.local_addr().is_some_and(|a| a.is_ipv6())
            && socket2::SockRef::from(&self.fd).only_v6().unwrap_or(false)
    }
}

/// Whether a TCP socket bound to `a` (`IPV6_V6ONLY` as `a_v6only`) and one bound to `b` would
/// take the same connections, as Linux decides a bind conflict without `SO_REUSEPORT`: the
/// same port, and the same address or a wildcard that reaches the other (a dual-stack `::`
/// reaches IPv4 too; with `IPV6_V6ONLY` it does not).
pub fn overlaps(
    a: std::net::SocketAddr,
    a_v6only: bool,
    b: std::net::SocketAddr,
    b_v6only: bool,
) -> bool {
    use std::net::IpAddr;
    if a.port() != b.port() {
        return false;
    }
    let mixed = |v4: std::net::Ipv4Addr, v6: std::net::Ipv6Addr, v6only: bool| {
        !v6only
            && (v6.is_unspecified()
                || v6.to_ipv4_mapped() == Some(v4)
                || (v4.is_unspecified() && v6.to_ipv4_mapped().is_some()))
    };
    match (a.ip(), b.ip()) {
        (IpAddr::V4(x), IpAddr::V4(y)) => x == y || x.is_unspecified() || y.is_unspecified(),
        (IpAddr::V6(x), IpAddr::V6(y)) => x == y || x.is_unspecified() || y.is_unspecified(),
        (IpAddr::V4(x), IpAddr::V6(y)) => mixed(x, y, b_v6only),
        (IpAddr::V6(x), IpAddr::V4(y)) => mixed(y, x, a_v6only),
    }
}

/// Why a socket could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("socket {name}: cannot listen on {address}")]
pub struct BindError {
    /// The socket's name in the manifest.
    pub name: String,
    /// The address it was to listen on.
    pub address: String,
    /// What went wrong.
    #[source]
    pub cause: io::Error,
}

/// All the sockets of a manifest, by name.
#[derive(Debug, Default)]
pub struct Sockets {
    by_name: BTreeMap<String, BoundSocket>,
}

impl Sockets {
    /// Binds every socket of the manifest (or takes it over from `inherited`, by name), or
    /// none: on error, those already bound are closed (and their files removed) before
    /// returning. Inherited sockets the manifest does not name are closed with a warning.
    pub fn bind_all(
        configs: &BTreeMap<String, SocketConfig>,
        mut inherited: BTreeMap<String, OwnedFd>,
        steered: &std::collections::BTreeSet<String>,
    ) -> Result<Self, BindError> {
        let mut sockets = Sockets::default();
        // Fds systemd named after no [sockets.*] (by default it names them after the unit):
        // binding their address ourselves would only fail with "address in use".
        let unmatched: Vec<String> = inherited
            .keys()
            .filter(|name| !configs.contains_key(*name))
            .cloned()
            .collect();
        for (name, config) in configs {
            let result = match inherited.remove(name) {
                Some(fd) => adopt(fd),
                None if !unmatched.is_empty() => Err(unmatched_names(name, &unmatched)),
                None => bind(config, steered.contains(name)),
            };
            match result {
                Ok(socket) => {
                    let steered = if steered.contains(name) {
                        " (steered: each worker listens on a socket of its own)"
                    } else {
                        ""
                    };
                    let address = socket.described();
                    tracing::info!("socket {name} listening on {address}{steered}");
                    sockets.by_name.insert(name.clone(), socket);
                }
                Err(cause) => {
                    sockets.remove_files();
                    return Err(BindError {
                        name: name.clone(),
                        address: display_listen(&config.listen),
                        cause,
                    });
                }
            }
        }
        for name in inherited.keys() {
            tracing::warn!(
                event = "inherited_socket_closed",
                socket = %name,
                "inherited socket {name:?} is not in the manifest; closing it"
            );
        }
        Ok(sockets)
    }

    /// Every socket as (name, fd, address as [`BoundSocket::described`], unix file, bound on
    /// demand), for an upgrade's hand-over.
    #[allow(clippy::type_complexity)]
    pub fn parts(
        &self,
    ) -> impl Iterator<Item = (&String, RawFd, String, Option<&PathBuf>, Option<&OnDemand>)> {
        self.by_name.iter().map(|(name, s)| {
            (
                name,
                s.fd.as_raw_fd(),
                s.described(),
                s.unix_path.as_ref(),
                s.on_demand.as_ref(),
            )
        })
    }

    /// The sockets handed over by the previous clusterd (see [`Sockets::parts`]).
    pub fn from_parts(
        parts: impl IntoIterator<Item = (String, OwnedFd, String, Option<PathBuf>, Option<OnDemand>)>,
    ) -> Self {
        Sockets {
            by_name: parts
                .into_iter()
                .map(|(name, fd, described, unix_path, on_demand)| {
                    let (address, inherited) = match described.strip_suffix(INHERITED) {
                        Some(address) => (address.to_owned(), true),
                        None => (described, false),
                    };
                    (
                        name,
                        BoundSocket {
                            fd,
                            address,
                            inherited,
                            unix_path,
                            on_demand,
                        },
                    )
                })
                .collect(),
        }
    }

    /// The socket called `name`.
    pub fn get(&self, name: &str) -> Option<&BoundSocket> {
        self.by_name.get(name)
    }

    /// Every socket, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &BoundSocket)> {
        self.by_name.iter()
    }

    /// Binds the sockets of `configs` that are not bound yet (after a manifest re-read) and
    /// returns the names of sockets whose address changed, which keep their old binding.
    ///
    /// All or nothing: the new sockets are bound into a set of their own first and join
    /// `self` only when every one of them succeeded. On `Err` nothing changed — the sockets
    /// bound so far are closed again (and their files removed).
    pub fn bind_new(
        &mut self,
        configs: &BTreeMap<String, SocketConfig>,
        old: &BTreeMap<String, SocketConfig>,
    ) -> Result<Vec<String>, BindError> {
        let mut changed = Vec::new();
        let mut prepared = Sockets::default();
        for (name, config) in configs {
            match old.get(name) {
                Some(previous) if previous == config => {}
                Some(_) => changed.push(name.clone()),
                None => match bind(config, false) {
                    Ok(socket) => {
                        prepared.by_name.insert(name.clone(), socket);
                    }
                    Err(cause) => {
                        prepared.remove_files();
                        return Err(BindError {
                            name: name.clone(),
                            address: display_listen(&config.listen),
                            cause,
                        });
                    }
                },
            }
        }
        for (name, socket) in prepared.by_name {
            tracing::info!("socket {name} listening on {}", socket.described());
            self.by_name.insert(name, socket);
        }
        Ok(changed)
    }

    /// Binds `address` for a worker of `app` whose `bind()` matched no socket, with the
    /// defaults of `[sockets.*]` (and `IPV6_V6ONLY` as the worker set it on its own socket);
    /// a `steered` one only reserves the address. Named `port-PORT` (`APP-port-PORT` when
    /// that name is taken); returns the name.
    pub fn bind_on_demand(
        &mut self,
        app: &str,
        address: std::net::SocketAddr,
        v6only: bool,
        steered: bool,
    ) -> Result<String, OnDemandError> {
        let config = SocketConfig::with_defaults(Listen::Tcp(address));
        let fail = |cause: io::Error| OnDemandError {
            address,
            errno: cause.raw_os_error().unwrap_or(libc::EINVAL),
            cause,
        };
        let socket = Socket::new(Domain::for_address(address), Type::STREAM, None).map_err(fail)?;
        socket.set_reuse_address(true).map_err(fail)?;
        if address.is_ipv6() {
            socket.set_only_v6(v6only).map_err(fail)?;
        }
        apply_tcp_options(&socket, &config).map_err(fail)?;
        if steered {
            socket.set_reuse_port(true).map_err(fail)?;
        }
        if let Err(error) = socket.bind(&SockAddr::from(address)) {
            let errno = error.raw_os_error().unwrap_or(libc::EINVAL);
            let cause = name_holders(error, address.port());
            return Err(OnDemandError {
                address,
                errno,
                cause,
            });
        }
        if !steered {
            let backlog = i32::try_from(config.backlog).unwrap_or(i32::MAX);
            socket.listen(backlog).map_err(fail)?;
        }
        let mut name = format!("port-{}", address.port());
        if self.by_name.contains_key(&name) {
            name = format!("{app}-port-{}", address.port());
        }
        let bound = BoundSocket {
            inherited: false,
            fd: socket.into(),
            address: address.to_string(),
            unix_path: None,
            on_demand: Some(OnDemand {
                app: app.to_owned(),
                steered,
            }),
        };
        self.by_name.insert(name.clone(), bound);
        Ok(name)
    }

    /// Closes the sockets bound on demand for apps that `keep` does not keep (removed from
    /// the manifest); returns their names. Workers still running keep their own duplicates.
    pub fn release_on_demand(&mut self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let released: Vec<String> = self
            .by_name
            .iter()
            .filter(|(_, s)| s.on_demand.as_ref().is_some_and(|d| !keep(&d.app)))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &released {
            self.by_name.remove(name);
        }
        released
    }

    /// Removes the unix socket files clusterd created. Called once at exit.
    pub fn remove_files(&self) {
        for socket in self.by_name.values() {
            if let Some(path) = &socket.unix_path {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The error for a manifest socket `name` that was not among the inherited fds, whose names
/// (`unmatched`) match no `[sockets.*]`.
fn unmatched_names(name: &str, unmatched: &[String]) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "clusterd was socket-activated with fds named {}, which match no [sockets.*] of \
             the manifest (systemd names them after the unit unless told otherwise); in the \
             .socket unit, name each one after its [sockets.NAME] with FileDescriptorName={name}",
            unmatched
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
}

/// `127.0.0.1:8000` or `unix:/path`.
pub fn display_listen(listen: &Listen) -> String {
    match listen {
        Listen::Tcp(addr) => addr.to_string(),
        Listen::Unix(path) => format!("unix:{}", path.display()),
    }
}

/// Takes the listening sockets clusterd inherited through socket activation, by name, and
/// marks them close-on-exec (workers get their own duplicates). Nothing is inherited unless
/// `LISTEN_PID` is our pid. Call once, before opening anything else.
pub fn take_inherited() -> Result<BTreeMap<String, OwnedFd>, BindError> {
    let var = |key| std::env::var(key).ok();
    let ours = var("LISTEN_PID").and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count: usize = var("LISTEN_FDS").and_then(|n| n.parse().ok()).unwrap_or(0);
    if !ours || count == 0 {
        return Ok(BTreeMap::new());
    }
    let names: Vec<String> = var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut inherited = BTreeMap::new();
    for index in 0..count {
        let raw = 3 + index as RawFd;
        let name = names
            .get(index)
            .cloned()
            .unwrap_or_else(|| format!("fd{raw}"));
        let invalid = |cause| BindError {
            name: name.clone(),
            address: format!("inherited fd {raw}"),
            cause,
        };
        // Ours to own from now on: the activation protocol hands fds 3.. to us.
        // SAFETY: F_GETFD only reads the descriptor's flags.
        if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
            return Err(invalid(io::Error::new(
                io::ErrorKind::NotFound,
                "LISTEN_FDS names an fd that is not open",
            )));
        }
        // SAFETY: the fd is open and nothing else in this process refers to it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(|e| invalid(e.into()))?;
        let socket = socket2::SockRef::from(&fd);
        if socket.r#type().map_err(invalid)? != Type::STREAM
            || !socket.is_listener().map_err(invalid)?
        {
            return Err(invalid(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a listening stream socket",
            )));
        }
        inherited.insert(name, fd);
    }
    Ok(inherited)
}

/// What the log and the hand-over add after an inherited socket's address.
const INHERITED: &str = " (inherited)";

/// An inherited socket, as it is.
fn adopt(fd: OwnedFd) -> io::Result<BoundSocket> {
    let local = socket2::SockRef::from(&fd).local_addr()?;
    let address = match (local.as_socket(), local.as_pathname()) {
        (Some(addr), _) => addr.to_string(),
        (None, Some(path)) => format!("unix:{}", path.display()),
        (None, None) => "unix:(unnamed)".to_owned(),
    };
    // Not ours to remove at exit: the socket unit owns the file.
    Ok(BoundSocket {
        fd,
        address,
        inherited: true,
        unix_path: None,
        on_demand: None,
    })
}

/// Binds one socket. A `steered` TCP socket only reserves its address (`SO_REUSEPORT`, never
/// listening): its workers listen on sockets of their own (see `steering`).
fn bind(config: &SocketConfig, steered: bool) -> io::Result<BoundSocket> {
    let backlog = i32::try_from(config.backlog).unwrap_or(i32::MAX);
    match &config.listen {
        Listen::Tcp(addr) => {
            let socket = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            apply_tcp_options(&socket, config)?;
            if steered {
                socket.set_reuse_port(true)?;
            }
            socket
                .bind(&SockAddr::from(*addr))
                .map_err(|e| name_holders(e, addr.port()))?;
            if !steered {
                socket.listen(backlog)?;
            }
            let local = socket
                .local_addr()?
                .as_socket()
                .map_or_else(|| addr.to_string(), |a| a.to_string());
            Ok(BoundSocket {
                inherited: false,
                fd: socket.into(),
                address: local,
                unix_path: None,
                on_demand: None,
            })
        }
        Listen::Unix(path) => {
            remove_stale_unix_socket(path)?;
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            socket.bind(&SockAddr::unix(path)?)?;
            if let Some(mode) = config.mode {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
            }
            socket.listen(backlog)?;
            Ok(BoundSocket {
                inherited: false,
                fd: socket.into(),
                address: format!("unix:{}", path.display()),
                unix_path: Some(path.clone()),
                on_demand: None,
            })
        }
    }
}

/// Adds who listens on `port` to an "address in use" error, e.g. a worker of a killed run.
fn name_holders(error: io::Error, port: u16) -> io::Error {
    if error.kind() != io::ErrorKind::AddrInUse || port == 0 {
        return error;
    }
    let holders = port_holders(port);
    if holders.is_empty() {
        return error;
    }
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("{error}; held by {}", holders.join(", ")),
    )
}

/// How many holders [`port_holders`] names at most, and how long it may look.
const MAX_HOLDERS: usize = 5;
const HOLDER_SCAN_BUDGET: std::time::Duration = std::time::Duration::from_millis(200);

/// `pid N (command)` of processes with a socket listening on TCP `port`: the listening
/// sockets' inodes from `/proc/net/tcp` and `tcp6`, then the processes whose descriptors
/// point at them. Best effort and bounded in count and time; processes of other users are
/// visible only to root.
fn port_holders(port: u16) -> Vec<String> {
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| listening_inodes(&table, port))
        .collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    let targets: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let started = std::time::Instant::now();
    let mut holders = Vec::new();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return holders;
    };
    for entry in processes.flatten() {
        if holders.len() >= MAX_HOLDERS || started.elapsed() > HOLDER_SCAN_BUDGET {
            break;
        }
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|link| targets.iter().any(|t| link.as_os_str() == t.as_str()))
        });
        if holds {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            holders.push(format!("pid {pid} ({})", comm.trim()));
        }
    }
    holders
}

/// Inodes of the sockets in a `/proc/net/tcp`-style table listening (state `0A`) on `port`.
fn listening_inodes(table: &str, port: u16) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit(':').next()?;
            let listening = *fields.get(3)? == "0A";
            let inode = fields.get(9)?;
            (listening && u16::from_str_radix(local_port, 16).ok()? == port && *inode != "0")
                .then(|| (*inode).to_owned())
        })
        .collect()
}

/// `tcp_nodelay`, `keepalive` and `reuseport` of `[sockets.NAME]`, set on the listener before
/// `bind`. Linux copies `TCP_NODELAY` and the keepalive settings to every accepted connection,
/// so workers get them without setting anything.
pub(crate) fn apply_tcp_options(socket: &Socket, config: &SocketConfig) -> io::Result<()> {
    if config.tcp_nodelay {
        socket.set_tcp_nodelay(true)?;
    }
    match config.keepalive {
        Keepalive::Off => {}
        Keepalive::On => socket.set_keepalive(true)?,
        Keepalive::Idle(idle) => {
            socket.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(idle))?;
        }
    }
    if config.reuseport {
        socket.set_reuse_port(true)?;
    }
    Ok(())
}

/// A socket file left by a dead process is removed; one somebody still listens on is an error.
fn remove_stale_unix_socket(path: &Path) -> io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is listening on it",
        )),
        Err(_) => std::fs::remove_file(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(addr: &str) -> SocketConfig {
        SocketConfig {
            listen: Listen::Tcp(addr.parse().unwrap()),
            backlog: 16,
            mode: None,
            tcp_nodelay: false,
            keepalive: clusterd_manifest::Keepalive::Off,
            reuseport: false,
        }
    }

    /// Whether some socket listens on `addr` (a connection is accepted into its queue).
    fn listening(addr: &str) -> bool {
        std::net::TcpStream::connect(addr).is_ok()
    }

    #[test]
    fn an_inherited_socket_crosses_a_hand_over_as_inherited_with_its_address_as_it_is() {
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let parts = [(
            "http".to_owned(),
            fd,
            "127.0.0.1:8000 (inherited)".to_owned(),
            None,
            None,
        )];
        let sockets = Sockets::from_parts(parts);
        let http = sockets.get("http").unwrap();
        assert_eq!(
            (http.address.as_str(), http.inherited),
            ("127.0.0.1:8000", true)
        );
        let handed: Vec<String> = sockets.parts().map(|(_, _, address, ..)| address).collect();
        assert_eq!(handed, ["127.0.0.1:8000 (inherited)"]);
    }

    #[test]
    fn a_port_in_use_names_who_holds_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let error = bind(&tcp(&addr), false).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        let me = format!("pid {} (", std::process::id());
        assert!(error.to_string().contains(&me), "{error}");
    }

    #[test]
    fn wildcards_overlap_as_the_kernel_decides() {
        let at = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let dual = at("[::]:8001");
        assert!(overlaps(dual, false, at("0.0.0.0:8001"), false));
        assert!(overlaps(at("0.0.0.0:8001"), false, dual, false));
        assert!(
            !overlaps(dual, true, at("0.0.0.0:8001"), false),
            "v6only: IPv6 only"
        );
        assert!(overlaps(dual, true, at("[::1]:8001"), true));
        assert!(overlaps(
            at("0.0.0.0:8001"),
            false,
            at("127.0.0.1:8001"),
            false
        ));
        assert!(!overlaps(
            at("127.0.0.1:8001"),
            false,
            at("10.0.0.1:8001"),
            false
        ));
        assert!(!overlaps(
            at("0.0.0.0:8001"),
            false,
            at("0.0.0.0:8002"),
            false
        ));
        assert!(overlaps(
            at("127.0.0.1:8001"),
            false,
            at("[::ffff:127.0.0.1]:8001"),
            false
        ));
    }

    #[test]
    fn a_socket_bound_on_demand_gets_the_defaults_and_is_released_with_its_app() {
        let mut sockets = Sockets::default();
        // Unprivileged: the worker's bind gets EACCES, as its own would (root may bind it).
        match sockets.bind_on_demand("low", "127.0.0.1:80".parse().unwrap(), false, false) {
            Err(error) if nix::unistd::geteuid().is_root() => {
                assert_eq!(error.errno, libc::EADDRINUSE, "{error:?}")
            }
            Err(error) => assert_eq!(error.errno, libc::EACCES, "{error:?}"),
            Ok(_) => assert_eq!(sockets.release_on_demand(|app| app != "low").len(), 1),
        }
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = taken.local_addr().unwrap();
        let error = sockets
            .bind_on_demand("web", address, false, false)
            .unwrap_err();
        assert_eq!(error.errno, libc::EADDRINUSE);
        let me = format!("pid {} (", std::process::id());
        assert!(error.cause.to_string().contains(&me), "{}", error.cause);
        drop(taken);

        let name = sockets
            .bind_on_demand("web", address, false, false)
            .unwrap();
        assert_eq!(name, format!("port-{}", address.port()));
        let socket = sockets.get(&name).unwrap();
        let listener = socket2::SockRef::from(&socket.fd);
        assert!(
            listener.tcp_nodelay().unwrap(),
            "the default of [sockets.*]"
        );
        assert!(listening(&address.to_string()));
        let dual = sockets
            .bind_on_demand("api", "[::]:0".parse().unwrap(), true, false)
            .unwrap();
        assert!(sockets.get(&dual).unwrap().only_v6());
        assert_eq!(sockets.release_on_demand(|app| app == "api"), vec![name]);
        assert!(!listening(&address.to_string()));
        assert!(sockets.get(&dual).is_some());
    }

    #[test]
    fn parses_listening_sockets_from_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F40 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(listening_inodes(table, 8000), vec!["4242".to_owned()]);
        assert_eq!(listening_inodes(table, 80), vec!["4444".to_owned()]);
        assert!(listening_inodes(table, 81).is_empty());
    }

    #[test]
    fn a_failing_bind_new_leaves_nothing_bound_and_a_corrected_one_applies() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let free_addr = free.local_addr().unwrap().to_string();
        drop(free);
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_addr = taken.local_addr().unwrap().to_string();

        let mut sockets = Sockets::default();
        let old = BTreeMap::new();
        // "a" sorts first and binds; "b" fails on the port held above.
        let mut new = BTreeMap::from([
            ("a".to_owned(), tcp(&free_addr)),
            ("b".to_owned(), tcp(&taken_addr)),
        ]);
        let error = sockets.bind_new(&new, &old).unwrap_err();
        assert_eq!(error.name, "b");
        assert!(sockets.get("a").is_none() && sockets.get("b").is_none());
        assert!(!listening(&free_addr), "the first new socket stayed bound");

        new.insert("b".to_owned(), tcp("127.0.0.1:0"));
        assert_eq!(sockets.bind_new(&new, &old).unwrap(), Vec::<String>::new());
        assert!(listening(&sockets.get("a").unwrap().address));
        assert!(listening(&sockets.get("b").unwrap().address));
    }
}
