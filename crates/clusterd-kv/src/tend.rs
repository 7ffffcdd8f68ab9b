//! Keeping a client's cluster map current: taking the tend lock (now or, through a blocked
//! waiter thread, the moment it frees), tending and publishing as the owner, following the
//! segment's generation as a follower, and refreshing alone when the owner looks hung.
//!
//! One tokio task per client runs the loop of its role; two small OS threads do the blocking
//! waits the kernel offers and tokio does not: the follower's `flock(LOCK_EX)` (woken by the
//! kernel the instant the owner closes or dies) and the owner's futex wait on the segment's
//! refresh-request word (woken by any follower that got a `MOVED`).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::client::{Inner, Snapshot};
use crate::error::{Error, Result};
use crate::layout::{STATE_NO_OWNER, STATE_TENDING};
use crate::map::ClusterMap;
use crate::mapping::Mapping;
use crate::segment::Membership;
use crate::seqlock::{self, ReadError};
use crate::stats::{Role, bump};
use crate::sys::{futex_wait, futex_wake_all, monotonic_micros};
use crate::tend_lock::{self, TendLock};
use crate::tend_notify::TendNotifier;
use crate::topology;

/// What a lock-waiter thread hands over: the lock and when (CLOCK_MONOTONIC µs) it got it.
type Acquired = io::Result<(TendLock, u64)>;

/// A client's share of a segment.
pub struct SharedMap {
    /// The mapped segment (also held by this client's helper threads).
    pub mapping: Arc<Mapping>,
    /// Membership, until detached by `close`.
    pub membership: Mutex<Option<Membership>>,
    /// The tend-lock file beside the segment.
    lock_path: PathBuf,
    /// The tend lock, while this client is the owner. Publishing happens under this mutex, so
    /// nothing is published after the lock is released.
    tend_lock: Mutex<Option<TendLock>>,
    /// Stop flag of the owner's refresh-request watcher thread.
    watcher_stop: Mutex<Option<Arc<AtomicBool>>>,
    /// Tells the supervisor (`NOTIFY_SOCKET`) when this client owns or releases the lock.
    notifier: TendNotifier,
}

impl SharedMap {
    /// Wraps a fresh attachment.
    pub fn new(mapping: Mapping, membership: Membership) -> Self {
        SharedMap {
            notifier: TendNotifier::from_env(membership.path()),
            lock_path: crate::identity::lock_path(membership.path()),
            mapping: Arc::new(mapping),
            membership: Mutex::new(Some(membership)),
            tend_lock: Mutex::new(None),
            watcher_stop: Mutex::new(None),
        }
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked.
pub fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the client's map keeping: returns once the client has a map to route by, with the
/// task that keeps it current.
pub async fn start(inner: &Arc<Inner>) -> Result<tokio::task::JoinHandle<()>> {
    let Some(shared) = &inner.shared else {
        inner.tend_once().await?;
        return Ok(tokio::spawn(run_tender(inner.clone())));
    };
    let lock_file_path = &shared.lock_path;
    let file = tend_lock::open(lock_file_path)?;
    match tend_lock::try_acquire(file, lock_file_path)? {
        Ok(lock) => {
            inner.become_owner(lock, monotonic_micros());
            inner.tend_once().await?;
            Ok(tokio::spawn(run_tender(inner.clone())))
        }
        Err(file) => {
            let acquired = spawn_lock_waiter(file, lock_file_path)?;
            inner.set_role(Role::Follower);
            inner.wait_first_map().await?;
            Ok(tokio::spawn(run_follower(inner.clone(), acquired)))
        }
    }
}

/// The owner's (or a client without shared memory's) loop: tend every interval, and at once
/// when a refresh is requested.
async fn run_tender(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(inner.options.get_tend_interval()) => {}
            _ = inner.refresh.notified() => {}
        }
        if let Err(e) = inner.tend_once().await {
            tracing::warn!(error = %e.report(), "tending the cluster map failed");
        }
    }
}

/// A follower's loop: take over when the waiter thread gets the lock; meanwhile watch the
/// owner's heartbeat and refresh alone while it is stale.
async fn run_follower(inner: Arc<Inner>, mut acquired: oneshot::Receiver<Acquired>) {
    let mut waiting = true;
    loop {
        tokio::select! {
            got = &mut acquired, if waiting => {
                waiting = false;
                match got {
                    Ok(Ok((lock, since_us))) => {
                        if !inner.become_owner(lock, since_us) {
                            return; // closed meanwhile; the lock was dropped
                        }
                        if let Err(e) = inner.tend_once().await {
                            tracing::warn!(error = %e.report(), "first tend after takeover failed");
                        }
                        return run_tender(inner).await;
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "waiting for the tend lock failed; following only"),
                    Err(_) => tracing::warn!("the tend-lock waiter thread is gone; following only"),
                }
            }
            _ = tokio::time::sleep(inner.options.get_tend_interval()) => {}
            _ = inner.refresh.notified() => {}
        }
        if inner.owner_hung() {
            if let Err(e) = inner.self_refresh().await {
                tracing::warn!(error = %e.report(), "refreshing the map without the owner failed");
            }
        }
    }
}

