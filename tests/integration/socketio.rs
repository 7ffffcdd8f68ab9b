//! examples/node-socketio (socket.io 4.8 with `@socket.io/cluster-adapter` 0.3.0, installed
//! from npm by the test) under 2 workers with `balance = "ip-hash"`: 16 polling sessions from
//! 16 client addresses keep their worker (every request answers 200, none "Session ID
//! unknown"), both workers hold sessions, and a chat message from one client reaches the
//! clients on every worker through clusterd's channel (`ipc_broadcast = true`). The engine.io
//! polling transport is plain HTTP, spoken here from source-bound sockets.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{Clusterd, output_within, require, wait_until};

const SECOND: Duration = Duration::from_secs(1);
/// The engine.io polling endpoint (protocol 4, socket.io 3 and later).
const POLLING: &str = "/socket.io/?EIO=4&transport=polling";
/// engine.io's separator between the packets of one polling payload.
const SEPARATOR: char = '\u{1e}';

/// The example's server.js and package.json in `dir`, with their npm dependencies installed;
/// `false` (after [`require`]) if npm cannot install them.
fn install(dir: &Path) -> bool {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/node-socketio");
    for file in ["server.js", "package.json"] {
        std::fs::copy(example.join(file), dir.join(file)).expect("copy the example");
    }
    let output = output_within(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(dir),
        120 * SECOND,
    );
    match output {
        Some(output) if output.status.success() => true,
        Some(output) => {
            require(&format!(
                "npm cannot install socket.io: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
            false
        }
        None => {
            require("npm install of socket.io did not finish within 120 s");
            false
        }
    }
}

/// One HTTP/1.1 request from `source` to `addr` on a connection of its own: (status, body).
fn request(
    source: IpAddr,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .expect("bind the client address");
    socket
        .connect_timeout(&addr.into(), 5 * SECOND)
        .expect("connect");
    let mut stream: std::net::TcpStream = socket.into();
    // A long poll answers within engine.io's ping interval (25 s) at the latest.
    stream
        .set_read_timeout(Some(30 * SECOND))
        .expect("read timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: text/plain;charset=UTF-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read the response");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {raw:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head:?}"));
    (status, body.to_owned())
}

/// A socket.io client on the polling transport, from one client address.
struct Session {
    source: IpAddr,
    sid: String,
}

impl Session {
    /// The engine.io handshake, then socket.io's CONNECT to the main namespace.
    fn open(source: IpAddr, addr: SocketAddr) -> Self {
        let (status, body) = request(source, addr, "GET", POLLING, "");
        assert_eq!(status, 200, "handshake from {source}: {body}");
        let open: serde_json::Value = serde_json::from_str(
            body.strip_prefix('0')
                .unwrap_or_else(|| panic!("not an open packet: {body}")),
        )
        .expect("open packet JSON");
        let session = Session {
            source,
            sid: open["sid"].as_str().expect("sid").to_owned(),
        };
        session.send(addr, "40");
        session
    }

    /// POSTs `payload` (engine.io packets).
    fn send(&self, addr: SocketAddr, payload: &str) {
        let (status, body) = request(self.source, addr, "POST", &self.path(), payload);
        assert_eq!(status, 200, "POST from {}: {body}", self.source);
        assert_eq!(body, "ok");
    }

    /// One poll: the packets the server had or got within a ping interval. Answers pings.
    fn poll(&self, addr: SocketAddr) -> Vec<String> {
        let (status, body) = request(self.source, addr, "GET", &self.path(), "");
        assert_eq!(status, 200, "poll from {}: {body}", self.source);
        let packets: Vec<String> = body.split(SEPARATOR).map(str::to_owned).collect();
        if packets.iter().any(|p| p == "2") {
            self.send(addr, "3");
        }
        packets
    }

    /// Polls until a packet satisfies `wanted`, within `timeout`.
    fn poll_until(
        &self,
        addr: SocketAddr,
        timeout: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            for packet in self.poll(addr) {
                if wanted(&packet) {
                    return packet;
                }
                seen.push(packet);
            }
        }
        panic!("{} did not receive it: {seen:?}", self.source);
    }

    fn path(&self) -> String {
        format!("{POLLING}&sid={}", self.sid)
    }
}

/// The worker pid in a `welcome` event packet (`42["welcome",{"worker":PID}]`).
fn welcome_worker(packet: &str) -> Option<String> {
    let event: serde_json::Value = serde_json::from_str(packet.strip_prefix("42")?).ok()?;
    (event[0] == "welcome").then(|| event[1]["worker"].to_string())
}

/// The pids of the 2 serving workers of `chat`, once both are ready.
fn ready_pids(clusterd: &Clusterd) -> BTreeSet<String> {
    let mut pids = BTreeSet::new();
    assert!(
        wait_until(30 * SECOND, || {
            let serving = clusterd.serving("chat");
            pids = serving.iter().map(|w| w.1.to_string()).collect();
            serving.len() == 2 && serving.iter().all(|w| w.3 == "ready")
        }),
        "not 2 ready workers:\n{}",
        clusterd.output()
    );
    pids
}

/// 16 sessions, each from its own address (127.0.0.2-17) and each request on a new
/// connection, so only the ip-hash keeps a session on the worker that holds it: every request
/// answers 200, the sessions are spread over both `pids`, and a chat message from the first
/// client reaches every client, on both workers.
fn chat_round(addr: SocketAddr, pids: &BTreeSet<String>) {
    let sessions: Vec<Session> = (2..=17u8)
        .map(|last| Session::open(IpAddr::from([127, 0, 0, last]), addr))
        .collect();
    let workers: Vec<String> = sessions
        .iter()
        .map(|s| {
            let welcome = s.poll_until(addr, 10 * SECOND, |p| welcome_worker(p).is_some());
            welcome_worker(&welcome).expect("worker")
        })
        .collect();
    let used: BTreeSet<String> = workers.iter().cloned().collect();
    assert_eq!(&used, pids, "not both workers hold sessions: {workers:?}");

    let to: Vec<&str> = pids.iter().map(String::as_str).collect();
    let text = format!(
        "hello from {} to workers {}",
        sessions[0].source,
        to.join(" ")
    );
    sessions[0].send(addr, &format!(r#"42["chat","{text}"]"#));
    for session in &sessions {
        session.poll_until(addr, 20 * SECOND, |p| {
            p.starts_with(r#"42["chat""#) && p.contains(&text)
        });
    }
}

#[test]
fn socketio_polling_sessions_stick_to_their_worker_and_chat_reaches_every_worker_across_a_reload() {
    let deps = tempfile::tempdir().expect("temp dir");
    if !install(deps.path()) {
        return;
    }
    let mut clusterd = Clusterd::start(&format!(
        r#"
[supervisor]
stop_timeout = "5s"

[sockets.http]
listen = "127.0.0.1:0"

[apps.chat]
command = ["node", "server.js"]
cwd = "{dir}"
workers = 2
sockets = ["http"]
drain = "1s"
balance = "ip-hash"
ipc_broadcast = true

[apps.chat.reload]
bake = "0s"
"#,
        dir = deps.path().display()
    ));
    let addr = clusterd.socket_addr("http");
    let before = ready_pids(&clusterd);
    chat_round(addr, &before);

    // A rolling reload: the old workers' sessions end with them; clients reconnect (a new
    // handshake, as socket.io's client does) and keep chatting, on both new workers.
    let output = clusterd.ctl(&["reload", "--wait"]);
    assert!(output.status.success(), "{}", clusterd.output());
    let after = ready_pids(&clusterd);
    assert!(before.is_disjoint(&after), "{before:?} then {after:?}");
    chat_round(addr, &after);

    assert_eq!(
        clusterd.count("Session ID unknown"),
        0,
        "{}",
        clusterd.output()
    );
    assert!(clusterd.stop().success(), "{}", clusterd.output());
}
