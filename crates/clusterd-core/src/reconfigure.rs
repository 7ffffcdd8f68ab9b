//! SIGHUP, the core's half: apply a re-read manifest (the driver has loaded it and bound its
//! new sockets; a manifest that failed either changed nothing). Apps added are started and
//! apps removed are stopped, a changed worker count scales, and a changed command,
//! environment, working directory or socket list becomes the next generation and rolls out.
//! Other settings (timeouts, backoff, readiness) apply from the next worker on. One log line
//! says what changed.

use std::sync::Arc;
use std::time::Instant;

use crate::event::Level;
use clusterd_manifest::{AppConfig, Manifest};

use super::core::Core;
use super::state::{App, StopReason};

impl Core {
    /// Applies `manifest`'s apps.
    pub(super) fn reconfigure(&mut self, now: Instant, manifest: &Manifest) {
        if self.shutting_down {
            return;
        }
        self.socket_addresses = super::core::socket_addresses(manifest);
        let mut changes = Vec::new();
        let mut reloads = Vec::new();
        let mut scales = Vec::new();
        let removed: Vec<String> = self
            .apps
            .keys()
            .filter(|n| !manifest.apps.contains_key(*n))
            .cloned()
            .collect();
        for name in removed {
            changes.push(format!("-{name}"));
            self.apps.remove(&name);
            let ids: Vec<_> = self
                .workers
                .iter()
                .filter(|(_, w)| w.app == name)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                self.stop(now, id, StopReason::Retired);
            }
        }
        for (name, config) in &manifest.apps {
            let Some(app) = self.apps.get_mut(name) else {
                changes.push(format!("+{name}"));
                self.apps
                    .insert(name.clone(), App::new(config.clone(), now));
                continue;
            };
            let old = Arc::clone(app.latest());
            if old.workers != config.workers {
                changes.push(format!(
                    "{name}: workers {} -> {}",
                    old.workers, config.workers
                ));
                scales.push((name.clone(), config.workers));
            }
            let config = Arc::new(config.clone());
            if needs_new_generation(&old, &config) {
                changes.push(format!(
                    "{name}: command/env/cwd/sockets changed (rolling reload)"
                ));
                app.next_config = Some(config);
                reloads.push(name.clone());
            } else {
                if old.watch != config.watch {
                    changes.push(format!("{name}: watch changed"));
                }
                if !same_apart_from_workers(&old, &config) {
                    changes.push(format!("{name}: settings changed (apply to new workers)"));
                }
                let generation = app.generation;
                app.configs.insert(generation, config);
            }
        }
        self.schedule_memory_check(now);
        for (name, workers) in scales {
            self.scale(now, &name, workers);
        }
        for name in reloads {
            self.request_reload(now, Some(&name));
        }
        self.push_notice(crate::event::Notice {
            level: Level::Info,
            app: None,
            slot: None,
            pid: None,
            generation: None,
            what: crate::event::What::Reconfigured { changes },
        });
    }
}

/// A change that the running workers cannot pick up: they must be replaced.
fn needs_new_generation(old: &AppConfig, new: &AppConfig) -> bool {
    old.command != new.command
        || old.env != new.env
        || old.cwd != new.cwd
        || old.sockets != new.sockets
}

/// Whether nothing the workers use changed (`workers` and `watch` are clusterd's own).
fn same_apart_from_workers(old: &AppConfig, new: &AppConfig) -> bool {
    let mut old = old.clone();
    old.workers = new.workers;
    old.watch.clone_from(&new.watch);
    old == *new
}
