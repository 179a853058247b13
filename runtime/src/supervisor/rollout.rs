//! Reloads and rollouts: `wharf.toml` read again (SIGHUP or `wharf up
//! --reload`) changes scaling at once, adds and removes services, and gives
//! a service whose instances are made differently (its revision: backend,
//! command, image, network, environment) a rollout. A rollout replaces the
//! instances one at a time: it starts one of the new revision, waits until
//! it is ready (its first heartbeat), then drains one of the old, which
//! finishes its calls (and, stateful, its transactions) before it exits.
//! While wharf callers built against an old signature still call, the last
//! instance that serves it stays. A new instance that does not become ready
//! stops the rollout, and the revision before it keeps serving.

use super::config::UpConfig;
use super::events::EventKind;
use super::state::{Previous, Rolling, Service, Supervisor, MISSES_ALLOWED};
use crate::error::{Error, ErrorKind};
use crate::heartbeat::{Heartbeat, HEARTBEAT_INTERVAL};
use std::collections::HashMap;
use std::time::Instant;

impl Supervisor {
    /// Reads the `wharf.toml` this supervisor was made from again and
    /// applies it; the changes, said plainly, or why the file was refused
    /// (then nothing changed).
    pub async fn reload(&mut self) -> Result<Vec<String>, Error> {
        let Some(path) = self.source.clone() else {
            return Err(Error::new(
                ErrorKind::Config,
                "this supervisor was not started from a wharf.toml: there is nothing to reload",
            ));
        };
        let outcome = match UpConfig::load(&path) {
            Ok(config) => self.apply(&config).await,
            Err(error) => Err(error),
        };
        let reason = match &outcome {
            Ok(changes) if changes.is_empty() => format!("{}: nothing changed", path.display()),
            Ok(changes) => format!("{}: {}", path.display(), changes.join("; ")),
            Err(error) => format!(
                "{} not applied, the running configuration stays: {error}",
                path.display()
            ),
        };
        self.event(None, EventKind::Reload, None, reason).await;
        outcome
    }

