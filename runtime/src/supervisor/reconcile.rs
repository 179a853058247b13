//! Reconciling: each service's scaler turns its instances' heartbeats into
//! a wanted count, and instances are started or drained until it holds.

use super::events::EventKind;
use super::state::{Managed, Supervisor, DRAIN_GRACE, MISSES_ALLOWED};
use crate::backend::Launch;
use crate::heartbeat::HEARTBEAT_INTERVAL;
use crate::scaler::{Decision, Observed};
use crate::wire::subjects;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// How often a pooled service's instance count is set again though it did
/// not change (someone may have changed it in the orchestrator).
const POOL_RECHECK: Duration = Duration::from_secs(30);

impl Supervisor {
    /// Runs each service's scaler on its instances' heartbeats.
    pub(crate) async fn scale(&mut self) {
        let now = Instant::now();
        let demand: HashSet<String> = std::mem::take(&mut *self.demand.lock().unwrap());
        let beats = self.beats.lock().unwrap().clone();
        let mut decisions = Vec::new();
        for (name, service) in &mut self.services {
            let mut seen = Observed {
                demand: demand.contains(name),
                ..Observed::default()
            };
            for (id, managed) in &self.managed {
                if managed.service != *name || managed.draining_since.is_some() {
                    continue;
                }
                seen.instances += 1;
                if let Some((beat, at)) = beats.get(id) {
                    if at.elapsed() <= HEARTBEAT_INTERVAL * MISSES_ALLOWED {
                        seen.reporting += 1;
                        seen.cpu_sum += beat.cpu;
                        seen.backlog += beat.backlog;
                        seen.in_flight += beat.in_flight;
                        seen.calls_per_s += beat.calls_per_s;
                    }
                }
            }
            if let Decision::Scale { to, cause, reason } =
                service.scaler.decide(&service.policy, &seen, now)
            {
                if to != service.desired {
                    self.metrics.decided(name, service.desired, to, cause);
                    decisions.push((name.clone(), service.desired, to, reason));
                    service.desired = to;
                }
            }
        }
        for (name, from, to, reason) in decisions {
            self.event(
                Some(&name),
                EventKind::Scale,
                None,
                format!("{from} -> {to}: {reason}"),
            )
            .await;
        }
    }

