//! Runs the manifest corpus of the repository's `tests/manifests/`: every file in `bad/`
//! must be rejected with exactly the problems its `# expect:` lines state, every file in
//! `good/` must load, and no mutation of any of them may panic.

use std::fs;
use std::path::{Path, PathBuf};

/// The `.toml` files of `tests/manifests/{kind}`, sorted.
fn corpus(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/manifests")
        .join(kind);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

/// The `# expect:` lines of a corpus file (read as bytes: one of them is not UTF-8).
fn expectations(path: &Path) -> Vec<String> {
    let bytes = fs::read(path).unwrap();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|line| line.strip_prefix("# expect: "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn bad_manifests_report_exactly_the_expected_problems() {
    let files = corpus("bad");
    assert!(files.len() >= 15, "only {} bad manifests", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let expected = expectations(path);
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` line",
            path.display()
        );
        let output = match clusterd_manifest::load(path) {
            Ok(_) => {
                failures.push(format!("{}: accepted", path.display()));
                continue;
            }
            Err(err) => err.to_string(),
        };
        let lines: Vec<&str> = output.lines().collect();
        // Each line is "<path as given>:LINE:COL: ...", the path ending in the file name.
        let missing: Vec<&String> = expected
            .iter()
            .filter(|expect| {
                !lines
                    .iter()
                    .any(|line| line.contains(&format!("/{expect}")))
            })
            .collect();
        if !missing.is_empty() || lines.len() != expected.len() {
            failures.push(format!(
                "{}: {} problems reported, {} expected; missing: {missing:#?}\n{output}",
                path.display(),
                lines.len(),
                expected.len()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

#[test]
fn good_manifests_load() {
    let files = corpus("good");
    assert!(files.len() >= 3);
    for path in &files {
        if let Err(err) = clusterd_manifest::load(path) {
            panic!("{} was rejected:\n{err}", path.display());
        }
    }
}
