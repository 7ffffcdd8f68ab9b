//! Unmodified servers (`intercept = true`): a worker's own `bind()` and `listen()` are trapped
//! with seccomp user notification and answered with the app's held sockets.
//!
//! **Child side** ([`Trap`]): before `fork`, the BPF program, a datagram socketpair and the
//! `sendmsg` buffers are prepared. As the last step before `execve`, the child sets
//! `PR_SET_NO_NEW_PRIVS`, installs the filter with `SECCOMP_FILTER_FLAG_NEW_LISTENER` (it
//! returns `SECCOMP_RET_USER_NOTIF` for `bind` and `listen` of the native architecture and
//! allows everything else) and sends the notification fd to the supervisor with
//! `SCM_RIGHTS`. The filter is inherited by everything the worker runs.
//!
//! **Supervisor side** ([`Intercepts`]): one local task per worker waits on its notification
//! fd with tokio's `AsyncFd` (never blocking the loop) and answers each trapped call:
//!
//! - `bind(fd, addr)` of a stream socket whose address **matches** one of the app's held
//!   sockets: the held socket is installed at the worker's `fd` (`SECCOMP_IOCTL_NOTIF_ADDFD`
//!   with `SECCOMP_ADDFD_FLAG_SETFD`, keeping the fd's close-on-exec flag) and the call
//!   returns 0. The worker's own socket is closed by that; `getsockname` then shows the held
//!   socket's address (e.g. `127.0.0.1:8001` for a bind of `[::]:8001`).
//! - `listen(fd)` on a handed-off socket returns 0 without touching the shared socket (its
//!   backlog is the manifest's), and tells the driver (`Event::Listening`): the worker is
//!   ready with `ready = "listen"`.
//! - `bind(fd, addr)` of a stream socket to a TCP address with a non-zero port that matches
//!   **no** held socket: the call stays pending and goes to the driver ([`Unmatched`]), which
//!   answers it as Node's cluster primary does: with the socket it bound for that address on
//!   the first such call of the app (`port-PORT`, see `sockets::Sockets::bind_on_demand`), or
//!   the worker's own steered socket on it, installed as above; or with the error the
//!   worker's own `bind()` would have got (`EADDRINUSE`, `EACCES`), returned as the call's
//!   errno ([`Intercepts::answer_unmatched`]). Port 0 and datagram sockets stay the worker's
//!   own.
//! - anything else continues unchanged (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`).
//!
//! - `fcntl`, `ioctl`, `getsockopt` or `getsockname` on one of the fds 3.. the worker
//!   inherited (the filter traps only those fd numbers) continues unchanged; when the fd is
//!   still a handed-off socket, the worker has taken it, which counts as its `listen()`.
//!
//! **Inherited sockets.** The worker also finds these very sockets at fds 3, 4, ...
//! (`LISTEN_FDS`), already listening: an app that takes fd 3 when it is there and binds
//! otherwise works either way, and one that does both gets the same socket twice (under
//! steering, its own steered socket; never clusterd's address holder). Such an app usually
//! never calls `listen()` (Go's `net.FileListener`, `listenfd`, `go-systemd/activation`), but
//! every way of taking an inherited socket looks at it first (Go dups it with `fcntl`,
//! `listenfd` and Python's `socket(fileno=3)` read `getsockopt`, tokio sets `FIONBIO`): that
//! first look is the readiness signal of `ready = "listen"`. Connections wait in the socket's
//! queue until the worker accepts. An app that only ever `accept()`s on fd 3 shows nothing
//! (trapping `accept` would cost every connection a round trip): give it `ready = "delay"`.
//!
//! **Matching rules.** A TCP bind matches a held TCP socket with the same port when its address
//! is the wildcard (`0.0.0.0`, `::`), the held socket's own address, or a loopback address
//! while the held socket is on loopback (`127.0.0.1`, `::1`, `::ffff:127.0.0.1`). Port 0 never
//! matches. A unix bind matches by path (a relative path is resolved against the worker's
//! working directory); abstract addresses never match. Only stream sockets are handed off.
//!
//! **O_NONBLOCK.** Sockets handed to intercepted apps are made non-blocking (the flag belongs
//! to the socket shared by every worker): event-loop servers (Node, Go, asyncio) expect it, and
//! blocking-style servers that `select()` first (Python's `socketserver`) treat the `EAGAIN` of
//! a connection another worker took as "nothing to accept".
//!
//! This is a convenience, not a sandbox: a worker that uses another syscall ABI (x32) or
//! `socketcall` is simply not intercepted. The memory and fd reads need ptrace access to the
//! worker (clusterd is its parent: allowed by Yama's default scope). A worker that dies
//! mid-notification is harmless: the ioctls then fail with `ENOENT` and the notification is
//! dropped.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use clusterd_manifest::Listen;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::AbortHandle;

