//! Starting a worker: its program, environment ([`WorkerEnv`]), sockets, output pipes,
//! containment, interception and message channel, then the fork and exec (`daemon::spawn`).

use super::*;

/// A duplicate of the read ends of a worker's output pipes, for an upgrade.
pub(super) struct KeptOutput {
    pub(super) label: String,
    pub(super) stdout: OwnedFd,
    pub(super) stderr: OwnedFd,
}

impl Driver {
    /// Forks and execs a worker (trapping its `bind`/`listen` when its app is intercepted).
    pub(super) fn spawn(
        &mut self,
        worker: WorkerId,
        app: &str,
        slot: usize,
        generation: u64,
        config: &clusterd_manifest::AppConfig,
        key: &str,
    ) -> Result<(Pid, KeptOutput), SpawnError> {
        let program = spawn::find_program(config, self.base_env.get("PATH").map(|p| p.as_ref()))
            .ok_or_else(|| SpawnError::NotFound {
                program: config.command[0].clone(),
            })?;
        let held = match config.intercept {
            true => Some(
                self.held((worker, slot), config)
                    .map_err(|cause| SpawnError::Os {
                        what: "socket",
                        cause,
                    })?,
            ),
            false => None,
        };
        // The worker's own steered sockets, open until the fork has passed them on.
        let mut own = Vec::new();
        let listen_fds: Vec<_> = match &held {
            Some(held) => held.iter().map(intercept::Held::raw_fd).collect(),
            None => {
                let mut fds = Vec::new();
                for name in &config.sockets {
                    let Some(shared) = self.sockets.get(name).map(|s| s.raw_fd()) else {
                        continue;
                    };
                    let steered =
                        self.own_socket((worker, slot), name, config)
                            .map_err(|cause| SpawnError::Os {
                                what: "socket",
                                cause,
                            })?;
                    fds.push(steered.as_ref().map_or(shared, |fd| fd.as_raw_fd()));
                    own.extend(steered);
                }
                fds
            }
        };
        let channel = match config.ipc {
            true => Some(ipc::pair().map_err(|cause| SpawnError::Os {
                what: "socketpair",
                cause,
            })?),
            false => None,
        };
        let env = WorkerEnv {
            base: &self.base_env,
            app,
            slot,
            generation,
            listen_count: listen_fds.len(),
            notify_socket: &self.notify_path,
            exe: self.exe.as_deref(),
            ipc_fd: channel
                .is_some()
                .then(|| spawn::ipc_fd_number(listen_fds.len())),
        }
        .build(config);

        let label = format!("{app}[{slot}]");
        let pipe_error = |cause| SpawnError::Os {
            what: "pipe2",
            cause,
        };
        // The forwarding tasks learn the pid once the fork has returned it.
        let source = Source::worker(app, slot, generation);
        let destination = self.logs.destination(&config.log, app);
        let stdout = self
            .logs
            .forwarder(source.clone(), LogStream::Stdout, &destination);
        let (stdout, kept_stdout) =
            pipes::forward(stdout, &mut self.output_tasks).map_err(pipe_error)?;
        let stderr = self
            .logs
            .forwarder(source.clone(), LogStream::Stderr, &destination);
        let (stderr, kept_stderr) =
            pipes::forward(stderr, &mut self.output_tasks).map_err(pipe_error)?;
        // Without its own cgroup the worker is still contained by its process group.
        let cgroup_procs = self
            .containment
            .prepare_worker(key)
            .unwrap_or_else(|error| {
                tracing::warn!(
                    event = "cgroup_prepare_failed",
                    app,
                    slot,
                    "{}; {label} runs in its process group only",
                    Chain(&error)
                );
                None
            });
        let trap = match config.intercept {
            true => Some(Trap::new(listen_fds.len()).map_err(|cause| SpawnError::Os {
                what: "socketpair",
                cause,
            })?),
            false => None,
        };
        let pid = spawn::spawn(&SpawnSpec {
            program: &program,
            argv: &config.command,
            env: &env,
            cwd: &config.cwd,
            listen_fds: &listen_fds,
            stdio: [&self.dev_null, &stdout, &stderr],
            cgroup_procs: cgroup_procs.as_ref(),
            trap: trap.as_ref(),
            ipc: channel.as_ref().map(|(_, theirs)| theirs),
        })
        .inspect(|pid| source.set_pid(pid.as_raw().unsigned_abs()))?;
        drop(own);
        if let Some((mine, _)) = channel
            && let Err(error) = self.channels.watch(worker, label.clone(), mine)
        {
            tracing::error!(
                event = "ipc_channel_failed",
                app,
                slot,
                pid = pid.as_raw(),
                "{label} pid {pid}: cannot serve its message channel: {error}"
            );
        }
        if let (Some(trap), Some(held)) = (trap, held) {
            // The child sent the fd before it exec'd. Without it, its trapped calls fail with
            // ENOSYS once `trap` is dropped: the worker sees an error, clusterd goes on.
            let watched = trap.receive().and_then(|notify_fd| {
                self.intercepts
                    .watch(worker, label.clone(), notify_fd, held)
            });
            if let Err(error) = watched {
                tracing::error!(
                    event = "intercept_failed",
                    app,
                    slot,
                    pid = pid.as_raw(),
                    "{label} pid {pid}: cannot answer its bind()/listen(): {error}"
                );
            }
        }
        let kept = KeptOutput {
            label,
            stdout: kept_stdout,
            stderr: kept_stderr,
        };
        Ok((os::core_pid(pid), kept))
    }
}

impl Driver {
    /// A listening socket of the worker's own when socket `name` is steered (see
    /// `steering::plan`), else None (the worker takes the shared socket).
    fn own_socket(
        &mut self,
        worker: (WorkerId, usize),
        name: &str,
        app: &clusterd_manifest::AppConfig,
    ) -> std::io::Result<Option<OwnedFd>> {
        let (Some(socket), Some(config)) =
            (self.sockets.get(name), self.manifest.sockets.get(name))
        else {
            return Ok(None);
        };
        let Some(address) = socket.local_addr().filter(|_| self.steered.contains(name)) else {
            return Ok(None);
        };
        let policy = steering::Policy {
            balance: app.balance,
            slots: app.workers,
        };
        self.steering
            .socket_for(name, worker, address, config, policy)
            .map(Some)
    }

    /// The sockets an intercepted worker's binds are answered with: a listening socket of its
    /// own for steered sockets, else the shared held socket.
    fn held(
        &mut self,
        worker: (WorkerId, usize),
        app: &clusterd_manifest::AppConfig,
    ) -> std::io::Result<Vec<intercept::Held>> {
        let mut held = Vec::new();
        for name in &app.sockets {
            let own = self.own_socket(worker, name, app)?;
            let (Some(socket), Some(config)) =
                (self.sockets.get(name), self.manifest.sockets.get(name))
            else {
                continue;
            };
            let fd = match own {
                Some(fd) => fd,
                None => socket.try_clone_fd()?,
            };
            // Binds match the address bound (a manifest's port 0 is a real port by now).
            let listen = match socket.local_addr() {
                Some(address) => clusterd_manifest::Listen::Tcp(address),
                None => config.listen.clone(),
            };
            held.push(intercept::Held::new(name, &listen, fd)?);
        }
        Ok(held)
    }
}
