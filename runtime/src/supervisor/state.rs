//! What a supervisor knows: its services, the instances it runs, the
//! heartbeats it hears, and the lease it holds.

use super::config::{ServiceConfig, UpConfig};
use super::events::{self, Event, EventKind};
use crate::backend::{Backend, Instance};
use crate::client::Client;
use crate::error::{Error, ErrorKind};
use crate::heartbeat::{self, Heartbeat};
use crate::scaler::{ScalePolicy, Scaler};
use crate::wire::subjects::{self, LEASE_BUCKET};
use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a lease outlives its last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(3);

/// A leader acts only while its lease has at least this long to run by
/// its own clock (counted from before its last confirmed renewal was
/// sent): longer than one action takes, so that no start or kill of a
/// supervisor that may have lost the lease lands after another took it.
pub const FENCE_MARGIN: Duration = Duration::from_secs(1);

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

pub(crate) struct Managed {
    pub(crate) service: String,
    pub(crate) instance: Box<dyn Instance>,
    pub(crate) started: Instant,
    pub(crate) draining_since: Option<Instant>,
    /// Seen holding open transactions while draining.
    pub(crate) quiesced: bool,
    pub(crate) misses: u32,
    /// The revision of the service it was started from; `None` when not
    /// known (adopted from a supervisor that did not say): taken as the
    /// service's own.
    pub(crate) revision: Option<String>,
    /// Its signed calls by function at the last look (see
    /// [`Heartbeat::signed_calls`]), during a rollout.
    pub(crate) signed_seen: BTreeMap<String, u64>,
    /// When it last took a call of a signature that no instance of the
    /// service's new revision serves: while callers of the old build still
    /// call, a rollout keeps one instance of the old revision for them.
    pub(crate) needed_at: Option<Instant>,
}

impl Managed {
    pub(crate) fn new(
        service: &str,
        instance: Box<dyn Instance>,
        revision: Option<String>,
    ) -> Managed {
        Managed {
            service: service.to_owned(),
            instance,
            started: Instant::now(),
            draining_since: None,
            quiesced: false,
            misses: 0,
            revision,
            signed_seen: BTreeMap::new(),
            needed_at: None,
        }
    }
}

/// What a service ran before a rollout began: what it goes back to if the
/// new revision does not become ready.
pub(crate) struct Previous {
    pub(crate) config: ServiceConfig,
    pub(crate) backend: Box<dyn Backend>,
    pub(crate) revision: String,
}

/// A rollout under way.
pub(crate) struct Rolling {
    pub(crate) from: Vec<String>,
    pub(crate) started: Instant,
    /// The instance of an old revision kept for its callers, once said.
    pub(crate) kept: Option<String>,
}

pub(crate) struct Service {
    pub(crate) config: ServiceConfig,
    pub(crate) policy: ScalePolicy,
    pub(crate) backend: Box<dyn Backend>,
    pub(crate) scaler: Scaler,
    pub(crate) desired: usize,
    pub(crate) exits: VecDeque<Instant>,
    pub(crate) backoff: Duration,
    pub(crate) next_start: Option<Instant>,
    /// A pooled service (an orchestrator runs it): the instance count last
    /// set, and when.
    pub(crate) replicas_set: Option<(usize, Instant)>,
    /// What its instances are made from ([`ServiceConfig::revision`]):
    /// instances of other revisions are rolled over to this one.
    pub(crate) revision: String,
    /// What ran before the current rollout, to return to if it fails.
    pub(crate) previous: Option<Previous>,
    pub(crate) rolling: Option<Rolling>,
    /// A revision whose rollout failed with nothing to return to: the
    /// instances of other revisions are left serving until a reload.
    pub(crate) halted: Option<String>,
}

impl Service {
    /// A service as `config` declares it, run by `backend`.
    pub(crate) fn new(config: &ServiceConfig, backend: Box<dyn Backend>) -> Result<Service, Error> {
        let policy = config.policy()?;
        Ok(Service {
            backend,
            desired: policy.min,
            policy,
            revision: config.revision(),
            config: config.clone(),
            scaler: Scaler::default(),
            exits: VecDeque::new(),
            backoff: Duration::from_secs(1),
            next_start: None,
            replicas_set: None,
            previous: None,
            rolling: None,
            halted: None,
        })
    }
}

/// Fresh heartbeats, by instance, with when each arrived here.
pub(crate) type Beats = Arc<Mutex<HashMap<String, (Heartbeat, Instant)>>>;

