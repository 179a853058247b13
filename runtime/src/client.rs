//! The caller's side: a [`Client`] and the request path every generated stub
//! goes through.

use crate::durable::Pending;
use crate::settings::{redact, Settings};
use crate::wire::codec::Codec;
use crate::wire::reply::{
    self, mark_spilled, remote_failure, spilled, status_code, ApplicationErrorBody,
};
use crate::wire::request::{self, Outgoing, Prepared};
use crate::wire::subjects;
use crate::RetryPolicy;
use crate::{Error, ErrorKind, FnSpec};
use async_nats::{HeaderMap, Message, RequestErrorKind, Subject};
use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A connection to NATS through which microservices are called and served.
/// Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    nats: async_nats::Client,
    prefix: String,
    url: String,
    /// Set up on the first durable call.
    durable: tokio::sync::OnceCell<crate::durable::DurableClient>,
    /// `wharf_txn`, found on the first transaction.
    txns: tokio::sync::OnceCell<async_nats::jetstream::kv::Store>,
    /// The JetStream object buckets, found on the first object.
    objects: tokio::sync::OnceCell<crate::objects::JsStores>,
    /// Payloads larger than this are spilled to the object store; 0 until
    /// first needed.
    spill_at: std::sync::atomic::AtomicUsize,
}

impl Client {
    /// Connects to the NATS server at `url`, or to any of a cluster's
    /// servers given comma-separated (`nats://a:4222,nats://b:4222`). The
    /// subject prefix comes from `WHARF_PREFIX` (default `wharf`).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), wharf::Error> {
    /// let client = wharf::Client::connect("nats://127.0.0.1:4222").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Client, Error> {
        // Settings that do not validate fail here, before any call.
        Settings::get()?;
        let servers: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let nats = async_nats::ConnectOptions::new()
            .name("wharf")
            .connect(servers.as_slice())
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    format!("cannot connect to NATS at `{}`: {e}; start nats-server there, or unset NATS_URL to let wharf::init() start one", redact(url)),
                )
            })?;
        Ok(Client::from_nats(nats, url))
    }

    /// Wraps an existing async-nats connection (`url` is used in messages).
    pub fn from_nats(nats: async_nats::Client, url: impl Into<String>) -> Client {
        // `connect` has reported settings that do not validate.
        let prefix = Settings::get()
            .map(|s| s.prefix.clone())
            .unwrap_or_else(|_| subjects::DEFAULT_PREFIX.to_owned());
        Client {
            inner: Arc::new(Inner {
                nats,
                prefix,
                url: url.into(),
                durable: tokio::sync::OnceCell::new(),
                txns: tokio::sync::OnceCell::new(),
                objects: tokio::sync::OnceCell::new(),
                spill_at: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }

    /// The same connection with another subject prefix.
    pub fn with_prefix(&self, prefix: impl Into<String>) -> Client {
        Client {
            inner: Arc::new(Inner {
                nats: self.inner.nats.clone(),
                prefix: prefix.into(),
                url: self.inner.url.clone(),
                durable: tokio::sync::OnceCell::new(),
                txns: tokio::sync::OnceCell::new(),
                objects: tokio::sync::OnceCell::new(),
                spill_at: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }

    /// The underlying async-nats client.
    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.nats
    }

    /// The subject prefix, `wharf` by default.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The URL this client connected to.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    pub(crate) fn durable_cell(&self) -> &tokio::sync::OnceCell<crate::durable::DurableClient> {
        &self.inner.durable
    }

    pub(crate) fn objects_cell(&self) -> &tokio::sync::OnceCell<crate::objects::JsStores> {
        &self.inner.objects
    }

    pub(crate) fn txn_cell(&self) -> &tokio::sync::OnceCell<async_nats::jetstream::kv::Store> {
        &self.inner.txns
    }

    /// Encodes one try of a call: for postcard the envelope and the
    /// arguments in one buffer and no headers; for JSON the arguments and
    /// `Wharf-*` headers. Synchronous, so `args` is not held across an await.
    pub(crate) fn prepare<A: Serialize>(
        &self,
        spec: &'static FnSpec,
        args: &A,
        options: &CallOptions,
        call: &CallState,
    ) -> Result<Prepared, Error> {
        let outgoing = Outgoing {
            codec: options.codec,
            sig: spec.sig,
            deadline_ms: call.deadline_ms,
            call_id: call.id.as_str(),
            attempt: call.attempt,
            report_instance: options.report_instance,
            txn: options.txn.as_ref().map(|txn| txn.id()),
        };
        request::encode(&outgoing, args).map_err(|e| {
            Error::new(
                ErrorKind::Codec,
                format!("cannot encode the arguments of `{}`: {e}", spec.path),
            )
        })
    }

    /// Makes a call: one try after another, as the retry policy and the
    /// deadline allow, under one call id. Returns the reply message (error
    /// replies other than 503 included; [`Returns`] interprets them) and the
    /// number of tries it took.
    ///
    /// Not itself async: each level of `async fn` moves the future below it
    /// into its own, once per call, so the call path keeps its levels few.
    pub(crate) fn invoke<'a>(
        &'a self,
        spec: &'static FnSpec,
        prepared: Prepared,
        call: CallState,
        options: &'a CallOptions,
    ) -> impl Future<Output = Result<(Message, u32), Error>> + Send + 'a {
        use futures_util::future::Either;
        if prepared.payload.len() > self.spill_at() {
            Either::Left(crate::out_of_line(move || {
                self.invoke_spilled(spec, prepared, call, options)
            }))
        } else {
            Either::Right(self.invoke_tries(spec, prepared, call, options))
        }
    }

    /// Payloads above this many bytes are stored as objects and passed by
    /// reference: `WHARF_SPILL_BYTES`, or the server's `max_payload` less
    /// room for headers.
    pub(crate) fn spill_at(&self) -> usize {
        use std::sync::atomic::Ordering;
        let cached = self.inner.spill_at.load(Ordering::Relaxed);
        if cached != 0 {
            return cached;
        }
        let limit = spill_limit(&self.inner.nats);
        self.inner.spill_at.store(limit, Ordering::Relaxed);
        limit
    }

    /// A call whose arguments are too large for one message: they are
    /// stored as an object, the request names it (`Wharf-Spill`), and the
    /// object is deleted once the call is over.
    async fn invoke_spilled(
        &self,
        spec: &'static FnSpec,
        mut prepared: Prepared,
        call: CallState,
        options: &CallOptions,
    ) -> Result<(Message, u32), Error> {
        // Kept a while past the deadline even if this process dies first.
        let ttl = call.deadline.saturating_duration_since(Instant::now()) + SPILL_GRACE;
        let size = prepared.payload.len();
        let stored = match crate::objects::Objects::new(self)?
            .store("jetstream")?
            .ttl(ttl)
            .put_bytes(prepared.payload.slice(prepared.args_at..))
            .await
        {
            Ok(stored) => stored,
            Err(error) => {
                return Err(Error::new(
                    ErrorKind::PayloadTooLarge,
                    format!(
                        "call to `{}` not sent: its request is {size} bytes, more than the server's max_payload ({} bytes) allows, and storing the arguments as an object failed: {}; pass large values by reference (wharf::put), or raise max_payload in the nats-server configuration",
                        spec.subject(&self.inner.prefix),
                        self.inner.nats.server_info().max_payload,
                        error.message()
                    ),
                ))
            }
        };
        prepared.payload = prepared.payload.slice(..prepared.args_at);
        let headers = prepared.headers.get_or_insert_with(HeaderMap::new);
        mark_spilled(headers, &stored.uri, &stored.digest);
        let result = self.invoke_tries(spec, prepared, call, options).await;
        // Released now, not left to its TTL (which covers a caller that
        // dies mid-call).
        let _ = stored.delete_with(self).await;
        result
    }

    /// A reply whose value was spilled: fetch it, then delete the object.
    async fn unspill_reply(&self, mut message: Message) -> Result<Message, Error> {
        let (uri, digest) = spilled(&message).expect("checked by the caller");
        message.payload = crate::objects::fetch_spilled(self, &uri, &digest).await?;
        let _ = crate::objects::delete(self, &uri).await;
        Ok(message)
    }

    /// The tries of a call that fits one message. While an idempotent call
    /// waits, the worker holding it is asked now and then whether it still
    /// runs the call ([`Client::watch_call`]), so a worker that died is
    /// noticed in well under a second instead of at the deadline.
    async fn invoke_tries(
        &self,
        spec: &'static FnSpec,
        mut prepared: Prepared,
        mut call: CallState,
        options: &CallOptions,
    ) -> Result<(Message, u32), Error> {
        let policy = options.retry.unwrap_or(spec.retry);
        let txn = options.txn.as_ref();
        loop {
            // One try, awaited here rather than in a function of its own
            // (see `invoke`).
            let result = match self.request(spec, &call, prepared.clone(), txn) {
                Ok((subject, owner, request)) => {
                    let reply = self.inner.nats.send_request(subject.clone(), request);
                    let settle = |result| self.settle(spec, &call, txn, &subject, owner, result);
                    if spec.idempotent {
                        // Out of line: the watch's own requests and timer
                        // would otherwise enlarge every call's future.
                        tokio::select! {
                            result = reply => settle(result),
                            lost = crate::out_of_line(|| self.watch_call(spec, &call)) => Err(lost),
                        }
                    } else {
                        settle(reply.await)
                    }
                }
                Err(error) => Err(error),
            };
            let failure = match result {
                Ok(message) => match status_code(&message) {
                    // Draining or overloaded: the call did not run here.
                    Some(503) => remote_failure(options.codec, &message)
                        .map(|(_, error)| error)
                        .unwrap_or_else(|| Error::new(ErrorKind::Unavailable, "unavailable")),
                    _ if spilled(&message).is_some() => {
                        let message = crate::out_of_line(|| self.unspill_reply(message)).await?;
                        return Ok((message, call.attempt));
                    }
                    _ => return Ok((message, call.attempt)),
                },
                Err(error) => error,
            };
            // (A call to a known transaction owner that finds none fails as
            // TransactionLost instead: its instance is gone, not scaled down.)
            if failure.kind() == ErrorKind::NoResponders {
                // A supervisor that scaled this service to zero starts one
                // when someone asks for it (cold start).
                let demand = subjects::demand(&self.inner.prefix, spec.service);
                let _ = crate::out_of_line(|| self.inner.nats.publish(demand, Bytes::new())).await;
            }
            if call.attempt >= policy.attempts
                || !crate::retry::retryable(failure.kind(), spec.idempotent)
            {
                return Err(call.annotate(failure));
            }
            let delay = policy.delay(call.attempt);
            if Instant::now() + delay >= call.deadline {
                return Err(call.annotate(failure));
            }
            tokio::time::sleep(delay).await;
            call.attempt += 1;
            prepared = request::with_attempt(&prepared, options.codec, call.attempt);
        }
    }

    /// One try of a call, ready to send: its subject (a transaction's
    /// owner's own, once known), that owner, and the request, which expires
    /// at the call's deadline.
    fn request(
        &self,
        spec: &'static FnSpec,
        call: &CallState,
        prepared: Prepared,
        txn: Option<&crate::Transaction>,
    ) -> Result<(Subject, Option<Arc<str>>, async_nats::Request), Error> {
        let (owner, subject) = match txn.and_then(|t| t.route(&self.inner.prefix, spec)) {
            Some((owner, subject)) => (Some(owner), subject),
            None => (None, spec.subject(&self.inner.prefix)),
        };
        let timeout = call.deadline.saturating_duration_since(Instant::now());
        if timeout.is_zero() {
            return Err(call.deadline_passed(spec, &subject));
        }
        let mut request = async_nats::Request::new()
            .payload(prepared.payload)
            .timeout(Some(timeout));
        if let Some(headers) = prepared.headers {
            request = request.headers(headers);
        }
        Ok((subject, owner, request))
    }

    /// The outcome of one try: the reply (remembering the transaction's
    /// owner when it first names one), or the error, said plainly.
    fn settle(
        &self,
        spec: &'static FnSpec,
        call: &CallState,
        txn: Option<&crate::Transaction>,
        subject: &Subject,
        owner: Option<Arc<str>>,
        result: Result<Message, async_nats::RequestError>,
    ) -> Result<Message, Error> {
        if let (Ok(message), Some(txn)) = (&result, txn) {
            if let Some(named) = reply::owner(message) {
                txn.set_owner(named);
            }
        }
        result.map_err(|e| match e.kind() {
            RequestErrorKind::NoResponders if owner.is_some() => {
                crate::txn::lost(txn.map_or("", |t| t.id()), owner.as_deref().unwrap_or(""))
            }
            RequestErrorKind::NoResponders => Error::new(
                ErrorKind::NoResponders,
                format!("no worker serves `{subject}` ({}): start a worker for service `{}` (`<binary> worker` with NATS_URL set), or check the service and function names", spec.path, spec.service),
            ),
            RequestErrorKind::TimedOut => call.deadline_passed(spec, subject),
            RequestErrorKind::MaxPayloadExceeded => Error::new(
                ErrorKind::PayloadTooLarge,
                format!("call to `{subject}` not sent: {e}; pass large values by reference, or raise max_payload in the nats-server configuration"),
            ),
            _ => Error::new(
                ErrorKind::Connection,
                format!("call to `{subject}` failed on the connection to `{}`: {e}", redact(&self.inner.url)),
            ),
        })
    }

    /// Resolves with [`ErrorKind::WorkerLost`] once two probes in a row
    /// find no worker running `call`; pends forever otherwise.
    async fn watch_call(&self, spec: &'static FnSpec, call: &CallState) -> Error {
        let subject = subjects::call_status(&self.inner.prefix, spec.service);
        let mut misses = 0;
        loop {
            tokio::time::sleep(PROBE_INTERVAL).await;
            let probe = async_nats::Request::new()
                .payload(Bytes::copy_from_slice(call.id.as_bytes()))
                .timeout(Some(PROBE_TIMEOUT));
            match self.inner.nats.send_request(subject.clone(), probe).await {
                Ok(_) => misses = 0,
                // A probe lost to a broken connection says nothing about
                // the worker; the connection's own errors decide the call.
                Err(e)
                    if !matches!(
                        e.kind(),
                        RequestErrorKind::TimedOut | RequestErrorKind::NoResponders
                    ) => {}
                Err(_) => {
                    misses += 1;
                    // Two misses, not one: a call still in the worker's
                    // socket buffer is not registered yet.
                    if misses >= 2 {
                        return Error::new(
                            ErrorKind::WorkerLost,
                            format!(
                                "no worker of `{}` runs call {} of `{}` any more: the worker that took it stopped before answering",
                                spec.service, call.id, spec.path
                            ),
                        );
                    }
                }
            }
        }
    }
}

/// How long an idempotent call waits before its first probe, and between
/// probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// How long a probe waits for the worker's answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(150);

/// One logical call across its tries: id, deadline, attempt number.
pub(crate) struct CallState {
    pub(crate) id: nuid::NUIDStr,
    /// Absolute deadline, unix milliseconds (what travels on the wire).
    pub(crate) deadline_ms: u64,
    /// The same deadline on the monotonic clock (what the caller waits on).
    pub(crate) deadline: Instant,
    pub(crate) attempt: u32,
}

impl CallState {
    /// A new call: its timeout from the options or the function, cut to
    /// the deadline of the call this code runs in, if any.
    pub(crate) fn new(spec: &FnSpec, options: &CallOptions) -> Result<CallState, Error> {
        let timeout = options.timeout.unwrap_or_else(|| spec.timeout());
        let now_ms = crate::context::unix_ms();
        let now = Instant::now();
        let own = now_ms.saturating_add(timeout.as_millis().min(u64::MAX as u128) as u64);
        let deadline_ms = match crate::context::inherited_deadline_ms() {
            Some(inherited) if inherited < own => {
                if inherited <= now_ms {
                    return Err(Error::new(
                        ErrorKind::DeadlineExceeded,
                        format!(
                            "`{}` not called: the deadline of the call this code runs in passed {} ms ago",
                            spec.path,
                            now_ms - inherited
                        ),
                    ));
                }
                inherited
            }
            _ => own,
        };
        let deadline = now
            .checked_add(Duration::from_millis(deadline_ms - now_ms))
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365));
        Ok(CallState {
            id: call_id(),
            deadline_ms,
            deadline,
            attempt: 1,
        })
    }

    fn deadline_passed(&self, spec: &FnSpec, subject: &str) -> Error {
        Error::new(
            ErrorKind::Timeout,
            format!(
                "no reply from `{subject}` ({}) before the call's deadline; raise the timeout (#[microservice(timeout = \"..\")] or .timeout(..) on the request) or add workers",
                spec.path
            ),
        )
    }

    /// Adds the number of tries to the message of a call's final error.
    fn annotate(&self, error: Error) -> Error {
        if self.attempt == 1 {
            error
        } else {
            Error::new(
                error.kind(),
                format!("{} (after {} tries)", error.message(), self.attempt),
            )
        }
    }
}