use clusterd_core::WorkerId;

mod trap;

use trap::LOOKS;
pub use trap::{Trap, probe};

/// One of an app's held sockets, as the interception tasks see it.
#[derive(Debug)]
pub struct Held {
    /// Its name in the manifest.
    name: String,
    /// Its address.
    listen: Listen,
    /// A duplicate of the held socket, installed into workers.
    fd: OwnedFd,
    /// Its inode: `/proc/PID/fd/N` of a handed-off fd reads `socket:[inode]`.
    inode: u64,
}

impl Held {
    /// The socket's fd, to place at the worker's fd 3.. (open for as long as `self` lives).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// `fd`, a listening socket for `name` (at `listen`), made non-blocking, to hand to a
    /// worker whose bind matches.
    pub fn new(name: &str, listen: &Listen, fd: OwnedFd) -> io::Result<Held> {
        socket2::SockRef::from(&fd).set_nonblocking(true)?;
        let inode = nix::sys::stat::fstat(&fd)?.st_ino;
        Ok(Held {
            name: name.to_owned(),
            listen: listen.clone(),
            fd,
            inode,
        })
    }
}

/// A trapped address, as the worker passed it to `bind`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BindAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
    Other,
}

impl std::fmt::Display for BindAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindAddr::Tcp(addr) => write!(f, "{addr}"),
            BindAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            BindAddr::Other => f.write_str("(other family)"),
        }
    }
}

/// Decodes a `struct sockaddr` of `bytes`.
fn decode(bytes: &[u8]) -> BindAddr {
    let Some(family) = bytes.get(..2).map(|b| u16::from_ne_bytes([b[0], b[1]])) else {
        return BindAddr::Other;
    };
    let port = |b: &[u8]| u16::from_be_bytes([b[2], b[3]]);
    match i32::from(family) {
        libc::AF_INET if bytes.len() >= 8 => {
            let ip = Ipv4Addr::new(bytes[4], bytes[5], bytes[6], bytes[7]);
            BindAddr::Tcp(SocketAddr::new(IpAddr::V4(ip), port(bytes)))
        }
        libc::AF_INET6 if bytes.len() >= 24 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&bytes[8..24]);
            BindAddr::Tcp(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                port(bytes),
            ))
        }
        libc::AF_UNIX if bytes.len() > 2 && bytes[2] != 0 => {
            let path = &bytes[2..];
            let end = path.iter().position(|b| *b == 0).unwrap_or(path.len());
            BindAddr::Unix(PathBuf::from(std::ffi::OsStr::from_bytes(&path[..end])))
        }
        _ => BindAddr::Other,
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The matching rules of the module doc. `cwd` resolves a relative unix path.
fn matches(bind: &BindAddr, held: &Listen, cwd: Option<&Path>) -> bool {
    match (bind, held) {
        (BindAddr::Tcp(bind), Listen::Tcp(held)) => {
            let (ip, held_ip) = (canonical(bind.ip()), canonical(held.ip()));
            bind.port() != 0
                && bind.port() == held.port()
                && (ip.is_unspecified()
                    || ip == held_ip
                    || (ip.is_loopback() && held_ip.is_loopback()))
        }
        (BindAddr::Unix(path), Listen::Unix(held)) => {
            if path.is_absolute() {
                path == held
            } else {
                cwd.is_some_and(|cwd| cwd.join(path) == *held)
            }
        }
        _ => false,
    }
}

/// Interception by default (apps with `workers > 1` and no `sockets`, see
/// `AppConfig::intercept_auto`): applied where this kernel can trap calls; where it cannot,
/// those apps run without it, and the log says why.
pub fn resolve_defaults(manifest: &mut clusterd_manifest::Manifest) {
    if manifest
        .apps
        .values()
        .all(|app| app.intercept_auto.is_none())
    {
        return;
    }
    let available = probe();
    let apps = manifest.resolve_interception(available.is_ok());
    if let Err(error) = available {
        tracing::warn!(
            "apps {}: several workers and no sockets, so their binds would be trapped and each \
             port shared (as Node's cluster module does), but {error}; they run without \
             interception: declare their port in [sockets.NAME] and `sockets` (and have them \
             take fd 3), or run one worker",
            apps.join(", ")
        );
    }
}

