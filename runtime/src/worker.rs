//! The serving side: a [`Worker`] registers one ADR-32 endpoint per
//! microservice linked into the binary and answers calls.
//!
//! Each request runs in its own task, at most `concurrency` at a time; a
//! panicking handler is answered with code 500 and the worker keeps serving;
//! sync functions run on the blocking pool.

use crate::micro;
use crate::settings::Settings;
use crate::spec::{registrations, Registration};
use crate::wire::codec::Codec;
use crate::wire::reply::{self, error_reply, mark_spilled, name_owner, ApplicationErrorBody};
use crate::wire::request::{self, CallMeta};
use crate::wire::{record, subjects};
use crate::{Client, Error, ErrorKind, FnSpec};
use async_nats::jetstream::kv;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

pub use crate::settings::{DEFAULT_CONCURRENCY, MAX_CONCURRENCY};

/// Calls a draining endpoint may still be sent, beyond those it has taken:
/// more than can be in flight between the server and the endpoint loop.
const DRAIN_HEADROOM: u64 = 1024;

/// How long a spilled result waits for its caller to read it.
const SPILLED_RESULT_TTL: Duration = Duration::from_secs(300);

/// How long a draining endpoint waits without a call before it leaves.
const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// The future a generated handler returns.
#[doc(hidden)]
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Bytes, Fault>> + Send>>;

/// A call as a handler sees it: the payload, its codec and the function.
#[doc(hidden)]
pub struct Incoming {
    codec: Codec,
    payload: Bytes,
    spec: &'static FnSpec,
    /// The call's deadline (unix ms, 0 none), inherited by calls it makes.
    deadline_ms: u64,
    /// The transaction of a stateful call, owned by this instance.
    txn: Option<Arc<crate::txn::Slot>>,
}

impl Incoming {
    /// Decodes the arguments; failure is a 400 naming the function.
    pub fn decode<A: DeserializeOwned>(&self) -> Result<A, Fault> {
        self.codec.decode_args(&self.payload).map_err(|e| {
            Fault::new(
                ErrorKind::BadRequest,
                format!(
                    "cannot decode the arguments of `{}.{}` ({}) as {:?}: {e}",
                    self.spec.service, self.spec.name, self.spec.signature, self.codec
                ),
            )
        })
    }

    /// The transaction's state of type `S` (see [`crate::State`]), locked
    /// for this call.
    pub async fn state<S: Default + Send + 'static>(&self) -> Result<crate::State<S>, Fault> {
        match &self.txn {
            Some(slot) => Ok(slot.state::<S>().await),
            None => Err(crate::txn::outside(self.spec).into()),
        }
    }

    /// Encodes a successful return value.
    pub fn reply<T: Serialize>(&self, value: &T) -> Result<Bytes, Fault> {
        self.codec.encode(value).map_err(|e| {
            Fault::new(
                ErrorKind::Codec,
                format!(
                    "`{}.{}` returned a value that cannot be encoded: {e}",
                    self.spec.service, self.spec.name
                ),
            )
        })
    }

    /// Encodes the function's own error as a 422 reply.
    pub fn application_error<E: Serialize>(
        &self,
        error: &E,
        message: String,
    ) -> Result<Bytes, Fault> {
        let body = ApplicationErrorBody {
            kind: ErrorKind::Application.as_str().to_owned(),
            message,
            error,
        };
        let encoded = self.reply(&body)?;
        Err(Fault {
            kind: ErrorKind::Application,
            message: body.message,
            body: Some(encoded),
        })
    }

    /// Runs a sync function on the blocking pool, off the async threads.
    pub async fn blocking<T, F>(&self, f: F) -> Result<T, Fault>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let deadline_ms = self.deadline_ms;
        tokio::task::spawn_blocking(move || crate::context::scope_blocking(deadline_ms, f))
            .await
            .map_err(|e| {
                let message = if e.is_panic() {
                    panic_message(e.into_panic().as_ref())
                } else {
                    "the blocking task was cancelled".to_owned()
                };
                Fault::panicked(self.spec, &message)
            })
    }
}

/// A failed call as the worker answers it: status, message and, for
/// application errors, the already-encoded body.
#[doc(hidden)]
#[derive(Debug)]
pub struct Fault {
    kind: ErrorKind,
    message: String,
    body: Option<Bytes>,
}

