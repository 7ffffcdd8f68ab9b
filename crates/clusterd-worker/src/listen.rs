//! Taking the listening sockets the supervisor passed at fds 3, 4, ...
//!
//! Modelled on the `listenfd` crate: `take_*` returns `Ok(None)` when no such socket was
//! inherited, and an error when it was but is unusable. Each take checks that the fd is open,
//! is a socket of the expected family and of type `SOCK_STREAM`, and is listening
//! (`SO_DOMAIN`, `SO_TYPE`, `SO_PROTOCOL`, `SO_ACCEPTCONN`), then marks it close-on-exec again so
//! the worker's own children do not inherit it.
//!
//! A socket can be taken once. Taking it a second time is an error
//! ([`ListenError::AlreadyTaken`]) rather than `Ok(None)`, so that a double take is not
//! mistaken for "nothing inherited" (which would make [`tcp_listener_or_bind`] bind a second
//! socket behind the supervisor's back). A take that fails validation does not consume the
//! socket.
//!
//! # Blocking mode is shared
//!
//! An inherited listener is the same open file description in the supervisor and in every
//! worker, and `O_NONBLOCK` belongs to that description: once any worker switches it to
//! non-blocking (tokio, Node and the Python example all do), it is non-blocking for all of
//! them. So use the listener non-blocking — `set_nonblocking(true)`, then e.g.
//! `tokio::net::TcpListener::from_std` — and never switch it back: a blocking `accept()` in a
//! worker that was woken for a connection another worker took would hang, and with it that
//! worker's reaction to the stop signal. The SDK leaves the flag as it finds it.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::{Mutex, PoisonError};

use socket2::{Domain, Protocol, SockRef, Type};

use crate::env::{EnvError, InheritedFd, snapshot};

/// Which inherited socket: by position (0 is fd 3) or by its `LISTEN_FDNAMES` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which<'a> {
    /// The n-th inherited socket (fd `3 + n`).
    Index(usize),
    /// The first not-yet-taken socket with this name.
    Name(&'a str),
}

impl From<usize> for Which<'_> {
    fn from(index: usize) -> Self {
        Which::Index(index)
    }
}

impl<'a> From<&'a str> for Which<'a> {
    fn from(name: &'a str) -> Self {
        Which::Name(name)
    }
}

/// An inherited listener of either family, from [`take`].
#[derive(Debug)]
pub enum Listener {
    /// A TCP (IPv4 or IPv6) listener.
    Tcp(TcpListener),
    /// A unix stream listener.
    Unix(UnixListener),
}

impl Listener {
    /// Its address, for logs: `127.0.0.1:8000` or `unix:/path`.
    pub fn describe(&self) -> String {
        let addr = match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()),
            Listener::Unix(l) => l.local_addr().map(|a| match a.as_pathname() {
                Some(path) => format!("unix:{}", path.display()),
                None => "unix:(unnamed)".to_owned(),
            }),
        };
        addr.unwrap_or_else(|err| format!("(unknown address: {err})"))
    }
}

/// Names one inherited socket in error messages: its index, fd and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketId {
    /// Position among the inherited sockets (0 is fd 3).
    pub index: usize,
    /// The fd number.
    pub fd: RawFd,
    /// The name from `LISTEN_FDNAMES`, if any.
    pub name: Option<String>,
}

impl fmt::Display for SocketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "inherited socket {} (fd {}", self.index, self.fd)?;
        if let Some(name) = &self.name {
            write!(f, ", name {name:?}")?;
        }
        write!(f, ")")
    }
}

