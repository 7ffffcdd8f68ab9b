//! The public API on hand-written manifests: defaults, relative path resolution, `"auto"`,
//! every key's value, error formatting, and reading files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clusterd_manifest::Signal;
use clusterd_manifest::{
    Backoff, Listen, ManifestError, Problem, Readiness, ReloadConfig, RestartPolicy, load, parse,
};

/// Parses `text` as if it were `/srv/app/supervisor.toml`.
fn parse_srv(text: &str) -> Result<clusterd_manifest::Manifest, ManifestError> {
    parse(text, Path::new("/srv/app/supervisor.toml"))
}

/// The problems of an invalid manifest.
fn problems(text: &str) -> Vec<Problem> {
    match parse_srv(text) {
        Ok(manifest) => panic!("accepted: {manifest:#?}"),
        Err(ManifestError::Invalid { problems, .. }) => problems,
        Err(other) => panic!("unexpected error: {other}"),
    }
}

/// The only problem of an invalid manifest, as `LINE:COL: KEY: MESSAGE`.
fn only_problem(text: &str) -> String {
    let problems = problems(text);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    problems[0].to_string()
}

#[test]
fn defaults() {
    let manifest = parse_srv("[apps.web]\ncommand = [\"hello\"]\n").unwrap();
    assert_eq!(manifest.path, PathBuf::from("/srv/app/supervisor.toml"));
    assert_eq!(manifest.dir, PathBuf::from("/srv/app"));
    assert_eq!(manifest.supervisor.stop_timeout, Duration::from_secs(10));
    assert_eq!(manifest.supervisor.run_dir, None);
    assert!(manifest.sockets.is_empty());
    assert_eq!(manifest.metrics, None);
    let web = &manifest.apps["web"];
    assert_eq!(web.command, ["hello"]);
    assert_eq!(web.workers, 1);
    assert!(web.sockets.is_empty());
    assert!(web.env.is_empty());
    assert_eq!(web.cwd, PathBuf::from("/srv/app"));
    assert_eq!(web.stop_signal, Signal::SIGTERM);
    assert_eq!(web.stop_timeout, Duration::from_secs(10));
    assert_eq!(web.restart, RestartPolicy::Always);
    assert_eq!(
        web.backoff,
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(10),
        }
    );
    assert_eq!(web.ready, Readiness::Immediate);
    assert_eq!(web.ready_timeout, Duration::from_secs(30));
    assert_eq!(web.watchdog, None);
    assert_eq!(web.kv_segment, None);
    assert_eq!(web.kv_watchdog, None);
    assert_eq!((web.max_memory, web.restart_limit), (None, None));
    assert!(!web.intercept);
    assert_eq!(
        web.reload,
        ReloadConfig {
            surge: 1,
            bake: Duration::from_secs(1),
            bake_each: false,
        }
    );
}

#[test]
fn socket_defaults() {
    let manifest = parse_srv(
        "[sockets.http]\nlisten = \"127.0.0.1:8000\"\n[apps.web]\ncommand = [\"hello\"]\nsockets = [\"http\"]\n",
    )
    .unwrap();
    // An app with sockets that says nothing about readiness waits a second.
    assert_eq!(
        manifest.apps["web"].ready,
        Readiness::Delay(Duration::from_secs(1))
    );
    let http = &manifest.sockets["http"];
    assert_eq!(http.listen, Listen::Tcp("127.0.0.1:8000".parse().unwrap()));
    assert_eq!(http.backlog, 1024);
    assert_eq!(http.mode, None);
    // Servers handed fd 3 never set TCP_NODELAY themselves: clusterd does, as Node, Go and nginx.
    assert!(http.tcp_nodelay);
    let off = parse_srv(
        "[sockets.http]\nlisten = \"127.0.0.1:8000\"\ntcp_nodelay = false\n[apps.web]\ncommand = [\"hello\"]\nsockets = [\"http\"]\n",
    )
    .unwrap();
    assert!(!off.sockets["http"].tcp_nodelay);
    // A socket bound on demand gets the same defaults.
    assert_eq!(
        clusterd_manifest::SocketConfig::with_defaults(http.listen.clone()),
        *http
    );
}

