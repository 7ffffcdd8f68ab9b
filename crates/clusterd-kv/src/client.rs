//! [`KvClient`], the public client: routes each key command to the node that serves the key's
//! slot according to its map, follows `MOVED`/`ASK`, and on [`close`](KvClient::close) gives
//! up the tend lock and its membership of the segment.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use redis::{ErrorKind, ServerErrorKind, Value};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::layout::STATE_TENDING;
use crate::map::ClusterMap;
use crate::options::KvOptions;
use crate::pool::{Pool, split_addr};
use crate::segment::{self, Membership};
use crate::slot::key_slot;
use crate::stats::{Counters, Role, Stats, bump};
use crate::tend::{self, SharedMap, locked};

/// Redirections followed for one command before giving up.
const MAX_REDIRECTS: usize = 5;

/// A Redis Cluster client whose slot map is shared with the host's other clients of the same
/// cluster (see the [crate docs](crate)).
///
/// Cheap to share behind an `Arc`; every method takes `&self`. Call [`close`](Self::close)
/// before the process exits so another process takes over tending at once (dropping the
/// client does the same, minus waiting for its background task).
pub struct KvClient {
    inner: Arc<Inner>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// A map and the segment generation it accounts for: a newer generation in the segment
/// means there is something newer to copy.
pub struct Snapshot {
    /// The segment generation this snapshot reflects (0 without shared memory).
    pub seen_generation: u32,
    /// The map.
    pub map: ClusterMap,
}

/// State shared by the client, its background task and its helper threads.
pub struct Inner {
    pub options: KvOptions,
    pub pool: Pool,
    pub counters: Counters,
    pub shards_supported: AtomicBool,
    pub shared: Option<SharedMap>,
    /// Wakes this client's tend or follow loop.
    pub refresh: Notify,
    pub closed: AtomicBool,
    pub last_refresh_request_us: AtomicU64,
    snapshot: RwLock<Arc<Snapshot>>,
    role: AtomicU8,
}

impl KvClient {
    /// Connects to the cluster: attaches to the host's segment for it (creating it if this is
    /// the first client) and either takes the tend lock and reads the topology, or follows
    /// the owner's map. Returns once the client can route.
    pub async fn connect(options: KvOptions) -> Result<Self> {
        options.validate()?;
        let shared = match options.segment_path() {
            Some(path) => {
                let (mapping, membership) =
                    segment::attach(&path, options.cluster_hash(), options.max_nodes_value())?;
                Some(SharedMap::new(mapping, membership))
            }
            None => None,
        };
        let role = if shared.is_some() {
            Role::Follower
        } else {
            Role::Local
        };
        let inner = Arc::new(Inner {
            pool: Pool::new(
                options.connect_timeout_value(),
                options.command_timeout_value(),
            ),
            options,
            counters: Counters::default(),
            shards_supported: AtomicBool::new(true),
            shared,
            refresh: Notify::new(),
            closed: AtomicBool::new(false),
            last_refresh_request_us: AtomicU64::new(0),
            snapshot: RwLock::new(Arc::new(Snapshot {
                seen_generation: 0,
                map: ClusterMap::empty(),
            })),
            role: AtomicU8::new(role as u8),
        });
        match tend::start(&inner).await {
            Ok(task) => Ok(KvClient {
                inner,
                task: Mutex::new(Some(task)),
            }),
            Err(e) => {
                // Best effort: the connect error is the one to report.
                let _ = inner.shut_down();
                Err(e)
            }
        }
    }

    /// The value stored at `key`, or `None`.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>> {
        let key = key.as_ref();
        let (addr, reply) = self.run(key, redis::cmd("GET").arg(key), "GET").await?;
        match reply {
            Value::Nil => Ok(None),
            Value::BulkString(bytes) => Ok(Some(bytes)),
            other => Err(unexpected(addr, "GET", &other)),
        }
    }

