//! `watch` (PM2's `--watch`): an app whose files change is rolled through a normal rolling
//! reload, once the changes have stopped for `watch_delay`.
//!
//! Each watched app has a thread of its own (`clusterd-watch`) that owns a `notify` watcher
//! (inotify, with notify's own reading thread). The event loop never waits on it: the thread
//! sends one [`Event::FilesChanged`] per burst into an unbounded channel that the loop
//! `select!`s on ([`Watches::recv`]), and the core treats it as `clusterd reload APP` (a
//! change during a rollout is one more rollout after it).
//!
//! - **Debounce**: one quiet period per app, not per file: the reload is sent once nothing
//!   under the app's watch has changed for `watch_delay`, so a `git checkout` of 500 files is
//!   one reload however long it takes. (notify's debouncers keep a timer per file, which
//!   splits a burst that straddles one of their ticks into two batches.)
//! - **Recursion is ours**: every directory below a watched one gets a non-recursive inotify
//!   watch, except ignored ones (`node_modules`, `.git`...: notify's recursive mode would
//!   spend watches on them), and a directory created or moved in later gets its own. A
//!   watched file is watched through its directory, so an editor's save by rename is seen.
//! - **Ignored**: [`Ignore`], from `watch_ignore`, [`WATCH_IGNORE_DEFAULTS`] and the files
//!   clusterd itself writes (log files with their rotations, `run_dir`).
//! - **Lifecycle**: built from the manifest at start, after an upgrade (the new process builds
//!   them again: nothing of a watch crosses the exec; inotify descriptors are close-on-exec),
//!   and on SIGHUP for each app whose watch changed ([`Watches::update`]); dropping an
//!   [`AppWatch`] tells its thread to end, which closes its watcher. A change queued by a
//!   watch that has since been replaced is discarded.
//! - **Failures are warnings**: a watched path that does not exist, an inotify instance that
//!   cannot be made, or the inotify watch limit (`ENOSPC`: `fs.inotify.max_user_watches`)
//!   leave the app running, with what could be watched watched; the next SIGHUP builds such a
//!   watch again.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use clusterd_core::Event;
use clusterd_manifest::{AppConfig, LogTarget, Manifest, WATCH_IGNORE_DEFAULTS, WatchConfig};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// The watches of every app that has `watch`, and the channel their threads report on.
pub struct Watches {
    apps: HashMap<String, AppWatch>,
    next_id: u64,
    sender: UnboundedSender<(u64, Event)>,
    receiver: UnboundedReceiver<(u64, Event)>,
}

/// One app's watch: its thread is told to end when this is dropped.
struct AppWatch {
    /// Tells a change of this watch from one of a watch it replaced.
    id: u64,
    /// What it was built from, to tell whether a SIGHUP changed it.
    spec: Spec,
    stop: mpsc::Sender<Message>,
    /// Set by the thread when something could not be watched (a path missing, the watch
    /// limit): a SIGHUP then builds the watch again even if it did not change.
    incomplete: Arc<AtomicBool>,
}

impl Drop for AppWatch {
    fn drop(&mut self) {
        let _ = self.stop.send(Message::Stop);
    }
}

/// What an app's watch is made of.
#[derive(Debug, Clone, PartialEq)]
struct Spec {
    app: String,
    cwd: PathBuf,
    watch: WatchConfig,
    /// Files and directories clusterd writes (log files, the run directory).
    owned: Vec<PathBuf>,
}

/// What a watch thread receives.
enum Message {
    Fs(notify::Result<notify::Event>),
    Stop,
}

impl Watches {
    /// Starts a watch for every app of `manifest` that has `watch`.
    pub fn new(manifest: &Manifest) -> Watches {
        let (sender, receiver) = unbounded_channel();
        let mut watches = Watches {
            apps: HashMap::new(),
            next_id: 0,
            sender,
            receiver,
        };
        watches.update(manifest);
        watches
    }

    /// SIGHUP: stops the watches of apps that are gone or whose watch changed, and starts the
    /// new ones.
    pub fn update(&mut self, manifest: &Manifest) {
        let owned = owned_paths(manifest);
        let specs: HashMap<&String, Spec> = manifest
            .apps
            .iter()
            .filter_map(|(name, app)| Some((name, Spec::of(name, app, &owned)?)))
            .collect();
        self.apps.retain(|name, watch| {
            specs.get(name) == Some(&watch.spec) && !watch.incomplete.load(Ordering::Relaxed)
        });
        for (name, spec) in specs {
            if self.apps.contains_key(name) {
                continue;
            }
            self.next_id += 1;
            let id = self.next_id;
            if let Some(watch) = start(id, spec, self.sender.clone()) {
                self.apps.insert(name.clone(), watch);
            }
        }
    }