/// The interception tasks of all workers, and the channels they report `listen()`s and
/// unmatched `bind()`s on.
pub struct Intercepts {
    tasks: HashMap<WorkerId, Watched>,
    listening_tx: UnboundedSender<WorkerId>,
    listening_rx: UnboundedReceiver<WorkerId>,
    unmatched_tx: UnboundedSender<Unmatched>,
    unmatched_rx: UnboundedReceiver<Unmatched>,
}

/// One worker's interception: what its task uses, kept for an upgrade's hand-over.
struct Watched {
    label: String,
    fd: Rc<AsyncFd<OwnedFd>>,
    /// The app's held sockets, then the sockets its binds were answered with on demand.
    held: Rc<RefCell<Vec<Held>>>,
    task: AbortHandle,
}

/// A worker's trapped `bind()` of a stream socket to a TCP address with a non-zero port that
/// matches none of its held sockets. The worker waits in `bind` until the driver answers with
/// [`Intercepts::answer_unmatched`].
#[derive(Debug)]
pub struct Unmatched {
    /// The worker.
    pub worker: WorkerId,
    /// The process that called `bind`.
    pub pid: libc::pid_t,
    /// The address it binds.
    pub address: SocketAddr,
    /// `IPV6_V6ONLY` of its socket (IPv6 addresses).
    pub v6only: bool,
    /// The notification.
    id: u64,
    /// The socket's fd number in the worker, and its close-on-exec flag.
    target: RawFd,
    cloexec: bool,
}

/// A worker's interception as it crosses an upgrade's exec (the descriptors stay open: the
/// new clusterd answers the calls trapped meanwhile).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handed {
    /// The worker.
    pub worker: WorkerId,
    /// Its label, `app[slot]`.
    pub label: String,
    /// Its seccomp notification fd.
    pub notify: RawFd,
    /// The sockets its binds are answered with.
    pub held: Vec<HandedHeld>,
}

/// One held socket of [`Handed`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedHeld {
    /// Its name in the manifest.
    pub name: String,
    /// Its address.
    pub listen: Listen,
    /// The socket.
    pub fd: RawFd,
}

impl Default for Intercepts {
    fn default() -> Self {
        let (listening_tx, listening_rx) = unbounded_channel();
        let (unmatched_tx, unmatched_rx) = unbounded_channel();
        Intercepts {
            tasks: HashMap::new(),
            listening_tx,
            listening_rx,
            unmatched_tx,
            unmatched_rx,
        }
    }
}

impl Intercepts {
    /// Starts answering the trapped calls of `worker` (labelled `label` in logs) on its
    /// notification fd, with the app's `held` sockets. Must run inside a `LocalSet`.
    pub fn watch(
        &mut self,
        worker: WorkerId,
        label: String,
        notify_fd: OwnedFd,
        held: Vec<Held>,
    ) -> io::Result<()> {
        // SAFETY: an OwnedFd keeps its fd open, and the same, for as long as it lives.
        let fd =
            unsafe { AsyncFd::register_with_interest(notify_fd, tokio::io::Interest::READABLE) }
                .map_err(io::Error::from)?;
        let (fd, held) = (Rc::new(fd), Rc::new(RefCell::new(held)));
        let report = Report {
            listening: self.listening_tx.clone(),
            unmatched: self.unmatched_tx.clone(),
        };
        let task = tokio::task::spawn_local(serve(
            worker,
            label.clone(),
            Rc::clone(&fd),
            Rc::clone(&held),
            report,
        ));
        let task = task.abort_handle();
        let watched = Watched {
            label,
            fd,
            held,
            task,
        };
        self.tasks.insert(worker, watched);
        Ok(())
    }

