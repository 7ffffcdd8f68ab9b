//! The one boot sequence of a supervisor, whether it is new (`start`, `start --detach`'s
//! background process, `run`) or the new image of an upgraded one (`handover-resume`). Both
//! take the same steps in the same order — process settings, run directory, log destinations,
//! the event loop, SIGUSR1 and the other signals' handlers, the sockets, the pid file — and
//! differ only in where the descriptors and the state come from: bound here, or adopted from
//! the [`Handover`]. Everything that concerns the process as a whole is done here, so that
//! [`daemon::run`] only supervises (a test drives it in-process with signals of its own). What a
//! supervisor was started with (its detached flag, its descriptor limit) travels in the
//! hand-over, so that an upgraded supervisor is configured exactly as the first one was.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::error::Chain;
use clusterd_manifest::Manifest;

use crate::daemon::containment::{self, Containment};
use crate::daemon::control::ControlServer;
use crate::daemon::logs::Logs;
use crate::daemon::notify::NotifySocket;
use crate::daemon::rundir::{PidFile, RunDir};
use crate::daemon::signals::Signals;
use crate::daemon::sockets::Sockets;
use crate::daemon::{self, Handover};
use crate::daemon::{manager, metrics, spawn, steering};

/// How a supervisor comes to be.
pub enum Start {
    /// A new supervisor: it binds everything itself.
    Fresh {
        /// The manifest.
        manifest: Box<Manifest>,
        /// `--run-dir`, overriding the manifest's.
        run_dir: Option<PathBuf>,
        /// The background process of `start --detach` (logs default to the run directory).
        detached: bool,
    },
    /// The new image of an upgraded supervisor: it adopts what the previous image handed
    /// over, and its workers are its children already.
    Resumed(Box<Handover>),
}

/// Boots a supervisor and runs it until it has stopped every worker.
pub fn boot(mut start: Start) -> anyhow::Result<()> {
    // What `clusterd logs` showed comes first, before this image logs anything.
    let handed_lines = match &mut start {
        Start::Resumed(handover) => handover.take_log_lines(),
        Start::Fresh { .. } => Vec::new(),
    };
    // First, before anything else opens a file: sockets systemd passed to a new supervisor
    // (fds 3..). A resumed one finds its descriptors named in the hand-over instead.
    let inherited = match &start {
        Start::Fresh { .. } => Some(crate::daemon::sockets::take_inherited()?),
        Start::Resumed(_) => None,
    };
    // clusterd's own manager, if it has one (systemd's NOTIFY_SOCKET): taken once, here.
    let manager = manager::Manager::from_env(Instant::now())?;
    match &start {
        // A supervisor holds a few descriptors per worker: use all the hard limit allows.
        Start::Fresh { .. } => match spawn::raise_nofile_limit() {
            Ok((before, after)) => {
                tracing::debug!("descriptor limit raised from {before} to {after}")
            }
            Err(e) => tracing::debug!("cannot raise the descriptor limit: {e}"),
        },
        // Raised already (limits survive the exec); the workers still get the first one's.
        Start::Resumed(handover) => {
            if let Some((soft, hard)) = handover.nofile {
                spawn::set_worker_nofile(soft, hard);
            }
        }
    }
    // Orphaned grandchildren are re-parented to us, so the reaper collects them too.
    nix::sys::prctl::set_child_subreaper(true).context("cannot become a child subreaper")?;

    let (manifest, run_dir, detached) = match &start {
        Start::Fresh {
            manifest,
            run_dir,
            detached,
        } => (
            &**manifest,
            RunDir::for_manifest(manifest, run_dir.as_deref()),
            *detached,
        ),
        Start::Resumed(handover) => (
            &handover.manifest,
            RunDir {
                path: handover.run_dir.clone(),
            },
            handover.detached,
        ),
    };
    run_dir
        .create()
        .with_context(|| format!("cannot create run directory {}", run_dir.path.display()))?;
    // Where output goes; a detached supervisor writes to its run directory by default.
    let detached_log = detached.then(|| run_dir.path.join("clusterd.log"));
    let app_logs: Vec<(&str, &clusterd_manifest::LogConfig)> = manifest
        .apps
        .iter()
        .map(|(name, app)| (name.as_str(), &app.log))
        .collect();
    let logs = Logs::new(&manifest.supervisor.log, &app_logs, detached_log.as_deref())?;
    logs.hub().restore(handed_lines);
    // clusterd's own lines go to its logs for as long as this supervisor runs.
    let tracing = tracing::subscriber::set_default(logs.subscriber());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the event loop")?;
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&runtime, async {
        // SIGUSR1 (reopen the log files) would kill us until it is handled. After an upgrade
        // it was blocked across the exec: one sent meanwhile is delivered once the supervisor
        // unblocks the signals it handles.
        logs.listen_for_reopen().context("cannot handle SIGUSR1")?;
        // The signals the loop answers: handled from here on, before the first fork.
        let signals = Signals::new().context("cannot handle signals")?;
        let parts = match start {
            Start::Fresh { manifest, .. } => {
                let inherited = inherited.unwrap_or_default();
                fresh(*manifest, &run_dir, inherited, detached, &logs).await?
            }
            Start::Resumed(handover) => resumed(*handover, &run_dir, &logs)?,
        };
        // What the process is, beside what fresh or resumed bound.
        let parts = daemon::Parts {
            manager,
            exe: std::env::current_exe().ok(),
            ..parts
        };
        let pid_file = PidFile::write(run_dir.pid_file())?;
        tracing::info!(
            "clusterd pid {} running {}; control socket {}",
            std::process::id(),
            parts.manifest.path.display(),
            run_dir.control_socket().display()
        );
        // Stopped by its signals and control requests only: no other shutdown.
        let result = daemon::run(parts, signals, std::future::pending()).await;
        drop(pid_file);
        let dropped = logs.dropped_lines();
        if dropped > 0 {
            tracing::warn!("{dropped} lines of output were dropped: stdout or stderr was not read");
        }
        result
    });
    // What is still queued gets a bounded moment to be written.
    drop(tracing);
    logs.close();
    result
}

