//! Runs the binding's JavaScript tests (`test/*.test.js`, `node --test`) against a real
//! three-master Redis cluster started by `redis-cluster-fixture`, with the library cargo
//! built by `cargo build --workspace`. Builds nothing itself, and cargo does not build a
//! cdylib for its package's integration tests: so a library older than the crate's source is
//! refused rather than tested.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use redis_cluster_fixture::RedisCluster;

/// The longest the JavaScript suite may run.
const SUITE_TIMEOUT: Duration = Duration::from_secs(180);

/// The library of this profile: `target/<profile>/libclusterd_kv_node.so`, beside the `deps/`
/// directory this test binary lives in; it must be newer than `src/lib.rs`.
fn addon() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = profile_dir.join("libclusterd_kv_node.so");
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`)",
        path.display()
    );
    let modified = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs");
    assert!(
        modified(&path) >= modified(&source),
        "{} is older than {}: run `cargo build --workspace` first",
        path.display(),
        source.display()
    );
    path
}

/// The `node` binary: `$NODE`, else `node` on the `PATH`.
fn node() -> PathBuf {
    let node = std::env::var_os("NODE").map_or_else(|| PathBuf::from("node"), PathBuf::from);
    let works = Command::new(&node)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        works,
        "`{}` cannot be run: install Node.js 18 or newer (`.ci/run` does)",
        node.display()
    );
    node
}

/// The test files, sorted.
fn test_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read test dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".test.js"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.test.js in {}", dir.display());
    files
}

#[test]
fn node_test_suite_passes_against_a_redis_cluster() {
    let cluster = RedisCluster::start(3).expect("start a Redis cluster");
    let segments = tempfile::tempdir().expect("temp dir");
    let package = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(node())
        .arg("--test")
        .args(test_files(&package.join("test")))
        .current_dir(package)
        .env("REDIS_CLUSTER", cluster.seeds())
        .env("CLUSTERD_KV_DIR", segments.path())
        .env("CLUSTERD_KV_NODE_ADDON", addon())
        .env_remove("CLUSTERD_KV_SEGMENT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node --test");
    // Read both pipes on threads, so a chatty suite cannot block on a full pipe.
    let reader = |mut stream: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stream.read_to_string(&mut text);
            text
        })
    };
    let stdout = reader(Box::new(child.stdout.take().expect("stdout")));
    let stderr = reader(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + SUITE_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "node --test did not finish within {SUITE_TIMEOUT:?}:\n{}\n{}",
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (
        stdout.join().expect("stdout reader"),
        stderr.join().expect("stderr reader"),
    );
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(status.success(), "node --test failed ({status})");
    assert!(stdout.contains("# fail 0"), "unexpected summary:\n{stdout}");
}
