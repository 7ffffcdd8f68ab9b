//! `clusterd-kv`: a small command-line companion of the crate.
//!
//! - `clusterd-kv owners [--dir DIR] [--prefix P]` lists the host's segments and who tends
//!   each (what `clusterd status` shows).
//! - `clusterd-kv agent [options]` connects one client and then obeys line commands on stdin
//!   (`get K`, `set K V`, `del K`, `route K`, `fill P N`, `check P N`, `stats`, `close`,
//!   `exit`), answering one line each on stdout. Tests and benches drive real processes with
//!   it; it is also handy for poking at a cluster by hand.
//!
//! Agent options: `--seeds LIST` (default `$REDIS_CLUSTER`, else `127.0.0.1:7000`), `--dir`,
//! `--prefix`, `--namespace`, `--interval-ms`, `--stale-after N`, `--local` (no shared
//! memory).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clusterd_kv::{DEFAULT_DIR, DEFAULT_PREFIX, KvClient, KvOptions, Stats};
use tokio::io::AsyncBufReadExt;

const USAGE: &str = "usage: clusterd-kv owners [--dir DIR] [--prefix PREFIX]\n       \
                     clusterd-kv agent [--seeds LIST] [--dir DIR] [--prefix PREFIX] \
                     [--namespace NS] [--interval-ms N] [--stale-after N] [--local]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("owners") => owners(&args[1..]),
        Some("agent") => agent(&args[1..]),
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("clusterd-kv: {message}");
            ExitCode::from(2)
        }
    }
}

/// `--name value` pairs and bare `--flag`s.
struct Flags(Vec<(String, Option<String>)>);

impl Flags {
    fn parse(args: &[String], with_value: &[&str], bare: &[&str]) -> Result<Flags, String> {
        let mut flags = Vec::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let name = arg.strip_prefix("--").unwrap_or_default();
            if with_value.contains(&name) {
                let value = it.next().ok_or(format!("{arg} needs a value\n{USAGE}"))?;
                flags.push((name.to_string(), Some(value.clone())));
            } else if bare.contains(&name) {
                flags.push((name.to_string(), None));
            } else {
                return Err(format!("unknown argument {arg:?}\n{USAGE}"));
            }
        }
        Ok(Flags(flags))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n == name)
    }

    fn number(&self, name: &str) -> Result<Option<u64>, String> {
        self.get(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("--{name}: {v:?} is not a number"))
            })
            .transpose()
    }
}

fn owners(args: &[String]) -> Result<(), String> {
    let flags = Flags::parse(args, &["dir", "prefix"], &[])?;
    let env = |name| std::env::var(name).ok();
    let dir = flags
        .get("dir")
        .map(str::to_string)
        .or_else(|| env(clusterd_kv::ENV_SEGMENT_DIR))
        .unwrap_or_else(|| DEFAULT_DIR.into());
    let prefix = flags
        .get("prefix")
        .map(str::to_string)
        .or_else(|| env(clusterd_kv::ENV_SEGMENT_PREFIX))
        .unwrap_or_else(|| DEFAULT_PREFIX.into());
    let owners = clusterd_kv::tend_owners(dir.as_ref(), &prefix)
        .map_err(|e| format!("reading segments in {dir}: {e}"))?;
    println!(
        "{:<40} {:>8} {:>6} {:>6} {:>10} {:>10}",
        "SEGMENT", "OWNER", "LOCKED", "EPOCH", "GENERATION", "HEARTBEAT"
    );
    for o in owners {
        let name = o.segment.file_name().unwrap_or_default().to_string_lossy();
        let owner = o.owner_pid.map_or("-".into(), |p| p.to_string());
        let beat = o
            .heartbeat_age
            .map_or("-".into(), |a| format!("{}ms", a.as_millis()));
        println!(
            "{name:<40} {owner:>8} {:>6} {:>6} {:>10} {beat:>10}",
            if o.lock_held { "yes" } else { "no" },
            o.owner_epoch,
            o.generation
        );
    }
    Ok(())
}

