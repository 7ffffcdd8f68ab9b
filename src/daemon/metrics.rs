//! Prometheus metrics (OpenMetrics text) on an optional HTTP listener (`[metrics] listen = "127.0.0.1:9100"`).
//!
//! The HTTP side ([`MetricsServer`]) only forwards each request to the supervisor's loop and
//! writes back what it gets: `/metrics`, and for orchestrators `/healthz` (200 when the loop
//! answers) and `/readyz` (200 when every app has its desired ready workers and no rollout is
//! aborting, else 503 with a JSON reason); the registry ([`Metrics`]) is owned by the supervisor, which
//! records events as they happen (restarts, reload outcomes, time to ready) and refreshes the
//! gauges from a status snapshot at each scrape.

use std::convert::Infallible;
use std::net::SocketAddr;

use clusterd_proto::{Status, WorkerState};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabel {
    app: String,
}

fn app_label(app: &str) -> AppLabel {
    AppLabel {
        app: app.to_owned(),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppState {
    app: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppOutcome {
    app: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppSlot {
    app: String,
    slot: String,
}

/// The registry and its metrics.
pub struct Metrics {
    registry: Registry,
    workers: Family<AppState, Gauge>,
    restarts: Family<AppLabel, Counter>,
    reloads: Family<AppOutcome, Counter>,
    worker_rss: Family<AppSlot, Gauge>,
    worker_cpu: Family<AppSlot, Gauge<f64, std::sync::atomic::AtomicU64>>,
    time_to_ready: Family<AppLabel, Histogram>,
    uptime: Gauge<f64, std::sync::atomic::AtomicU64>,
    rss: Gauge,
    wakeups: Counter,
    output_dropped: Gauge,
    ipc_messages: Family<AppLabel, Counter>,
    ipc_dropped: Counter,
    /// The counters' values, as an upgrade hands them over.
    counted: std::cell::RefCell<Counters>,
}

/// The counters' values, carried across `clusterd upgrade` so that they never go back (the
/// time-to-ready histogram starts again).
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counters {
    /// `worker_restarts` by app.
    pub restarts: std::collections::BTreeMap<String, u64>,
    /// `reloads` by app: completed, aborted.
    pub reloads: std::collections::BTreeMap<String, (u64, u64)>,
    /// `ipc_messages` by app.
    pub messages: std::collections::BTreeMap<String, u64>,
    /// `ipc_messages_dropped`.
    pub messages_dropped: u64,
    /// `loop_wakeups`.
    pub wakeups: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("clusterd");
        let workers = Family::<AppState, Gauge>::default();
        registry.register("workers", "Worker slots by state", workers.clone());
        let restarts = Family::<AppLabel, Counter>::default();
        registry.register(
            "worker_restarts",
            "Unexpected worker exits that were replaced",
            restarts.clone(),
        );
        let reloads = Family::<AppOutcome, Counter>::default();
        registry.register(
            "reloads",
            "Rolling reloads by outcome (completed, aborted)",
            reloads.clone(),
        );
        let worker_rss = Family::<AppSlot, Gauge>::default();
        registry.register(
            "worker_rss_bytes",
            "Resident memory of each serving worker's process group",
            worker_rss.clone(),
        );
        let worker_cpu = Family::<AppSlot, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "worker_cpu_seconds",
            "CPU seconds used by each serving worker's process group since it started",
            worker_cpu.clone(),
        );
        let time_to_ready = Family::<AppLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
        });
        registry.register(
            "time_to_ready_seconds",
            "Time from spawn to ready",
            time_to_ready.clone(),
        );
        let uptime = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "uptime_seconds",
            "Seconds since clusterd started",
            uptime.clone(),
        );
        let rss = Gauge::default();
        registry.register(
            "rss_bytes",
            "Resident memory of clusterd itself",
            rss.clone(),
        );
        let wakeups = Counter::default();
        registry.register(
            "loop_wakeups",
            "Times the event loop woke up (for an event or a deadline); flat while nothing happens",
            wakeups.clone(),
        );
        let output_dropped = Gauge::default();
        registry.register(
            "output_dropped_lines",
            "Output lines dropped because clusterd's stdout or stderr was not read",
            output_dropped.clone(),
        );
        let ipc_messages = Family::<AppLabel, Counter>::default();
        registry.register(
            "ipc_messages",
            "Messages workers sent on their channel (ipc)",
            ipc_messages.clone(),
        );
        let ipc_dropped = Counter::default();
        registry.register(
            "ipc_dropped",
            "Messages for workers dropped because the worker did not read its channel",
            ipc_dropped.clone(),
        );
        Metrics {
            registry,
            ipc_messages,
            ipc_dropped,
            wakeups,
            output_dropped,
            workers,
            restarts,
            reloads,
            worker_rss,
            worker_cpu,
            time_to_ready,
            uptime,
            rss,
            counted: Default::default(),
        }
    }
}

