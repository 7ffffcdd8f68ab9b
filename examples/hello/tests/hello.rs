//! The built `hello` binary as clusterd runs it: real processes, real sockets, real signals.
//!
//! Each test starts `hello` (standalone on 127.0.0.1:0, or with sockets dup'ed to fds 3, 4, ...
//! and `LISTEN_PID` set to its own pid through a `sh -c 'LISTEN_PID=$$ exec ...'` trampoline),
//! talks HTTP/1.1 to it over a raw stream, reads its notify datagrams, signals it and checks
//! how it exits. Every wait has a deadline and every process is killed on drop.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Every wait in these tests gives up after this long.
const DEADLINE: Duration = Duration::from_secs(20);

/// A running `hello`, killed and reaped on drop.
struct Hello {
    child: Child,
    stderr: mpsc::Receiver<String>,
}

impl Hello {
    /// Starts `hello` with `fds` at 3, 4, ... (and `LISTEN_FDS`/`LISTEN_PID` when there are
    /// any) and the given environment.
    fn spawn(fds: &[&dyn AsRawFd], env: &[(&str, &str)]) -> Self {
        let exe = env!("CARGO_BIN_EXE_hello");
        let mut cmd = if fds.is_empty() {
            Command::new(exe)
        } else {
            let mut cmd = Command::new("sh");
            cmd.arg("-c")
                .arg(r#"LISTEN_PID=$$ exec "$0""#)
                .arg(exe)
                .env("LISTEN_FDS", fds.len().to_string());
            cmd
        };
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            if key.starts_with("LISTEN_")
                || key.starts_with("CLUSTERD_")
                || key.starts_with("HELLO_")
                || key.starts_with("WATCHDOG_")
                || key == "NOTIFY_SOCKET"
            {
                cmd.env_remove(key);
            }
        }
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());

        // Copies above any target number, so that the dup2s below cannot clobber each other.
        let high: Vec<OwnedFd> = fds
            .iter()
            .map(|fd| {
                // SAFETY: F_DUPFD_CLOEXEC creates a new fd; we take ownership of it at once.
                let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
                assert!(new >= 0, "dup: {}", io::Error::last_os_error());
                // SAFETY: `new` is a fresh fd that nothing else owns.
                unsafe { OwnedFd::from_raw_fd(new) }
            })
            .collect();
        let raw: Vec<RawFd> = high.iter().map(AsRawFd::as_raw_fd).collect();
        // SAFETY: only dup2, which is async-signal-safe, runs between fork and exec; it clears
        // close-on-exec on the target, so the child inherits fds 3, 4, ...
        unsafe {
            cmd.pre_exec(move || {
                for (target, &fd) in (3..).zip(&raw) {
                    if libc::dup2(fd, target) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn hello");
        drop(high);
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[hello] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Hello { child, stderr: rx }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in pid_t")
    }

    fn signal(&self, signal: i32) {
        // SAFETY: signalling the child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0, "kill");
    }

    /// The next stderr line containing `needle`.
    fn log_line(&self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(err) => panic!("no log line with {needle:?} within the deadline: {err}"),
            }
        }
    }

    /// The address from the "listening on ..." line.
    fn listening_on(&self) -> String {
        let line = self.log_line("listening on ");
        let rest = &line[line.find("listening on ").expect("found") + "listening on ".len()..];
        rest.split(' ').next().expect("address").to_owned()
    }

    fn wait(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(start.elapsed() < DEADLINE, "hello did not exit in time");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Hello {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An HTTP/1.1 response, header names lower-cased.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A keep-alive HTTP/1.1 connection.
struct Client<S: Read + Write> {
    conn: BufReader<S>,
}

impl Client<TcpStream> {
    fn tcp(addr: &str) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
        Client {
            conn: BufReader::new(stream),
        }
    }
}

impl Client<UnixStream> {
    fn unix(path: &std::path::Path) -> Self {
        let stream = UnixStream::connect(path).expect("connect");
        stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
        Client {
            conn: BufReader::new(stream),
        }
    }
}

impl<S: Read + Write> Client<S> {
    fn send(&mut self, path: &str) {
        let request = format!("GET {path} HTTP/1.1\r\nHost: hello\r\n\r\n");
        self.conn
            .get_mut()
            .write_all(request.as_bytes())
            .expect("write request");
    }

    fn read_response(&mut self) -> Response {
        let mut line = String::new();
        self.conn.read_line(&mut line).expect("status line");
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.conn.read_line(&mut line).expect("header line");
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').expect("header");
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.parse().expect("content-length"))
            .expect("content-length header");
        let mut body = vec![0; length];
        self.conn.read_exact(&mut body).expect("body");
        Response {
            status,
            headers,
            body: String::from_utf8(body).expect("utf-8 body"),
        }
    }

    fn get(&mut self, path: &str) -> Response {
        self.send(path);
        self.read_response()
    }

    /// True once the server has closed the connection (EOF).
    fn is_closed_by_server(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.conn.read(&mut byte), Ok(0))
    }
}

fn notify_socket(dir: &tempfile::TempDir) -> (UnixDatagram, String) {
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    sock.set_read_timeout(Some(DEADLINE)).expect("timeout");
    (sock, path.to_str().expect("utf-8 path").to_owned())
}

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a datagram within the deadline");
    String::from_utf8(buf[..n].to_vec()).expect("utf-8 datagram")
}

