//! The serving side: a [`Worker`] registers one ADR-32 endpoint per
//! microservice linked into the binary and answers calls.
//!
//! Each request runs in its own task, at most `concurrency` at a time; a
//! panicking handler is answered with code 500 and the worker keeps serving;
//! sync functions run on the blocking pool.

use crate::codec::{ApplicationErrorBody, Codec, Envelope, ErrorBody, FLAG_REPORT_INSTANCE};
use crate::micro;
use crate::spec::{registrations, Registration};
use crate::{headers, Client, Error, ErrorKind, FnSpec};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// Calls one worker runs at once unless `WHARF_CONCURRENCY` or
/// [`Worker::concurrency`] says otherwise.
pub const DEFAULT_CONCURRENCY: usize = 1024;

/// The most calls one worker runs at once (permits are counted in `u32`).
pub const MAX_CONCURRENCY: usize = 1 << 20;

/// The future a generated handler returns.
#[doc(hidden)]
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Bytes, Fault>> + Send>>;

/// A call as a handler sees it: the payload, its codec and the function.
#[doc(hidden)]
pub struct Incoming {
    codec: Codec,
    payload: Bytes,
    spec: &'static FnSpec,
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
        tokio::task::spawn_blocking(f).await.map_err(|e| {
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
    fn new(kind: ErrorKind, message: String) -> Fault {
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
}

impl Worker {
    /// A worker serving through `client`.
    pub fn new(client: &Client) -> Worker {
        let concurrency = std::env::var("WHARF_CONCURRENCY")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_CONCURRENCY)
            .min(MAX_CONCURRENCY);
        Worker {
            client: client.clone(),
            concurrency,
        }
    }

    /// How many calls run at once; more wait in the subscription's buffer.
    pub fn concurrency(mut self, concurrency: usize) -> Worker {
        self.concurrency = concurrency.clamp(1, MAX_CONCURRENCY);
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

        let instance = nuid::next().as_str().to_owned();
        let identity = format!("{instance} {} {}", std::process::id(), hostname());
        let nats = self.client.nats().clone();
        let shared = Arc::new(Shared {
            nats: nats.clone(),
            permits: Arc::new(Semaphore::new(self.concurrency)),
            concurrency: self.concurrency,
            identity,
        });
        let (stop, stopped) = watch::channel(false);
        let mut discovery = Vec::new();
        let mut tasks = JoinSet::new();
        for (service_name, regs) in by_service {
            // The version of the crate that defines the service's functions.
            let version = regs.first().map_or("0.0.0", |r| r.spec.version).to_owned();
            let mut endpoints = Vec::new();
            for registration in regs {
                let spec = registration.spec;
                let subject = spec.subject(self.client.prefix());
                let subscriber = nats
                    .queue_subscribe(subject.clone(), micro::QUEUE_GROUP.into())
                    .await
                    .map_err(|e| {
                        Error::new(
                            ErrorKind::Connection,
                            format!("cannot subscribe `{subject}`: {e}"),
                        )
                    })?;
                let stats = Arc::new(micro::EndpointStats::default());
                endpoints.push(micro::EndpointInfo {
                    name: spec.name.to_owned(),
                    subject: subject.to_string(),
                    metadata: endpoint_metadata(spec),
                    stats: stats.clone(),
                });
                let endpoint = Endpoint {
                    registration,
                    stats,
                    shared: shared.clone(),
                };
                tasks.spawn(endpoint.serve(subscriber, stopped.clone()));
            }
            let info = micro::ServiceInfo {
                name: service_name.to_owned(),
                id: nuid::next().as_str().to_owned(),
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
                    "backlog": 0,
                    "concurrency": stats_shared.concurrency,
                })
            };
            discovery.push(Discovery(
                micro::answer_discovery(&nats, Arc::new(info), data).await?,
            ));
        }
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
            discovery,
            tasks,
            shared,
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

struct Shared {
    nats: async_nats::Client,
    permits: Arc<Semaphore>,
    concurrency: usize,
    /// `Wharf-Instance` value: `<instance id> <pid> <host>`.
    identity: String,
}

impl Shared {
    fn in_flight(&self) -> usize {
        self.concurrency - self.permits.available_permits()
    }
}

/// One function served by this worker.
struct Endpoint {
    registration: &'static Registration,
    stats: Arc<micro::EndpointStats>,
    shared: Arc<Shared>,
}

impl Endpoint {
    /// Takes calls from `subscriber` until `stop` turns true, then
    /// unsubscribes and still runs every call already delivered.
    async fn serve(self, mut subscriber: async_nats::Subscriber, mut stop: watch::Receiver<bool>) {
        let endpoint = Arc::new(self);
        let mut stopping = false;
        // Made once, not per message: this loop is the hot path.
        let stop_signal = stop.changed();
        tokio::pin!(stop_signal);
        loop {
            let message = if stopping {
                subscriber.next().await
            } else {
                tokio::select! {
                    // Stop first: under load a message is always ready, and
                    // intake must still end when a drain begins.
                    biased;
                    _ = &mut stop_signal => {
                        stopping = true;
                        let _ = subscriber.unsubscribe().await;
                        continue;
                    }
                    message = subscriber.next() => message,
                }
            };
            let Some(message) = message else { return };
            // At the limit the loop waits here, leaving further requests in
            // the subscription's buffer instead of starting unbounded work.
            // Below the limit a permit is taken without building a future.
            let permit = match endpoint.shared.permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    let Ok(permit) = endpoint.shared.permits.clone().acquire_owned().await else {
                        return;
                    };
                    permit
                }
                Err(tokio::sync::TryAcquireError::Closed) => return,
            };
            let call = endpoint.handle(message);
            tokio::spawn(async move {
                call.await;
                drop(permit);
            });
        }
    }

