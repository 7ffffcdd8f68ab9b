//! CPU time and resident memory of process groups, read from `/proc`. A worker's figures are
//! those of its whole process group, so a worker that forks helpers is measured with them.

use std::collections::HashMap;

use nix::unistd::{Pid, SysconfVar, sysconf};

use clusterd_core::Usage;

/// Usage of every process group in `groups`, by group id, from one pass over `/proc`.
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
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return usage;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{name}/stat")) else {
            continue;
        };
        let Some(fields) = parse_stat(&stat) else {
            continue;
        };
        if let Some(total) = usage.get_mut(&clusterd_core::Pid::from_raw(fields.pgrp)) {
            total.cpu_seconds += (fields.utime + fields.stime) as f64 / ticks;
            total.rss_bytes += fields.rss_pages * page;
        }
    }
    usage
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
    fn measures_our_own_group() {
        let me = crate::daemon::os::core_pid(nix::unistd::getpgrp());
        let usage = group_usage(&[me]);
        assert!(usage[&me].rss_bytes > 0);
        assert!(self_rss() > 0);
    }
}
