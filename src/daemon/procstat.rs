//! CPU time and resident memory of process groups, read from `/proc`. A worker's figures are
//! those of its whole process group, so a worker that forks helpers is measured with them; the
//! group's members are found by walking down clusterd's own process tree, never all of `/proc`.

use std::collections::HashMap;

use nix::unistd::{Pid, SysconfVar, sysconf};

use clusterd_core::Usage;

/// Usage of every process group in `groups`, by group id. The processes are found without
/// walking all of `/proc`: from the group leaders and clusterd itself (whose children include
/// the subreaper's adopted orphans) down through `/proc/<pid>/task/*/children`, so the cost grows
/// with clusterd's process tree, not with the host. Where the kernel lacks the `children` files,
/// one pass over `/proc` instead.
pub fn group_usage(groups: &[clusterd_core::Pid]) -> HashMap<clusterd_core::Pid, Usage> {
    let mut usage: HashMap<clusterd_core::Pid, Usage> =
        groups.iter().map(|g| (*g, Usage::default())).collect();
    if groups.is_empty() {
        return usage;
    }
    let ticks = sysconf(SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let page = sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let mut add = |pid: i32| {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return;
        };
        let Some(fields) = parse_stat(&stat) else {
            return;
        };
        if let Some(total) = usage.get_mut(&clusterd_core::Pid::from_raw(fields.pgrp)) {
            total.cpu_seconds += (fields.utime + fields.stime) as f64 / ticks;
            total.rss_bytes += fields.rss_pages * page;
        }
    };
    let me = std::process::id() as i32;
    match children_of(me) {
        Some(_) => {
            let roots = groups.iter().map(|g| g.as_raw()).chain([me]);
            for pid in descendants(roots, |pid| children_of(pid).unwrap_or_default()) {
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
    let page = sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
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
    rss_pages: u64,
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
        rss_pages: fields.get(21)?.parse().ok()?,
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
        assert_eq!(
            (f.ppid, f.pgrp, f.utime, f.stime, f.rss_pages),
            (1, 42, 250, 50, 77)
        );
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
                    rss += f.rss_pages * page;
                }
            }
            (members.len(), rss, execed)
        };
        // The children are settled once both run `sleep` (not a forked shell any more).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (members, scanned) = loop {
            let (members, rss, execed) = scan();
            if execed || std::time::Instant::now() > deadline {
                break (members, rss);
            }
            std::thread::yield_now();
        };
        let measured = group_usage(&[clusterd_core::Pid::from_raw(group)])
            [&clusterd_core::Pid::from_raw(group)];
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
    }

    #[test]
    fn measures_our_own_group() {
        let me = crate::daemon::os::core_pid(nix::unistd::getpgrp());
        let usage = group_usage(&[me]);
        assert!(usage[&me].rss_bytes > 0);
        assert!(self_rss() > 0);
    }
}
