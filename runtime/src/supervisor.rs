//! The supervisor: keeps each declared service between its `min` and `max`
//! instances, replaces instances that die or hang, scales on CPU and
//! backlog, and logs every decision as an event with its reason.
//!
//! Only one supervisor acts at a time: the one holding the lease in KV
//! `wharf_supervisor`. Others stand by and take over (adopting the running
//! instances, not duplicating them) when the lease lapses.

use crate::backend::{Adopted, Backend, DockerBackend, Instance, Launch, ProcessBackend};
use crate::heartbeat::{self, Heartbeat, HEARTBEAT_INTERVAL};
use crate::scaler::{Decision, Observed, ScalePolicy, Scaler};
use crate::settings::{parse_duration, FileSettings, Settings};
use crate::wire::subjects;
use crate::{Client, Error, ErrorKind};
use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use crate::wire::subjects::LEASE_BUCKET;

/// How long a lease outlives its last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(3);

/// Heartbeats or pings an instance may miss in a row before it is
/// considered hung and replaced.
pub const MISSES_ALLOWED: u32 = 3;

/// How often the supervisor looks: exits and load are acted on within a
/// tick; pings and missed heartbeats are counted once per heartbeat
/// interval.
pub const TICK: Duration = Duration::from_millis(250);

/// How long a new instance has to send its first heartbeat.
pub const STARTUP_GRACE: Duration = Duration::from_secs(10);

/// An instance that exits sooner than this after its start counts towards
/// a crash loop.
pub const CRASH_WINDOW: Duration = Duration::from_secs(5);

/// How long a draining instance may take before it is killed.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// `wharf.toml`: what `wharf up` runs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpConfig {
    /// Where NATS is; `wharf up` starts a nats-server when `url` is unset.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// The services to keep running.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

/// `[broker]` of `wharf.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// NATS URL(s), comma-separated; `NATS_URL` overrides it.
    pub url: Option<String>,
    /// Subject prefix; `WHARF_PREFIX` overrides it.
    pub prefix: Option<String>,
}

/// One `[[service]]` of `wharf.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The wharf service name (as in `wharf.<service>.<function>`).
    pub name: String,
    /// `process` (the default) or `docker`.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Process backend: the program and its arguments. Docker backend: the
    /// arguments after the image (for example `["worker"]`).
    #[serde(default)]
    pub command: Vec<String>,
    /// Docker backend: a locally built image (nothing is pulled).
    pub image: Option<String>,
    /// Extra environment for each instance.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Fewest instances (0: scale to zero when idle).
    #[serde(default = "default_min")]
    pub min: usize,
    /// Most instances.
    #[serde(default = "default_max")]
    pub max: usize,
    /// Average CPU per instance to aim for, percent of one core.
    #[serde(default = "default_cpu_target")]
    pub cpu_target: f32,
    /// Average CPU below which an instance may go.
    #[serde(default = "default_cpu_low")]
    pub cpu_low: f32,
    /// Waiting calls per instance above which instances are added.
    #[serde(default = "default_backlog")]
    pub backlog_per_instance: usize,
    /// How long load must stay low before an instance goes, e.g. `"10s"`.
    #[serde(default = "default_scale_down_after")]
    pub scale_down_after: String,
    /// With `min = 0`: idle time before the last instance goes.
    #[serde(default = "default_idle_to_zero")]
    pub idle_to_zero: String,
}

fn default_backend() -> String {
    "process".to_owned()
}
fn default_min() -> usize {
    1
}
fn default_max() -> usize {
    4
}
fn default_cpu_target() -> f32 {
    50.0
}
fn default_cpu_low() -> f32 {
    30.0
}
fn default_backlog() -> usize {
    50
}
fn default_scale_down_after() -> String {
    "10s".to_owned()
}
fn default_idle_to_zero() -> String {
    "60s".to_owned()
}

