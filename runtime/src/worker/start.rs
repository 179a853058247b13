//! Starting and stopping a worker: one ADR-32 endpoint per microservice
//! linked into the binary, its durable consumers, discovery, heartbeats and
//! the supervisor's control subject; and the drain that ends it.

use super::cancel::answer_cancels;
use super::endpoint::{Endpoint, Shared};
use super::idempotent::answer_probes;
use super::intake::Via;
use crate::client::denials::Denials;
use crate::client::Client;
use crate::durable::streams;
use crate::error::{Error, ErrorKind};
use crate::handler::{registrations, Registration};
use crate::micro;
use crate::process::hostname;
use crate::settings::{Settings, DEFAULT_CONCURRENCY, MAX_CONCURRENCY};
use crate::spec::FnSpec;
use crate::txn::owner::{Owned, QUIESCE_LIMIT};
use crate::wire::subjects;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// Builds and starts a worker for every microservice linked into this
/// binary.
///
/// ```no_run
/// # async fn run() -> Result<(), wharf::Error> {
/// let client = wharf::Client::connect("nats://127.0.0.1:4222").await?;
/// let worker = wharf::Worker::new(&client).concurrency(64).start().await?;
/// // ... serve until asked to stop, then finish what is in flight:
/// worker.drain(std::time::Duration::from_secs(10)).await;
/// # Ok(()) }
/// ```
pub struct Worker {
    client: Client,
    concurrency: usize,
    backlog: Option<usize>,
}

impl Worker {
    /// A worker serving through `client`.
    pub fn new(client: &Client) -> Worker {
        // `start` reports settings that do not validate.
        let settings = Settings::get().ok();
        let concurrency = settings.map_or(DEFAULT_CONCURRENCY, |s| s.concurrency);
        let backlog = settings.and_then(|s| s.backlog);
        Worker {
            client: client.clone(),
            concurrency,
            backlog,
        }
    }

    /// How many calls run at once.
    pub fn concurrency(mut self, concurrency: usize) -> Worker {
        self.concurrency = concurrency.clamp(1, MAX_CONCURRENCY);
        self
    }

    /// How many calls may wait for a free slot once `concurrency` run
    /// (default: as many as `concurrency`); a call beyond that is answered
    /// 503 and its caller retries, usually on another worker. Durable calls
    /// do not count: a busy worker just stops pulling them.
    pub fn backlog(mut self, backlog: usize) -> Worker {
        self.backlog = Some(backlog);
        self
    }

