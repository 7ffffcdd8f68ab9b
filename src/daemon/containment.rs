//! What holds a worker and everything it starts, so that nothing escapes a stop, a kill or
//! clusterd's own death.
//!
//! - **cgroup v2**, where clusterd may create cgroups (root, or systemd's `Delegate=yes`), laid
//!   out as systemd lays out a delegated unit: in the cgroup clusterd starts in (the *base*:
//!   the `0::` line of `/proc/self/cgroup`, under the cgroup2 mount found in
//!   `/proc/self/mountinfo`; pure v2 at `/sys/fs/cgroup` and the hybrid layout at
//!   `/sys/fs/cgroup/unified` alike) a tree `clusterd-<key>`, into whose leaf `supervisor`
//!   clusterd moves itself, beside one cgroup `w-<worker>` per worker. So the tree holds no
//!   process of its own and controllers can be enabled for the workers (`memory`, where the
//!   base offers it: then [`Containment::memory_current`] reads a worker's `memory.current`).
//!   Moving itself is also the proof that a process can join a cgroup there. The worker's
//!   child process joins its cgroup right after `fork`, before it can start anything (see
//!   `SpawnSpec::cgroup_procs`), so a descendant that calls `setsid` or double-forks is still
//!   inside: `cgroup.kill` ends all of them, `cgroup.events` says when they are gone. A worker
//!   whose join failed anyway is contained by its process group, and [`Containment::describe`]
//!   says which and why ([`Containment::check_joined`]). The key is stable for a run
//!   directory, so a start after a SIGKILLed run finds and empties what that run left behind
//!   ([`Containment::sweep_leftovers`]); a resumed upgrade finds itself in the leaf already.
//! - **Not in a cgroup systemd owns**: a base that is a systemd unit's cgroup (`*.service`,
//!   `*.scope`) without delegation (no `trusted.delegate`/`user.delegate` xattr, and not
//!   handed to our own non-root user) is left alone, and the reason says so ([`may_use`]).
//! - **Process groups** otherwise (no cgroup2, not ours, not writable, no `cgroup.kill` before
//!   Linux 5.14, or any other error, with the reason kept for status): each worker leads its
//!   own group, and the processes re-parented to clusterd (a child subreaper) that are not
//!   workers are found by [`adopted_orphans`] and killed at shutdown.
//!
//! Nothing here runs between `fork` and `exec`; the child's part is one `write` of `"0"` to
//! the descriptor [`Containment::prepare_worker`] opened.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// How long a sweep waits for killed leftovers to be gone.
const SWEEP_WAIT: Duration = Duration::from_secs(5);

/// A cgroup operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}", path.display())]
pub struct ContainmentError {
    /// What was being done.
    pub what: &'static str,
    /// The cgroup file or directory.
    pub path: PathBuf,
    /// The error.
    #[source]
    pub cause: io::Error,
}

fn error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ContainmentError {
    let path = path.to_path_buf();
    move |cause| ContainmentError { what, path, cause }
}

/// How workers are contained, decided once at start.
#[derive(Debug)]
pub enum Containment {
    /// A cgroup v2 tree of clusterd's own, one child cgroup per worker.
    Cgroup(CgroupTree),
    /// Process groups (and the subreaper's orphans), because cgroups are not available.
    ProcessGroups {
        /// Why not cgroups.
        why: String,
    },
}

/// The cgroup directory `clusterd-<key>` holding clusterd's leaf and one cgroup per worker.
#[derive(Debug)]
pub struct CgroupTree {
    dir: PathBuf,
    /// Where clusterd itself is: `<dir>/supervisor`, or `None` when it stayed where it was
    /// (tests, which contain their children without moving themselves).
    leaf: Option<PathBuf>,
    /// The cgroup the tree is in.
    base: PathBuf,
    /// Whether the workers' cgroups have the memory controller.
    memory: bool,
    /// Workers whose process did not join their cgroup, and why: process groups for them.
    uncontained: BTreeMap<String, String>,
}

/// The leaf clusterd moves itself into, in its tree.
const LEAF: &str = "supervisor";

/// The controllers enabled for the workers' cgroups where the base offers them.
const CONTROLLERS: &[&str] = &["memory"];

/// Where clusterd's tree goes, decided from paths alone ([`plan`]).
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    /// The cgroup the tree is in: the one clusterd was started in.
    base: PathBuf,
    /// `<base>/clusterd-<key>`.
    tree: PathBuf,
    /// Whether clusterd must still move itself into `<tree>/supervisor` (not when a resumed
    /// upgrade finds itself there already).
    move_self: bool,
}