impl UpConfig {
    /// Parses and checks `wharf.toml` text.
    pub fn from_toml(text: &str) -> Result<UpConfig, Error> {
        let config: UpConfig = toml::from_str(text)
            .map_err(|e| Error::new(ErrorKind::Config, format!("wharf.toml: {e}")))?;
        let mut names = HashSet::new();
        for service in &config.services {
            service.policy()?;
            if !names.insert(service.name.as_str()) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("wharf.toml: service `{}` is declared twice", service.name),
                ));
            }
        }
        Ok(config)
    }

    /// The settings of a process run by this file: its `[broker]` keys,
    /// overridden by the environment, checked by the same rules.
    pub fn settings(&self) -> Result<Settings, Error> {
        Settings::with_file(&FileSettings {
            url: self.broker.url.clone(),
            prefix: self.broker.prefix.clone(),
        })
    }

    /// Reads and checks a `wharf.toml` file.
    pub fn load(path: &std::path::Path) -> Result<UpConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        UpConfig::from_toml(&text)
    }
}

impl ServiceConfig {
    /// A service run by the process backend with default scaling.
    pub fn process(name: &str, command: Vec<String>) -> ServiceConfig {
        ServiceConfig {
            name: name.to_owned(),
            backend: default_backend(),
            command,
            image: None,
            env: BTreeMap::new(),
            min: default_min(),
            max: default_max(),
            cpu_target: default_cpu_target(),
            cpu_low: default_cpu_low(),
            backlog_per_instance: default_backlog(),
            scale_down_after: default_scale_down_after(),
            idle_to_zero: default_idle_to_zero(),
        }
    }

    /// The scaling rules, checked.
    pub fn policy(&self) -> Result<ScalePolicy, Error> {
        let bad = |what: String| {
            Error::new(
                ErrorKind::Config,
                format!("wharf.toml, service `{}`: {what}", self.name),
            )
        };
        if self.max == 0 || self.min > self.max {
            return Err(bad(format!(
                "min {} and max {} do not allow any instance; need 0 <= min <= max and max >= 1",
                self.min, self.max
            )));
        }
        if !(self.cpu_low < self.cpu_target && self.cpu_low >= 0.0) {
            return Err(bad(format!(
                "cpu_low ({}) must be below cpu_target ({})",
                self.cpu_low, self.cpu_target
            )));
        }
        let duration = |text: &str, what: &str| {
            parse_duration(text).map_err(|_| {
                bad(format!(
                    "{what} `{text}` is not a duration such as \"500ms\", \"10s\" or \"2m\""
                ))
            })
        };
        Ok(ScalePolicy {
            min: self.min,
            max: self.max,
            cpu_target: self.cpu_target,
            cpu_low: self.cpu_low,
            backlog_per_instance: self.backlog_per_instance.max(1),
            scale_down_after: duration(&self.scale_down_after, "scale_down_after")?,
            idle_to_zero: duration(&self.idle_to_zero, "idle_to_zero")?,
        })
    }

    fn backend(&self) -> Result<Box<dyn Backend>, Error> {
        match self.backend.as_str() {
            "process" => Ok(Box::new(ProcessBackend::new(self.command.clone())?)),
            "docker" => Ok(Box::new(DockerBackend::new(
                self.image.clone().unwrap_or_default(),
                self.command.clone(),
            )?)),
            other => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "wharf.toml, service `{}`: unknown backend `{other}`; use `process` or `docker`",
                    self.name
                ),
            )),
        }
    }
}

/// One health or scaling decision, published on `<prefix>._events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// The service, if the event is about one.
    pub service: Option<String>,
    /// What happened: `leader`, `standby`, `start`, `start-failed`,
    /// `exited`, `hung`, `scale`, `drain`, `drained`, `killed`,
    /// `crash-loop`, `adopt`, `stop`.
    pub kind: String,
    /// The instance concerned, if any.
    pub instance: Option<String>,
    /// Why.
    pub reason: String,
}

struct Managed {
    service: String,
    instance: Box<dyn Instance>,
    started: Instant,
    draining_since: Option<Instant>,
    /// Seen holding open transactions while draining.
    quiesced: bool,
    misses: u32,
}

struct Service {
    config: ServiceConfig,
    policy: ScalePolicy,
    backend: Box<dyn Backend>,
    scaler: Scaler,
    desired: usize,
    exits: VecDeque<Instant>,
    backoff: Duration,
    next_start: Option<Instant>,
}

