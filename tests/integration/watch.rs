//! `watch`: a change of a watched file rolls the app once (debounced), under load with no
//! failed request; a burst is one reload; a change during a rollout is one more rollout;
//! ignored paths reload nothing; SIGHUP, `clusterd upgrade` and the inotify watch limit.
//!
//! Each test first waits until clusterd holds the inotify watches it should (counted in
//! `/proc/PID/fdinfo`), so that no change is made before it can be seen. "Nothing happened" is
//! checked with a change that does reload afterwards: its reload must be the only one, with
//! its own path alone.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::intercept::{Load, start_run};
use crate::util::{Clusterd, alive, app_in, skip, wait_until};

const SECOND: Duration = Duration::from_secs(1);

/// The inotify descriptors of `pid`, each with the number of its watches (its `inotify wd:`
/// lines).
fn inotify_watches(pid: Pid) -> Vec<usize> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.filter_map(Result::ok)
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:inotify")
        })
        .filter_map(|fd| {
            let info = format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy());
            std::fs::read_to_string(info).ok()
        })
        .map(|info| {
            info.lines()
                .filter(|l| l.starts_with("inotify wd:"))
                .count()
        })
        .collect()
}

/// How many of `pid`'s threads are watch threads.
fn watch_threads(pid: Pid) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "clusterd-watch")
        .count()
}

/// Waits until clusterd holds one inotify descriptor, with exactly `n` watches (a watch that
/// replaced another is complete, and the other gone).
fn wait_watches(clusterd: &Clusterd, n: usize) {
    let mut held = Vec::new();
    assert!(
        wait_until(20 * SECOND, || {
            held = inotify_watches(clusterd.pid());
            held == [n]
        }),
        "clusterd holds inotify descriptors with {held:?} watches, not [{n}]; output:\n{}",
        clusterd.output()
    );
}

/// `touch PATH`, as a person would.
fn touch(path: &Path) {
    let status = Command::new("touch").arg(path).status().expect("touch");
    assert!(status.success(), "touch {}", path.display());
}

/// Waits until `app`'s last rollout completed `generation` and none runs.
fn wait_rolled(clusterd: &Clusterd, app: &str, generation: u64) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let done = clusterd.status_until(30 * SECOND, |status| {
        last = status.clone();
        app_in(status, app).is_some_and(|a| {
            a["last_reload"]["generation"] == generation && a["reloading"].is_null()
        })
    });
    assert!(
        done,
        "{app} did not complete generation {generation}: {last:#}\noutput:\n{}",
        clusterd.output()
    );
    last
}

/// The `watch_reload` events so far: (path, count).
fn watch_reloads(clusterd: &Clusterd) -> Vec<(String, u64)> {
    clusterd
        .events("watch_reload")
        .iter()
        .map(|e| {
            let path = e["path"].as_str().expect("path").to_owned();
            (path, e["count"].as_u64().expect("count"))
        })
        .collect()
}

/// Changes something that reloads, waits for its reload, and returns every `watch_reload`
/// so far: what came before it shows whether something else reloaded too.
fn sentinel(clusterd: &Clusterd, path: &str) -> Vec<(String, u64)> {
    touch(&clusterd.dir.path().join(path));
    clusterd.wait_event("watch_reload", 20 * SECOND, |e| e["path"] == path);
    watch_reloads(clusterd)
}

