//! One call, end to end on the caller's side: its deadline and id, the
//! encoded request, the tries the retry policy allows, the watch on the
//! worker of an idempotent call, and spilled arguments and results.

use super::Client;
use crate::boxed::out_of_line;
use crate::error::{Error, ErrorKind};
use crate::objects::store as objects;
use crate::retry::{with_retries, RetryPolicy};
use crate::spec::FnSpec;
use crate::txn::lease::lost;
use crate::txn::route::TxnRoute;
use crate::wire::codec::Codec;
use crate::wire::reply::{self, mark_spilled, remote_failure, spilled, status_code};
use crate::wire::request::{self, Outgoing, Prepared};
use crate::wire::subjects;
use async_nats::{HeaderMap, Message, RequestErrorKind, Subject};
use bytes::Bytes;
use futures_util::future::Either;
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a call waits for its reply before it starts watching its
/// connection and its worker.
pub(crate) const WATCH_AFTER: Duration = Duration::from_millis(200);

/// How often a call that is taking a while asks whether a worker still
/// holds it.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// How long a probe of an idempotent call waits for the worker's answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(150);

/// How long a probe of a call that is not idempotent waits: its verdict
/// fails the call, so a slow answer must not look like none.
const PROBE_TIMEOUT_FINAL: Duration = Duration::from_millis(300);

/// What [`Client::wait_longer`] needs of a try.
struct Waiting<'a> {
    spec: &'static FnSpec,
    call: &'a CallState,
    txn: Option<&'a TxnRoute>,
    subject: &'a Subject,
    owner: Option<Arc<str>>,
    /// The connection's losses when the try was sent.
    losses: u64,
    /// Whether the server may refuse the subject (see `Denials`).
    watch: bool,
}

/// How long a call that found no worker waits for its service's discovery
/// answer.
const DISCOVERY_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a spilled object outlives the call's deadline.
const SPILL_GRACE: Duration = Duration::from_secs(60);

/// Per-call settings. Unset fields fall back to the function's attribute.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    pub(crate) timeout: Option<Duration>,
    pub(crate) codec: Codec,
    pub(crate) report_instance: bool,
    pub(crate) retry: Option<RetryPolicy>,
    pub(crate) durable: Option<bool>,
    pub(crate) txn: Option<Arc<TxnRoute>>,
    /// The items a streamed result may send before the caller grants more.
    pub(crate) credit: Option<u64>,
}

/// One logical call across its tries: id and deadline.
pub(crate) struct CallState {
    pub(crate) id: nuid::NUIDStr,
    /// Absolute deadline, unix milliseconds (what travels on the wire).
    pub(crate) deadline_ms: u64,
    /// The same deadline on the monotonic clock (what the caller waits on).
    pub(crate) deadline: Instant,
    /// This call's span in the current trace, if there is one (or in a new
    /// trace, while spans are exported): what the request carries as its
    /// `traceparent`.
    pub(crate) trace: Option<crate::trace::TraceContext>,
    /// The span this call was made in, if any.
    pub(crate) parent_span: Option<u64>,
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
        let parent = crate::trace::carried();
        Ok(CallState {
            id: call_id(),
            deadline_ms,
            deadline,
            trace: match &parent {
                Some(parent) => Some(parent.child()),
                None => crate::trace::new_root_if_exporting(),
            },
            parent_span: crate::trace::with_ids(parent.as_ref()).map(|parent| parent.span_number()),
        })
    }

    /// The caller's span of this call (a `debug` span: off unless a
    /// subscriber asks for it, and then nearly free), with the OpenTelemetry
    /// RPC attributes.
    pub(crate) fn span(&self, spec: &FnSpec) -> tracing::Span {
        let trace = crate::trace::with_ids(self.trace.as_ref());
        crate::trace::with_sampled_hint(trace, || {
            tracing::debug_span!(
                "wharf.call",
                otel.name = %format_args!("{}/{}", spec.service, spec.name),
                otel.kind = "client",
                rpc.system = "nats",
                rpc.service = spec.service,
                rpc.method = spec.name,
                wharf.call_id = self.id.as_str(),
                trace_id = trace.map(|t| t.trace_id()),
                span_id = trace.map(|t| t.span_id()),
                parent_span_id = self.parent_span.map(|id| format!("{id:016x}")),
                trace.sampled = trace.map(|t| t.sampled()),
                rpc.outcome = tracing::field::Empty,
            )
        })
    }

    pub(crate) fn deadline_passed(&self, spec: &FnSpec, subject: &str) -> Error {
        Error::new(
            ErrorKind::Timeout,
            format!(
                "no reply from `{}` ({}) before the call's deadline; raise the timeout (#[microservice(timeout = \"..\")] or .timeout(..) on the request) or add workers",
                subjects::readable(subject),
                spec.path
            ),
        )
    }
}