    /// Makes `config`'s services this supervisor's: new ones are added,
    /// missing ones drained and removed, scaling changes hold at once, and
    /// a service of a new revision is rolled out. Everything is checked
    /// before anything changes.
    pub async fn apply(&mut self, config: &UpConfig) -> Result<Vec<String>, Error> {
        let mut wanted = Vec::new();
        for service in &config.services {
            wanted.push((service, service.backend()?, service.policy()?));
        }
        let mut changes = Vec::new();
        for (config, backend, policy) in wanted {
            let name = config.name.clone();
            let Some(entry) = self.services.get_mut(&name) else {
                self.services
                    .insert(name.clone(), Service::new(config, backend)?);
                changes.push(format!("service `{name}` added"));
                continue;
            };
            if entry.policy != policy {
                changes.push(format!(
                    "service `{name}`: scaling now {} to {} instance(s)",
                    policy.min, policy.max
                ));
                entry.desired = entry.desired.clamp(policy.min, policy.max);
                entry.policy = policy;
                // A pooled service's count is set again with the new bounds.
                entry.replicas_set = None;
            }
            let revision = config.revision();
            if revision != entry.revision {
                changes.push(format!(
                    "service `{name}`: rolling out revision {revision} over {}",
                    entry.revision
                ));
                let config = config.clone();
                // What to go back to is what runs now; a rollout that
                // replaces another one returns to the first one's start.
                let before = Previous {
                    config: std::mem::replace(&mut entry.config, config),
                    backend: std::mem::replace(&mut entry.backend, backend),
                    revision: std::mem::replace(&mut entry.revision, revision),
                };
                if entry.previous.is_none() {
                    entry.previous = Some(before);
                }
                entry.halted = None;
                entry.rolling = None;
                entry.replicas_set = None;
                // The new revision starts without the old one's crash loop.
                entry.exits.clear();
                entry.next_start = None;
            } else {
                // Fields that change no instance (`calls`, scaling text).
                entry.config = config.clone();
                // Asked again: a halted rollout is tried again.
                if entry.halted.take().is_some() {
                    changes.push(format!(
                        "service `{name}`: trying revision {revision} again"
                    ));
                }
            }
        }
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|name| !config.services.iter().any(|s| &s.name == *name))
            .cloned()
            .collect();
        for name in gone {
            self.remove_service(&name).await;
            changes.push(format!("service `{name}` removed: its instances drain"));
        }
        Ok(changes)
    }

    /// Drains a service no longer declared and forgets it.
    async fn remove_service(&mut self, name: &str) {
        if self.services[name].backend.pool().is_some() {
            if self.is_leader() {
                let launch = self.launch(name, None);
                let removed = {
                    let pool = self.services[name].backend.pool().expect("pooled");
                    pool.remove(&launch).await
                };
                if let Err(error) = removed {
                    self.event(Some(name), EventKind::Stop, None, error.to_string())
                        .await;
                }
            }
            self.managed.retain(|_, m| m.service != name);
        } else {
            let ids: Vec<String> = self
                .managed
                .iter()
                .filter(|(_, m)| m.service == name && m.draining_since.is_none())
                .map(|(id, _)| id.clone())
                .collect();
            for id in ids {
                self.drain(&id, "its service is no longer in wharf.toml")
                    .await;
            }
        }
        self.services.remove(name);
    }

    /// One step of `name`'s rollout if instances of another revision run;
    /// false when there is none to roll (the usual scaling then applies).
    pub(crate) async fn roll(&mut self, name: &str) -> bool {
        let beats = self.beats.lock().unwrap().clone();
        let entry = &self.services[name];
        let target = entry.revision.clone();
        let fresh = |id: &str| {
            beats
                .get(id)
                .is_some_and(|(_, at)| at.elapsed() <= HEARTBEAT_INTERVAL * MISSES_ALLOWED)
        };
        let mut current = Vec::new();
        let mut old = Vec::new();
        let mut draining = false;
        for (id, managed) in &self.managed {
            if managed.service != name {
                continue;
            }
            if managed.draining_since.is_some() {
                draining = true;
            } else if managed.revision.as_deref().is_none_or(|r| r == target) {
                current.push(id.clone());
            } else {
                old.push(id.clone());
            }
        }
        if old.is_empty() {
            if let Some(entry) = self.services.get_mut(name) {
                entry.previous = None;
                if let Some(rolling) = entry.rolling.take() {
                    let reason = format!(
                        "done: {} instance(s) of revision {target} replaced those of {} in {:.1?}",
                        current.len(),
                        rolling.from.join(", "),
                        rolling.started.elapsed()
                    );
                    self.event(Some(name), EventKind::Rollout, None, reason)
                        .await;
                }
            }
            return false;
        }
        // Scaled to zero, or a rollout that failed with nothing to return
        // to: the usual scaling counts every instance alike.
        if entry.desired == 0 || entry.halted.as_deref() == Some(target.as_str()) {
            return false;
        }
        let desired = entry.desired;
        let grace = entry.policy.scale_down_after;
        // The pause after failed starts is waited out.
        let paused = entry.next_start.is_some_and(|at| Instant::now() < at);
        if entry.rolling.is_none() {
            let mut from: Vec<String> = old
                .iter()
                .map(|id| self.managed[id].revision.clone().unwrap_or_default())
                .collect();
            from.sort();
            from.dedup();
            let reason = format!(
                "revision {target} replaces {} instance(s) of {}, one at a time: start one, wait until it is ready, drain one",
                old.len(),
                from.join(", ")
            );
            if let Some(entry) = self.services.get_mut(name) {
                entry.rolling = Some(Rolling {
                    from,
                    started: Instant::now(),
                    kept: None,
                });
            }
            self.event(Some(name), EventKind::Rollout, None, reason)
                .await;
        }
        // One step at a time: a new instance that is not ready yet, or an
        // old one still draining (quiescing its transactions), is waited
        // for; so is the pause after failed starts.
        if draining || paused || current.iter().any(|id| !fresh(id)) {
            return true;
        }
        // Surge: one instance more than wanted, of the new revision.
        if current.len() < desired && current.len() + old.len() <= desired {
            self.start(name).await;
            return true;
        }
        self.note_old_callers(name, &current, &old, &beats);
        let now = Instant::now();
        let needed = |id: &String| {
            self.managed[id]
                .needed_at
                .is_some_and(|at| now.duration_since(at) < grace)
        };
        // The surge is ready: one old instance goes, the least busy first;
        // of those still called with a signature the new revision does not
        // serve, one stays.
        let busy = |id: &String| {
            beats
                .get(id)
                .map_or((0, 0), |(b, _)| (b.transactions, b.in_flight + b.backlog))
        };
        let (mut kept, mut free): (Vec<String>, Vec<String>) = old.into_iter().partition(needed);
        free.sort_by_key(busy);
        kept.sort_by_key(busy);
        let next = match (free.first(), kept.len()) {
            (Some(id), _) => Some(id.clone()),
            (None, n) if n > 1 => kept.first().cloned(),
            _ => None,
        };
        if let Some(id) = next {
            self.drain(&id, &format!("rollout: replaced by revision {target}"))
                .await;
            return true;
        }
        let id = kept.pop().expect("an old instance is left");
        let said = self.services[name]
            .rolling
            .as_ref()
            .and_then(|r| r.kept.as_deref())
            == Some(id.as_str());
        if !said {
            let revision = self.managed[&id].revision.clone().unwrap_or_default();
            let reason = format!(
                "keeping {id} of revision {revision}: wharf callers of a signature that revision {target} does not serve still call it; it drains once they have not for {grace:?}"
            );
            if let Some(rolling) = self.services.get_mut(name).and_then(|e| e.rolling.as_mut()) {
                rolling.kept = Some(id.clone());
            }
            self.event(Some(name), EventKind::Rollout, Some(&id), reason)
                .await;
        }
        true
    }

    /// Notes, for each old instance, whether it took calls on a signature
    /// subject that no ready instance of the new revision serves since the
    /// last look: those come from callers only it can serve.
    fn note_old_callers(
        &mut self,
        name: &str,
        current: &[String],
        old: &[String],
        beats: &HashMap<String, (Heartbeat, Instant)>,
    ) {
        let served_new = |function: &str, sig: &str| {
            current.iter().any(|id| {
                beats.get(id).is_some_and(|(b, _)| {
                    b.signatures.get(function).map(String::as_str) == Some(sig)
                })
            })
        };
        let now = Instant::now();
        for id in old {
            let Some((beat, _)) = beats.get(id) else {
                continue;
            };
            let Some(managed) = self.managed.get_mut(id) else {
                continue;
            };
            debug_assert_eq!(managed.service, name);
            for (function, sig) in &beat.signatures {
                if served_new(function, sig) {
                    continue;
                }
                let calls = beat.signed_calls.get(function).copied().unwrap_or(0);
                // At the first look, calls since it started count: it may
                // be called still, and keeping it a while is the safe side.
                let before = managed.signed_seen.insert(function.clone(), calls);
                if calls > before.unwrap_or(0) {
                    managed.needed_at = Some(now);
                }
            }
        }
    }

    /// An instance of `revision` of `service` failed (`why`) before it was
    /// ready: if a rollout to that revision is under way, it stops, and the
    /// revision before it is the service's again (its instances keep
    /// serving; new ones already started are rolled back).
    pub(crate) async fn new_revision_failed(
        &mut self,
        service: &str,
        revision: Option<&str>,
        instance: &str,
        why: &str,
    ) {
        let Some(entry) = self.services.get_mut(service) else {
            return;
        };
        if entry.rolling.is_none() || revision != Some(entry.revision.as_str()) {
            return;
        }
        entry.rolling = None;
        let failed = entry.revision.clone();
        let reason = match entry.previous.take() {
            Some(previous) => {
                entry.config = previous.config;
                entry.backend = previous.backend;
                entry.revision = previous.revision;
                entry.exits.clear();
                entry.next_start = None;
                format!(
                    "instance {instance} of revision {failed} {why}: the rollout stops, revision {} keeps serving (instances of {failed} already started are replaced by it); fix the service and reload",
                    entry.revision
                )
            }
            None => {
                entry.halted = Some(failed.clone());
                format!(
                    "instance {instance} of revision {failed} {why}: the rollout stops, the instances of earlier revisions keep serving; fix the service and reload"
                )
            }
        };
        self.event(
            Some(service),
            EventKind::RolloutFailed,
            Some(instance),
            reason,
        )
        .await;
    }
}
