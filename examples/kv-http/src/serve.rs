//! The accept loop and the graceful drain: hyper's HTTP/1.1 server per connection, watched
//! by hyper-util's `GracefulShutdown`. When the stop future resolves the listener is dropped,
//! connections are told to finish (idle keep-alives close at once), and the drain waits for
//! them, bounded by a timeout. The KV client is closed after this returns, by a close hook,
//! so in-flight requests can still use it.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use clusterd_kv::KvClient;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

use crate::routes::handle;

/// A listener of either family, ready for tokio.
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
            Acceptor::Unix(l) => l.local_addr().map(|a| {
                a.as_pathname()
                    .map_or("unix:(unnamed)".into(), |p| format!("unix:{}", p.display()))
            }),
        };
        addr.unwrap_or_else(|err| format!("(unknown address: {err})"))
    }
}

/// Serves until `stop` resolves, then drains for at most `drain_timeout`; `true` if every
/// connection finished in time.
pub async fn serve<S: Future>(
    acceptor: Acceptor,
    kv: Arc<KvClient>,
    stop: S,
    drain_timeout: Duration,
) -> bool {
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            accepted = accept(&acceptor) => accepted,
        };
        match accepted {
            Ok(Connection::Tcp(stream)) => spawn_connection(&graceful, stream, &kv),
            Ok(Connection::Unix(stream)) => spawn_connection(&graceful, stream, &kv),
            Err(err) => {
                crate::log(format_args!("accept failed: {err}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    drop(acceptor);
    tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_ok()
}

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

fn spawn_connection<S>(graceful: &GracefulShutdown, stream: S, kv: &Arc<KvClient>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let kv = Arc::clone(kv);
    let service = service_fn(move |req| handle(req, Arc::clone(&kv)));
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
