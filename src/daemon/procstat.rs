//! CPU time and resident memory of the workers, read from what clusterd owns: a worker's
//! cgroup where containment is by cgroup (its `cpu.stat` and `cgroup.procs`), else its process
//! group, found by walking down clusterd's own process tree, never all of `/proc`. [`Meter`]
//! measures off the event loop (on tokio's blocking pool) and keeps a measurement for
//! [`FRESH`], so a burst of status calls and scrapes costs one measurement.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::unistd::{Pid, SysconfVar, sysconf};

use clusterd_core::Usage;
use clusterd_core::status::CpuSampler;

/// How long a measurement answers for. Also the shortest window of a status's CPU percent
/// (except right after a worker's start, or when a new worker needs a new measurement).
pub const FRESH: Duration = Duration::from_secs(1);

/// A worker to measure.
#[derive(Debug, Clone)]
pub struct Target {
    /// Its process group (its pid).
    pub group: clusterd_core::Pid,
    /// Its cgroup directory, where it is contained by one.
    pub cgroup: Option<PathBuf>,
    /// When it was spawned (the start of its first CPU percent window).
    pub started: Instant,
}

/// One measurement of every worker, by process group.
#[derive(Debug)]
pub struct Snapshot {
    /// When it was taken.
    pub at: Instant,
    /// CPU seconds and resident bytes.
    pub usage: HashMap<clusterd_core::Pid, Usage>,
    /// CPU use since the previous measurement (or the worker's start), percent of one core.
    pub cpu_percent: HashMap<clusterd_core::Pid, f64>,
}

/// Measures workers off the loop, one measurement at a time, each answering for a while
/// ([`FRESH`]). Lives on the loop's thread (a `LocalSet`).
#[derive(Clone)]
pub struct Meter(Rc<RefCell<MeterState>>);

struct MeterState {
    fresh: Duration,
    last: Option<Rc<Snapshot>>,
    /// Who waits for the measurement under way, if one is.
    waiting: Option<Vec<tokio::sync::oneshot::Sender<Rc<Snapshot>>>>,
    sampler: CpuSampler,
}

impl Meter {
    /// A meter whose measurements answer for `fresh`.
    pub fn new(fresh: Duration) -> Meter {
        Meter(Rc::new(RefCell::new(MeterState {
            fresh,
            last: None,
            waiting: None,
            sampler: CpuSampler::default(),
        })))
    }

    /// The usage of `targets`: the last measurement if it is younger than `fresh` and has
    /// every target, else the one under way, else a new one (on tokio's blocking pool: the
    /// loop never waits for `/proc` or cgroup files). Must run inside a `LocalSet`.
    pub fn usage(&self, targets: Vec<Target>) -> impl Future<Output = Rc<Snapshot>> + 'static {
        let meter = self.clone();
        async move {
            let now = Instant::now();
            let answer = {
                let mut state = meter.0.borrow_mut();
                if let Some(last) = &state.last
                    && now < last.at + state.fresh
                    && targets.iter().all(|t| last.usage.contains_key(&t.group))
                {
                    return last.clone();
                }
                let (sender, answer) = tokio::sync::oneshot::channel();
                match &mut state.waiting {
                    Some(waiting) => waiting.push(sender),
                    None => {
                        state.waiting = Some(vec![sender]);
                        tokio::task::spawn_local(meter.clone().measure(targets));
                    }
                }
                answer
            };
            answer.await.unwrap_or_else(|_| {
                Rc::new(Snapshot {
                    at: now,
                    usage: HashMap::new(),
                    cpu_percent: HashMap::new(),
                })
            })
        }
    }

    async fn measure(self, targets: Vec<Target>) {
        let started: HashMap<clusterd_core::Pid, Instant> =
            targets.iter().map(|t| (t.group, t.started)).collect();
        let usage = tokio::task::spawn_blocking(move || measure(&targets))
            .await
            .unwrap_or_default();
        let now = Instant::now();
        let mut state = self.0.borrow_mut();
        let cpu_percent = state.sampler.sample(now, &usage, |group| {
            started.get(&group).copied().unwrap_or(now)
        });
        let snapshot = Rc::new(Snapshot {
            at: now,
            usage,
            cpu_percent,
        });
        state.last = Some(snapshot.clone());
        for waiter in state.waiting.take().unwrap_or_default() {
            let _ = waiter.send(snapshot.clone());
        }
    }
}