impl Metrics {
    /// The counters' values, for an upgrade.
    pub fn counters(&self) -> Counters {
        Counters {
            messages_dropped: self.ipc_dropped.get(),
            wakeups: self.wakeups.get(),
            ..self.counted.borrow().clone()
        }
    }

    /// Counts on from the values a previous clusterd handed over.
    pub fn restore(&self, counters: Counters) {
        for (app, n) in &counters.restarts {
            self.restarts.get_or_create(&app_label(app)).inc_by(*n);
        }
        for (app, (completed, aborted)) in &counters.reloads {
            for (outcome, n) in [("completed", *completed), ("aborted", *aborted)] {
                let label = AppOutcome {
                    app: app.clone(),
                    outcome: outcome.into(),
                };
                if n > 0 {
                    self.reloads.get_or_create(&label).inc_by(n);
                }
            }
        }
        for (app, n) in &counters.messages {
            self.ipc_messages.get_or_create(&app_label(app)).inc_by(*n);
        }
        self.ipc_dropped.inc_by(counters.messages_dropped);
        self.wakeups.inc_by(counters.wakeups);
        *self.counted.borrow_mut() = counters;
    }

    /// A worker of `app` sent a message on its channel.
    pub fn record_message(&self, app: &str) {
        *self
            .counted
            .borrow_mut()
            .messages
            .entry(app.to_owned())
            .or_default() += 1;
        self.ipc_messages
            .get_or_create(&AppLabel {
                app: app.to_owned(),
            })
            .inc();
    }

    /// A message for a worker was dropped: it does not read its channel.
    pub fn record_message_dropped(&self) {
        self.ipc_dropped.inc();
    }

    /// The event loop woke up once.
    pub fn record_wakeup(&self) {
        self.wakeups.inc();
    }

    /// A worker of `app` was replaced after an unexpected exit.
    pub fn record_restart(&self, app: &str) {
        *self
            .counted
            .borrow_mut()
            .restarts
            .entry(app.to_owned())
            .or_default() += 1;
        self.restarts
            .get_or_create(&AppLabel {
                app: app.to_owned(),
            })
            .inc();
    }