/// How long a spilled object outlives the call's deadline.
const SPILL_GRACE: Duration = Duration::from_secs(60);

/// The spill limit for a connection: `WHARF_SPILL_BYTES`, or the server's
/// `max_payload` less 8 KiB for headers and the envelope.
pub(crate) fn spill_limit(nats: &async_nats::Client) -> usize {
    let max_payload = nats.server_info().max_payload;
    // Room for headers and the envelope: 8 KiB, or an eighth of a small
    // max_payload.
    let room = (8 * 1024).min(max_payload / 8);
    Settings::get()
        .ok()
        .and_then(|s| s.spill_bytes)
        .unwrap_or(usize::MAX)
        .min(max_payload.saturating_sub(room).max(1))
}

/// A new call id. Each thread keeps its own generator: the global one in
/// `nuid` sits behind a mutex that every concurrent call would contend on.
fn call_id() -> nuid::NUIDStr {
    thread_local! {
        // `NUID::new` is a placeholder state; the first `next` seeds it from
        // the OS random source, so threads never share a sequence.
        static NUID: std::cell::RefCell<nuid::NUID> = const { std::cell::RefCell::new(nuid::NUID::new()) };
    }
    NUID.with(|n| n.borrow_mut().next())
}

/// Per-call settings. Unset fields fall back to the function's attribute.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    pub(crate) timeout: Option<Duration>,
    pub(crate) codec: Codec,
    pub(crate) report_instance: bool,
    pub(crate) retry: Option<RetryPolicy>,
    pub(crate) durable: Option<bool>,
    pub(crate) txn: Option<crate::Transaction>,
}