#[test]
fn every_key_is_read() {
    let text = r#"
        [supervisor]
        stop_timeout = "20s"
        run_dir = "/var/run/clusterd"

        [sockets.http]
        listen = "[::1]:8080"
        backlog = 16

        [sockets.admin]
        listen = "unix:/run/admin.sock"
        mode = 0o600

        [apps.web]
        command = ["/usr/bin/server", "--port", "8080"]
        workers = 3
        sockets = ["admin", "http"]
        env = { A = "1", B = "" }
        cwd = "/tmp"
        stop_signal = "int"
        restart = "never"
        backoff_initial = "1s"
        backoff_max = "1s"
        backoff_reset = "0s"
        ready = "delay"
        ready_timeout = "2m"
        watchdog = "500ms"
        kv_segment = "kv.seg-1"
        reload = { surge = 3, bake = "1m30s", bake_each = true }

        [metrics]
        listen = "127.0.0.1:9100"
    "#;
    let manifest = parse_srv(text).unwrap();
    assert_eq!(manifest.supervisor.stop_timeout, Duration::from_secs(20));
    assert_eq!(
        manifest.supervisor.run_dir,
        Some(PathBuf::from("/var/run/clusterd"))
    );
    assert_eq!(manifest.sockets["http"].backlog, 16);
    assert_eq!(
        manifest.sockets["admin"].listen,
        Listen::Unix(PathBuf::from("/run/admin.sock"))
    );
    assert_eq!(manifest.sockets["admin"].mode, Some(0o600));
    let web = &manifest.apps["web"];
    assert_eq!(web.command, ["/usr/bin/server", "--port", "8080"]);
    assert_eq!(web.workers, 3);
    // The order given is the fd order: admin is fd 3, http fd 4.
    assert_eq!(web.sockets, ["admin", "http"]);
    assert_eq!(web.env["A"], "1");
    assert_eq!(web.env["B"], "");
    assert_eq!(web.cwd, PathBuf::from("/tmp"));
    assert_eq!(web.stop_signal, Signal::SIGINT);
    // Inherited from [supervisor].
    assert_eq!(web.stop_timeout, Duration::from_secs(20));
    assert_eq!(web.restart, RestartPolicy::Never);
    assert_eq!(web.backoff.initial, Duration::from_secs(1));
    assert_eq!(web.backoff.max, Duration::from_secs(1));
    assert_eq!(web.backoff.reset_after, Duration::ZERO);
    assert_eq!(web.ready, Readiness::Delay(Duration::from_secs(1)));
    assert_eq!(web.ready_timeout, Duration::from_secs(120));
    assert_eq!(web.watchdog, Some(Duration::from_millis(500)));
    assert_eq!(web.kv_segment.as_deref(), Some("kv.seg-1"));
    assert_eq!(
        web.reload,
        ReloadConfig {
            surge: 3,
            bake: Duration::from_secs(90),
            bake_each: true,
        }
    );
    assert_eq!(
        manifest.metrics.unwrap().listen,
        "127.0.0.1:9100".parse().unwrap()
    );
}

#[test]
fn relative_paths_resolve_against_the_manifest_directory() {
    let text = r#"
        [supervisor]
        run_dir = "run"
        [sockets.s]
        listen = "unix:run/s.sock"
        [apps.web]
        command = ["./bin/server", "bin/x"]
        cwd = "../data"
        [apps.tool]
        command = ["python3", "./script.py"]
    "#;
    let manifest = parse_srv(text).unwrap();
    assert_eq!(
        manifest.supervisor.run_dir,
        Some(PathBuf::from("/srv/app/run"))
    );
    assert_eq!(
        manifest.sockets["s"].listen,
        Listen::Unix(PathBuf::from("/srv/app/run/s.sock"))
    );
    let web = &manifest.apps["web"];
    // Only argv[0] is a path clusterd resolves; arguments are the program's business.
    assert_eq!(web.command, ["/srv/app/bin/server", "bin/x"]);
    assert_eq!(web.cwd, PathBuf::from("/srv/app/../data"));
    // A bare name is left for PATH lookup at spawn time.
    assert_eq!(manifest.apps["tool"].command, ["python3", "./script.py"]);
}