/// Usage of every target, by process group (zero for one that is gone). A target with a
/// cgroup is read from it: CPU from `cpu.stat` (`usage_usec`: its processes, those that left
/// its process group and those that have exited included), resident memory as the sum of its
/// members' (`cgroup.procs`, and of the cgroups below it, if any) `/proc/<pid>/statm`. The
/// others, and any whose cgroup cannot be read, are measured by process group
/// ([`group_usage`]), in one walk.
pub fn measure(targets: &[Target]) -> HashMap<clusterd_core::Pid, Usage> {
    let mut usage = HashMap::new();
    let mut buf = Vec::with_capacity(4096);
    let page = page_size();
    let mut by_group = Vec::new();
    let mut in_cgroups = HashSet::new();
    for target in targets {
        match target
            .cgroup
            .as_deref()
            .and_then(|dir| cgroup_usage(dir, page, &mut buf))
        {
            Some(measured) => {
                usage.insert(target.group, measured);
                in_cgroups.insert(target.group.as_raw());
            }
            None => by_group.push(target.group),
        }
    }
    if !by_group.is_empty() {
        usage.extend(walk_groups(&by_group, &in_cgroups));
    }
    usage
}

/// The usage of the cgroup `dir`; `None` when its `cpu.stat` cannot be read (gone).
fn cgroup_usage(dir: &Path, page: u64, buf: &mut Vec<u8>) -> Option<Usage> {
    let usec: u64 = read_file(&dir.join("cpu.stat"), buf)?
        .lines()
        .find_map(|line| line.strip_prefix("usage_usec "))?
        .trim()
        .parse()
        .ok()?;
    let mut members = Vec::new();
    cgroup_members(dir, buf, &mut members);
    let rss_pages: u64 = members
        .into_iter()
        .filter_map(|pid| resident_pages(pid, buf))
        .sum();
    Some(Usage {
        cpu_seconds: usec as f64 / 1e6,
        rss_bytes: rss_pages * page,
    })
}

/// The processes in the cgroup `dir` and in the cgroups below it.
fn cgroup_members(dir: &Path, buf: &mut Vec<u8>, members: &mut Vec<i32>) {
    if let Some(procs) = read_file(&dir.join("cgroup.procs"), buf) {
        members.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    // A cgroup directory's link count is 2 plus its child cgroups: list it only when a worker
    // made cgroups of its own.
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata(dir).is_ok_and(|m| m.nlink() > 2)
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                cgroup_members(&entry.path(), buf, members);
            }
        }
    }
}

/// The text of a `/proc` or cgroup file, read into `buf` (no size probes: such files have none).
fn read_file<'a>(path: &Path, buf: &'a mut Vec<u8>) -> Option<&'a str> {
    let mut file = std::fs::File::open(path).ok()?;
    buf.clear();
    loop {
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(4096);
        }
        let start = buf.len();
        buf.resize(buf.capacity(), 0);
        match file.read(&mut buf[start..]) {
            Ok(0) => {
                buf.truncate(start);
                break;
            }
            Ok(n) => buf.truncate(start + n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => buf.truncate(start),
            Err(_) => return None,
        }
    }
    std::str::from_utf8(buf).ok()
}

fn page_size() -> u64 {
    sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64
}

/// Usage of every process group in `groups`, by group id. The processes are found without
/// walking all of `/proc`: from the group leaders and clusterd itself (whose children include
/// the subreaper's adopted orphans) down through `/proc/<pid>/task/*/children`, so the cost grows
/// with clusterd's process tree, not with the host. Where the kernel lacks the `children` files,
/// one pass over `/proc` instead.
pub fn group_usage(groups: &[clusterd_core::Pid]) -> HashMap<clusterd_core::Pid, Usage> {
    walk_groups(groups, &HashSet::new())
}

