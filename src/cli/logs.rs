//! `clusterd logs`.

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use clusterd_proto::{Reply, Request};

use super::client::{self, Target};
use super::{EXIT_USAGE, is_broken_pipe};
use crate::daemon::logs;

/// `clusterd logs`: prints each line as it arrives (text as in a log file, or JSON).
pub fn logs(
    spec: Option<String>,
    lines: usize,
    follow: bool,
    json: bool,
    target: &Target,
) -> ExitCode {
    let (app, slot) = match spec.as_deref().map(|s| s.split_once(':')) {
        None => (None, None),
        Some(None) => (spec, None),
        Some(Some((app, slot))) => match slot.parse() {
            Ok(slot) => (Some(app.to_owned()), Some(slot)),
            Err(_) => {
                eprintln!(
                    "clusterd: {:?}: expected APP or APP:SLOT",
                    spec.unwrap_or_default()
                );
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    let request = Request::Logs {
        app,
        slot,
        lines,
        follow,
    };
    let timeout = (!follow).then_some(Duration::from_secs(30));
    let result = target.socket_path().and_then(|socket| {
        client::call_streaming(&socket, request, timeout, |reply| {
            let Reply::Log(line) = reply else {
                return Ok(());
            };
            let text = if json {
                clusterd_proto::encode_line(&line)
            } else {
                logs::format::text_of_line(&line)
            };
            let mut out = io::stdout().lock();
            out.write_all(&text)?;
            out.flush()
        })
    });
    match result {
        Ok(Reply::Done { .. }) => ExitCode::SUCCESS,
        Ok(Reply::Error { message, .. }) => {
            eprintln!("clusterd: {message}");
            ExitCode::FAILURE
        }
        Ok(other) => {
            eprintln!("clusterd: unexpected reply: {other:?}");
            ExitCode::FAILURE
        }
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("clusterd: {error:#}");
            ExitCode::FAILURE
        }
    }
}