impl Fault {
    pub(crate) fn new(kind: ErrorKind, message: String) -> Fault {
        Fault {
            kind,
            message,
            body: None,
        }
    }

    fn panicked(spec: &FnSpec, message: &str) -> Fault {
        Fault::new(
            ErrorKind::Panicked,
            format!(
                "`{}.{}` panicked: {message}; the worker keeps serving",
                spec.service, spec.name
            ),
        )
    }
}

impl Fault {
    /// The kind of failure.
    pub(crate) fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// What went wrong.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// The wire form of this failure: status code, ADR-32 headers and the
    /// `{kind, message}` body (or the application error's body).
    pub(crate) fn answer(&self, codec: Codec) -> (u16, HeaderMap, Bytes) {
        error_reply(self.kind, &self.message, self.body.as_ref(), codec)
    }
}

impl From<Error> for Fault {
    fn from(error: Error) -> Self {
        Fault::new(error.kind(), error.message().to_owned())
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}

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
        let jetstream = match js.query_account().await {
            Ok(_) => true,
            Err(e) => {
                eprintln!("wharf: JetStream is not available ({e}); this worker serves plain calls only, not durable ones");
                false
            }
        };
        let results = if jetstream {
            crate::durable::dead_letters(&js, &prefix).await?;
            Some(crate::durable::results_bucket(&js).await?)
        } else {
            None
        };
        let owned = match (by_service.values().flatten().any(|r| r.spec.stateful), jetstream) {
            (false, _) => None,
            (true, true) => Some(crate::txn::Owned::new(js.clone(), &instance, &prefix).await?),
            (true, false) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "this binary serves stateful functions, whose transactions are leased in JetStream KV: start nats-server with JetStream (-js)",
                ))
            }
        };
        let shared = Arc::new(Shared {
            nats: nats.clone(),
            permits: Arc::new(Semaphore::new(self.concurrency)),
            concurrency: self.concurrency,
            backlog: AtomicUsize::new(0),
            max_backlog: self.backlog.unwrap_or(self.concurrency),
            identity,
            running: Mutex::new(HashMap::new()),
            results,
            prefix: prefix.clone(),
            owned: owned.clone(),
            client: self.client.clone(),
            spill_at: crate::client::spill_limit(&nats),
        });
        let (stop, stopped) = watch::channel(false);
        // Stateful endpoints' own subjects stop later, once their
        // transactions have ended (quiesce).
        let (stop_direct, stopped_direct) = watch::channel(false);
        let mut discovery = Vec::new();
        let mut probes = Vec::new();
        let mut tasks = JoinSet::new();
        let mut all_stats = Vec::new();
        let mut services = Vec::new();
        for (service_name, regs) in by_service {
            let stream = if jetstream {
                Some(crate::durable::calls_stream(&js, &prefix, service_name).await?)
            } else {
                None
            };
            // The version of the crate that defines the service's functions.
            let version = regs.first().map_or("0.0.0", |r| r.spec.version).to_owned();
            let mut endpoints = Vec::new();
            for registration in regs {
                let spec = registration.spec;
                let subject = spec.subject(self.client.prefix());
                let subscriber = nats
                    .queue_subscribe(subject.clone(), subjects::QUEUE_GROUP.into())
                    .await
                    .map_err(|e| crate::micro::subscribe_failed(&subject, e))?;
                let stats = Arc::new(micro::EndpointStats::default());
                all_stats.push(stats.clone());
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
                });
                if let Some(stream) = &stream {
                    let consumer = crate::durable::consumer(stream, &prefix, spec).await?;
                    tasks.spawn(crate::durable::serve(
                        endpoint.clone(),
                        consumer,
                        js.clone(),
                        stopped.clone(),
                    ));
                }
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
                        tasks.spawn(endpoint.clone().serve(direct, stopped_direct.clone(), true));
                    }
                }
                tasks.spawn(endpoint.serve(subscriber, stopped.clone(), false));
            }
            probes.push(Discovery(
                answer_probes(&nats, &prefix, service_name, shared.clone()).await?,
            ));
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
        })?;
        Ok(RunningWorker {
            nats,
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

pub(crate) struct Shared {
    pub(crate) nats: async_nats::Client,
    pub(crate) permits: Arc<Semaphore>,
    concurrency: usize,
    /// Calls taken but waiting for a permit.
    backlog: AtomicUsize,
    /// The most calls that may wait; past it a call is answered 503.
    max_backlog: usize,
    /// `Wharf-Instance` value: `<instance id> <pid> <host>`.
    identity: String,
    /// Idempotent calls in this worker, by call id; `true` once a caller
    /// has probed for it (its result is then kept for a retry).
    running: Mutex<HashMap<Bytes, bool>>,
    /// `wharf_results`, when the server has JetStream.
    pub(crate) results: Option<kv::Store>,
    /// Subject prefix.
    pub(crate) prefix: String,
    /// The transactions this instance owns, when it serves stateful
    /// functions.
    owned: Option<Arc<crate::txn::Owned>>,
    /// The client, for spilled arguments and results.
    client: Client,
    /// Results larger than this are spilled.
    spill_at: usize,
}

impl Shared {
    fn in_flight(&self) -> usize {
        self.concurrency - self.permits.available_permits()
    }

    fn backlog(&self) -> usize {
        self.backlog.load(Ordering::Relaxed)
    }
}

/// A call's place among the calls a worker runs at once.
enum Admission {
    /// It holds a permit and runs now.
    Running(tokio::sync::OwnedSemaphorePermit),
    /// It waits in the backlog (already counted there) for a permit.
    Queued,
}

impl Admission {
    /// The permit the call runs under; `None` once the worker closed.
    async fn run(self, shared: &Shared) -> Option<tokio::sync::OwnedSemaphorePermit> {
        match self {
            Admission::Running(permit) => Some(permit),
            Admission::Queued => {
                // Boxed: only a queued call's task carries the wait.
                let permit = Box::pin(shared.permits.clone().acquire_owned()).await;
                shared.backlog.fetch_sub(1, Ordering::Relaxed);
                permit.ok()
            }
        }
    }

    /// Gives up the call's place without running it.
    fn leave(self, shared: &Shared) {
        if let Admission::Queued = self {
            shared.backlog.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One function served by this worker.
pub(crate) struct Endpoint {
    pub(crate) registration: &'static Registration,
    stats: Arc<micro::EndpointStats>,
    pub(crate) shared: Arc<Shared>,
}

impl Endpoint {
    /// Takes calls from `subscriber` until `stop` turns true, then
    /// unsubscribes and still runs every call already delivered.
    /// `direct`: the subscription is this instance's own subject for the
    /// transactions it owns, not the queue group.
    async fn serve(
        self: Arc<Self>,
        mut subscriber: async_nats::Subscriber,
        mut stop: watch::Receiver<bool>,
        direct: bool,
    ) {
        let endpoint = self;
        let mut stopping = false;
        // Messages taken from the subscription, for a lossless leave (below).
        let mut received: u64 = 0;
        // Made once, not per message: this loop is the hot path.
        let stop_signal = stop.changed();
        tokio::pin!(stop_signal);
        loop {
            let message = if stopping {
                // Under load the server's count reaches the limit and the
                // stream ends; with no load, a quiet spell means nothing is
                // in flight, and the subscription is dropped outright.
                match tokio::time::timeout(DRAIN_QUIET, subscriber.next()).await {
                    Ok(message) => message,
                    Err(_) => {
                        let _ = subscriber.unsubscribe().await;
                        return;
                    }
                }
            } else {
                tokio::select! {
                    // Stop first: under load a message is always ready, and
                    // intake must still end when a drain begins.
                    biased;
                    _ = &mut stop_signal => {
                        stopping = true;
                        // Leave the queue group without losing a call. A
                        // plain UNSUB (or async-nats's drain) drops the
                        // subscription at once, and calls the server routed
                        // here before it saw the UNSUB are thrown away. An
                        // UNSUB with a message limit makes server and client
                        // stop at the same count, so every call the server
                        // sends still arrives and is served.
                        let _ = subscriber.unsubscribe_after(received + DRAIN_HEADROOM).await;
                        continue;
                    }
                    message = subscriber.next() => message,
                }
            };
            let Some(message) = message else { return };
            received += 1;
            let shared = &endpoint.shared;
            let admission = match shared.permits.clone().try_acquire_owned() {
                Ok(permit) => Admission::Running(permit),
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    // At the limit: wait in a bounded local queue (the
                    // semaphore is fair, so in arrival order), and past its
                    // bound refuse with 503 so the caller tries elsewhere.
                    if shared.backlog.fetch_add(1, Ordering::Relaxed) >= shared.max_backlog {
                        shared.backlog.fetch_sub(1, Ordering::Relaxed);
                        tokio::spawn(endpoint.clone().refuse(message));
                        continue;
                    }
                    Admission::Queued
                }
                Err(tokio::sync::TryAcquireError::Closed) => return,
            };
            // The call's future is boxed and spawned with no wrapper around
            // it (the permit rides inside): tokio moves a task several
            // times per call, and a box is all it then moves.
            tokio::spawn(endpoint.handle(message, direct, admission));
        }
    }

    /// Answers a call this worker has no room for with 503.
    async fn refuse(self: Arc<Self>, message: async_nats::Message) {
        let Some(reply) = message.reply.clone() else {
            return;
        };
        let codec = read_request(&message).map_or_else(|(codec, _)| codec, |(codec, ..)| codec);
        let spec = self.registration.spec;
        let fault = Fault::new(
            ErrorKind::Unavailable,
            format!(
                "the worker is overloaded: {} calls running and {} waiting for `{}.{}`; retry, or add workers",
                self.shared.concurrency, self.shared.max_backlog, spec.service, spec.name
            ),
        );
        self.respond_fault(reply, codec, fault, SystemTime::now())
            .await;
    }

    /// Reads the request now and returns the rest of the call as a boxed
    /// future, spawned as it is. The common call (not spilled, not
    /// idempotent, signature and deadline checked here) gets a future of its
    /// own that holds only what it needs: every call allocates and moves
    /// its future, and that one stays small enough for the allocator's
    /// fast path.
    fn handle(
        self: &Arc<Self>,
        message: async_nats::Message,
        direct: bool,
        admission: Admission,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        // One clock read serves the deadline check and the processing time.
        let started = SystemTime::now();
        let endpoint = self.clone();
        let spec = endpoint.registration.spec;
        let Some(reply) = message.reply.clone() else {
            // A publish, not a request: nobody waits for an answer.
            admission.leave(&endpoint.shared);
            return Box::pin(std::future::ready(()));
        };
        if spec.stateful {
            return Box::pin(async move {
                let Some(_permit) = admission.run(&endpoint.shared).await else {
                    return;
                };
                endpoint.run_stateful(reply, message, direct, started).await;
            });
        }
        let parts = read_request(&message);
        drop(message);
        let parts = match parts {
            Ok((codec, meta, args)) if meta.spill.is_none() && !spec.idempotent => {
                match admit(spec, &meta, started) {
                    Ok(()) => {
                        return Box::pin(
                            endpoint.run_plain(admission, reply, codec, meta, args, started),
                        )
                    }
                    Err(fault) => Err((codec, fault)),
                }
            }
            parts => parts,
        };
        if spec.idempotent {
            if let Ok((_, meta, _)) = &parts {
                endpoint.track(&meta.call_id);
            }
        }
        Box::pin(async move {
            let Some(_permit) = admission.run(&endpoint.shared).await else {
                return;
            };
            endpoint.run(reply, parts, started).await;
        })
    }

    /// The common call, admitted by [`Endpoint::handle`]: runs the function
    /// and publishes a plain reply here; any other answer (an error, a
    /// spill, headers) goes through [`Endpoint::respond`].
    async fn run_plain(
        self: Arc<Self>,
        admission: Admission,
        reply: async_nats::Subject,
        codec: Codec,
        meta: CallMeta,
        args: Bytes,
        started: SystemTime,
    ) {
        let Some(_permit) = admission.run(&self.shared).await else {
            return;
        };
        let deadline_ms = meta.deadline_ms.unwrap_or(0);
        match self.call_handler(codec, deadline_ms, args, None).await {
            Ok(body)
                if codec == Codec::Postcard
                    && !meta.report_instance
                    && body.len() <= self.shared.spill_at =>
            {
                // A failed publish means the connection is gone; the
                // caller times out and nothing here can do better.
                let _ = self.shared.nats.publish(reply, body).await;
                self.record(started, None);
            }
            outcome => {
                crate::out_of_line(|| self.respond(reply, codec, &meta, outcome, started)).await
            }
        }
    }

    /// A call of a stateful function: runs here when this instance owns
    /// (or now claims) its transaction, goes to the owner otherwise.
    async fn run_stateful(
        &self,
        reply: async_nats::Subject,
        message: async_nats::Message,
        direct: bool,
        started: SystemTime,
    ) {
        let spec = self.registration.spec;
        let (codec, mut meta, mut args) = match read_request(&message) {
            Ok(parts) => parts,
            Err((codec, fault)) => {
                return crate::out_of_line(|| self.respond_fault(reply, codec, fault, started))
                    .await
            }
        };
        let owned = self
            .shared
            .owned
            .as_ref()
            .expect("a worker serving stateful functions owns transactions");
        let txn = match std::str::from_utf8(&meta.txn) {
            Ok("") => None,
            Ok(txn) => Some(txn),
            Err(_) => Some("<not UTF-8>"),
        };
        // A transaction owned here is the common case and needs no await;
        // claims, forwards and faults are boxed, so their large futures do
        // not make every call's future large.
        let admitted = match txn.and_then(|id| owned.local(id)) {
            Some(in_use) => Ok(crate::txn::Admitted::Here(in_use)),
            None => crate::out_of_line(|| owned.admit(spec, txn)).await,
        };
        let in_use = match admitted {
            Ok(crate::txn::Admitted::Here(in_use)) if meta.spill.is_some() => {
                let spilled = meta.spill.take().expect("checked");
                match crate::out_of_line(|| self.unspill(&spilled)).await {
                    Ok(bytes) => args = bytes,
                    Err(fault) => {
                        return crate::out_of_line(|| {
                            self.respond_fault(reply, codec, fault, started)
                        })
                        .await
                    }
                }
                in_use
            }
            Ok(crate::txn::Admitted::Here(in_use)) => in_use,
            Ok(crate::txn::Admitted::Forward(owner)) => {
                return crate::out_of_line(|| {
                    self.forward(reply, message, &owner, codec, &meta, started)
                })
                .await
            }
            Err(error) => {
                return crate::out_of_line(|| {
                    self.respond_fault(reply, codec, error.into(), started)
                })
                .await
            }
        };
        drop(message);
        let outcome = self
            .execute(codec, &meta, args, started, Some(in_use.0.clone()))
            .await;
        drop(in_use);
        if let Ok(body) = &outcome {
            if body.len() > self.shared.spill_at {
                let body = body.clone();
                let owner = (!direct).then_some(owned.instance.as_str());
                return crate::out_of_line(|| {
                    self.respond_spilled(reply, codec, &meta, body, started, owner)
                })
                .await;
            }
        }
        // Through the queue group the caller does not know the owner yet:
        // name it, so the transaction's next calls come straight here.
        let (code, mut headers, body) = match outcome {
            Ok(body) => (None, self.reply_headers(codec, &meta), body),
            Err(fault) => {
                let (code, headers, body) = fault.answer(codec);
                (Some((code, fault)), headers, body)
            }
        };
        if !direct {
            name_owner(&mut headers, &owned.instance);
        }
        let nats = &self.shared.nats;
        // An empty header block still costs both sides a parse.
        let _ = if headers.is_empty() {
            nats.publish(reply, body).await
        } else {
            nats.publish_with_headers(reply, headers, body).await
        };
        match &code {
            Some((code, fault)) => self.record(started, Some((*code, fault.message()))),
            None => self.record(started, None),
        }
    }

    /// Passes a call of a transaction owned by another instance to that
    /// instance and relays its answer; when the owner is gone the call
    /// fails with 410 rather than run here on empty state.
    async fn forward(
        &self,
        reply: async_nats::Subject,
        message: async_nats::Message,
        owner: &str,
        codec: Codec,
        meta: &CallMeta,
        started: SystemTime,
    ) {
        let spec = self.registration.spec;
        let subject = subjects::instance_call(&self.shared.prefix, owner, spec.service, spec.name);
        let timeout = meta
            .deadline_ms
            .map(|deadline| {
                Duration::from_millis(deadline.saturating_sub(crate::context::unix_ms()))
            })
            .unwrap_or_else(|| spec.timeout());
        let txn = String::from_utf8_lossy(&meta.txn).into_owned();
        let mut request = async_nats::Request::new()
            .payload(message.payload)
            .timeout(Some(timeout));
        if let Some(headers) = message.headers {
            request = request.headers(headers);
        }
        match self.shared.nats.send_request(subject, request).await {
            Ok(answer) => {
                let mut headers = answer.headers.unwrap_or_default();
                name_owner(&mut headers, owner);
                let _ = self
                    .shared
                    .nats
                    .publish_with_headers(reply, headers, answer.payload)
                    .await;
            }
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                let error = crate::txn::lost(&txn, owner);
                self.respond_fault(reply, codec, error.into(), started)
                    .await;
            }
            // Timed out: the caller's own deadline has passed too.
            Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {}
            Err(e) => {
                let fault = Fault::new(
                    ErrorKind::Unavailable,
                    format!("cannot reach instance `{owner}`, which owns transaction `{txn}`: {e}; retry"),
                );
                self.respond_fault(reply, codec, fault, started).await;
            }
        }
    }

    /// Registers an idempotent call as running here, for probes.
    fn track(&self, call_id: &Bytes) {
        if !call_id.is_empty() {
            self.shared
                .running
                .lock()
                .unwrap()
                .insert(call_id.clone(), false);
        }
    }

    /// Unregisters a call; true when a caller probed for it meanwhile.
    fn untrack(&self, call_id: &Bytes) -> bool {
        !call_id.is_empty()
            && self
                .shared
                .running
                .lock()
                .unwrap()
                .remove(call_id)
                .unwrap_or(false)
    }

    async fn run(
        &self,
        reply: async_nats::Subject,
        parts: Result<(Codec, CallMeta, Bytes), (Codec, Fault)>,
        started: SystemTime,
    ) {
        let spec = self.registration.spec;
        let (codec, mut meta, mut args) = match parts {
            Ok(parts) => parts,
            Err((codec, fault)) => {
                return crate::out_of_line(|| self.respond_fault(reply, codec, fault, started))
                    .await
            }
        };
        if let Some(spilled) = meta.spill.take() {
            match crate::out_of_line(|| self.unspill(&spilled)).await {
                Ok(bytes) => args = bytes,
                Err(fault) => {
                    // Not run: a probe must not find it running.
                    self.untrack(&meta.call_id);
                    return crate::out_of_line(|| self.respond_fault(reply, codec, fault, started))
                        .await;
                }
            }
        }
        if spec.idempotent {
            // Out of line: only idempotent functions pay for this larger future.
            return crate::out_of_line(|| self.run_idempotent(reply, codec, meta, args, started))
                .await;
        }
        let outcome = self.execute(codec, &meta, args, started, None).await;
        self.respond(reply, codec, &meta, outcome, started).await;
    }

    /// An idempotent call: a retry of a call whose result was kept gets
    /// that result; a result is kept when the call was retried or probed,
    /// the two ways a caller shows it may ask again.
    async fn run_idempotent(
        &self,
        reply: async_nats::Subject,
        codec: Codec,
        meta: CallMeta,
        args: Bytes,
        started: SystemTime,
    ) {
        let results = self
            .shared
            .results
            .as_ref()
            .filter(|_| subjects::valid_id(&meta.call_id));
        let key = results.map(|_| String::from_utf8_lossy(&meta.call_id).into_owned());
        if let (Some(results), Some(key), true) = (results, &key, meta.attempt > 1) {
            if let Ok(Some(record)) = results.get(key.as_str()).await {
                self.untrack(&meta.call_id);
                if let Ok((message, _)) = record::decode(record) {
                    let headers = message.headers.unwrap_or_default();
                    let _ = self
                        .shared
                        .nats
                        .publish_with_headers(reply, headers, message.payload)
                        .await;
                    return;
                }
            }
        }
        let outcome = self.execute(codec, &meta, args, started, None).await;
        let probed = self.untrack(&meta.call_id);
        if let (Some(key), Ok(body)) = (&key, &outcome) {
            if probed || meta.attempt > 1 {
                let record = record::encode(record::OK, codec, body);
                // Best effort: losing the record costs a re-run, which an
                // idempotent function allows.
                let _ = self
                    .shared
                    .nats
                    .publish(subjects::kv_key(subjects::RESULTS_BUCKET, key), record)
                    .await;
            }
        }
        self.respond(reply, codec, &meta, outcome, started).await;
    }

    /// Runs the function: checks signature and deadline, decodes, calls,
    /// encodes; a panic becomes a 500.
    pub(crate) async fn execute(
        &self,
        codec: Codec,
        meta: &CallMeta,
        args: Bytes,
        started: SystemTime,
        txn: Option<Arc<crate::txn::Slot>>,
    ) -> Result<Bytes, Fault> {
        admit(self.registration.spec, meta, started)?;
        self.call_handler(codec, meta.deadline_ms.unwrap_or(0), args, txn)
            .await
    }

    /// Decodes, calls and encodes, within the call's deadline; a panic
    /// becomes a 500.
    async fn call_handler(
        &self,
        codec: Codec,
        deadline_ms: u64,
        args: Bytes,
        txn: Option<Arc<crate::txn::Slot>>,
    ) -> Result<Bytes, Fault> {
        let spec = self.registration.spec;
        let incoming = Incoming {
            codec,
            payload: args,
            spec,
            deadline_ms,
            txn,
        };
        let handler = AssertUnwindSafe((self.registration.handler)(incoming)).catch_unwind();
        crate::context::scope(deadline_ms, handler)
            .await
            .unwrap_or_else(|panic| Err(Fault::panicked(spec, &panic_message(panic.as_ref()))))
    }

    /// The arguments of a spilled call, from the object store.
    async fn unspill(&self, (uri, digest): &(String, String)) -> Result<Bytes, Fault> {
        crate::objects::fetch_spilled(&self.shared.client, uri, digest)
            .await
            .map_err(|e| {
                let spec = self.registration.spec;
                Fault::new(
                    e.kind(),
                    format!(
                        "the arguments of `{}.{}` were spilled to `{uri}`, which cannot be read: {}",
                        spec.service,
                        spec.name,
                        e.message()
                    ),
                )
            })
    }

    /// Replies with a value too large for one message: stored as an
    /// object, named in `Wharf-Spill`; the caller deletes it once read.
    async fn respond_spilled(
        &self,
        reply: async_nats::Subject,
        codec: Codec,
        meta: &CallMeta,
        body: Bytes,
        started: SystemTime,
        owner: Option<&str>,
    ) {
        let stored = match crate::objects::Objects::new(&self.shared.client)
            .and_then(|objects| objects.store("jetstream"))
        {
            Ok(objects) => objects.ttl(SPILLED_RESULT_TTL).put_bytes(body).await,
            Err(error) => Err(error),
        };
        match stored {
            Ok(stored) => {
                let mut headers = self.reply_headers(codec, meta);
                if let Some(owner) = owner {
                    name_owner(&mut headers, owner);
                }
                mark_spilled(&mut headers, &stored.uri, &stored.digest);
                let _ = self
                    .shared
                    .nats
                    .publish_with_headers(reply, headers, Bytes::new())
                    .await;
                self.record(started, None);
            }
            Err(error) => {
                self.respond_fault(reply, codec, error.into(), started)
                    .await
            }
        }
    }

    /// Publishes a call's outcome to `reply`.
    async fn respond(
        &self,
        reply: async_nats::Subject,
        codec: Codec,
        meta: &CallMeta,
        outcome: Result<Bytes, Fault>,
        started: SystemTime,
    ) {
        match outcome {
            Ok(body) if body.len() > self.shared.spill_at => {
                crate::out_of_line(|| self.respond_spilled(reply, codec, meta, body, started, None))
                    .await
            }
            Ok(body) => {
                let nats = &self.shared.nats;
                // A failed publish means the connection is gone; the caller
                // times out and nothing here can do better.
                let _ = if codec == Codec::Postcard && !meta.report_instance {
                    nats.publish(reply, body).await
                } else {
                    // Out of line: the rarer path should not enlarge every
                    // call's task.
                    crate::out_of_line(|| {
                        nats.publish_with_headers(reply, self.reply_headers(codec, meta), body)
                    })
                    .await
                };
                self.stats
                    .record(started.elapsed().unwrap_or_default(), None);
            }
            Err(fault) => {
                crate::out_of_line(|| self.respond_fault(reply, codec, fault, started)).await
            }
        }
    }

    /// Headers of a successful reply that needs any: its codec when not
    /// postcard, the worker's identity when asked for.
    pub(crate) fn reply_headers(&self, codec: Codec, meta: &CallMeta) -> HeaderMap {
        let identity = meta
            .report_instance
            .then_some(self.shared.identity.as_str());
        reply::success_headers(codec, identity)
    }

    /// Counts a finished call in the endpoint's stats.
    pub(crate) fn record(&self, started: SystemTime, failure: Option<(u16, &str)>) {
        self.stats
            .record(started.elapsed().unwrap_or_default(), failure);
    }

    async fn respond_fault(
        &self,
        reply: async_nats::Subject,
        codec: Codec,
        fault: Fault,
        started: SystemTime,
    ) {
        let (code, headers, body) = fault.answer(codec);
        let _ = self
            .shared
            .nats
            .publish_with_headers(reply, headers, body)
            .await;
        self.record(started, Some((code, fault.message.as_str())));
    }
}

/// Reads a request; one that cannot be read is answered as a fault.
pub(crate) fn read_request(
    message: &async_nats::Message,
) -> Result<(Codec, CallMeta, Bytes), (Codec, Fault)> {
    request::read(message).map_err(|(codec, error)| (codec, Fault::from(error)))
}

/// Checks what must hold before a call runs: matching signature, deadline
/// not yet passed.
fn admit(spec: &FnSpec, meta: &CallMeta, now: SystemTime) -> Result<(), Fault> {
    if let Some(sig) = meta.sig {
        if sig != spec.sig {
            return Err(Fault::new(
                ErrorKind::SignatureMismatch,
                format!(
                    "signature mismatch on `{}.{}`: the caller was built against signature {sig:016x}, this worker serves {:016x} ({}); rebuild caller and worker from the same source",
                    spec.service, spec.name, spec.sig, spec.signature
                ),
            ));
        }
    }
    if let Some(deadline) = meta.deadline_ms {
        let now = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        if now > deadline {
            return Err(Fault::new(
                ErrorKind::DeadlineExceeded,
                format!(
                    "the deadline of this call to `{}.{}` passed {} ms before it could run",
                    spec.service,
                    spec.name,
                    now - deadline
                ),
            ));
        }
    }
    Ok(())
}

/// Answers call-status probes for `service` (`<prefix>._status.<service>`,
/// payload a call id): "running" when this worker runs that idempotent
/// call, silence otherwise. A probed call's result is kept for a retry.
async fn answer_probes(
    nats: &async_nats::Client,
    prefix: &str,
    service: &str,
    shared: Arc<Shared>,
) -> Result<JoinHandle<()>, Error> {
    let subject = subjects::call_status(prefix, service);
    let mut probes = nats
        .subscribe(subject.clone())
        .await
        .map_err(|e| crate::micro::subscribe_failed(&subject, e))?;
    let nats = nats.clone();
    Ok(tokio::spawn(async move {
        while let Some(probe) = probes.next().await {
            let Some(reply) = probe.reply else { continue };
            let running = match shared.running.lock().unwrap().get_mut(&probe.payload) {
                Some(probed) => {
                    *probed = true;
                    true
                }
                None => false,
            };
            if running {
                let _ = nats.publish(reply, Bytes::from_static(b"running")).await;
            }
        }
    }))
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
                _ = owned.quiesce(crate::txn::QUIESCE_LIMIT) => {}
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

/// This machine's host name, for instance identities.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    static SPEC: FnSpec = FnSpec {
        service: "math",
        name: "add",
        sig: 0xaa,
        signature: "add(a:i64,b:i64)->i64",
        args: &[],
        returns: "i64",
        error: None,
        timeout_ms: 1000,
        idempotent: false,
        durable: false,
        stateful: false,
        retry: crate::RetryPolicy::DEFAULT,
        blocking: false,
        version: "0.1.0",
        path: "math::add",
        subject: crate::spec::SubjectCache::new(),
    };

    fn meta(sig: Option<u64>, deadline_ms: Option<u64>) -> CallMeta {
        CallMeta {
            sig,
            deadline_ms,
            ..CallMeta::default()
        }
    }

    #[test]
    fn admit_checks_signature_and_deadline() {
        assert!(admit(&SPEC, &meta(Some(0xaa), None), SystemTime::now()).is_ok());
        let mismatch = admit(&SPEC, &meta(Some(0xbb), None), SystemTime::now()).unwrap_err();
        assert_eq!(mismatch.kind, ErrorKind::SignatureMismatch);
        assert!(mismatch.message.contains("00000000000000bb"));
        assert!(mismatch.message.contains("00000000000000aa"));
        let late = admit(&SPEC, &meta(None, Some(1000)), SystemTime::now()).unwrap_err();
        assert_eq!(late.kind, ErrorKind::DeadlineExceeded);
        let far = (SystemTime::now() + Duration::from_secs(60))
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(admit(&SPEC, &meta(None, Some(far)), SystemTime::now()).is_ok());
    }

    #[test]
    fn panic_messages() {
        assert_eq!(panic_message(&"boom"), "boom");
        assert_eq!(panic_message(&String::from("bang")), "bang");
        assert_eq!(panic_message(&7u8), "a non-string panic payload");
    }
}