/// [`group_usage`], not descending from clusterd into the workers in `skip` (measured by
/// their cgroups).
fn walk_groups(
    groups: &[clusterd_core::Pid],
    skip: &HashSet<i32>,
) -> HashMap<clusterd_core::Pid, Usage> {
    let mut usage: HashMap<clusterd_core::Pid, Usage> =
        groups.iter().map(|g| (*g, Usage::default())).collect();
    if groups.is_empty() {
        return usage;
    }
    let ticks = sysconf(SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let page = page_size();
    let mut buf = Vec::with_capacity(1024);
    let mut add = |pid: i32| {
        let Some(fields) =
            read_file(Path::new(&format!("/proc/{pid}/stat")), &mut buf).and_then(parse_stat)
        else {
            return;
        };
        if let Some(total) = usage.get_mut(&clusterd_core::Pid::from_raw(fields.pgrp)) {
            total.cpu_seconds += (fields.utime + fields.stime) as f64 / ticks;
            total.rss_bytes += resident_pages(pid, &mut buf).unwrap_or(0) * page;
        }
    };
    let me = std::process::id() as i32;
    match children_of(me) {
        Some(_) => {
            let roots = groups.iter().map(|g| g.as_raw()).chain([me]);
            let children = |pid: i32| {
                let mut children = children_of(pid).unwrap_or_default();
                if pid == me {
                    children.retain(|child| !skip.contains(child));
                }
                children
            };
            for pid in descendants(roots, children) {
                add(pid);
            }
        }
        None => {
            let Ok(entries) = std::fs::read_dir("/proc") else {
                return usage;
            };
            for entry in entries.flatten() {
                if let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                    add(pid);
                }
            }
        }
    }
    usage
}

/// `roots` and all their descendants, each once, asking `children` only about processes in
/// that tree.
fn descendants(
    roots: impl IntoIterator<Item = i32>,
    mut children: impl FnMut(i32) -> Vec<i32>,
) -> Vec<i32> {
    let mut seen = std::collections::HashSet::new();
    let mut queue: Vec<i32> = roots.into_iter().collect();
    let mut found = Vec::new();
    while let Some(pid) = queue.pop() {
        if seen.insert(pid) {
            found.push(pid);
            queue.extend(children(pid));
        }
    }
    found
}

/// The children of every thread of `pid` (`/proc/<pid>/task/*/children`); `None` when the
/// process is gone or the kernel has no such files.
fn children_of(pid: i32) -> Option<Vec<i32>> {
    let mut children = Vec::new();
    let mut any = false;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            any = true;
            children.extend(
                list.split_ascii_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            );
        }
    }
    any.then_some(children)
}

/// clusterd's own resident memory, bytes.
pub fn self_rss() -> u64 {
    let page = page_size();
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split(' ').nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}

/// The parent of `pid` as `/proc/<pid>/stat` says (0 for a process whose parent is outside
/// its PID namespace).
pub fn ppid(pid: Pid) -> Option<Pid> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(Pid::from_raw(parse_stat(&stat)?.ppid))
}

/// The parent of `pid`, for finding a worker among its ancestors (none above pid 1: init is
/// nobody's worker).
pub fn parent_of(pid: Pid) -> Option<Pid> {
    ppid(pid).filter(|p| p.as_raw() > 1)
}

struct StatFields {
    ppid: i32,
    pgrp: i32,
    utime: u64,
    stime: u64,
}