/// A decoded reply together with what the worker reported about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply<T> {
    /// The function's return value.
    pub value: T,
    /// `Wharf-Instance` of the worker that served the call:
    /// `<instance id> <pid> <host>`.
    pub instance: Option<String>,
    /// Tries the call took, 1 when nothing was retried.
    pub attempts: u32,
}

impl<T> Reply<T> {
    /// The pid of the worker that served the call, when it reported one.
    pub fn pid(&self) -> Option<u32> {
        self.instance.as_deref()?.split(' ').nth(1)?.parse().ok()
    }
}

/// How a function's reply is turned into a Rust result: [`Plain`] for
/// functions returning `T`, [`Fallible`] for `Result<T, E>`.
pub trait Returns {
    /// The successful value.
    type Value;
    /// The error: [`Error`] or [`crate::CallError<E>`].
    type Err: From<Error>;
    /// Interprets a reply message encoded with `codec`.
    fn decode(spec: &FnSpec, codec: Codec, message: &Message) -> Result<Self::Value, Self::Err>;
}

/// [`Returns`] for a function returning `T`.
pub struct Plain<T>(PhantomData<fn() -> T>);

/// [`Returns`] for a function returning `Result<T, E>`.
pub struct Fallible<T, E>(PhantomData<fn() -> (T, E)>);

