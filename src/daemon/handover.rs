//! `clusterd upgrade`: replacing the running supervisor with a (new) clusterd binary in place.
//! Same pid, so the workers stay its children and keep serving; what crosses `execve`:
//!
//! - **descriptors**, by number, close-on-exec cleared just before the exec: the listening
//!   sockets, the control and notify sockets, the metrics listener and the read ends of the
//!   workers' output pipes (the new side re-marks each close-on-exec as it adopts it);
//! - **the state**, as JSON in a memfd ([`Handover`]): the whole [`Core`] (slots,
//!   generations, restart counts, rollouts, every deadline) as a [`Snapshot`], the manifest,
//!   the driver's bookkeeping. An [`Instant`] is written as nanoseconds from an anchor (the
//!   `now` the snapshot was taken at; the driver's own instants as an [`Offset`] from the
//!   same one) whose `CLOCK_MONOTONIC` time is in the header, so the reader shifts every
//!   deadline by the time the exec took: a deadline is as absolute after the upgrade as
//!   before.
//!
//! Before anything changes, the new binary must prove it can read this very state: the
//! driver runs `NEW handover-check` with the memfd as stdin, which parses it completely and
//! prints [`CHECK_OK`] with its versions ([`check`]). Any failure (not executable, another
//! program, an older format) leaves everything as it was and is the answer to the client.
//! Signals clusterd handles are blocked across the exec (the mask and pending signals
//! survive it) and unblocked by the new side once its handlers are installed.

use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clusterd_manifest::Manifest;

use serde::{Deserialize, Serialize};

use clusterd_core::time::Offset;
use clusterd_core::{Core, Snapshot, WorkerId};

/// The version of the state format this build writes, and the newest it reads.
pub const FORMAT: u32 = 1;

/// The first word of the line `handover-check` prints when it can read the state.
pub const CHECK_OK: &str = "clusterd-handover-ok";

/// How long the new binary's `handover-check` may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a clusterd hands to the next one. Every type in it refuses fields it does not
/// know (`deny_unknown_fields`): an older binary refuses a newer state instead of dropping
/// part of it, and `handover-check` says so before anything changes.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handover {
    /// [`FORMAT`] of the writer.
    pub format: u32,
    /// The writer's clusterd version.
    pub version: String,
    /// `CLOCK_MONOTONIC` (ns) of the anchor the instants are written against.
    monotonic_ns: u64,
    /// The decisions' state, its instants relative to the anchor.
    core: Snapshot,
    /// The manifest in effect (the last one applied, not the file as it is now).
    pub manifest: Manifest,
    /// The run directory (pid file, control and notify sockets).
    pub run_dir: PathBuf,
    /// The listening sockets.
    pub sockets: Vec<HandedSocket>,
    /// The control socket's listener.
    pub control: HandedPath,
    /// The notify socket.
    pub notify: HandedPath,
    /// The metrics listener.
    pub metrics: Option<RawFd>,
    /// The soft and hard `RLIMIT_NOFILE` clusterd was first started with (workers get it).
    pub nofile: Option<(u64, u64)>,
    /// The background process of `start --detach` (its logs default to the run directory).
    pub detached: bool,
    /// What the driver keeps for itself.
    pub(super) driver: DriverState,
    /// The anchor in this process: when the state was taken (writer), or the same moment on
    /// this process's clock (reader).
    #[serde(skip, default = "Instant::now")]
    anchor: Instant,
}

/// One listening socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedSocket {
    /// `[sockets.NAME]`.
    pub name: String,
    /// Its descriptor.
    pub fd: RawFd,
    /// What it is bound to, as status shows it.
    pub address: String,
    /// The socket file clusterd created (removed at exit).
    pub unix_path: Option<PathBuf>,
    /// Bound on demand for an intercepted app (absent from the manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand: Option<crate::daemon::sockets::OnDemand>,
}

/// A unix socket with its path.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedPath {
    /// Its descriptor.
    pub fd: RawFd,
    /// Its file.
    pub path: PathBuf,
}