    /// The next burst of changes of a current watch, as the core's event.
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            let (id, event) = self.receiver.recv().await?;
            let Event::FilesChanged { app, .. } = &event else {
                continue;
            };
            if self.apps.get(app).is_some_and(|w| w.id == id) {
                return Some(event);
            }
        }
    }
}

impl Spec {
    fn of(name: &str, app: &AppConfig, owned: &[PathBuf]) -> Option<Spec> {
        Some(Spec {
            app: name.to_owned(),
            cwd: app.cwd.clone(),
            watch: app.watch.clone()?,
            owned: owned.to_vec(),
        })
    }
}

/// What clusterd writes that a watch must not take for a change: every log file of the
/// manifest (as files; a log directory's `*.log` files are ignored by the defaults) and the
/// run directory when the manifest names it.
fn owned_paths(manifest: &Manifest) -> Vec<PathBuf> {
    let logs = std::iter::once(&manifest.supervisor.log)
        .chain(manifest.apps.values().map(|app| &app.log))
        .filter_map(|log| match &log.target {
            Some(LogTarget::File(file)) => Some(file.clone()),
            _ => None,
        });
    let mut owned: Vec<PathBuf> = logs.chain(manifest.supervisor.run_dir.clone()).collect();
    owned.sort();
    owned.dedup();
    owned
}

/// Starts the thread of one app's watch.
fn start(id: u64, spec: Spec, sender: UnboundedSender<(u64, Event)>) -> Option<AppWatch> {
    let (stop, messages) = mpsc::channel();
    let events = stop.clone();
    let app = spec.app.clone();
    let thread_spec = spec.clone();
    let incomplete = Arc::new(AtomicBool::new(false));
    let thread_incomplete = Arc::clone(&incomplete);
    let spawned = std::thread::Builder::new()
        .name("clusterd-watch".into())
        .spawn(move || {
            // Opens and reads are dropped on notify's thread: no wake-up of this one.
            let handler = move |event: notify::Result<notify::Event>| {
                if event
                    .as_ref()
                    .is_ok_and(|e| !e.need_rescan() && !is_change(&e.kind))
                {
                    return;
                }
                let _ = events.send(Message::Fs(event));
            };
            match notify::recommended_watcher(handler) {
                Ok(watcher) => {
                    Thread::new(id, thread_spec, watcher, sender, thread_incomplete).run(&messages)
                }
                Err(error) => {
                    thread_incomplete.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        "{}: cannot watch files: {} (inotify instances are limited by \
                         fs.inotify.max_user_instances)",
                        thread_spec.app,
                        describe(&error)
                    )
                }
            }
        });
    match spawned {
        Ok(_) => Some(AppWatch {
            id,
            spec,
            stop,
            incomplete,
        }),
        Err(error) => {
            tracing::warn!("{app}: cannot watch files: no thread: {error}");
            None
        }
    }
}

/// A watch thread's state.
struct Thread {
    id: u64,
    spec: Spec,
    ignore: Ignore,
    watcher: notify::RecommendedWatcher,
    /// Watched directories, each with everything below it.
    dirs: Vec<PathBuf>,
    /// Watched files (through their directories).
    files: Vec<PathBuf>,
    sender: UnboundedSender<(u64, Event)>,
    /// The changes since the last reload: the first path, every distinct path, and when the
    /// last one came.
    pending: Option<(PathBuf, HashSet<PathBuf>, Instant)>,
    /// The watch limit was reported already.
    limit_reported: bool,
    /// Something could not be watched (see [`AppWatch`]).
    incomplete: Arc<AtomicBool>,
}

impl Thread {
    fn new(
        id: u64,
        spec: Spec,
        watcher: notify::RecommendedWatcher,
        sender: UnboundedSender<(u64, Event)>,
        incomplete: Arc<AtomicBool>,
    ) -> Thread {
        let patterns = spec.watch.ignore.iter().map(String::as_str);
        let ignore = Ignore::new(
            &spec.cwd,
            WATCH_IGNORE_DEFAULTS.iter().copied().chain(patterns),
            &spec.owned,
        )
        // The manifest checked every pattern.
        .unwrap_or_else(|error| {
            tracing::warn!("{}: watch_ignore: {error}", spec.app);
            Ignore::default()
        });
        Thread {
            id,
            spec,
            ignore,
            watcher,
            dirs: Vec::new(),
            files: Vec::new(),
            sender,
            pending: None,
            limit_reported: false,
            incomplete,
        }
    }

