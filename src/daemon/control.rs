//! The control socket's server side. A unix stream socket, mode 0600 in a 0700 run directory;
//! every connection's peer credentials are checked (same uid, or root). Each connection is
//! served by its own small task: it reads one request line (bounded in size and time), hands
//! the decoded request to the supervisor's loop, and writes back the reply lines the
//! supervisor sends. A slow, silent or malicious client only ever occupies its own task,
//! and a connection costs little: no buffer beyond its request line, freed when it ends. At
//! most [`MAX_CONNECTIONS`] are served at once; one more is answered `busy` and closed.
//!
//! `logs` is answered here, from the supervisor's memory of recent lines ([`crate::daemon::logs`]),
//! without a trip through the loop: the last lines, then for `--follow` every new line from a
//! queue of the follower's own, bounded ([`FOLLOWER_QUEUE`]); a follower that falls that far
//! behind is dropped and told so. The connection ends when the client closes it.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clusterd_proto::{ErrorKind, MAX_FRAME, Reply, Request, decode_request, encode_line};
use nix::sys::socket::{getsockopt, sockopt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::daemon::logs::{Filter, Logs, format};
use crate::daemon::memory;

/// How long a client may take to send its request, and to read each reply line.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Lines queued for one `logs --follow` client before it is dropped.
const FOLLOWER_QUEUE: usize = 4096;

/// Control connections served at once (`logs --follow` and `reload --wait` clients hold one
/// each); one more is answered with a `busy` error and closed.
pub const MAX_CONNECTIONS: usize = 512;

/// A decoded request and where its replies go.
pub struct ControlRequest {
    /// The request.
    pub request: Request,
    /// Reply lines: progress lines, then the final reply; dropping the sender ends the
    /// connection.
    pub reply: mpsc::UnboundedSender<Reply>,
}

/// The bound control socket.
pub struct ControlServer {
    requests: mpsc::Receiver<ControlRequest>,
    path: PathBuf,
    /// A duplicate of the listener, handed to the next clusterd by an upgrade.
    kept: std::os::fd::OwnedFd,
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A live supervisor answers on the socket already.
    #[error("another clusterd is already running for this manifest (control socket {0} answers)")]
    AlreadyRunning(PathBuf),
    /// Binding or setting the mode failed.
    #[error("cannot create control socket {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        #[source]
        cause: io::Error,
    },
}

impl ControlServer {
    /// Binds the socket at `path`. A stale socket file (nobody answers) is replaced; a live
    /// one means another supervisor runs this manifest. Must run inside a `LocalSet`.
    pub fn bind(path: &Path, logs: Logs) -> Result<Self, ControlError> {
        let bind_error = |cause| ControlError::Bind {
            path: path.to_path_buf(),
            cause,
        };
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::AlreadyRunning(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(bind_error)?;
        }
        let listener = UnixListener::bind(path).map_err(bind_error)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_error)?;
        Self::serve_listener(listener, path, logs).map_err(bind_error)
    }

    /// The listener handed over by the previous clusterd (bound at `path`). Must run inside
    /// a `LocalSet`.
    pub fn adopt(fd: std::os::fd::OwnedFd, path: &Path, logs: Logs) -> io::Result<Self> {
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.set_nonblocking(true)?;
        Self::serve_listener(UnixListener::from_std(listener)?, path, logs)
    }

    /// Serves `listener`; `logs` answers `clusterd logs`.
    fn serve_listener(listener: UnixListener, path: &Path, logs: Logs) -> io::Result<Self> {
        let kept = std::os::fd::AsFd::as_fd(&listener).try_clone_to_owned()?;
        let (sender, requests) = mpsc::channel(64);
        tokio::task::spawn_local(accept_loop(listener, sender, logs));
        Ok(ControlServer {
            requests,
            path: path.to_path_buf(),
            kept,
        })
    }

    /// The listener's descriptor and path, for an upgrade's hand-over.
    pub fn handover_parts(&self) -> (std::os::fd::RawFd, &Path) {
        (std::os::fd::AsRawFd::as_raw_fd(&self.kept), &self.path)
    }

    /// The next request from a client.
    pub async fn recv(&mut self) -> Option<ControlRequest> {
        self.requests.recv().await
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept_loop(listener: UnixListener, requests: mpsc::Sender<ControlRequest>, logs: Logs) {
    let our_uid = nix::unistd::getuid().as_raw();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let burst = memory::Burst::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("control socket: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::task::spawn_local(refuse(stream));
            continue;
        };
        let requests = requests.clone();
        let logs = logs.clone();
        let open = burst.open();
        tokio::task::spawn_local(async move {
            serve(stream, our_uid, requests, logs).await;
            drop((slot, open));
        });
    }
}

/// Answers a connection over [`MAX_CONNECTIONS`] with a `busy` error.
async fn refuse(mut stream: UnixStream) {
    let message =
        format!("clusterd serves {MAX_CONNECTIONS} control connections at once; try again");
    let _ = send(&mut stream, &Reply::error(ErrorKind::Busy, &message)).await;
}