    /// Registers every endpoint and starts serving. Returns once the server
    /// has every subscription, so calls made afterwards find this worker.
    pub async fn start(self) -> Result<RunningWorker, Error> {
        let by_subject = check_unique_subjects(self.client.prefix())?;
        let mut by_service: BTreeMap<&'static str, Vec<&'static Registration>> = BTreeMap::new();
        for registration in by_subject.into_values() {
            by_service
                .entry(registration.spec.service)
                .or_default()
                .push(registration);
        }

        // A supervisor names the instances it starts, to know them again in
        // their heartbeats.
        let instance = Settings::get()?
            .instance_id
            .clone()
            .unwrap_or_else(|| nuid::next().as_str().to_owned());
        let identity = format!("{instance} {} {}", std::process::id(), hostname());
        let nats = self.client.nats().clone();
        let prefix = self.client.prefix().to_owned();
        let js = async_nats::jetstream::new(nats.clone());
        // Durable calls and kept results need JetStream; without it the
        // worker still serves plain calls.
        let jetstream = match jetstream_ready(&js, &nats).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("JetStream is not available ({e}); this worker serves plain calls only, not durable ones");
                false
            }
        };
        if jetstream {
            streams::dead_letters(&js, &prefix).await?;
        }
        let owned = match (by_service.values().flatten().any(|r| r.spec.stateful), jetstream) {
            (false, _) => None,
            (true, true) => Some(Owned::new(js.clone(), &instance, &prefix).await?),
            (true, false) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "this binary serves stateful functions, whose transactions are leased in JetStream KV: start nats-server with JetStream (-js)",
                ))
            }
        };
        let stores = super::stores::Stores::start(&nats).await.map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!("cannot subscribe for the acknowledgements of stored results: {e}"),
            )
        })?;
        let shared = Arc::new(Shared {
            nats: nats.clone(),
            permits: Arc::new(Semaphore::new(self.concurrency)),
            concurrency: self.concurrency,
            backlog: AtomicUsize::new(0),
            max_backlog: self.backlog.unwrap_or(self.concurrency),
            identity,
            running: super::endpoint::Running::new(),
            cancelled: AtomicU64::new(0),
            cancels: Default::default(),
            prefix: prefix.clone(),
            owned: owned.clone(),
            client: self.client.clone(),
            spill_at: crate::client::spill_limit(&nats),
            outbox: super::outbox::Outbox::start(&nats).await.map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    format!("cannot subscribe for the confirmations of batch replies: {e}"),
                )
            })?,
            stores,
        });
        let (stop, stopped) = watch::channel(false);
        // Stateful endpoints' own subjects stop later, once their
        // transactions have ended (quiesce).
        let (stop_direct, stopped_direct) = watch::channel(false);
        let mut discovery = Vec::new();
        let mut probes = Vec::new();
        let mut tasks = JoinSet::new();
        // Every subject subscribed to, to check for refusals.
        let mut served: Vec<String> = Vec::new();
        let mut all_stats = Vec::new();
        let mut served_metrics = Vec::new();
        let mut services = Vec::new();
        for (service_name, regs) in by_service {
            // Probes and cancels are answered before the first call can
            // arrive: the endpoints below take calls as each subscribes,
            // while the rest of the service is still being set up (a
            // JetStream consumer per function, each a round trip), and a
            // call probed then with no answer would fail as lost.
            probes.push(Discovery(
                answer_probes(&nats, &prefix, service_name, shared.clone()).await?,
            ));
            probes.push(Discovery(
                answer_cancels(&nats, &prefix, service_name, shared.clone()).await?,
            ));
            let stream = if jetstream {
                Some(streams::calls_stream(&js, &prefix, service_name).await?)
            } else {
                None
            };
            let results = if jetstream {
                Some(streams::results_bucket(&js, service_name).await?)
            } else {
                None
            };
            // The version of the crate that defines the service's functions.
            let version = regs.first().map_or("0.0.0", |r| r.spec.version).to_owned();
            let mut endpoints = Vec::new();
            for registration in regs {
                let spec = registration.spec;
                let subject = spec.subject(self.client.prefix());
                served.push(subject.to_string());
                let subscriber = nats
                    .queue_subscribe(subject.clone(), subjects::QUEUE_GROUP.into())
                    .await
                    .map_err(|e| crate::micro::subscribe_failed(&subject, e))?;
                // Beside it, the subject of this build's signature, which
                // wharf callers use: while builds with other signatures
                // serve the same function, each caller reaches its own.
                let signed = spec.signed_subject(self.client.prefix());
                served.push(signed.to_string());
                let signed = nats
                    .queue_subscribe(signed.clone(), subjects::QUEUE_GROUP.into())
                    .await
                    .map_err(|e| crate::micro::subscribe_failed(&signed, e))?;
                // And beside that, where wharf callers send calls of this
                // signature in batches (none for stateful functions: their
                // calls are never coalesced).
                let batched = if spec.stateful {
                    None
                } else {
                    let subject = subjects::batch_call(&prefix, spec.service, spec.name, spec.sig);
                    served.push(subject.clone());
                    Some(
                        nats.queue_subscribe(subject.clone(), subjects::QUEUE_GROUP.into())
                            .await
                            .map_err(|e| crate::micro::subscribe_failed(&subject, e))?,
                    )
                };
                let stats = Arc::new(micro::EndpointStats::default());
                all_stats.push(crate::heartbeat::Function {
                    spec,
                    stats: stats.clone(),
                });
                endpoints.push(micro::EndpointInfo {
                    name: spec.name.to_owned(),
                    subject: subject.to_string(),
                    metadata: endpoint_metadata(spec),
                    stats: stats.clone(),
                });
                let endpoint = Arc::new(Endpoint {
                    registration,
                    stats,
                    shared: shared.clone(),
                    results: results.clone(),
                });
                let mut consumers = Vec::new();
                if let Some(stream) = &stream {
                    let consumer = streams::consumer(stream, &prefix, spec, false).await?;
                    consumers.push(consumer.clone());
                    tasks.spawn(super::durable::serve(
                        endpoint.clone(),
                        consumer,
                        js.clone(),
                        stopped.clone(),
                        false,
                    ));
                    let batches = streams::consumer(stream, &prefix, spec, true).await?;
                    consumers.push(batches.clone());
                    tasks.spawn(super::durable::serve(
                        endpoint.clone(),
                        batches,
                        js.clone(),
                        stopped.clone(),
                        true,
                    ));
                }
                served_metrics.push(super::metrics::Served {
                    spec,
                    stats: endpoint.stats.clone(),
                    consumers,
                    pending: Default::default(),
                });
                if let Some(owned) = &owned {
                    if spec.stateful {
                        let direct = subjects::instance_call(
                            &prefix,
                            &owned.instance,
                            spec.service,
                            spec.name,
                        );
                        let direct = nats
                            .subscribe(direct.clone())
                            .await
                            .map_err(|e| crate::micro::subscribe_failed(&direct, e))?;
                        tasks.spawn(endpoint.clone().serve(
                            direct,
                            stopped_direct.clone(),
                            Via::Owner,
                        ));
                    }
                }
                if let Some(batched) = batched {
                    tasks.spawn(endpoint.clone().serve(batched, stopped.clone(), Via::Batch));
                }
                tasks.spawn(endpoint.clone().serve(signed, stopped.clone(), Via::Signed));
                tasks.spawn(endpoint.serve(subscriber, stopped.clone(), Via::Plain));
            }
            services.push(service_name.to_owned());
            let info = micro::ServiceInfo {
                name: service_name.to_owned(),
                // The instance id, so `$SRV.PING.<service>.<instance>` reaches this one.
                id: instance.clone(),
                version,
                description: format!("wharf service {service_name}"),
                metadata: service_metadata(&instance),
                endpoints,
                started: SystemTime::now(),
            };
            let stats_shared = shared.clone();
            let data = move || {
                serde_json::json!({
                    "in_flight": stats_shared.in_flight(),
                    "backlog": stats_shared.backlog(),
                    "concurrency": stats_shared.concurrency,
                    "cancelled": stats_shared.cancelled.load(Ordering::Relaxed),
                })
            };
            discovery.push(Discovery(
                micro::answer_discovery(&nats, Arc::new(info), data).await?,
            ));
        }
        if jetstream {
            // Spilled payloads and objects with a TTL in the Object Store
            // expire by metadata; workers sweep them, a minute apart and
            // out of step with each other.
            let sweeper = self.client.clone();
            let offset = u64::from(std::process::id()) % 30_000;
            probes.push(Discovery(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30_000 + offset)).await;
                loop {
                    let _ = crate::objects::jetstream::sweep(&sweeper).await;
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            })));
        }
        if let Some(owned) = &owned {
            probes.push(Discovery(tokio::spawn(owned.clone().keep_leases())));
            probes.push(Discovery(owned.clone().answer_ends(nats.clone()).await?));
        }
        let draining = Arc::new(AtomicBool::new(false));
        let (ask_drain, drain_asked) = watch::channel(false);
        let heartbeats = if jetstream {
            let store = crate::heartbeat::instances_bucket(&js).await?;
            let load_shared = shared.clone();
            let source = crate::heartbeat::Source {
                instance: instance.clone(),
                services,
                host: hostname(),
                endpoints: all_stats,
                load: Arc::new(move || crate::heartbeat::Load {
                    in_flight: load_shared.in_flight(),
                    backlog: load_shared.backlog(),
                    transactions: load_shared.owned.as_ref().map_or(0, |o| o.count()),
                }),
                draining: draining.clone(),
            };
            probes.push(Discovery(tokio::spawn(crate::heartbeat::beat(
                store.clone(),
                source,
            ))));
            Some(store)
        } else {
            None
        };
        let control = subjects::control(&prefix, &instance);
        let mut requests = nats
            .subscribe(control.clone())
            .await
            .map_err(|e| crate::micro::subscribe_failed(&control, e))?;
        let control_nats = nats.clone();
        probes.push(Discovery(tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                if request.payload.as_ref() == b"drain" {
                    let _ = ask_drain.send(true);
                }
                if let Some(reply) = request.reply {
                    let _ = control_nats.publish(reply, Bytes::from_static(b"ok")).await;
                }
            }
        })));
        // The subscriptions exist on the server only after a round trip.
        nats.flush().await.map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!("cannot confirm subscriptions with NATS: {e}"),
            )
            .with_source(e)
        })?;
        if self.client.denials().watching {
            refused_subscription(&nats, self.client.denials(), &served).await?;
        }
        // Registered whether or not this process serves metrics: a scrape
        // is the only cost, and a later `metrics::serve` finds it.
        let metrics: Arc<dyn crate::metrics::Source> = Arc::new(super::metrics::WorkerMetrics {
            instance: instance.clone(),
            shared: shared.clone(),
            served: served_metrics,
            draining: draining.clone(),
        });
        crate::metrics::register(&metrics);
        Ok(RunningWorker {
            nats,
            _metrics: metrics,
            instance,
            stop,
            stop_direct,
            discovery,
            probes,
            tasks,
            shared,
            draining,
            drain_asked,
            heartbeats,
        })
    }
}

