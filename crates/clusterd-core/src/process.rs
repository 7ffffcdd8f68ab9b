//! The few facts of the OS the core reasons about, as plain values: a process id, how a
//! process ended, what a signal to clusterd asks for, and a process group's usage. The
//! daemon makes them from the system calls' results (`reaper`, `signals`, `procstat`).

use std::collections::HashMap;
use std::fmt;

use clusterd_manifest::Signal;
use serde::{Deserialize, Serialize};

use crate::state::WorkerId;

/// A process id (a worker's is also its process group's id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid(i32);

impl Pid {
    /// The pid numbered `raw`.
    pub const fn from_raw(raw: i32) -> Pid {
        Pid(raw)
    }

    /// Its number.
    pub const fn as_raw(self) -> i32 {
        self.0
    }
}

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called `exit` with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(Signal),
}

impl ExitStatus {
    /// True for a clean `exit(0)`.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "status {code}"),
            ExitStatus::Signal(sig) => write!(f, "signal {}", sig.as_str()),
        }
    }
}

/// A signal to clusterd, as what it asks the supervisor to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SupervisorSignal {
    /// SIGTERM or SIGINT.
    Stop(Signal),
    /// SIGUSR2.
    Reload,
    /// SIGHUP.
    Reread,
    /// SIGTTIN (+1) or SIGTTOU (-1).
    ScaleBy(i64),
    /// SIGURG: `clusterd upgrade` with clusterd's own binary.
    Upgrade,
}

/// CPU seconds and resident bytes of one process group.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident memory, bytes.
    pub rss_bytes: u64,
}

/// An `Option<Pid>` as a number or null.
pub(crate) mod opt_pid {
    use super::*;
    use serde::{Deserializer, Serializer};

    /// Writes `pid`.
    pub fn serialize<S: Serializer>(pid: &Option<Pid>, s: S) -> Result<S::Ok, S::Error> {
        pid.map(Pid::as_raw).serialize(s)
    }

    /// Reads an optional pid.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Pid>, D::Error> {
        Ok(Option::<i32>::deserialize(d)?.map(Pid::from_raw))
    }
}

/// The core's pid index, as `[pid, worker]` pairs.
pub(crate) mod pid_map {
    use super::*;
    use serde::{Deserializer, Serializer};

    /// Writes the map.
    pub fn serialize<S: Serializer>(map: &HashMap<Pid, WorkerId>, s: S) -> Result<S::Ok, S::Error> {
        let pairs: Vec<(i32, WorkerId)> = map.iter().map(|(p, w)| (p.as_raw(), *w)).collect();
        pairs.serialize(s)
    }

    /// Reads the map.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<HashMap<Pid, WorkerId>, D::Error> {
        let pairs = Vec::<(i32, WorkerId)>::deserialize(d)?;
        Ok(pairs
            .into_iter()
            .map(|(p, w)| (Pid::from_raw(p), w))
            .collect())
    }
}