/// Blocks a thread in `flock(LOCK_EX)`; the kernel wakes it when the owner releases the lock
/// or dies. If the client has closed by then, the receiver is gone and the lock is dropped
/// at once.
fn spawn_lock_waiter(file: File, path: &Path) -> Result<oneshot::Receiver<Acquired>> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("kv-tend-lock".into())
        .spawn(move || {
            let acquired = tend_lock::acquire_blocking(file).map(|l| (l, monotonic_micros()));
            let _ = tx.send(acquired);
        })
        .map_err(|e| Error::io(path, "starting the tend-lock waiter thread", e))?;
    Ok(rx)
}

/// The owner's thread that turns followers' futex wakes on `refresh_requests` into a
/// refresh of this client's tender.
fn spawn_request_watcher(inner: Arc<Inner>, mapping: Arc<Mapping>, stop: Arc<AtomicBool>) {
    let interval = inner.options.get_tend_interval();
    let spawned = std::thread::Builder::new()
        .name("kv-refresh-req".into())
        .spawn(move || {
            let word = &mapping.view().header.refresh_requests;
            let mut seen = word.load(Ordering::Acquire);
            while !stop.load(Ordering::Acquire) {
                futex_wait(word, seen, interval);
                let now = word.load(Ordering::Acquire);
                if now != seen && !stop.load(Ordering::Acquire) {
                    seen = now;
                    inner.refresh.notify_one();
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no refresh-request watcher: followers' requests wait for the next tend");
    }
}

impl Inner {
    /// The map to route by: the local snapshot, re-copied from the segment only when the
    /// segment's generation has moved since.
    pub fn current_map(&self) -> Arc<Snapshot> {
        let snap = self.snapshot();
        let Some(shared) = &self.shared else {
            return snap;
        };
        let view = shared.mapping.view();
        let generation = seqlock::generation(view);
        if generation == snap.seen_generation {
            return snap;
        }
        match seqlock::read(view) {
            Ok((generation, map)) => {
                bump(&self.counters.snapshot_copies);
                self.set_snapshot(Snapshot {
                    seen_generation: generation,
                    map,
                })
            }
            Err(ReadError::Corrupt(reason)) => {
                tracing::warn!(%reason, generation, "ignoring a corrupt map in the segment");
                // Do not retry this generation on every command.
                self.set_snapshot(Snapshot {
                    seen_generation: generation,
                    map: snap.map.clone(),
                })
            }
            Err(ReadError::Contended | ReadError::NothingPublished) => snap,
        }
    }

    /// One tend round: heartbeat, read the topology, and publish it (owner) or adopt it
    /// (no shared memory).
    pub async fn tend_once(&self) -> Result<()> {
        if let Some(shared) = &self.shared {
            if let Some(_held) = locked(&shared.tend_lock).as_ref() {
                let now_ms = monotonic_micros() / 1000;
                shared
                    .mapping
                    .view()
                    .header
                    .heartbeat_ms
                    .store(now_ms, Ordering::Release);
                shared.notifier.owner();
            }
        }
        let map = self.fetch_topology().await?;
        bump(&self.counters.refreshes);
        match &self.shared {
            Some(shared) => self.publish(shared, map),
            None => {
                self.set_snapshot(Snapshot {
                    seen_generation: 0,
                    map,
                });
                Ok(())
            }
        }
    }

    /// Publishes `map` if this client still holds the tend lock and the segment does not
    /// already hold the same map.
    fn publish(&self, shared: &SharedMap, map: ClusterMap) -> Result<()> {
        let held = locked(&shared.tend_lock);
        if held.is_none() {
            return Ok(());
        }
        let view = shared.mapping.view();
        if let Ok((generation, published)) = seqlock::read(view) {
            if published == map {
                if self.snapshot().seen_generation != generation {
                    self.set_snapshot(Snapshot {
                        seen_generation: generation,
                        map,
                    });
                }
                return Ok(());
            }
        }
        let generation = seqlock::publish(view, &map)?;
        bump(&self.counters.publishes);
        self.set_snapshot(Snapshot {
            seen_generation: generation,
            map,
        });
        Ok(())
    }

    /// A follower's own topology read, when the owner looks hung.
    pub async fn self_refresh(&self) -> Result<()> {
        let generation = self
            .shared
            .as_ref()
            .map_or(0, |s| seqlock::generation(s.mapping.view()));
        let map = self.fetch_topology().await?;
        bump(&self.counters.refreshes);
        bump(&self.counters.self_refreshes);
        self.set_snapshot(Snapshot {
            seen_generation: generation,
            map,
        });
        Ok(())
    }

    async fn fetch_topology(&self) -> Result<ClusterMap> {
        let mut candidates: Vec<String> = self.snapshot().map.nodes().to_vec();
        for seed in self.options.seeds() {
            if !candidates.contains(seed) {
                candidates.push(seed.clone());
            }
        }
        topology::fetch(
            &self.pool,
            &candidates,
            &self.shards_supported,
            &self.counters.topology_commands,
        )
        .await
    }

    /// Whether the owner's heartbeat is older than the stale threshold.
    pub fn owner_hung(&self) -> bool {
        let Some(shared) = &self.shared else {
            return false;
        };
        let beat_ms = shared
            .mapping
            .view()
            .header
            .heartbeat_ms
            .load(Ordering::Acquire);
        let age_ms = (monotonic_micros() / 1000).saturating_sub(beat_ms);
        u128::from(age_ms) > self.options.stale_threshold().as_millis()
    }

    /// Waits (bounded) for the owner's first publish, or reads the topology itself.
    async fn wait_first_map(&self) -> Result<()> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let mapping = shared.mapping.clone();
        let limit = self.options.connect_timeout_value() + self.options.command_timeout_value();
        let waited = tokio::task::spawn_blocking(move || {
            let generation = &mapping.view().header.generation;
            let deadline = Instant::now() + limit;
            while generation.load(Ordering::Acquire) == 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                futex_wait(generation, 0, left);
            }
        })
        .await;
        if let Err(e) = waited {
            tracing::warn!(error = %e, "waiting for the first map failed");
        }
        if self.current_map().map.served_slots() == 0 {
            tracing::warn!("no map published in time; reading the topology directly");
            self.self_refresh().await?;
        }
        Ok(())
    }

    /// Installs `lock` and claims ownership in the header; `false` (and the lock dropped) if
    /// the client closed meanwhile.
    pub fn become_owner(self: &Arc<Self>, lock: TendLock, since_us: u64) -> bool {
        let Some(shared) = &self.shared else {
            return false;
        };
        let mut held = locked(&shared.tend_lock);
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let h = shared.mapping.view().header;
        let epoch = h.owner_epoch.fetch_add(1, Ordering::Relaxed) + 1;
        h.owner_pid
            .store(std::process::id() as i32, Ordering::Relaxed);
        h.owner_since_us.store(since_us, Ordering::Relaxed);
        h.heartbeat_ms
            .store(monotonic_micros() / 1000, Ordering::Relaxed);
        h.state.store(STATE_TENDING, Ordering::Release);
        *held = Some(lock);
        shared.notifier.owner();
        drop(held);
        self.set_role(Role::Owner);
        bump(&self.counters.takeovers);
        let stop = Arc::new(AtomicBool::new(false));
        *locked(&shared.watcher_stop) = Some(stop.clone());
        spawn_request_watcher(self.clone(), shared.mapping.clone(), stop);
        tracing::info!(
            epoch,
            pid = std::process::id(),
            "became the cluster map's tend owner"
        );
        true
    }

    /// Gives up ownership, if held: marks the header ownerless, stops the watcher thread and
    /// drops the lock (the kernel wakes a waiting follower at once).
    pub fn release_ownership(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        let mut held = locked(&shared.tend_lock);
        let Some(lock) = held.take() else {
            return;
        };
        let h = shared.mapping.view().header;
        h.state.store(STATE_NO_OWNER, Ordering::Release);
        h.owner_pid.store(0, Ordering::Relaxed);
        if let Some(stop) = locked(&shared.watcher_stop).take() {
            stop.store(true, Ordering::Release);
            h.refresh_requests.fetch_add(1, Ordering::AcqRel);
            futex_wake_all(&h.refresh_requests);
        }
        drop(lock);
        shared.notifier.released();
    }

    /// Asks for a refresh after a redirection: this client's own loop is woken, and a
    /// follower also asks the owner (at most once per 5 ms).
    pub fn request_refresh(&self) {
        self.refresh.notify_one();
        let Some(shared) = &self.shared else {
            return;
        };
        if self.role() != Role::Follower {
            return;
        }
        let now = monotonic_micros();
        let last = self.last_refresh_request_us.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 5_000
            || self
                .last_refresh_request_us
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let h = shared.mapping.view().header;
        h.refresh_requests.fetch_add(1, Ordering::AcqRel);
        futex_wake_all(&h.refresh_requests);
        bump(&self.counters.refresh_requests);
    }
}