/// Why an inherited listener could not be taken, or a fallback not bound.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// `LISTEN_PID`, `LISTEN_FDS` or `LISTEN_FDNAMES` is malformed.
    #[error("reading the inherited sockets: {0}")]
    Env(#[from] EnvError),
    /// The fd announced by `LISTEN_FDS` is not open in this process.
    #[error("{socket} is not an open fd")]
    NotOpen {
        /// Which socket.
        socket: SocketId,
        /// What `fcntl(F_GETFD)` said.
        source: io::Error,
    },
    /// The fd is open but is not a socket.
    #[error("{socket} is not a socket")]
    NotASocket {
        /// Which socket.
        socket: SocketId,
    },
    /// The socket is of another kind than asked for (e.g. UDP, or unix when TCP was asked).
    #[error("{socket} is {found}, expected {expected}")]
    WrongKind {
        /// Which socket.
        socket: SocketId,
        /// What it is, e.g. `an AF_INET SOCK_DGRAM socket`.
        found: String,
        /// What was asked for, e.g. `a TCP listener`.
        expected: &'static str,
    },
    /// The socket is a stream socket of the right family but is not listening.
    #[error("{socket} is a stream socket that is not listening")]
    NotListening {
        /// Which socket.
        socket: SocketId,
    },
    /// The socket was already taken by an earlier call.
    #[error("{socket} was already taken")]
    AlreadyTaken {
        /// Which socket.
        socket: SocketId,
    },
    /// A socket option could not be read or set.
    #[error("{socket}: {action}")]
    Inspect {
        /// Which socket.
        socket: SocketId,
        /// What was being done, e.g. `reading SO_DOMAIN`.
        action: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Nothing was inherited and binding the fallback address failed.
    #[error("binding fallback address {addr}")]
    Bind {
        /// The fallback address as given.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
}

impl From<ListenError> for io::Error {
    fn from(err: ListenError) -> Self {
        let kind = match &err {
            ListenError::NotOpen { source, .. }
            | ListenError::Inspect { source, .. }
            | ListenError::Bind { source, .. } => source.kind(),
            ListenError::AlreadyTaken { .. } => io::ErrorKind::AlreadyExists,
            _ => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, err)
    }
}

/// The family a take asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Tcp,
    Unix,
    Any,
}

impl Want {
    fn describe(self) -> &'static str {
        match self {
            Want::Tcp => "a TCP listener",
            Want::Unix => "a unix stream listener",
            Want::Any => "a TCP or unix stream listener",
        }
    }
}

/// Indices of the inherited sockets taken so far.
static TAKEN: Mutex<BTreeSet<usize>> = Mutex::new(BTreeSet::new());

/// Takes the `idx`-th inherited socket (fd `3 + idx`) as a TCP listener.
pub fn take_tcp(idx: usize) -> Result<Option<TcpListener>, ListenError> {
    Ok(take_as(Which::Index(idx), Want::Tcp)?.map(|(fd, _)| TcpListener::from(fd)))
}

/// Takes the first not-yet-taken inherited socket named `name` as a TCP listener.
pub fn take_tcp_by_name(name: &str) -> Result<Option<TcpListener>, ListenError> {
    Ok(take_as(Which::Name(name), Want::Tcp)?.map(|(fd, _)| TcpListener::from(fd)))
}

/// Takes the `idx`-th inherited socket (fd `3 + idx`) as a unix stream listener.
pub fn take_unix(idx: usize) -> Result<Option<UnixListener>, ListenError> {
    Ok(take_as(Which::Index(idx), Want::Unix)?.map(|(fd, _)| UnixListener::from(fd)))
}

/// Takes the first not-yet-taken inherited socket named `name` as a unix stream listener.
pub fn take_unix_by_name(name: &str) -> Result<Option<UnixListener>, ListenError> {
    Ok(take_as(Which::Name(name), Want::Unix)?.map(|(fd, _)| UnixListener::from(fd)))
}

/// Takes an inherited stream listener of either family, by index or name.
pub fn take<'a>(which: impl Into<Which<'a>>) -> Result<Option<Listener>, ListenError> {
    Ok(take_as(which.into(), Want::Any)?.map(|(fd, domain)| {
        if domain == Domain::UNIX {
            Listener::Unix(UnixListener::from(fd))
        } else {
            Listener::Tcp(TcpListener::from(fd))
        }
    }))
}

