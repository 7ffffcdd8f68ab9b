//! HTTP/1.1 serving with a drain that clients never see as an error (feature `http`).
//!
//! [`serve_http`] runs hyper's HTTP/1.1 server on an inherited [`Listener`] until a stop future
//! resolves, then drains in two phases:
//!
//! 1. **Linger** (at most [`Drain::linger`]): the listener is closed — the accept queue stays
//!    with clusterd and the other workers — and every response from now on carries
//!    `Connection: close`, so a keep-alive client gets its answer and then reconnects (to
//!    another worker) instead of finding its connection closed under its next request. The
//!    linger ends early once no connection is left.
//! 2. **Close**: connections still open (idle ones that sent nothing during the linger) are
//!    shut down gracefully and in-flight requests finish, bounded by [`Drain::timeout`].
//!
//! Closing idle keep-alive connections at once (phase 2 alone, what hyper-util's
//! `GracefulShutdown` does) races with clients sending their next request at that moment; under
//! load during a rolling reload that showed up as read errors, one per drained connection.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::Listener;

/// How a drain proceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    /// How long busy keep-alive connections get to receive a `Connection: close` response
    /// before the remaining (idle) ones are closed. Default 1 s.
    pub linger: Duration,
    /// How long in-flight requests may take to finish after that. Default 30 s.
    pub timeout: Duration,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            linger: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
        }
    }
}

/// How a [`serve_http`] run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Requests served over the whole run.
    pub requests: u64,
    /// Connections open when the drain began.
    pub connections: usize,
    /// Whether they all finished within the drain timeout.
    pub in_time: bool,
}

/// Serves HTTP/1.1 on `listener` with `handler` until `stop` resolves, then drains (see the
/// module docs). Accept errors (e.g. out of file descriptors) pause the loop for 100 ms and
/// it goes on. Must run inside a tokio runtime with IO and time enabled.
pub async fn serve_http<H, F, B>(
    listener: Listener,
    handler: H,
    stop: impl Future,
    drain: Drain,
) -> io::Result<Drained>
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = Acceptor::new(listener)?;
    let shared = Arc::new(Shared {
        handler,
        requests: AtomicU64::new(0),
        draining: AtomicBool::new(false),
    });
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            accepted = acceptor.accept() => accepted,
        };
        match accepted {
            Ok(Stream::Tcp(stream)) => spawn_connection(&graceful, stream, &shared),
            Ok(Stream::Unix(stream)) => spawn_connection(&graceful, stream, &shared),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    drop(acceptor);
    let connections = graceful.count();
    shared.draining.store(true, Ordering::Relaxed);
    let linger_until = tokio::time::Instant::now() + drain.linger;
    while graceful.count() > 0 && tokio::time::Instant::now() < linger_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let in_time = tokio::time::timeout(drain.timeout, graceful.shutdown())
        .await
        .is_ok();
    Ok(Drained {
        requests: shared.requests.load(Ordering::Relaxed),
        connections,
        in_time,
    })
}

/// What every connection of one [`serve_http`] run shares.
struct Shared<H> {
    handler: H,
    requests: AtomicU64,
    draining: AtomicBool,
}

fn spawn_connection<H, F, B, S>(graceful: &GracefulShutdown, stream: S, shared: &Arc<Shared<H>>)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = Arc::clone(shared);
    let service = service_fn(move |request| {
        shared.requests.fetch_add(1, Ordering::Relaxed);
        let response = (shared.handler)(request);
        let shared = Arc::clone(&shared);
        async move {
            let mut response = response.await?;
            // Checked when the response is ready, so a request that was in flight when the
            // drain began also tells its client to reconnect.
            if shared.draining.load(Ordering::Relaxed) {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    let connection =
        graceful.watch(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
    // A connection error is the client's business (reset, malformed request): nothing to do.
    tokio::spawn(async move {
        let _ = connection.await;
    });
}

/// A listener of either family, switched to non-blocking mode as tokio requires.
enum Acceptor {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Acceptor {
    fn new(listener: Listener) -> io::Result<Self> {
        Ok(match listener {
            Listener::Tcp(l) => {
                l.set_nonblocking(true)?;
                Acceptor::Tcp(tokio::net::TcpListener::from_std(l)?)
            }
            Listener::Unix(l) => {
                l.set_nonblocking(true)?;
                Acceptor::Unix(tokio::net::UnixListener::from_std(l)?)
            }
        })
    }

    async fn accept(&self) -> io::Result<Stream> {
        match self {
            Acceptor::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
            Acceptor::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
        }
    }
}