    /// A rollout of `app` ended.
    pub fn record_reload(&self, app: &str, completed: bool) {
        let outcome = if completed { "completed" } else { "aborted" };
        let mut counted = self.counted.borrow_mut();
        let (done, aborted) = counted.reloads.entry(app.to_owned()).or_default();
        *if completed { done } else { aborted } += 1;
        drop(counted);
        self.reloads
            .get_or_create(&AppOutcome {
                app: app.to_owned(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// A worker of `app` became ready `seconds` after its spawn.
    pub fn record_ready(&self, app: &str, seconds: f64) {
        self.time_to_ready
            .get_or_create(&AppLabel {
                app: app.to_owned(),
            })
            .observe(seconds);
    }

    /// The Prometheus text exposition, with gauges refreshed from `status`.
    pub fn encode(&self, status: &Status) -> String {
        self.workers.clear();
        self.worker_rss.clear();
        self.worker_cpu.clear();
        for app in &status.apps {
            for state in [
                "starting", "ready", "stopping", "backoff", "failed", "exited",
            ] {
                // Every state is reported, zeros included.
                let _ = self.workers.get_or_create(&AppState {
                    app: app.name.clone(),
                    state: state.into(),
                });
            }
            for worker in &app.workers {
                let state = match worker.state {
                    WorkerState::Starting => "starting",
                    WorkerState::Ready => "ready",
                    WorkerState::Stopping => "stopping",
                    WorkerState::Backoff => "backoff",
                    WorkerState::Failed => "failed",
                    WorkerState::Exited => "exited",
                };
                self.workers
                    .get_or_create(&AppState {
                        app: app.name.clone(),
                        state: state.into(),
                    })
                    .inc();
                if worker.role == clusterd_proto::WorkerRole::Serving {
                    let slot = AppSlot {
                        app: app.name.clone(),
                        slot: worker.slot.to_string(),
                    };
                    if let Some(rss) = worker.rss_bytes {
                        self.worker_rss
                            .get_or_create(&slot)
                            .set(i64::try_from(rss).unwrap_or(i64::MAX));
                    }
                    if let Some(cpu) = worker.cpu_seconds {
                        self.worker_cpu.get_or_create(&slot).set(cpu);
                    }
                }
            }
        }
        self.uptime.set(status.uptime_ms as f64 / 1000.0);
        self.output_dropped
            .set(i64::try_from(status.output_dropped).unwrap_or(i64::MAX));
        self.rss
            .set(i64::try_from(status.rss_bytes).unwrap_or(i64::MAX));
        let mut text = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// What the HTTP listener asks the supervisor's loop; each carries where the answer goes.
pub enum Query {
    /// `GET /metrics`: the exposition text.
    Metrics(oneshot::Sender<String>),
    /// `GET /readyz`: ready, or why not.
    Ready(oneshot::Sender<Result<(), String>>),
    /// `GET /healthz`: answered by the loop itself, which proves it runs.
    Health(oneshot::Sender<()>),
}

/// How long a probe waits for the loop before it answers 503.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The HTTP listener; queries arrive through [`MetricsServer::recv`].
pub struct MetricsServer {
    /// Where it listens.
    pub address: SocketAddr,
    queries: mpsc::Receiver<Query>,
    /// A duplicate of the listener, handed to the next clusterd by an upgrade.
    kept: std::os::fd::OwnedFd,
}

impl MetricsServer {
    /// Binds `addr` and serves `GET /metrics`, `/healthz` and `/readyz` (must run inside a
    /// `LocalSet`).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
        Self::serve_listener(listener)
    }

    /// The listener handed over by the previous clusterd (must run inside a `LocalSet`).
    pub fn adopt(fd: std::os::fd::OwnedFd) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true)?;
        Self::serve_listener(TcpListener::from_std(listener)?)
    }

    fn serve_listener(listener: TcpListener) -> std::io::Result<Self> {
        let address = listener.local_addr()?;
        let kept = std::os::fd::AsFd::as_fd(&listener).try_clone_to_owned()?;
        let (sender, queries) = mpsc::channel(16);
        tokio::task::spawn_local(serve(listener, sender));
        Ok(MetricsServer {
            address,
            queries,
            kept,
        })
    }

    /// The listener's descriptor, for an upgrade's hand-over.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.kept)
    }

    /// The next query.
    pub async fn recv(&mut self) -> Option<Query> {
        self.queries.recv().await
    }
}

/// At most this many metrics connections are served at once; one more is answered 503 and
/// closed, so a flood of scrapers cannot hold clusterd's memory or its loop.
pub const MAX_CONNECTIONS: usize = 64;

/// The answer to a connection over [`MAX_CONNECTIONS`].
const REFUSAL: &[u8] = concat!(
    "HTTP/1.1 503 Service Unavailable\r\n",
    "Content-Type: text/plain; charset=utf-8\r\n",
    "Content-Length: 29\r\n",
    "Connection: close\r\n\r\n",
    "too many metrics connections\n",
)
.as_bytes();

async fn serve(listener: TcpListener, queries: mpsc::Sender<Query>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let burst = crate::daemon::memory::Burst::default();
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Answer, then read what the client sent until it closes (bounded), so the close
            // is a FIN and not a reset that could destroy the answer.
            tokio::task::spawn_local(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let refuse = async {
                    stream.write_all(REFUSAL).await?;
                    stream.shutdown().await?;
                    let mut sink = [0; 512];
                    while stream.read(&mut sink).await? > 0 {}
                    std::io::Result::Ok(())
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), refuse).await;
            });
            continue;
        };
        let queries = queries.clone();
        let open = burst.open();
        tokio::task::spawn_local(async move {
            let _slot = (slot, open);
            let service =
                hyper::service::service_fn(move |request| respond(request, queries.clone()));
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection =
                hyper::server::conn::http1::Builder::new().serve_connection(io, service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), connection).await;
        });
    }
}

/// Sends a query to the loop and waits (bounded) for its answer.
async fn ask<T>(
    queries: &mpsc::Sender<Query>,
    query: impl FnOnce(oneshot::Sender<T>) -> Query,
) -> Option<T> {
    let (sender, answer) = oneshot::channel();
    queries.send(query(sender)).await.ok()?;
    tokio::time::timeout(PROBE_TIMEOUT, answer).await.ok()?.ok()
}

async fn respond(
    request: Request<Incoming>,
    queries: mpsc::Sender<Query>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    const JSON: &str = "application/json";
    const TEXT: &str = "text/plain; charset=utf-8";
    let unavailable = |what: &str| {
        let body = serde_json::json!({ "ready": false, "reason": what }).to_string() + "\n";
        reply(StatusCode::SERVICE_UNAVAILABLE, JSON, body)
    };
    Ok(match request.uri().path() {
        "/metrics" => match ask(&queries, Query::Metrics).await {
            Some(text) => reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            None => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "shutting down\n".into(),
            ),
        },
        "/healthz" => match ask(&queries, Query::Health).await {
            Some(()) => reply(StatusCode::OK, TEXT, "ok\n".into()),
            None => unavailable("the event loop does not answer"),
        },
        "/readyz" => match ask(&queries, Query::Ready).await {
            Some(Ok(())) => reply(StatusCode::OK, JSON, "{\"ready\":true}\n".into()),
            Some(Err(reason)) => unavailable(&reason),
            None => unavailable("the event loop does not answer"),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    })
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}