/// Takes an inherited TCP listener, or binds `fallback` when none was inherited under that
/// index or name (e.g. when the program runs outside clusterd).
///
/// An inherited socket that is unusable is an error, never a reason to fall back.
pub fn tcp_listener_or_bind<'a, A>(
    which: impl Into<Which<'a>>,
    fallback: A,
) -> Result<TcpListener, ListenError>
where
    A: ToSocketAddrs + fmt::Display,
{
    let which = which.into();
    if let Some((fd, _)) = take_as(which, Want::Tcp)? {
        return Ok(TcpListener::from(fd));
    }
    TcpListener::bind(&fallback).map_err(|source| ListenError::Bind {
        addr: fallback.to_string(),
        source,
    })
}

/// Finds, validates and claims one inherited socket.
fn take_as(which: Which<'_>, want: Want) -> Result<Option<(OwnedFd, Domain)>, ListenError> {
    let fds = snapshot().listen.as_ref().map_err(Clone::clone)?;
    let mut taken = TAKEN.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(index) = pick(fds, &taken, which) else {
        return Ok(None);
    };
    let socket = SocketId {
        index,
        fd: fds[index].fd,
        name: fds[index].name.clone(),
    };
    if taken.contains(&index) {
        return Err(ListenError::AlreadyTaken { socket });
    }
    let domain = validate(&socket, want)?;
    taken.insert(index);
    // SAFETY: the fd was announced to this very process (LISTEN_PID matched), `validate`
    // checked that it is open, and `TAKEN` guarantees that ownership is handed out only once.
    let owned = unsafe { OwnedFd::from_raw_fd(socket.fd) };
    Ok(Some((owned, domain)))
}

/// The index `which` designates: for a name, the first untaken match, else the first match
/// (so that a repeated take reports `AlreadyTaken`).
fn pick(fds: &[InheritedFd], taken: &BTreeSet<usize>, which: Which<'_>) -> Option<usize> {
    match which {
        Which::Index(index) => (index < fds.len()).then_some(index),
        Which::Name(name) => {
            let mut matches = fds
                .iter()
                .enumerate()
                .filter(|(_, fd)| fd.name.as_deref() == Some(name))
                .map(|(index, _)| index);
            let first = matches.next()?;
            Some(
                std::iter::once(first)
                    .chain(matches)
                    .find(|index| !taken.contains(index))
                    .unwrap_or(first),
            )
        }
    }
}