/// Every registration keyed by its subject; two functions on one subject
/// are an error that names both.
fn check_unique_subjects(prefix: &str) -> Result<BTreeMap<String, &'static Registration>, Error> {
    let mut by_subject: BTreeMap<String, &'static Registration> = BTreeMap::new();
    for registration in registrations() {
        let subject = registration.spec.subject(prefix).to_string();
        if let Some(previous) = by_subject.get(&subject) {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "two functions serve `{subject}`: `{}` and `{}`; give one another name with #[microservice(name = \"...\")] or another service with #[microservice(service = \"...\")]",
                    previous.spec.path, registration.spec.path
                ),
            ));
        }
        by_subject.insert(subject, registration);
    }
    Ok(by_subject)
}

/// Service metadata: which worker instance this is.
fn service_metadata(instance: &str) -> HashMap<String, String> {
    HashMap::from([
        ("wharf.instance".to_owned(), instance.to_owned()),
        ("wharf.pid".to_owned(), std::process::id().to_string()),
        ("wharf.host".to_owned(), hostname()),
        (
            "wharf.runtime".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
    ])
}

/// ADR-32 endpoint metadata: what a foreign client needs to call it.
fn endpoint_metadata(spec: &FnSpec) -> HashMap<String, String> {
    let args: Vec<String> = spec
        .args
        .iter()
        .map(|a| format!("{}: {}", a.name, a.ty))
        .collect();
    let mut metadata = HashMap::from([
        ("wharf.sig".to_owned(), spec.sig_hex()),
        ("wharf.signature".to_owned(), spec.signature.to_owned()),
        ("wharf.args".to_owned(), args.join(", ")),
        ("wharf.returns".to_owned(), spec.returns.to_owned()),
        ("wharf.timeout_ms".to_owned(), spec.timeout_ms.to_string()),
        (
            "wharf.kind".to_owned(),
            if spec.blocking { "sync" } else { "async" }.to_owned(),
        ),
    ]);
    if let Some(error) = spec.error {
        metadata.insert("wharf.error".to_owned(), error.to_owned());
    }
    metadata
}

/// The task answering one service's discovery requests; stopped when
/// dropped, so an instance that stops serving (or fails to start) does not
/// keep announcing itself.
struct Discovery(JoinHandle<()>);

impl Drop for Discovery {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A started worker. Dropping it stops serving at once, abandoning calls in
/// flight; [`RunningWorker::drain`] stops it cleanly.
pub struct RunningWorker {
    nats: async_nats::Client,
    instance: String,
    stop: watch::Sender<bool>,
    /// Stops the stateful endpoints' own subjects, after the quiesce.
    stop_direct: watch::Sender<bool>,
    discovery: Vec<Discovery>,
    /// Probe answerers, heartbeats, the control subscription: kept through
    /// a drain, since calls still run.
    probes: Vec<Discovery>,
    tasks: JoinSet<()>,
    draining: Arc<AtomicBool>,
    drain_asked: watch::Receiver<bool>,
    heartbeats: Option<kv::Store>,
    shared: Arc<Shared>,
    /// Its metrics, shown at scrapes for as long as it lives.
    _metrics: Arc<dyn crate::metrics::Source>,
}

impl RunningWorker {
    /// This worker's instance id (also in each service's metadata as
    /// `wharf.instance`).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Calls running right now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
    }

    /// Resolves when a supervisor asks this instance to drain (a `drain`
    /// message on `<prefix>._control.<instance>`), as when it scales down.
    pub async fn drain_requested(&self) {
        let mut asked = self.drain_asked.clone();
        let _ = asked.wait_for(|asked| *asked).await;
    }

    /// Stops taking calls, lets the ones already received finish (at most
    /// `grace`), then returns.
    pub async fn drain(mut self, grace: Duration) {
        self.draining.store(true, Ordering::Relaxed);
        let _ = self.stop.send(true);
        // Stop answering discovery: this instance is going away.
        self.discovery.clear();
        if let Some(owned) = &self.shared.owned {
            // Quiesce: no new transactions; the open ones keep being served
            // on this instance's own subjects until they end or expire.
            tokio::select! {
                _ = owned.quiesce(QUIESCE_LIMIT) => {}
                _ = connection_lost(&self.nats) => return,
            }
        }
        let _ = self.stop_direct.send(true);
        let finish = async {
            // Each endpoint loop ends once its buffered requests are
            // dispatched; then every permit returns when its call completes.
            while self.tasks.join_next().await.is_some() {}
            let _ = self
                .shared
                .permits
                .acquire_many(self.shared.concurrency as u32)
                .await;
        };
        tokio::select! {
            _ = tokio::time::timeout(grace, finish) => {}
            _ = connection_lost(&self.nats) => return,
        }
        // The last replies may still sit in the client's write buffer; a
        // process that exits right after draining must not drop them.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.nats.flush()).await;
        // Nothing runs here any more: stop answering probes for it, and
        // take its heartbeat down so the supervisor sees it gone at once.
        self.probes.clear();
        if let Some(heartbeats) = &self.heartbeats {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                heartbeats.purge(self.instance.as_str()),
            )
            .await;
        }
    }
}

