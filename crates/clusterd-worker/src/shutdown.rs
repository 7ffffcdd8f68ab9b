//! The shutdown handle: when to stop (a stop signal arrived, or the program asked), and the
//! close hooks to run once the worker has drained.
//!
//! The order a worker follows is: [`Shutdown::wait`] resolves, the worker stops accepting and
//! finishes its in-flight requests, then calls [`Shutdown::close`], which runs the registered
//! hooks (closing a KV client, flushing metrics, ...) one after another in registration order,
//! each bounded by a timeout. Hooks run after the drain, not at the signal, because in-flight
//! requests may still need what the hooks close.
//!
//! After the first stop signal, further ones are absorbed (the handlers stay installed): the
//! supervisor escalates to SIGKILL after its grace period.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Why shutdown began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// This signal (a raw signal number, e.g. `libc::SIGTERM`) arrived.
    Signal(i32),
    /// The program called [`Shutdown::trigger`] or [`Shutdown::close`].
    Requested,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            Reason::Requested => return f.write_str("shutdown requested"),
            Reason::Signal(libc::SIGTERM) => "SIGTERM",
            Reason::Signal(libc::SIGINT) => "SIGINT",
            Reason::Signal(libc::SIGQUIT) => "SIGQUIT",
            Reason::Signal(libc::SIGHUP) => "SIGHUP",
            Reason::Signal(libc::SIGUSR1) => "SIGUSR1",
            Reason::Signal(libc::SIGUSR2) => "SIGUSR2",
            Reason::Signal(other) => return write!(f, "received signal {other}"),
        };
        write!(f, "received {name}")
    }
}

/// Why a [`Shutdown`] could not be set up, or a hook not registered.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    /// Signal handlers need a tokio runtime to deliver to.
    #[error("listening for stop signals needs a tokio runtime")]
    NoRuntime,
    /// Installing a signal handler failed.
    #[error("listening for signal {signal}")]
    Signal {
        /// The raw signal number.
        signal: i32,
        /// The OS (or tokio) error.
        source: std::io::Error,
    },
    /// [`Shutdown::close`] already ran; the hook would never run.
    #[error("close hook {name:?} registered after the close hooks ran")]
    Closed {
        /// The hook's name.
        name: String,
    },
}

/// How one close hook ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookOutcome {
    /// It finished within its timeout.
    Completed,
    /// It was still running at its timeout and was cancelled.
    TimedOut,
    /// It panicked.
    Panicked,
}

/// What [`Shutdown::close`] reports for each hook, in the order they ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookReport {
    /// The name given to [`Shutdown::on_close`].
    pub name: String,
    /// How it ended.
    pub outcome: HookOutcome,
    /// How long it ran.
    pub elapsed: Duration,
}

impl fmt::Display for HookReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcome = match self.outcome {
            HookOutcome::Completed => "completed",
            HookOutcome::TimedOut => "timed out",
            HookOutcome::Panicked => "panicked",
        };
        write!(
            f,
            "close hook {:?} {outcome} after {:?}",
            self.name, self.elapsed
        )
    }
}

type HookFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type HookFn = Box<dyn FnOnce() -> HookFuture + Send>;

struct Hooks {
    queue: VecDeque<(String, HookFn)>,
    closed: bool,
}

struct Inner {
    reason: watch::Sender<Option<Reason>>,
    hooks: Mutex<Hooks>,
}

/// The shutdown handle: a future that resolves on the stop signal, and the close hooks.
///
/// Cheap to clone; all clones share the same state.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

impl fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shutdown")
            .field("reason", &self.reason())
            .finish_non_exhaustive()
    }
}

impl Shutdown {
    /// Listens for SIGTERM and SIGINT. Call it early, from within a tokio runtime with IO and
    /// time enabled (`enable_all`; tokio panics otherwise): from then on these signals no longer
    /// kill the process but begin shutdown.
    pub fn new() -> Result<Self, ShutdownError> {
        Self::with_signals(&[SignalKind::terminate(), SignalKind::interrupt()])
    }