fn agent(args: &[String]) -> Result<(), String> {
    let flags = Flags::parse(
        args,
        &[
            "seeds",
            "dir",
            "prefix",
            "namespace",
            "interval-ms",
            "stale-after",
        ],
        &["local"],
    )?;
    let seeds = flags
        .get("seeds")
        .map(str::to_string)
        .or_else(|| std::env::var("REDIS_CLUSTER").ok())
        .unwrap_or_else(|| "127.0.0.1:7000".into());
    let mut options = KvOptions::from_seed_list(&seeds).shared_memory(!flags.has("local"));
    if let Some(dir) = flags.get("dir") {
        options = options.segment_dir(dir);
    }
    if let Some(prefix) = flags.get("prefix") {
        options = options.segment_prefix(prefix);
    }
    if let Some(ns) = flags.get("namespace") {
        options = options.namespace(ns);
    }
    if let Some(ms) = flags.number("interval-ms")? {
        options = options.tend_interval(Duration::from_millis(ms));
    }
    if let Some(n) = flags.number("stale-after")? {
        options = options.stale_after_intervals(u32::try_from(n).unwrap_or(u32::MAX));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(serve(options))
}

async fn serve(options: KvOptions) -> Result<(), String> {
    let client = KvClient::connect(options)
        .await
        .map_err(|e| format!("connecting: {}", e.report()))?;
    let mut open = reply(&format!(
        "ready role={} pid={}",
        client.role(),
        std::process::id()
    ));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while open {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => return Err(format!("reading stdin: {e}")),
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["exit"] => break,
            [] => continue,
            words => command(&client, words).await,
        };
        open = reply(&answer);
    }
    client
        .close()
        .await
        .map_err(|e| format!("closing: {}", e.report()))
}

async fn command(client: &KvClient, words: &[&str]) -> String {
    let result = match words {
        ["get", key] => client.get(key).await.map(|v| match v {
            Some(v) => format!("value {}", String::from_utf8_lossy(&v)),
            None => "nil".into(),
        }),
        ["set", key, value] => client.set(key, value).await.map(|()| "ok".into()),
        ["del", key] => client.del(key).await.map(|d| format!("deleted {d}")),
        ["route", key] => Ok(format!(
            "route {}",
            client.route(key).unwrap_or("none".into())
        )),
        ["fill", prefix, n] => match n.parse::<usize>() {
            Ok(n) => fill(client, prefix, n).await,
            Err(_) => return format!("error {n:?} is not a count"),
        },
        ["check", prefix, n] => match n.parse::<usize>() {
            Ok(n) => check(client, prefix, n).await,
            Err(_) => return format!("error {n:?} is not a count"),
        },
        ["stats"] => Ok(stats_line(&client.stats())),
        ["close"] => client.close().await.map(|()| "closed".into()),
        _ => return format!("error unknown command {:?}", words.join(" ")),
    };
    result.unwrap_or_else(|e| format!("error {}", e.report()))
}

/// Sets `{prefix}{i}` to `v{i}` for i in 0..n.
async fn fill(client: &KvClient, prefix: &str, n: usize) -> clusterd_kv::Result<String> {
    for i in 0..n {
        client.set(format!("{prefix}{i}"), format!("v{i}")).await?;
    }
    Ok(format!("ok {n}"))
}

/// Reads back what `fill` stored; reports the first key that differs.
async fn check(client: &KvClient, prefix: &str, n: usize) -> clusterd_kv::Result<String> {
    for i in 0..n {
        let key = format!("{prefix}{i}");
        let want = format!("v{i}");
        if client.get(&key).await?.as_deref() != Some(want.as_bytes()) {
            return Ok(format!("mismatch {key}"));
        }
    }
    Ok(format!("ok {n}"))
}

fn stats_line(s: &Stats) -> String {
    format!(
        "stats role={} commands={} moved={} ask={} topology_commands={} refreshes={} \
         publishes={} refresh_requests={} snapshot_copies={} self_refreshes={} takeovers={} \
         owner_epoch={} generation={} owner_pid={}",
        s.role,
        s.commands,
        s.moved,
        s.ask,
        s.topology_commands,
        s.refreshes,
        s.publishes,
        s.refresh_requests,
        s.snapshot_copies,
        s.self_refreshes,
        s.takeovers,
        s.owner_epoch,
        s.map_generation,
        s.owner_pid.unwrap_or(0)
    )
}

/// Writes one answer line; `false` once stdout is closed (the driver went away).
fn reply(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}