    /// What an upgrade hands over: every worker's descriptors, which stay open here (and are
    /// served on if the exec fails).
    pub fn handover(&self) -> Vec<Handed> {
        self.tasks
            .iter()
            .map(|(worker, watched)| Handed {
                worker: *worker,
                label: watched.label.clone(),
                notify: watched.fd.get_ref().as_raw_fd(),
                held: watched
                    .held
                    .borrow()
                    .iter()
                    .map(|held| HandedHeld {
                        name: held.name.clone(),
                        listen: held.listen.clone(),
                        fd: held.fd.as_raw_fd(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// The worker's record is gone: stop its task (dropping the notification fd makes any call
    /// still trapped fail with `ENOSYS`; by now its processes are gone).
    pub fn forget(&mut self, worker: WorkerId) {
        if let Some(watched) = self.tasks.remove(&worker) {
            watched.task.abort();
        }
    }

    /// The next worker that called `listen()` on a handed-off socket, or the next `bind()`
    /// that matched no held socket.
    pub async fn next(&mut self) -> Option<Trapped> {
        tokio::select! {
            Some(worker) = self.listening_rx.recv() => Some(Trapped::Listening(worker)),
            Some(request) = self.unmatched_rx.recv() => Some(Trapped::Unmatched(request)),
            else => None,
        }
    }

    /// The unmatched `bind()`s waiting for an answer right now (before an upgrade's exec).
    pub fn unmatched_now(&mut self) -> Vec<Unmatched> {
        std::iter::from_fn(|| self.unmatched_rx.try_recv().ok()).collect()
    }

    /// Answers an unmatched `bind()`: `Ok(socket)` installs the socket at the worker's fd
    /// (the call returns 0, and a later `listen()` on it is the worker's), `Err(errno)` makes
    /// the call fail with that errno. A worker that is gone is not answered (its call went
    /// with it).
    pub fn answer_unmatched(&mut self, request: &Unmatched, answer: Result<Held, i32>) {
        let Some(watched) = self.tasks.get(&request.worker) else {
            return;
        };
        let fd = watched.fd.get_ref();
        let (pid, address, label) = (request.pid, request.address, &watched.label);
        let errno = match answer {
            Ok(socket) => match hand(fd, request.id, &socket, request.target, request.cloexec) {
                Ok(()) => {
                    tracing::info!(
                        "{label}: pid {pid} bind({address}) on fd {} answered with socket \
                             {} ({}), bound on demand",
                        request.target,
                        socket.name,
                        crate::daemon::sockets::display_listen(&socket.listen)
                    );
                    respond(fd, request.id, 0);
                    watched.held.borrow_mut().push(socket);
                    return;
                }
                Err(error) if error.raw_os_error() == Some(libc::ENOENT) => return,
                Err(error) => {
                    tracing::warn!(
                        "{label}: pid {pid} bind({address}): cannot hand it socket {}: \
                             {error}",
                        socket.name
                    );
                    error.raw_os_error().unwrap_or(libc::EADDRNOTAVAIL)
                }
            },
            Err(errno) => errno,
        };
        respond(fd, request.id, errno);
    }
}

/// What the driver acts on.
pub enum Trapped {
    /// A worker called `listen()` on a handed-off socket (or took a first look at one).
    Listening(WorkerId),
    /// A `bind()` waits for the driver's answer.
    Unmatched(Unmatched),
}

/// Where a worker's task reports what the driver acts on.
struct Report {
    listening: UnboundedSender<WorkerId>,
    unmatched: UnboundedSender<Unmatched>,
}

/// Answers notification `id` with 0 (`errno` 0) or -1 and `errno`.
fn respond(fd: &OwnedFd, id: u64, errno: i32) {
    let response = libc::seccomp_notif_resp {
        id,
        val: 0,
        error: -errno,
        flags: 0,
    };
    // SAFETY: a valid response struct for this notification; an error (ENOENT: the caller
    // is gone) leaves nothing to do.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &response) };
}

/// Installs `socket` at fd `target` of the worker whose notification `id` is still pending.
fn hand(fd: &OwnedFd, id: u64, socket: &Held, target: RawFd, cloexec: bool) -> io::Result<()> {
    // The pid, the memory and the fd read for this call belong to it only if the notification
    // is still pending.
    // SAFETY: the ioctl reads one u64.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &id) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let addfd = libc::seccomp_notif_addfd {
        id,
        flags: libc::SECCOMP_ADDFD_FLAG_SETFD as u32,
        srcfd: socket.fd.as_raw_fd() as u32,
        newfd: target as u32,
        newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
    };
    // SAFETY: a valid addfd struct; the kernel duplicates our fd into the worker.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ADDFD, &addfd) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One worker's task: answers notifications until every process of the worker is gone.
async fn serve(
    worker: WorkerId,
    label: String,
    fd: Rc<AsyncFd<OwnedFd>>,
    held: Rc<RefCell<Vec<Held>>>,
    report: Report,
) {
    loop {
        let Ok(mut guard) = fd.readable().await else {
            return;
        };
        // Every process that had the filter is gone: nothing can be pending.
        if guard.ready().is_read_closed() {
            return;
        }
        // Edge-triggered: answer everything pending before waiting for the next edge.
        while pending(fd.get_ref()) {
            match receive(fd.get_ref()) {
                Ok(notification) => {
                    let answered = answer(fd.get_ref(), &notification, &held.borrow(), &label);
                    match answered {
                        Answered::Listened => {
                            let _ = report.listening.send(worker);
                        }
                        Answered::Unmatched(mut request) => {
                            request.worker = worker;
                            let _ = report.unmatched.send(request);
                        }
                        Answered::Done => {}
                    }
                }
                // The caller died or was interrupted before we took the notification.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINTR)) => {}
                Err(e) => {
                    tracing::warn!(
                        event = "intercept_read_failed",
                        "{label}: cannot read its trapped bind/listen calls: {e}"
                    );
                    return;
                }
            }
        }
        guard.clear_ready();
    }
}

/// Whether a notification is waiting (`poll` with no timeout).
fn pending(fd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

fn receive(fd: &OwnedFd) -> io::Result<libc::seccomp_notif> {
    // SAFETY: the kernel requires a zeroed struct and fills it.
    unsafe {
        let mut notification: libc::seccomp_notif = std::mem::zeroed();
        if libc::ioctl(
            fd.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_RECV,
            &mut notification,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(notification)
    }
}

/// How a trapped call is answered.
enum Answer {
    /// Run the call as the worker made it.
    Continue,
    /// Return 0 without running it.
    Success,
    /// A bind the driver answers ([`Unmatched`]).
    Defer(Unmatched),
}

/// What came of one notification.
enum Answered {
    /// Nothing for the driver.
    Done,
    /// A `listen()` on a handed-off socket or a first look at one (the driver's core ignores
    /// all but the first).
    Listened,
    /// A bind the driver must answer (its `worker` is set by the caller).
    Unmatched(Unmatched),
}

/// Answers one notification, or defers it to the driver. Every error from the ioctls
/// (`ENOENT`: the worker died meanwhile) drops the notification.
fn answer(
    fd: &OwnedFd,
    notification: &libc::seccomp_notif,
    held: &[Held],
    label: &str,
) -> Answered {
    let pid = notification.pid as libc::pid_t;
    let nr = i64::from(notification.data.nr);
    let target = notification.data.args[0] as RawFd;
    let (answer, listened) = if nr == libc::SYS_bind {
        (bind(fd, notification, held, label), false)
    } else if nr == libc::SYS_listen && handed_off(pid, target, held).is_some() {
        (Answer::Success, true)
    } else if LOOKS.contains(&nr) {
        (Answer::Continue, handed_off(pid, target, held).is_some())
    } else {
        (Answer::Continue, false)
    };
    let mut response = libc::seccomp_notif_resp {
        id: notification.id,
        val: 0,
        error: 0,
        flags: 0,
    };
    match answer {
        Answer::Continue => response.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        Answer::Success => {}
        Answer::Defer(request) => return Answered::Unmatched(request),
    }
    // SAFETY: a valid response struct for this notification.
    let sent = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &response) };
    if sent == 0 && listened {
        Answered::Listened
    } else {
        Answered::Done
    }
}

/// The held socket at `target` in process `pid`, if it is one of `held`.
fn handed_off(pid: libc::pid_t, target: RawFd, held: &[Held]) -> Option<&Held> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{target}")).ok()?;
    let link = link.to_str()?;
    held.iter()
        .find(|h| link == format!("socket:[{}]", h.inode))
}

/// A trapped `bind`: hand off a matching held socket; defer a TCP one that matches none (port
/// not 0, a stream socket) to the driver; else continue.
fn bind(fd: &OwnedFd, notification: &libc::seccomp_notif, held: &[Held], label: &str) -> Answer {
    let pid = notification.pid as libc::pid_t;
    let [target, addr_ptr, addr_len, ..] = notification.data.args;
    let target = target as RawFd;
    let mut bytes = [0u8; std::mem::size_of::<libc::sockaddr_storage>()];
    let len = (addr_len as usize).min(bytes.len());
    if read_memory(pid, addr_ptr, &mut bytes[..len]).is_err() {
        return Answer::Continue;
    }
    let address = decode(&bytes[..len]);
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
    let socket = held
        .iter()
        .find(|h| matches(&address, &h.listen, cwd.as_deref()));
    let Some(socket) = socket else {
        return match (address, stream_socket(pid, target)) {
            (BindAddr::Tcp(address), Some(own)) if address.port() != 0 => {
                Answer::Defer(Unmatched {
                    worker: WorkerId(0),
                    pid,
                    address,
                    v6only: address.is_ipv6()
                        && socket2::SockRef::from(&own.fd).only_v6().unwrap_or(false),
                    id: notification.id,
                    target,
                    cloexec: own.cloexec,
                })
            }
            _ => Answer::Continue,
        };
    };
    let Some(own) = stream_socket(pid, target) else {
        return Answer::Continue;
    };
    if let Err(error) = hand(fd, notification.id, socket, target, own.cloexec) {
        if error.raw_os_error() != Some(libc::ENOENT) {
            tracing::warn!(
                event = "intercept_handoff_failed",
                pid,
                "{label}: pid {pid} bind({address}): cannot hand it socket {}: {error}",
                socket.name
            );
        }
        return Answer::Continue;
    }
    tracing::info!(
        "{label}: pid {pid} bind({address}) on fd {target} answered with socket {} ({})",
        socket.name,
        crate::daemon::sockets::display_listen(&socket.listen)
    );
    Answer::Success
}

/// Reads `buf.len()` bytes at `addr` in process `pid`.
fn read_memory(pid: libc::pid_t, addr: u64, buf: &mut [u8]) -> io::Result<()> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the local iovec covers `buf`; the remote one is only read by the kernel.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != buf.len() {
        return Err(io::Error::other("short read of the worker's memory"));
    }
    Ok(())
}

/// A worker's own socket, as seen from clusterd.
struct Own {
    /// A duplicate of it.
    fd: OwnedFd,
    /// Its close-on-exec flag in the worker.
    cloexec: bool,
}

/// Fd `target` of `pid` when it is a stream socket; `None` otherwise (or when it cannot be
/// seen).
fn stream_socket(pid: libc::pid_t, target: RawFd) -> Option<Own> {
    // A notification names the calling thread, and `pidfd_open` takes only a thread group's
    // leader (Go, for one, binds from any of its threads): open the process's.
    let process = thread_group(pid)?;
    // SAFETY: pidfd_open and pidfd_getfd return new fds (or -1), which we own.
    let copy = unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, process, 0);
        if pidfd < 0 {
            return None;
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as RawFd);
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0);
        if copy < 0 {
            return None;
        }
        OwnedFd::from_raw_fd(copy as RawFd)
    };
    if socket2::SockRef::from(&copy).r#type().ok()? != socket2::Type::STREAM {
        return None;
    }
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{target}")).ok()?;
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())?;
    Some(Own {
        fd: copy,
        cloexec: flags & libc::O_CLOEXEC as u32 != 0,
    })
}

