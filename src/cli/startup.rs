//! `clusterd startup` (PM2's `pm2 startup`): the systemd unit that runs a manifest at boot,
//! printed, or with `--install` written and enabled.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, bail};
use clusterd_manifest::Manifest;

use super::{load_manifest, print_out};

/// The first systemd release that knows `Type=notify-reload`.
const NOTIFY_RELOAD_SINCE: u32 = 253;

/// Added to the longest stop of any app for `TimeoutStopSec=`, as for `clusterd stop`.
const STOP_MARGIN: Duration = Duration::from_secs(10);

/// What `clusterd startup` was asked for.
#[derive(Debug, clap::Args)]
pub struct StartupArgs {
    /// The manifest the unit runs.
    #[arg(default_value = "supervisor.toml")]
    pub manifest: PathBuf,
    /// A unit of the user's own systemd instance (`systemctl --user`), started at login, or at
    /// boot with `loginctl enable-linger`; without it, a system unit running as this user.
    #[arg(long)]
    pub user: bool,
    /// Write the unit where systemd looks for it and enable it (`systemctl enable`), instead
    /// of printing it.
    #[arg(long)]
    pub install: bool,
    /// The unit's name (default: `clusterd-` and the manifest's directory name).
    #[arg(long)]
    pub name: Option<String>,
}

/// `clusterd startup`.
pub fn startup(args: &StartupArgs) -> ExitCode {
    let manifest = match load_manifest(&args.manifest) {
        Ok(manifest) => manifest,
        Err(code) => return code,
    };
    super::report(write_or_print(args, &manifest))
}

fn write_or_print(args: &StartupArgs, manifest: &Manifest) -> anyhow::Result<()> {
    let name = match &args.name {
        Some(name) => unit_name(name),
        None => default_name(&manifest.path),
    };
    let binary = std::env::current_exe().context("cannot find the clusterd binary's path")?;
    let systemd = systemd_version();
    let unit = Unit {
        manifest,
        binary: &binary,
        user: args.user,
        name: &name,
        systemd,
        account: (!args.user && !nix::unistd::geteuid().is_root())
            .then(current_user)
            .transpose()?,
        path: std::env::var_os("PATH"),
    }
    .render();
    if !args.install {
        print_out(format_args!("{unit}"))?;
        return Ok(());
    }
    let dir = unit_dir(args.user)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let file = dir.join(format!("{name}.service"));
    std::fs::write(&file, unit).with_context(|| {
        format!(
            "cannot write {}{}",
            file.display(),
            if args.user {
                ""
            } else {
                " (a system unit needs root: run it with sudo, or use --user)"
            }
        )
    })?;
    systemctl(args.user, &["daemon-reload"])?;
    systemctl(args.user, &["enable", &format!("{name}.service")])?;
    let flag = if args.user { " --user" } else { "" };
    print_out(format_args!(
        "wrote {} and enabled it; start it now with: systemctl{flag} start {name}\n",
        file.display()
    ))?;
    Ok(())
}

/// Runs `systemctl [--user] ARGS`, failing with what it said.
fn systemctl(user: bool, args: &[&str]) -> anyhow::Result<()> {
    let mut command = Command::new("systemctl");
    if user {
        command.arg("--user");
    }
    let output = command
        .args(args)
        .output()
        .context("cannot run systemctl")?;
    if !output.status.success() {
        bail!(
            "systemctl {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Where systemd reads units: `/etc/systemd/system`, or for `--user`
/// `$XDG_CONFIG_HOME/systemd/user` (default `~/.config/systemd/user`).
fn unit_dir(user: bool) -> anyhow::Result<PathBuf> {
    if !user {
        return Ok(PathBuf::from("/etc/systemd/system"));
    }
    let config = match std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            Some(home) => PathBuf::from(home).join(".config"),
            None => bail!("neither XDG_CONFIG_HOME nor HOME is set: cannot find the user units"),
        },
    };
    Ok(config.join("systemd/user"))
}

/// The running user's name, for `User=`.
fn current_user() -> anyhow::Result<String> {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => Ok(user.name),
        Ok(None) => bail!("user {uid} has no name in the user database, which User= needs"),
        Err(error) => Err(error).context("cannot read the user database"),
    }
}