/// Binds what a new supervisor needs.
async fn fresh(
    manifest: Manifest,
    run_dir: &RunDir,
    inherited: std::collections::BTreeMap<String, std::os::fd::OwnedFd>,
    detached: bool,
    logs: &Logs,
) -> anyhow::Result<daemon::Parts> {
    // The control socket first: a second `start` of a running manifest fails here, before
    // it could disturb anything.
    let control = ControlServer::bind(&run_dir.control_socket(), logs.clone())?;
    // Now that no other clusterd runs this run directory: kill what a previous run that was
    // itself killed left behind, before it can hold a port we are about to bind.
    let containment = Containment::detect(&containment::key_for(&run_dir.path));
    tracing::info!("containment: {}", containment.describe());
    match containment.sweep_leftovers() {
        Ok(killed) if killed.is_empty() => {}
        Ok(killed) => tracing::warn!(
            "killed {} processes left by a previous run: {}",
            killed.len(),
            killed.join(", ")
        ),
        Err(e) => tracing::warn!("cannot sweep a previous run's processes: {}", Chain(&e)),
    }
    // A socket inherited from systemd keeps the one queue it came with.
    let mut steered = steering::plan(&manifest);
    steered.retain(|name| !inherited.contains_key(name));
    let sockets = Sockets::bind_all(&manifest.sockets, inherited, &steered)?;
    let notify = NotifySocket::bind(&run_dir.notify_socket())
        .with_context(|| format!("cannot bind {}", run_dir.notify_socket().display()))?;
    let metrics = match &manifest.metrics {
        Some(config) => Some(
            metrics::MetricsServer::bind(config.listen)
                .await
                .with_context(|| format!("metrics: cannot listen on {}", config.listen))?,
        ),
        None => None,
    };
    Ok(daemon::Parts {
        manifest,
        sockets,
        notify,
        control,
        metrics,
        containment,
        // The process's own: set by `boot`.
        manager: None,
        exe: None,
        detached,
        resumed: None,
        logs: logs.clone(),
    })
}

/// Adopts what the previous image of this supervisor handed over.
fn resumed(handover: Handover, run_dir: &RunDir, logs: &Logs) -> anyhow::Result<daemon::Parts> {
    let adopt = |fd| daemon::adopt_fd(fd).context("an inherited descriptor");
    let control = ControlServer::adopt(
        adopt(handover.control.fd)?,
        &handover.control.path,
        logs.clone(),
    )?;
    let notify = NotifySocket::adopt(adopt(handover.notify.fd)?, &handover.notify.path)?;
    let metrics = match handover.metrics {
        Some(fd) => Some(metrics::MetricsServer::adopt(adopt(fd)?)?),
        None => None,
    };
    let mut sockets = Vec::new();
    for s in &handover.sockets {
        sockets.push((
            s.name.clone(),
            adopt(s.fd)?,
            s.address.clone(),
            s.unix_path.clone(),
            s.on_demand.clone(),
        ));
    }
    let containment = Containment::detect(&containment::key_for(&run_dir.path));
    Ok(daemon::Parts {
        manifest: handover.manifest.clone(),
        sockets: Sockets::from_parts(sockets),
        notify,
        control,
        metrics,
        containment,
        // The process's own: set by `boot`.
        manager: None,
        exe: None,
        detached: handover.detached,
        resumed: Some(Box::new(handover)),
        logs: logs.clone(),
    })
}