/// Fresh heartbeats, by instance, with when each arrived here.
type Beats = Arc<Mutex<HashMap<String, (Heartbeat, Instant)>>>;

/// A supervisor of the services in an [`UpConfig`].
pub struct Supervisor {
    client: Client,
    url: String,
    id: String,
    services: BTreeMap<String, Service>,
    managed: HashMap<String, Managed>,
    beats: Beats,
    demand: Arc<Mutex<HashSet<String>>>,
    lease: kv::Store,
    lease_revision: Option<u64>,
    quiet: bool,
    rounds: u64,
    /// Whether the `standby` event for this spell without the lease went out.
    standing_by: bool,
}

impl Supervisor {
    /// A supervisor of `config`'s services, through `client` (whose URL the
    /// instances get as `NATS_URL`).
    pub async fn new(client: &Client, config: &UpConfig) -> Result<Supervisor, Error> {
        let mut services = Vec::new();
        for service in &config.services {
            services.push((service.clone(), service.backend()?));
        }
        Supervisor::with_backends(client, services).await
    }

    /// A supervisor of services whose backends the caller chose (local
    /// mode runs its workers through its own).
    pub async fn with_backends(
        client: &Client,
        config: Vec<(ServiceConfig, Box<dyn Backend>)>,
    ) -> Result<Supervisor, Error> {
        let js = jetstream::new(client.nats().clone());
        let lease = crate::bucket::bucket(
            &js,
            LEASE_BUCKET,
            "wharf: the acting supervisor's lease",
            LEASE_TTL,
            jetstream::stream::StorageType::Memory,
        )
        .await?;
        let mut services = BTreeMap::new();
        for (service, backend) in config {
            let policy = service.policy()?;
            services.insert(
                service.name.clone(),
                Service {
                    backend,
                    desired: policy.min,
                    policy,
                    config: service.clone(),
                    scaler: Scaler::default(),
                    exits: VecDeque::new(),
                    backoff: Duration::from_secs(1),
                    next_start: None,
                },
            );
        }
        let beats: Beats = Arc::default();
        let store = heartbeat::instances_bucket(&js).await?;
        let mut watch = store.watch_all().await.map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!("cannot watch `{}`: {e}", subjects::INSTANCES_BUCKET),
            )
        })?;
        let seen = beats.clone();
        tokio::spawn(async move {
            while let Some(Ok(entry)) = watch.next().await {
                let mut beats = seen.lock().unwrap();
                match entry.operation {
                    kv::Operation::Put => {
                        if let Ok(beat) = serde_json::from_slice::<Heartbeat>(&entry.value) {
                            beats.insert(entry.key, (beat, Instant::now()));
                        }
                    }
                    _ => {
                        beats.remove(&entry.key);
                    }
                }
            }
        });
        let demand: Arc<Mutex<HashSet<String>>> = Arc::default();
        let mut wanted = client
            .nats()
            .subscribe(subjects::demand_any(client.prefix()))
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    format!("cannot subscribe for demand: {e}"),
                )
            })?;
        let noted = demand.clone();
        tokio::spawn(async move {
            while let Some(message) = wanted.next().await {
                if let Some(service) = subjects::demanded_service(&message.subject) {
                    noted.lock().unwrap().insert(service.to_owned());
                }
            }
        });
        Ok(Supervisor {
            client: client.clone(),
            url: client.url().to_owned(),
            // The pid first: the lease's value then names the process.
            id: format!("{}-{}", std::process::id(), nuid::next().as_str()),
            services,
            managed: HashMap::new(),
            beats,
            demand,
            lease,
            lease_revision: None,
            quiet: false,
            rounds: 0,
            standing_by: false,
        })
    }

    /// Prints only what a user should hear of (exits, hangs, scaling,
    /// crash loops), not routine starts and drains: for local mode.
    pub fn quiet(mut self) -> Supervisor {
        self.quiet = true;
        self
    }

    /// Whether this supervisor holds the lease.
    pub fn is_leader(&self) -> bool {
        self.lease_revision.is_some()
    }

    /// Supervises until `stop` resolves or `wharf down` asks, then stops
    /// the instances this supervisor runs and gives up the lease.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) -> Result<(), Error> {
        let mut down = self
            .client
            .nats()
            .subscribe(subjects::supervisor_down(self.client.prefix()))
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    format!("cannot subscribe for `wharf down`: {e}"),
                )
            })?;
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                request = down.next() => {
                    if let Some(reply) = request.and_then(|r| r.reply) {
                        let _ = self.client.nats().publish(reply, self.id.clone().into()).await;
                    }
                    self.event(None, "stop", None, "`wharf down` asked".to_owned()).await;
                    break;
                }
                _ = ticker.tick() => self.tick().await,
            }
        }
        self.shutdown().await;
        Ok(())
    }

    /// One round: lease, health, scaling.
    async fn tick(&mut self) {
        let was_leader = self.is_leader();
        self.hold_lease().await;
        if !self.is_leader() {
            if was_leader {
                self.event(
                    None,
                    "standby",
                    None,
                    "lost the lease to another supervisor".to_owned(),
                )
                .await;
                // Another supervisor runs the instances now.
                self.managed.clear();
            } else if !self.standing_by {
                self.event(
                    None,
                    "standby",
                    None,
                    format!(
                        "supervisor {} stands by: another supervisor holds the lease",
                        self.id
                    ),
                )
                .await;
            }
            self.standing_by = true;
            return;
        }
        self.standing_by = false;
        if !was_leader {
            self.event(
                None,
                "leader",
                None,
                format!("supervisor {} holds the lease", self.id),
            )
            .await;
            self.adopt().await;
        }
        self.check_health().await;
        self.scale().await;
        self.reconcile().await;
    }

    async fn hold_lease(&mut self) {
        let value = self.id.clone().into_bytes();
        self.lease_revision = match self.lease_revision {
            Some(revision) => self
                .lease
                .update(subjects::LEADER_KEY, value.into(), revision)
                .await
                .ok(),
            None => self
                .lease
                .create(subjects::LEADER_KEY, value.into())
                .await
                .ok(),
        };
    }

    /// Takes over the instances of our services that a previous leader
    /// started: they keep running and count, rather than being duplicated.
    async fn adopt(&mut self) {
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
                Managed {
                    service: service.clone(),
                    instance: Adopted::from_heartbeat(&beat),
                    started: Instant::now(),
                    draining_since: None,
                    quiesced: false,
                    misses: 0,
                },
            );
            if let Some(entry) = self.services.get_mut(&service) {
                let live = self
                    .managed
                    .values()
                    .filter(|m| m.service == service)
                    .count();
                entry.desired = entry.desired.max(live).min(entry.policy.max);
            }
            self.event(
                Some(&service),
                "adopt",
                Some(&beat.instance),
                format!("running as pid {} on {}", beat.pid, beat.host),
            )
            .await;
        }
    }

    /// Replaces instances that exited or hang; finishes drains.
    async fn check_health(&mut self) {
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
        for (id, answered) in ids.into_iter().zip(pings) {
            let beat_age = self
                .beats
                .lock()
                .unwrap()
                .get(&id)
                .map(|(_, at)| at.elapsed());
            let Some(managed) = self.managed.get_mut(&id) else {
                continue;
            };
            let service = managed.service.clone();
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
                    crate::QUIESCE_LIMIT + DRAIN_GRACE
                } else {
                    DRAIN_GRACE
                };
                if !managed.instance.alive() {
                    self.managed.remove(&id);
                    self.event(
                        Some(&service),
                        "drained",
                        Some(&id),
                        "finished its calls and exited".to_owned(),
                    )
                    .await;
                } else if since.elapsed() > limit {
                    managed.instance.kill();
                    self.managed.remove(&id);
                    self.event(
                        Some(&service),
                        "killed",
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
                self.managed.remove(&id);
                if failed_start {
                    self.note_exit(&service);
                }
                self.event(
                    Some(&service),
                    "exited",
                    Some(&id),
                    "the instance is gone; it will be replaced".to_owned(),
                )
                .await;
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
                managed.misses = if stale || !answered {
                    managed.misses + 1
                } else {
                    0
                };
            }
            if managed.misses >= MISSES_ALLOWED {
                managed.instance.kill();
                self.managed.remove(&id);
                self.beats.lock().unwrap().remove(&id);
                self.note_exit(&service);
                self.event(
                    Some(&service),
                    "hung",
                    Some(&id),
                    format!("no heartbeat or ping answer for {MISSES_ALLOWED} intervals: killed, to be replaced"),
                )
                .await;
            }
        }
    }

    /// Counts an unplanned exit; too many in a short time back restarts off.
    fn note_exit(&mut self, service: &str) {
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

    /// Runs each service's scaler on its instances' heartbeats.
    async fn scale(&mut self) {
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
            if let Decision::Scale { to, reason } =
                service.scaler.decide(&service.policy, &seen, now)
            {
                if to != service.desired {
                    decisions.push((name.clone(), service.desired, to, reason));
                    service.desired = to;
                }
            }
        }
        for (name, from, to, reason) in decisions {
            self.event(
                Some(&name),
                "scale",
                None,
                format!("{from} -> {to}: {reason}"),
            )
            .await;
        }
    }

    /// Starts or drains instances until each service has `desired`.
    async fn reconcile(&mut self) {
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            let live: Vec<String> = self
                .managed
                .iter()
                .filter(|(_, m)| m.service == name && m.draining_since.is_none())
                .map(|(id, _)| id.clone())
                .collect();
            let desired = self.services[&name].desired;
            if live.len() < desired {
                let entry = self.services.get_mut(&name).expect("known service");
                if let Some(at) = entry.next_start {
                    if Instant::now() < at {
                        continue;
                    }
                    entry.next_start = None;
                    let backoff = entry.backoff;
                    self.event(Some(&name), "crash-loop", None, format!("3 exits within 30 s: restarting after a pause (next pause {backoff:?})")).await;
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

    fn managed_count(&self, service: &str) -> usize {
        self.managed
            .values()
            .filter(|m| m.service == service && m.draining_since.is_none())
            .count()
    }

    async fn start(&mut self, service: &str) {
        let instance = format!("{service}-{}", nuid::next().as_str());
        let entry = &self.services[service];
        let mut env = entry.config.env.clone();
        env.insert("NATS_URL".into(), self.url.clone());
        env.insert("WHARF_PREFIX".into(), self.client.prefix().to_owned());
        env.insert("WHARF_INSTANCE_ID".into(), instance.clone());
        env.insert("WHARF_ROLE".into(), "worker".into());
        let launch = Launch {
            service: service.to_owned(),
            instance: instance.clone(),
            prefix: self.client.prefix().to_owned(),
            env,
        };
        match entry.backend.start(&launch) {
            Ok(handle) => {
                let location = handle.location();
                let backend = entry.backend.name();
                self.managed.insert(
                    instance.clone(),
                    Managed {
                        service: service.to_owned(),
                        instance: handle,
                        started: Instant::now(),
                        draining_since: None,
                        quiesced: false,
                        misses: 0,
                    },
                );
                self.event(
                    Some(service),
                    "start",
                    Some(&instance),
                    format!("{backend} backend, {location}"),
                )
                .await;
            }
            Err(error) => {
                self.note_exit(service);
                self.event(
                    Some(service),
                    "start-failed",
                    Some(&instance),
                    error.to_string(),
                )
                .await;
            }
        }
    }

    /// Asks an instance to drain over NATS (it finishes its calls and
    /// exits); a signal if it does not answer.
    async fn drain(&mut self, id: &str, why: &str) {
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
            "drain",
            Some(id),
            format!("{why}: finishing its calls, then exiting"),
        )
        .await;
    }

    /// Drains every instance this supervisor runs, waits for them, and
    /// releases the lease.
    async fn shutdown(&mut self) {
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
        for managed in self.managed.values_mut() {
            if managed.instance.alive() {
                managed.instance.kill();
            }
        }
        self.managed.clear();
        if self.is_leader() {
            let _ = self.lease.purge(subjects::LEADER_KEY).await;
        }
    }

    async fn event(
        &self,
        service: Option<&str>,
        kind: &str,
        instance: Option<&str>,
        reason: String,
    ) {
        let event = Event {
            at_ms: crate::context::unix_ms(),
            service: service.map(str::to_owned),
            kind: kind.to_owned(),
            instance: instance.map(str::to_owned),
            reason,
        };
        let routine = matches!(
            kind,
            "leader" | "start" | "adopt" | "drain" | "drained" | "stop"
        );
        if !(self.quiet && routine) {
            eprintln!(
                "{} {} {}{}: {}",
                if self.quiet { "wharf:" } else { "wharf up:" },
                event.kind,
                event.service.as_deref().unwrap_or("-"),
                event
                    .instance
                    .as_deref()
                    .map(|i| format!(" {i}"))
                    .unwrap_or_default(),
                event.reason
            );
        }
        if let Ok(json) = serde_json::to_vec(&event) {
            let _ = self
                .client
                .nats()
                .publish(subjects::events(self.client.prefix()), json.into())
                .await;
        }
    }
}

/// Runs a supervisor for the `wharf.toml` at `path`, against its
/// `broker.url`, until SIGTERM or `wharf down`: for programs that embed the
/// supervisor in a process of their own.
pub async fn supervise_file(path: &std::path::Path) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let config = UpConfig::load(path)?;
    let settings = config.settings()?;
    let url = settings.nats_url.clone().ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            format!(
                "{}: set broker.url (or NATS_URL) to the NATS server to supervise through",
                path.display()
            ),
        )
    })?;
    let client = Client::connect(&url).await?.with_prefix(settings.prefix);
    let supervisor = Supervisor::new(&client, &config).await?;
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::new(ErrorKind::Process, format!("cannot watch SIGTERM: {e}")))?;
    supervisor
        .run(async move {
            term.recv().await;
        })
        .await
}