/// The next datagram that is not a watchdog heartbeat.
fn recv_state(sock: &UnixDatagram) -> String {
    loop {
        let state = recv(sock);
        if state != "WATCHDOG=1" {
            return state;
        }
    }
}

fn nothing_queued(sock: &UnixDatagram) -> bool {
    let mut buf = [0u8; 4096];
    sock.set_nonblocking(true).expect("nonblocking");
    let result = sock.recv(&mut buf);
    sock.set_nonblocking(false).expect("blocking");
    matches!(result, Err(err) if err.kind() == io::ErrorKind::WouldBlock)
}

#[test]
fn drains_in_flight_requests_and_closes_idle_ones_on_sigterm() {
    let mut hello = Hello::spawn(&[], &[("HELLO_ADDR", "127.0.0.1:0")]);
    let addr = hello.listening_on();
    let pid = hello.pid();

    let mut idle = Client::tcp(&addr);
    let hi = idle.get("/");
    assert_eq!(hi.status, 200);
    assert_eq!(
        hi.body,
        format!("hello from hello[0] pid {pid} generation 0\n")
    );

    let mut busy = Client::tcp(&addr);
    busy.send("/sleep/500");
    // A barrier: hello's single-threaded runtime accepts connections in order and polls each
    // new connection once before the next, so once this later connection has been answered
    // the sleep request above is being served.
    let whoami = Client::tcp(&addr).get("/whoami");
    assert_eq!(whoami.status, 200);

    let signalled = Instant::now();
    hello.signal(libc::SIGTERM);
    assert!(
        idle.is_closed_by_server(),
        "idle keep-alive connection closed"
    );
    // The listener is gone: nobody accepts any more.
    let refused = TcpStream::connect(&addr).expect_err("connect after stop");
    assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);

    let slept = busy.read_response();
    assert_eq!(slept.status, 200);
    assert_eq!(slept.body, "slept 500 ms\n");
    assert_eq!(slept.header("connection"), Some("close"));
    assert!(busy.is_closed_by_server());

    let status = hello.wait();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(signalled.elapsed() < DEADLINE);
    let last = hello.log_line("exiting:");
    assert!(
        last.contains("served 3 requests, drained 2 connections"),
        "{last}"
    );
}

