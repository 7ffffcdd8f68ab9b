//! Node.js binding of `clusterd-kv`: the Redis Cluster client whose cluster map is tended by
//! one process per host and shared through shared memory, for Node workers.
//!
//! The map side of the client: the segment, the seqlock, the tend lock and its hand-over, the
//! tend owner's topology reads and the futex wake-up of the owner after a `MOVED` are the
//! Rust crate's, running on napi's tokio runtime (`tokio_rt`) and the crate's helper threads.
//! The data path is not here: `index.js` sends the commands over `net` sockets on Node's
//! event loop (`connection.js`), asks [`KvClient::route`] for each key's node (a lookup in
//! the current map, synchronous) and reports redirections through
//! [`KvClient::note_moved`], so a GET never crosses to another thread.
//!
//! Errors of `connect` and `close` reject with a JavaScript `Error` whose `code` is one of
//! the stable strings of [`error_code`] (`ERR_KV_CONNECT`, `ERR_KV_CLOSED`, ...), built on
//! the JavaScript thread when the promise settles; `index.js` uses the same codes.
//!
//! Lifetime: the runtime's threads and the crate's helper threads hold no libuv handle, so
//! they never keep Node alive; a pending promise does until it settles. `close()` releases the
//! tend lock at once; a process that exits without it releases the lock too (the kernel drops
//! a `flock` with its last descriptor), and a client that is garbage-collected is closed by
//! its `Drop`.
//!
//! `index.js` beside this crate finds and loads the built library, wraps [`connect`] to
//! check its options in JavaScript and wraps the handle it resolves with in its own
//! `KvClient` class.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use clusterd_kv::{Error as KvError, KvOptions};
use napi::bindgen_prelude::{BufferSlice, JsObjectValue, PromiseRaw, ToNapiValue};
use napi::{Env, JsValue, Status};
use napi_derive::napi;

/// Options of [`connect`], as JavaScript passes them (`index.js` normalizes `seeds`).
#[napi(object)]
pub struct ConnectOptions {
    /// Seed nodes, `host:port` each.
    pub seeds: Vec<String>,
    /// Segment name prefix (`CLUSTERD_KV_SEGMENT`, else `clusterd-kv`).
    pub segment: Option<String>,
    /// Directory of the segment and its lock file (`CLUSTERD_KV_DIR`, else `/dev/shm`).
    pub segment_dir: Option<String>,
    /// Keeps clients of the same seeds that must not share a map apart.
    pub namespace: Option<String>,
    /// How often the tend owner reads the topology, in milliseconds (default 1000).
    pub tend_interval: Option<u32>,
    /// `false`: this client tends its own map (default `true`).
    pub shared_memory: Option<bool>,
    /// Time limit for connecting to a node, in milliseconds (default 1000).
    pub connect_timeout: Option<u32>,
    /// Time limit for one command's reply, in milliseconds (default 1000).
    pub command_timeout: Option<u32>,
}

impl ConnectOptions {
    /// The crate's options; the crate validates them in `connect`.
    fn into_kv_options(self) -> KvOptions {
        let ms = |v: u32| Duration::from_millis(u64::from(v));
        let mut options = KvOptions::new(self.seeds);
        if let Some(prefix) = self.segment {
            options = options.segment_prefix(prefix);
        }
        if let Some(dir) = self.segment_dir {
            options = options.segment_dir(dir);
        }
        if let Some(namespace) = self.namespace {
            options = options.namespace(namespace);
        }
        if let Some(interval) = self.tend_interval {
            options = options.tend_interval(ms(interval));
        }
        if let Some(on) = self.shared_memory {
            options = options.shared_memory(on);
        }
        if let Some(timeout) = self.connect_timeout {
            options = options.connect_timeout(ms(timeout));
        }
        if let Some(timeout) = self.command_timeout {
            options = options.command_timeout(ms(timeout));
        }
        options
    }
}

/// A client's role and counters (`clusterd_kv::Stats`), as `kv.stats()` returns them.
#[napi(object, use_nullable = true)]
pub struct KvStats {
    /// `"owner"`, `"follower"`, `"local"` (no shared memory) or `"closed"`.
    pub role: String,
    /// Pid of the tend owner as the segment records it, or `null`.
    pub owner_pid: Option<i32>,
    /// Times ownership of the segment was taken (0 without shared memory).
    pub owner_epoch: f64,
    /// The segment's map generation (0 without shared memory).
    pub map_generation: u32,
    /// Key commands issued (GET/SET/DEL), not counting redirections. This and `moved` and
    /// `ask` count the crate's own data path; `index.js` adds those of its own.
    pub commands: f64,
    /// `MOVED` replies followed.
    pub moved: f64,
    /// `ASK` replies followed.
    pub ask: f64,
    /// `CLUSTER SHARDS`/`CLUSTER SLOTS` commands this client sent.
    pub topology_commands: f64,
    /// Successful topology reads.
    pub refreshes: f64,
    /// Maps this client published into the segment.
    pub publishes: f64,
    /// Refreshes this client asked the owner for (after a `MOVED`).
    pub refresh_requests: f64,
    /// Maps copied out of the segment.
    pub snapshot_copies: f64,
    /// Topology reads done while the owner looked hung.
    pub self_refreshes: f64,
    /// Times this client became the tend owner.
    pub takeovers: f64,
}