#[test]
fn touching_a_watched_file_rolls_the_app_once_with_no_failed_request() {
    let mut clusterd = Clusterd::start_with_files(
        r#"
[supervisor]
log_format = "json"

[sockets.http]
listen = "127.0.0.1:0"

[apps.web]
command = ["{hello}"]
workers = 2
sockets = ["http"]
ready = "notify"
# A path that does not exist is a warning: the others are watched.
watch = ["src", "missing"]
"#,
        &[("src/app.js", "// app\n"), ("src/lib/util.js", "// util\n")],
    );
    let addr = clusterd.socket_addr("http");
    clusterd.wait_ready("web", 2, 20 * SECOND);
    wait_watches(&clusterd, 2); // src and src/lib
    let before = clusterd.serving_pids("web");

    let load = Load::with_clients(addr, 4);
    touch(&clusterd.dir.path().join("src/lib/util.js"));
    clusterd.wait_event("rollout_done", 30 * SECOND, |e| e["generation"] == 2);
    let (answered, failures) = load.finish();
    assert!(answered > 0);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the reload: {failures:?}",
        failures.len(),
        answered + failures.len()
    );
    let serving = clusterd.serving("web");
    assert_eq!(serving.len(), 2);
    for (_, pid, generation, _) in &serving {
        assert_eq!(*generation, 2);
        assert!(!before.contains(pid), "{pid} was not replaced");
    }
    assert!(before.iter().all(|pid| !alive(*pid)));

    // Exactly one reload for the touch: the next change's reload is the second.
    let reloads = sentinel(&clusterd, "src/app.js");
    assert_eq!(
        reloads,
        [("src/lib/util.js".into(), 1), ("src/app.js".into(), 1)]
    );
    wait_rolled(&clusterd, "web", 3);
    assert!(clusterd.stop().success());
}

#[test]
fn five_hundred_files_written_in_one_burst_are_one_reload() {
    let mut clusterd = Clusterd::start_with_files(
        r#"
[supervisor]
log_format = "json"

[apps.web]
command = ["sleep", "1000"]
workers = 2
watch = ["src"]
# A loaded test machine may pause the writer: the burst's quiet time is generous.
watch_delay = "2s"

[apps.web.reload]
bake = "0s"
"#,
        &[("src/app.js", "// app\n")],
    );
    clusterd.wait_ready("web", 2, 20 * SECOND);
    wait_watches(&clusterd, 1);
    let src = clusterd.dir.path().join("src");
    for i in 0..500 {
        std::fs::write(src.join(format!("file{i}.js")), format!("// {i}\n")).expect("write");
    }
    let burst = clusterd.wait_event("watch_reload", 20 * SECOND, |_| true);
    assert!(burst["count"].as_u64() >= Some(500), "{burst}");
    wait_rolled(&clusterd, "web", 2);

    let reloads = sentinel(&clusterd, "src/app.js");
    assert_eq!(reloads.len(), 2, "one reload for the burst: {reloads:?}");
    wait_rolled(&clusterd, "web", 3);
    // (The log travels apart from status: wait for its lines, then count.)
    assert!(wait_until(10 * SECOND, || {
        clusterd.events("rollout_done").len() >= 2
    }));
    assert_eq!(clusterd.events("rollout_started").len(), 2);
    assert!(clusterd.stop().success());
}

/// A worker that becomes ready only when the test creates `go-<generation>` in the temp dir
/// (outside the watched `src`).
const GATED: &str = r#"#!/bin/sh
while [ ! -e "{dir}/go-$CLUSTERD_GENERATION" ]; do sleep 0.05; done
"$CLUSTERD_EXE" notify READY=1
exec sleep 1000
"#;

#[test]
fn changes_during_a_rollout_give_exactly_one_more() {
    let mut clusterd = Clusterd::start_with_files(
        r#"
[supervisor]
stop_timeout = "2s"
log_format = "json"

[apps.gated]
command = ["{dir}/gated.sh"]
ready = "notify"
watch = ["src"]
"#,
        &[("gated.sh", GATED), ("src/app.js", "// app\n")],
    );
    let dir = clusterd.dir.path().to_owned();
    std::fs::write(dir.join("go-1"), "").expect("go");
    clusterd.wait_ready("gated", 1, 20 * SECOND);
    wait_watches(&clusterd, 1);

    // Generation 2 starts and waits for go-2; two more bursts of changes meanwhile.
    touch(&dir.join("src/app.js"));
    clusterd.wait_event("rollout_started", 20 * SECOND, |e| e["generation"] == 2);
    for n in 2..=3 {
        touch(&dir.join("src/app.js"));
        assert!(
            wait_until(20 * SECOND, || clusterd.events("watch_reload").len() >= n),
            "{}",
            clusterd.output()
        );
    }
    assert!(wait_until(10 * SECOND, || {
        clusterd.events("reload_queued").len() >= 2
    }));
    for generation in [2, 3] {
        std::fs::write(dir.join(format!("go-{generation}")), "").expect("go");
    }
    wait_rolled(&clusterd, "gated", 3);
    assert!(wait_until(10 * SECOND, || {
        clusterd.events("rollout_done").len() >= 2
    }));
    let done: Vec<_> = clusterd
        .events("rollout_done")
        .iter()
        .map(|e| e["generation"].clone())
        .collect();
    assert_eq!(done, [2, 3], "exactly one more rollout");
    assert_eq!(clusterd.events("rollout_started").len(), 2);
    assert!(clusterd.stop().success());
}