impl<T: DeserializeOwned> Returns for Plain<T> {
    type Value = T;
    type Err = Error;
    fn decode(spec: &FnSpec, codec: Codec, message: &Message) -> Result<T, Error> {
        if let Some((_, error)) = remote_failure(codec, message) {
            return Err(error);
        }
        decode_value(spec, codec, message)
    }
}

impl<T: DeserializeOwned, E: DeserializeOwned> Returns for Fallible<T, E> {
    type Value = T;
    type Err = crate::CallError<E>;
    fn decode(spec: &FnSpec, codec: Codec, message: &Message) -> Result<T, Self::Err> {
        match remote_failure(codec, message) {
            Some((422, _)) => {
                let body: ApplicationErrorBody<E> =
                    codec.decode(&message.payload).map_err(|e| {
                        Error::new(
                            ErrorKind::Codec,
                            format!("cannot decode the error value of `{}`: {e}", spec.path),
                        )
                    })?;
                Err(crate::CallError::Application(body.error))
            }
            Some((_, error)) => Err(error.into()),
            None => Ok(decode_value(spec, codec, message)?),
        }
    }
}

fn decode_value<T: DeserializeOwned>(
    spec: &FnSpec,
    codec: Codec,
    message: &Message,
) -> Result<T, Error> {
    codec.decode(&message.payload).map_err(|e| {
        Error::new(
            ErrorKind::Codec,
            format!(
                "cannot decode the reply of `{}` as `{}`: {e}",
                spec.path, spec.returns
            ),
        )
    })
}