    /// Stores `value` at `key`.
    pub async fn set(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        let key = key.as_ref();
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value.as_ref());
        match self.run(key, &cmd, "SET").await? {
            (_, Value::Okay) => Ok(()),
            (addr, other) => Err(unexpected(addr, "SET", &other)),
        }
    }

    /// Deletes `key`; `true` if it existed.
    pub async fn del(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let key = key.as_ref();
        match self.run(key, redis::cmd("DEL").arg(key), "DEL").await? {
            (_, Value::Int(n)) => Ok(n > 0),
            (addr, other) => Err(unexpected(addr, "DEL", &other)),
        }
    }

    /// The node (`host:port`) this client's map routes `key` to, if any.
    pub fn route(&self, key: impl AsRef<[u8]>) -> Option<String> {
        let slot = key_slot(key.as_ref());
        self.inner
            .current_map()
            .map
            .node_for_slot(slot)
            .map(str::to_owned)
    }

    /// Reports a `MOVED` to `to` for `slot` that arrived on a connection of the caller's own
    /// (the Node binding's data path runs on Node's event loop): patches the local map so
    /// the slot routes to `to`, and asks for a refresh exactly as a redirection of
    /// [`get`](Self::get) does (a follower wakes the tend owner through the segment).
    pub fn note_moved(&self, slot: u16, to: &str) {
        self.inner.note_moved(slot, to);
    }

    /// Asks for a topology refresh, as after a dropped connection: the owner (or a client
    /// without shared memory) tends at once, a follower wakes the owner through the segment.
    pub fn request_refresh(&self) {
        self.inner.request_refresh();
    }

    /// This client's role.
    pub fn role(&self) -> Role {
        self.inner.role()
    }

    /// This client's counters, with the segment's owner facts.
    pub fn stats(&self) -> Stats {
        let mut stats = self.inner.counters.snapshot(self.role());
        if let Some(shared) = &self.inner.shared {
            let h = shared.mapping.view().header;
            stats.owner_epoch = h.owner_epoch.load(Ordering::Relaxed);
            stats.map_generation = h.generation.load(Ordering::Acquire);
            stats.owner_pid = (h.state.load(Ordering::Acquire) == STATE_TENDING)
                .then(|| h.owner_pid.load(Ordering::Relaxed));
        }
        stats
    }

    /// The options the client was built with.
    pub fn options(&self) -> &KvOptions {
        &self.inner.options
    }

    /// Stops tending and following, releases the tend lock (a waiting follower takes over at
    /// once), leaves the segment (removing it if this was the last client on the host) and
    /// drops the connections. Later commands fail with [`Error::Closed`]. Idempotent.
    pub async fn close(&self) -> Result<()> {
        let task = locked(&self.task).take();
        if let Some(task) = task {
            task.abort();
            // The task ends at its next await point; waiting makes sure it is gone.
            let _ = task.await;
        }
        self.inner.shut_down()
    }

    /// Runs `cmd` for `key` on the node that serves the key's slot, following redirections;
    /// returns the node that answered and its reply.
    async fn run(
        &self,
        key: &[u8],
        cmd: &redis::Cmd,
        name: &'static str,
    ) -> Result<(String, Value)> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        bump(&self.inner.counters.commands);
        let slot = key_slot(key);
        let mut addr = self
            .inner
            .current_map()
            .map
            .node_for_slot(slot)
            .ok_or(Error::NoRoute { slot })?
            .to_string();
        let mut asking = false;
        let mut reconnected = false;
        for _ in 0..=MAX_REDIRECTS {
            let mut conn = self.inner.pool.get(&addr).await?;
            let result = if asking {
                redis::pipe()
                    .cmd("ASKING")
                    .ignore()
                    .add_command(cmd.clone())
                    .query_async::<Vec<Value>>(&mut conn)
                    .await
                    .map(|mut replies| replies.pop().unwrap_or(Value::Nil))
            } else {
                cmd.query_async::<Value>(&mut conn).await
            };
            let err = match result {
                Ok(reply) => return Ok((addr, reply)),
                Err(err) => err,
            };
            let kind = err.kind();
            let redirect = err.redirect_node().map(|(to, _)| with_host(to, &addr));
            match (kind, redirect) {
                (ErrorKind::Server(ServerErrorKind::Moved), Some(to)) => {
                    bump(&self.inner.counters.moved);
                    self.inner.note_moved(slot, &to);
                    addr = to;
                    asking = false;
                }
                (ErrorKind::Server(ServerErrorKind::Ask), Some(to)) => {
                    bump(&self.inner.counters.ask);
                    addr = to;
                    asking = true;
                }
                _ if (err.is_io_error() || err.is_connection_dropped())
                    && !err.is_timeout()
                    && !reconnected =>
                {
                    // A stale connection (node restarted, idle timeout): reconnect once.
                    self.inner.pool.forget(&addr);
                    self.inner.request_refresh();
                    reconnected = true;
                }
                _ => {
                    if err.is_io_error() || err.is_timeout() {
                        self.inner.pool.forget(&addr);
                    }
                    return Err(Error::Command {
                        addr,
                        command: name,
                        source: err,
                    });
                }
            }
        }
        Err(Error::TooManyRedirects {
            slot,
            hops: MAX_REDIRECTS,
            addr,
        })
    }
}

