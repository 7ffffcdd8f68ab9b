//! The crate's error type: one enum, each variant carrying what a reader needs to act on it
//! (the path or node address, what was being done, the underlying error). Its `Display` says
//! what failed; the cause is its `source()`, not repeated in the message: print an error with
//! [`Error::report`] (or anyhow's `{:#}`) to get the whole chain.

use std::io;
use std::path::PathBuf;

/// Errors of the KV client and of segment handling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An option has a value that cannot work.
    #[error("invalid option `{option}`: {reason}")]
    InvalidOption {
        /// The option's name.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A system call on a segment or lock file failed.
    #[error("{action} {}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What was being done, e.g. "mapping segment".
        action: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A segment exists under this cluster's name but belongs to something else (another
    /// layout version, another cluster, another user) and is in use, so it is left alone.
    #[error("segment {} is not ours and is in use: {reason}", path.display())]
    ForeignSegment {
        /// The segment file.
        path: PathBuf,
        /// What did not match.
        reason: String,
    },
    /// A cluster map does not fit the segment's fixed-size tables.
    #[error("cluster map does not fit the segment: {reason}")]
    MapTooLarge {
        /// Which limit was exceeded.
        reason: String,
    },
    /// A node could not be connected to.
    #[cfg(feature = "client")]
    #[error("connecting to Redis node {addr}")]
    Connect {
        /// The node's `host:port`.
        addr: String,
        /// The Redis client's error.
        #[source]
        source: redis::RedisError,
    },
    /// A command failed on a node (after any redirections were followed).
    #[cfg(feature = "client")]
    #[error("{command} on Redis node {addr}")]
    Command {
        /// The node's `host:port`.
        addr: String,
        /// The command's name.
        command: &'static str,
        /// The Redis client's error.
        #[source]
        source: redis::RedisError,
    },
    /// No node answered a topology query.
    #[cfg(feature = "client")]
    #[error("could not read the cluster topology from any of [{tried}]")]
    Topology {
        /// The nodes tried, comma-separated.
        tried: String,
        /// The last node's error (none when there was no node to ask).
        #[source]
        last: Option<Box<Error>>,
    },
    /// A node's topology reply could not be understood.
    #[cfg(feature = "client")]
    #[error("unexpected topology reply from {addr}: {reason}")]
    BadTopology {
        /// The node's `host:port`.
        addr: String,
        /// What was wrong with the reply.
        reason: String,
    },
    /// No node serves the key's slot in the current map.
    #[cfg(feature = "client")]
    #[error("no node serves hash slot {slot} in the cluster map")]
    NoRoute {
        /// The hash slot.
        slot: u16,
    },
    /// A command kept being redirected.
    #[cfg(feature = "client")]
    #[error("hash slot {slot}: gave up after {hops} redirections (last to {addr})")]
    TooManyRedirects {
        /// The hash slot.
        slot: u16,
        /// Redirections followed.
        hops: usize,
        /// The last node redirected to.
        addr: String,
    },
    /// An operation did not finish in time.
    #[cfg(feature = "client")]
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// The time limit.
        after: std::time::Duration,
    },
    /// The client was closed.
    #[cfg(feature = "client")]
    #[error("the KV client is closed")]
    Closed,
}

impl Error {
    /// The error and its causes, `what failed: why: deeper why`: how to print it.
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(error) = cause {
            out.push_str(": ");
            out.push_str(&error.to_string());
            cause = error.source();
        }
        out
    }

    /// Wraps an I/O error with the file and the action it happened in.
    pub(crate) fn io(path: impl Into<PathBuf>, action: &'static str, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            action,
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_says_what_failed_and_the_report_adds_each_cause_once() {
        let io = Error::io(
            "/dev/shm/x",
            "mapping segment",
            io::Error::other("no memory"),
        );
        assert_eq!(io.to_string(), "mapping segment /dev/shm/x");
        assert_eq!(io.report(), "mapping segment /dev/shm/x: no memory");
    }

    #[cfg(feature = "client")]
    #[test]
    fn the_topology_error_chains_the_last_nodes_error() {
        let last = Error::Timeout {
            what: "CLUSTER SHARDS",
            after: std::time::Duration::from_millis(100),
        };
        let error = Error::Topology {
            tried: "a:1, b:2".into(),
            last: Some(Box::new(last)),
        };
        assert_eq!(
            error.report(),
            "could not read the cluster topology from any of [a:1, b:2]: CLUSTER SHARDS timed \
             out after 100ms"
        );
    }
}