#[test]
fn a_relative_manifest_path_is_made_absolute() {
    let manifest = parse(
        "[apps.a]\ncommand = [\"x\"]\n",
        Path::new("supervisor.toml"),
    )
    .unwrap();
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(manifest.path, cwd.join("supervisor.toml"));
    assert_eq!(manifest.dir, cwd);
    assert_eq!(manifest.apps["a"].cwd, cwd);
}

#[test]
fn auto_workers_is_the_number_of_cpus() {
    let manifest = parse_srv("[apps.web]\ncommand = [\"x\"]\nworkers = \"auto\"\n").unwrap();
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(manifest.apps["web"].workers, cpus);
}

#[test]
fn ready_modes() {
    let ready = |extra: &str| {
        parse_srv(&format!("[apps.web]\ncommand = [\"x\"]\n{extra}\n"))
            .unwrap()
            .apps["web"]
            .ready
    };
    assert_eq!(ready("ready = \"immediate\""), Readiness::Immediate);
    assert_eq!(ready("ready = \"notify\""), Readiness::Notify);
    assert_eq!(
        ready("ready = \"delay\"\nready_delay = \"250ms\""),
        Readiness::Delay(Duration::from_millis(250))
    );
}

#[test]
fn the_documented_message_format() {
    let text = "# comment\n\n[apps.web]\ncommand = [\"hello\"]\n\n\n\n\n\n\n\nworkers   = -3\n";
    let err = parse(text, Path::new("supervisor.toml")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "supervisor.toml:12:13: apps.web.workers: expected a positive integer or \"auto\", found -3"
    );
    let ManifestError::Invalid { path, problems } = err else {
        panic!("not Invalid");
    };
    assert_eq!(path, PathBuf::from("supervisor.toml"));
    assert_eq!(
        problems,
        [Problem {
            line: 12,
            column: 13,
            key: "apps.web.workers".to_owned(),
            message: "expected a positive integer or \"auto\", found -3".to_owned(),
        }]
    );
}

#[test]
fn problems_are_sorted_by_position() {
    let text = "[apps.b]\nworkers = 0\n[apps.a]\nworkers = 0\n";
    let lines: Vec<(usize, usize)> = problems(text).iter().map(|p| (p.line, p.column)).collect();
    assert_eq!(lines, [(1, 1), (2, 11), (3, 1), (4, 11)]);
}

#[test]
fn each_key_rejects_bad_values() {
    let app = |line: &str| only_problem(&format!("[apps.web]\ncommand = [\"x\"]\n{line}\n"));
    assert_eq!(
        app("workers = true"),
        "3:11: apps.web.workers: expected a positive integer or \"auto\", found true"
    );
    assert_eq!(
        app("sockets = [1]"),
        "3:12: apps.web.sockets: expected a string, found 1"
    );
    assert_eq!(
        app("env = { A = 1 }"),
        "3:13: apps.web.env.A: expected a string, found 1"
    );
    assert_eq!(
        app("env = { \"\" = \"x\" }"),
        "3:9: apps.web.env.\"\": an environment variable name must not be empty"
    );
    assert_eq!(
        app("cwd = \"\""),
        "3:7: apps.web.cwd: expected a non-empty path, found \"\""
    );
    assert_eq!(
        app("cwd = 1"),
        "3:7: apps.web.cwd: expected a string, found 1"
    );
    assert_eq!(
        app("stop_signal = \"KILLME\""),
        "3:15: apps.web.stop_signal: expected a signal name like \"SIGTERM\" or \"TERM\", or a number, found \"KILLME\""
    );
    assert_eq!(
        app("stop_timeout = \"forever\""),
        "3:16: apps.web.stop_timeout: expected a duration like \"10s\" or \"250ms\", found \"forever\""
    );
    assert_eq!(
        app("restart = true"),
        "3:11: apps.web.restart: expected one of \"always\", \"on-failure\", \"never\", found true"
    );
    assert_eq!(
        app("backoff_initial = \"0s\""),
        "3:19: apps.web.backoff_initial: expected a duration greater than zero, found \"0s\""
    );
    assert_eq!(
        app("backoff_max = \"50ms\""),
        "3:15: apps.web.backoff_max: backoff_max (50ms) must not be less than backoff_initial (100ms)"
    );
    assert_eq!(
        app("ready = 1"),
        "3:9: apps.web.ready: expected one of \"immediate\", \"delay\", \"notify\", \"listen\", \"message\", found 1"
    );
    assert_eq!(
        app("ready = \"delay\"\nready_delay = \"x\""),
        "4:15: apps.web.ready_delay: expected a duration like \"10s\" or \"250ms\", found \"x\""
    );
    assert_eq!(
        app("ready_timeout = \"0ms\""),
        "3:17: apps.web.ready_timeout: expected a duration greater than zero, found \"0ms\""
    );
    assert_eq!(
        app("watchdog = \"0s\""),
        "3:12: apps.web.watchdog: expected a duration greater than zero, found \"0s\""
    );
    assert_eq!(
        app("kv_segment = \"\""),
        "3:14: apps.web.kv_segment: expected a name made of letters, digits, '_', '.' and '-', found \"\""
    );
    assert_eq!(
        app("reload = { surge = -1 }"),
        "3:20: apps.web.reload.surge: expected an integer from 1 to 4096, found -1"
    );
    assert_eq!(
        app("reload = { bake = 0 }"),
        "3:19: apps.web.reload.bake: expected a duration like \"10s\" or \"250ms\", found 0"
    );
    assert_eq!(
        app("reload = { bake_each = \"yes\" }"),
        "3:24: apps.web.reload.bake_each: expected true or false, found \"yes\""
    );
    assert_eq!(app("command = [\"y\"]"), "3:1: syntax: duplicate key");
}