/// A call being prepared: set options, then `.await` it (or call
/// [`Request::send`]). Made by `<function>::request(args..)`.
///
/// ```no_run
/// # #[wharf::microservice] async fn add(a: i64, b: i64) -> i64 { a + b }
/// # fn main() {}
/// # async fn run() -> Result<(), wharf::Error> {
/// use std::time::Duration;
/// let sum = add::request(2, 3).timeout(Duration::from_millis(200)).await?;
/// # Ok(()) }
/// ```
#[must_use = "a request does nothing until it is sent or awaited"]
pub struct Request<A, R> {
    spec: &'static FnSpec,
    args: A,
    client: Option<Client>,
    options: CallOptions,
    returns: PhantomData<fn() -> R>,
}

impl<A: Serialize, R: Returns> Request<A, R> {
    /// A request for `spec` with encoded-later arguments `args`.
    pub fn new(spec: &'static FnSpec, args: A) -> Self {
        Request {
            spec,
            args,
            client: None,
            options: CallOptions::default(),
            returns: PhantomData,
        }
    }

    /// Sends through `client` instead of the one [`crate::init`] set up.
    pub fn client(mut self, client: &Client) -> Self {
        self.client = Some(client.clone());
        self
    }

    /// Overrides the function's timeout for this call.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.options.timeout = Some(timeout);
        self
    }

    /// Encodes this call with `codec` (postcard by default).
    pub fn codec(mut self, codec: Codec) -> Self {
        self.options.codec = codec;
        self
    }

    /// Retries this call by `policy` instead of the function's.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.options.retry = Some(policy);
        self
    }

    /// Sends this call through JetStream (`true`), at least once even if
    /// workers die, or as a plain request (`false`), whatever the
    /// function's `durable` option says.
    pub fn durable(mut self, durable: bool) -> Self {
        self.options.durable = Some(durable);
        self
    }

    /// Makes this call in transaction `txn` (a call to a
    /// `#[microservice(stateful)]` function needs one; see
    /// [`crate::transaction`]).
    pub fn transaction(mut self, txn: &crate::Transaction) -> Self {
        self.options.txn = Some(txn.clone());
        self
    }

    /// Starts this call durably and returns without waiting for the
    /// result: [`Pending::wait`] collects it, here or, through
    /// `<function>::collect(id)`, in any other process.
    pub async fn start(mut self) -> Result<Pending<R>, Error> {
        if self.spec.stateful {
            return Err(Error::new(
                ErrorKind::Config,
                format!("`{}` is stateful: its calls go to the instance that owns the transaction, so they cannot be started durably", self.spec.path),
            ));
        }
        let client = match self.client.take() {
            Some(client) => client,
            None => global()?.clone(),
        };
        let call = CallState::new(self.spec, &self.options)?;
        let prepared = client.prepare(self.spec, &self.args, &self.options, &call)?;
        client
            .start_durable::<R>(self.spec, prepared, call, &self.options)
            .await
    }

    /// Sends the call and decodes the reply.
    pub async fn send(self) -> Result<R::Value, R::Err> {
        self.dispatch(false).await.map(|reply| reply.value)
    }

    /// Sends the call and returns the value with the serving worker's
    /// identity ([`Reply::instance`]).
    pub async fn send_detailed(self) -> Result<Reply<R::Value>, R::Err> {
        self.dispatch(true).await
    }

    async fn dispatch(mut self, report_instance: bool) -> Result<Reply<R::Value>, R::Err> {
        self.options.report_instance = report_instance;
        if self.spec.stateful && self.options.txn.is_none() {
            self.options.txn = crate::txn::current();
        }
        if self.spec.stateful {
            if self.options.txn.is_none() {
                return Err(crate::txn::outside(self.spec).into());
            }
            if self.options.durable == Some(true) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("`{}` is stateful: its calls go to the instance that owns the transaction, so they cannot be durable", self.spec.path),
                )
                .into());
            }
        }
        let client = match (self.client.take(), &self.options.txn) {
            (Some(client), _) => client,
            (None, Some(txn)) => txn.client().clone(),
            (None, None) => global()?.clone(),
        };
        let call = CallState::new(self.spec, &self.options)?;
        let prepared = client.prepare(self.spec, &self.args, &self.options, &call)?;
        let (message, codec, attempts) = if self.options.durable.unwrap_or(self.spec.durable) {
            let pending = client
                .start_durable::<R>(self.spec, prepared, call, &self.options)
                .await?;
            pending.wait_message().await?
        } else {
            let (message, attempts) = client
                .invoke(self.spec, prepared, call, &self.options)
                .await?;
            (message, self.options.codec, attempts)
        };
        let value = R::decode(self.spec, codec, &message)?;
        let instance = reply::instance(&message);
        Ok(Reply {
            value,
            instance,
            attempts,
        })
    }
}

