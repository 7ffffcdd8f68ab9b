//! The SDK against real processes: each test spawns this test binary again (its ignored
//! `child` test is the entry point) with real sockets dup'ed to fds 3, 4, ... and the
//! `LISTEN_*`, `NOTIFY_SOCKET` and `WATCHDOG_USEC` variables set, as clusterd does, and checks
//! what the child reports on stdout (lines starting with `@@ `) and sends to its notify socket.

use std::env;
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clusterd_worker::{ListenError, Listener};

/// Tells the child which scenario to run.
const CASE_VAR: &str = "CLUSTERD_WORKER_TEST_CASE";
/// Every wait in these tests gives up after this long.
const DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The child side.

/// Entry point of the child processes; does nothing useful when run directly.
#[test]
#[ignore = "entry point of the child processes that the other tests spawn"]
fn child() {
    let Ok(case) = env::var(CASE_VAR) else {
        return;
    };
    match case.as_str() {
        "take_tcp" => child_take_tcp(),
        "take_tcp_error" => report(
            "take_tcp",
            clusterd_worker::take_tcp(0).map(|l| l.is_some()),
        ),
        "names" => child_names(),
        "fallback" => child_fallback(),
        "notify" => child_notify(),
        "watchdog" => child_watchdog(),
        "shutdown" => child_shutdown(),
        other => panic!("unknown case {other}"),
    }
}

/// Prints one result line for the parent.
fn say(line: impl std::fmt::Display) {
    println!("@@ {line}");
}

/// Prints `name ok <value>` or `name err <Variant> <message>`.
fn report<T: std::fmt::Debug>(name: &str, result: Result<T, ListenError>) {
    match result {
        Ok(value) => say(format!("{name} ok {value:?}")),
        Err(err) => say(format!("{name} err {} {err}", variant(&err))),
    }
}

fn variant(err: &ListenError) -> &'static str {
    match err {
        ListenError::Env(_) => "Env",
        ListenError::NotOpen { .. } => "NotOpen",
        ListenError::NotASocket { .. } => "NotASocket",
        ListenError::WrongKind { .. } => "WrongKind",
        ListenError::NotListening { .. } => "NotListening",
        ListenError::AlreadyTaken { .. } => "AlreadyTaken",
        ListenError::Inspect { .. } => "Inspect",
        ListenError::Bind { .. } => "Bind",
    }
}

fn child_take_tcp() {
    let listener = clusterd_worker::take_tcp(0)
        .expect("take fd 3")
        .expect("fd 3 inherited");
    say(format!(
        "addr {}",
        listener.local_addr().expect("local_addr")
    ));
    // SAFETY: F_GETFD only reads flags of an fd we own.
    let flags = unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_GETFD) };
    say(format!("cloexec {}", flags & libc::FD_CLOEXEC != 0));
    report("again", clusterd_worker::take_tcp(0).map(|l| l.is_some()));
    report("fd 4", clusterd_worker::take_tcp(1).map(|l| l.is_some()));
    let (mut conn, _) = listener.accept().expect("accept");
    std::io::Write::write_all(&mut conn, b"served by the child").expect("write");
}

fn child_names() {
    let tcp_addr = |l: Option<std::net::TcpListener>| l.map(|l| l.local_addr().expect("addr"));
    report(
        "admin",
        clusterd_worker::take_tcp_by_name("admin").map(tcp_addr),
    );
    report(
        "admin again",
        clusterd_worker::take_tcp_by_name("admin").map(tcp_addr),
    );
    report(
        "missing",
        clusterd_worker::take_tcp_by_name("missing").map(tcp_addr),
    );
    report(
        "sock as tcp",
        clusterd_worker::take_tcp_by_name("sock").map(tcp_addr),
    );
    report(
        "sock as unix",
        clusterd_worker::take_unix_by_name("sock").map(|l| {
            l.map(|l| {
                l.local_addr()
                    .expect("addr")
                    .as_pathname()
                    .map(|p| p.to_owned())
            })
        }),
    );
    report(
        "any 0",
        clusterd_worker::take(0).map(|l| match l {
            Some(Listener::Tcp(l)) => format!("tcp {}", l.local_addr().expect("addr")),
            Some(Listener::Unix(_)) => "unix".to_owned(),
            None => "none".to_owned(),
        }),
    );
    report("unix 3", clusterd_worker::take_unix(3).map(|l| l.is_some()));
}

fn child_fallback() {
    report(
        "inherited",
        clusterd_worker::take_tcp(0).map(|l| l.is_some()),
    );
    report(
        "or_bind",
        clusterd_worker::tcp_listener_or_bind(0, "127.0.0.1:0")
            .map(|l| l.local_addr().expect("addr")),
    );
    report(
        "bad fallback",
        clusterd_worker::tcp_listener_or_bind("http", "256.0.0.1:80").map(|_| ()),
    );
}