#[test]
fn socket_and_supervisor_keys_reject_bad_values() {
    let with_app = |text: &str| only_problem(&format!("{text}\n[apps.web]\ncommand = [\"x\"]\n"));
    assert_eq!(
        with_app("[sockets.s]\nlisten = 8000"),
        "2:10: sockets.s.listen: expected a string, found 8000"
    );
    assert_eq!(
        with_app("[sockets.s]\nlisten = \"127.0.0.1:0\"\nbacklog = 70000"),
        "3:11: sockets.s.backlog: expected an integer from 1 to 65535, found 70000"
    );
    assert_eq!(
        with_app("[sockets.s]\nlisten = \"unix:s.sock\"\nmode = \"1777\""),
        "3:8: sockets.s.mode: expected an octal mode like \"0660\" or 0o660, at most 0o777, found \"1777\""
    );
    assert_eq!(
        with_app("[sockets]\ns = 1"),
        "2:5: sockets.s: expected a table, found 1"
    );
    assert_eq!(
        with_app("[supervisor]\nrun_dir = [\"run\"]"),
        "2:11: supervisor.run_dir: expected a string, found an array"
    );
    assert_eq!(
        with_app("[metrics]"),
        "1:1: metrics.listen: missing required key \"listen\" (a TCP address like \"127.0.0.1:9100\")"
    );
    assert_eq!(
        with_app("[metrics]\nlisten = \"9100\""),
        "2:10: metrics.listen: expected \"host:port\" or \"[v6]:port\", found \"9100\""
    );
}

#[test]
fn a_socket_with_a_problem_is_still_defined_for_apps() {
    // Only the socket's own problem: the app's reference to it is not reported as unknown.
    let text = "[sockets.s]\nlisten = \"nope\"\n[apps.web]\ncommand = [\"x\"]\nsockets = [\"s\"]\n";
    assert_eq!(
        only_problem(text),
        "2:10: sockets.s.listen: expected \"host:port\", \"[v6]:port\" or \"unix:/path\", found \"nope\""
    );
}