/// Cancels a try's call when dropped armed: publishes its id on
/// `<prefix>._cancel.<service>`, where the worker holding it stops it.
struct CancelOnDrop<'a> {
    client: &'a Client,
    spec: &'static FnSpec,
    call: &'a CallState,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        publish_cancel(self.client, self.spec, self.call.id.as_str());
    }
}

/// Publishes call `id`'s cancel on `<prefix>._cancel.<service>`, from a
/// task of its own: a drop, where cancels start, cannot wait (and sends
/// nothing when no runtime is left to run it).
pub(crate) fn publish_cancel(client: &Client, spec: &FnSpec, id: &str) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let nats = client.nats().clone();
    let subject = subjects::call_cancel(client.prefix(), spec.service);
    let id = Bytes::copy_from_slice(id.as_bytes());
    runtime.spawn(async move {
        let _ = nats.publish(subject, id).await;
    });
}

/// Adds the number of tries to the message of a call's final error.
pub(crate) fn annotate(error: Error, tries: u32) -> Error {
    if tries == 1 {
        error
    } else {
        let message = format!("{} (after {tries} tries)", error.message());
        error.with_message(message)
    }
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

impl Client {
    /// Encodes the first try of a call. Synchronous, so `args` is not held
    /// across an await.
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
            attempt: 1,
            report_instance: options.report_instance,
            txn: options.txn.as_ref().map(|txn| txn.id()),
            trace: call.trace.as_ref(),
        };
        request::encode(&outgoing, args).map_err(|e| {
            Error::new(
                ErrorKind::Codec,
                format!("cannot encode the arguments of `{}`: {e}", spec.path),
            )
            .with_source(e)
        })
    }

    /// Makes a call: one try after another, as the retry policy and the
    /// deadline allow, under one call id. Returns the reply message (error
    /// replies other than 503 included; [`super::returns::Returns`]
    /// interprets them) and the number of tries it took.
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
        if prepared.payload.len() > self.spill_at() {
            Either::Left(out_of_line(move || {
                self.invoke_spilled(spec, prepared, call, options)
            }))
        } else {
            Either::Right(self.invoke_tries(spec, prepared, call, options))
        }
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
        let args = prepared.payload.slice(prepared.args_at..);
        let (uri, digest) = match objects::put_spilled(self, args, ttl).await {
            Ok(stored) => stored,
            Err(error) => {
                return Err(Error::new(
                    ErrorKind::PayloadTooLarge,
                    format!(
                        "call to `{}` not sent: its request is {size} bytes, more than the server's max_payload ({} bytes) allows, and storing the arguments as an object failed: {}; pass large values by reference (wharf::put), or raise max_payload in the nats-server configuration",
                        spec.subject(self.prefix()),
                        self.nats().server_info().max_payload,
                        error.message()
                    ),
                ).with_source(error))
            }
        };
        prepared.payload = prepared.payload.slice(..prepared.args_at);
        let headers = prepared.headers.get_or_insert_with(HeaderMap::new);
        mark_spilled(headers, &uri, &digest);
        let result = self.invoke_tries(spec, prepared, call, options).await;
        // Released now, not left to its TTL (which covers a caller that
        // dies mid-call).
        let _ = objects::delete(self, &uri).await;
        result
    }

    /// A reply whose value was spilled: fetch it, then delete the object.
    async fn unspill_reply(&self, mut message: Message) -> Result<Message, Error> {
        let (uri, digest) = spilled(&message).expect("checked by the caller");
        message.payload = objects::fetch_spilled(self, &uri, &digest).await?;
        let _ = objects::delete(self, &uri).await;
        Ok(message)
    }

    /// The tries of a call that fits one message. While an idempotent call
    /// waits, the worker holding it is asked now and then whether it still
    /// runs the call ([`Client::watch_call`]), so a worker that died is
    /// noticed in well under a second instead of at the deadline.
    async fn invoke_tries(
        &self,
        spec: &'static FnSpec,
        prepared: Prepared,
        call: CallState,
        options: &CallOptions,
    ) -> Result<(Message, u32), Error> {
        let policy = options.retry.unwrap_or(spec.retry);
        let txn = options.txn.as_deref();
        let (call, prepared) = (&call, &prepared);
        let outcome = with_retries(
            &policy,
            spec.idempotent,
            call.deadline,
            |attempt| {
                // The same arguments under a new envelope or `Wharf-Attempt`.
                let prepared = if attempt == 1 {
                    prepared.clone()
                } else {
                    request::with_attempt(prepared, options.codec, attempt)
                };
                self.try_once(spec, call, prepared, options.codec, txn)
            },
            |failure| spec.observe_retry(failure),
        )
        .await;
        match outcome {
            Ok((message, tries)) if spilled(&message).is_some() => {
                let message = out_of_line(|| self.unspill_reply(message)).await?;
                Ok((message, tries))
            }
            Ok(done) => Ok(done),
            Err((failure, tries)) if failure.kind() == ErrorKind::NoResponders && txn.is_none() => {
                let failure = out_of_line(|| self.unknown_function(spec, failure)).await;
                Err(annotate(failure, tries))
            }
            Err((failure, tries)) => Err(annotate(failure, tries)),
        }
    }

    /// A call no worker answered: when workers of its service do run (they
    /// answer ADR-32 discovery) but none serves this function, that is
    /// [`ErrorKind::UnknownFunction`], naming the functions they serve;
    /// otherwise `no_responders` stays.
    async fn unknown_function(&self, spec: &'static FnSpec, failure: Error) -> Error {
        let subject = subjects::discovery_of("INFO", spec.service);
        let request = async_nats::Request::new().timeout(Some(DISCOVERY_TIMEOUT));
        let Ok(reply) = self.nats().send_request(subject, request).await else {
            return failure;
        };
        let Ok(info) = serde_json::from_slice::<serde_json::Value>(&reply.payload) else {
            return failure;
        };
        // Another deployment (prefix) may run a service of the same name.
        let ours = format!("{}.", self.prefix());
        let served: Vec<&str> = info["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["subject"].as_str().is_some_and(|s| s.starts_with(&ours)))
            .filter_map(|e| e["name"].as_str())
            .collect();
        if served.is_empty() || served.contains(&spec.name) {
            return failure;
        }
        let message = format!(
            "{}; service `{}` runs, but its workers serve only {}: check the function name, or deploy a worker built with `{}`",
            failure.message(),
            spec.service,
            served.join(", "),
            spec.path
        );
        Error::new(ErrorKind::UnknownFunction, message)
    }

    /// One try: the reply, or the failure (a 503 reply included: the call
    /// did not run there). Sent on the subject of the caller's signature,
    /// and, when no worker serves that (or the server refuses it), again on
    /// the plain subject: a worker of another signature answers it with a
    /// 409 that names both, one of an older wharf serves it.
    async fn try_once(
        &self,
        spec: &'static FnSpec,
        call: &CallState,
        prepared: Prepared,
        codec: Codec,
        txn: Option<&TxnRoute>,
    ) -> Result<Message, Error> {
        if !self.routes_by_signature() {
            return self
                .try_subject(spec, call, prepared, codec, txn, false)
                .await;
        }
        // Kept for the plain subject (a reference count, not a copy).
        let again = prepared.clone();
        match self
            .try_subject(spec, call, prepared, codec, txn, true)
            .await
        {
            // (Refused too: permissions written by hand may name only the
            // plain subject.)
            Err(failure)
                if matches!(
                    failure.kind(),
                    ErrorKind::NoResponders | ErrorKind::PermissionDenied
                ) =>
            {
                out_of_line(|| self.try_subject(spec, call, again, codec, txn, false)).await
            }
            outcome => outcome,
        }
    }

    /// One try on the signed or the plain subject ([`Client::try_once`]).
    async fn try_subject(
        &self,
        spec: &'static FnSpec,
        call: &CallState,
        prepared: Prepared,
        codec: Codec,
        txn: Option<&TxnRoute>,
        signed: bool,
    ) -> Result<Message, Error> {
        // A call that may travel in a batch with others of its function
        // (coalesce.rs): a plain postcard request on its signature subject.
        let batchable = (signed
            && txn.is_none()
            && codec == Codec::Postcard
            && prepared.headers.is_none()
            && prepared.payload.len() <= super::coalesce::MAX_ENTRY_BYTES)
            .then(|| prepared.payload.clone());
        let (subject, owner, request) = self.request(spec, call, prepared, txn, signed)?;
        // A subject the server refused fails at once, before and while the
        // call waits: the server sends no reply to wait for.
        let denials = self.denials();
        if let Some(denied) = denials.check(&subject) {
            return Err(denied);
        }
        // Only until a call of this function went through on this
        // connection: permissions hold until a reconnect, so later calls
        // pay nothing for the watch.
        // (A transaction's owner's own subject is always watched.)
        let generation = denials.generation();
        let routed = owner.is_some();
        let watch = denials.watching && (routed || !spec.permitted_on(generation));
        // Noted before sending: a loss after this means the reply cannot
        // come on this connection.
        let losses = self.connection().losses();
        // Dropped while it waits, or given up at its deadline, the call is
        // cancelled on the worker that holds it (and the calls it made).
        let mut cancel = CancelOnDrop {
            client: self,
            spec,
            call,
            armed: true,
        };
        // (Not while a refusal is watched: a batch refused would be seen
        // as a refusal of the signature subject.)
        let coalescer = match batchable {
            // Made once per connection: out of line, so every call's future
            // does not carry the making.
            Some(_) if !watch => match self.inner.coalescer.get() {
                Some(made) => made.as_ref(),
                None => out_of_line(|| self.coalescer()).await,
            },
            _ => None,
        };
        let reply = match (coalescer, batchable) {
            (Some(coalescer), Some(single)) => {
                Either::Left(coalescer.call(spec, self.prefix(), &subject, single))
            }
            _ => Either::Right(self.nats().send_request(subject.clone(), request)),
        };
        tokio::pin!(reply);
        // The common call is answered before this first look; one that is
        // not gets watched (out of line, so the common call's future stays
        // small): its connection, its worker, its deadline.
        let look =
            tokio::time::sleep_until((Instant::now() + WATCH_AFTER).min(call.deadline).into());
        let waiting = |owner| Waiting {
            spec,
            call,
            txn,
            subject: &subject,
            owner,
            losses,
            watch,
        };
        let result = if watch {
            // Rare (a function's first calls on a connection with
            // permissions of its own): the refusal is watched from the start.
            out_of_line(|| async {
                tokio::select! {
                    biased;
                    result = &mut reply => self.settle(spec, call, txn, &subject, owner.clone(), result),
                    denied = denials.refused(&subject) => Err(denied),
                    _ = look => self.wait_longer(waiting(owner.clone()), reply.as_mut()).await,
                }
            })
            .await
        } else {
            tokio::select! {
                biased;
                result = &mut reply => self.settle(spec, call, txn, &subject, owner.clone(), result),
                _ = look => out_of_line(|| self.wait_longer(waiting(owner.clone()), reply.as_mut())).await,
            }
        };
        if watch && !routed && result.is_ok() {
            spec.mark_permitted(generation);
        }
        // A reply, or a failure after which the call is retried under the
        // same id or cannot have run: nothing to cancel.
        cancel.armed = matches!(&result, Err(e) if e.kind() == ErrorKind::Timeout);
        let failure = match result {
            // Draining or overloaded: the call did not run here.
            Ok(message) if status_code(&message) == Some(503) => remote_failure(codec, &message)
                .map(|(_, error)| error)
                .unwrap_or_else(|| Error::new(ErrorKind::Unavailable, "unavailable")),
            Ok(message) => return Ok(message),
            Err(error) => error,
        };
        // (A call to a known transaction owner that finds none fails as
        // TransactionLost instead: its instance is gone, not scaled down.)
        if failure.kind() == ErrorKind::NoResponders && !signed {
            // A supervisor that scaled this service to zero starts one
            // when someone asks for it (cold start).
            let demand = subjects::demand(self.prefix(), spec.service);
            let _ = out_of_line(|| self.nats().publish(demand, Bytes::new())).await;
        }
        Err(failure)
    }

    /// One try of a call, ready to send: its subject (a transaction's
    /// owner's own, once known), that owner, and the request, which expires
    /// at the call's deadline.
    fn request(
        &self,
        spec: &'static FnSpec,
        call: &CallState,
        prepared: Prepared,
        txn: Option<&TxnRoute>,
        signed: bool,
    ) -> Result<(Subject, Option<Arc<str>>, async_nats::Request), Error> {
        let (owner, subject) = match txn.and_then(|t| t.route(self.prefix(), spec)) {
            Some((owner, subject)) => (Some(owner), subject),
            None if signed => (None, spec.signed_subject(self.prefix())),
            None => (None, spec.subject(self.prefix())),
        };
        let timeout = call.deadline.saturating_duration_since(Instant::now());
        if timeout.is_zero() {
            return Err(call.deadline_passed(spec, &subject));
        }
        // The deadline is kept by `try_once`, which also watches the
        // connection and the worker while it waits.
        let mut request = async_nats::Request::new()
            .payload(prepared.payload)
            .timeout(None);
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
        txn: Option<&TxnRoute>,
        subject: &Subject,
        owner: Option<Arc<str>>,
        result: Result<Message, async_nats::RequestError>,
    ) -> Result<Message, Error> {
        if let (Ok(message), Some(txn)) = (&result, txn) {
            if let Some(named) = reply::owner(message) {
                txn.set_owner(named);
            }
        }
        result.map_err(|e| {
            let subject = subjects::readable(subject);
            let error = match e.kind() {
                RequestErrorKind::NoResponders if owner.is_some() => {
                    lost(txn.map_or("", |t| t.id()), owner.as_deref().unwrap_or(""))
                }
                RequestErrorKind::NoResponders => Error::new(
                    ErrorKind::NoResponders,
                    format!("no worker serves `{subject}` ({}): start a worker for service `{}` (`<binary> worker` with NATS_URL set), or check the service and function names", spec.path, spec.service),
                ),
                RequestErrorKind::TimedOut => call.deadline_passed(spec, &subject),
                RequestErrorKind::MaxPayloadExceeded => Error::new(
                    ErrorKind::PayloadTooLarge,
                    format!("call to `{subject}` not sent: {e}; pass large values by reference, or raise max_payload in the nats-server configuration"),
                ),
                _ => Error::new(
                    ErrorKind::Connection,
                    format!("call to `{subject}` failed on the connection to `{}`: {e}", crate::settings::redact(self.url())),
                ),
            };
            error.with_source(e)
        })
    }

    /// A try whose reply did not come by its first look: waits for the
    /// reply, the deadline, a loss of the connection (the reply cannot
    /// come: [`ErrorKind::ConnectionLost`]), a refusal, or probes that find
    /// no worker holding the call any more ([`ErrorKind::WorkerLost`]).
    async fn wait_longer<F>(
        &self,
        waiting: Waiting<'_>,
        reply: std::pin::Pin<&mut F>,
    ) -> Result<Message, Error>
    where
        F: Future<Output = Result<Message, async_nats::RequestError>>,
    {
        let Waiting {
            spec,
            call,
            txn,
            subject,
            owner,
            losses,
            watch,
        } = waiting;
        let connection = self.connection();
        if connection.losses() != losses {
            return Err(self.connection_lost(spec, subject));
        }
        // Stateful calls are not registered for probes (their owner is
        // watched through its lease instead).
        let probe = !spec.stateful;
        tokio::select! {
            biased;
            result = reply => self.settle(spec, call, txn, subject, owner, result),
            _ = connection.lost_since(losses) => Err(self.connection_lost(spec, subject)),
            _ = tokio::time::sleep_until(call.deadline.into()) => Err(call.deadline_passed(spec, subject)),
            lost = self.watch_call(spec, call), if probe => Err(lost),
            denied = self.denials().refused(subject), if watch => Err(denied),
        }
    }

    pub(crate) fn connection_lost(&self, spec: &'static FnSpec, subject: &str) -> Error {
        let retried = if spec.idempotent {
            "it is idempotent, so it is tried again on the new connection"
        } else {
            "it may have run; mark the function idempotent to have such calls retried"
        };
        Error::new(
            ErrorKind::ConnectionLost,
            format!(
                "the connection to `{}` was lost while `{}` ({}) waited for its reply: {retried}",
                crate::settings::redact(self.url()),
                subjects::readable(subject),
                spec.path
            ),
        )
    }

    /// Resolves with [`ErrorKind::WorkerLost`] once probes in a row find no
    /// worker holding `call` (two for an idempotent call, which is then
    /// tried again; three, waiting longer for each answer, for one that is
    /// not, which then fails); pends forever otherwise.
    pub(crate) async fn watch_call(&self, spec: &'static FnSpec, call: &CallState) -> Error {
        let subject = subjects::call_status(self.prefix(), spec.service);
        // A miss that fails a call that may have run must be surer.
        let (needed, wait) = if spec.idempotent {
            (2, PROBE_TIMEOUT)
        } else {
            (3, PROBE_TIMEOUT_FINAL)
        };
        let mut misses = 0;
        loop {
            let probe = async_nats::Request::new()
                .payload(crate::wire::probe::request([call.id.as_str()]).into())
                .timeout(Some(wait));
            let started = Instant::now();
            match self.nats().send_request(subject.clone(), probe).await {
                Ok(_) => misses = 0,
                // A probe lost to a broken connection says nothing about
                // the worker; the connection's own watch decides the call.
                Err(e)
                    if !matches!(
                        e.kind(),
                        RequestErrorKind::TimedOut | RequestErrorKind::NoResponders
                    ) => {}
                Err(_) => {
                    misses += 1;
                    // More than one: a call still in the worker's socket
                    // buffer is not registered yet.
                    if misses >= needed {
                        let what = if spec.idempotent {
                            "the worker that took it stopped, or it or its reply was lost with a server"
                        } else {
                            "the worker that took it stopped, or it or its reply was lost with a server; it may have run"
                        };
                        return Error::new(
                            ErrorKind::WorkerLost,
                            format!(
                                "no worker of `{}` holds call {} of `{}` any more: {what}",
                                spec.service, call.id, spec.path
                            ),
                        );
                    }
                }
            }
            tokio::time::sleep(PROBE_INTERVAL.saturating_sub(started.elapsed())).await;
        }
    }
}