    /// Starts or drains instances until each service has `desired`.
    pub(crate) async fn reconcile(&mut self) {
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            if self.services[&name].backend.pool().is_some() {
                self.reconcile_pool(&name).await;
                continue;
            }
            let live: Vec<String> = self
                .managed
                .iter()
                .filter(|(_, m)| m.service == name && m.draining_since.is_none())
                .map(|(id, _)| id.clone())
                .collect();
            if self.roll(&name).await {
                continue;
            }
            let desired = self.services[&name].desired;
            if live.len() < desired {
                let entry = self.services.get_mut(&name).expect("known service");
                if let Some(at) = entry.next_start {
                    if Instant::now() < at {
                        continue;
                    }
                    entry.next_start = None;
                    let backoff = entry.backoff;
                    self.event(Some(&name), EventKind::CrashLoop, None, format!("3 exits within 30 s: restarting after a pause (next pause {backoff:?})")).await;
                }
                for _ in live.len()..desired {
                    self.start(&name).await;
                }
            } else if live.len() > desired {
                let beats = self.beats.lock().unwrap().clone();
                let mut candidates = live;
                // The least busy go first; transactions count most, since
                // an instance holding them cannot leave until they end.
                candidates.sort_by_key(|id| {
                    beats
                        .get(id)
                        .map_or((0, 0), |(b, _)| (b.transactions, b.in_flight + b.backlog))
                });
                for id in candidates
                    .into_iter()
                    .take(self.managed_count(&name) - desired)
                {
                    self.drain(&id, "scaling down").await;
                }
            }
        }
    }

    pub(crate) fn managed_count(&self, service: &str) -> usize {
        self.managed
            .values()
            .filter(|m| m.service == service && m.draining_since.is_none())
            .count()
    }

    /// A service an orchestrator runs: its instance count is set to
    /// `desired` (again now and then, in case it was changed there); the
    /// orchestrator starts and stops the instances.
    async fn reconcile_pool(&mut self, name: &str) {
        if !self.is_leader() {
            return;
        }
        let entry = &self.services[name];
        if entry.next_start.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let desired = entry.desired;
        let due = match entry.replicas_set {
            Some((set, at)) => set != desired || at.elapsed() > POOL_RECHECK,
            None => true,
        };
        if !due {
            return;
        }
        let launch = self.launch(name, None);
        let outcome = {
            let pool = entry.backend.pool().expect("a pooled service");
            pool.scale(&launch, desired).await
        };
        let before = entry.replicas_set.map(|(set, _)| set);
        let backend = entry.backend.name();
        match outcome {
            Ok(()) => {
                if let Some(entry) = self.services.get_mut(name) {
                    entry.replicas_set = Some((desired, Instant::now()));
                    entry.next_start = None;
                    entry.backoff = Duration::from_secs(1);
                }
                if before != Some(desired) {
                    self.event(
                        Some(name),
                        EventKind::Replicas,
                        None,
                        format!("{backend} runs {desired} instance(s)"),
                    )
                    .await;
                }
            }
            Err(error) => {
                // Tried again after a growing pause, not every tick.
                if let Some(entry) = self.services.get_mut(name) {
                    entry.next_start = Some(Instant::now() + entry.backoff);
                    entry.backoff = (entry.backoff * 2).min(Duration::from_secs(60));
                }
                self.event(Some(name), EventKind::StartFailed, None, error.to_string())
                    .await;
            }
        }
    }

    /// What an instance of `service` is started with: the service's
    /// environment, the supervisor's servers and credentials (unless the
    /// service names its own), the prefix, the instance's id if given.
    pub(crate) fn launch(&self, service: &str, instance: Option<String>) -> Launch {
        let entry = &self.services[service];
        let mut env = entry.config.env.clone();
        // The supervisor's servers, unless the service names its own (its
        // instances reach NATS another way, or should sit on other nodes).
        env.entry("NATS_URL".into())
            .or_insert_with(|| self.url.clone());
        // The supervisor's own credentials, through the environment (never
        // the command line), unless the service names its own (as the
        // worker credentials `wharf auth` writes for it): then only what it
        // leaves unset, such as the CA. (The inbox prefix goes with the
        // identity: permissions give each user its own inboxes.)
        const IDENTITY: [&str; 6] = [
            "NATS_USER",
            "NATS_PASSWORD",
            "NATS_TOKEN",
            "NATS_NKEY",
            "NATS_CREDS",
            "WHARF_INBOX_PREFIX",
        ];
        let own_identity = IDENTITY.iter().any(|name| env.contains_key(*name));
        for (name, value) in self.client.credentials().env() {
            if !(own_identity && IDENTITY.contains(&name)) {
                env.entry(name.into()).or_insert(value);
            }
        }
        // Its streams and buckets as the supervisor's.
        if let Ok(settings) = crate::settings::Settings::get() {
            if let Some(replicas) = settings.replicas {
                env.entry("WHARF_REPLICAS".into())
                    .or_insert(replicas.to_string());
            }
            if !settings.placement.is_empty() {
                env.entry("WHARF_PLACEMENT".into())
                    .or_insert(settings.placement.join(","));
            }
        }
        env.insert("WHARF_PREFIX".into(), self.client.prefix().to_owned());
        if let Some(instance) = &instance {
            env.insert("WHARF_INSTANCE_ID".into(), instance.clone());
        }
        env.insert("WHARF_ROLE".into(), "worker".into());
        env.insert("WHARF_REVISION".into(), entry.revision.clone());
        Launch {
            service: service.to_owned(),
            instance: instance.unwrap_or_default(),
            prefix: self.client.prefix().to_owned(),
            env,
        }
    }

    pub(crate) async fn start(&mut self, service: &str) {
        // Checked before each action, not once a round: a round can take
        // longer than the lease has left.
        if !self.is_leader() {
            return;
        }
        let instance = format!("{service}-{}", nuid::next().as_str());
        let launch = self.launch(service, Some(instance.clone()));
        let entry = &self.services[service];
        match entry.backend.start(&launch) {
            Ok(handle) => {
                let location = handle.location();
                let backend = entry.backend.name();
                let revision = Some(entry.revision.clone());
                self.managed
                    .insert(instance.clone(), Managed::new(service, handle, revision));
                self.event(
                    Some(service),
                    EventKind::Start,
                    Some(&instance),
                    format!("{backend} backend, {location}"),
                )
                .await;
            }
            Err(error) => {
                let revision = entry.revision.clone();
                self.note_exit(service);
                self.event(
                    Some(service),
                    EventKind::StartFailed,
                    Some(&instance),
                    error.to_string(),
                )
                .await;
                let why = format!("could not be started ({})", error.message());
                self.new_revision_failed(service, Some(&revision), &instance, &why)
                    .await;
            }
        }
    }

    /// Asks an instance to drain over NATS (it finishes its calls and
    /// exits); a signal if it does not answer.
    pub(crate) async fn drain(&mut self, id: &str, why: &str) {
        if !self.is_leader() {
            return;
        }
        let subject = subjects::control(self.client.prefix(), id);
        let request = async_nats::Request::new()
            .payload("drain".into())
            .timeout(Some(Duration::from_secs(1)));
        let asked = self
            .client
            .nats()
            .send_request(subject, request)
            .await
            .is_ok();
        let Some(managed) = self.managed.get_mut(id) else {
            return;
        };
        if !asked {
            managed.instance.terminate();
        }
        managed.draining_since = Some(Instant::now());
        let service = managed.service.clone();
        self.event(
            Some(&service),
            EventKind::Drain,
            Some(id),
            format!("{why}: finishing its calls, then exiting"),
        )
        .await;
    }

    /// When it leads: drains every instance this supervisor runs, waits for
    /// them, and releases the lease. Otherwise it has nothing to do.
    pub(crate) async fn shutdown(&mut self) {
        // A renewal that failed (a lost quorum, a timeout) leaves the lease
        // unsure; a few more tries (each bounded) tell whether it still
        // holds, so a stopping leader does not leave its instances to no one.
        for attempt in 0..3 {
            if self.lease_revision.is_none() || self.is_leader() {
                break;
            }
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            self.hold_lease().await;
        }
        if !self.is_leader() {
            // Not acting (standing by, or its lease unsure): what it ran is
            // the leader's to drain or adopt, and waiting on instances it
            // may not drain would only hold up its exit.
            self.managed.clear();
            return;
        }
        // Services an orchestrator runs are removed there; their instances
        // drain on the way out.
        let pooled: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| s.backend.pool().is_some())
            .map(|(name, _)| name.clone())
            .collect();
        if self.is_leader() {
            for name in &pooled {
                let launch = self.launch(name, None);
                let removed = {
                    let pool = self.services[name].backend.pool().expect("pooled");
                    pool.remove(&launch).await
                };
                let why = match removed {
                    Ok(()) => {
                        "supervisor stopping: service removed, its instances drain".to_owned()
                    }
                    Err(error) => error.to_string(),
                };
                self.event(Some(name), EventKind::Stop, None, why).await;
            }
        }
        self.managed.retain(|_, m| !pooled.contains(&m.service));
        let ids: Vec<String> = self.managed.keys().cloned().collect();
        for id in &ids {
            if self.managed[id].draining_since.is_none() {
                self.drain(id, "supervisor stopping").await;
            }
        }
        let until = Instant::now() + DRAIN_GRACE;
        while Instant::now() < until && self.managed.values_mut().any(|m| m.instance.alive()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let leader = self.is_leader();
        for managed in self.managed.values_mut() {
            if leader && managed.instance.alive() {
                managed.instance.kill();
            }
        }
        self.managed.clear();
        if self.is_leader() {
            let _ = super::lease::bounded(self.lease.purge(subjects::LEADER_KEY)).await;
        }
    }
}