#[test]
fn unusual_but_valid_values() {
    let text = r#"
        sockets."web.v2-x_1" = { listen = "localhost:0" }
        [apps."web.v2"]
        command = ["x", "", "ü"]
        sockets = ["web.v2-x_1"]
        stop_signal = "9"
        workers = 4096
        env = { "ÄNDERUNG" = "ja", lower = "a=b" }
    "#;
    let manifest = parse_srv(text).unwrap();
    let Listen::Tcp(addr) = manifest.sockets["web.v2-x_1"].listen else {
        panic!("not TCP");
    };
    assert!(addr.ip().is_loopback());
    let app = &manifest.apps["web.v2"];
    assert_eq!(app.command, ["x", "", "ü"]);
    assert_eq!(app.stop_signal, Signal::SIGKILL);
    assert_eq!(app.workers, 4096);
    assert_eq!(app.env["lower"], "a=b");
}

#[test]
fn load_reads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("supervisor.toml");
    std::fs::write(&path, "[apps.web]\ncommand = [\"bin/hello\"]\n").unwrap();
    let manifest = load(&path).unwrap();
    assert_eq!(manifest.path, path);
    assert_eq!(manifest.dir, dir.path());
    assert_eq!(
        manifest.apps["web"].command,
        [dir.path().join("bin/hello").to_string_lossy()]
    );
}

#[test]
fn load_reports_unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let err = load(&missing).unwrap_err();
    assert!(matches!(err, ManifestError::Read { ref path, .. } if *path == missing));
    assert_eq!(
        err.to_string(),
        format!("cannot read manifest {}", missing.display())
    );
    assert!(
        std::error::Error::source(&err).is_some(),
        "the cause is its source"
    );

    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, ManifestError::Read { .. }), "{err}");

    let huge = dir.path().join("huge.toml");
    std::fs::write(&huge, "#".repeat(2 << 20)).unwrap();
    let err = load(&huge).unwrap_err();
    let cause = std::error::Error::source(&err).map(ToString::to_string);
    assert!(
        cause
            .as_deref()
            .is_some_and(|c| c.contains("larger than 1024 KiB")),
        "{err}: {cause:?}"
    );
}

#[test]
fn load_reports_invalid_utf8_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latin1.toml");
    std::fs::write(&path, b"[apps.web]\ncommand = [\"caf\xe9\"]\n").unwrap();
    let err = load(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:2:16: syntax: invalid UTF-8: a manifest must be UTF-8 text",
            path.display()
        )
    );
}

#[test]
fn kv_watchdog_needs_a_kv_segment() {
    let error = parse_srv("[apps.web]\ncommand = [\"hello\"]\nkv_watchdog = \"5s\"\n")
        .unwrap_err()
        .to_string();
    assert!(error.contains("set kv_segment too"), "{error}");
    let manifest =
        parse_srv("[apps.web]\ncommand = [\"hello\"]\nkv_segment = \"kv\"\nkv_watchdog = \"5s\"\n")
            .unwrap();
    assert_eq!(
        manifest.apps["web"].kv_watchdog,
        Some(Duration::from_secs(5))
    );
}

#[test]
fn log_settings_inherit_from_the_supervisor() {
    use clusterd_manifest::{LogFormat, LogTarget};
    let manifest = parse_srv(
        "[supervisor]\nlog = \"logs/\"\nlog_max_size = \"10M\"\nlog_keep = 3\n\
         [apps.web]\ncommand = [\"hello\"]\n\
         [apps.api]\ncommand = [\"hello\"]\nlog = \"api.log\"\nlog_format = \"json\"\nlog_keep = 0\n\
         [apps.out]\ncommand = [\"hello\"]\nlog = \"stdout\"\n",
    )
    .unwrap();
    let supervisor = &manifest.supervisor.log;
    assert_eq!(
        supervisor.target,
        Some(LogTarget::Dir(PathBuf::from("/srv/app/logs")))
    );
    assert_eq!(supervisor.max_size, Some(10 << 20));
    let web = &manifest.apps["web"].log;
    assert_eq!(web, supervisor);
    let api = &manifest.apps["api"].log;
    assert_eq!(
        api.target,
        Some(LogTarget::File(PathBuf::from("/srv/app/api.log")))
    );
    assert_eq!(
        (api.format, api.max_size, api.keep),
        (LogFormat::Json, Some(10 << 20), 0)
    );
    assert_eq!(manifest.apps["out"].log.target, Some(LogTarget::Stdout));

    let plain = parse_srv("[apps.web]\ncommand = [\"hello\"]\n").unwrap();
    let log = &plain.apps["web"].log;
    assert_eq!(
        (&log.target, log.format, log.max_size, log.keep),
        (&None, LogFormat::Text, None, 5)
    );
}