async fn serve(
    mut stream: UnixStream,
    our_uid: u32,
    requests: mpsc::Sender<ControlRequest>,
    logs: Logs,
) {
    let peer_uid = getsockopt(&stream, sockopt::PeerCredentials).map(|c| c.uid());
    match peer_uid {
        Ok(uid) if uid == our_uid || uid == 0 => {}
        Ok(uid) => {
            tracing::warn!(
                event = "control_client_refused",
                uid,
                "control socket: refused a client with uid {uid}"
            );
            let _ = send(
                &mut stream,
                &Reply::error(ErrorKind::Forbidden, "permission denied"),
            )
            .await;
            return;
        }
        Err(e) => {
            tracing::warn!("control socket: cannot read peer credentials: {e}");
            return;
        }
    }

    let request = match tokio::time::timeout(CLIENT_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(request)) => request,
        Ok(Err((kind, message))) => {
            tracing::warn!("control socket: bad request: {message}");
            let _ = send(&mut stream, &Reply::error(kind, &message)).await;
            return;
        }
        Err(_) => {
            tracing::warn!(
                "control socket: a client sent no complete request within {CLIENT_TIMEOUT:?}"
            );
            let _ = send(
                &mut stream,
                &Reply::error(ErrorKind::Timeout, "no complete request received in time"),
            )
            .await;
            return;
        }
    };

    if let Request::Logs {
        app,
        slot,
        lines,
        follow,
    } = request
    {
        let filter = Filter { app, slot };
        return serve_logs(stream, &logs, filter, lines, follow).await;
    }

    let (reply, mut replies) = mpsc::unbounded_channel();
    if requests
        .send(ControlRequest { request, reply })
        .await
        .is_err()
    {
        return; // the supervisor is gone
    }
    while let Some(line) = replies.recv().await {
        if send(&mut stream, &line).await.is_err() {
            return; // the client went away or stopped reading
        }
        // The final reply ends the connection; dropping `replies` tells the supervisor it
        // was written (an upgrade waits for that before its exec).
        if !matches!(line, Reply::Progress { .. }) {
            return;
        }
    }
}

/// `logs`: the last lines, then (`follow`) the new ones until the client goes away.
async fn serve_logs(stream: UnixStream, logs: &Logs, filter: Filter, lines: usize, follow: bool) {
    let (mut reader, mut writer) = stream.into_split();
    let hub = logs.hub();
    if let Some(app) = &filter.app
        && !hub.knows(app)
    {
        let message = format!("unknown app {app:?}");
        let _ = send(&mut writer, &Reply::error(ErrorKind::BadRequest, &message)).await;
        return;
    }
    if !follow {
        let tail = hub.tail(&filter, lines);
        for record in &tail {
            if send(&mut writer, &Reply::Log(Box::new(format::log_line(record))))
                .await
                .is_err()
            {
                return;
            }
        }
        let done = Reply::Done {
            message: format!("{} lines", tail.len()),
        };
        let _ = send(&mut writer, &done).await;
        return;
    }
    let (tail, mut queue) = hub.follow(filter, lines, FOLLOWER_QUEUE);
    for record in &tail {
        if send(&mut writer, &Reply::Log(Box::new(format::log_line(record))))
            .await
            .is_err()
        {
            return;
        }
    }
    let mut byte = [0u8; 1];
    loop {
        tokio::select! {
            record = queue.recv() => {
                let Some(record) = record else {
                    let message = format!(
                        "dropped: this follower fell {FOLLOWER_QUEUE} lines behind"
                    );
                    let _ = send(&mut writer, &Reply::error(ErrorKind::TooSlow, &message)).await;
                    return;
                };
                if send(&mut writer, &Reply::Log(Box::new(format::log_line(&record)))).await.is_err() {
                    return; // stopped reading
                }
            }
            // The client sends nothing more: end of file (or an error) means it has gone.
            _ = reader.read(&mut byte) => return,
        }
    }
}

/// Reads one newline-terminated request of at most [`MAX_FRAME`] bytes, into a buffer that
/// grows only as far as the request does (anything the client sent after its newline is
/// ignored: it sends nothing more).
async fn read_request(stream: &mut UnixStream) -> Result<Request, (ErrorKind, String)> {
    let mut line = Vec::with_capacity(128);
    let limit = MAX_FRAME as u64 + 1;
    let mut reader = stream.take(limit);
    loop {
        let read = line.len();
        if line.len() == line.capacity() {
            line.reserve(line.len());
        }
        let n = reader
            .read_buf(&mut line)
            .await
            .map_err(|e| (ErrorKind::Malformed, format!("read failed: {e}")))?;
        if let Some(end) = line[read..].iter().position(|b| *b == b'\n') {
            line.truncate(read + end + 1);
            break;
        }
        if n == 0 {
            break;
        }
    }
    if line.last() != Some(&b'\n') {
        return Err(if line.len() as u64 >= limit {
            (
                ErrorKind::TooLarge,
                format!("request longer than {MAX_FRAME} bytes"),
            )
        } else {
            (
                ErrorKind::Malformed,
                "truncated request (no newline before end of stream)".into(),
            )
        });
    }
    line.pop();
    decode_request(&line).map_err(|e| (e.kind, e.message))
}

async fn send(stream: &mut (impl AsyncWriteExt + Unpin), reply: &Reply) -> io::Result<()> {
    tokio::time::timeout(CLIENT_TIMEOUT, stream.write_all(&encode_line(reply)))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client not reading"))?
}
