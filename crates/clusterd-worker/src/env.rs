//! The environment clusterd hands a worker, parsed once.
//!
//! Each `parse_*` function is pure: it takes the variables' values (and the caller's pid) and
//! returns the parsed result, so the rules are unit-tested without processes. [`snapshot`]
//! reads the real environment on first use and keeps the result in a `OnceLock`. The SDK never
//! calls `env::set_var`/`env::remove_var` (unsafe in a threaded program): a grandchild that
//! inherits `LISTEN_FDS` is protected by the `LISTEN_PID` check instead.
//!
//! The rules follow systemd's `sd_listen_fds_with_names(3)` and `sd_watchdog_enabled(3)`:
//! `LISTEN_FDS` counts only when `LISTEN_PID` is set and equals our pid; `LISTEN_FDNAMES`, when
//! set, holds one colon-separated name per fd; `WATCHDOG_USEC` counts unless `WATCHDOG_PID` names
//! another process.

use std::ffi::{OsStr, OsString};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// The first inherited fd (`SD_LISTEN_FDS_START`): sockets are at fds 3, 4, ...
pub(crate) const LISTEN_FDS_START: RawFd = 3;

/// More inherited fds than this is taken as a corrupt `LISTEN_FDS`.
const MAX_LISTEN_FDS: usize = 4096;

/// An environment variable clusterd (or systemd) sets has a value the SDK cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {var}={value:?} is invalid: {reason}")]
pub struct EnvError {
    /// The variable's name, e.g. `LISTEN_FDS`.
    pub var: &'static str,
    /// Its value as found (lossily converted to UTF-8).
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

impl EnvError {
    fn new(var: &'static str, value: impl AsRef<OsStr>, reason: impl Into<String>) -> Self {
        EnvError {
            var,
            value: value.as_ref().to_string_lossy().into_owned(),
            reason: reason.into(),
        }
    }
}

/// One fd passed by the supervisor: its number and, when `LISTEN_FDNAMES` was set, its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InheritedFd {
    /// The fd number (3, 4, ...).
    pub fd: RawFd,
    /// Its name from `LISTEN_FDNAMES`, `None` when the variable was unset or the entry empty.
    pub name: Option<String>,
}

/// Who this worker is, from `CLUSTERD_APP`, `CLUSTERD_WORKER_ID` and `CLUSTERD_GENERATION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// The app's name in the manifest (`[apps.NAME]`).
    pub app: String,
    /// The worker's slot, 0..N-1, stable across restarts of the slot.
    pub slot: usize,
    /// The generation, bumped by each rolling reload.
    pub generation: u64,
}

/// Where `NOTIFY_SOCKET` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NotifyAddr {
    /// A socket file (`/path`).
    Path(PathBuf),
    /// A name in the abstract namespace (`@name`), without the `@`.
    Abstract(Vec<u8>),
}

/// Parses `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` for the process `my_pid`.
///
/// No fds when `LISTEN_FDS` or `LISTEN_PID` is unset, or when `LISTEN_PID` names another
/// process (the variables leaked to a child); an error when a value that counts is malformed.
pub(crate) fn parse_listen_fds(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    my_pid: u32,
) -> Result<Vec<InheritedFd>, EnvError> {
    let (Some(pid), Some(count)) = (listen_pid, listen_fds) else {
        return Ok(Vec::new());
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| EnvError::new("LISTEN_PID", pid, "not a process id"))?;
    if pid != my_pid {
        return Ok(Vec::new());
    }
    let n: usize = count
        .trim()
        .parse()
        .map_err(|_| EnvError::new("LISTEN_FDS", count, "not a non-negative integer"))?;
    if n > MAX_LISTEN_FDS {
        return Err(EnvError::new(
            "LISTEN_FDS",
            count,
            format!("more than {MAX_LISTEN_FDS} fds"),
        ));
    }
    let names: Vec<Option<String>> = match listen_fdnames {
        Some(names) if n > 0 => {
            let names: Vec<Option<String>> = names
                .split(':')
                .map(|name| (!name.is_empty()).then(|| name.to_owned()))
                .collect();
            if names.len() != n {
                return Err(EnvError::new(
                    "LISTEN_FDNAMES",
                    listen_fdnames.unwrap_or_default(),
                    format!("{} names for LISTEN_FDS={n}", names.len()),
                ));
            }
            names
        }
        _ => vec![None; n],
    };
    Ok(names
        .into_iter()
        .zip(LISTEN_FDS_START..)
        .map(|(name, fd)| InheritedFd { fd, name })
        .collect())
}