#[test]
fn bad_log_settings_are_reported() {
    let problems = problems(
        "[apps.web]\ncommand = [\"hello\"]\nlog = 3\nlog_format = \"xml\"\n\
         log_max_size = \"lots\"\nlog_keep = -1\n",
    );
    let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(text.len(), 4, "{text:#?}");
    assert!(
        text[1].contains("expected one of \"text\", \"json\""),
        "{text:#?}"
    );
}

#[test]
fn ipc_defaults_on_for_node_and_its_keys_need_it() {
    let app =
        |text: &str| parse_srv(&format!("[apps.web]\n{text}\n")).map(|m| m.apps["web"].clone());
    let node = app("command = [\"node\", \"server.js\"]").unwrap();
    assert!(node.ipc && !node.ipc_broadcast && !node.stop_disconnect);
    let node = app("command = [\"/usr/bin/node\", \"s.js\"]\nipc = false").unwrap();
    assert!(!node.ipc);
    assert!(!app("command = [\"python3\", \"w.py\"]").unwrap().ipc);
    let opted = app(
        "command = [\"w\"]\nipc = true\nipc_broadcast = true\nready = \"message\"\nstop_signal = \"disconnect\"",
    )
    .unwrap();
    assert!(opted.ipc && opted.ipc_broadcast && opted.stop_disconnect);
    assert_eq!(opted.ready, Readiness::Message);
    assert_eq!(opted.stop_signal, Signal::SIGTERM);
    let err = app("command = [\"w\"]\nipc_broadcast = true\nready = \"message\"\nstop_signal = \"disconnect\"")
        .unwrap_err()
        .to_string();
    for key in ["ipc_broadcast", "ready", "stop_signal"] {
        assert!(err.contains(&format!("apps.web.{key}:")), "{key}: {err}");
    }
}

#[test]
fn balance_is_for_apps_with_sockets() {
    use clusterd_manifest::Balance;
    let intercepted = |extra: &str| {
        format!(
            "[sockets.http]\nlisten = \"127.0.0.1:8080\"\n[apps.web]\ncommand = [\"node\", \"app.js\"]\n\
             sockets = [\"http\"]\nintercept = true\n{extra}\n"
        )
    };
    let manifest = parse_srv(&intercepted("")).unwrap();
    assert_eq!(manifest.apps["web"].balance, Balance::RoundRobin);
    let manifest = parse_srv(&intercepted("balance = \"ip-hash\"")).unwrap();
    assert_eq!(manifest.apps["web"].balance, Balance::IpHash);
    let manifest = parse_srv(&intercepted("balance = \"random\"")).unwrap();
    assert_eq!(manifest.apps["web"].balance, Balance::Random);
    // Shared: one queue, so nothing to drain from.
    let manifest = parse_srv(&intercepted("balance = \"shared\"")).unwrap();
    assert_eq!(manifest.apps["web"].balance, Balance::Shared);
    assert_eq!(manifest.apps["web"].drain, None);
    assert_eq!(
        only_problem(&intercepted("balance = \"least\"")),
        "7:11: apps.web.balance: expected one of \"round-robin\", \"least-queued\", \"random\", \"ip-hash\", \"shared\", found \"least\""
    );
    let error = only_problem(&intercepted("drain = \"2s\"\nbalance = \"shared\""));
    assert!(
        error.contains("apps.web.drain") && error.contains("one"),
        "{error}"
    );
    // drain = "0s" is no delay, still steered.
    let manifest = parse_srv(&intercepted("drain = \"0s\"\nbalance = \"ip-hash\"")).unwrap();
    assert_eq!(manifest.apps["web"].balance, Balance::IpHash);
    assert_eq!(manifest.apps["web"].drain, None);
    let error = only_problem("[apps.web]\ncommand = [\"x\"]\nbalance = \"ip-hash\"\n");
    assert!(
        error.contains("balance applies to apps with sockets"),
        "{error}"
    );
}