/// The plan for a clusterd whose cgroup is `own`, with tree name `name` (`clusterd-<key>`).
fn plan(own: &Path, name: &str) -> Plan {
    let parent = own.parent();
    let in_leaf = own.file_name().is_some_and(|n| n == LEAF)
        && parent.and_then(Path::file_name).is_some_and(|n| n == name);
    match (in_leaf, parent.and_then(Path::parent)) {
        (true, Some(base)) => Plan {
            base: base.to_path_buf(),
            tree: own.parent().unwrap_or(own).to_path_buf(),
            move_self: false,
        },
        _ => Plan {
            base: own.to_path_buf(),
            tree: own.join(name),
            move_self: true,
        },
    }
}

/// Whether clusterd may create its tree in `base`: not in a systemd unit's cgroup (a name
/// ending in `.service` or `.scope`) that was not delegated to it (`delegated`: the
/// `trusted.delegate` or `user.delegate` xattr systemd 251+ sets for `Delegate=yes`, or the
/// cgroup handed to our own non-root user). Err: why not, for the log and status.
fn may_use(base: &Path, delegated: bool) -> Result<(), String> {
    let name = base.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let unit = name.ends_with(".service") || name.ends_with(".scope");
    if unit && !delegated {
        return Err(format!(
            "clusterd runs in cgroup {}, which systemd owns: without Delegate=yes (no \
             trusted.delegate or user.delegate xattr; systemd 251 or later sets it) clusterd \
             does not write into it",
            base.display()
        ));
    }
    Ok(())
}

/// The delegation facts of the cgroup `dir` (see [`may_use`]).
fn delegated(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let xattr = |name: &std::ffi::CStr| {
        let mut value = [0u8; 8];
        // SAFETY: valid C strings and a buffer of the size given.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        n > 0 && value[0] == b'1'
    };
    let me = nix::unistd::geteuid().as_raw();
    xattr(c"trusted.delegate")
        || xattr(c"user.delegate")
        || (me != 0 && fs::metadata(dir).is_ok_and(|m| m.uid() == me))
}

impl Containment {
    /// Decides how to contain workers, once at start: a cgroup tree `clusterd-<key>` in the
    /// cgroup clusterd was started in, if that cgroup is ours to write, the tree can be created
    /// and has `cgroup.kill`, and clusterd could move itself into its leaf `supervisor`;
    /// process groups otherwise. `key` is stable for a run directory (see [`key_for`]), so a
    /// new start finds what a SIGKILLed run left behind.
    pub fn detect(key: &str) -> Containment {
        let own = match own_cgroup_dir() {
            Ok(own) => own,
            Err(why) => return Containment::ProcessGroups { why },
        };
        let plan = plan(&own, &tree_name(key));
        if let Err(why) = may_use(&plan.base, delegated(&plan.base)) {
            return Containment::ProcessGroups { why };
        }
        Self::set_up(&plan, true)
    }

    /// Like [`Containment::detect`], with the tree created under `parent` (a cgroup2
    /// directory), and the calling process left where it is (for tests).
    #[cfg(test)]
    fn under(parent: &Path, key: &str) -> Containment {
        let plan = plan(parent, &tree_name(key));
        Self::set_up(&plan, false)
    }