    /// Reads the request now and returns the rest of the call as a future
    /// that holds only what it needs (the message itself is not kept, which
    /// keeps each call's task small).
    fn handle(
        self: &Arc<Self>,
        message: async_nats::Message,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        // One clock read serves the deadline check and the processing time.
        let started = SystemTime::now();
        let reply = message.reply.clone();
        let parts = read_request(&message);
        drop(message);
        let endpoint = self.clone();
        async move {
            let Some(reply) = reply else {
                // A publish, not a request: nobody waits for an answer.
                return;
            };
            endpoint.run(reply, parts, started).await;
        }
    }

    async fn run(
        &self,
        reply: async_nats::Subject,
        parts: Result<(Codec, CallMeta, Bytes), (Codec, Fault)>,
        started: SystemTime,
    ) {
        let spec = self.registration.spec;
        let (codec, meta, args) = match parts {
            Ok(parts) => parts,
            Err((codec, fault)) => {
                return Box::pin(self.respond_fault(reply, codec, fault, started)).await
            }
        };
        if let Err(fault) = admit(spec, &meta, started) {
            return Box::pin(self.respond_fault(reply, codec, fault, started)).await;
        }
        let incoming = Incoming {
            codec,
            payload: args,
            spec,
        };
        let outcome = AssertUnwindSafe((self.registration.handler)(incoming))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Err(Fault::panicked(spec, &panic_message(panic.as_ref()))));
        match outcome {
            Ok(body) => {
                let nats = &self.shared.nats;
                // A failed publish means the connection is gone; the caller
                // times out and nothing here can do better.
                let _ = if codec == Codec::Postcard && !meta.report_instance {
                    nats.publish(reply, body).await
                } else {
                    let mut headers = HeaderMap::new();
                    if codec != Codec::Postcard {
                        headers.insert(headers::CONTENT_TYPE, codec.content_type());
                    }
                    if meta.report_instance {
                        headers.insert(headers::INSTANCE, self.shared.identity.as_str());
                    }
                    // Boxed: the rarer path should not enlarge every call's task.
                    Box::pin(nats.publish_with_headers(reply, headers, body)).await
                };
                self.stats
                    .record(started.elapsed().unwrap_or_default(), None);
            }
            Err(fault) => Box::pin(self.respond_fault(reply, codec, fault, started)).await,
        }
    }

    async fn respond_fault(
        &self,
        reply: async_nats::Subject,
        codec: Codec,
        fault: Fault,
        started: SystemTime,
    ) {
        let code = fault.kind.code().unwrap_or(500);
        let body = match fault.body {
            Some(body) => body,
            None => codec
                .encode(&ErrorBody {
                    kind: fault.kind.as_str().to_owned(),
                    message: fault.message.clone(),
                })
                .unwrap_or_default(),
        };
        let mut headers = HeaderMap::new();
        // ADR-32 status headers; a header value is one line.
        let status_line: String = fault
            .message
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        headers.insert(headers::SERVICE_ERROR, status_line.as_str());
        headers.insert(headers::SERVICE_ERROR_CODE, code.to_string());
        if codec != Codec::Postcard {
            headers.insert(headers::CONTENT_TYPE, codec.content_type());
        }
        let _ = self
            .shared
            .nats
            .publish_with_headers(reply, headers, body)
            .await;
        self.stats.record(
            started.elapsed().unwrap_or_default(),
            Some((code, status_line.as_str())),
        );
    }
}

