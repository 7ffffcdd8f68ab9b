//! Robustness: no input makes the parser panic. Feeds every prefix of every corpus manifest
//! and many random mutations of them, resolving host names without the network (a mutated
//! address may name any host).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::{ManifestError, parse_with};

/// Resolves `localhost` only, so that no mutation sends a DNS query.
fn offline_resolver(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if host == "localhost" {
        Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
    } else {
        Err(io::Error::new(io::ErrorKind::NotFound, "offline"))
    }
}

/// Every corpus manifest, as text (lossy for the one that is not UTF-8).
fn corpus() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/manifests");
    let mut files = Vec::new();
    for kind in ["good", "bad"] {
        for entry in std::fs::read_dir(root.join(kind)).unwrap() {
            let path = entry.unwrap().path();
            let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
            files.push((path, text));
        }
    }
    assert!(files.len() > 20);
    files
}

/// How a parse ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Valid,
    Syntax,
    Invalid,
}

/// Parses `text` and checks what any outcome must satisfy.
fn check(text: &str) -> Outcome {
    let path = Path::new("/fuzz/supervisor.toml");
    match parse_with(text, path, offline_resolver, &|_| None) {
        Ok(manifest) => {
            assert!(!manifest.apps.is_empty());
            for app in manifest.apps.values() {
                assert!(app.workers >= 1 && !app.command.is_empty(), "{text}");
            }
            Outcome::Valid
        }
        Err(ManifestError::Invalid { problems, .. }) => {
            assert!(!problems.is_empty(), "no problem listed for:\n{text}");
            let lines = text.split('\n').count();
            for problem in &problems {
                assert!(
                    problem.line >= 1 && problem.line <= lines,
                    "{problem} in:\n{text}"
                );
                assert!(problem.column >= 1, "{problem}");
                assert!(!problem.message.is_empty(), "{problem}");
            }
            if problems[0].key == "syntax" {
                Outcome::Syntax
            } else {
                Outcome::Invalid
            }
        }
        Err(other) => panic!("unexpected error {other} for:\n{text}"),
    }
}

#[test]
fn every_prefix_of_the_corpus() {
    for (_, text) in corpus() {
        for (end, _) in text.char_indices() {
            check(&text[..end]);
        }
    }
}

/// A small deterministic PRNG (xorshift64*), so that a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Fragments that make TOML and the schema interesting.
const FRAGMENTS: &[&str] = &[
    "\"",
    "'",
    "[",
    "]",
    "[[",
    "{",
    "}",
    "=",
    ",",
    ".",
    "\n",
    "#",
    "-",
    "0",
    "-1",
    "\"auto\"",
    "9223372036854775807",
    "-9223372036854775808",
    "99999999999999999999",
    "0x7f",
    "0o777",
    "1e400",
    "nan",
    "-inf",
    "1.5",
    "true",
    "1979-05-27",
    "\"\"",
    "[]",
    "{}",
    "\"unix:\"",
    "\"unix:/x\"",
    "\"localhost:0\"",
    "\"[::1]:0\"",
    "\"0.0.0.0:80\"",
    "\"SIGKILL\"",
    "\"1ms\"",
    "\"365d\"",
    "\"\\u0000\"",
    "\"\u{1F980}\"",
    "'''",
    "\"\"\"",
    "\\",
    "\r\n",
    "\t",
    "é",
    "apps",
    "sockets",
    "supervisor",
    "metrics",
    "reload",
    "command",
    "workers",
    "env",
    "[apps.x]\ncommand = [\"a\"]\n",
    "[sockets.s]\nlisten = \"127.0.0.1:1\"\n",
];

/// `text` changed by one random edit.
fn mutate(rng: &mut Rng, text: &str) -> String {
    let boundaries: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect();
    let mut at = || boundaries[rng.below(boundaries.len())];
    let (a, b) = {
        let (x, y) = (at(), at());
        (x.min(y), x.max(y))
    };
    let mut out = String::with_capacity(text.len() + 64);
    match rng.below(4) {
        0 => {
            // Delete a range.
            out.push_str(&text[..a]);
            out.push_str(&text[b..]);
        }
        1 => {
            // Duplicate a range.
            out.push_str(&text[..b]);
            out.push_str(&text[a..]);
        }
        _ => {
            // Insert a fragment.
            out.push_str(&text[..a]);
            out.push_str(FRAGMENTS[rng.below(FRAGMENTS.len())]);
            out.push_str(&text[a..]);
        }
    }
    out
}

#[test]
fn random_mutations_of_the_corpus() {
    let files = corpus();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut seen = Vec::new();
    for _ in 0..20_000 {
        let (_, text) = &files[rng.below(files.len())];
        let mut text = mutate(&mut rng, text);
        for _ in 0..rng.below(4) {
            text = mutate(&mut rng, &text);
        }
        let outcome = check(&text);
        if !seen.contains(&outcome) {
            seen.push(outcome);
        }
    }
    // The mutations must reach past the TOML parser, not only break the syntax.
    assert_eq!(seen.len(), 3, "only {seen:?}");
}

#[test]
fn garbage() {
    for text in [
        "",
        "\0",
        "\u{feff}",
        "=",
        "[",
        "[]",
        "[[]]",
        "a",
        "apps",
        "apps = 1",
        "apps = []",
        "apps = [[]]",
        "[apps]\nx = 1",
        "[apps.x]",
        "[apps.x]\ncommand = [[]]",
        "[apps.x]\ncommand = [\"a\"]\nenv = { a = { b = 1 } }",
        "\u{1F980} = 1",
    ] {
        assert_ne!(check(text), Outcome::Valid, "{text:?}");
    }
    // Deep nesting hits the TOML parser's recursion limit, not the end of the stack.
    let deep_array = format!("a = {}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(check(&deep_array), Outcome::Syntax);
    let deep_table = format!("a = {}1{}", "{b=".repeat(50_000), "}".repeat(50_000));
    assert_eq!(check(&deep_table), Outcome::Syntax);
}
