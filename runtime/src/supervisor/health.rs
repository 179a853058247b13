//! Health: instances that exit, hang or finish draining are noticed and
//! replaced, exits at start count towards a crash loop, and instances a
//! previous leader started are adopted rather than duplicated.

use super::events::EventKind;
use super::state::{
    Managed, Supervisor, CRASH_WINDOW, DRAIN_GRACE, MISSES_ALLOWED, STARTUP_GRACE, TICK,
};
use crate::backend::Adopted;
use crate::heartbeat::{Heartbeat, HEARTBEAT_INTERVAL};
use crate::txn::owner::QUIESCE_LIMIT;
use crate::wire::subjects;
use std::time::{Duration, Instant};

impl Supervisor {
    /// Takes over the instances of our services that a previous leader
    /// started: they keep running and count, rather than being duplicated.
    pub(crate) async fn adopt(&mut self) {
        let fresh: Vec<Heartbeat> = self
            .beats
            .lock()
            .unwrap()
            .values()
            .filter(|(_, at)| at.elapsed() < HEARTBEAT_INTERVAL * MISSES_ALLOWED)
            .map(|(beat, _)| beat.clone())
            .collect();
        for beat in fresh {
            let Some(service) = beat
                .services
                .iter()
                .find(|s| self.services.contains_key(*s))
            else {
                continue;
            };
            if self.managed.contains_key(&beat.instance) || beat.draining {
                continue;
            }
            let service = service.clone();
            self.managed.insert(
                beat.instance.clone(),
                Managed::new(
                    &service,
                    Adopted::from_heartbeat(&beat),
                    beat.revision.clone(),
                ),
            );
            if let Some(entry) = self
                .services
                .get_mut(&service)
                // An orchestrator's instances come and go as it was told:
                // they do not change the count wanted.
                .filter(|entry| entry.backend.pool().is_none())
            {
                let live = self
                    .managed
                    .values()
                    .filter(|m| m.service == service)
                    .count();
                entry.desired = entry.desired.max(live).min(entry.policy.max);
            }
            self.event(
                Some(&service),
                EventKind::Adopt,
                Some(&beat.instance),
                format!("running as pid {} on {}", beat.pid, beat.host),
            )
            .await;
        }
    }

