//! A worker's environment, as a pure function of what it is and what clusterd hands it:
//! the manifest's `env` (with `{slot}`), the sd_notify and socket-activation variables, and
//! clusterd's own (`CLUSTERD_*`, Node's channel variables for `ipc`).

use std::collections::BTreeMap;
use std::path::Path;

use clusterd_manifest::AppConfig;

/// Who a worker is and what it gets, besides its app's configuration.
pub struct WorkerEnv<'a> {
    /// The environment every worker starts from (clusterd's own, at start).
    pub base: &'a BTreeMap<String, String>,
    /// Its app's name.
    pub app: &'a str,
    /// Its slot.
    pub slot: usize,
    /// Its generation.
    pub generation: u64,
    /// How many listening sockets it finds at fds 3, 4, ...
    pub listen_count: usize,
    /// clusterd's notify socket.
    pub notify_socket: &'a Path,
    /// clusterd's own binary, for `clusterd notify` and friends.
    pub exe: Option<&'a str>,
    /// The fd of its message channel (`ipc`).
    pub ipc_fd: Option<i32>,
}

impl WorkerEnv<'_> {
    /// The complete environment (except `LISTEN_PID`, which the child fills in), sorted.
    pub fn build(&self, config: &AppConfig) -> Vec<(String, String)> {
        let mut env = self.base.clone();
        // `{slot}` in a value is the worker's slot (PM2's increment_var: `PORT = "91{slot}"`).
        let slot_text = self.slot.to_string();
        env.extend(
            config
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.replace("{slot}", &slot_text))),
        );
        if self.listen_count > 0 {
            env.insert("LISTEN_FDS".into(), self.listen_count.to_string());
            env.insert("LISTEN_FDNAMES".into(), config.sockets.join(":"));
        }
        env.insert(
            "NOTIFY_SOCKET".into(),
            self.notify_socket.display().to_string(),
        );
        if let Some(period) = config.watchdog {
            env.insert("WATCHDOG_USEC".into(), period.as_micros().to_string());
        }
        env.insert("CLUSTERD_APP".into(), self.app.to_owned());
        env.insert("CLUSTERD_WORKER_ID".into(), slot_text);
        env.insert("CLUSTERD_GENERATION".into(), self.generation.to_string());
        if let Some(segment) = &config.kv_segment {
            env.insert("CLUSTERD_KV_SEGMENT".into(), segment.clone());
        }
        if let Some(exe) = self.exe {
            env.insert("CLUSTERD_EXE".into(), exe.to_owned());
        }
        if let Some(fd) = self.ipc_fd {
            let fd = fd.to_string();
            env.insert("CLUSTERD_IPC_FD".into(), fd.clone());
            env.insert("NODE_CHANNEL_FD".into(), fd);
            env.insert("NODE_CHANNEL_SERIALIZATION_MODE".into(), "json".into());
        }
        env.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn app(text: &str) -> AppConfig {
        let manifest = clusterd_manifest::parse(text, Path::new("/srv/app/clusterd.toml"))
            .expect("valid manifest");
        manifest.apps["web"].clone()
    }

    fn env_of(text: &str, worker: impl FnOnce(&mut WorkerEnv<'_>)) -> BTreeMap<String, String> {
        let base = BTreeMap::from([
            ("PATH".to_owned(), "/usr/bin".to_owned()),
            ("PORT".to_owned(), "1".to_owned()),
        ]);
        let mut env = WorkerEnv {
            base: &base,
            app: "web",
            slot: 2,
            generation: 7,
            listen_count: 0,
            notify_socket: Path::new("/run/x/notify.sock"),
            exe: None,
            ipc_fd: None,
        };
        worker(&mut env);
        env.build(&app(text)).into_iter().collect()
    }

    #[test]
    fn the_manifest_env_overrides_the_base_and_slot_is_filled_in() {
        let env = env_of(
            "[apps.web]\ncommand = [\"w\"]\nenv = { PORT = \"91{slot}\" }\n",
            |_| {},
        );
        assert_eq!(env["PORT"], "912");
        assert_eq!(env["PATH"], "/usr/bin");
        assert_eq!(env["CLUSTERD_APP"], "web");
        assert_eq!(env["CLUSTERD_WORKER_ID"], "2");
        assert_eq!(env["CLUSTERD_GENERATION"], "7");
        assert_eq!(env["NOTIFY_SOCKET"], "/run/x/notify.sock");
        for absent in [
            "LISTEN_FDS",
            "WATCHDOG_USEC",
            "CLUSTERD_IPC_FD",
            "CLUSTERD_EXE",
        ] {
            assert!(!env.contains_key(absent), "{absent}");
        }
    }

    #[test]
    fn sockets_watchdog_ipc_and_exe() {
        let text = "[sockets.http]\nlisten = \"127.0.0.1:0\"\n[sockets.admin]\nlisten = \"127.0.0.1:0\"\n\
                    [apps.web]\ncommand = [\"w\"]\nsockets = [\"http\", \"admin\"]\nwatchdog = \"2s\"\nipc = true\n";
        let env = env_of(text, |w| {
            w.listen_count = 2;
            w.ipc_fd = Some(5);
            w.exe = Some("/usr/bin/clusterd");
        });
        assert_eq!(env["LISTEN_FDS"], "2");
        assert_eq!(env["LISTEN_FDNAMES"], "http:admin");
        assert_eq!(env["WATCHDOG_USEC"], "2000000");
        assert_eq!(env["CLUSTERD_IPC_FD"], "5");
        assert_eq!(env["NODE_CHANNEL_FD"], "5");
        assert_eq!(env["NODE_CHANNEL_SERIALIZATION_MODE"], "json");
        assert_eq!(env["CLUSTERD_EXE"], "/usr/bin/clusterd");
    }
}