impl<A, R> IntoFuture for Request<A, R>
where
    A: Serialize + Send + 'static,
    R: Returns + 'static,
    R::Value: Send,
    R::Err: Send,
{
    type Output = Result<R::Value, R::Err>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

/// Calls `spec` through `client` with default options (generated stubs).
#[doc(hidden)]
pub async fn call<A: Serialize, R: Returns>(
    client: &Client,
    spec: &'static FnSpec,
    args: A,
) -> Result<R::Value, R::Err> {
    if spec.durable || spec.stateful {
        return Request::<A, R>::new(spec, args).client(client).send().await;
    }
    let options = CallOptions::default();
    let call = CallState::new(spec, &options)?;
    let prepared = client.prepare(spec, &args, &options, &call)?;
    drop(args);
    let (message, _) = client.invoke(spec, prepared, call, &options).await?;
    R::decode(spec, options.codec, &message)
}

/// Calls `spec` through the client set up by [`crate::init`].
#[doc(hidden)]
pub async fn call_global<A: Serialize, R: Returns>(
    spec: &'static FnSpec,
    args: A,
) -> Result<R::Value, R::Err> {
    call::<A, R>(global()?, spec, args).await
}

static GLOBAL: OnceLock<Client> = OnceLock::new();

/// The process-wide client set up by [`crate::init`].
pub fn global() -> Result<&'static Client, Error> {
    GLOBAL.get().ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            "wharf is not initialized: call `wharf::init().await?` once at the start of the program \
             (or pass a client explicitly with `<function>::call(&client, ..)`)",
        )
    })
}

/// Installs `client` as the process-wide client; the first one set wins.
pub(crate) fn set_global(client: Client) -> &'static Client {
    GLOBAL.get_or_init(|| client)
}
