//! The signals clusterd answers, as events for the supervisor's loop.
//!
//! | signal          | meaning                                                  |
//! |-----------------|----------------------------------------------------------|
//! | SIGTERM, SIGINT | graceful shutdown; a second one kills at once            |
//! | SIGUSR2         | rolling reload of every app                              |
//! | SIGUSR1         | reopen the log files (handled by `crate::logs`)          |
//! | SIGHUP          | re-read the manifest and apply the difference            |
//! | SIGTTIN/SIGTTOU | one worker more / fewer (manifests with a single app)    |

use std::io;

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};

/// A signal, as what it asks the supervisor to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SupervisorSignal {
    /// SIGTERM or SIGINT.
    Stop(Signal),
    /// SIGUSR2.
    Reload,
    /// SIGHUP.
    Reread,
    /// SIGTTIN (+1) or SIGTTOU (-1).
    ScaleBy(i64),
}

/// The installed signal listeners.
pub struct Signals {
    listeners: Vec<(SupervisorSignal, tokio::signal::unix::Signal)>,
}

impl Signals {
    /// Installs the handlers.
    pub fn new() -> io::Result<Self> {
        let table = [
            (
                SignalKind::terminate(),
                SupervisorSignal::Stop(Signal::SIGTERM),
            ),
            (
                SignalKind::interrupt(),
                SupervisorSignal::Stop(Signal::SIGINT),
            ),
            (SignalKind::user_defined2(), SupervisorSignal::Reload),
            (SignalKind::hangup(), SupervisorSignal::Reread),
            (
                SignalKind::from_raw(libc::SIGTTIN),
                SupervisorSignal::ScaleBy(1),
            ),
            (
                SignalKind::from_raw(libc::SIGTTOU),
                SupervisorSignal::ScaleBy(-1),
            ),
        ];
        let listeners = table
            .into_iter()
            .map(|(kind, meaning)| Ok((meaning, signal(kind)?)))
            .collect::<io::Result<_>>()?;
        Ok(Signals { listeners })
    }

    /// The next signal received.
    pub async fn recv(&mut self) -> Option<SupervisorSignal> {
        std::future::poll_fn(|cx| {
            for (meaning, listener) in &mut self.listeners {
                if let std::task::Poll::Ready(Some(())) = listener.poll_recv(cx) {
                    return std::task::Poll::Ready(Some(*meaning));
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}