/// The process (thread group) thread `tid` belongs to, from `/proc/<tid>/status`.
fn thread_group(tid: libc::pid_t) -> Option<libc::pid_t> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::trap::{AUDIT_ARCH, DATA_ARCH, DATA_ARG0_LOW, DATA_NR, filter};
    use super::*;

    fn tcp(s: &str) -> BindAddr {
        BindAddr::Tcp(s.parse().unwrap())
    }

    #[test]
    fn a_thread_is_found_in_its_process() {
        let me = std::process::id() as libc::pid_t;
        assert_eq!(thread_group(me), Some(me));
        // Asked from a thread of its own, while it runs: its process, not itself.
        let (tid, group) = std::thread::spawn(|| {
            let tid = nix::unistd::gettid().as_raw();
            (tid, thread_group(tid))
        })
        .join()
        .unwrap();
        assert_ne!(tid, me);
        assert_eq!(group, Some(me));
    }

    #[test]
    fn binds_match_by_port_and_wildcard_or_loopback() {
        let held = Listen::Tcp("127.0.0.1:8001".parse().unwrap());
        for bind in ["0.0.0.0:8001", "[::]:8001", "127.0.0.1:8001", "[::1]:8001"] {
            assert!(matches(&tcp(bind), &held, None), "{bind}");
        }
        assert!(matches(&tcp("[::ffff:127.0.0.1]:8001"), &held, None));
        for bind in ["0.0.0.0:8002", "0.0.0.0:0", "10.1.2.3:8001"] {
            assert!(!matches(&tcp(bind), &held, None), "{bind}");
        }
        let any = Listen::Tcp("0.0.0.0:0".parse().unwrap());
        assert!(
            !matches(&tcp("0.0.0.0:0"), &any, None),
            "port 0 never matches"
        );
        let unix = Listen::Unix("/run/app.sock".into());
        let bind = BindAddr::Unix("app.sock".into());
        assert!(matches(&bind, &unix, Some(Path::new("/run"))));
        assert!(!matches(&bind, &unix, Some(Path::new("/tmp"))));
        assert!(!matches(&tcp("0.0.0.0:8001"), &unix, None));
    }

    #[test]
    fn decodes_sockaddrs() {
        let v4 = socket2::SockAddr::from("127.0.0.1:8001".parse::<SocketAddr>().unwrap());
        // SAFETY: as_ptr points at len() initialized bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts(v4.as_ptr().cast::<u8>(), v4.len() as usize) };
        assert_eq!(decode(bytes), tcp("127.0.0.1:8001"));
        let v6 = socket2::SockAddr::from("[::]:80".parse::<SocketAddr>().unwrap());
        // SAFETY: as above.
        let bytes =
            unsafe { std::slice::from_raw_parts(v6.as_ptr().cast::<u8>(), v6.len() as usize) };
        assert_eq!(decode(bytes), tcp("[::]:80"));
        let unix = socket2::SockAddr::unix("/run/x.sock").unwrap();
        // SAFETY: as above.
        let bytes =
            unsafe { std::slice::from_raw_parts(unix.as_ptr().cast::<u8>(), unix.len() as usize) };
        assert_eq!(decode(bytes), BindAddr::Unix("/run/x.sock".into()));
        assert_eq!(decode(&[]), BindAddr::Other);
    }

    /// Runs `program` (loads, `jeq`, `jge`, returns: all the filter uses) on a call.
    fn run(program: &[libc::sock_filter], arch: u32, nr: libc::c_long, arg0: u32) -> u32 {
        let (mut pc, mut a) = (0, 0u32);
        loop {
            let op = program[pc];
            let next = pc + 1;
            match u32::from(op.code) {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    a = match op.k {
                        DATA_NR => nr as u32,
                        DATA_ARCH => arch,
                        DATA_ARG0_LOW => arg0,
                        k => panic!("load of offset {k}"),
                    };
                    pc = next;
                }
                c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => {
                    pc = next + usize::from(if a == op.k { op.jt } else { op.jf });
                }
                c if c == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K => {
                    pc = next + usize::from(if a >= op.k { op.jt } else { op.jf });
                }
                c if c == libc::BPF_RET | libc::BPF_K => return op.k,
                c => panic!("instruction {c:#x}"),
            }
        }
    }

    #[test]
    fn the_filter_traps_bind_listen_and_first_looks_at_inherited_fds_only() {
        let program = filter(2);
        let notify = libc::SECCOMP_RET_USER_NOTIF;
        let allow = libc::SECCOMP_RET_ALLOW;
        assert_eq!(run(&program, AUDIT_ARCH, libc::SYS_bind, 7), notify);
        assert_eq!(run(&program, AUDIT_ARCH, libc::SYS_listen, 7), notify);
        for nr in LOOKS {
            assert_eq!(run(&program, AUDIT_ARCH, nr, 3), notify);
            assert_eq!(run(&program, AUDIT_ARCH, nr, 4), notify);
            for fd in [0, 2, 5, 100, u32::MAX] {
                assert_eq!(run(&program, AUDIT_ARCH, nr, fd), allow, "{nr} on fd {fd}");
            }
        }
        assert_eq!(run(&program, AUDIT_ARCH, libc::SYS_accept4, 3), allow);
        assert_eq!(run(&program, AUDIT_ARCH, libc::SYS_read, 3), allow);
        assert_eq!(run(&program, 0x4000_0003, libc::SYS_bind, 3), allow);
        // Nothing inherited: no fd is looked at.
        assert_eq!(run(&filter(0), AUDIT_ARCH, libc::SYS_fcntl, 3), allow);
    }

    #[test]
    fn this_kernel_supports_user_notification() {
        probe().expect("seccomp user notification");
    }
}