/// What a request says about itself, from the envelope (postcard) or the
/// `Wharf-*` headers (JSON).
#[derive(Debug, Default, PartialEq)]
struct CallMeta {
    sig: Option<u64>,
    deadline_ms: Option<u64>,
    report_instance: bool,
}

/// Reads the codec, the call metadata and the argument bytes of a request.
fn read_request(message: &async_nats::Message) -> Result<(Codec, CallMeta, Bytes), (Codec, Fault)> {
    let headers = message.headers.as_ref();
    let header =
        |name: async_nats::HeaderName| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
    // An unknown codec cannot be answered in kind; JSON is what a human reads.
    let codec = Codec::from_content_type(header(headers::CONTENT_TYPE))
        .map_err(|e| (Codec::Json, Fault::from(e)))?;
    match codec {
        Codec::Postcard => {
            let (envelope, at) = Envelope::split(&message.payload)
                .map_err(|e| (codec, Fault::new(ErrorKind::BadRequest, e)))?;
            let meta = CallMeta {
                sig: (envelope.sig != 0).then_some(envelope.sig),
                deadline_ms: (envelope.deadline_ms != 0).then_some(envelope.deadline_ms),
                report_instance: envelope.flags & FLAG_REPORT_INSTANCE != 0,
            };
            Ok((codec, meta, message.payload.slice(at..)))
        }
        Codec::Json => {
            let bad = |what: &str, value: &str| {
                (
                    codec,
                    Fault::new(
                        ErrorKind::BadRequest,
                        format!("header {what}, got `{value}`"),
                    ),
                )
            };
            let sig = match header(headers::SIG) {
                Some(text) => Some(
                    u64::from_str_radix(text.trim(), 16)
                        .map_err(|_| bad("Wharf-Sig must be 16 hex digits", text))?,
                ),
                None => None,
            };
            let deadline_ms = match header(headers::DEADLINE) {
                Some(text) => Some(
                    text.trim()
                        .parse()
                        .map_err(|_| bad("Wharf-Deadline must be unix milliseconds", text))?,
                ),
                None => None,
            };
            let meta = CallMeta {
                sig,
                deadline_ms,
                report_instance: header(headers::REPORT) == Some("instance"),
            };
            Ok((codec, meta, message.payload.clone()))
        }
    }
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
    discovery: Vec<Discovery>,
    tasks: JoinSet<()>,
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

    /// Stops taking calls, lets the ones already received finish (at most
    /// `grace`), then returns.
    pub async fn drain(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        // Stop answering discovery: this instance is going away.
        self.discovery.clear();
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
        blocking: false,
        version: "0.1.0",
        path: "math::add",
        subject: crate::spec::SubjectCache::new(),
    };

    fn meta(sig: Option<u64>, deadline_ms: Option<u64>) -> CallMeta {
        CallMeta {
            sig,
            deadline_ms,
            report_instance: false,
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