/// The driver's own bookkeeping.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DriverState {
    /// When the first clusterd of this pid started, from the anchor.
    pub started: Offset,
    /// Upgrades so far, this one included.
    pub upgrades: u32,
    /// Each worker's name in the containment.
    pub contained: Vec<(WorkerId, String)>,
    /// The read ends of the workers' output pipes.
    pub outputs: Vec<HandedOutput>,
    /// Intercepted workers' seccomp listeners and the sockets their binds get.
    pub intercepts: Vec<crate::daemon::intercept::Handed>,
    /// The per-worker sockets of steered sockets, in the kernel's order.
    pub steering: Vec<crate::daemon::steering::HandedGroup>,
    /// Workers' message channels, with what was queued either way.
    pub channels: Vec<crate::daemon::ipc::Suspended>,
    /// The metrics' counters.
    pub counters: crate::daemon::metrics::Counters,
    /// The lines `clusterd logs` shows.
    pub log_lines: Vec<crate::daemon::logs::ring::Handed>,
}

/// A worker's output pipes (read ends).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HandedOutput {
    /// The worker.
    pub worker: WorkerId,
    /// Its line prefix, `app[slot]`.
    pub label: String,
    /// Its stdout pipe.
    pub stdout: RawFd,
    /// Its stderr pipe.
    pub stderr: RawFd,
}

/// What every reader checks first, before trusting the rest.
#[derive(Deserialize)]
struct Header {
    format: u32,
    version: String,
    monotonic_ns: u64,
}

/// Why a hand-over cannot be read, written or carried out.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Not the JSON of a hand-over at all.
    #[error("not a clusterd hand-over")]
    Malformed(#[source] serde_json::Error),
    /// Written in a format this build does not read.
    #[error(
        "the state is in hand-over format {found} of clusterd {version}; this clusterd {ours} reads format {FORMAT} and older"
    )]
    Format {
        /// The writer's format.
        found: u32,
        /// The writer's version.
        version: String,
        /// This build's version.
        ours: &'static str,
    },
    /// The header was fine, the rest not.
    #[error("cannot read the state of clusterd {version}")]
    State {
        /// The writer's version.
        version: String,
        /// What failed.
        #[source]
        cause: serde_json::Error,
    },
    /// A system call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        cause: io::Error,
    },
    /// The new binary is not fit.
    #[error("{binary}: {why}; nothing changed")]
    Refused {
        /// The binary.
        binary: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> HandoverError {
    move |cause| HandoverError::Io { what, cause }
}

/// This build's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

impl Handover {
    /// A hand-over of `core` as it is at `now` (the anchor of `driver`'s offsets too), and
    /// the rest.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        core: &Core,
        now: Instant,
        manifest: Manifest,
        run_dir: PathBuf,
        sockets: Vec<HandedSocket>,
        control: HandedPath,
        notify: HandedPath,
        metrics: Option<RawFd>,
        detached: bool,
        driver: DriverState,
    ) -> Result<Self, HandoverError> {
        Ok(Handover {
            format: FORMAT,
            version: VERSION.to_owned(),
            monotonic_ns: monotonic_ns(),
            core: core.snapshot(now).map_err(HandoverError::Malformed)?,
            manifest,
            run_dir,
            sockets,
            control,
            notify,
            metrics,
            nofile: crate::daemon::spawn::worker_nofile(),
            detached,
            driver,
            anchor: now,
        })
    }

    /// The JSON.
    pub(super) fn encode(&self) -> Result<Vec<u8>, HandoverError> {
        serde_json::to_vec(self).map_err(HandoverError::Malformed)
    }

    /// Reads a hand-over; instants come out shifted by the time since it was written.
    pub fn decode(bytes: &[u8]) -> Result<Handover, HandoverError> {
        let header: Header = serde_json::from_slice(bytes).map_err(HandoverError::Malformed)?;
        if header.format > FORMAT {
            return Err(HandoverError::Format {
                found: header.format,
                version: header.version,
                ours: VERSION,
            });
        }
        let elapsed = Duration::from_nanos(monotonic_ns().saturating_sub(header.monotonic_ns));
        let now = Instant::now();
        let anchor = now.checked_sub(elapsed).unwrap_or(now);
        let state = |cause| HandoverError::State {
            version: header.version.clone(),
            cause,
        };
        let mut handover: Handover = serde_json::from_slice(bytes).map_err(state)?;
        handover.anchor = anchor;
        // Read completely now: `handover-check` answers for all of it.
        handover.core.restore(anchor).map_err(state)?;
        Ok(handover)
    }

    /// The core, its deadlines as far from now as they were from the writer's anchor.
    pub fn core(&self) -> Result<Core, HandoverError> {
        self.core
            .restore(self.anchor)
            .map_err(|cause| HandoverError::State {
                version: self.version.clone(),
                cause,
            })
    }

    /// The lines `clusterd logs` showed, for the new clusterd's memory (taken out).
    pub fn take_log_lines(&mut self) -> Vec<crate::daemon::logs::ring::Handed> {
        std::mem::take(&mut self.driver.log_lines)
    }

    /// The pieces the driver needs back: the core, its own state and the anchor of the
    /// latter's offsets.
    pub(super) fn into_state(self) -> Result<(Core, DriverState, Instant), HandoverError> {
        Ok((self.core()?, self.driver, self.anchor))
    }
}

