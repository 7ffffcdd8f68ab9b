//! Hostile or broken surroundings (issue 9): nothing a worker, a log reader or another local
//! user does may stall clusterd, leak its resources or outlive it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::util::{Clusterd, clusterd_bin, wait_until};

const SECOND: Duration = Duration::from_secs(1);

/// How many descriptors `pid` has open that are not sockets: the control connections that
/// status requests open and close come and go, the descriptors a leak would keep do not.
fn fd_count(pid: Pid) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read fds")
        .filter(|fd| {
            fd.as_ref().is_ok_and(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|target| !target.to_string_lossy().starts_with("socket:"))
            })
        })
        .count()
}

/// `clusterd status --json` with a deadline: the parsed status and how long it took, or
/// `None` if clusterd did not answer within `timeout` (the client is killed then).
fn status_within(clusterd: &Clusterd, timeout: Duration) -> Option<(serde_json::Value, Duration)> {
    let started = Instant::now();
    let mut command = Command::new(clusterd_bin());
    command
        .args(["status", "--json", "-f"])
        .arg(&clusterd.manifest)
        .env_remove("XDG_RUNTIME_DIR");
    let output = crate::util::output_within(&mut command, timeout)?;
    let elapsed = started.elapsed();
    Some((serde_json::from_slice(&output.stdout).ok()?, elapsed))
}

/// The pid of `app`'s serving worker in `slot`, from a status.
fn worker_pid(status: &serde_json::Value, app: &str, slot: u64) -> Option<Pid> {
    let pid = status["apps"]
        .as_array()?
        .iter()
        .find(|a| a["name"] == app)?["workers"]
        .as_array()?
        .iter()
        .find(|w| w["slot"] == slot && w["role"] == "serving")?["pid"]
        .as_i64()?;
    Some(Pid::from_raw(pid as i32))
}

/// Bytes waiting in a pipe (`FIONREAD`), for messages.
fn pipe_fill(fd: std::os::fd::BorrowedFd<'_>) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    n as usize
}

/// Whether the pipe whose read end is `fd` is full: every one of its buffers is taken, so
/// that its writer blocks. Asked of the kernel, not guessed from a byte count (buffers are
/// pages that small writes fill only in part): a write end of the same pipe, opened through
/// `/proc/self/fd`, polls not writable exactly then.
fn pipe_full(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::{AsFd, AsRawFd};
    use std::os::unix::fs::OpenOptionsExt;
    let write_end = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .expect("open the pipe's write end");
    let mut fds = [PollFd::new(write_end.as_fd(), PollFlags::POLLOUT)];
    poll(&mut fds, PollTimeout::ZERO).expect("poll") == 0
}