/// The resident pages of `pid`, from `/proc/<pid>/statm` (exact; the `rss` of `stat` is
/// summed from per-CPU counters without folding them, and can be off by hundreds of pages).
fn resident_pages(pid: i32, buf: &mut Vec<u8>) -> Option<u64> {
    read_file(Path::new(&format!("/proc/{pid}/statm")), buf)?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// The fields we need from `/proc/<pid>/stat` (see proc(5)); the command name in field 2 may
/// contain spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<StatFields> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split(' ').collect();
    // rest starts at field 3 (state): field n is fields[n - 3].
    Some(StatFields {
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        utime: fields.get(11)?.parse().ok()?,
        stime: fields.get(12)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_a_strange_command_name() {
        let line =
            "42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 123 4096 77 rest";
        let f = parse_stat(line).expect("parse");
        assert_eq!((f.ppid, f.pgrp, f.utime, f.stime), (1, 42, 250, 50));
    }

    #[test]
    fn finds_our_parent() {
        let me = Pid::this();
        assert_eq!(
            parent_of(me),
            Some(nix::unistd::getppid()).filter(|p| p.as_raw() > 1)
        );
        assert!(parse_stat("42 (truncated").is_none());
    }

    #[test]
    fn the_walk_asks_only_about_the_tree() {
        // 1 -> 2 -> {3, 4}, 4 -> 5; 100..600 are unrelated processes on the host.
        let tree: HashMap<i32, Vec<i32>> = [(1, vec![2]), (2, vec![3, 4]), (4, vec![5])].into();
        let mut asked = Vec::new();
        let mut found = descendants([1, 4], |pid| {
            asked.push(pid);
            tree.get(&pid).cloned().unwrap_or_default()
        });
        found.sort();
        asked.sort();
        assert_eq!(found, [1, 2, 3, 4, 5]);
        assert_eq!(
            asked,
            [1, 2, 3, 4, 5],
            "each tree member asked once, nobody else"
        );
    }

    #[test]
    fn a_group_with_children_sums_what_proc_says() {
        use std::os::unix::process::CommandExt;
        // A leader in its own group with two children.
        let mut leader = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & echo started; wait"])
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(leader.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let group = leader.id() as i32;
        let page = sysconf(SysconfVar::PAGE_SIZE).ok().flatten().unwrap() as u64;
        // What a scan of all of /proc says about the group.
        let scan = || {
            let mut members = Vec::new();
            let mut rss = 0;
            let mut execed = true;
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<i32>().ok())
                else {
                    continue;
                };
                let Some(f) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| parse_stat(&s))
                else {
                    continue;
                };
                if f.pgrp == group {
                    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"));
                    execed &= pid == group || comm.is_ok_and(|c| c.trim() == "sleep");
                    members.push(pid);
                    rss += resident_pages(pid, &mut Vec::new()).unwrap_or(0) * page;
                }
            }
            (members.len(), rss, execed)
        };
        // The children are settled once both run `sleep` (not a forked shell any more) and
        // their pages have stopped growing (the loader maps libc after the exec): two scans in
        // a row agree.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut last = None;
        let (members, scanned) = loop {
            let (members, rss, execed) = scan();
            let settled = execed && last == Some(rss);
            if settled || std::time::Instant::now() > deadline {
                break (members, rss);
            }
            last = Some(rss);
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let measured = group_usage(&[clusterd_core::Pid::from_raw(group)])
            [&clusterd_core::Pid::from_raw(group)];
        // A worker whose cgroup cannot be read (it could not join it) is measured by its group.
        let fallback = measure(&[Target {
            group: clusterd_core::Pid::from_raw(group),
            cgroup: Some("/nonexistent/cgroup/w-x".into()),
            started: std::time::Instant::now(),
        }])[&clusterd_core::Pid::from_raw(group)];
        let _ = nix::sys::signal::killpg(Pid::from_raw(group), nix::sys::signal::SIGKILL);
        let _ = leader.wait();
        assert_eq!(members, 3, "leader and two children in the group");
        // Pages may move between the two reads; the children's RSS must be in the sum.
        let one = scanned / 3;
        assert!(
            measured.rss_bytes + one / 2 > scanned && measured.rss_bytes < scanned + one / 2,
            "walk {} bytes, scan {scanned} bytes",
            measured.rss_bytes
        );
        assert!(
            fallback.rss_bytes + one / 2 > scanned && fallback.rss_bytes < scanned + one / 2,
            "by group {} bytes, scan {scanned} bytes",
            fallback.rss_bytes
        );
    }

    #[test]
    fn measures_our_own_group() {
        let me = crate::daemon::os::core_pid(nix::unistd::getpgrp());
        let usage = group_usage(&[me]);
        assert!(usage[&me].rss_bytes > 0);
        assert!(self_rss() > 0);
    }

    #[test]
    fn a_burst_costs_one_measurement_and_a_new_worker_a_new_one() {
        use std::os::unix::process::CommandExt;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            let meter = Meter::new(Duration::from_secs(3600));
            let target = |group: i32| Target {
                group: clusterd_core::Pid::from_raw(group),
                cgroup: None,
                started: Instant::now(),
            };
            let me = nix::unistd::getpgrp().as_raw();
            // Ten at once wait for one measurement; later ones get it too, while fresh.
            let burst: Vec<_> = (0..10)
                .map(|_| tokio::task::spawn_local(meter.usage(vec![target(me)])))
                .collect();
            let mut snapshots = Vec::new();
            for waiter in burst {
                snapshots.push(waiter.await.unwrap());
            }
            snapshots.push(meter.usage(vec![target(me)]).await);
            assert!(snapshots.iter().all(|s| Rc::ptr_eq(s, &snapshots[0])));
            assert!(snapshots[0].usage[&clusterd_core::Pid::from_raw(me)].rss_bytes > 0);
            // A worker the last measurement does not have: a new measurement.
            let mut other = std::process::Command::new("sleep")
                .arg("30")
                .process_group(0)
                .spawn()
                .unwrap();
            let group = other.id() as i32;
            let next = meter.usage(vec![target(me), target(group)]).await;
            let _ = other.kill();
            let _ = other.wait();
            assert!(!Rc::ptr_eq(&next, &snapshots[0]));
            assert!(
                next.usage
                    .contains_key(&clusterd_core::Pid::from_raw(group))
            );
        });
    }
}