    /// Creates the tree of `plan`, puts this process in its leaf if `in_leaf` (moving it
    /// unless it is there already), and enables the [`CONTROLLERS`] the base offers.
    fn set_up(plan: &Plan, in_leaf: bool) -> Containment {
        let move_self = in_leaf && plan.move_self;
        let name = plan.tree.file_name().and_then(|n| n.to_str()).unwrap_or("");
        // Runs that were killed leave their tree behind, empty once swept or once their
        // processes ended: remove those (a populated cgroup, or one with worker cgroups, is
        // never removed: the leaf of a running clusterd is populated; a running clusterd
        // recreates its tree when it needs it).
        for other in subdirectories(&plan.base) {
            if other
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("clusterd-") && n != name)
            {
                let _ = fs::remove_dir(other.join(LEAF));
                let _ = fs::remove_dir(&other);
            }
        }
        let dir = plan.tree.clone();
        let leaf = dir.join(LEAF);
        // Another clusterd starting may remove our tree or leaf while they are still empty:
        // create them again (a few times at most).
        let mut attempt = 0;
        let joined = loop {
            attempt += 1;
            let made = create(&dir).and_then(|()| match move_self {
                true => create(&leaf).and_then(|()| fs::write(leaf.join("cgroup.procs"), "0")),
                false => Ok(()),
            });
            match made {
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < 3 => continue,
                other => break other,
            }
        };
        if let Err(e) = joined {
            let what = match move_self && dir.exists() {
                true => format!("cannot move clusterd into cgroup {}", leaf.display()),
                false => format!("cannot create cgroup {}", dir.display()),
            };
            let _ = fs::remove_dir(&leaf);
            let _ = fs::remove_dir(&dir);
            return Containment::ProcessGroups {
                why: format!("{what}: {e}"),
            };
        }
        if !dir.join("cgroup.kill").exists() {
            // Back where it was, so that the tree can go.
            if move_self {
                let _ = fs::write(plan.base.join("cgroup.procs"), "0");
            }
            let _ = fs::remove_dir(&leaf);
            let _ = fs::remove_dir(&dir);
            return Containment::ProcessGroups {
                why: format!(
                    "{} has no cgroup.kill (Linux 5.14 or later needed)",
                    dir.display()
                ),
            };
        }
        let memory = enable_controllers(&plan.base, &dir).contains(&"memory");
        Containment::Cgroup(CgroupTree {
            dir,
            leaf: in_leaf.then_some(leaf),
            base: plan.base.clone(),
            memory,
            uncontained: BTreeMap::new(),
        })
    }

    /// For status and the log: `cgroup v2 (/sys/fs/cgroup/…/clusterd-…, …)` or `process
    /// groups (why)`, with the workers that are contained by their process group only.
    pub fn describe(&self) -> String {
        match self {
            Containment::Cgroup(tree) => {
                let mut text = format!("cgroup v2 ({}", tree.dir.display());
                if tree.leaf.is_some() {
                    text.push_str(", clusterd in supervisor");
                }
                text.push_str(match tree.memory {
                    true => ", memory controller on)",
                    false => ", no memory controller)",
                });
                for (worker, why) in &tree.uncontained {
                    text.push_str(&format!("; {worker} in its process group only: {why}"));
                }
                text
            }
            Containment::ProcessGroups { why } => format!("process groups ({why})"),
        }
    }

    /// Kills whatever a previous run with the same key left in the tree (`cgroup.kill`),
    /// waits (at most [`SWEEP_WAIT`]) until it is gone and removes the workers' cgroups.
    /// Returns `pid (command)` of each process killed, for the log. Call once at start, after
    /// the control socket proved that no other clusterd runs this run directory, and before
    /// binding sockets (leftovers may hold the ports). Nothing to do with process groups.
    pub fn sweep_leftovers(&self) -> Result<Vec<String>, ContainmentError> {
        let Containment::Cgroup(tree) = self else {
            return Ok(Vec::new());
        };
        // Every worker cgroup, not clusterd's own leaf.
        let workers: Vec<PathBuf> = subdirectories(&tree.dir)
            .into_iter()
            .filter(|dir| dir.file_name().is_none_or(|n| n != LEAF))
            .collect();
        let mut killed: Vec<String> = workers
            .iter()
            .flat_map(|dir| tree.pids_below(dir))
            .map(describe_pid)
            .collect();
        killed.sort();
        if !killed.is_empty() {
            for dir in &workers {
                let path = dir.join("cgroup.kill");
                fs::write(&path, "1").map_err(error("writing", &path))?;
            }
            let deadline = Instant::now() + SWEEP_WAIT;
            while workers.iter().any(|dir| populated(dir)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for worker in &workers {
            remove_tree(worker);
        }
        Ok(killed)
    }

    /// Removes the tree and the workers' cgroups in it, as far as they are empty. Call at
    /// exit, when every worker is gone: clusterd moves itself back into the base first (where
    /// the base has controllers enabled for its children it cannot, and the empty tree stays
    /// for the next start to remove).
    pub fn remove_all(&self) {
        if let Containment::Cgroup(tree) = self {
            if tree.leaf.is_some() {
                let _ = fs::write(tree.base.join("cgroup.procs"), "0");
            }
            remove_tree(&tree.dir);
        }
    }
}

/// Per worker: what the supervisor's driver calls (see each method).
impl Containment {
    /// Creates `worker`'s cgroup (empty) and opens its `cgroup.procs` for writing
    /// (`O_CLOEXEC`): pass the descriptor as `SpawnSpec::cgroup_procs`, and the worker's
    /// process joins the cgroup right after `fork`. `None` with process groups.
    ///
    /// `worker` names one worker process for its whole life, unique among the live ones —
    /// e.g. `web.2.17` (app, slot, a spawn serial): a replacement must not share a cgroup
    /// with the remains of the worker it replaces.
    pub fn prepare_worker(&self, worker: &str) -> Result<Option<OwnedFd>, ContainmentError> {
        let Containment::Cgroup(tree) = self else {
            return Ok(None);
        };
        let dir = tree.worker_dir(worker);
        // The tree itself may have been removed as empty by another clusterd starting: then
        // create it again (twice at most, in case that happens right in between).
        let mut created = fs::create_dir(&dir);
        for _ in 0..2 {
            if !matches!(&created, Err(e) if e.kind() == io::ErrorKind::NotFound) {
                break;
            }
            let _ = fs::create_dir(&tree.dir);
            created = fs::create_dir(&dir);
        }
        match created {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !populated(&dir) => {}
            Err(e) => return Err(error("creating cgroup", &dir)(e)),
        }
        let path = dir.join("cgroup.procs");
        let file = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(error("opening", &path))?;
        Ok(Some(file.into()))
    }

    /// Sends `sig` to `worker`: its process group `pgid`, and every process in its cgroup that
    /// left the group (`setsid`, `setpgid`), each exactly once. Errors (gone already) are
    /// ignored.
    pub fn signal(&self, worker: &str, pgid: Pid, sig: Signal) {
        let _ = killpg(pgid, sig);
        if let Some(tree) = self.tree_of(worker) {
            for pid in tree.pids_below(&tree.worker_dir(worker)) {
                if nix::unistd::getpgid(Some(pid)).is_ok_and(|g| g != pgid) {
                    let _ = kill(pid, sig);
                }
            }
        }
    }

    /// Kills `worker` and everything it started: `cgroup.kill` of its cgroup, and SIGKILL
    /// to its process group. Errors are ignored.
    pub fn kill(&self, worker: &str, pgid: Pid) {
        if let Some(tree) = self.tree_of(worker) {
            let _ = fs::write(tree.worker_dir(worker).join("cgroup.kill"), "1");
        }
        let _ = killpg(pgid, Signal::SIGKILL);
    }

    /// Whether nothing of `worker` runs any more: its cgroup is not populated (cgroup.events),
    /// or, with process groups, its group `pgid` has no member left (a zombie leader counts
    /// as a member until reaped).
    pub fn is_empty(&self, worker: &str, pgid: Pid) -> bool {
        match self.tree_of(worker) {
            Some(tree) => !populated(&tree.worker_dir(worker)),
            None => killpg(pgid, None).is_err(),
        }
    }

    /// Removes `worker`'s cgroup once it is empty (an `rmdir` of a populated cgroup fails and
    /// is ignored: call again when [`Containment::is_empty`]).
    pub fn remove_worker(&mut self, worker: &str) {
        if let Containment::Cgroup(tree) = self {
            tree.uncontained.remove(worker);
            remove_tree(&tree.worker_dir(worker));
        }
    }

    /// Right after `worker`'s spawn (process `pid`, exec'd): whether it joined its cgroup. If
    /// the child's join failed, clusterd moves it itself; if that fails too, the worker is
    /// contained by its process group from now on and [`Containment::describe`] says so. Err:
    /// why, for the log.
    pub fn check_joined(&mut self, worker: &str, pid: Pid) -> Result<(), String> {
        let Containment::Cgroup(tree) = self else {
            return Ok(());
        };
        let dir = tree.worker_dir(worker);
        let suffix = format!(
            "/{}/{}",
            tree.dir.file_name().and_then(|n| n.to_str()).unwrap_or(""),
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("")
        );
        let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        // Gone already (nothing to contain), or inside.
        if cgroup.is_empty()
            || cgroup
                .lines()
                .any(|l| l.starts_with("0::") && l.ends_with(&suffix))
        {
            return Ok(());
        }
        let path = dir.join("cgroup.procs");
        let why = match fs::write(&path, pid.to_string()) {
            Ok(()) => return Ok(()),
            Err(e) => format!("pid {pid} could not join cgroup {}: {e}", dir.display()),
        };
        tree.uncontained.insert(worker.to_owned(), why.clone());
        Err(why)
    }

    /// `worker`'s `memory.current` in bytes (everything its processes use, page cache
    /// included), where its cgroup has the memory controller; `None` otherwise.
    pub fn memory_current(&self, worker: &str) -> Option<u64> {
        let tree = self.tree_of(worker).filter(|tree| tree.memory)?;
        fs::read_to_string(tree.worker_dir(worker).join("memory.current"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `worker`'s cgroup directory, unless it is contained by its process group only.
    pub fn cgroup_dir(&self, worker: &str) -> Option<PathBuf> {
        Some(self.tree_of(worker)?.worker_dir(worker))
    }

    /// The tree `worker` is contained by, unless it is in its process group only.
    fn tree_of(&self, worker: &str) -> Option<&CgroupTree> {
        match self {
            Containment::Cgroup(tree) if !tree.uncontained.contains_key(worker) => Some(tree),
            _ => None,
        }
    }
}

/// `clusterd-<key>`.
fn tree_name(key: &str) -> String {
    format!("clusterd-{}", sanitize(key))
}

/// Creates the cgroup `dir`; one that exists already is fine.
fn create(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Enables the [`CONTROLLERS`] that `base` offers for the children of `tree`: in the base's
/// own `cgroup.subtree_control` first (not at the root of the hierarchy, which is the host's;
/// this fails while the base still has processes), then in the tree's. Returns those the
/// workers' cgroups have.
fn enable_controllers(base: &Path, tree: &Path) -> Vec<&'static str> {
    let listed = |file: PathBuf| -> Vec<String> {
        fs::read_to_string(file)
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let is_root = !base.join("cgroup.type").exists();
    let mut enabled = Vec::new();
    for controller in CONTROLLERS {
        let wanted = |c: &String| c == controller;
        if !is_root
            && listed(base.join("cgroup.controllers")).iter().any(wanted)
            && !listed(base.join("cgroup.subtree_control"))
                .iter()
                .any(wanted)
        {
            let _ = fs::write(
                base.join("cgroup.subtree_control"),
                format!("+{controller}"),
            );
        }
        if listed(tree.join("cgroup.controllers")).iter().any(wanted)
            && (listed(tree.join("cgroup.subtree_control"))
                .iter()
                .any(wanted)
                || fs::write(
                    tree.join("cgroup.subtree_control"),
                    format!("+{controller}"),
                )
                .is_ok())
        {
            enabled.push(*controller);
        }
    }
    enabled
}

impl CgroupTree {
    /// `w-<worker>`: never `.`/`..`, never the name of a cgroup interface file.
    fn worker_dir(&self, worker: &str) -> PathBuf {
        self.dir.join(format!("w-{}", sanitize(worker)))
    }

    /// Every pid in the cgroup `dir` and its descendants.
    fn pids_below(&self, dir: &Path) -> Vec<Pid> {
        let mut pids: Vec<Pid> = fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|p| *p > 0)
            .map(Pid::from_raw)
            .collect();
        for child in subdirectories(dir) {
            pids.extend(self.pids_below(&child));
        }
        pids
    }
}

/// A key for [`Containment::detect`] that is stable for a run directory: 16 hex digits of
/// the FNV-1a hash of its path.
pub fn key_for(run_dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let hash = run_dir
        .as_os_str()
        .as_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("{hash:016x}")
}

/// The processes re-parented to clusterd (a child subreaper: `ppid` is our pid) that are not
/// among `workers`: what escaped process-group containment. Kill them at shutdown. Best
/// effort: a process that exits meanwhile is not listed.
pub fn adopted_orphans(workers: &[Pid]) -> Vec<Pid> {
    let me = nix::unistd::getpid();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .map(Pid::from_raw)
        .filter(|pid| !workers.contains(pid))
        .filter(|pid| crate::daemon::procstat::ppid(*pid) == Some(me))
        .collect()
}

/// `pid (command)`.
fn describe_pid(pid: Pid) -> String {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    format!("{pid} ({})", comm.trim())
}

/// The cgroup v2 directory clusterd runs in.
fn own_cgroup_dir() -> Result<PathBuf, String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let cgroups = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    cgroup_dir(&mountinfo, &cgroups)
}

/// The directory of the cgroup named by the `0::` line of `cgroups` (`/proc/self/cgroup`),
/// under the cgroup2 mount of `mountinfo`.
fn cgroup_dir(mountinfo: &str, cgroups: &str) -> Result<PathBuf, String> {
    let (mount_root, mount_point) =
        cgroup2_mount(mountinfo).ok_or_else(|| "no cgroup2 file system is mounted".to_owned())?;
    let own = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| {
            "not in a cgroup v2 hierarchy (no 0:: line in /proc/self/cgroup)".to_owned()
        })?;
    let relative = Path::new(own).strip_prefix(&mount_root).map_err(|_| {
        format!("own cgroup {own} is outside the cgroup2 mount's root {mount_root}")
    })?;
    Ok(Path::new(&mount_point).join(relative))
}

/// The root and mount point of the first cgroup2 mount in `mountinfo`.
fn cgroup2_mount(mountinfo: &str) -> Option<(String, String)> {
    mountinfo.lines().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        if rest.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mut fields = fields.split(' ');
        let root = fields.nth(3)?;
        let point = fields.next()?;
        Some((unescape(root), unescape(point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes
            .get(i + 1..i + 4)
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        if bytes[i] == b'\\'
            && let Some(code) = code
        {
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the cgroup `dir` or a descendant has a live process (`populated 1` in
/// `cgroup.events`). A cgroup that cannot be read counts as empty.
fn populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .is_ok_and(|events| events.lines().any(|l| l == "populated 1"))
}

fn subdirectories(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the cgroup `dir` and its descendants, deepest first; populated ones stay.
fn remove_tree(dir: &Path) {
    for child in subdirectories(dir) {
        remove_tree(&child);
    }
    let _ = fs::remove_dir(dir);
}

/// A cgroup directory name: letters, digits, `.`, `-` and `_`; anything else becomes `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::spawn::{SpawnSpec, spawn};

    /// A tree of our own for one test, or `None` where cgroups are unavailable: then the
    /// test is skipped, which is printed and counted (appended to the file
    /// `CLUSTERD_TEST_SKIPS` names, as the integration tests' skips are), and under CI
    /// (`CI=true`) it fails instead, with the reason.
    fn cgroups(test: &str) -> Option<Containment> {
        let key = format!("test-{}-{test}", std::process::id());
        // Not `detect`: that would move the test process itself.
        let detected = match own_cgroup_dir() {
            Ok(own) => Containment::under(&own, &key),
            Err(why) => Containment::ProcessGroups { why },
        };
        match detected {
            Containment::ProcessGroups { why } => {
                let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
                assert!(!ci, "cgroup v2 delegation is required under CI: {why}");
                let thread = std::thread::current();
                let name = thread.name().unwrap_or(test);
                eprintln!("SKIPPED: {name}: no cgroups here: {why}");
                if let Some(path) = std::env::var_os("CLUSTERD_TEST_SKIPS") {
                    use std::io::Write;
                    let line = format!("{name}: no cgroups here: {}\n", why.replace('\n', " "));
                    let _ = fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .and_then(|mut f| f.write_all(line.as_bytes()));
                }
                None
            }
            cgroup => Some(cgroup),
        }
    }

    /// Starts `sh -c script` through the real spawn path, in `cgroup_procs` if given.
    fn start(script: &str, cgroup_procs: Option<&OwnedFd>) -> Pid {
        let null = OwnedFd::from(
            fs::File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .unwrap(),
        );
        spawn(&SpawnSpec {
            program: Path::new("/bin/sh"),
            argv: &["sh".to_owned(), "-c".to_owned(), script.to_owned()],
            env: &[("PATH".to_owned(), "/usr/bin:/bin".to_owned())],
            cwd: Path::new("/"),
            listen_fds: &[],
            stdio: [&null, &null, &null],
            cgroup_procs,
            trap: None,
            ipc: None,
        })
        .expect("spawn")
    }

    fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Gone, or a zombie waiting for its parent.
    fn dead(pid: Pid) -> bool {
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return true;
        };
        stat.rfind(')')
            .and_then(|i| stat.get(i + 2..i + 3))
            .is_none_or(|state| state == "Z")
    }

    fn reap(pid: Pid) {
        let _ = nix::sys::wait::waitpid(pid, None);
    }

    fn tree_dir(containment: &Containment) -> PathBuf {
        match containment {
            Containment::Cgroup(tree) => tree.dir.clone(),
            Containment::ProcessGroups { .. } => unreachable!(),
        }
    }

    /// A worker that leaves its process group twice: a double-forked `setsid` sleeper and
    /// a `setsid` shell with a child of its own. Four processes once settled.
    const ESCAPER: &str =
        "(setsid sleep 1000 &); setsid sh -c 'sleep 1000 & exec sleep 1000' & exec sleep 1000";

    #[test]
    fn setsid_and_double_forked_descendants_stay_inside_and_die_with_kill() {
        let Some(mut containment) = cgroups("kill") else {
            return;
        };
        let procs = containment.prepare_worker("web.0.1").unwrap();
        let leader = start(ESCAPER, procs.as_ref());
        let Containment::Cgroup(tree) = &containment else {
            unreachable!()
        };
        let dir = tree.worker_dir("web.0.1");
        let tree_dir = tree.dir.clone();
        let mut pids = Vec::new();
        wait_for("four processes are in the cgroup", || {
            pids = tree.pids_below(&dir);
            pids.len() == 4
        });
        assert!(pids.contains(&leader));
        assert!(
            pids.iter()
                .any(|p| nix::unistd::getpgid(Some(*p)).is_ok_and(|g| g != leader)),
            "some descendants left the process group"
        );
        assert!(!containment.is_empty("web.0.1", leader));

        containment.kill("web.0.1", leader);
        wait_for("the cgroup is empty", || {
            containment.is_empty("web.0.1", leader)
        });
        reap(leader);
        wait_for("every process is dead", || pids.iter().all(|p| dead(*p)));
        containment.remove_worker("web.0.1");
        assert!(!dir.exists());
        containment.remove_all();
        assert!(!tree_dir.exists());
    }

    #[test]
    fn signal_reaches_the_descendants_that_left_the_group() {
        let Some(containment) = cgroups("signal") else {
            return;
        };
        let procs = containment.prepare_worker("w").unwrap();
        let leader = start(ESCAPER, procs.as_ref());
        let Containment::Cgroup(tree) = &containment else {
            unreachable!()
        };
        wait_for("four processes are in the cgroup", || {
            tree.pids_below(&tree.worker_dir("w")).len() == 4
        });
        containment.signal("w", leader, Signal::SIGTERM);
        wait_for("the cgroup is empty", || containment.is_empty("w", leader));
        reap(leader);
        containment.remove_all();
    }

    #[test]
    fn a_new_run_with_the_same_key_sweeps_what_a_killed_run_left() {
        let Some(first) = cgroups("sweep") else {
            return;
        };
        let procs = first.prepare_worker("web.0.1").unwrap();
        let leader = start("setsid sleep 1000 & exec sleep 1000", procs.as_ref());
        let Containment::Cgroup(tree) = &first else {
            unreachable!()
        };
        let mut pids = Vec::new();
        wait_for("two sleeps are in the cgroup", || {
            pids = tree.pids_below(&tree.dir);
            pids.len() == 2 && pids.iter().all(|p| describe_pid(*p).ends_with("(sleep)"))
        });
        // The first run dies without cleaning up; the next start of the same key finds it.
        drop(first);
        let second = cgroups("sweep").expect("cgroups again");
        let killed = second.sweep_leftovers().unwrap();
        assert_eq!(killed.len(), 2, "{killed:?}");
        assert!(killed.iter().all(|k| k.ends_with("(sleep)")), "{killed:?}");
        reap(leader);
        wait_for("the leftovers are dead", || pids.iter().all(|p| dead(*p)));
        let dir = tree_dir(&second);
        assert!(subdirectories(&dir).is_empty(), "leftover cgroups removed");
        assert_eq!(second.sweep_leftovers().unwrap(), Vec::<String>::new());
        second.remove_all();
        assert!(!dir.exists());
    }

    #[test]
    fn without_a_writable_cgroup2_process_groups_are_used_and_say_why() {
        let fallback = Containment::under(Path::new("/nonexistent/cgroup"), "k");
        let Containment::ProcessGroups { why } = &fallback else {
            panic!("expected process groups, got {fallback:?}");
        };
        assert!(why.contains("/nonexistent/cgroup/clusterd-k"), "{why}");
        assert!(
            fallback
                .describe()
                .starts_with("process groups (cannot create cgroup")
        );
        assert!(fallback.prepare_worker("w").unwrap().is_none());
        assert_eq!(fallback.sweep_leftovers().unwrap(), Vec::<String>::new());

        // Process groups: is_empty follows the group, kill kills it.
        let leader = start("sleep 1000 & exec sleep 1000", None);
        assert!(!fallback.is_empty("w", leader));
        fallback.kill("w", leader);
        reap(leader);
        wait_for("the group is empty", || fallback.is_empty("w", leader));
    }

    #[test]
    fn finds_the_cgroup_directory_in_hybrid_pure_and_namespaced_layouts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_dir(hybrid, "4:memory:/x\n0::/\n").unwrap(),
            Path::new("/sys/fs/cgroup/unified/")
        );
        let pure = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup_dir(pure, "0::/system.slice/app.service\n").unwrap(),
            Path::new("/sys/fs/cgroup/system.slice/app.service")
        );
        // A mount of a subtree (a container): paths are relative to its root.
        let sub = "30 23 0:26 /kubepods/pod1 /sys/fs\\040cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_dir(sub, "0::/kubepods/pod1/c1\n").unwrap(),
            Path::new("/sys/fs cgroup/c1")
        );
        assert!(
            cgroup_dir(sub, "0::/elsewhere\n")
                .unwrap_err()
                .contains("outside")
        );
        assert!(cgroup_dir("", "0::/\n").unwrap_err().contains("no cgroup2"));
        assert!(
            cgroup_dir(pure, "1:cpu:/\n")
                .unwrap_err()
                .contains("no 0:: line")
        );
    }

    #[test]
    fn the_tree_goes_in_the_cgroup_clusterd_starts_in_and_a_resumed_one_finds_its_leaf() {
        let name = "clusterd-abc";
        let fresh = plan(Path::new("/sys/fs/cgroup/system.slice/app.service"), name);
        assert_eq!(
            fresh,
            Plan {
                base: "/sys/fs/cgroup/system.slice/app.service".into(),
                tree: "/sys/fs/cgroup/system.slice/app.service/clusterd-abc".into(),
                move_self: true,
            }
        );
        // After an upgrade's exec, clusterd is in its leaf already: same base, same tree.
        let resumed = plan(
            Path::new("/sys/fs/cgroup/system.slice/app.service/clusterd-abc/supervisor"),
            name,
        );
        assert_eq!(
            resumed,
            Plan {
                move_self: false,
                ..fresh
            }
        );
        // Another run's leaf (another key) is just a cgroup to start in.
        let other = plan(Path::new("/x/clusterd-def/supervisor"), name);
        assert_eq!(
            other.tree,
            Path::new("/x/clusterd-def/supervisor/clusterd-abc")
        );
        assert!(other.move_self);
        // The root of the hierarchy.
        let root = plan(Path::new("/sys/fs/cgroup/unified/"), name);
        assert_eq!(root.tree, Path::new("/sys/fs/cgroup/unified/clusterd-abc"));
    }

    #[test]
    fn a_systemd_unit_cgroup_is_used_only_when_delegated() {
        for unit in [
            "/sys/fs/cgroup/system.slice/app.service",
            "/sys/fs/cgroup/user.slice/user-1000.slice/session-2.scope",
        ] {
            let why = may_use(Path::new(unit), false).unwrap_err();
            assert!(why.contains(unit) && why.contains("Delegate=yes"), "{why}");
            assert!(may_use(Path::new(unit), true).is_ok());
        }
        // Not a unit's own cgroup: a container's, the root, a cgroup below a delegated unit.
        for other in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/docker/0123abcd",
            "/sys/fs/cgroup/system.slice/app.service/sub",
        ] {
            assert!(may_use(Path::new(other), false).is_ok(), "{other}");
        }
    }

    #[test]
    fn a_worker_that_cannot_join_its_cgroup_is_contained_by_its_process_group_and_says_why() {
        let Some(mut containment) = cgroups("nojoin") else {
            return;
        };
        let procs = containment.prepare_worker("web.0.1").unwrap();
        let Containment::Cgroup(tree) = &containment else {
            unreachable!()
        };
        // Its cgroup is gone before the child can join it: the child's write fails, and so
        // does clusterd's own attempt.
        let dir = tree.worker_dir("web.0.1");
        fs::remove_dir(&dir).unwrap();
        let leader = start("sleep 1000 & exec sleep 1000", procs.as_ref());
        let why = containment.check_joined("web.0.1", leader).unwrap_err();
        assert!(
            why.contains(&format!("pid {leader} could not join")),
            "{why}"
        );
        let describe = containment.describe();
        assert!(
            describe.contains(&format!("web.0.1 in its process group only: {why}")),
            "{describe}"
        );
        // Status measures it by its process group too.
        assert_eq!(containment.cgroup_dir("web.0.1"), None);
        // Process-group semantics for it: not empty while its group lives, killed with it.
        assert!(!containment.is_empty("web.0.1", leader));
        containment.kill("web.0.1", leader);
        reap(leader);
        wait_for("the group is empty", || {
            containment.is_empty("web.0.1", leader)
        });
        containment.remove_worker("web.0.1");
        assert!(!containment.describe().contains("process group only"));
        containment.remove_all();
    }

    #[test]
    fn a_worker_that_joined_is_checked_as_joined() {
        let Some(mut containment) = cgroups("joined") else {
            return;
        };
        let procs = containment.prepare_worker("w").unwrap();
        let leader = start("exec sleep 1000", procs.as_ref());
        assert_eq!(containment.check_joined("w", leader), Ok(()));
        assert!(
            containment
                .cgroup_dir("w")
                .is_some_and(|d| d.ends_with("w-w"))
        );
        assert!(!containment.describe().contains("process group only"));
        containment.kill("w", leader);
        reap(leader);
        wait_for("the cgroup is empty", || containment.is_empty("w", leader));
        containment.remove_all();
    }

    #[test]
    fn lists_our_children_that_are_not_workers() {
        let worker = start("exec sleep 1000", None);
        let other = start("exec sleep 1000", None);
        let orphans = adopted_orphans(&[worker]);
        assert!(orphans.contains(&other) && !orphans.contains(&worker));
        for pid in [worker, other] {
            let _ = kill(pid, Signal::SIGKILL);
            reap(pid);
        }
    }

    #[test]
    fn keys_are_stable_and_names_safe() {
        assert_eq!(key_for(Path::new("/run/a")), key_for(Path::new("/run/a")));
        assert_ne!(key_for(Path::new("/run/a")), key_for(Path::new("/run/b")));
        assert_eq!(key_for(Path::new("/x")).len(), 16);
        assert_eq!(sanitize("web[0]/../x y"), "web_0__.._x_y");
    }
}