/// The `status_text` of `app`'s worker in `slot`.
fn status_text(clusterd: &Clusterd, app: &str, slot: u64) -> Option<String> {
    let status = clusterd.status();
    status["apps"]
        .as_array()?
        .iter()
        .find(|a| a["name"] == app)?["workers"]
        .as_array()?
        .iter()
        .find(|w| w["slot"] == slot)?["status_text"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn descriptors_sent_with_notifications_do_not_leak() {
    // Five datagrams with 40 descriptors each (more than a small control buffer holds), then
    // a plain STATUS=sent: when clusterd shows it, it has read the five before it.
    let clusterd = Clusterd::start_with_files(
        r#"
[apps.sender]
command = ["{dir}/sender.py"]
ready = "notify"
"#,
        &[(
            "sender.py",
            r#"#!/usr/bin/env python3
import array, os, socket, time
addr = os.environ["NOTIFY_SOCKET"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", addr)
while not os.path.exists("{dir}/go"):
    time.sleep(0.02)
fd = os.open("/dev/null", os.O_RDONLY)
for _ in range(5):
    fds = array.array("i", [fd] * 40)
    s.sendmsg([b"STATUS=burst"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0, addr)
s.sendto(b"STATUS=sent", addr)
while True:
    time.sleep(60)
"#,
        )],
    );
    clusterd.wait_ready("sender", 1, 20 * SECOND);
    let before = fd_count(clusterd.pid());
    std::fs::write(clusterd.dir.path().join("go"), "").expect("write go");
    assert!(
        wait_until(20 * SECOND, || status_text(&clusterd, "sender", 0)
            .as_deref()
            == Some("sent")),
        "the worker's STATUS=sent never arrived"
    );
    // (Bounded wait: a descriptor closed by a task that has not run yet is no leak.)
    let mut after = 0;
    wait_until(5 * SECOND, || {
        after = fd_count(clusterd.pid());
        after == before
    });
    assert_eq!(
        after, before,
        "clusterd's descriptors: {before} before, {after} after"
    );
}

#[test]
fn with_its_output_unread_clusterd_still_replaces_workers_and_answers() {
    // Both of clusterd's streams are pipes nobody reads, and a worker floods both.
    let mut clusterd = Clusterd::start_unread(
        r#"
[supervisor]
stop_timeout = "2s"

[apps.flood]
command = ["sh", "-c", "yes stderr-flood >&2 & exec yes stdout-flood"]

[apps.web]
command = ["sleep", "1000"]
"#,
        &[],
    );
    let [stdout, stderr] = clusterd.unread_pipes().expect("unread pipes");
    let full = || pipe_full(stdout) && pipe_full(stderr);
    assert!(
        wait_until(20 * SECOND, full),
        "clusterd's stdout and stderr did not fill up ({} and {} bytes waiting)",
        pipe_fill(stdout),
        pipe_fill(stderr)
    );
    // A stalled loop never answers; a busy one (it reads and drops the floods as fast as
    // they come) answers late on a loaded machine: 5 s was measured beside two CPU hogs, a
    // tenth of that on an idle one. The bound tells the two apart.
    let answers = 30 * SECOND;
    let (status, first) = status_within(&clusterd, answers).expect("status answers");
    let victim = worker_pid(&status, "web", 0).expect("web[0] in status");
    kill(victim, Signal::SIGKILL).expect("kill web[0]");
    let mut slowest = first;
    let replaced = wait_until(60 * SECOND, || {
        let Some((status, took)) = status_within(&clusterd, answers) else {
            panic!("status did not answer within {answers:?} with clusterd's output unread");
        };
        slowest = slowest.max(took);
        worker_pid(&status, "web", 0).is_some_and(|pid| pid != victim)
    });
    assert!(replaced, "the killed worker was not replaced");
    eprintln!("with the output unread and floods, status took up to {slowest:?}");
    // Both streams were stalled meanwhile, the log's as well as the workers' output.
    assert!(pipe_full(stdout) && pipe_full(stderr));
    clusterd.signal(Signal::SIGTERM);
    assert!(clusterd.wait_exit(20 * SECOND).success());
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn a_sighup_failing_on_its_second_new_socket_binds_nothing_and_a_corrected_one_applies() {
    let manifest = |a: u16, b: u16| {
        format!(
            "[sockets.http]\nlisten = \"127.0.0.1:0\"\n\
             [sockets.a]\nlisten = \"127.0.0.1:{a}\"\n\
             [sockets.b]\nlisten = \"127.0.0.1:{b}\"\n\
             [apps.web]\ncommand = [\"sleep\", \"1000\"]\nsockets = [\"http\"]\n"
        )
    };
    let clusterd = Clusterd::start(
        "[sockets.http]\nlisten = \"127.0.0.1:0\"\n[apps.web]\ncommand = [\"sleep\", \"1000\"]\nsockets = [\"http\"]\n",
    );
    clusterd.wait_worker("web", 0, 10 * SECOND, |w| !w["pid"].is_null());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let a = free_port();
    // "a" sorts first and binds; "b" fails on the port held above.
    clusterd.rewrite_manifest(&manifest(a, taken_port));
    clusterd.signal(Signal::SIGHUP);
    clusterd.wait_for_line("event=reread_rejected", 10 * SECOND);
    assert!(!listening(a), "the rejected re-read left socket a bound");

    let b = free_port();
    clusterd.rewrite_manifest(&manifest(a, b));
    clusterd.signal(Signal::SIGHUP);
    clusterd.socket_addr("b");
    assert!(listening(a) && listening(b));
    let output = clusterd.output();
    assert_eq!(clusterd.count("manifest re-read rejected"), 1, "{output}");
    // Named, for whoever filters clusterd's own warnings.
    assert_eq!(clusterd.count("event=reread_rejected"), 1, "{output}");
}

/// Runs `clusterd ARGS -f MANIFEST` with its stdout a pipe whose reader has already gone.
fn ctl_into_closed_pipe(clusterd: &Clusterd, args: &[&str]) -> std::process::Output {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    let child = Command::new(clusterd_bin())
        .args(args)
        .arg("-f")
        .arg(&clusterd.manifest)
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn clusterd client");
    child.wait_with_output().expect("client output")
}

#[test]
fn cli_output_into_a_closed_pipe_ends_quietly() {
    let mut clusterd =
        Clusterd::start("[apps.web]\ncommand = [\"sleep\", \"1000\"]\nworkers = 2\n");
    for slot in 0..2 {
        clusterd.wait_worker("web", slot, 10 * SECOND, |w| !w["pid"].is_null());
    }
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["reload", "--wait"],
        &["check", clusterd.manifest.to_str().expect("path")],
    ] {
        let output = if args[0] == "check" {
            let (read, write) = nix::unistd::pipe().expect("pipe");
            drop(read);
            Command::new(clusterd_bin())
                .args(args)
                .stdout(Stdio::from(write))
                .stderr(Stdio::piped())
                .output()
                .expect("clusterd check")
        } else {
            ctl_into_closed_pipe(&clusterd, args)
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stderr.is_empty(),
            "clusterd {}: {:?}, stderr: {stderr}",
            args.join(" "),
            output.status
        );
    }
    assert!(clusterd.stop().success());
}

/// `app`'s ready worker count, from a status.
fn ready_count(status: &serde_json::Value, app: &str) -> Option<u64> {
    status["apps"]
        .as_array()?
        .iter()
        .find(|a| a["name"] == app)?["ready"]
        .as_u64()
}

#[test]
fn a_hundred_and_twenty_workers_become_ready_under_a_soft_limit_of_256_descriptors() {
    use std::os::unix::process::CommandExt;
    let clusterd = Clusterd::start_with(
        r#"
[apps.many]
command = ["sh", "-c", "\"$CLUSTERD_EXE\" notify READY=1 && exec sleep 1000"]
workers = 120
ready = "notify"
"#,
        |command| {
            // SAFETY: setrlimit is a plain system call, fine between fork and exec.
            unsafe {
                command.pre_exec(|| {
                    let (_, hard) =
                        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        256,
                        hard,
                    )?;
                    Ok(())
                });
            }
        },
    );
    let mut ready = None;
    assert!(
        wait_until(90 * SECOND, || {
            ready = status_within(&clusterd, 10 * SECOND)
                .and_then(|(status, _)| ready_count(&status, "many"));
            ready == Some(120)
        }),
        "{ready:?} of 120 workers ready; output:\n{}",
        clusterd.output()
    );
}

/// Removes a file when dropped.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_fifo_planted_under_the_kv_segment_name_does_not_slow_status() {
    // What any local user can create in world-writable /dev/shm: a FIFO named like the app's
    // KV segment. Opening it for reading would block until a writer comes.
    let prefix = format!("clusterd-faults-{}", std::process::id());
    let fifo =
        RemoveOnDrop(std::path::Path::new("/dev/shm").join(format!("{prefix}-0123456789abcdef")));
    nix::unistd::mkfifo(&fifo.0, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let clusterd = Clusterd::start(&format!(
        "[apps.web]\ncommand = [\"sleep\", \"1000\"]\nkv_segment = \"{prefix}\"\n"
    ));
    clusterd.wait_worker("web", 0, 10 * SECOND, |w| !w["pid"].is_null());
    for _ in 0..3 {
        let (_, took) = status_within(&clusterd, 5 * SECOND)
            .expect("status did not answer within 5 s with a FIFO planted in /dev/shm");
        assert!(took < 2 * SECOND, "status took {took:?}");
    }
}

/// Kills (when dropped) the processes whose command line is exactly `argv`.
struct KillOnDrop(Vec<String>);

impl KillOnDrop {
    fn pids(&self) -> Vec<Pid> {
        let wanted: Vec<u8> = self
            .0
            .iter()
            .flat_map(|a| [a.as_bytes(), b"\0"].concat())
            .collect();
        std::fs::read_dir("/proc")
            .expect("proc")
            .filter_map(|e| {
                let e = e.ok()?;
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                (std::fs::read(e.path().join("cmdline")).ok()? == wanted)
                    .then(|| Pid::from_raw(pid))
            })
            .collect()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

#[test]
fn after_a_sigkill_a_new_start_sweeps_escaped_children_holding_the_port_and_serves() {
    // Each worker leaves a double-forked, setsid'd sleeper holding the listening socket: it
    // is in no worker's process group, and PR_SET_PDEATHSIG does not reach it.
    let marker = KillOnDrop(vec!["sleep".into(), format!("1000.{}", std::process::id())]);
    let port = free_port();
    let clusterd = Clusterd::start(&format!(
        r#"
[sockets.http]
listen = "127.0.0.1:{port}"

[apps.web]
command = ["sh", "-c", "(setsid sleep {} &); exec {{hello}}"]
workers = 2
sockets = ["http"]
ready = "notify"
"#,
        marker.0[1]
    ));
    clusterd.wait_ready("web", 2, 20 * SECOND);
    assert!(
        wait_until(10 * SECOND, || marker.pids().len() == 2),
        "the escaped sleepers did not start"
    );
    let leftovers = marker.pids();
    clusterd.signal(Signal::SIGKILL);
    let clusterd = clusterd.start_again();
    clusterd.wait_ready("web", 2, 20 * SECOND);
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    assert!(
        crate::util::whoami(addr).is_ok(),
        "the new start does not serve"
    );
    // The leftovers of the killed run are gone; the new run's own sleepers are 2 (each
    // starts beside its worker, maybe after the worker is ready).
    let output = clusterd.output();
    assert!(output.contains("left by a previous run"), "{output}");
    assert!(leftovers.iter().all(|p| !crate::util::alive(*p)));
    let mut sleepers = Vec::new();
    assert!(
        wait_until(10 * SECOND, || {
            sleepers = marker.pids();
            sleepers.len() == 2
        }),
        "sleepers: {sleepers:?}"
    );
    assert!(sleepers.iter().all(|p| !leftovers.contains(p)));
}

/// The children of `pid` (all its threads').
fn children(pid: Pid) -> Vec<Pid> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                .flat_map(|c| {
                    c.split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .map(Pid::from_raw)
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Children of `pid` that are zombies.
fn zombies(pid: Pid) -> usize {
    children(pid)
        .into_iter()
        .filter(|c| {
            std::fs::read_to_string(format!("/proc/{c}/stat"))
                .is_ok_and(|s| s.rfind(')').and_then(|i| s[i + 2..].chars().next()) == Some('Z'))
        })
        .count()
}

#[test]
fn as_pid_1_of_a_pid_namespace_it_reaps_orphans_and_stops_cleanly() {
    // Each worker leaves an orphan behind that exits shortly after: in the namespace they
    // are re-parented to clusterd, PID 1, which must reap them.
    let manifest = r#"
[supervisor]
stop_timeout = "5s"
log_format = "json"

[apps.orphans]
command = ["sh", "-c", "sh -c 'sleep 0.3 &'; echo forked; exec sleep 1000"]
workers = 2
log_format = "text"
"#;
    let mut clusterd = Clusterd::start_wrapped(
        manifest,
        &["unshare", "--pid", "--fork", "--mount-proc"],
        |_| {},
    );
    clusterd.wait_for_lines("orphans[", 2, 10 * SECOND);
    clusterd.wait_for_lines("] forked", 2, 10 * SECOND);
    // `unshare` forks clusterd: its only child.
    let mut inner = Vec::new();
    assert!(wait_until(10 * SECOND, || {
        inner = children(clusterd.pid());
        inner.len() == 1
    }));
    let pid1 = inner[0];
    assert!(
        clusterd.output().contains("clusterd pid 1 running"),
        "clusterd is not PID 1 of its namespace:\n{}",
        clusterd.output()
    );
    // The orphans exit after 0.3 s and are reaped (only the log says so): no zombie stays
    // behind.
    assert!(
        wait_until(10 * SECOND, || clusterd.events("reaped").len() >= 2),
        "the orphans were not reaped:\n{}",
        clusterd.output()
    );
    assert!(
        wait_until(10 * SECOND, || zombies(pid1) == 0),
        "{} zombies under clusterd",
        zombies(pid1)
    );
    let stop = clusterd.ctl(&["stop"]);
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    let status = clusterd.wait_exit(10 * SECOND);
    assert!(status.success(), "{status:?}\n{}", clusterd.output());
}

/// The `0::` cgroup of `pid` (`/proc/PID/cgroup`).
fn cgroup_of(pid: Pid) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .expect("read cgroup")
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .expect("a cgroup v2 line")
}

#[test]
fn clusterd_moves_into_a_leaf_of_its_tree_beside_its_workers_and_leaves_nothing() {
    let mut clusterd = Clusterd::start(
        r#"
[sockets.http]
listen = "127.0.0.1:0"

[apps.web]
command = ["{hello}"]
workers = 2
sockets = ["http"]
ready = "notify"
"#,
    );
    clusterd.wait_ready("web", 2, 20 * SECOND);
    let status = clusterd.status();
    let containment = status["containment"]
        .as_str()
        .expect("containment")
        .to_owned();
    let Some(described) = containment.strip_prefix("cgroup v2 (") else {
        // Say why rather than pass: this machine gives clusterd no cgroup v2 it may write.
        eprintln!("SKIPPED: no cgroup v2 delegation here: {containment}");
        assert!(clusterd.stop().success());
        return;
    };
    let tree_dir = std::path::PathBuf::from(described.split(',').next().expect("the tree"));
    let tree = format!("/{}", tree_dir.file_name().expect("name").to_string_lossy());
    assert!(
        described.contains("clusterd in supervisor"),
        "{containment}"
    );
    // clusterd is in `<tree>/supervisor`; each worker in a sibling `<tree>/w-...`.
    let own = cgroup_of(clusterd.pid());
    assert!(own.ends_with(&format!("{tree}/supervisor")), "{own}");
    let base = own
        .trim_end_matches(&format!("{tree}/supervisor"))
        .to_owned();
    for (_, pid, _, _) in clusterd.serving("web") {
        let worker = cgroup_of(pid);
        let name = worker
            .strip_prefix(&format!("{base}{tree}/w-"))
            .unwrap_or_else(|| panic!("worker {pid} is in {worker}, not beside {own}"));
        assert!(
            name.starts_with("web.0.") || name.starts_with("web.1."),
            "{worker}"
        );
    }
    // The memory controller is on for the workers where the base offers it.
    let offered = std::fs::read_to_string(tree_dir.join("cgroup.controllers")).expect("read");
    match offered.split_whitespace().any(|c| c == "memory") {
        true => assert!(described.contains("memory controller on"), "{containment}"),
        false => eprintln!(
            "not checked here: the memory controller is not offered to cgroup v2 on this \
             machine (controllers: {offered:?}; a hybrid hierarchy keeps it on v1)"
        ),
    }
    assert!(clusterd.stop().success());
    // clusterd moved back out of its leaf and removed its tree.
    assert!(!tree_dir.exists(), "{} is left", tree_dir.display());
}