/// Connects a client (see `KvClient::connect` of the crate): resolves once it can route,
/// as the tend owner or as a follower of the host's owner.
#[napi(js_name = "connectNative")]
pub fn connect<'env>(
    env: &'env Env,
    options: ConnectOptions,
) -> napi::Result<PromiseRaw<'env, KvClient>> {
    let options = options.into_kv_options();
    settle(env, clusterd_kv::KvClient::connect(options), |_, client| {
        Ok(KvClient {
            inner: Arc::new(client),
        })
    })
}

/// The addon's half of a connected client, obtained from `connect()` and wrapped by
/// `index.js`: the map, the tend lock and the counters of the map side.
#[napi]
pub struct KvClient {
    inner: Arc<clusterd_kv::KvClient>,
}

#[napi]
impl KvClient {
    /// The node (`host:port`) the client's map routes `key` (bytes) to, or `null`: the data
    /// path's lookup, once per command (a follower copies the segment's map first when its
    /// generation changed).
    #[napi]
    pub fn route(&self, key: BufferSlice) -> Option<String> {
        self.inner.route(&*key)
    }

    /// Reports a `MOVED` for `slot` to `to` received by the data path: patches the local map
    /// and asks for a refresh (a follower wakes the tend owner through the segment).
    #[napi]
    pub fn note_moved(&self, slot: u32, to: String) -> napi::Result<()> {
        let slot = u16::try_from(slot)
            .ok()
            .filter(|&s| s < 16384)
            .ok_or_else(|| napi::Error::new(Status::InvalidArg, format!("no hash slot {slot}")))?;
        self.inner.note_moved(slot, &to);
        Ok(())
    }

    /// Asks for a topology refresh, as the data path does after a dropped connection.
    #[napi]
    pub fn request_refresh(&self) {
        self.inner.request_refresh();
    }

    /// The client's role and counters, with the segment's owner facts.
    #[napi]
    pub fn stats(&self) -> KvStats {
        let s = self.inner.stats();
        // Counters are u64; as JavaScript numbers they are exact up to 2^53.
        let n = |v: u64| v as f64;
        KvStats {
            role: s.role.as_str().to_owned(),
            owner_pid: s.owner_pid,
            owner_epoch: n(s.owner_epoch),
            map_generation: s.map_generation,
            commands: n(s.commands),
            moved: n(s.moved),
            ask: n(s.ask),
            topology_commands: n(s.topology_commands),
            refreshes: n(s.refreshes),
            publishes: n(s.publishes),
            refresh_requests: n(s.refresh_requests),
            snapshot_copies: n(s.snapshot_copies),
            self_refreshes: n(s.self_refreshes),
            takeovers: n(s.takeovers),
        }
    }

    /// Releases the tend lock (a waiting process takes over at once), leaves the segment and
    /// drops the connections; later commands reject with `ERR_KV_CLOSED`. Idempotent.
    #[napi]
    pub fn close<'env>(&self, env: &'env Env) -> napi::Result<PromiseRaw<'env, ()>> {
        let kv = self.inner.clone();
        settle(env, async move { kv.close().await }, |_, ()| Ok(()))
    }
}

/// The hash slot (0..16384) of `key` (bytes), as Redis Cluster computes it.
#[napi]
pub fn key_slot(key: BufferSlice) -> u32 {
    u32::from(clusterd_kv::key_slot(&key))
}

/// One segment's tend owner, as [`tend_owners`] reports it (`clusterd_kv::OwnerInfo`).
#[napi(object, use_nullable = true)]
pub struct TendOwner {
    /// The segment file.
    pub segment: String,
    /// Pid of the tend owner as the segment header claims it, while the lock is held.
    pub owner_pid: Option<i32>,
    /// Whether some process holds the tend lock.
    pub lock_held: bool,
    /// Pid holding the tend lock according to the kernel (`/proc/locks`).
    pub lock_pid: Option<i32>,
    /// Times ownership was taken since the segment was created.
    pub owner_epoch: f64,
    /// Generation of the published map (0: none yet).
    pub generation: u32,
    /// Milliseconds since the owner's last tend round, while an owner tends.
    pub heartbeat_age_ms: Option<f64>,
    /// When the current owner took the lock, on the clock of [`monotonic_micros`].
    pub owner_since_us: f64,
}

