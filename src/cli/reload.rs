//! `clusterd reload`, `restart`, `scale` and `signal`: changing what runs.

use std::process::ExitCode;

use clusterd_proto::{ReloadResult, Reply, Request};

use super::client::Target;
use super::{EXIT_USAGE, app_slot, control_command, print_out};

/// `clusterd reload [APP] [--wait]`.
pub fn reload(app: Option<String>, wait: bool, target: &Target) -> ExitCode {
    control_command(target, Request::Reload { app, wait }, |reply| match reply {
        Reply::Reloaded { outcomes } => {
            let mut ok = true;
            for o in outcomes {
                match o.outcome {
                    ReloadResult::Completed => print_out(format_args!(
                        "{}: reload completed, generation {}\n",
                        o.app, o.generation
                    ))?,
                    ReloadResult::Aborted => {
                        ok = false;
                        print_out(format_args!(
                            "{}: reload ABORTED: {}\n",
                            o.app,
                            o.reason.unwrap_or_default()
                        ))?;
                    }
                }
            }
            Ok(ok)
        }
        _ => Ok(false),
    })
}

/// `clusterd restart APP[:SLOT]`.
pub fn restart(spec: &str, target: &Target) -> ExitCode {
    let Some((app, slot)) = app_slot(spec) else {
        return ExitCode::from(EXIT_USAGE);
    };
    control_command(target, Request::Restart { app, slot }, |_| Ok(false))
}

/// `clusterd scale APP N`.
pub fn scale(app: String, workers: usize, target: &Target) -> ExitCode {
    control_command(target, Request::Scale { app, workers }, |_| Ok(false))
}

/// `clusterd signal APP SIGNAL`.
pub fn signal(app: String, signal: String, target: &Target) -> ExitCode {
    control_command(target, Request::Signal { app, signal }, |_| Ok(false))
}