    fn run(mut self, messages: &mpsc::Receiver<Message>) {
        self.watch_roots();
        loop {
            let message = match &self.pending {
                Some((_, _, last)) => {
                    let due = *last + self.spec.watch.delay;
                    match messages.recv_timeout(due.saturating_duration_since(Instant::now())) {
                        Ok(message) => message,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            self.send();
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                None => match messages.recv() {
                    Ok(message) => message,
                    Err(_) => return,
                },
            };
            match message {
                Message::Stop => return,
                Message::Fs(Ok(event)) => self.on_event(event),
                Message::Fs(Err(error)) => self.on_error(&error),
            }
        }
    }

    /// Watches every path of `watch` that exists.
    fn watch_roots(&mut self) {
        let mut parents = HashSet::new();
        for path in self.spec.watch.paths.clone() {
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => {
                    self.dirs.push(path.clone());
                    self.watch_tree(&path);
                }
                Ok(_) => {
                    let parent = path.parent().unwrap_or(Path::new("/")).to_path_buf();
                    self.files.push(path);
                    if parents.insert(parent.clone()) {
                        self.add(&parent);
                    }
                }
                Err(error) => {
                    self.incomplete.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        "{}: watch: {}: {error}; not watched (a SIGHUP or an upgrade looks again)",
                        self.spec.app,
                        path.display()
                    )
                }
            }
        }
    }

    /// Watches `dir` and every directory below it that is not ignored.
    fn watch_tree(&mut self, dir: &Path) {
        let root = self.root_of(dir).unwrap_or(dir).to_path_buf();
        let walk = walkdir::WalkDir::new(dir)
            .into_iter()
            .filter_entry(|entry| {
                entry.file_type().is_dir() && !self.ignore.ignores(&root, entry.path())
            });
        let dirs: Vec<PathBuf> = walk.filter_map(Result::ok).map(|e| e.into_path()).collect();
        for dir in dirs {
            if !self.add(&dir) {
                return;
            }
        }
    }

    /// Adds an inotify watch of `dir` (its entries, not below); false once the watch limit is
    /// reached.
    fn add(&mut self, dir: &Path) -> bool {
        match self.watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => true,
            Err(error) if matches!(error.kind, notify::ErrorKind::MaxFilesWatch) => {
                self.on_error(&error.add_path(dir.to_path_buf()));
                false
            }
            // Gone meanwhile, or unreadable: nothing to watch there.
            Err(error) => {
                tracing::debug!("{}: watch: {}", self.spec.app, describe(&error));
                true
            }
        }
    }

    fn on_error(&mut self, error: &notify::Error) {
        if matches!(error.kind, notify::ErrorKind::MaxFilesWatch) {
            if !self.limit_reported {
                self.limit_reported = true;
                self.incomplete.store(true, Ordering::Relaxed);
                let limit = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_else(|_| "?".into());
                tracing::warn!(
                    "{}: watch: the inotify watch limit is reached (fs.inotify.max_user_watches \
                     = {limit}): {} and what is created after it are not watched; raise it \
                     (sysctl) and send SIGHUP, or add watch_ignore patterns",
                    self.spec.app,
                    error
                        .paths
                        .first()
                        .map_or_else(|| "some directories".into(), |p| p.display().to_string())
                );
            }
            return;
        }
        tracing::warn!("{}: watch: {}", self.spec.app, describe(error));
    }

    fn on_event(&mut self, event: notify::Event) {
        if event.need_rescan() {
            // The kernel's queue overflowed: something changed, where is unknown.
            if let Some(root) = self.dirs.first().or(self.files.first()).cloned() {
                self.record(root);
            }
            return;
        }
        if !is_change(&event.kind) {
            return;
        }
        let created = matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Modify(notify::event::ModifyKind::Name(_))
        );
        for path in event.paths {
            let Some(root) = self.root_of(&path) else {
                continue;
            };
            if self.ignore.ignores(root, &path) {
                continue;
            }
            let is_dir_root = self.dirs.iter().any(|d| d == root);
            if created && is_dir_root && path.is_dir() {
                self.watch_tree(&path);
            }
            self.record(path);
        }
    }

    /// The watched path that `path` is or is below.
    fn root_of(&self, path: &Path) -> Option<&Path> {
        self.files
            .iter()
            .find(|f| *f == path)
            .or_else(|| self.dirs.iter().find(|d| path.starts_with(d)))
            .map(PathBuf::as_path)
    }

    fn record(&mut self, path: PathBuf) {
        let now = Instant::now();
        match &mut self.pending {
            Some((_, paths, last)) => {
                paths.insert(path);
                *last = now;
            }
            None => self.pending = Some((path.clone(), HashSet::from([path]), now)),
        }
    }

    /// The burst is over: the reload.
    fn send(&mut self) {
        let Some((first, paths, _)) = self.pending.take() else {
            return;
        };
        let shown = first.strip_prefix(&self.spec.cwd).unwrap_or(&first);
        let event = Event::FilesChanged {
            app: self.spec.app.clone(),
            path: shown.display().to_string(),
            count: paths.len(),
        };
        let _ = self.sender.send((self.id, event));
    }
}