#[test]
fn serves_a_named_inherited_unix_socket_and_notifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let other = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    let path = dir.path().join("web.sock");
    let web = UnixListener::bind(&path).expect("bind unix");
    let (notify, notify_path) = notify_socket(&dir);
    let mut hello = Hello::spawn(
        &[&other, &web],
        &[
            ("LISTEN_FDNAMES", "other:web"),
            ("HELLO_SOCKET", "web"),
            ("CLUSTERD_APP", "web"),
            ("CLUSTERD_WORKER_ID", "2"),
            ("CLUSTERD_GENERATION", "1"),
            ("NOTIFY_SOCKET", &notify_path),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let pid = hello.pid();
    assert_eq!(hello.listening_on(), format!("unix:{}", path.display()));
    assert_eq!(recv(&notify), "READY=1\nSTATUS=serving");
    assert_eq!(recv(&notify), "WATCHDOG=1");
    assert_eq!(recv(&notify), "WATCHDOG=1");

    let mut client = Client::unix(&path);
    let hi = client.get("/");
    assert_eq!(hi.status, 200);
    assert_eq!(hi.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(
        hi.body,
        format!("hello from web[2] pid {pid} generation 1\n")
    );
    let whoami = client.get("/whoami");
    assert_eq!(whoami.header("content-type"), Some("application/json"));
    assert_eq!(
        whoami.body,
        format!(r#"{{"app":"web","slot":2,"pid":{pid},"generation":1}}"#)
    );
    assert_eq!(client.get("/nope").status, 404);

    hello.signal(libc::SIGTERM);
    assert_eq!(recv_state(&notify), "STOPPING=1");
    assert_eq!(hello.wait().code(), Some(0));
}

#[test]
fn ready_can_be_delayed_and_the_watchdog_silenced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let http = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = http.local_addr().expect("addr").to_string();
    let (notify, notify_path) = notify_socket(&dir);
    let started = Instant::now();
    let mut hello = Hello::spawn(
        &[&http],
        &[
            ("NOTIFY_SOCKET", &notify_path),
            ("WATCHDOG_USEC", "100000"),
            ("HELLO_NO_WATCHDOG", "1"),
            ("HELLO_READY_DELAY_MS", "300"),
        ],
    );
    assert_eq!(hello.listening_on(), addr);
    // Without HELLO_NO_WATCHDOG a heartbeat would come first, long before the delayed READY.
    assert_eq!(recv(&notify), "READY=1\nSTATUS=serving");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(Client::tcp(&addr).get("/").status, 200);
    assert!(nothing_queued(&notify), "no heartbeat");
    hello.signal(libc::SIGTERM);
    assert_eq!(recv(&notify), "STOPPING=1");
    assert_eq!(hello.wait().code(), Some(0));
}

#[test]
fn no_ready_never_sends_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (notify, notify_path) = notify_socket(&dir);
    let mut hello = Hello::spawn(
        &[],
        &[
            ("HELLO_ADDR", "127.0.0.1:0"),
            ("NOTIFY_SOCKET", &notify_path),
            ("HELLO_NO_READY", "1"),
        ],
    );
    let addr = hello.listening_on();
    // READY=1 would have been sent before the first request could be served.
    assert_eq!(Client::tcp(&addr).get("/").status, 200);
    assert!(nothing_queued(&notify), "no READY=1");
    hello.signal(libc::SIGINT);
    assert_eq!(recv(&notify), "STOPPING=1");
    assert_eq!(hello.wait().code(), Some(0));
}

#[test]
fn ignore_sigterm_keeps_serving_until_sigint() {
    let mut hello = Hello::spawn(
        &[],
        &[("HELLO_ADDR", "127.0.0.1:0"), ("HELLO_IGNORE_SIGTERM", "1")],
    );
    let addr = hello.listening_on();
    hello.signal(libc::SIGTERM);
    // An ignored signal is discarded when sent, so this request comes after it.
    assert_eq!(Client::tcp(&addr).get("/").status, 200);
    assert!(hello.is_running());
    hello.signal(libc::SIGINT);
    assert_eq!(hello.wait().code(), Some(0));
}

#[test]
fn exit_after_exits_with_status_3() {
    let started = Instant::now();
    let mut hello = Hello::spawn(
        &[],
        &[
            ("HELLO_ADDR", "127.0.0.1:0"),
            ("HELLO_EXIT_AFTER_MS", "200"),
        ],
    );
    let status = hello.wait();
    assert_eq!(status.code(), Some(3), "{status}");
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[test]
fn help_bad_arguments_and_bad_settings() {
    let help = Command::new(env!("CARGO_BIN_EXE_hello"))
        .arg("--help")
        .output()
        .expect("run hello --help");
    assert!(help.status.success());
    let text = String::from_utf8(help.stdout).expect("utf-8");
    for var in [
        "HELLO_SOCKET",
        "HELLO_ADDR",
        "HELLO_READY_DELAY_MS",
        "HELLO_NO_READY",
        "HELLO_IGNORE_SIGTERM",
        "HELLO_EXIT_AFTER_MS",
        "HELLO_NO_WATCHDOG",
    ] {
        assert!(text.contains(var), "--help mentions {var}");
    }

    let bad_arg = Command::new(env!("CARGO_BIN_EXE_hello"))
        .arg("--port")
        .output()
        .expect("run hello --port");
    assert_eq!(bad_arg.status.code(), Some(2));

    let bad_setting = Command::new(env!("CARGO_BIN_EXE_hello"))
        .env("HELLO_EXIT_AFTER_MS", "soon")
        .output()
        .expect("run hello");
    assert_eq!(bad_setting.status.code(), Some(2));
    let stderr = String::from_utf8(bad_setting.stderr).expect("utf-8");
    assert!(
        stderr.contains("HELLO_EXIT_AFTER_MS=\"soon\": expected a number of milliseconds"),
        "{stderr}"
    );

    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let busy_port = Command::new(env!("CARGO_BIN_EXE_hello"))
        .env("HELLO_ADDR", &addr)
        .output()
        .expect("run hello");
    assert_eq!(busy_port.status.code(), Some(1));
    let stderr = String::from_utf8(busy_port.stderr).expect("utf-8");
    assert!(
        stderr.contains(&format!("binding fallback address {addr}")),
        "{stderr}"
    );
}
