//! The worker side of clusterd: what a Rust worker needs to run under the supervisor.
//!
//! clusterd binds the listening sockets itself and spawns N workers that inherit them. Each
//! worker gets:
//!
//! - its sockets at fds 3, 4, ... with `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES` (systemd's
//!   socket-activation convention): take them with [`take_tcp`], [`take_unix`], [`take`] or
//!   [`tcp_listener_or_bind`], which binds a fallback address when run outside clusterd;
//! - `NOTIFY_SOCKET` when the app uses `ready = "notify"`: call [`ready`] once serving,
//!   [`notify`] for other states (`STATUS=...`, `STOPPING=1`), and [`spawn_watchdog`] to send
//!   the `WATCHDOG=1` heartbeat when `WATCHDOG_USEC` asks for one;
//! - `CLUSTERD_APP`, `CLUSTERD_WORKER_ID` and `CLUSTERD_GENERATION`: see [`worker_info`];
//! - with `ipc = true`, a message channel (JSON lines) at `CLUSTERD_IPC_FD`: [`ipc::Channel`];
//! - SIGTERM (or the app's stop signal) when it must stop: [`Shutdown::wait`] resolves, the
//!   worker stops accepting and drains, then [`Shutdown::close`] runs the close hooks.
//!
//! Everything degrades to a no-op outside clusterd, so the same binary runs by hand.
//!
//! # Layout
//!
//! - `env`: the environment, parsed once by pure, unit-tested functions; [`WorkerInfo`].
//! - `listen`: taking and validating inherited listeners.
//! - `notify`: `sd_notify` datagrams and the watchdog heartbeat.
//! - `shutdown`: the stop-signal future and the close hooks.
//! - [`ipc`]: the message channel to the supervisor.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use clusterd_worker::Shutdown;
//!
//! #[tokio::main(flavor = "current_thread")]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // First, so that SIGTERM begins a clean shutdown instead of killing the process.
//!     let shutdown = Shutdown::new()?;
//!
//!     // fd 3 under clusterd, or a socket of our own when run by hand.
//!     let listener = clusterd_worker::tcp_listener_or_bind(0, "127.0.0.1:8000")?;
//!     listener.set_nonblocking(true)?;
//!     let listener = tokio::net::TcpListener::from_std(listener)?;
//!
//!     // Runs after the drain, e.g. to close a KV client.
//!     shutdown.on_close("say goodbye", || async { eprintln!("goodbye") })?;
//!
//!     clusterd_worker::ready()?;
//!     let _heartbeat = clusterd_worker::spawn_watchdog()?;
//!
//!     let stop = shutdown.wait();
//!     tokio::pin!(stop);
//!     loop {
//!         tokio::select! {
//!             reason = &mut stop => {
//!                 eprintln!("stopping: {reason}");
//!                 break;
//!             }
//!             accepted = listener.accept() => {
//!                 let (_stream, _peer) = accepted?;
//!                 // ... serve the connection, tracking it so the drain can wait for it ...
//!             }
//!         }
//!     }
//!     drop(listener); // stop accepting; then finish in-flight requests
//!     clusterd_worker::notify("STOPPING=1")?;
//!     for report in shutdown.close(Duration::from_secs(5)).await {
//!         eprintln!("{report}");
//!     }
//!     Ok(())
//! }
//! ```

#![warn(missing_docs)]

mod env;
#[cfg(feature = "http")]
pub mod http;
pub mod ipc;
mod listen;
mod notify;
mod shutdown;

pub use env::{EnvError, WorkerInfo, worker_info};
pub use listen::{
    ListenError, Listener, SocketId, Which, take, take_tcp, take_tcp_by_name, take_unix,
    take_unix_by_name, tcp_listener_or_bind,
};
pub use notify::{Notifier, NotifyError, notify, ready, spawn_watchdog, watchdog_interval};
pub use shutdown::{HookOutcome, HookReport, Reason, Shutdown, ShutdownError};
/// tokio's signal kinds, for [`Shutdown::with_signals`].
pub use tokio::signal::unix::SignalKind;