/// Whether an inotify event is a change of content or of the tree (not an open or a read).
fn is_change(kind: &EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Modify(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    }
}

/// A notify error with its paths.
fn describe(error: &notify::Error) -> String {
    match error.paths.first() {
        Some(path) => format!("{}: {error}", path.display()),
        None => error.to_string(),
    }
}

/// What a watch does not count as a change.
#[derive(Debug, Default)]
pub(crate) struct Ignore {
    /// Patterns without `/`: matched against each name below the watched directory.
    names: GlobSet,
    /// Patterns with `/`: matched against the whole path (relative ones made absolute against
    /// the app's `cwd`), and everything below it.
    paths: GlobSet,
    /// What clusterd writes: these paths, what is below them, and their rotations (`F.1`...).
    owned: Vec<PathBuf>,
}

impl Ignore {
    /// The rules of `patterns` (glob patterns), relative to `cwd`, and of the paths clusterd
    /// writes.
    pub(crate) fn new<'p>(
        cwd: &Path,
        patterns: impl IntoIterator<Item = &'p str>,
        owned: &[PathBuf],
    ) -> Result<Ignore, globset::Error> {
        let glob = |pattern: &str| GlobBuilder::new(pattern).literal_separator(true).build();
        let mut names = GlobSetBuilder::new();
        let mut paths = GlobSetBuilder::new();
        for pattern in patterns {
            let pattern = pattern.trim_end_matches('/');
            if !pattern.contains('/') {
                names.add(glob(pattern)?);
                continue;
            }
            let absolute = if pattern.starts_with('/') {
                pattern.to_owned()
            } else {
                let pattern = pattern.trim_start_matches("./");
                format!("{}/{pattern}", globset::escape(&cwd.to_string_lossy()))
            };
            paths.add(glob(&absolute)?);
            paths.add(glob(&format!("{absolute}/**"))?);
        }
        Ok(Ignore {
            names: names.build()?,
            paths: paths.build()?,
            owned: owned.to_vec(),
        })
    }

    /// Whether a change of `path`, which is `root` (a watched file or directory) or below it,
    /// is ignored. A watched path itself is never ignored by a name pattern.
    pub(crate) fn ignores(&self, root: &Path, path: &Path) -> bool {
        if self.owned.iter().any(|owned| is_owned(owned, path)) || self.paths.is_match(path) {
            return true;
        }
        path.strip_prefix(root)
            .unwrap_or(Path::new(""))
            .components()
            .any(|c| matches!(c, Component::Normal(name) if self.names.is_match(name)))
    }
}

