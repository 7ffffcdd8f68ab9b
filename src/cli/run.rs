//! `clusterd run`: one app from the command line, no manifest file. The options are written
//! out as the text of a one-app manifest and parsed by `clusterd_manifest::parse`, so `run`
//! behaves exactly as `start` on that manifest (one code path); `--print-manifest` prints the
//! text, to graduate to a file.
//!
//! The manifest is named `<name>.toml` in the current directory (it is not written there:
//! relative paths resolve against the current directory, and SIGHUP, which re-reads the file,
//! does not apply). Its run directory is `.clusterd/<name>` in the current directory unless
//! `--run-dir` says otherwise, so `clusterd status --run-dir .clusterd/<name>` finds it.

use std::fmt::Write as _;
use std::path::PathBuf;

use clusterd_manifest::{Manifest, ManifestError};

/// What `clusterd run` was asked to run.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Number of workers, or `auto` (one per CPU).
    #[arg(short = 'w', long, default_value = "1")]
    pub workers: String,
    /// An address the app binds (`127.0.0.1:8001`, `[::1]:8001`, `unix:app.sock`): clusterd
    /// holds it and answers the app's own bind() with it. Repeatable. Not needed with several
    /// workers: clusterd then binds each TCP port the app binds on the first worker's request
    /// and shares it among them.
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Readiness: `listen` (default with --listen; without it, with several workers: it
    /// listens or has run 5s, whichever comes first), `delay`, `notify` or `immediate`.
    #[arg(long)]
    pub ready: Option<String>,
    /// The app's name (default: the program's file name).
    #[arg(long)]
    pub name: Option<String>,
    /// Directory for the pid file, control and notify sockets (default `.clusterd/NAME`).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Do not trap the app's bind(): it takes its sockets at fd 3, 4, ... itself (without
    /// --listen, its workers bind on their own).
    #[arg(long)]
    pub no_intercept: bool,
    /// How long a retiring worker gets without new connections before its stop signal
    /// (default 1s; `0s`: none, it is steered out right before its signal).
    #[arg(long, value_name = "DURATION")]
    pub drain: Option<String>,
    /// How connections reach the workers: `round-robin` (default: a steered socket each,
    /// taking connections in turn), `least-queued` (to the one with the fewest waiting),
    /// `random`, `ip-hash`, or `shared` (one accept queue).
    #[arg(long, value_name = "BALANCE")]
    pub balance: Option<String>,
    /// Reload (rolling) when files change: these paths (directories with what is below them),
    /// or the current directory when none is given. Repeatable.
    #[arg(long, value_name = "PATH", num_args = 0.., action = clap::ArgAction::Append)]
    pub watch: Option<Vec<String>>,
    /// Print the equivalent manifest and exit.
    #[arg(long)]
    pub print_manifest: bool,
    /// The program and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

impl RunArgs {
    /// The app's name: `--name`, else the program's file name made of manifest name
    /// characters (`[A-Za-z0-9_.-]`), else `app`.
    pub fn app_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        let program = self.command[0].rsplit('/').next().unwrap_or_default();
        let name: String = program
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            .collect();
        if name.is_empty() { "app".into() } else { name }
    }

    /// Where the manifest would live: `<name>.toml` in the current directory.
    pub fn manifest_path(&self) -> std::io::Result<PathBuf> {
        Ok(std::env::current_dir()?.join(format!("{}.toml", self.app_name())))
    }

    /// The equivalent manifest's text.
    pub fn manifest_text(&self) -> std::io::Result<String> {
        let name = self.app_name();
        let run_dir = match &self.run_dir {
            Some(dir) => std::path::absolute(dir)?,
            None => std::env::current_dir()?.join(".clusterd").join(&name),
        };
        let quote = |s: &str| toml::Value::String(s.to_owned()).to_string();
        let mut text = String::new();
        let _ = writeln!(text, "# clusterd run {}", self.command.join(" "));
        let _ = writeln!(
            text,
            "[supervisor]\nrun_dir = {}\n",
            quote(&run_dir.to_string_lossy())
        );
        let sockets: Vec<String> = (0..self.listen.len())
            .map(|i| match i {
                0 => "http".to_owned(),
                _ => format!("http{}", i + 1),
            })
            .collect();
        for (socket, listen) in sockets.iter().zip(&self.listen) {
            let _ = writeln!(text, "[sockets.{socket}]\nlisten = {}\n", quote(listen));
        }
        let command: Vec<String> = self.command.iter().map(|a| quote(a)).collect();
        let bare = name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
        let key = if bare { name.clone() } else { quote(&name) };
        let _ = writeln!(text, "[apps.{key}]");
        let _ = writeln!(text, "command = [{}]", command.join(", "));
        let workers = match self.workers.parse::<u64>() {
            Ok(n) => n.to_string(),
            Err(_) => quote(&self.workers),
        };
        let _ = writeln!(text, "workers = {workers}");
        if !sockets.is_empty() {
            let names: Vec<String> = sockets.iter().map(|s| quote(s)).collect();
            let _ = writeln!(text, "sockets = [{}]", names.join(", "));
            let _ = writeln!(text, "intercept = {}", !self.no_intercept);
            if let Some(drain) = &self.drain {
                let _ = writeln!(text, "drain = {}", quote(drain));
            }
            if let Some(balance) = &self.balance {
                let _ = writeln!(text, "balance = {}", quote(balance));
            }
        } else if self.no_intercept {
            let _ = writeln!(text, "intercept = false");
        } else if let Some(drain) = &self.drain {
            // Intercepted by default with several workers (ports bound on demand).
            let _ = writeln!(text, "drain = {}", quote(drain));
        }
        if let Some(ready) = &self.ready {
            let _ = writeln!(text, "ready = {}", quote(ready));
        }
        match self.watch.as_deref() {
            None => {}
            Some([]) => {
                let _ = writeln!(text, "watch = true");
            }
            Some(paths) => {
                let paths: Vec<String> = paths.iter().map(|p| quote(p)).collect();
                let _ = writeln!(text, "watch = [{}]", paths.join(", "));
            }
        }
        Ok(text)
    }

    /// The manifest, validated like a file would be.
    pub fn manifest(&self) -> Result<Manifest, ManifestError> {
        let path = self.manifest_path().map_err(|source| ManifestError::Read {
            path: PathBuf::from("."),
            source,
        })?;
        let text = self.manifest_text().map_err(|source| ManifestError::Read {
            path: path.clone(),
            source,
        })?;
        clusterd_manifest::parse(&text, &path)
    }
}
