//! The CLI side of the control socket: find the socket, send one request, read the replies.
//! Plain blocking I/O: the CLI makes one request and exits.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clusterd_proto::{Envelope, MAX_FRAME, Reply, Request, encode_line};

use crate::daemon::rundir::RunDir;

/// How to find a running supervisor: its control socket, or the manifest it runs.
///
/// The manifest is `--file` everywhere. `-f` is also accepted for it, for compatibility,
/// except by `clusterd logs`, where `-f` means follow (as for `tail`, `journalctl`,
/// `docker logs` and `kubectl logs`).
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The manifest the supervisor runs (its run directory holds the control socket).
    #[arg(short = 'f', long = "file", default_value = "supervisor.toml")]
    pub manifest: PathBuf,
    /// The control socket itself (overrides --file).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The run directory the supervisor was started with (`start --run-dir`).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
}

impl Target {
    /// The control socket's path.
    pub fn socket_path(&self) -> anyhow::Result<PathBuf> {
        if let Some(socket) = &self.socket {
            return Ok(socket.clone());
        }
        if self.run_dir.is_none()
            && !self.manifest.exists()
            && let Some(socket) = only_supervisor_here(&self.manifest)?
        {
            return Ok(socket);
        }
        let run_dir = RunDir::for_manifest_file(&self.manifest, self.run_dir.as_deref())
            .with_context(|| format!("cannot read manifest {}", self.manifest.display()))?;
        Ok(run_dir.control_socket())
    }
}

/// With no manifest `missing` here: the control socket of the one supervisor answering from
/// `./.clusterd/` (where `clusterd run` keeps its run directory), so that `clusterd status`
/// finds the app `clusterd run` started from this directory as `pm2 status` would. `None`
/// when there is none; an error naming them when there are several.
fn only_supervisor_here(missing: &Path) -> anyhow::Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(".clusterd") else {
        return Ok(None);
    };
    let mut answering: Vec<PathBuf> = entries
        .flatten()
        .map(|entry| entry.path().join("control.sock"))
        .filter(|socket| UnixStream::connect(socket).is_ok())
        .collect();
    answering.sort();
    match answering.len() {
        0 | 1 => Ok(answering.pop()),
        _ => {
            let dirs: Vec<String> = answering
                .iter()
                .filter_map(|s| s.parent().map(|d| d.display().to_string()))
                .collect();
            bail!(
                "no manifest {} here, and {} supervisors run from this directory ({}): name one \
                 with --run-dir",
                missing.display(),
                dirs.len(),
                dirs.join(", ")
            )
        }
    }
}

/// The same as [`Target`] without `-f` (which `clusterd logs` takes for follow).
#[derive(Debug, Clone, clap::Args)]
pub struct LogsTarget {
    /// The manifest the supervisor runs (its run directory holds the control socket).
    #[arg(long = "file", default_value = "supervisor.toml")]
    pub manifest: PathBuf,
    /// The control socket itself (overrides --file).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The run directory the supervisor was started with (`start --run-dir`).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
}

impl From<LogsTarget> for Target {
    fn from(target: LogsTarget) -> Self {
        Target {
            manifest: target.manifest,
            socket: target.socket,
            run_dir: target.run_dir,
        }
    }
}

/// Sends `request` and returns the final reply; progress lines go to `on_progress`, whose
/// error (e.g. a closed stdout) ends the call with that error as the cause.
/// `timeout` bounds the wait for each reply line (`None`: wait as long as it takes).
pub fn call(
    socket: &Path,
    request: Request,
    timeout: Option<Duration>,
    mut on_progress: impl FnMut(&str) -> std::io::Result<()>,
) -> anyhow::Result<Reply> {
    call_streaming(socket, request, timeout, |reply| match reply {
        Reply::Progress { message } => on_progress(&message),
        _ => Ok(()),
    })
}

/// Like [`call`], with every reply that is not final ([`Reply::is_final`]: progress and log
/// lines) given to `on_line`.
pub fn call_streaming(
    socket: &Path,
    request: Request,
    timeout: Option<Duration>,
    mut on_line: impl FnMut(Reply) -> std::io::Result<()>,
) -> anyhow::Result<Reply> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot connect to clusterd at {} (is it running?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    // A server that refuses the connection (wrong uid) may answer and close before the
    // request is written: the write fails with EPIPE, but its reply is there to be read.
    let written = stream.write_all(&encode_line(&Envelope::new(request)));
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader
            .by_ref()
            .take(MAX_FRAME as u64 * 64)
            .read_line(&mut line)
            .context("reading the reply")?;
        if n == 0 {
            written.context("sending the request")?;
            bail!("clusterd closed the connection without a reply");
        }
        let reply: Reply =
            serde_json::from_str(&line).with_context(|| format!("unreadable reply: {line:?}"))?;
        if reply.is_final() {
            return Ok(reply);
        }
        on_line(reply).context("writing the output")?;
    }
}