impl Drop for KvClient {
    fn drop(&mut self) {
        if let Some(task) = locked(&self.task).take() {
            task.abort();
        }
        // Nobody to report a detach error to; the kernel drops the locks at exit anyway.
        let _ = self.inner.shut_down();
    }
}

impl Inner {
    /// The current snapshot (without looking at the segment).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the snapshot and returns it.
    pub fn set_snapshot(&self, snapshot: Snapshot) -> Arc<Snapshot> {
        let snapshot = Arc::new(snapshot);
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = snapshot.clone();
        snapshot
    }

    /// The client's role.
    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Acquire) {
            r if r == Role::Owner as u8 => Role::Owner,
            r if r == Role::Follower as u8 => Role::Follower,
            r if r == Role::Local as u8 => Role::Local,
            _ => Role::Closed,
        }
    }

    /// Sets the client's role.
    pub fn set_role(&self, role: Role) {
        self.role.store(role as u8, Ordering::Release);
    }

    /// Records a `MOVED` in the local map (so the next command goes straight there) and asks
    /// for a refresh.
    fn note_moved(&self, slot: u16, to: &str) {
        let snap = self.snapshot();
        if snap.map.node_for_slot(slot) != Some(to) {
            let mut map = snap.map.clone();
            map.set_slot(slot, to);
            self.set_snapshot(Snapshot {
                seen_generation: snap.seen_generation,
                map,
            });
        }
        self.request_refresh();
    }

    /// Closes the client's shared state: idempotent, synchronous (so `Drop` can use it).
    pub fn shut_down(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.set_role(Role::Closed);
        self.release_ownership();
        let detached = match &self.shared {
            Some(shared) => locked(&shared.membership)
                .take()
                .map(Membership::detach)
                .transpose()
                .map(drop),
            None => Ok(()),
        };
        self.pool.clear();
        detached
    }
}

/// A redirection target with an empty host means the host we asked.
fn with_host(to: &str, asked: &str) -> String {
    match (to.strip_prefix(':'), split_addr(asked)) {
        (Some(port), Some((host, _))) => format!("{host}:{port}"),
        _ => to.to_string(),
    }
}

fn unexpected(addr: String, command: &'static str, reply: &Value) -> Error {
    Error::Command {
        addr,
        command,
        source: redis::RedisError::from((
            ErrorKind::UnexpectedReturnType,
            "unexpected reply",
            format!("{reply:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_hosts() {
        assert_eq!(with_host(":7001", "10.0.0.1:7000"), "10.0.0.1:7001");
        assert_eq!(with_host("10.0.0.2:7001", "10.0.0.1:7000"), "10.0.0.2:7001");
    }
}