/// `clusterd handover-check`: reads a hand-over from `input` completely and returns the line
/// that tells the old clusterd this binary can take over.
pub fn check(mut input: impl Read) -> Result<String, HandoverError> {
    let mut bytes = Vec::new();
    input
        .read_to_end(&mut bytes)
        .map_err(io_error("reading the state"))?;
    let handover = Handover::decode(&bytes)?;
    Ok(format!(
        "{CHECK_OK} format={FORMAT} proto={} version={VERSION} workers={}",
        clusterd_proto::VERSION,
        handover.core()?.worker_count()
    ))
}

/// Writes `bytes` into a new memfd (close-on-exec), positioned at its start.
pub(super) fn memfd(bytes: &[u8]) -> Result<std::fs::File, HandoverError> {
    // SAFETY: memfd_create with a static NUL-terminated name.
    let raw = unsafe { libc::memfd_create(c"clusterd-handover".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(io_error("memfd_create")(io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this descriptor to us.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    file.write_all(bytes)
        .and_then(|()| file.rewind())
        .map_err(io_error("writing the state"))?;
    Ok(file)
}

/// Reads the hand-over at `fd` (the new side) and closes it.
pub fn read_fd(fd: RawFd) -> Result<Handover, HandoverError> {
    // SAFETY: the old clusterd passed this descriptor to us for this, and nothing else owns it.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut bytes = Vec::new();
    file.rewind()
        .and_then(|()| file.read_to_end(&mut bytes))
        .map_err(io_error("reading the handed-over state"))?;
    Handover::decode(&bytes)
}

/// `handover-check` running on a new binary. The loop goes on meanwhile: the reaper reports
/// its exit like any child's ([`Check::pid`]), and [`Check::finish`] reads its answer.
pub(super) struct Check {
    /// The binary.
    pub binary: PathBuf,
    /// The checker's pid.
    pub pid: clusterd_core::Pid,
    /// When it is given up.
    pub deadline: Instant,
    stdout: std::process::ChildStdout,
    stderr: std::process::ChildStderr,
}

/// Starts `binary handover-check` on the state in `state`; [`Check::finish`] says whether it
/// can take over.
pub(super) fn start_check(binary: &Path, state: &std::fs::File) -> Result<Check, HandoverError> {
    let refuse = |why: String| HandoverError::Refused {
        binary: binary.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(binary).map_err(|e| refuse(e.to_string()))?;
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    if nix::unistd::access(binary, nix::unistd::AccessFlags::X_OK).is_err() {
        return Err(refuse("not executable".into()));
    }
    let input = state.try_clone().map_err(io_error("dup"))?;
    // Never waited for through `Child`: the reaper, the one owner of `waitpid`, reaps it.
    let child = std::process::Command::new(binary)
        .arg("handover-check")
        .stdin(input)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| refuse(format!("cannot run it: {e}")))?;
    let pid = clusterd_core::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let (Some(stdout), Some(stderr)) = (child.stdout, child.stderr) else {
        return Err(refuse("cannot read its answer".into()));
    };
    Ok(Check {
        binary: binary.to_path_buf(),
        pid,
        deadline: Instant::now() + CHECK_TIMEOUT,
        stdout,
        stderr,
    })
}

impl Check {
    /// The checker exited with `status`: `Ok` with its check line, or why it cannot take over.
    pub fn finish(self, status: clusterd_core::ExitStatus) -> Result<String, HandoverError> {
        let refuse = |why: String| HandoverError::Refused {
            binary: self.binary.clone(),
            why,
        };
        let out = read_exited(self.stdout);
        let err = read_exited(self.stderr);
        let line = out.lines().find(|l| l.starts_with(CHECK_OK));
        match line {
            Some(line) if status.success() => {
                let proto = field(line, "proto").and_then(|p| p.parse::<u32>().ok());
                if proto.is_none_or(|p| p < clusterd_proto::VERSION) {
                    return Err(refuse(format!(
                        "it speaks control protocol {proto:?}, older than ours ({})",
                        clusterd_proto::VERSION
                    )));
                }
                Ok(line.to_owned())
            }
            _ => {
                let said = err.trim().lines().last().unwrap_or("").to_owned();
                Err(refuse(format!(
                    "it cannot read this clusterd's state ({status}{}{said})",
                    if said.is_empty() { "" } else { ": " }
                )))
            }
        }
    }

    /// It did not answer in time: killed (the reaper collects it), and why.
    pub fn give_up(self) -> HandoverError {
        let _ = nix::sys::signal::kill(
            crate::daemon::os::pid(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        HandoverError::Refused {
            binary: self.binary,
            why: format!("`handover-check` did not finish within {CHECK_TIMEOUT:?}"),
        }
    }
}

/// What an exited checker wrote to `pipe`, without waiting (a process it left behind may
/// hold the pipe open: then what is there).
fn read_exited(pipe: impl Read + std::os::fd::AsFd) -> String {
    let nonblocking = nix::fcntl::fcntl(
        pipe.as_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let mut bytes = Vec::new();
    if nonblocking.is_ok() {
        let _ = pipe.take(64 * 1024).read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `key=value` in a check line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Clears close-on-exec on `fds` (for the exec), or sets it again (after a failed one).
pub(super) fn set_inherit(fds: &[RawFd], inherit: bool) -> io::Result<()> {
    for fd in fds {
        let flag = if inherit { 0 } else { libc::FD_CLOEXEC };
        // SAFETY: F_SETFD on a descriptor number this process holds.
        if unsafe { libc::fcntl(*fd, libc::F_SETFD, flag) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Marks an adopted descriptor close-on-exec again (the new side).
pub fn adopt(fd: RawFd) -> io::Result<OwnedFd> {
    set_inherit(&[fd], false)?;
    // SAFETY: handed to us by the previous clusterd, owned by nothing else in this process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Replaces this process with `binary handover-resume FD`. Returns only on failure (then
/// the caller undoes what it prepared).
pub(super) fn exec(binary: &Path, state: &std::fs::File) -> io::Error {
    use std::os::unix::ffi::OsStrExt;
    let program = match std::ffi::CString::new(binary.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(e) => return io::Error::new(io::ErrorKind::InvalidInput, e),
    };
    let fd = std::ffi::CString::new(state.as_raw_fd().to_string()).unwrap_or_default();
    let argv = [c"clusterd", c"handover-resume", fd.as_c_str()];
    match nix::unistd::execv(&program, &argv) {
        Err(errno) => errno.into(),
        Ok(never) => match never {},
    }
}

fn monotonic_ns() -> u64 {
    crate::daemon::manager::monotonic_usec().saturating_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// A hand-over as clusterd 0.1.0 wrote it (format 1), taken from a real upgrade of a
    /// detached supervisor with an intercepted Node app with `drain` (steered sockets) and a
    /// Node app with `ipc_broadcast`, metrics and log files (paths changed to /srv/app, its
    /// `clusterd logs` lines cut to 12). To write a new one after a deliberate change of
    /// format: `clusterd upgrade --binary WRAPPER`, where WRAPPER is a script that runs
    /// `tee SAMPLE | clusterd handover-check` for `handover-check` and execs clusterd with its
    /// arguments otherwise.
    const GOLDEN: &str = include_str!("testdata/handover-format-1.json");

    /// `value` with every number made 0: what remains is the format itself.
    fn shape(value: Value) -> Value {
        match value {
            Value::Number(_) => Value::from(0),
            Value::Array(items) => items.into_iter().map(shape).collect(),
            Value::Object(map) => map.into_iter().map(|(k, v)| (k, shape(v))).collect(),
            other => other,
        }
    }

    #[test]
    fn the_golden_hand_over_still_parses_and_is_written_in_the_same_format() {
        let handover = Handover::decode(GOLDEN.as_bytes()).expect("the golden hand-over");
        assert!(handover.detached);
        let core = handover.core().expect("the core");
        assert_eq!(core.worker_count(), 4);
        assert_eq!(handover.driver.intercepts.len(), 2);
        assert_eq!(handover.driver.channels.len(), 4);
        assert_eq!(handover.driver.steering[0].members.len(), 2);
        assert_eq!(handover.driver.counters.restarts["chat"], 1);
        // The restart_limit window of the slot whose worker was killed.
        let chat = core.app("chat").expect("chat");
        assert_eq!(
            chat.slots
                .iter()
                .map(|s| s.recent_restarts.len())
                .sum::<usize>(),
            1
        );
        // Written again, it has the same fields: adding, removing or renaming one is a change
        // of format, made on purpose (a new golden file, and FORMAT if older builds must
        // refuse it).
        let mut handover = handover;
        handover.core = core.snapshot(Instant::now()).expect("snapshot");
        let again = handover.encode().expect("encode");
        let again: Value = serde_json::from_slice(&again).expect("JSON");
        let golden: Value = serde_json::from_str(GOLDEN).expect("JSON");
        assert_eq!(shape(again), shape(golden));
    }

    #[test]
    fn a_state_from_a_newer_format_or_garbage_is_refused() {
        assert!(Handover::decode(b"not json").is_err());
        let newer = br#"{"format":99,"version":"9.9.9","monotonic_ns":1}"#;
        let error = Handover::decode(newer).err().expect("refused").to_string();
        assert!(error.contains("format 99 of clusterd 9.9.9"), "{error}");
    }

    #[test]
    fn a_field_this_build_does_not_know_is_refused_wherever_it_is() {
        let golden: Value = serde_json::from_str(GOLDEN).expect("JSON");
        let places: [&[&str]; 5] = [
            &[],
            &["driver"],
            &["core", "apps", "web"],
            &["manifest", "supervisor"],
            &["driver", "channels", "0"],
        ];
        for place in places {
            let mut value = golden.clone();
            let mut at = &mut value;
            for key in place {
                at = match key.parse::<usize>() {
                    Ok(i) => &mut at[i],
                    Err(_) => &mut at[*key],
                };
            }
            at["from_the_future"] = Value::from(1);
            let bytes = serde_json::to_vec(&value).expect("JSON");
            let error = Handover::decode(&bytes).err();
            assert!(
                matches!(&error, Some(HandoverError::State { cause, .. })
                    if cause.to_string().contains("from_the_future")),
                "{place:?}: {error:?}"
            );
        }
    }
}