    /// Replaces instances that exited or hang; finishes drains.
    pub(crate) async fn check_health(&mut self) {
        self.rounds += 1;
        // Pings and misses once per heartbeat interval, not every tick.
        let probe =
            self.rounds % (HEARTBEAT_INTERVAL.as_millis() / TICK.as_millis()).max(1) as u64 == 0;
        let ids: Vec<String> = self.managed.keys().cloned().collect();
        let pings = futures_util::future::join_all(ids.iter().map(|id| {
            let service = &self.managed[id].service;
            let subject = subjects::discovery_at("PING", service, id);
            let request = async_nats::Request::new().timeout(Some(Duration::from_millis(500)));
            let nats = self.client.nats().clone();
            async move { !probe || nats.send_request(subject, request).await.is_ok() }
        }))
        .await;
        // The pings took a while: act only if the lease still allows.
        let leader = self.is_leader();
        for (id, answered) in ids.into_iter().zip(pings) {
            let beat_age = self
                .beats
                .lock()
                .unwrap()
                .get(&id)
                .map(|(_, at)| at.elapsed());
            let pooled = self
                .managed
                .get(&id)
                .and_then(|m| self.services.get(&m.service))
                .is_some_and(|s| s.backend.pool().is_some());
            let beat_draining = self
                .beats
                .lock()
                .unwrap()
                .get(&id)
                .is_some_and(|(beat, _)| beat.draining);
            let Some(managed) = self.managed.get_mut(&id) else {
                continue;
            };
            let service = managed.service.clone();
            let revision = managed.revision.clone();
            // An orchestrator drains its own instances (SIGTERM): seen in
            // their heartbeats, they no longer count as live.
            if pooled && beat_draining && managed.draining_since.is_none() {
                managed.draining_since = Some(Instant::now());
            }
            // Its instances are gone when their heartbeats are.
            let beat_gone = beat_age.is_none_or(|age| age > HEARTBEAT_INTERVAL * MISSES_ALLOWED);
            if let Some(since) = managed.draining_since {
                // A stateful instance quiesces: it drains only once its open
                // transactions end, so it may take longer (bounded).
                let quiescing = beat_age
                    .is_some_and(|age| age <= HEARTBEAT_INTERVAL * MISSES_ALLOWED)
                    && self
                        .beats
                        .lock()
                        .unwrap()
                        .get(&id)
                        .is_some_and(|(beat, _)| beat.transactions > 0);
                // Once seen quiescing, it keeps the longer limit through the
                // drain that follows the quiesce.
                managed.quiesced |= quiescing;
                let limit = if managed.quiesced {
                    QUIESCE_LIMIT + DRAIN_GRACE
                } else {
                    DRAIN_GRACE
                };
                if !managed.instance.alive() || (pooled && beat_gone) {
                    self.forget(&id);
                    self.event(
                        Some(&service),
                        EventKind::Drained,
                        Some(&id),
                        "finished its calls and exited".to_owned(),
                    )
                    .await;
                } else if since.elapsed() > limit && leader {
                    managed.instance.kill();
                    self.forget(&id);
                    self.event(
                        Some(&service),
                        EventKind::Killed,
                        Some(&id),
                        format!("still draining after {limit:?}"),
                    )
                    .await;
                }
                continue;
            }
            if !managed.instance.alive() {
                // Only a start that failed counts towards a crash loop: an
                // instance that never became ready, or died right after.
                let failed_start = beat_age.is_none() || managed.started.elapsed() < CRASH_WINDOW;
                self.forget(&id);
                if failed_start {
                    self.note_exit(&service);
                }
                self.event(
                    Some(&service),
                    EventKind::Exited,
                    Some(&id),
                    "the instance is gone; it will be replaced".to_owned(),
                )
                .await;
                if failed_start {
                    let why = if beat_age.is_none() {
                        "exited before it became ready"
                    } else {
                        "exited right after it started"
                    };
                    self.new_revision_failed(&service, revision.as_deref(), &id, why)
                        .await;
                }
                continue;
            }
            let stale = match beat_age {
                Some(age) => age > HEARTBEAT_INTERVAL * MISSES_ALLOWED,
                None => managed.started.elapsed() > STARTUP_GRACE,
            };
            let starting = beat_age.is_none() && managed.started.elapsed() <= STARTUP_GRACE;
            if starting {
                continue;
            }
            if probe {
                // Both must fail: heartbeats stop while JetStream elects a
                // leader after a node loss, and a ping can be lost on a
                // busy connection, but a hung instance does neither.
                managed.misses = if stale && !answered {
                    managed.misses + 1
                } else {
                    0
                };
            }
            // A drained worker takes its heartbeat down as it leaves: an
            // orchestrator stopped it.
            if pooled && beat_age.is_none() && managed.started.elapsed() > STARTUP_GRACE {
                self.forget(&id);
                self.event(
                    Some(&service),
                    EventKind::Drained,
                    Some(&id),
                    "its orchestrator stopped it: it finished its calls and took its heartbeat down".to_owned(),
                )
                .await;
                continue;
            }
            if managed.misses >= MISSES_ALLOWED && leader && pooled {
                // The orchestrator replaces a task that ends; one that hangs
                // is killed where it can be, and replaced then.
                managed.instance.kill();
                self.forget(&id);
                self.event(
                    Some(&service),
                    EventKind::Exited,
                    Some(&id),
                    format!("no heartbeat or ping answer for {MISSES_ALLOWED} intervals: gone (its orchestrator replaces tasks that end)"),
                )
                .await;
                continue;
            }
            if managed.misses >= MISSES_ALLOWED && leader {
                managed.instance.kill();
                self.forget(&id);
                self.note_exit(&service);
                self.event(
                    Some(&service),
                    EventKind::Hung,
                    Some(&id),
                    format!("no heartbeat or ping answer for {MISSES_ALLOWED} intervals: killed, to be replaced"),
                )
                .await;
                let why = if beat_age.is_none() {
                    "never became ready"
                } else {
                    "stopped answering"
                };
                self.new_revision_failed(&service, revision.as_deref(), &id, why)
                    .await;
            }
        }
    }

    /// Stops managing instance `id`, and forgets its last heartbeat so that
    /// it is not adopted again (a fresh heartbeat would be: it lives).
    fn forget(&mut self, id: &str) {
        self.managed.remove(id);
        self.beats.lock().unwrap().remove(id);
    }

    /// Counts an unplanned exit; too many in a short time back restarts off.
    pub(crate) fn note_exit(&mut self, service: &str) {
        let Some(entry) = self.services.get_mut(service) else {
            return;
        };
        let now = Instant::now();
        entry.exits.push_back(now);
        while entry
            .exits
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(30))
        {
            entry.exits.pop_front();
        }
        if entry.exits.len() >= 3 {
            entry.next_start = Some(now + entry.backoff);
            entry.backoff = (entry.backoff * 2).min(Duration::from_secs(60));
        }
    }
}
