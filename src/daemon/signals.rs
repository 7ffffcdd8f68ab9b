//! The signals clusterd answers, as events for the supervisor's loop.
//!
//! | signal          | meaning                                                  |
//! |-----------------|----------------------------------------------------------|
//! | SIGTERM, SIGINT | graceful shutdown; a second one kills at once            |
//! | SIGUSR2         | rolling reload of every app                              |
//! | SIGUSR1         | reopen the log files (handled by `crate::daemon::logs`)          |
//! | SIGHUP          | re-read the manifest and apply the difference            |
//! | SIGTTIN/SIGTTOU | one worker more / fewer (manifests with a single app)    |
//! | SIGURG          | upgrade in place: exec clusterd's own binary again       |
//!
//! Why SIGURG for the upgrade: SIGUSR2 and SIGHUP are taken, SIGUSR1 is kept for reopening
//! log files. SIGWINCH (nginx's choice) is sent by the terminal to the foreground process
//! group on every resize, and clusterd often runs in the foreground. SIGURG's default action
//! is to ignore it, so an older clusterd (or a wrong pid) is not hurt; the kernel sends it
//! only to owners of sockets with out-of-band data (`F_SETOWN`), which clusterd never sets.
//!
//! The loop reads its signals from a [`SignalSource`]: boot hands it the process's own
//! ([`Signals`]); a test driving a supervisor in-process hands it a channel instead.

use std::future::Future;
use std::io;

use clusterd_core::SupervisorSignal;
use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};

/// Every signal clusterd handles (and SIGCHLD, the reaper's).
const HANDLED: [Signal; 9] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGUSR2,
    Signal::SIGHUP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGURG,
    Signal::SIGUSR1,
    Signal::SIGCHLD,
];

/// Blocks (`true`) or unblocks the signals clusterd handles, in the calling thread. Blocked
/// across the exec of an upgrade (the mask and pending signals survive `execve`), so that
/// none is lost or takes its default action before the new side has its handlers.
pub fn block_handled(block: bool) -> io::Result<()> {
    let set: nix::sys::signal::SigSet = HANDLED.into_iter().collect();
    let how = if block {
        nix::sys::signal::SigmaskHow::SIG_BLOCK
    } else {
        nix::sys::signal::SigmaskHow::SIG_UNBLOCK
    };
    nix::sys::signal::pthread_sigmask(how, Some(&set), None)?;
    Ok(())
}

/// Where the supervisor's loop gets its [`SupervisorSignal`]s from.
pub trait SignalSource {
    /// The next signal; `None` once no more can come (the loop then stops asking).
    fn recv(&mut self) -> impl Future<Output = Option<SupervisorSignal>>;
}

impl SignalSource for Signals {
    fn recv(&mut self) -> impl Future<Output = Option<SupervisorSignal>> {
        Signals::recv(self)
    }
}

/// Signals sent by the caller, for a supervisor driven in-process (its signals are not the
/// process's).
impl SignalSource for tokio::sync::mpsc::UnboundedReceiver<SupervisorSignal> {
    fn recv(&mut self) -> impl Future<Output = Option<SupervisorSignal>> {
        tokio::sync::mpsc::UnboundedReceiver::recv(self)
    }
}

/// The installed signal listeners: the process's own signals.
pub struct Signals {
    listeners: Vec<(SupervisorSignal, tokio::signal::unix::Signal)>,
}

impl Signals {
    /// Installs the handlers.
    pub fn new() -> io::Result<Self> {
        let table = [
            (
                SignalKind::terminate(),
                SupervisorSignal::Stop(clusterd_manifest::Signal::SIGTERM),
            ),
            (
                SignalKind::interrupt(),
                SupervisorSignal::Stop(clusterd_manifest::Signal::SIGINT),
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
            (
                SignalKind::from_raw(libc::SIGURG),
                SupervisorSignal::Upgrade,
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