/// Parses `CLUSTERD_APP`, `CLUSTERD_WORKER_ID` and `CLUSTERD_GENERATION`.
///
/// `None` when `CLUSTERD_APP` is unset (not running under clusterd). A missing generation is 0.
pub(crate) fn parse_worker_info(
    app: Option<&str>,
    worker_id: Option<&str>,
    generation: Option<&str>,
) -> Result<Option<WorkerInfo>, EnvError> {
    let Some(app) = app else {
        return Ok(None);
    };
    let worker_id = worker_id.ok_or_else(|| {
        EnvError::new(
            "CLUSTERD_WORKER_ID",
            "",
            "unset although CLUSTERD_APP is set",
        )
    })?;
    let slot = worker_id
        .trim()
        .parse()
        .map_err(|_| EnvError::new("CLUSTERD_WORKER_ID", worker_id, "not a slot number"))?;
    let generation = match generation {
        None => 0,
        Some(g) => g
            .trim()
            .parse()
            .map_err(|_| EnvError::new("CLUSTERD_GENERATION", g, "not a non-negative integer"))?,
    };
    Ok(Some(WorkerInfo {
        app: app.to_owned(),
        slot,
        generation,
    }))
}

/// Parses `NOTIFY_SOCKET`, `None` when unset; see [`parse_notify_addr`].
pub(crate) fn parse_notify_socket(value: Option<&OsStr>) -> Result<Option<NotifyAddr>, EnvError> {
    value.map(parse_notify_addr).transpose()
}

/// Parses a notify socket address: an absolute path, or `@name` for the abstract namespace.
pub(crate) fn parse_notify_addr(value: &OsStr) -> Result<NotifyAddr, EnvError> {
    match value.as_bytes() {
        [] => Err(EnvError::new("NOTIFY_SOCKET", value, "empty")),
        [b'@'] => Err(EnvError::new(
            "NOTIFY_SOCKET",
            value,
            "empty abstract socket name",
        )),
        [b'@', name @ ..] => Ok(NotifyAddr::Abstract(name.to_vec())),
        [b'/', ..] => Ok(NotifyAddr::Path(PathBuf::from(value))),
        _ => Err(EnvError::new(
            "NOTIFY_SOCKET",
            value,
            "neither an absolute path nor an @abstract name",
        )),
    }
}

/// Parses `WATCHDOG_USEC` (and `WATCHDOG_PID`, which when set must equal `my_pid`).
pub(crate) fn parse_watchdog(
    usec: Option<&str>,
    watchdog_pid: Option<&str>,
    my_pid: u32,
) -> Result<Option<Duration>, EnvError> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    if let Some(pid) = watchdog_pid {
        let pid: u32 = pid
            .trim()
            .parse()
            .map_err(|_| EnvError::new("WATCHDOG_PID", pid, "not a process id"))?;
        if pid != my_pid {
            return Ok(None);
        }
    }
    match usec.trim().parse::<u64>() {
        Ok(0) => Err(EnvError::new("WATCHDOG_USEC", usec, "zero")),
        Ok(us) => Ok(Some(Duration::from_micros(us))),
        Err(_) => Err(EnvError::new(
            "WATCHDOG_USEC",
            usec,
            "not a positive number of microseconds",
        )),
    }
}

/// Everything the SDK reads from the environment, parsed once per process.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// `LISTEN_*`.
    pub listen: Result<Vec<InheritedFd>, EnvError>,
    /// `CLUSTERD_*`.
    pub worker: Result<Option<WorkerInfo>, EnvError>,
    /// `NOTIFY_SOCKET`.
    pub notify: Result<Option<NotifyAddr>, EnvError>,
    /// `WATCHDOG_*`.
    pub watchdog: Result<Option<Duration>, EnvError>,
}

/// The process's environment, read and parsed on the first call.
pub(crate) fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let pid = std::process::id();
        let listen = (|| {
            parse_listen_fds(
                utf8_var("LISTEN_PID")?.as_deref(),
                utf8_var("LISTEN_FDS")?.as_deref(),
                utf8_var("LISTEN_FDNAMES")?.as_deref(),
                pid,
            )
        })();
        let worker = (|| {
            parse_worker_info(
                utf8_var("CLUSTERD_APP")?.as_deref(),
                utf8_var("CLUSTERD_WORKER_ID")?.as_deref(),
                utf8_var("CLUSTERD_GENERATION")?.as_deref(),
            )
        })();
        let notify = parse_notify_socket(std::env::var_os("NOTIFY_SOCKET").as_deref());
        let watchdog = (|| {
            parse_watchdog(
                utf8_var("WATCHDOG_USEC")?.as_deref(),
                utf8_var("WATCHDOG_PID")?.as_deref(),
                pid,
            )
        })();
        Snapshot {
            listen,
            worker,
            notify,
            watchdog,
        }
    })
}

/// Who this worker is; `Ok(None)` outside clusterd (`CLUSTERD_APP` unset).
pub fn worker_info() -> Result<Option<WorkerInfo>, EnvError> {
    snapshot().worker.clone()
}