#[test]
fn multi_worker_apps_are_steered_by_default_and_one_worker_shares_its_queue() {
    use clusterd_manifest::Balance;
    let app = |extra: &str| {
        format!(
            "[sockets.http]\nlisten = \"127.0.0.1:8080\"\n[apps.web]\ncommand = [\"server\"]\n\
             sockets = [\"http\"]\n{extra}\n"
        )
    };
    let balance = |extra: &str| parse_srv(&app(extra)).unwrap().apps["web"].balance;
    assert_eq!(balance(""), Balance::Shared);
    assert_eq!(balance("workers = 1"), Balance::Shared);
    assert_eq!(balance("workers = 2"), Balance::RoundRobin);
    assert_eq!(balance("workers = \"auto\""), Balance::RoundRobin);
    assert_eq!(balance("drain = \"1s\""), Balance::RoundRobin);
    assert_eq!(
        balance("workers = 2\nbalance = \"shared\""),
        Balance::Shared
    );
    assert_eq!(balance("balance = \"random\""), Balance::Random);
    assert_eq!(balance("balance = \"round-robin\""), Balance::RoundRobin);
    assert_eq!(balance("balance = \"least-queued\""), Balance::LeastQueued);
    let manifest = parse_srv(&app("workers = 2")).unwrap();
    assert_eq!(manifest.apps["web"].drain, None);
}

#[test]
fn drain_steers_any_app_with_sockets_when_it_is_set() {
    use clusterd_manifest::Balance;
    let app = |extra: &str| {
        format!(
            "[sockets.http]\nlisten = \"127.0.0.1:8080\"\n[apps.web]\ncommand = [\"server\"]\n\
             workers = 2\nsockets = [\"http\"]\n{extra}\n"
        )
    };
    assert_eq!(parse_srv(&app("")).unwrap().apps["web"].drain, None);
    let manifest = parse_srv(&app("drain = \"2s\"\nbalance = \"ip-hash\"")).unwrap();
    assert_eq!(manifest.apps["web"].drain, Some(Duration::from_secs(2)));
    assert_eq!(manifest.apps["web"].balance, Balance::IpHash);
    assert_eq!(
        parse_srv(&app("drain = \"0s\"")).unwrap().apps["web"].drain,
        None
    );
    let error = only_problem("[apps.web]\ncommand = [\"x\"]\ndrain = \"1s\"\n");
    assert!(
        error.contains("drain applies to apps with sockets"),
        "{error}"
    );
}

#[test]
fn ip_hash_needs_its_sockets_to_itself() {
    let error = only_problem(
        "[sockets.http]\nlisten = \"127.0.0.1:8080\"\n\
         [apps.a]\ncommand = [\"x\"]\nsockets = [\"http\"]\ndrain = \"1s\"\nbalance = \"ip-hash\"\n\
         [apps.b]\ncommand = [\"x\"]\nsockets = [\"http\"]\ndrain = \"1s\"\n",
    );
    assert!(
        error.contains("apps.a.balance: balance = \"ip-hash\" needs the app's sockets to itself: socket \"http\" is also used by app \"b\""),
        "{error}"
    );
}

