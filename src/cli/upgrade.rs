//! `clusterd upgrade`, and the two hidden commands of the new binary: `handover-check` (can
//! it read the running supervisor's state?) and `handover-resume` (take over).

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clusterd_proto::{Reply, Request};

use super::client::{self, Target};
use super::print_out;
use crate::daemon::{self, boot};
use crate::error::Chain;

/// `clusterd upgrade`: asks the supervisor to exec `binary` (it checks it first), then waits
/// until the new one answers status, and says how long that took.
pub fn upgrade(binary: Option<PathBuf>, target: &Target) -> anyhow::Result<()> {
    let socket = target.socket_path()?;
    let timeout = Some(Duration::from_secs(30));
    let status = |socket: &Path| match client::call(socket, Request::Status {}, timeout, |_| Ok(()))
    {
        Ok(Reply::Status(status)) => Ok(*status),
        Ok(other) => anyhow::bail!("unexpected reply {other:?}"),
        Err(error) => Err(error),
    };
    let before = status(&socket)?;
    let binary = binary
        .map(|b| std::path::absolute(&b).with_context(|| format!("{}", b.display())))
        .transpose()?;
    let started = std::time::Instant::now();
    let request = Request::Upgrade {
        binary: binary.map(|b| b.display().to_string()),
    };
    match client::call(&socket, request, timeout, |_| Ok(()))? {
        Reply::Done { message } => print_out(format_args!("{message}\n"))?,
        Reply::Error { message, .. } => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
    let deadline = started + Duration::from_secs(30);
    loop {
        // Connections wait in the control socket's queue while the exec runs.
        if let Ok(after) = status(&socket)
            && after.upgrades > before.upgrades
        {
            anyhow::ensure!(
                after.pid == before.pid,
                "the supervisor's pid changed from {} to {}",
                before.pid,
                after.pid
            );
            let workers: usize = after.apps.iter().map(|a| a.running).sum();
            print_out(format_args!(
                "upgraded clusterd pid {} from {} to {} in {} ms; {workers} workers kept\n",
                after.pid,
                before.version,
                after.version,
                started.elapsed().as_millis()
            ))?;
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the supervisor did not come back upgraded within 30 s; see its log"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `clusterd handover-check`: reads a hand-over from stdin and prints whether this binary can
/// take over.
pub fn check() -> ExitCode {
    match daemon::check_handover(io::stdin().lock()) {
        Ok(line) => match print_out(format_args!("{line}\n")) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        },
        Err(error) => {
            eprintln!("clusterd: {}", Chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// The new side of an upgrade: takes the state and descriptors the previous clusterd of this
/// pid handed over and runs its workers on. A state it cannot read starts nothing: clusterd
/// exits non-zero (and the workers, its children, follow through `PR_SET_PDEATHSIG`) rather
/// than starting a second set of workers beside them.
pub fn resume(fd: i32) -> anyhow::Result<()> {
    let handover = daemon::read_handover(fd)
        .context("cannot take over from the previous clusterd; starting no worker")?;
    boot::boot(boot::Start::Resumed(Box::new(handover)))
}
