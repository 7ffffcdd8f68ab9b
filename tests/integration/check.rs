//! `clusterd check` on the manifest corpus (`tests/manifests/`): every bad manifest exits 2
//! and prints each problem its `# expect:` lines state, every good one exits 0, and nothing
//! panics.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::util::clusterd_bin;

/// How long one `clusterd check` may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// What a finished `clusterd check` left.
struct Checked {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `clusterd check manifest` with a deadline; its output goes to files in a temp dir so
/// that a full pipe can never block it.
fn check(manifest: &Path) -> Checked {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(clusterd_bin())
        .arg("check")
        .arg(manifest)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn clusterd check");
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "clusterd check {} did not finish in {CHECK_TIMEOUT:?}",
                manifest.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read =
        |path: &Path| String::from_utf8_lossy(&std::fs::read(path).expect("output")).into_owned();
    let checked = Checked {
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
    };
    for output in [&checked.stdout, &checked.stderr] {
        assert!(
            !output.contains("panicked"),
            "clusterd check {} panicked:\n{output}",
            manifest.display()
        );
    }
    checked
}

/// The `.toml` files of `tests/manifests/{kind}`, sorted.
fn corpus(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/manifests")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
}

#[test]
fn check_rejects_every_bad_manifest_with_its_problems() {
    let mut failures = Vec::new();
    for path in corpus("bad") {
        let checked = check(&path);
        let text = String::from_utf8_lossy(&std::fs::read(&path).expect("manifest")).into_owned();
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` line",
            path.display()
        );
        let mut wrong = Vec::new();
        if checked.status.code() != Some(2) {
            wrong.push(format!("exit status {}, expected 2", checked.status));
        }
        // Problems are printed as "<path as given>:LINE:COL: ...".
        for expect in expected {
            if !checked.stderr.contains(&format!("/{expect}")) {
                wrong.push(format!("stderr lacks `{expect}`"));
            }
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{}:\n  {}\nstderr:\n{}",
                path.display(),
                wrong.join("\n  "),
                checked.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn check_accepts_every_good_manifest() {
    for path in corpus("good") {
        let checked = check(&path);
        assert_eq!(
            checked.status.code(),
            Some(0),
            "{} was rejected:\n{}{}",
            path.display(),
            checked.stdout,
            checked.stderr
        );
    }
}

#[test]
fn check_names_a_missing_manifest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nowhere.toml");
    let checked = check(&missing);
    assert_eq!(checked.status.code(), Some(2), "{}", checked.stderr);
    assert!(
        checked
            .stderr
            .contains(&format!("cannot read manifest {}", missing.display())),
        "{}",
        checked.stderr
    );
}
