//! The read-only views the loop answers without the core deciding anything: `status` and
//! the metrics' scrapes.

use super::*;

impl Driver {
    pub(super) fn on_query(&mut self, core: &Core, query: Query) {
        match query {
            Query::Metrics(answer) => {
                let status = self.status(core, false);
                let _ = answer.send(self.metrics.encode(&status));
            }
            Query::Ready(answer) => {
                let _ = answer.send(core.readiness());
            }
            Query::Health(answer) => {
                let _ = answer.send(());
            }
        }
    }

    /// A snapshot for status (`with_cpu_percent`) or for a scrape.
    pub(super) fn status(&mut self, core: &Core, with_cpu_percent: bool) -> Status {
        let now = Instant::now();
        let groups = core.groups();
        let pids: Vec<Pid> = groups.iter().map(|(pid, _)| *pid).collect();
        let usage = procstat::group_usage(&pids);
        let cpu_percent = if with_cpu_percent {
            let started: HashMap<Pid, Instant> = groups.into_iter().collect();
            self.status_cpu
                .sample(now, &usage, |pid| started.get(&pid).copied().unwrap_or(now))
        } else {
            HashMap::new()
        };
        let measured = Measured {
            usage: &usage,
            cpu_percent: &cpu_percent,
        };
        let mut apps = core.app_statuses(now, &measured);
        for worker in apps.iter_mut().flat_map(|app| app.workers.iter_mut()) {
            let id = worker
                .pid
                .and_then(|pid| core.worker_by_pid(Pid::from_raw(pid as i32)));
            if let Some(id) = id {
                worker.messages_dropped = self.channels.dropped(id);
            }
        }
        Status {
            pid: std::process::id(),
            manifest: self.manifest.path.display().to_string(),
            uptime_ms: u64::try_from((now - self.started).as_millis()).unwrap_or(u64::MAX),
            rss_bytes: procstat::self_rss(),
            stopping: core.shutting_down(),
            sockets: self
                .sockets
                .iter()
                .map(|(name, s)| SocketStatus {
                    name: name.clone(),
                    address: s.address.clone(),
                    app: s.on_demand.as_ref().map(|d| d.app.clone()),
                })
                .collect(),
            apps,
            containment: self.containment.describe(),
            output_dropped: pipes::dropped_lines(),
            ready: core.readiness().is_ok(),
            not_ready: core.readiness().err(),
            version: handover::VERSION.to_owned(),
            upgrades: self.upgrades,
            upgraded_ms: self
                .upgraded_at
                .map(|at| u64::try_from((now - at).as_millis()).unwrap_or(u64::MAX)),
        }
    }
}
