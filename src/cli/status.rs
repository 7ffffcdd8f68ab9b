//! `clusterd status` (a table, `--json`, or `--check` for probes).

use std::path::PathBuf;
use std::process::ExitCode;

use clusterd_proto::{Reply, Request};

use super::client::Target;
use super::{control_command, print_out, render};

/// `clusterd status`.
pub fn status(json: bool, check: bool, file: Option<PathBuf>, mut target: Target) -> ExitCode {
    if let Some(file) = file {
        target.manifest = file;
    }
    control_command(&target, Request::Status {}, |reply| match reply {
        Reply::Status(status) if check => match status.not_ready {
            _ if status.ready => print_out(format_args!("ready\n")).map(|()| true),
            reason => print_out(format_args!(
                "not ready: {}\n",
                reason.as_deref().unwrap_or("unknown")
            ))
            .map(|()| false),
        },
        Reply::Status(status) if json => {
            let json = serde_json::to_string_pretty(&status).unwrap_or_default();
            print_out(format_args!("{json}\n")).map(|()| true)
        }
        Reply::Status(status) => {
            print_out(format_args!("{}", render::status_table(&status))).map(|()| true)
        }
        _ => Ok(false),
    })
}