/// Keeps `beats` up to date from the heartbeat bucket. A watch that ends
/// or fails (its server lost, the stream electing a leader) is made again,
/// so heartbeats keep coming across a node loss.
async fn hear_heartbeats(store: kv::Store, mut watch: kv::Watch, beats: Beats) {
    loop {
        while let Some(entry) = watch.next().await {
            let Ok(entry) = entry else { break };
            let mut beats = beats.lock().unwrap();
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
        watch = loop {
            tokio::time::sleep(TICK).await;
            if let Ok(watch) = store.watch_all().await {
                break watch;
            }
        };
    }
}

/// A supervisor of the services in an [`UpConfig`].
pub struct Supervisor {
    pub(crate) client: Client,
    pub(crate) url: String,
    pub(crate) id: String,
    pub(crate) services: BTreeMap<String, Service>,
    pub(crate) managed: HashMap<String, Managed>,
    pub(crate) beats: Beats,
    pub(crate) demand: Arc<Mutex<HashSet<String>>>,
    pub(crate) lease: kv::Store,
    pub(crate) lease_revision: Option<u64>,
    /// Until when the lease is surely ours: [`LEASE_TTL`] after the last
    /// renewal the server confirmed was sent.
    pub(crate) lease_until: Option<Instant>,
    pub(crate) quiet: bool,
    pub(crate) rounds: u64,
    /// Whether the `standby` event for this spell without the lease went out.
    pub(crate) standing_by: bool,
    /// What scrapes of this process's metrics show of it.
    pub(crate) metrics: Arc<super::metrics::SupervisorMetrics>,
    /// The `wharf.toml` it reads again on SIGHUP or `wharf up --reload`.
    pub(crate) source: Option<std::path::PathBuf>,
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
        // Lease requests are bounded on their own (`lease::bounded`); the
        // buckets are made with JetStream's usual patience.
        let js = jetstream::new(client.nats().clone());
        let lease = crate::storage::bucket(
            &js,
            LEASE_BUCKET,
            "wharf: the acting supervisor's lease",
            LEASE_TTL,
            jetstream::stream::StorageType::Memory,
        )
        .await?;
        let mut services = BTreeMap::new();
        for (service, backend) in config {
            services.insert(service.name.clone(), Service::new(&service, backend)?);
        }
        let beats: Beats = Arc::default();
        let store = heartbeat::instances_bucket(&js).await?;
        let watch = store.watch_all().await.map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!("cannot watch `{}`: {e}", subjects::INSTANCES_BUCKET),
            )
            .with_source(e)
        })?;
        tokio::spawn(hear_heartbeats(store, watch, beats.clone()));
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
                .with_source(e)
            })?;
        let noted = demand.clone();
        tokio::spawn(async move {
            while let Some(message) = wanted.next().await {
                if let Some(service) = subjects::demanded_service(&message.subject) {
                    noted.lock().unwrap().insert(service.to_owned());
                }
            }
        });
        let metrics = Arc::new(super::metrics::SupervisorMetrics::default());
        let source: Arc<dyn crate::metrics::Source> = metrics.clone();
        crate::metrics::register(&source);
        Ok(Supervisor {
            metrics,
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
            lease_until: None,
            quiet: false,
            rounds: 0,
            standing_by: false,
            source: None,
        })
    }

    /// Reads `path` again, and applies what changed, on SIGHUP or `wharf up
    /// --reload` (the file this supervisor was made from).
    pub fn reloading_from(mut self, path: &std::path::Path) -> Supervisor {
        self.source = Some(path.to_owned());
        self
    }

    /// Prints only what a user should hear of (exits, hangs, scaling,
    /// crash loops), not routine starts and drains: for local mode.
    pub fn quiet(mut self) -> Supervisor {
        self.quiet = true;
        self
    }

    /// Whether this supervisor holds the lease and may act: the lease
    /// runs at least [`FENCE_MARGIN`] longer. A supervisor cut off from the
    /// quorum cannot renew, so it stops acting before its lease can expire
    /// and be taken.
    pub fn is_leader(&self) -> bool {
        self.lease_revision.is_some()
            && self
                .lease_until
                .is_some_and(|until| Instant::now() + FENCE_MARGIN < until)
    }

    pub(crate) async fn event(
        &self,
        service: Option<&str>,
        kind: EventKind,
        instance: Option<&str>,
        reason: String,
    ) {
        let event = Event {
            at_ms: crate::context::unix_ms(),
            service: service.map(str::to_owned),
            kind,
            instance: instance.map(str::to_owned),
            reason,
            supervisor: self.id.clone(),
        };
        events::publish(&self.client, self.quiet, &event).await;
    }
}
