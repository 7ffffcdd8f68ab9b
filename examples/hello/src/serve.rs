//! The accept loop and the graceful drain.
//!
//! Each connection is served by hyper's HTTP/1.1 server and watched by hyper-util's
//! `GracefulShutdown`. When the stop future resolves, the drain runs in two phases:
//!
//! 1. **Linger** (at most [`LINGER`]): the listener is dropped (no more accepts — the shared
//!    accept queue stays with clusterd and the other workers), and every response from now on
//!    carries `Connection: close`, so a keep-alive client gets its answer and then reconnects —
//!    to another worker — instead of finding its connection closed under its next request.
//! 2. **Close**: connections still open (idle ones that sent nothing during the linger) are told
//!    to shut down gracefully, and the drain waits for in-flight requests, bounded by a timeout.
//!
//! Closing idle keep-alive connections at once (phase 2 alone) races with clients sending their
//! next request at that moment, which they see as a reset connection: the bench measured it.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

use crate::routes::{Identity, handle};

/// A listener of either family, ready for tokio.
#[derive(Debug)]
pub enum Acceptor {
    /// TCP.
    Tcp(TcpListener),
    /// A unix stream socket.
    Unix(UnixListener),
}

impl Acceptor {
    /// Wraps a std listener, switching it to non-blocking mode as tokio requires.
    pub fn new(listener: clusterd_worker::Listener) -> io::Result<Self> {
        Ok(match listener {
            clusterd_worker::Listener::Tcp(l) => {
                l.set_nonblocking(true)?;
                Acceptor::Tcp(TcpListener::from_std(l)?)
            }
            clusterd_worker::Listener::Unix(l) => {
                l.set_nonblocking(true)?;
                Acceptor::Unix(UnixListener::from_std(l)?)
            }
        })
    }

    /// The address, for the log.
    pub fn describe(&self) -> String {
        let addr = match self {
            Acceptor::Tcp(l) => l.local_addr().map(|a| a.to_string()),
            Acceptor::Unix(l) => l.local_addr().map(|a| match a.as_pathname() {
                Some(path) => format!("unix:{}", path.display()),
                None => "unix:(unnamed)".to_owned(),
            }),
        };
        addr.unwrap_or_else(|err| format!("(unknown address: {err})"))
    }
}

/// How the drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Requests served over the whole run.
    pub requests: u64,
    /// Connections still open when the drain began.
    pub connections: usize,
    /// Whether they all finished within the drain timeout.
    pub in_time: bool,
}

/// How long busy keep-alive connections get to receive a `Connection: close` response before
/// the remaining (idle) connections are closed.
pub const LINGER: Duration = Duration::from_secs(1);

/// Serves until `stop` resolves, then drains for at most `drain_timeout`.
///
/// An accept error (e.g. out of fds) is logged and the loop goes on after a short pause.
pub async fn serve<S: Future>(
    acceptor: Acceptor,
    me: Arc<Identity>,
    stop: S,
    drain_timeout: Duration,
) -> Drained {
    let graceful = GracefulShutdown::new();
    let requests = Arc::new(AtomicU64::new(0));
    let draining = Arc::new(AtomicBool::new(false));
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            accepted = accept(&acceptor) => accepted,
        };
        match accepted {
            Ok(Connection::Tcp(stream)) => {
                spawn_connection(&graceful, stream, &me, &requests, &draining)
            }
            Ok(Connection::Unix(stream)) => {
                spawn_connection(&graceful, stream, &me, &requests, &draining)
            }
            Err(err) => {
                crate::log(format_args!("accept failed: {err}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    drop(acceptor);
    let connections = graceful.count();
    draining.store(true, Ordering::Relaxed);
    let linger_until = tokio::time::Instant::now() + LINGER;
    while graceful.count() > 0 && tokio::time::Instant::now() < linger_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let in_time = tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_ok();
    Drained {
        requests: requests.load(Ordering::Relaxed),
        connections,
        in_time,
    }
}

/// An accepted stream of either family.
enum Connection {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(acceptor: &Acceptor) -> io::Result<Connection> {
    match acceptor {
        Acceptor::Tcp(l) => l.accept().await.map(|(s, _)| Connection::Tcp(s)),
        Acceptor::Unix(l) => l.accept().await.map(|(s, _)| Connection::Unix(s)),
    }
}

fn spawn_connection<S>(
    graceful: &GracefulShutdown,
    stream: S,
    me: &Arc<Identity>,
    requests: &Arc<AtomicU64>,
    draining: &Arc<AtomicBool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (me, requests, draining) = (Arc::clone(me), Arc::clone(requests), Arc::clone(draining));
    let service = service_fn(move |req| {
        requests.fetch_add(1, Ordering::Relaxed);
        let response = handle(req, Arc::clone(&me));
        let draining = Arc::clone(&draining);
        async move {
            let mut response = response.await?;
            // Checked when the response is ready, so a request that was in flight when the
            // drain began also tells its client to reconnect.
            if draining.load(Ordering::Relaxed) {
                response.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        if let Err(err) = conn.await {
            if !err.is_incomplete_message() {
                crate::log(format_args!("connection error: {err}"));
            }
        }
    });
}