#[test]
fn watch_paths_resolve_against_the_app_cwd_and_its_keys_need_it() {
    use clusterd_manifest::WatchConfig;
    let app = |extra: &str| format!("[apps.web]\ncommand = [\"node\", \"app.js\"]\n{extra}\n");
    let manifest = parse_srv(&app("")).unwrap();
    assert_eq!(
        manifest.apps["web"].watch, None,
        "nothing is watched unless asked"
    );
    let manifest = parse_srv(&app("watch = false")).unwrap();
    assert_eq!(manifest.apps["web"].watch, None);
    let manifest = parse_srv(&app("watch = true")).unwrap();
    assert_eq!(
        manifest.apps["web"].watch,
        Some(WatchConfig {
            paths: vec![PathBuf::from("/srv/app")],
            ignore: Vec::new(),
            delay: Duration::from_millis(500),
        })
    );
    let manifest = parse_srv(&app(
        "cwd = \"web\"\nwatch = [\"src\", \"./app.js\", \"/etc/app.conf\"]\n\
         watch_ignore = [\"*.tmp\", \"src/generated\"]\nwatch_delay = \"1s\"",
    ))
    .unwrap();
    assert_eq!(
        manifest.apps["web"].watch,
        Some(WatchConfig {
            paths: vec![
                PathBuf::from("/srv/app/web/src"),
                PathBuf::from("/srv/app/web/app.js"),
                PathBuf::from("/etc/app.conf"),
            ],
            ignore: vec!["*.tmp".into(), "src/generated".into()],
            delay: Duration::from_secs(1),
        })
    );
    assert_eq!(
        only_problem(&app("watch = []")),
        "3:9: apps.web.watch: expected true, false or a non-empty array of paths (relative to \
         the app's cwd), found an empty array"
    );
    assert_eq!(
        only_problem(&app("watch = true\nwatch_ignore = [\"src/[\"]")),
        "4:17: apps.web.watch_ignore: not a glob pattern: unclosed character class; missing ']'"
    );
    assert_eq!(
        only_problem(&app("watch = true\nwatch_delay = \"0s\"")),
        "4:15: apps.web.watch_delay: expected a duration greater than zero, found \"0s\""
    );
    assert_eq!(
        only_problem(&app("watch_ignore = [\"dist\"]")),
        "3:16: apps.web.watch_ignore: watch_ignore applies to watched files: set watch too"
    );
}

#[test]
fn several_workers_without_sockets_are_intercepted_where_the_kernel_can() {
    use clusterd_manifest::AutoIntercept;
    let app = |extra: &str| format!("[apps.web]\ncommand = [\"node\", \"child.js\"]\n{extra}\n");
    // Just `command` and `workers`: as without interception until the supervisor resolves it.
    let mut manifest = parse_srv(&app("workers = 2")).unwrap();
    let web = &manifest.apps["web"];
    assert!(!web.intercept);
    assert_eq!((web.drain, web.ready), (None, Readiness::Immediate));
    let auto = AutoIntercept {
        drain: Some(Duration::from_secs(1)),
        ready: Readiness::ListenOrDelay(Duration::from_secs(5)),
    };
    assert_eq!(web.intercept_auto, Some(auto));
    let mut unavailable = manifest.clone();
    assert_eq!(unavailable.resolve_interception(false), vec!["web"]);
    assert!(!unavailable.apps["web"].intercept && unavailable.apps["web"].intercept_auto.is_none());
    assert_eq!(manifest.resolve_interception(true), vec!["web"]);
    let web = &manifest.apps["web"];
    assert!(web.intercept && web.intercept_auto.is_none());
    assert_eq!((web.drain, web.ready), (auto.drain, auto.ready));
    // What the app says wins.
    let written = parse_srv(&app("workers = 2\nready = \"notify\"\ndrain = \"0s\"")).unwrap();
    let written = written.apps["web"].intercept_auto.unwrap();
    assert_eq!((written.drain, written.ready), (None, Readiness::Notify));
    let listen = parse_srv(&app("workers = 2\nready = \"listen\"")).unwrap();
    assert_eq!(
        listen.apps["web"].intercept_auto.unwrap().ready,
        Readiness::Listen
    );
    // One worker, declared sockets, or `intercept` written: no default.
    for text in [
        app("workers = 1"),
        app("workers = 2\nintercept = false"),
        format!(
            "[sockets.http]\nlisten = \"127.0.0.1:8080\"\n{}",
            app("workers = 2\nsockets = [\"http\"]")
        ),
    ] {
        assert_eq!(
            parse_srv(&text).unwrap().apps["web"].intercept_auto,
            None,
            "{text}"
        );
    }
    // intercept = true needs no socket: binds are answered with sockets bound on demand.
    let explicit = parse_srv(&app("intercept = true")).unwrap();
    assert!(explicit.apps["web"].intercept);
    assert_eq!(explicit.apps["web"].ready, Readiness::Listen);
    let timed = parse_srv(&app(
        "intercept = true\nready = \"listen\"\nready_delay = \"3s\"",
    ))
    .unwrap();
    assert_eq!(
        timed.apps["web"].ready,
        Readiness::ListenOrDelay(Duration::from_secs(3))
    );
}
