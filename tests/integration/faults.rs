//! Hostile or broken surroundings (issue 9): nothing a worker, a log reader or another local
//! user does may stall clusterd, leak its resources or outlive it.

use std::time::Duration;

use nix::unistd::Pid;

use crate::util::{Clusterd, wait_until};

const SECOND: Duration = Duration::from_secs(1);

/// How many descriptors `pid` has open.
fn fd_count(pid: Pid) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read fds")
        .count()
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
    clusterd.wait_for_line("ready after", 20 * SECOND);
    let before = fd_count(clusterd.pid());
    std::fs::write(clusterd.dir.path().join("go"), "").expect("write go");
    assert!(
        wait_until(20 * SECOND, || status_text(&clusterd, "sender", 0)
            .as_deref()
            == Some("sent")),
        "the worker's STATUS=sent never arrived"
    );
    let after = fd_count(clusterd.pid());
    assert_eq!(
        after, before,
        "clusterd's descriptors: {before} before, {after} after"
    );
}