/// The host's segments named `{prefix}-{hash}` in `dir` and who tends each (what
/// `clusterd status` reads); `dir` and `prefix` default like `connect()`'s. Synchronous: it
/// reads a few small files.
#[napi]
pub fn tend_owners(dir: Option<String>, prefix: Option<String>) -> napi::Result<Vec<TendOwner>> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let dir = dir
        .or_else(|| env(clusterd_kv::ENV_SEGMENT_DIR))
        .unwrap_or_else(|| clusterd_kv::DEFAULT_DIR.into());
    let prefix = prefix
        .or_else(|| env(clusterd_kv::ENV_SEGMENT_PREFIX))
        .unwrap_or_else(|| clusterd_kv::DEFAULT_PREFIX.into());
    let owners = clusterd_kv::tend_owners(dir.as_ref(), &prefix)
        .map_err(|e| napi::Error::new(Status::GenericFailure, format!("reading {dir}: {e}")))?;
    Ok(owners
        .into_iter()
        .map(|o| TendOwner {
            segment: o.segment.display().to_string(),
            owner_pid: o.owner_pid,
            lock_held: o.lock_held,
            lock_pid: o.lock_pid,
            owner_epoch: o.owner_epoch as f64,
            generation: o.generation,
            heartbeat_age_ms: o.heartbeat_age.map(|d| d.as_secs_f64() * 1000.0),
            owner_since_us: o.owner_since_us as f64,
        })
        .collect())
}

/// CLOCK_MONOTONIC in microseconds, the clock of the segment's timestamps
/// (`ownerSinceUs`): for measuring takeovers.
#[napi]
pub fn monotonic_micros() -> f64 {
    clusterd_kv::monotonic_micros() as f64
}

/// Runs `fut` on napi's tokio runtime and returns a promise that resolves with `ok`'s value,
/// or rejects with an `Error` carrying the crate error's [`error_code`].
fn settle<'env, T, V, F, R>(env: &'env Env, fut: F, ok: R) -> napi::Result<PromiseRaw<'env, V>>
where
    T: Send + 'static,
    V: ToNapiValue,
    F: Future<Output = clusterd_kv::Result<T>> + Send + 'static,
    R: FnOnce(&Env, T) -> napi::Result<V> + 'static,
{
    // The future always succeeds from napi's point of view; the callback, which runs on the
    // JavaScript thread, builds the error object (napi's own errors cannot carry a code).
    env.spawn_future_with_callback(
        async move { Ok(fut.await) },
        move |env, result| match result {
            Ok(value) => ok(env, value),
            Err(e) => Err(js_error(env, &e)),
        },
    )
}

/// A JavaScript `Error` with the message of `e` and `code` set to its [`error_code`],
/// wrapped so that rejecting with it rejects with that very object.
fn js_error(env: &Env, e: &KvError) -> napi::Error {
    let build = || -> napi::Result<napi::Error> {
        let mut error = env.create_error(napi::Error::new(Status::GenericFailure, e.report()))?;
        error.set_named_property("code", error_code(e))?;
        Ok(napi::Error::from(error.to_unknown()))
    };
    build().unwrap_or_else(|failed| failed)
}

/// The stable `code` of a crate error, as JavaScript sees it on a rejected promise.
pub fn error_code(e: &KvError) -> &'static str {
    match e {
        KvError::InvalidOption { .. } => "ERR_KV_INVALID_OPTION",
        KvError::Io { .. } => "ERR_KV_IO",
        KvError::ForeignSegment { .. } => "ERR_KV_FOREIGN_SEGMENT",
        KvError::MapTooLarge { .. } => "ERR_KV_MAP_TOO_LARGE",
        KvError::Connect { .. } => "ERR_KV_CONNECT",
        KvError::Command { .. } => "ERR_KV_COMMAND",
        KvError::Topology { .. } => "ERR_KV_TOPOLOGY",
        KvError::BadTopology { .. } => "ERR_KV_BAD_TOPOLOGY",
        KvError::NoRoute { .. } => "ERR_KV_NO_ROUTE",
        KvError::TooManyRedirects { .. } => "ERR_KV_TOO_MANY_REDIRECTS",
        KvError::Timeout { .. } => "ERR_KV_TIMEOUT",
        KvError::Closed => "ERR_KV_CLOSED",
        // The crate's enum is non-exhaustive: a variant added later gets the generic code
        // until it is given its own.
        _ => "ERR_KV",
    }
}
