//! The bundled manifests and the Node.js and Python examples, run under clusterd for real.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{
    Clusterd, app_in, clusterd_bin, example_bin, http_get, output_within, require, wait_until,
};

const SECOND: Duration = Duration::from_secs(1);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_bundled_manifests_are_valid() {
    for manifest in [
        "supervisor.toml",
        "examples/node/supervisor.toml",
        "examples/node/ipc.toml",
        "examples/python/supervisor.toml",
        "examples/kv-http/supervisor.toml",
        "examples/node-kv/supervisor.toml",
        "examples/node-socketio/clusterd.toml",
    ] {
        let output = Command::new(clusterd_bin())
            .arg("check")
            .arg(repo().join(manifest))
            .output()
            .expect("check");
        assert!(
            output.status.success(),
            "{manifest}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Runs `command` (an interpreter and a server script) as 2 workers with `ready = "notify"`,
/// checks both slots answer, rolls a reload, and stops cleanly.
fn serve_and_reload(interpreter: &str, script: &Path) {
    let mut clusterd = Clusterd::start(&format!(
        r#"
[supervisor]
stop_timeout = "10s"

[sockets.http]
listen = "127.0.0.1:0"

[apps.web]
command = ["{interpreter}", "{}"]
workers = 2
sockets = ["http"]
ready = "notify"
ready_timeout = "20s"
"#,
        script.display()
    ));
    let addr = clusterd.socket_addr("http");
    clusterd.wait_ready("web", 2, 30 * SECOND);
    let mut slots = std::collections::BTreeSet::new();
    assert!(
        wait_until(20 * SECOND, || {
            if let Ok(response) = http_get(addr, "/whoami") {
                assert_eq!(response.status, 200);
                let json: serde_json::Value = serde_json::from_str(&response.body).expect("json");
                slots.insert(json["slot"].as_u64().expect("slot"));
            }
            slots.len() == 2
        }),
        "not every slot answered: {slots:?}"
    );
    let output = clusterd.ctl(&["reload", "--wait"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        clusterd
            .serving("web")
            .iter()
            .all(|(_, _, generation, state)| *generation == 2 && state == "ready")
    );
    assert_eq!(http_get(addr, "/").expect("request").status, 200);
    assert!(clusterd.stop().success(), "{}", clusterd.output());
}

#[test]
fn the_node_example_serves_on_the_inherited_fd_and_reloads() {
    serve_and_reload("node", &repo().join("examples/node/server.js"));
}

#[test]
fn the_python_example_serves_on_the_inherited_fd_and_reloads() {
    serve_and_reload("python3", &repo().join("examples/python/server.py"));
}

#[test]
fn the_node_example_own_tests_pass() {
    let output = Command::new("node")
        .arg("--test")
        .arg(repo().join("examples/node"))
        .output()
        .expect("node");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_python_example_own_tests_pass() {
    let output = Command::new("python3")
        .args(["-m", "unittest", "discover", "-s"])
        .arg(repo().join("examples/python"))
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `examples/systemd`: the units pass `systemd-analyze verify`, with `ExecStart=` pointing at
/// the built clusterd (verify checks that it exists and is executable). On systemd older than
/// 253, which does not know `Type=notify-reload`, the variant the README gives for it
/// (`Type=notify` with `ExecReload=/bin/kill -HUP $MAINPID`) is verified instead. Any
/// warning fails the test.
#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let version = match Command::new("systemd-analyze").arg("--version").output() {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u32>().ok())
            .expect("systemd-analyze --version: `systemd N ...`"),
        other => {
            crate::util::require(&format!(
                "cannot run systemd-analyze ({other:?}); Debian's `systemd` package provides it"
            ));
            return;
        }
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let source = repo().join("examples/systemd");
    let readme = std::fs::read_to_string(source.join("README.md")).expect("README");
    let fallback = "Type=notify` with `ExecReload=/bin/kill -HUP $MAINPID`";
    assert!(readme.contains(fallback), "the README's fallback changed");
    for unit in ["clusterd.service", "clusterd.socket"] {
        let mut text = std::fs::read_to_string(source.join(unit)).expect("unit");
        text = text.replace(
            "/usr/local/bin/clusterd",
            &clusterd_bin().display().to_string(),
        );
        if version < 253 {
            text = text.replace(
                "Type=notify-reload\n",
                "Type=notify\nExecReload=/bin/kill -HUP $MAINPID\n",
            );
        }
        std::fs::write(dir.path().join(unit), text).expect("write unit");
    }
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("clusterd.service"))
        .arg(dir.path().join("clusterd.socket"))
        .output()
        .expect("systemd-analyze verify");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "systemd-analyze verify (systemd {version}): {:?}\n{said}",
        output.status
    );
}

/// `examples/kubernetes` for real under `podman kube play`. The image is the Dockerfile's
/// final stage built `FROM scratch` (no registry is reachable) from the built binaries and the
/// libraries `ldd` names. The pod spec runs as written but for test-unique names and its ports
/// published on free loopback ports (podman 4.3 publishes each `containerPort` on the same
/// host port, which parallel runs and other servers would share). clusterd is PID 1 and serves
/// through the pod; the spec's probe paths answer 200 from the host (podman 4.3 would run
/// `curl` inside the image, and does not resolve named ports); `podman pod stop` with the
/// spec's grace period ends clusterd with exit 0 (not the SIGKILL that ends the grace period)
/// after every worker's close hook ran.
#[test]
fn the_kubernetes_pod_spec_runs_under_podman_kube_play() {
    let Some(podman) = Podman::new() else {
        return;
    };
    let source = repo().join("examples/kubernetes");
    let dockerfile = std::fs::read_to_string(source.join("Dockerfile")).expect("Dockerfile");
    let spec = std::fs::read_to_string(source.join("pod.yaml")).expect("pod.yaml");

    let started = Instant::now();
    let context = podman.path("context");
    let containerfile = scratch_context(&dockerfile, Path::new(&context));
    std::fs::write(Path::new(&context).join("Containerfile"), containerfile).expect("write");
    podman.ok(&[
        "build",
        "--quiet",
        "--layers=false",
        "--tag",
        &podman.image,
        &context,
    ]);
    let built = started.elapsed();

    let (spec, host_ports) = podman.for_this_run(&spec);
    let spec_path = podman.path("pod.yaml");
    std::fs::write(&spec_path, &spec).expect("write pod.yaml");
    podman.ok(&["kube", "play", "--quiet", &spec_path]);
    // Pods name their containers `<pod>-<container>`.
    let container = format!("{}-clusterd", podman.pod);

    // The spec's probes, from the host.
    let probe = |kind: &str| {
        let (path, port) = probe_in(&spec, kind);
        let port = *host_ports
            .get(&port)
            .unwrap_or_else(|| panic!("{kind}: no port {port:?} in the spec"));
        (SocketAddr::from((Ipv4Addr::LOCALHOST, port)), path)
    };
    let (ready_addr, ready_path) = probe("readinessProbe");
    let mut last = None;
    assert!(
        wait_until(60 * SECOND, || {
            last = Some(http_get(ready_addr, &ready_path).map(|r| (r.status, r.body)));
            matches!(last, Some(Ok((200, _))))
        }),
        "{ready_path} never answered 200 (last: {last:?})\n{}",
        podman.logs(&container)
    );
    let (live_addr, live_path) = probe("livenessProbe");
    let live = http_get(live_addr, &live_path).expect("liveness probe");
    assert_eq!(live.status, 200, "{live_path}: {}", live.body);

    // clusterd is PID 1 with every worker ready; `status --check`, the exec probe, agrees.
    let clusterd = ["exec", &container, "/usr/local/bin/clusterd"];
    let manifest = ["-f", "/etc/clusterd/supervisor.toml"];
    let status = podman.ok(&[&clusterd[..], &["status", "--json"], &manifest].concat());
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    assert_eq!(status["pid"], 1, "{status:#}");
    let web = app_in(&status, "web").expect("app web");
    let desired = web["desired"].as_u64().expect("desired");
    assert!(desired > 0 && web["ready"] == desired, "{web:#}");
    let pids: Vec<i64> = web["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    podman.ok(&[&clusterd[..], &["status", "--check"], &manifest].concat());

    // A request through the pod's published `http` port reaches one of those workers.
    let http = SocketAddr::from((Ipv4Addr::LOCALHOST, host_ports["http"]));
    let response = http_get(http, "/whoami").expect("GET /whoami through the pod");
    assert_eq!(response.status, 200, "{}", response.body);
    let whoami: serde_json::Value = serde_json::from_str(&response.body).expect("whoami JSON");
    assert!(
        whoami["app"] == "web" && whoami["pid"].as_i64().is_some_and(|p| pids.contains(&p)),
        "{whoami} is not one of the workers {pids:?}"
    );

    // The kubelet's stop: SIGTERM, then SIGKILL after terminationGracePeriodSeconds.
    let grace = spec
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("terminationGracePeriodSeconds in pod.yaml");
    let stopping = Instant::now();
    podman.ok(&["pod", "stop", "--time", &grace.to_string(), &podman.pod]);
    let stopped = stopping.elapsed();
    let state = podman.ok(&[
        "inspect",
        "--format",
        "{{.State.Status}} {{.State.ExitCode}}",
        &container,
    ]);
    let logs = podman.logs(&container);
    assert_eq!(
        state.trim(),
        "exited 0",
        "stopped in {stopped:?}, grace period {grace} s\n{logs}"
    );
    for slot in 0..desired {
        let hook = format!("close hooks ran for web[{slot}]");
        assert!(
            logs.contains(&hook),
            "no {hook:?} in the pod's logs:\n{logs}"
        );
    }
    eprintln!(
        "podman: image built in {built:?}, pod stopped in {stopped:?}, {:?} in all",
        started.elapsed()
    );
}

/// A podman of the test's own: its configuration, image storage and state in a temp dir, and
/// names unique to this test process. `Drop` removes the pod and the image by name, even after
/// a failure, then waits for podman's helpers of this run (conmon and the `podman container
/// cleanup` it starts, which name the temp dir in their command lines) to be gone.
struct Podman {
    dir: tempfile::TempDir,
    /// The pod's name (the spec's `metadata.name`, made unique).
    pod: String,
    /// The image's name (the spec's `image`, made unique).
    image: String,
}

/// How long one podman command may take on a loaded machine.
const PODMAN_TIMEOUT: Duration = Duration::from_secs(120);

impl Podman {
    /// `None`, after [`require`] says why, where podman cannot run.
    fn new() -> Option<Self> {
        if let Err(err) = Command::new("podman").arg("--version").output() {
            require(&format!(
                "cannot run podman ({err}); Debian's `podman` and `runc` packages provide it"
            ));
            return None;
        }
        if !nix::unistd::geteuid().is_root() {
            require(
                "the test runs podman as root (rootless podman needs subuids and a user session)",
            );
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        // A container's rlimits may be no higher than podman's own: this host's hard limits
        // (the sandbox cannot raise them), and podman lowers RLIMIT_NPROC to kernel.pid_max.
        use nix::sys::resource::{Resource, getrlimit};
        let hard = |resource| getrlimit(resource).expect("getrlimit").1;
        let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .expect("pid_max")
            .trim()
            .parse()
            .expect("pid_max");
        let nofile = hard(Resource::RLIMIT_NOFILE).min(1 << 20);
        let nproc = hard(Resource::RLIMIT_NPROC).min(pid_max);
        let root = dir.path().display();
        std::fs::write(
            dir.path().join("containers.conf"),
            format!(
                r#"[containers]
default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]
log_driver = "k8s-file"

[engine]
# crun refuses a hybrid cgroup layout; cgroupfs needs no systemd.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{root}/events.log"
tmp_dir = "{root}/tmp"
"#
            ),
        )
        .expect("write containers.conf");
        std::fs::write(
            dir.path().join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{root}/storage\"\nrunroot = \"{root}/run\"\n"
            ),
        )
        .expect("write storage.conf");
        let podman = Podman {
            pod: format!("clusterd-hello-{}", std::process::id()),
            image: format!("localhost/clusterd-hello-{}:latest", std::process::id()),
            dir,
        };
        match podman.run(&["info", "--format", "{{.Host.OCIRuntime.Path}}"]) {
            Some(output) if output.status.success() => Some(podman),
            Some(output) => {
                require(&format!(
                    "podman cannot run here ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
                None
            }
            None => {
                require(&format!(
                    "`podman info` did not answer in {PODMAN_TIMEOUT:?}"
                ));
                None
            }
        }
    }

    /// `name` in the temp dir, as a string for podman's command line.
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// `podman ARGS` with this test's configuration; `None` if it did not finish in time.
    fn run(&self, args: &[&str]) -> Option<std::process::Output> {
        output_within(
            Command::new("podman")
                .args(args)
                .env("CONTAINERS_CONF", self.path("containers.conf"))
                .env("CONTAINERS_STORAGE_CONF", self.path("storage.conf")),
            PODMAN_TIMEOUT,
        )
    }

    /// `podman ARGS`, which must succeed: its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let output = self
            .run(args)
            .unwrap_or_else(|| panic!("podman {args:?}: not done in {PODMAN_TIMEOUT:?}"));
        assert!(
            output.status.success(),
            "podman {args:?}: {}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8")
    }

    /// What `container` wrote to its stdout and stderr.
    fn logs(&self, container: &str) -> String {
        match self.run(&["logs", container]) {
            Some(output) => format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
            None => format!("(podman logs {container}: not done in {PODMAN_TIMEOUT:?})"),
        }
    }

    /// The pod spec with this run's pod and image names, each port published on a free
    /// loopback port; and those ports by the port's name and by its number.
    fn for_this_run(&self, spec: &str) -> (String, HashMap<String, u16>) {
        let mut out = String::new();
        let mut ports = HashMap::new();
        let (mut in_metadata, mut port_name, mut renamed) = (false, None, 0);
        for line in spec.lines() {
            let indent = &line[..line.len() - line.trim_start().len()];
            let trimmed = line.trim();
            if indent.is_empty() && !trimmed.is_empty() && !trimmed.starts_with('#') {
                in_metadata = trimmed == "metadata:";
            }
            if in_metadata && indent.len() == 2 && trimmed.starts_with("name:") {
                out.push_str(&format!("{indent}name: {}\n", self.pod));
                renamed += 1;
            } else if trimmed.starts_with("image:") {
                out.push_str(&format!("{indent}image: {}\n", self.image));
                renamed += 1;
            } else {
                out.push_str(line);
                out.push('\n');
            }
            if let Some(name) = trimmed.strip_prefix("- name:") {
                port_name = Some(name.trim().to_owned());
            }
            if let Some(number) = trimmed.strip_prefix("containerPort:") {
                let port = free_port();
                out.push_str(&format!(
                    "{indent}hostPort: {port}\n{indent}hostIP: 127.0.0.1\n"
                ));
                ports.insert(number.trim().to_owned(), port);
                ports.insert(port_name.take().expect("a named port"), port);
            }
        }
        assert_eq!(
            renamed, 2,
            "pod.yaml: expected one metadata.name and one image"
        );
        (out, ports)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["pod", "rm", "--force", "--time", "0", &self.pod]);
        let _ = self.run(&["rmi", "--force", &self.image]);
        let dir = self.dir.path().as_os_str().as_encoded_bytes().to_vec();
        let naming_dir = || -> Vec<String> {
            let Ok(entries) = std::fs::read_dir("/proc") else {
                return Vec::new();
            };
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|pid| {
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                    cmdline
                        .windows(dir.len())
                        .any(|w| w == dir)
                        .then(|| format!("{pid}: {}", String::from_utf8_lossy(&cmdline)))
                })
                .collect()
        };
        if !wait_until(60 * SECOND, || naming_dir().is_empty()) && !std::thread::panicking() {
            panic!(
                "podman's processes of this run are still alive: {:?}",
                naming_dir()
            );
        }
    }
}

/// Writes into `context` the build context of the Dockerfile's final stage made `FROM
/// scratch`, and returns its Containerfile: the binaries it copies from the build stage come
/// from this build, beside the libraries `ldd` names for them and a `/tmp`.
fn scratch_context(dockerfile: &str, context: &Path) -> String {
    let stage = dockerfile
        .rfind("\nFROM ")
        .expect("the Dockerfile's final stage")
        + 1;
    let rootfs = context.join("rootfs");
    std::fs::create_dir_all(rootfs.join("tmp")).expect("mkdir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod");
    let mut containerfile = String::new();
    for line in dockerfile[stage..].lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["FROM", base] => {
                containerfile.push_str("FROM scratch\nCOPY rootfs/ /\n");
                // distroless's `nonroot` images run as uid and gid 65532.
                if base.ends_with(":nonroot") {
                    containerfile.push_str("USER 65532:65532\n");
                }
            }
            ["COPY", from, sources @ .., dest] if from.starts_with("--from=") => {
                let mut names = Vec::new();
                for source in sources {
                    let name = Path::new(source).file_name().expect("a file").to_str();
                    let name = name.expect("UTF-8");
                    let binary = match name {
                        "clusterd" => clusterd_bin(),
                        other => example_bin(other),
                    };
                    // Without its debug info: a quarter of the size, so a quicker build.
                    let stripped = Command::new("objcopy")
                        .arg("--strip-debug")
                        .arg(&binary)
                        .arg(context.join(name))
                        .status()
                        .expect("objcopy (binutils)");
                    assert!(
                        stripped.success(),
                        "objcopy --strip-debug {}",
                        binary.display()
                    );
                    for library in ldd(&binary) {
                        let to = rootfs.join(library.strip_prefix("/").expect("absolute"));
                        std::fs::create_dir_all(to.parent().expect("a dir")).expect("mkdir");
                        std::fs::copy(&library, to).expect("a library into the build context");
                    }
                    names.push(name);
                }
                containerfile.push_str(&format!("COPY {} {dest}\n", names.join(" ")));
            }
            ["COPY", sources @ .., _] => {
                for source in sources {
                    let to = context.join(source);
                    std::fs::create_dir_all(to.parent().expect("a dir")).expect("mkdir");
                    std::fs::copy(repo().join(source), to).expect("a file into the context");
                }
                containerfile.push_str(line);
                containerfile.push('\n');
            }
            _ => {
                containerfile.push_str(line);
                containerfile.push('\n');
            }
        }
    }
    containerfile
}