/// The version of the systemd that `systemctl --version` reports (`systemd 252 (...)`).
fn systemd_version() -> Option<u32> {
    let output = Command::new("systemctl").arg("--version").output().ok()?;
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `clusterd-<directory>` for `supervisor.toml`, `clusterd-<directory>-<stem>` for any other
/// manifest file name.
fn default_name(manifest: &Path) -> String {
    let dir = manifest
        .parent()
        .and_then(Path::file_name)
        .and_then(OsStr::to_str)
        .unwrap_or("root");
    let stem = manifest
        .file_stem()
        .and_then(OsStr::to_str)
        .unwrap_or("supervisor");
    if stem == "supervisor" {
        unit_name(&format!("clusterd-{dir}"))
    } else {
        unit_name(&format!("clusterd-{dir}-{stem}"))
    }
}

/// `name` with every character a unit name cannot hold replaced by `-`.
fn unit_name(name: &str) -> String {
    let name = name.strip_suffix(".service").unwrap_or(name);
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.:".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The longest a stop may take: per app, its `drain`, then `stop_timeout` (twice for
/// `stop_signal = "disconnect"`, whose stop signal comes after one); plus [`STOP_MARGIN`].
fn timeout_stop(manifest: &Manifest) -> Duration {
    let longest = manifest
        .apps
        .values()
        .map(|app| {
            app.drain.unwrap_or_default() + app.stop_timeout * (1 + u32::from(app.stop_disconnect))
        })
        .chain([manifest.supervisor.stop_timeout])
        .max()
        .unwrap_or_default();
    longest + STOP_MARGIN
}

/// A value of a unit file setting: `%` (specifiers) doubled.
fn value(text: &str) -> String {
    text.replace('%', "%%")
}

/// One word of `ExecStart=`, quoted, with `\`, `"`, `$` and `%` escaped.
fn exec_word(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('$', "$$")
        .replace('%', "%%");
    format!("\"{escaped}\"")
}

/// One `Environment=` assignment, quoted, with `\`, `"` and `%` escaped.
fn env_word(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('%', "%%");
    format!("\"{escaped}\"")
}

/// The parts of the unit.
struct Unit<'a> {
    manifest: &'a Manifest,
    binary: &'a Path,
    user: bool,
    name: &'a str,
    systemd: Option<u32>,
    /// `User=` of a system unit written by someone else than root.
    account: Option<String>,
    path: Option<std::ffi::OsString>,
}

impl Unit<'_> {
    fn render(&self) -> String {
        let manifest = &self.manifest.path;
        let dir = manifest.parent().unwrap_or(Path::new("/"));
        let mut exec = vec![
            exec_word(&self.binary.display().to_string()),
            "start".to_owned(),
        ];
        let mut lines = vec![
            format!(
                "# Written by `clusterd startup{}` for {}.",
                if self.user { " --user" } else { "" },
                manifest.display()
            ),
            "[Unit]".to_owned(),
            format!(
                "Description=clusterd {}",
                value(&manifest.display().to_string())
            ),
        ];
        if !self.user {
            lines.push("After=network.target".to_owned());
        }
        lines.push(String::new());
        lines.push("[Service]".to_owned());
        // READY=1 once every app has its ready workers; RELOADING=1 ... READY=1 around SIGHUP.
        match self.systemd {
            Some(version) if version < NOTIFY_RELOAD_SINCE => {
                lines.push(format!(
                    "# systemd {version} predates Type=notify-reload (253): SIGHUP by hand."
                ));
                lines.push("Type=notify".to_owned());
                lines.push("ExecReload=/bin/kill -HUP $MAINPID".to_owned());
            }
            _ => lines.push("Type=notify-reload".to_owned()),
        }
        lines.push("NotifyAccess=main".to_owned());
        if let Some(account) = &self.account {
            lines.push(format!("User={}", value(account)));
        }
        if !self.user && self.manifest.supervisor.run_dir.is_none() {
            // No XDG_RUNTIME_DIR in a system unit: the run dir is /run/<name>, which
            // `clusterd status --run-dir /run/<name>` finds.
            lines.push(format!("RuntimeDirectory={}", self.name));
            lines.push("RuntimeDirectoryMode=0700".to_owned());
            exec.push("--run-dir".to_owned());
            exec.push(exec_word(&format!("/run/{}", self.name)));
        }
        exec.push(exec_word(&manifest.display().to_string()));
        lines.push(format!(
            "WorkingDirectory={}",
            value(&dir.display().to_string())
        ));
        if let Some(path) = &self.path {
            // Commands named without a `/` are looked up in PATH, as from the shell.
            lines.push(format!(
                "Environment={}",
                env_word(&format!("PATH={}", path.to_string_lossy()))
            ));
        }
        lines.push(format!("ExecStart={}", exec.join(" ")));
        lines.push("WatchdogSec=30s".to_owned());
        // SIGTERM to clusterd alone: it stops each worker with its stop_signal, and kills
        // what is left after stop_timeout; systemd's SIGKILL comes only after TimeoutStopSec.
        lines.push("KillMode=mixed".to_owned());
        lines.push(format!(
            "TimeoutStopSec={}s",
            timeout_stop(self.manifest).as_secs_f64().ceil()
        ));
        // A cgroup per worker under the service's own.
        lines.push("Delegate=yes".to_owned());
        if !self.user {
            lines.push("LimitNOFILE=65536".to_owned());
        }
        lines.push("Restart=on-failure".to_owned());
        lines.push(String::new());
        lines.push("[Install]".to_owned());
        lines.push(format!(
            "WantedBy={}",
            if self.user {
                "default.target"
            } else {
                "multi-user.target"
            }
        ));
        let mut text = lines.join("\n");
        text.push('\n');
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(apps: &str) -> Manifest {
        let text = format!("[supervisor]\nstop_timeout = \"5s\"\n{apps}");
        clusterd_manifest::parse(&text, Path::new("/srv/my shop/supervisor.toml")).unwrap()
    }

    #[test]
    fn timeout_stop_covers_drain_and_a_disconnect_stop() {
        let plain = "[apps.a]\ncommand = [\"x\"]\nstop_timeout = \"7s\"\n";
        assert_eq!(timeout_stop(&manifest(plain)), Duration::from_secs(17));
        let disconnect = "[apps.b]\ncommand = [\"node\", \"b.js\"]\n\
                          stop_signal = \"disconnect\"\nstop_timeout = \"8s\"\n";
        assert_eq!(timeout_stop(&manifest(disconnect)), Duration::from_secs(26));
        let drained = "[sockets.http]\nlisten = \"127.0.0.1:8000\"\n\
                       [apps.c]\ncommand = [\"x\"]\nsockets = [\"http\"]\nintercept = true\n\
                       drain = \"3s\"\n";
        assert_eq!(timeout_stop(&manifest(drained)), Duration::from_secs(18));
        let inherited = "[apps.d]\ncommand = [\"x\"]\n";
        assert_eq!(timeout_stop(&manifest(inherited)), Duration::from_secs(15));
    }

    #[test]
    fn unit_names_hold_only_what_systemd_accepts() {
        let path = Path::new("/srv/my shop/supervisor.toml");
        assert_eq!(default_name(path), "clusterd-my-shop");
        assert_eq!(
            default_name(Path::new("/srv/api/kv.toml")),
            "clusterd-api-kv"
        );
        assert_eq!(unit_name("web/é.service"), "web--");
        assert_eq!(exec_word("/a b/$x%\"\\"), "\"/a b/$$x%%\\\"\\\\\"");
    }
}