/// Whether `path` is `owned`, below it, or one of its rotations (`owned.N`).
fn is_owned(owned: &Path, path: &Path) -> bool {
    if path.starts_with(owned) {
        return true;
    }
    let (Some(name), Some(rotated)) = (owned.file_name(), path.file_name()) else {
        return false;
    };
    path.parent() == owned.parent()
        && rotated
            .to_string_lossy()
            .strip_prefix(&*name.to_string_lossy())
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(extra: &[&'static str], owned: &[&str]) -> Ignore {
        let owned: Vec<PathBuf> = owned.iter().map(PathBuf::from).collect();
        let patterns = WATCH_IGNORE_DEFAULTS.iter().chain(extra).copied();
        Ignore::new(Path::new("/srv/app"), patterns, &owned).expect("valid patterns")
    }

    #[test]
    fn the_defaults_ignore_dependencies_version_control_logs_and_swap_files() {
        let ignore = defaults(&[], &[]);
        let root = Path::new("/srv/app");
        for ignored in [
            "/srv/app/node_modules",
            "/srv/app/node_modules/express/index.js",
            "/srv/app/lib/node_modules/x.js",
            "/srv/app/.git/index",
            "/srv/app/.git",
            "/srv/app/.clusterd/app/control.sock",
            "/srv/app/__pycache__/app.cpython-312.pyc",
            "/srv/app/web.log",
            "/srv/app/logs/web.log.3",
            "/srv/app/.app.js.swp",
            "/srv/app/app.js~",
        ] {
            assert!(ignore.ignores(root, Path::new(ignored)), "{ignored}");
        }
        for counted in [
            "/srv/app/app.js",
            "/srv/app/src/lib/util.js",
            "/srv/app/node_modules.js",
            "/srv/app/.gitignore",
            "/srv/app/catalog",
            "/srv/app/web.log.old",
            "/srv/app/src",
        ] {
            assert!(!ignore.ignores(root, Path::new(counted)), "{counted}");
        }
    }

    #[test]
    fn names_are_matched_below_the_watched_path_only() {
        let ignore = defaults(&[], &[]);
        // An app that lives under a directory named like an ignored one still counts.
        let root = Path::new("/home/me/node_modules/mine");
        assert!(!ignore.ignores(root, Path::new("/home/me/node_modules/mine/index.js")));
        assert!(ignore.ignores(root, Path::new("/home/me/node_modules/mine/node_modules/x")));
        // A watched file is never ignored by name.
        let file = Path::new("/srv/app/debug.log");
        assert!(!ignore.ignores(file, file));
    }

    #[test]
    fn patterns_with_a_slash_are_paths_relative_to_the_cwd_and_cover_what_is_below() {
        let ignore = defaults(
            &["src/generated", "./dist/", "*.tmp", "/etc/app/*.bak"],
            &[],
        );
        let root = Path::new("/srv/app");
        for ignored in [
            "/srv/app/src/generated",
            "/srv/app/src/generated/api/client.js",
            "/srv/app/dist/bundle.js",
            "/srv/app/src/x.tmp",
            "/etc/app/conf.bak",
        ] {
            assert!(ignore.ignores(root, Path::new(ignored)), "{ignored}");
        }
        for counted in [
            "/srv/app/generated/x.js",
            "/srv/app/lib/src/generated/x.js",
            "/srv/app/src/generated.js",
            "/srv/app/distro/x.js",
            "/etc/app/sub/conf.bak",
        ] {
            assert!(!ignore.ignores(root, Path::new(counted)), "{counted}");
        }
    }

    #[test]
    fn what_clusterd_writes_is_ignored_with_its_rotations() {
        let ignore = defaults(&[], &["/srv/app/all.out", "/srv/app/run"]);
        let root = Path::new("/srv/app");
        for ignored in [
            "/srv/app/all.out",
            "/srv/app/all.out.1",
            "/srv/app/all.out.12",
            "/srv/app/run/clusterd.pid",
        ] {
            assert!(ignore.ignores(root, Path::new(ignored)), "{ignored}");
        }
        for counted in [
            "/srv/app/all.out.x",
            "/srv/app/all.out.",
            "/srv/app/all.outs",
            "/srv/app/runner.js",
        ] {
            assert!(!ignore.ignores(root, Path::new(counted)), "{counted}");
        }
    }

    #[test]
    fn a_cwd_with_glob_characters_is_taken_literally() {
        let ignore = Ignore::new(Path::new("/srv/[app]"), ["dist/*"], &[]).expect("valid");
        let root = Path::new("/srv/[app]");
        assert!(ignore.ignores(root, Path::new("/srv/[app]/dist/x.js")));
        assert!(!ignore.ignores(root, Path::new("/srv/a/dist/x.js")));
    }

    #[test]
    fn only_changes_count_not_opens_or_reads() {
        use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, ModifyKind};
        assert!(is_change(&EventKind::Create(CreateKind::File)));
        assert!(is_change(&EventKind::Modify(ModifyKind::Data(
            DataChange::Any
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
    }
}