/// The shared libraries `binary` loads, the dynamic loader included, as `ldd` resolves them
/// here; none for a static binary.
fn ldd(binary: &Path) -> Vec<PathBuf> {
    let output = Command::new("ldd").arg(binary).output().expect("ldd");
    let said = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || said.contains("statically linked") {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("not a dynamic executable") || said.contains("statically linked"),
            "ldd {}: {stderr}",
            binary.display()
        );
        return Vec::new();
    }
    said.lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, resolved)) => resolved.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            assert_ne!(path, "not", "ldd {}: {line}", binary.display());
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The `httpGet` path and port (a name or a number) of the spec's `kind` probe.
fn probe_in(spec: &str, kind: &str) -> (String, String) {
    let lines: Vec<&str> = spec.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == format!("{kind}:"))
        .unwrap_or_else(|| panic!("no {kind} in pod.yaml"));
    let depth = |l: &str| l.len() - l.trim_start().len();
    let body = lines[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || depth(l) > depth(lines[start]));
    let (mut path, mut port) = (None, None);
    for line in body {
        if let Some(value) = line.trim().strip_prefix("path:") {
            path = Some(value.trim().to_owned());
        } else if let Some(value) = line.trim().strip_prefix("port:") {
            port = Some(value.trim().to_owned());
        }
    }
    (
        path.unwrap_or_else(|| panic!("{kind}: no httpGet path")),
        port.unwrap_or_else(|| panic!("{kind}: no httpGet port")),
    )
}

/// A TCP port free on the loopback interface right now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr").port()
}