/// Checks that the fd is a listening stream socket of the wanted family, and sets
/// close-on-exec on it. Returns its domain.
fn validate(socket: &SocketId, want: Want) -> Result<Domain, ListenError> {
    // SAFETY: F_GETFD only reads the fd's flags; any integer is acceptable input.
    if unsafe { libc::fcntl(socket.fd, libc::F_GETFD) } == -1 {
        return Err(ListenError::NotOpen {
            socket: socket.clone(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: the fd is open (checked just above) and stays open while borrowed: nothing in
    // this process closes an announced, untaken fd.
    let fd = unsafe { BorrowedFd::borrow_raw(socket.fd) };
    let sock = SockRef::from(&fd);
    let inspect = |action| {
        let socket = socket.clone();
        move |source: io::Error| ListenError::Inspect {
            socket,
            action,
            source,
        }
    };
    let ty = match sock.r#type() {
        Ok(ty) => ty,
        Err(err) if err.raw_os_error() == Some(libc::ENOTSOCK) => {
            return Err(ListenError::NotASocket {
                socket: socket.clone(),
            });
        }
        Err(err) => return Err(inspect("reading SO_TYPE")(err)),
    };
    let domain = sock.domain().map_err(inspect("reading SO_DOMAIN"))?;
    let protocol = sock.protocol().map_err(inspect("reading SO_PROTOCOL"))?;
    let is_tcp = (domain == Domain::IPV4 || domain == Domain::IPV6)
        && ty == Type::STREAM
        && matches!(protocol, None | Some(Protocol::TCP) | Some(Protocol::MPTCP));
    let is_unix = domain == Domain::UNIX && ty == Type::STREAM;
    let fits = match want {
        Want::Tcp => is_tcp,
        Want::Unix => is_unix,
        Want::Any => is_tcp || is_unix,
    };
    if !fits {
        return Err(ListenError::WrongKind {
            socket: socket.clone(),
            found: describe(domain, ty, protocol),
            expected: want.describe(),
        });
    }
    if !sock
        .is_listener()
        .map_err(inspect("reading SO_ACCEPTCONN"))?
    {
        return Err(ListenError::NotListening {
            socket: socket.clone(),
        });
    }
    sock.set_cloexec(true)
        .map_err(inspect("setting close-on-exec"))?;
    Ok(domain)
}

/// A human description of a socket's kind, e.g. `an AF_INET SOCK_DGRAM socket`.
fn describe(domain: Domain, ty: Type, protocol: Option<Protocol>) -> String {
    let family = match domain {
        Domain::IPV4 => "AF_INET".to_owned(),
        Domain::IPV6 => "AF_INET6".to_owned(),
        Domain::UNIX => "AF_UNIX".to_owned(),
        other => format!("family {}", libc::c_int::from(other)),
    };
    let kind = match ty {
        Type::STREAM => "SOCK_STREAM".to_owned(),
        Type::DGRAM => "SOCK_DGRAM".to_owned(),
        Type::SEQPACKET => "SOCK_SEQPACKET".to_owned(),
        Type::RAW => "SOCK_RAW".to_owned(),
        other => format!("type {}", libc::c_int::from(other)),
    };
    match protocol {
        Some(p) if p != Protocol::TCP && p != Protocol::UDP => {
            format!(
                "an {family} {kind} socket of protocol {}",
                libc::c_int::from(p)
            )
        }
        _ => format!("an {family} {kind} socket"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(names: &[&str]) -> Vec<InheritedFd> {
        names
            .iter()
            .zip(3..)
            .map(|(name, fd)| InheritedFd {
                fd,
                name: Some(name.to_string()),
            })
            .collect()
    }

    #[test]
    fn pick_by_index_and_name() {
        let fds = named(&["http", "admin", "http"]);
        let none = BTreeSet::new();
        assert_eq!(pick(&fds, &none, Which::Index(2)), Some(2));
        assert_eq!(pick(&fds, &none, Which::Index(3)), None);
        assert_eq!(pick(&fds, &none, Which::Name("admin")), Some(1));
        assert_eq!(pick(&fds, &none, Which::Name("metrics")), None);
        assert_eq!(pick(&fds, &none, Which::Name("http")), Some(0));
        let first_taken = BTreeSet::from([0]);
        assert_eq!(pick(&fds, &first_taken, Which::Name("http")), Some(2));
        let both_taken = BTreeSet::from([0, 2]);
        assert_eq!(pick(&fds, &both_taken, Which::Name("http")), Some(0));
    }

    #[test]
    fn socket_id_reads_well() {
        let id = SocketId {
            index: 1,
            fd: 4,
            name: Some("admin".into()),
        };
        assert_eq!(id.to_string(), "inherited socket 1 (fd 4, name \"admin\")");
        let id = SocketId {
            index: 0,
            fd: 3,
            name: None,
        };
        assert_eq!(id.to_string(), "inherited socket 0 (fd 3)");
    }

    #[test]
    fn kinds_are_described() {
        assert_eq!(
            describe(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)),
            "an AF_INET SOCK_DGRAM socket"
        );
        assert_eq!(
            describe(Domain::UNIX, Type::DGRAM, None),
            "an AF_UNIX SOCK_DGRAM socket"
        );
    }
}