#[test]
fn changes_under_node_modules_git_and_log_files_reload_nothing() {
    let mut clusterd = Clusterd::start_with_files(
        r#"
[supervisor]
log_format = "json"

[apps.web]
command = ["sleep", "1000"]
watch = true

[apps.web.reload]
bake = "0s"
"#,
        &[
            ("app.js", "// app\n"),
            ("node_modules/dep/index.js", "// dep\n"),
            (".git/HEAD", "ref: refs/heads/main\n"),
        ],
    );
    clusterd.wait_ready("web", 1, 20 * SECOND);
    // The temp dir alone: node_modules, .git and the run dir (.clusterd) are not watched.
    wait_watches(&clusterd, 1);
    let dir = clusterd.dir.path().to_owned();
    std::fs::write(dir.join("node_modules/dep/index.js"), "// v2\n").expect("write");
    std::fs::create_dir_all(dir.join("node_modules/new-dep/lib")).expect("mkdir");
    std::fs::write(dir.join("node_modules/new-dep/lib/x.js"), "//\n").expect("write");
    std::fs::create_dir_all(dir.join(".git/objects/ab")).expect("mkdir");
    std::fs::write(dir.join(".git/objects/ab/cdef"), "blob").expect("write");
    std::fs::write(dir.join(".git/index"), "index").expect("write");
    std::fs::write(dir.join("debug.log"), "a line\n").expect("write");
    std::fs::write(dir.join(".app.js.swp"), "swap").expect("write");

    let reloads = sentinel(&clusterd, "app.js");
    assert_eq!(reloads, [("app.js".into(), 1)], "only the sentinel reloads");
    wait_rolled(&clusterd, "web", 2);
    assert_eq!(
        inotify_watches(clusterd.pid()),
        [1],
        "nothing ignored got a watch"
    );
    assert!(clusterd.stop().success());
}

#[test]
fn a_watched_file_saved_by_rename_reloads_each_time_and_its_neighbours_do_not() {
    let mut clusterd = Clusterd::start_with_files(
        r#"
[supervisor]
log_format = "json"

[apps.web]
command = ["sleep", "1000"]
watch = ["app.js"]

[apps.web.reload]
bake = "0s"
"#,
        &[("app.js", "// v1\n"), ("other.js", "// other\n")],
    );
    clusterd.wait_ready("web", 1, 20 * SECOND);
    wait_watches(&clusterd, 1); // the file's directory
    let dir = clusterd.dir.path().to_owned();
    for (n, version) in ["// v2\n", "// v3\n"].into_iter().enumerate() {
        // An editor's save: a new file renamed over the old one (a new inode each time).
        std::fs::write(dir.join("other.js"), version).expect("write");
        std::fs::write(dir.join(".app.js.new"), version).expect("write");
        std::fs::rename(dir.join(".app.js.new"), dir.join("app.js")).expect("rename");
        let generation = n as u64 + 2;
        wait_rolled(&clusterd, "web", generation);
    }
    assert!(wait_until(10 * SECOND, || watch_reloads(&clusterd).len() >= 2));
    assert_eq!(
        watch_reloads(&clusterd),
        [("app.js".into(), 1), ("app.js".into(), 1)]
    );
    assert!(clusterd.stop().success());
}

#[test]
fn clusterd_run_watch_reloads_on_a_change_of_the_current_directory() {
    let mut clusterd = start_run(
        &["--watch", "--name", "w", "--", "sleep", "1000"],
        &[("app.js", b"// app\n")],
    );
    clusterd.wait_ready("w", 1, 20 * SECOND);
    wait_watches(&clusterd, 1);
    let first = clusterd.serving_pids("w");
    touch(&clusterd.dir.path().join("app.js"));
    wait_rolled(&clusterd, "w", 2);
    let now = clusterd.serving_pids("w");
    assert_eq!(now.len(), 1);
    assert_ne!(now, first);
    assert!(clusterd.stop().success());
}