fn child_notify() {
    say(format!("info {:?}", clusterd_worker::worker_info()));
    say(format!(
        "ready {:?}",
        clusterd_worker::ready().map_err(|e| e.to_string())
    ));
    say(format!(
        "status {:?}",
        clusterd_worker::notify("STATUS=warming up\nEXTEND_TIMEOUT_USEC=1000000")
            .map_err(|e| e.to_string())
    ));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn child_watchdog() {
    runtime().block_on(async {
        say(format!(
            "interval {:?}",
            clusterd_worker::watchdog_interval()
        ));
        let heartbeat = clusterd_worker::spawn_watchdog()
            .expect("spawn watchdog")
            .expect("a watchdog is configured");
        // The parent kills this process once it has counted the beats.
        let stopped = tokio::time::timeout(DEADLINE, heartbeat).await;
        say(format!("heartbeat ended {stopped:?}"));
    });
}

fn child_shutdown() {
    runtime().block_on(async {
        let shutdown = clusterd_worker::Shutdown::new().expect("shutdown");
        for name in ["close kv client", "flush metrics"] {
            shutdown
                .on_close(name, move || async move { say(format!("hook {name}")) })
                .expect("register");
        }
        shutdown
            .on_close("stuck", std::future::pending::<()>)
            .expect("register");
        say("waiting");
        let reason = tokio::time::timeout(DEADLINE, shutdown.wait())
            .await
            .expect("a signal within the deadline");
        say(format!("reason {reason}"));
        for hook in shutdown.close(Duration::from_millis(200)).await {
            say(format!("report {} {:?}", hook.name, hook.outcome));
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The parent side.

/// What to put in `LISTEN_PID`.
enum ListenPid {
    /// The child's own pid (set by a `sh -c 'LISTEN_PID=$$ exec ...'` trampoline).
    Own,
    /// Another process's pid.
    Other(u32),
    /// Leave it unset.
    Unset,
}

/// A child process running one case, killed and reaped on drop.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    /// Spawns the child for `case` with `fds` at 3, 4, ... and the given extra environment.
    fn spawn(case: &str, fds: &[&dyn AsRawFd], pid: ListenPid, env: &[(&str, &str)]) -> Self {
        let exe = env::current_exe().expect("current_exe");
        let test_args = ["--exact", "child", "--ignored", "--nocapture"];
        let mut cmd = match pid {
            ListenPid::Own => {
                let mut cmd = Command::new("sh");
                cmd.arg("-c")
                    .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
                    .arg(&exe)
                    .args(test_args);
                cmd
            }
            ListenPid::Other(pid) => {
                let mut cmd = Command::new(&exe);
                cmd.args(test_args).env("LISTEN_PID", pid.to_string());
                cmd
            }
            ListenPid::Unset => {
                let mut cmd = Command::new(&exe);
                cmd.args(test_args);
                cmd
            }
        };
        for var in [
            "LISTEN_PID",
            "LISTEN_FDS",
            "LISTEN_FDNAMES",
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "CLUSTERD_APP",
            "CLUSTERD_WORKER_ID",
            "CLUSTERD_GENERATION",
        ] {
            if !(var == "LISTEN_PID" && matches!(pid, ListenPid::Other(_))) {
                cmd.env_remove(var);
            }
        }
        if !fds.is_empty() {
            cmd.env("LISTEN_FDS", fds.len().to_string());
        }
        cmd.env(CASE_VAR, case)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped());

        // Copies above any target number, so that the dup2s below cannot clobber each other.
        let high: Vec<OwnedFd> = fds
            .iter()
            .map(|fd| {
                // SAFETY: F_DUPFD_CLOEXEC creates a new fd; we take ownership of it at once.
                let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
                assert!(new >= 0, "dup: {}", std::io::Error::last_os_error());
                // SAFETY: `new` is a fresh fd that nothing else owns.
                unsafe { OwnedFd::from_raw_fd(new) }
            })
            .collect();
        let raw: Vec<RawFd> = high.iter().map(AsRawFd::as_raw_fd).collect();
        // SAFETY: only dup2, which is async-signal-safe, runs between fork and exec. dup2
        // clears close-on-exec on the target, so the child inherits fds 3, 4, ...
        unsafe {
            cmd.pre_exec(move || {
                for (target, &fd) in (3..).zip(&raw) {
                    if libc::dup2(fd, target) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn child");
        drop(high);
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(line) = line.strip_prefix("@@ ") {
                    if tx.send(line.to_owned()).is_err() {
                        break;
                    }
                }
            }
        });
        Running { child, lines }
    }

    /// The next result line.
    fn line(&self) -> String {
        self.lines
            .recv_timeout(DEADLINE)
            .expect("a result line from the child within the deadline")
    }

    /// Waits for the child to exit.
    fn wait(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(start.elapsed() < DEADLINE, "child did not exit in time");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the child to exit and returns all its result lines.
    fn finish(mut self) -> Vec<String> {
        let status = self.wait();
        assert!(status.success(), "child failed: {status}");
        self.lines.try_iter().collect()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn tcp_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
}

#[test]
fn takes_a_tcp_listener_once_and_serves_on_it() {
    let listener = tcp_listener();
    let addr = listener.local_addr().expect("addr");
    let child = Running::spawn("take_tcp", &[&listener], ListenPid::Own, &[]);
    assert_eq!(child.line(), format!("addr {addr}"));
    assert_eq!(child.line(), "cloexec true");
    assert_eq!(
        child.line(),
        "again err AlreadyTaken inherited socket 0 (fd 3) was already taken"
    );
    assert_eq!(child.line(), "fd 4 ok false");
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut reply = String::new();
    conn.read_to_string(&mut reply).expect("read");
    assert_eq!(reply, "served by the child");
    child.finish();
}

#[test]
fn a_mismatched_or_missing_listen_pid_means_no_fds() {
    let listener = tcp_listener();
    let inherited = listener.local_addr().expect("addr");
    for pid in [ListenPid::Other(1), ListenPid::Unset] {
        let child = Running::spawn("fallback", &[&listener], pid, &[]);
        assert_eq!(child.line(), "inherited ok false");
        let bound = child.line();
        let addr = bound.strip_prefix("or_bind ok ").expect(&bound);
        assert!(addr.starts_with("127.0.0.1:"), "{bound}");
        assert_ne!(addr, inherited.to_string(), "must bind its own socket");
        let bad = child.line();
        assert!(
            bad.starts_with("bad fallback err Bind binding fallback address 256.0.0.1:80"),
            "{bad}"
        );
        child.finish();
    }
}

#[test]
fn a_regular_file_is_not_a_socket() {
    let file = tempfile::tempfile().expect("tempfile");
    let child = Running::spawn("take_tcp_error", &[&file], ListenPid::Own, &[]);
    assert_eq!(
        child.line(),
        "take_tcp err NotASocket inherited socket 0 (fd 3) is not a socket"
    );
    child.finish();
}

#[test]
fn a_udp_socket_is_not_a_tcp_listener() {
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let child = Running::spawn("take_tcp_error", &[&udp], ListenPid::Own, &[]);
    assert_eq!(
        child.line(),
        "take_tcp err WrongKind inherited socket 0 (fd 3) is an AF_INET SOCK_DGRAM socket, \
         expected a TCP listener"
    );
    child.finish();
}

#[test]
fn a_connected_stream_is_not_listening() {
    let (a, _b) = UnixStream::pair().expect("socketpair");
    let child = Running::spawn("take_tcp_error", &[&a], ListenPid::Own, &[]);
    assert_eq!(
        child.line(),
        "take_tcp err WrongKind inherited socket 0 (fd 3) is an AF_UNIX SOCK_STREAM socket, \
         expected a TCP listener"
    );
    child.finish();

    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .expect("addr")
                .into(),
        )
        .expect("bind");
    let child = Running::spawn("take_tcp_error", &[&socket], ListenPid::Own, &[]);
    assert_eq!(
        child.line(),
        "take_tcp err NotListening inherited socket 0 (fd 3) is a stream socket that is not \
         listening"
    );
    child.finish();
}

#[test]
fn an_announced_fd_that_is_not_open_is_an_error() {
    // LISTEN_FDS=1 but nothing at fd 3.
    let child = Running::spawn(
        "take_tcp_error",
        &[],
        ListenPid::Own,
        &[("LISTEN_FDS", "1")],
    );
    let line = child.line();
    assert!(
        line.starts_with("take_tcp err NotOpen inherited socket 0 (fd 3) is not an open fd"),
        "{line}"
    );
    child.finish();
}

#[test]
fn a_malformed_listen_fds_is_an_error() {
    let child = Running::spawn(
        "take_tcp_error",
        &[],
        ListenPid::Own,
        &[("LISTEN_FDS", "three")],
    );
    assert_eq!(
        child.line(),
        "take_tcp err Env reading the inherited sockets: environment variable \
         LISTEN_FDS=\"three\" is invalid: not a non-negative integer"
    );
    child.finish();
}

#[test]
fn sockets_resolve_by_name_and_family() {
    let http = tcp_listener();
    let admin = tcp_listener();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("app.sock");
    let unix = UnixListener::bind(&path).expect("bind unix");
    let child = Running::spawn(
        "names",
        &[&http, &admin, &unix],
        ListenPid::Own,
        &[("LISTEN_FDNAMES", "http:admin:sock")],
    );
    let admin_addr = admin.local_addr().expect("addr");
    assert_eq!(child.line(), format!("admin ok Some({admin_addr})"));
    assert_eq!(
        child.line(),
        "admin again err AlreadyTaken inherited socket 1 (fd 4, name \"admin\") was already taken"
    );
    assert_eq!(child.line(), "missing ok None");
    assert_eq!(
        child.line(),
        "sock as tcp err WrongKind inherited socket 2 (fd 5, name \"sock\") is an AF_UNIX \
         SOCK_STREAM socket, expected a TCP listener"
    );
    // The failed take did not consume it.
    assert_eq!(
        child.line(),
        format!("sock as unix ok Some(Some({path:?}))")
    );
    let http_addr = http.local_addr().expect("addr");
    assert_eq!(child.line(), format!("any 0 ok \"tcp {http_addr}\""));
    assert_eq!(child.line(), "unix 3 ok false");
    child.finish();
}

fn notify_socket() -> (tempfile::TempDir, UnixDatagram, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    sock.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let path = path.to_str().expect("utf-8 temp path").to_owned();
    (dir, sock, path)
}

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a datagram within the deadline");
    String::from_utf8(buf[..n].to_vec()).expect("utf-8")
}

#[test]
fn ready_and_notify_reach_the_notify_socket() {
    let (_dir, sock, path) = notify_socket();
    let child = Running::spawn(
        "notify",
        &[],
        ListenPid::Unset,
        &[
            ("NOTIFY_SOCKET", &path),
            ("CLUSTERD_APP", "web"),
            ("CLUSTERD_WORKER_ID", "2"),
            ("CLUSTERD_GENERATION", "7"),
        ],
    );
    assert_eq!(
        child.line(),
        "info Ok(Some(WorkerInfo { app: \"web\", slot: 2, generation: 7 }))"
    );
    assert_eq!(child.line(), "ready Ok(true)");
    assert_eq!(recv(&sock), "READY=1");
    assert_eq!(child.line(), "status Ok(true)");
    assert_eq!(
        recv(&sock),
        "STATUS=warming up\nEXTEND_TIMEOUT_USEC=1000000"
    );
    child.finish();
}

#[test]
fn notify_is_a_no_op_outside_clusterd() {
    let child = Running::spawn("notify", &[], ListenPid::Unset, &[]);
    assert_eq!(child.line(), "info Ok(None)");
    assert_eq!(child.line(), "ready Ok(false)");
    assert_eq!(child.line(), "status Ok(false)");
    child.finish();
}

#[test]
fn notify_reaches_an_abstract_socket() {
    let name = format!("clusterd-worker-inherited-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .expect("abstract address");
    let sock = UnixDatagram::bind_addr(&addr).expect("bind abstract");
    sock.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let child = Running::spawn(
        "notify",
        &[],
        ListenPid::Unset,
        &[("NOTIFY_SOCKET", &format!("@{name}"))],
    );
    assert_eq!(child.line(), "info Ok(None)");
    assert_eq!(child.line(), "ready Ok(true)");
    assert_eq!(recv(&sock), "READY=1");
    child.finish();
}

#[test]
fn the_watchdog_beats_at_half_the_interval() {
    let (_dir, sock, path) = notify_socket();
    let mut child = Running::spawn(
        "watchdog",
        &[],
        ListenPid::Unset,
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "200000")],
    );
    assert_eq!(child.line(), "interval Ok(Some(200ms))");
    let start = Instant::now();
    for _ in 0..4 {
        assert_eq!(recv(&sock), "WATCHDOG=1");
    }
    // The first beat is immediate, then one every 100 ms: 4 beats take about 300 ms.
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    child.child.kill().expect("kill child");
    assert!(!child.wait().success());
}

#[test]
fn sigterm_resolves_shutdown_and_hooks_run_in_order() {
    let mut child = Running::spawn("shutdown", &[], ListenPid::Unset, &[]);
    assert_eq!(child.line(), "waiting");
    let pid = i32::try_from(child.child.id()).expect("pid");
    // SAFETY: signalling a child process this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(child.line(), "reason received SIGTERM");
    assert_eq!(child.line(), "hook close kv client");
    assert_eq!(child.line(), "hook flush metrics");
    assert_eq!(child.line(), "report close kv client Completed");
    assert_eq!(child.line(), "report flush metrics Completed");
    assert_eq!(child.line(), "report stuck TimedOut");
    let status = child.wait();
    assert!(status.success(), "{status}");
}
