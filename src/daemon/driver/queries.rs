//! The read-only views the loop answers without the core deciding anything: `status` and
//! the metrics' scrapes. The loop takes the core's part of the view at once; the workers' CPU
//! and memory come from the [`procstat::Meter`] (measured off the loop, a measurement
//! answering for [`procstat::FRESH`]), and a task of its own fills them in and answers.

use std::rc::Rc;

use super::*;

impl Driver {
    pub(super) fn on_query(&mut self, core: &Core, query: Query) {
        match query {
            Query::Metrics(answer) => {
                let (mut status, usage) = self.status(core);
                let metrics = self.metrics.clone();
                tokio::task::spawn_local(async move {
                    fill(&mut status, &*usage.await, false);
                    let _ = answer.send(metrics.encode(&status));
                });
            }
            Query::Ready(answer) => {
                let _ = answer.send(core.readiness());
            }
            Query::Health(answer) => {
                let _ = answer.send(());
            }
        }
    }

    /// `clusterd status`: answered on `reply` once the workers are measured.
    pub(super) fn answer_status(&mut self, core: &Core, reply: UnboundedSender<Reply>) {
        let (mut status, usage) = self.status(core);
        tokio::task::spawn_local(async move {
            fill(&mut status, &*usage.await, true);
            let _ = reply.send(Reply::Status(Box::new(status)));
        });
    }

    /// The core's part of a status now, and the workers' measurement to come.
    fn status(
        &mut self,
        core: &Core,
    ) -> (
        Status,
        impl Future<Output = Rc<procstat::Snapshot>> + 'static,
    ) {
        let now = Instant::now();
        let targets = core
            .groups()
            .into_iter()
            .map(|(group, started)| procstat::Target {
                group,
                cgroup: core
                    .worker_by_pid(group)
                    .and_then(|id| self.containment.cgroup_dir(self.key(id))),
                started,
            })
            .collect();
        let usage = self.meter.usage(targets);
        let unmeasured = Measured {
            usage: &HashMap::new(),
            cpu_percent: &HashMap::new(),
        };
        let mut apps = core.app_statuses(now, &unmeasured);
        for worker in apps.iter_mut().flat_map(|app| app.workers.iter_mut()) {
            let id = worker
                .pid
                .and_then(|pid| core.worker_by_pid(Pid::from_raw(pid as i32)));
            if let Some(id) = id {
                worker.messages_dropped = self.channels.dropped(id);
            }
        }
        let status = Status {
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
                    balance: Some(self.balance_of(name).to_owned()),
                    inherited: s.inherited,
                })
                .collect(),
            metrics: self.metrics_address.map(|a| a.to_string()),
            apps,
            containment: self.containment.describe(),
            output_dropped: self.logs.dropped_lines(),
            ready: core.readiness().is_ok(),
            not_ready: core.readiness().err(),
            version: handover::VERSION.to_owned(),
            upgrades: self.upgrades,
            upgraded_ms: self
                .upgraded_at
                .map(|at| u64::try_from((now - at).as_millis()).unwrap_or(u64::MAX)),
        };
        (status, usage)
    }

    /// How socket `name` spreads new connections now: one shared queue, or its steering
    /// group's program (before the group's first worker: the balance of the app it is for).
    fn balance_of(&self, name: &str) -> &'static str {
        if !self.steered.contains(name) {
            return clusterd_manifest::Balance::Shared.name();
        }
        if let Some(balance) = self.steering.balance_of(name) {
            return balance;
        }
        let on_demand_for = self.sockets.get(name).and_then(|s| s.on_demand.as_ref());
        let app = self.manifest.apps.iter().find(|(app, config)| {
            on_demand_for.is_some_and(|d| d.app == **app)
                || config.sockets.iter().any(|s| s == name)
        });
        app.map_or(clusterd_manifest::Balance::default(), |(_, config)| {
            config.balance
        })
        .name()
    }
}

/// Puts each worker's measured CPU and memory (and CPU percent, `with_cpu_percent`) into
/// `status`.
fn fill(status: &mut Status, measured: &procstat::Snapshot, with_cpu_percent: bool) {
    for worker in status
        .apps
        .iter_mut()
        .flat_map(|app| app.workers.iter_mut())
    {
        let Some(group) = worker.pid.map(|pid| Pid::from_raw(pid as i32)) else {
            continue;
        };
        if let Some(usage) = measured.usage.get(&group) {
            worker.cpu_seconds = Some(usage.cpu_seconds);
            worker.rss_bytes = Some(usage.rss_bytes);
        }
        if with_cpu_percent {
            worker.cpu_percent = measured.cpu_percent.get(&group).copied();
        }
    }
}