    /// Listens for the given signals instead (e.g. the app's configured `stop_signal`). With
    /// none, only [`trigger`](Self::trigger) begins shutdown.
    pub fn with_signals(kinds: &[SignalKind]) -> Result<Self, ShutdownError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| ShutdownError::NoRuntime)?;
        let mut streams = Vec::with_capacity(kinds.len());
        for &kind in kinds {
            let stream = signal(kind).map_err(|source| ShutdownError::Signal {
                signal: kind.as_raw_value(),
                source,
            })?;
            streams.push((kind.as_raw_value(), stream));
        }
        let (tx, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            reason: tx,
            hooks: Mutex::new(Hooks {
                queue: VecDeque::new(),
                closed: false,
            }),
        });
        for (signo, mut stream) in streams {
            let sender = inner.reason.clone();
            runtime.spawn(async move {
                while stream.recv().await.is_some() {
                    begin(&sender, Reason::Signal(signo));
                }
            });
        }
        Ok(Shutdown { inner })
    }

    /// A future that resolves with the reason once shutdown has begun (at once if it already
    /// has). It owns what it needs, so it can be moved into a task or a server's
    /// graceful-shutdown argument.
    pub fn wait(&self) -> impl Future<Output = Reason> + Send + 'static {
        let inner = Arc::clone(&self.inner);
        async move {
            let mut rx = inner.reason.subscribe();
            match rx.wait_for(Option::is_some).await {
                Ok(reason) => reason.unwrap_or(Reason::Requested),
                // Unreachable: `inner` keeps the sender alive for as long as we wait.
                Err(_) => Reason::Requested,
            }
        }
    }

    /// Why shutdown began, or `None` while it has not.
    pub fn reason(&self) -> Option<Reason> {
        *self.inner.reason.borrow()
    }

    /// Begins shutdown without a signal (e.g. on a fatal error). Idempotent: the first reason
    /// sticks.
    pub fn trigger(&self) {
        begin(&self.inner.reason, Reason::Requested);
    }

    /// Registers a close hook, run by [`close`](Self::close) after the hooks registered
    /// before it. `hook` is called once and its future awaited on the tokio runtime.
    pub fn on_close<F, Fut>(&self, name: impl Into<String>, hook: F) -> Result<(), ShutdownError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let name = name.into();
        let mut hooks = self.lock_hooks();
        if hooks.closed {
            return Err(ShutdownError::Closed { name });
        }
        hooks
            .queue
            .push_back((name, Box::new(move || Box::pin(hook()) as HookFuture)));
        Ok(())
    }

    /// Begins shutdown if it has not begun, then runs the close hooks one at a time in
    /// registration order, each cancelled after `per_hook` (a hook's panic is caught and
    /// reported). Hooks registered while this runs are run too; registering after it
    /// returns is an error. Returns one report per hook.
    pub async fn close(&self, per_hook: Duration) -> Vec<HookReport> {
        self.trigger();
        let mut reports = Vec::new();
        loop {
            let next = {
                let mut hooks = self.lock_hooks();
                let next = hooks.queue.pop_front();
                hooks.closed = next.is_none();
                next
            };
            let Some((name, hook)) = next else {
                return reports;
            };
            let started = Instant::now();
            let mut task = tokio::spawn(hook());
            let outcome = match tokio::time::timeout(per_hook, &mut task).await {
                Ok(Ok(())) => HookOutcome::Completed,
                Ok(Err(_)) => HookOutcome::Panicked,
                Err(_) => {
                    task.abort();
                    HookOutcome::TimedOut
                }
            };
            reports.push(HookReport {
                name,
                outcome,
                elapsed: started.elapsed(),
            });
        }
    }

    fn lock_hooks(&self) -> std::sync::MutexGuard<'_, Hooks> {
        self.inner
            .hooks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Records `reason` unless shutdown has already begun.
fn begin(sender: &watch::Sender<Option<Reason>>, reason: Reason) {
    sender.send_if_modified(|current| {
        if current.is_some() {
            return false;
        }
        *current = Some(reason);
        true
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn hooks_run_in_order_and_are_bounded() {
        let shutdown = Shutdown::with_signals(&[]).expect("shutdown");
        let order = Arc::new(Mutex::new(Vec::new()));
        for name in ["first", "second"] {
            let order = Arc::clone(&order);
            shutdown
                .on_close(name, move || async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    order.lock().expect("lock").push(name);
                })
                .expect("register");
        }
        shutdown
            .on_close("stuck", std::future::pending::<()>)
            .expect("register");
        shutdown
            .on_close("broken", || async { panic!("hook failure") })
            .expect("register");
        let late = Arc::new(AtomicUsize::new(0));
        {
            let (shutdown2, late) = (shutdown.clone(), Arc::clone(&late));
            shutdown
                .on_close("registers another", move || async move {
                    shutdown2
                        .on_close("late", move || async move {
                            late.fetch_add(1, Ordering::SeqCst);
                        })
                        .expect("register while closing");
                })
                .expect("register");
        }

        let reports = shutdown.close(Duration::from_millis(100)).await;
        let summary: Vec<(&str, HookOutcome)> = reports
            .iter()
            .map(|r| (r.name.as_str(), r.outcome))
            .collect();
        assert_eq!(
            summary,
            [
                ("first", HookOutcome::Completed),
                ("second", HookOutcome::Completed),
                ("stuck", HookOutcome::TimedOut),
                ("broken", HookOutcome::Panicked),
                ("registers another", HookOutcome::Completed),
                ("late", HookOutcome::Completed),
            ]
        );
        assert_eq!(*order.lock().expect("lock"), ["first", "second"]);
        assert_eq!(late.load(Ordering::SeqCst), 1);
        assert!(reports[2].elapsed >= Duration::from_millis(100));
        assert_eq!(shutdown.reason(), Some(Reason::Requested));
        assert!(matches!(
            shutdown.on_close("too late", || async {}),
            Err(ShutdownError::Closed { name }) if name == "too late"
        ));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn wait_resolves_on_trigger_and_keeps_the_first_reason() {
        let shutdown = Shutdown::with_signals(&[]).expect("shutdown");
        assert_eq!(shutdown.reason(), None);
        let waiter = tokio::spawn(shutdown.wait());
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        shutdown.trigger();
        let reason = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("wait resolves within 5 s")
            .expect("waiter task");
        assert_eq!(reason, Reason::Requested);
        // Already begun: resolves at once.
        assert_eq!(shutdown.wait().await, Reason::Requested);
    }

    #[test]
    fn needs_a_runtime() {
        assert!(matches!(Shutdown::new(), Err(ShutdownError::NoRuntime)));
    }

    #[test]
    fn reasons_read_well() {
        assert_eq!(
            Reason::Signal(libc::SIGTERM).to_string(),
            "received SIGTERM"
        );
        assert_eq!(Reason::Signal(40).to_string(), "received signal 40");
        assert_eq!(Reason::Requested.to_string(), "shutdown requested");
    }
}