#[test]
fn sighup_starts_and_ends_a_watch_and_an_upgrade_watches_again() {
    let manifest = r#"
[supervisor]
log_format = "json"

[apps.web]
command = ["sleep", "1000"]

[apps.web.reload]
bake = "0s"
"#;
    let mut clusterd = Clusterd::start_with_files(manifest, &[("src/app.js", "// app\n")]);
    clusterd.wait_ready("web", 1, 20 * SECOND);
    // Nothing is watched unless asked.
    assert!(inotify_watches(clusterd.pid()).is_empty());
    assert_eq!(watch_threads(clusterd.pid()), 0);

    let watched = manifest.replace(
        "command = [\"sleep\", \"1000\"]\n",
        "command = [\"sleep\", \"1000\"]\nwatch = [\"src\", \"later\"]\n",
    );
    clusterd.rewrite_manifest(&watched);
    clusterd.signal(Signal::SIGHUP);
    wait_watches(&clusterd, 1);
    assert_eq!(watch_threads(clusterd.pid()), 1);
    touch(&clusterd.dir.path().join("src/app.js"));
    wait_rolled(&clusterd, "web", 2);

    // `later` did not exist: once it does, a SIGHUP (no change) watches it too.
    std::fs::create_dir(clusterd.dir.path().join("later")).expect("mkdir");
    clusterd.signal(Signal::SIGHUP);
    wait_watches(&clusterd, 2);
    touch(&clusterd.dir.path().join("later/x.js"));
    clusterd.wait_event("watch_reload", 20 * SECOND, |e| e["path"] == "later/x.js");
    wait_rolled(&clusterd, "web", 3);

    // The upgraded clusterd (same pid) builds its watch again from the manifest.
    let upgrade = clusterd.ctl(&["upgrade"]);
    assert!(
        upgrade.status.success(),
        "{}{}",
        String::from_utf8_lossy(&upgrade.stdout),
        String::from_utf8_lossy(&upgrade.stderr)
    );
    wait_watches(&clusterd, 2);
    touch(&clusterd.dir.path().join("src/app.js"));
    wait_rolled(&clusterd, "web", 4);

    // Removing `watch` ends the watch thread and its inotify descriptor.
    clusterd.rewrite_manifest(manifest);
    clusterd.signal(Signal::SIGHUP);
    assert!(
        wait_until(20 * SECOND, || watch_threads(clusterd.pid()) == 0
            && inotify_watches(clusterd.pid()).is_empty()),
        "the watch outlived its removal; output:\n{}",
        clusterd.output()
    );
    assert!(wait_until(10 * SECOND, || watch_reloads(&clusterd).len() >= 3));
    assert_eq!(watch_reloads(&clusterd).len(), 3);
    assert!(clusterd.stop().success());
}

#[test]
fn the_inotify_watch_limit_is_a_warning_and_what_is_watched_still_reloads() {
    // A user namespace of its own, whose inotify watch limit is 3 (Linux 5.11+).
    let probe = Command::new("unshare")
        .args([
            "-U",
            "-r",
            "sh",
            "-c",
            "echo 3 > /proc/sys/user/max_inotify_watches",
        ])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        skip("no user namespace with its own inotify limits here (unshare -U)");
        return;
    }
    let mut clusterd = Clusterd::start_wrapped(
        r#"
[supervisor]
log_format = "json"

[apps.web]
command = ["sleep", "1000"]
watch = ["{dir}/src"]

[apps.web.reload]
bake = "0s"
"#,
        &[
            "unshare",
            "-U",
            "-r",
            "sh",
            "-c",
            "mkdir -p src/a src/b src/c src/d src/e \
             && echo 3 > /proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\"",
        ],
        |_| {},
    );
    clusterd.wait_ready("web", 1, 20 * SECOND);
    // src and two of its five directories.
    wait_watches(&clusterd, 3);
    clusterd.wait_for_line("inotify watch limit is reached", 20 * SECOND);
    touch(&clusterd.dir.path().join("src/app.js"));
    wait_rolled(&clusterd, "web", 2);
    assert!(clusterd.stop().success());
}