/// How long a worker waits at start for a JetStream its server says it has
/// (a cluster that is still electing its meta leader answers nothing yet).
const JETSTREAM_WAIT: Duration = Duration::from_secs(30);

/// Whether JetStream answers: at once when the server has none, after up to
/// [`JETSTREAM_WAIT`] of asking again when it has (a cluster forming).
async fn jetstream_ready(
    js: &async_nats::jetstream::Context,
    nats: &async_nats::Client,
) -> Result<(), async_nats::jetstream::context::AccountError> {
    let until = tokio::time::Instant::now() + JETSTREAM_WAIT;
    loop {
        match js.query_account().await {
            Ok(_) => return Ok(()),
            Err(e) if !nats.server_info().jetstream || tokio::time::Instant::now() >= until => {
                return Err(e)
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Resolves once the connection has been down for a second: replies could
/// not be delivered, so a drain stops waiting for them.
async fn connection_lost(nats: &async_nats::Client) {
    let mut down_since = None;
    loop {
        if nats.connection_state() == async_nats::connection::State::Connected {
            down_since = None;
        } else if down_since
            .get_or_insert_with(std::time::Instant::now)
            .elapsed()
            >= Duration::from_secs(1)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A subscription of `served` the server refused. The refusal comes back as
/// an asynchronous error, before the answer to a round trip made after the
/// subscriptions; the error is then read on another task, so it gets a
/// moment more.
async fn refused_subscription(
    nats: &async_nats::Client,
    denials: &Denials,
    served: &[String],
) -> Result<(), Error> {
    if served.is_empty() {
        return Ok(());
    }
    super::endpoint::round_trip(nats, Duration::from_secs(5)).await;
    let any_refused = futures_util::future::select_all(
        served
            .iter()
            .map(|subject| Box::pin(denials.refused_for("subscribe", subject))),
    );
    match tokio::time::timeout(Duration::from_millis(100), any_refused).await {
        Ok((denied, ..)) => Err(denied),
        Err(_) => Ok(()),
    }
}
