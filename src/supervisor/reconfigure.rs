//! SIGHUP: re-read the manifest and apply the difference. A manifest that does not validate
//! changes nothing. Otherwise: new sockets are bound, apps added are started and apps removed
//! are stopped, a changed worker count scales, and a changed command, environment, working
//! directory or socket list rolls the app to a new generation. Other settings (timeouts,
//! backoff, readiness) apply from the next worker on. One line in the log says what changed.

use clusterd_manifest::AppConfig;
use tokio::time::Instant;

use super::Supervisor;
use super::state::App;

impl Supervisor {
    /// Re-reads the manifest from its path and applies it.
    pub(super) fn reread_manifest(&mut self) {
        if self.shutting_down {
            return;
        }
        let path = self.manifest.path.clone();
        let manifest = match clusterd_manifest::load(&path) {
            Ok(manifest) => manifest,
            Err(error) => {
                tracing::error!("manifest re-read rejected, nothing changed:\n{error}");
                return;
            }
        };
        let changed_sockets = match self
            .sockets
            .bind_new(&manifest.sockets, &self.manifest.sockets)
        {
            Ok(changed) => changed,
            Err(error) => {
                tracing::error!("manifest re-read rejected, nothing changed: {error}");
                return;
            }
        };
        for name in &changed_sockets {
            tracing::warn!(
                "socket {name}: a changed address takes effect only after a restart of clusterd"
            );
        }

        let now = Instant::now();
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
            if let Some(app) = self.apps.remove(&name) {
                for slot in app.slots {
                    for pid in slot.current.into_iter().chain(slot.candidate) {
                        self.stop_worker(pid, now);
                    }
                }
            }
        }
        for (name, config) in &manifest.apps {
            let Some(app) = self.apps.get_mut(name) else {
                changes.push(format!("+{name}"));
                self.apps
                    .insert(name.clone(), App::new(config.clone(), now));
                continue;
            };
            let old = std::mem::replace(&mut app.config, config.clone());
            if old.workers != config.workers {
                changes.push(format!(
                    "{name}: workers {} -> {}",
                    old.workers, config.workers
                ));
                // scale() compares against the slots, so keep the old count until it runs.
                app.config.workers = old.workers;
                scales.push((name.clone(), config.workers));
            }
            if needs_new_generation(&old, config) {
                changes.push(format!(
                    "{name}: command/env/cwd/sockets changed (rolling reload)"
                ));
                reloads.push(name.clone());
            } else if !same_apart_from_workers(&old, config) {
                changes.push(format!("{name}: settings changed (apply to new workers)"));
            }
        }
        self.manifest = manifest;
        for (name, workers) in scales {
            self.scale(&name, workers);
        }
        for name in reloads {
            self.request_reload(Some(&name));
        }
        if changes.is_empty() {
            tracing::info!("manifest re-read: no changes");
        } else {
            tracing::info!("manifest re-read: {}", changes.join(", "));
        }
    }
}

/// A change that the running workers cannot pick up: they must be replaced.
fn needs_new_generation(old: &AppConfig, new: &AppConfig) -> bool {
    old.command != new.command
        || old.env != new.env
        || old.cwd != new.cwd
        || old.sockets != new.sockets
}

fn same_apart_from_workers(old: &AppConfig, new: &AppConfig) -> bool {
    let mut old = old.clone();
    old.workers = new.workers;
    old == *new
}