/// The fresh heartbeats of every instance, for `wharf status`.
pub async fn instances(client: &Client) -> Result<Vec<Heartbeat>, Error> {
    let js = jetstream::new(client.nats().clone());
    let store = heartbeat::instances_bucket(&js).await?;
    let mut keys = store
        .keys()
        .await
        .map_err(|e| Error::new(ErrorKind::Connection, format!("cannot list instances: {e}")))?;
    let mut out = Vec::new();
    while let Some(Ok(key)) = keys.next().await {
        if let Ok(Some(value)) = store.get(&key).await {
            if let Ok(beat) = serde_json::from_slice::<Heartbeat>(&value) {
                if crate::context::unix_ms().saturating_sub(beat.at_ms) <= 3_000 {
                    out.push(beat);
                }
            }
        }
    }
    out.sort_by(|a, b| {
        a.services
            .cmp(&b.services)
            .then(a.instance.cmp(&b.instance))
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_checked() {
        let config = UpConfig::from_toml(
            r#"
            [broker]
            url = "nats://127.0.0.1:4222"
            [[service]]
            name = "autoscale"
            command = ["target/release/autoscale", "worker"]
            min = 1
            max = 4
            "#,
        )
        .unwrap();
        assert_eq!(config.services[0].policy().unwrap().max, 4);
        assert_eq!(config.broker.url.as_deref(), Some("nats://127.0.0.1:4222"));

        let error =
            UpConfig::from_toml("[[service]]\nname = \"a\"\nmin = 5\nmax = 2\ncommand = [\"x\"]")
                .unwrap_err();
        assert!(error.message().contains("min 5 and max 2"), "{error}");
        let error = UpConfig::from_toml("[[service]]\nname = \"a\"\nscale_down_after = \"soon\"")
            .unwrap_err();
        assert!(
            error.message().contains("scale_down_after `soon`"),
            "{error}"
        );
        let error = UpConfig::from_toml("[[service]]\nname = \"a\"\nreplicas = 3").unwrap_err();
        assert!(
            error.message().contains("unknown field `replicas`"),
            "{error}"
        );
        let twice = "[[service]]\nname = \"a\"\ncommand = [\"x\"]\n[[service]]\nname = \"a\"\ncommand = [\"x\"]";
        assert!(UpConfig::from_toml(twice)
            .unwrap_err()
            .message()
            .contains("declared twice"));
        assert!(ServiceConfig::process("a", vec![]).backend().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("ten").is_err());
    }
}
