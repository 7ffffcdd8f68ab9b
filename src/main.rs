//! `clusterd`: a process supervisor. This file only dispatches: the command line is
//! [`cli`] (clap definitions, one file per command family, the control client), the
//! supervisor itself is [`daemon`] (its decisions are the `clusterd-core` crate).
//!
//! Exit codes: 0 success, 1 runtime error, 2 invalid manifest or usage.

mod cli;
mod daemon;
mod error;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Lines before a supervisor has its output (and every CLI command's) go to stderr; a
    // supervisor logs through its own `Logs` once booted (see `daemon::boot`).
    cli::init_logging(std::io::stderr);
    match cli.command {
        Command::Start {
            manifest,
            run_dir,
            detach: true,
            timeout,
            ..
        } => cli::start::start_detached_checked(&manifest, run_dir.as_deref(), timeout),
        Command::Start {
            manifest,
            run_dir,
            detached,
            ..
        } => cli::start::start(&manifest, run_dir.as_deref(), detached),
        Command::Run(args) => cli::start::run(&args),
        Command::Check { manifest } => cli::start::check(&manifest),
        Command::Stop {
            timeout,
            no_wait,
            target,
        } => cli::start::stop(&target, timeout, no_wait),
        Command::Status {
            json,
            check,
            file,
            target,
        } => cli::status::status(json, check, file, target),
        Command::Monit { file, target } => cli::monit::monit(file, target),
        Command::Reload { app, wait, target } => cli::reload::reload(app, wait, &target),
        Command::Restart { spec, target } => cli::reload::restart(&spec, &target),
        Command::Scale {
            app,
            workers,
            target,
        } => cli::reload::scale(app, workers, &target),
        Command::Signal {
            app,
            signal,
            target,
        } => cli::reload::signal(app, signal, &target),
        Command::Logs {
            spec,
            lines,
            follow,
            json,
            target,
        } => cli::logs::logs(spec, lines, follow, json, &target.into()),
        Command::Upgrade { binary, target } => cli::report(cli::upgrade::upgrade(binary, &target)),
        Command::HandoverCheck => cli::upgrade::check(),
        Command::HandoverResume { fd } => cli::report(cli::upgrade::resume(fd)),
        Command::Startup(args) => cli::startup::startup(&args),
        Command::Ls(args) => cli::ls::ls(&args),
        Command::Notify { assignments } => cli::report(cli::notify::notify(&assignments)),
        Command::Send {
            spec,
            message,
            target,
        } => cli::notify::send(&spec, &message, &target),
    }
}