/// Reads a variable that must be UTF-8 when set.
fn utf8_var(var: &'static str) -> Result<Option<String>, EnvError> {
    std::env::var_os(var)
        .map(|value: OsString| {
            value
                .into_string()
                .map_err(|value| EnvError::new(var, value, "not valid UTF-8"))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fds(list: &[(RawFd, Option<&str>)]) -> Vec<InheritedFd> {
        list.iter()
            .map(|&(fd, name)| InheritedFd {
                fd,
                name: name.map(str::to_owned),
            })
            .collect()
    }

    #[test]
    fn listen_fds_count_only_for_our_pid() {
        assert_eq!(
            parse_listen_fds(Some("42"), Some("2"), None, 42),
            Ok(fds(&[(3, None), (4, None)]))
        );
        assert_eq!(
            parse_listen_fds(Some("41"), Some("2"), None, 42),
            Ok(vec![])
        );
        // LISTEN_PID is required, as in systemd.
        assert_eq!(parse_listen_fds(None, Some("2"), None, 42), Ok(vec![]));
        assert_eq!(parse_listen_fds(Some("42"), None, None, 42), Ok(vec![]));
        // A leaked, malformed LISTEN_FDS for another process is not our problem.
        assert_eq!(
            parse_listen_fds(Some("41"), Some("x"), None, 42),
            Ok(vec![])
        );
        assert_eq!(
            parse_listen_fds(Some("42"), Some("0"), None, 42),
            Ok(vec![])
        );
    }

    #[test]
    fn listen_fd_names_pair_with_fds() {
        assert_eq!(
            parse_listen_fds(Some("7"), Some("3"), Some("http:admin:"), 7),
            Ok(fds(&[(3, Some("http")), (4, Some("admin")), (5, None)]))
        );
        let err = parse_listen_fds(Some("7"), Some("3"), Some("http:admin"), 7).unwrap_err();
        assert_eq!(err.var, "LISTEN_FDNAMES");
        assert!(
            err.to_string().contains("2 names for LISTEN_FDS=3"),
            "{err}"
        );
        // With no fds, names are irrelevant.
        assert_eq!(
            parse_listen_fds(Some("7"), Some("0"), Some(""), 7),
            Ok(vec![])
        );
    }

    #[test]
    fn malformed_listen_values_are_errors() {
        let err = parse_listen_fds(Some("seven"), Some("1"), None, 7).unwrap_err();
        assert_eq!(err.var, "LISTEN_PID");
        assert_eq!(err.value, "seven");
        let err = parse_listen_fds(Some("7"), Some("-1"), None, 7).unwrap_err();
        assert_eq!(err.var, "LISTEN_FDS");
        let err = parse_listen_fds(Some("7"), Some("100000"), None, 7).unwrap_err();
        assert!(err.reason.contains("more than"), "{err}");
    }

    #[test]
    fn worker_info_needs_app_and_slot() {
        assert_eq!(parse_worker_info(None, Some("1"), Some("2")), Ok(None));
        assert_eq!(
            parse_worker_info(Some("web"), Some("2"), Some("5")),
            Ok(Some(WorkerInfo {
                app: "web".into(),
                slot: 2,
                generation: 5
            }))
        );
        assert_eq!(
            parse_worker_info(Some("web"), Some("0"), None).map(|i| i.map(|i| i.generation)),
            Ok(Some(0))
        );
        assert_eq!(
            parse_worker_info(Some("web"), None, None).unwrap_err().var,
            "CLUSTERD_WORKER_ID"
        );
        assert_eq!(
            parse_worker_info(Some("web"), Some("-1"), None)
                .unwrap_err()
                .var,
            "CLUSTERD_WORKER_ID"
        );
        assert_eq!(
            parse_worker_info(Some("web"), Some("1"), Some("g1"))
                .unwrap_err()
                .var,
            "CLUSTERD_GENERATION"
        );
    }

    #[test]
    fn notify_socket_is_a_path_or_abstract() {
        assert_eq!(parse_notify_socket(None), Ok(None));
        assert_eq!(
            parse_notify_socket(Some(OsStr::new("/run/clusterd/notify"))),
            Ok(Some(NotifyAddr::Path("/run/clusterd/notify".into())))
        );
        assert_eq!(
            parse_notify_socket(Some(OsStr::new("@clusterd/notify"))),
            Ok(Some(NotifyAddr::Abstract(b"clusterd/notify".to_vec())))
        );
        for bad in ["", "@", "relative/notify", "vsock:2:1"] {
            let err = parse_notify_socket(Some(OsStr::new(bad))).unwrap_err();
            assert_eq!(err.var, "NOTIFY_SOCKET", "{bad:?}");
        }
    }

    #[test]
    fn watchdog_interval_from_usec() {
        assert_eq!(parse_watchdog(None, None, 9), Ok(None));
        assert_eq!(
            parse_watchdog(Some("2500000"), None, 9),
            Ok(Some(Duration::from_millis(2500)))
        );
        assert_eq!(
            parse_watchdog(Some("1000"), Some("9"), 9),
            Ok(Some(Duration::from_millis(1)))
        );
        assert_eq!(parse_watchdog(Some("1000"), Some("8"), 9), Ok(None));
        for bad in ["0", "-5", "1s", ""] {
            let err = parse_watchdog(Some(bad), None, 9).unwrap_err();
            assert_eq!(err.var, "WATCHDOG_USEC", "{bad:?}");
        }
        assert_eq!(
            parse_watchdog(Some("1000"), Some("me"), 9).unwrap_err().var,
            "WATCHDOG_PID"
        );
    }
}
