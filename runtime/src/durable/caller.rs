//! The caller's side of durable calls: publishing a call into its
//! service's work queue, the one subscription on which every durable reply
//! of a connection arrives, and collecting a result ([`Pending`]), here or
//! by id in any process.

use super::batcher::{Batched, Batcher, Entry, Of, Turn};
use super::streams::{calls_stream, results_bucket};
use crate::boxed::out_of_line;
use crate::client::call::{annotate, CallOptions, CallState};
use crate::client::coalesce::MAX_ENTRY_BYTES;
use crate::client::returns::Returns;
use crate::client::Client;
use crate::error::{Error, ErrorKind};
use crate::retry::{with_retries, RetryPolicy};
use crate::settings::Settings;
use crate::spec::FnSpec;
use crate::wire::codec::Codec;
use crate::wire::reply::reply_codec;
use crate::wire::request::Prepared;
use crate::wire::{batch, headers, record, subjects};
use async_nats::jetstream::{self, consumer::pull, context::PublishErrorKind, kv};
use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A client's durable-call state: its JetStream context, the streams it
/// knows exist, and the subscription on which workers' replies arrive.
pub(crate) struct DurableClient {
    js: jetstream::Context,
    streams: Mutex<HashSet<&'static str>>,
    replies: Arc<Replies>,
    /// Each service's results bucket, found on first use.
    results: Mutex<HashMap<String, kv::Store>>,
    /// Durable calls being stored, for coalescing.
    batcher: Batcher,
    /// Whether durable calls may coalesce (`WHARF_COALESCE`).
    coalesce: bool,
    /// Most bytes of requests in one batch: the server's `max_payload`
    /// when the client connected, less room for headers (read once, as
    /// the coalescer of plain calls does).
    max_batch_bytes: usize,
}

impl std::fmt::Debug for DurableClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableClient").finish_non_exhaustive()
    }
}

impl DurableClient {
    pub(crate) async fn new(nats: &async_nats::Client) -> Result<DurableClient, Error> {
        Ok(DurableClient {
            js: {
                let mut js = jetstream::new(nats.clone());
                // An acknowledgement that takes longer is sent again under
                // the same message id (stored once), and a result not read
                // in time is read again: across a node loss, a stream's new
                // leader is found sooner than async-nats's 5 s default.
                js.set_timeout(JETSTREAM_TIMEOUT);
                js
            },
            streams: Mutex::new(HashSet::new()),
            replies: Replies::start(nats).await?,
            results: Mutex::new(HashMap::new()),
            batcher: Batcher::default(),
            coalesce: Settings::get().map_or(true, |s| s.coalesce),
            max_batch_bytes: nats.server_info().max_payload.saturating_sub(1024),
        })
    }

    async fn results(&self, service: &str) -> Result<kv::Store, Error> {
        if let Some(store) = self.results.lock().unwrap().get(service) {
            return Ok(store.clone());
        }
        let store = out_of_line(|| results_bucket(&self.js, service)).await?;
        self.results
            .lock()
            .unwrap()
            .insert(service.to_owned(), store.clone());
        Ok(store)
    }

    async fn ensure_stream(&self, prefix: &str, service: &'static str) -> Result<(), Error> {
        if self.streams.lock().unwrap().contains(service) {
            return Ok(());
        }
        out_of_line(|| calls_stream(&self.js, prefix, service)).await?;
        self.streams.lock().unwrap().insert(service);
        Ok(())
    }
}

/// Routes replies of durable calls, all on one wildcard subscription, to
/// the calls waiting for them.
struct Replies {
    nats: async_nats::Client,
    prefix: String,
    /// Each call's reply, and whether its caller is awaiting it (a call
    /// made with `durable(true)`, not `start()`): only such an answer is
    /// confirmed as taken.
    waiting: Mutex<HashMap<String, (oneshot::Sender<Delivered>, bool)>>,
}

/// A durable call's answer as it reaches the call; `taken`, when the
/// worker waits to hear that it was, is fired once the call returns it.
struct Delivered {
    message: Message,
    taken: Option<oneshot::Sender<()>>,
}

impl Delivered {
    /// The answer, now in its caller's hands.
    fn take(self) -> Message {
        if let Some(taken) = self.taken {
            let _ = taken.send(());
        }
        self.message
    }
}

/// How long a caller waits for the calls it handed answers to to return
/// them before it confirms to the worker (below the worker's 2 s): an
/// answer not returned by then is confirmed as not taken, and stored.
const TAKE_WAIT: Duration = Duration::from_millis(500);

impl Replies {
    async fn start(nats: &async_nats::Client) -> Result<Arc<Replies>, Error> {
        let prefix = subjects::durable_replies(&nats.new_inbox());
        let mut subscription = nats
            .subscribe(subjects::durable_replies_any(&prefix))
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    format!("cannot subscribe for durable replies: {e}"),
                )
                .with_source(e)
            })?;
        let replies = Arc::new(Replies {
            nats: nats.clone(),
            prefix,
            waiting: Mutex::new(HashMap::new()),
        });
        let routes = Arc::downgrade(&replies);
        tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                let Some(replies) = routes.upgrade() else {
                    return;
                };
                let id = subjects::durable_reply_id(&message.subject);
                if id == subjects::DURABLE_BATCH_REPLY {
                    replies.route_batch(message);
                    continue;
                }
                let waiter = replies.waiting.lock().unwrap().remove(id);
                if let Some((waiter, _)) = waiter {
                    let _ = waiter.send(Delivered {
                        message,
                        taken: None,
                    });
                }
            }
        });
        Ok(replies)
    }

    /// Hands each answer of a batch reply (the answers of a batch's calls,
    /// each naming its call id in `Wharf-Call-Id`) to the call waiting for
    /// it, and, when the worker asks (a reply subject), confirms which it
    /// took: one byte per answer, 1 for an answer a call awaiting it has
    /// returned to its caller (within [`TAKE_WAIT`]). A reply that does not
    /// decode is dropped (and nothing is confirmed): those calls read their
    /// stored results instead.
    fn route_batch(&self, message: Message) {
        let Ok(answers) = batch::decode_answers(&message.payload) else {
            return;
        };
        let asked = message.reply.is_some();
        let mut taken = Vec::with_capacity(if asked { answers.len() } else { 0 });
        {
            let mut waiting = self.waiting.lock().unwrap();
            for answer in answers {
                let waiter = answer
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(headers::CALL_ID))
                    .and_then(|id| waiting.remove(id.as_str()));
                let said = waiter.and_then(|(waiter, awaited)| {
                    // Only an answer a call awaits now is confirmed.
                    let (took, said) = (asked && awaited).then(oneshot::channel).unzip();
                    let _ = waiter.send(Delivered {
                        message: Message {
                            subject: message.subject.clone(),
                            reply: None,
                            length: answer.body.len(),
                            payload: answer.body,
                            headers: answer.headers,
                            status: None,
                            description: None,
                        },
                        taken: took,
                    });
                    said
                });
                if asked {
                    taken.push(said);
                }
            }
        }
        let Some(reply) = message.reply else { return };
        let nats = self.nats.clone();
        // Confirmed once the calls have returned their answers (at once,
        // for a call awaiting it): a call that gave up meanwhile does not
        // count, and its result is stored.
        tokio::spawn(async move {
            // One deadline for all: most have returned theirs by the time
            // they are looked at, and need no timer at all.
            let until = tokio::time::Instant::now() + TAKE_WAIT;
            let mut took = Vec::with_capacity(taken.len());
            for said in taken {
                let returned = match said {
                    Some(said) => matches!(tokio::time::timeout_at(until, said).await, Ok(Ok(()))),
                    None => false,
                };
                took.push(u8::from(returned));
            }
            // Lost, the worker stores these results after a while.
            let _ = nats.publish(reply, took.into()).await;
        });
    }

    fn subject(&self, id: &str) -> String {
        subjects::durable_reply(&self.prefix, id)
    }

    fn register(&self, id: &str, awaited: bool) -> oneshot::Receiver<Delivered> {
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap()
            .insert(id.to_owned(), (tx, awaited));
        rx
    }
}

impl Client {
    /// This client's durable-call state, set up by its first durable call.
    /// Lent, not cloned: two reference-count updates a call on a count
    /// every thread shares cost more than the rest of this lookup.
    async fn durable_state(&self) -> Result<&Arc<DurableClient>, Error> {
        let cell = self.durable_cell();
        let state = match cell.get() {
            Some(state) => state,
            // Boxed, so the setup's future does not widen every call's.
            None => {
                out_of_line(|| {
                    cell.get_or_try_init(|| async {
                        let durable = Arc::new(DurableClient::new(self.nats()).await?);
                        Ok::<_, Error>(Box::new(durable) as Box<dyn std::any::Any + Send + Sync>)
                    })
                })
                .await?
            }
        };
        Ok(state
            .downcast_ref::<Arc<DurableClient>>()
            .expect("the durable slot holds durable state only"))
    }

    /// Publishes a durable call into its service's stream and returns once
    /// JetStream has stored it: in a batch with others of its function
    /// when several are being stored at once ([`super::batcher`]), else
    /// alone. `awaited`: the caller waits for the answer now (not a
    /// `start()` whose result may be collected by id elsewhere).
    pub(crate) async fn start_durable<R: Returns>(
        &self,
        spec: &'static FnSpec,
        prepared: Prepared,
        call: CallState,
        options: &CallOptions,
        awaited: bool,
    ) -> Result<Pending<R>, Error> {
        let durable = self.durable_state().await?;
        durable.ensure_stream(self.prefix(), spec.service).await?;
        let id = call.id.as_str().to_owned();
        let reply = durable.replies.register(&id, awaited);
        let mut policy = options.retry.unwrap_or(spec.retry);
        // Re-sent under the same message id, JetStream stores a call once
        // within the duplicate window, so every failure that may be
        // retried is, until the deadline rather than for a number of tries:
        // a stream whose leader's node was lost accepts nothing until its
        // peers elect another (nats-server waits 4 to 9 s for that).
        // And soon after the new leader is there: no pause of more than
        // 250 ms between tries (a few small publishes a second per call).
        if policy.attempts > 1 {
            policy.attempts = u32::MAX;
            policy.max_backoff_ms = policy.max_backoff_ms.min(DURABLE_MAX_BACKOFF_MS);
        }
        // A call that may travel in a batch: a postcard request with no
        // headers of its own (what a batch entry carries).
        let batchable = durable.coalesce
            && self.coalesces()
            && options.codec == Codec::Postcard
            && prepared.headers.is_none()
            && prepared.payload.len() <= MAX_ENTRY_BYTES;
        // Counted while it is being stored, alone or not: calls coalesce
        // only while several are.
        let of = Of { spec, awaited };
        let _storing = batchable.then(|| durable.batcher.enter(of));
        if batchable {
            let batched = self
                .store_batched(durable, of, &prepared.payload, &id, policy, call.deadline)
                .await;
            match batched {
                Batched::Stored => return Ok(self.pending(spec, id, reply, &call)),
                Batched::NotSent => {}
                Batched::Failed(error) => {
                    durable.replies.waiting.lock().unwrap().remove(&id);
                    let message = format!(
                        "durable call to `{}` not accepted by JetStream: {}",
                        spec.path,
                        error.message()
                    );
                    return Err(error.with_message(message));
                }
            }
        }
        let mut headers = prepared.headers.unwrap_or_default();
        headers.insert(headers::REPLY, durable.replies.subject(&id).as_str());
        headers.insert(headers::CALL_ID, id.as_str());
        let subject = subjects::durable_call(self.prefix(), spec.service, spec.name);
        let stored = self
            .publish_durable(
                durable,
                spec,
                subject,
                prepared.payload,
                headers,
                &id,
                &policy,
                call.deadline,
            )
            .await;
        if let Err((error, tries)) = stored {
            durable.replies.waiting.lock().unwrap().remove(&id);
            let message = format!(
                "durable call to `{}` not accepted by JetStream: {}",
                spec.path,
                error.message()
            );
            return Err(annotate(error.with_message(message), tries));
        }
        Ok(self.pending(spec, id, reply, &call))
    }

    fn pending<R: Returns>(
        &self,
        spec: &'static FnSpec,
        id: String,
        reply: oneshot::Receiver<Delivered>,
        call: &CallState,
    ) -> Pending<R> {
        Pending {
            spec,
            id,
            client: Some(self.clone()),
            reply: Some(reply),
            wait: call.deadline.saturating_duration_since(Instant::now()) + RESULT_GRACE,
            returns: PhantomData,
        }
    }

    /// Publishes `payload` to JetStream under message id `msg_id`, trying
    /// again as `policy` and `deadline` allow, until it is stored.
    #[allow(clippy::too_many_arguments)]
    async fn publish_durable(
        &self,
        durable: &DurableClient,
        spec: &'static FnSpec,
        subject: String,
        payload: Bytes,
        headers: HeaderMap,
        msg_id: &str,
        policy: &RetryPolicy,
        deadline: Instant,
    ) -> Result<(), (Error, u32)> {
        with_retries(policy, true, deadline, |_| {
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .headers(headers.clone())
                .message_id(msg_id);
            let js = &durable.js;
            let subject = subject.clone();
            let denials = self.denials();
            let connection = self.connection();
            async move {
                if let Some(denied) = denials.check(&subject) {
                    return Err(denied);
                }
                let losses = connection.losses();
                let stored = async {
                    match js.send_publish(subject.clone(), publish).await {
                        Ok(ack) => ack.await.map(|_| ()).map_err(refused),
                        Err(e) => Err(refused(e)),
                    }
                };
                // A refused publish gets no acknowledgement to wait for,
                // nor one sent through a server this connection lost: it
                // is sent again at once, through the new connection, under
                // the same message id.
                tokio::select! {
                    stored = stored => stored,
                    denied = denials.refused(&subject) => Err(denied),
                    _ = connection.lost_since(losses) => Err(Error::new(
                        ErrorKind::ConnectionLost,
                        format!("the connection was lost before JetStream acknowledged the call to `{subject}`"),
                    )),
                }
            }
        }, |failure| spec.observe_retry(failure))
        .await
        .map(|_| ())
    }

    /// Stores a durable call in a batch with others of its function, if
    /// several are being stored; [`Batched::NotSent`] when it is to be
    /// stored alone (few in flight, workers that take no batches, or a
    /// batch that was never sent or was refused outright: each of its calls
    /// then tries alone, under its own id).
    async fn store_batched(
        &self,
        durable: &Arc<DurableClient>,
        of: Of,
        request: &Bytes,
        id: &str,
        policy: RetryPolicy,
        deadline: Instant,
    ) -> Batched {
        let turn = durable
            .batcher
            .turn(of, request, id, durable.max_batch_bytes);
        let stored = match turn {
            Turn::Alone => return Batched::NotSent,
            Turn::Ask => {
                self.ask_takes_batches(durable, of);
                return Batched::NotSent;
            }
            Turn::Joined(stored) => stored,
            Turn::Filled(stored, entries) => {
                self.store_batch(durable, of, entries, policy, deadline);
                stored
            }
            Turn::Began(stored, generation) => {
                let mut leading = Leading {
                    client: self,
                    durable,
                    of,
                    generation,
                    policy,
                    deadline,
                    done: false,
                };
                // Calls that are ready to run join this batch meanwhile.
                tokio::task::yield_now().await;
                leading.done = true;
                match durable.batcher.take(of, generation) {
                    // Nobody joined: alone, as without coalescing.
                    Some(entries) if entries.len() == 1 => return Batched::NotSent,
                    Some(entries) => self.store_batch(durable, of, entries, policy, deadline),
                    None => {}
                }
                stored
            }
        };
        // A batch whose store ended without a word was never sent.
        stored.await.unwrap_or(Batched::NotSent)
    }

    /// Stores a batch of durable calls, in a task of its own (so no call
    /// that gives up takes the others' store with it), and tells each call
    /// whether it was stored.
    fn store_batch(
        &self,
        durable: &Arc<DurableClient>,
        of: Of,
        entries: Vec<Entry>,
        policy: RetryPolicy,
        deadline: Instant,
    ) {
        let (client, durable, spec) = (self.clone(), durable.clone(), of.spec);
        tokio::spawn(async move {
            let payload = batch::encode_requests(entries.iter().map(|entry| &entry.request));
            let mut headers = HeaderMap::new();
            headers.insert(headers::REPLY, durable.replies.prefix.as_str());
            if of.awaited {
                // This client confirms the answers it takes.
                headers.insert(headers::CONFIRM, "1");
            }
            let subject = subjects::durable_batch_call(client.prefix(), spec.service, spec.name);
            // Unique (call ids are) and the same on every try: a batch
            // sent again after a lost acknowledgement is stored once.
            let msg_id = format!("{}-batch", entries[0].id);
            let stored = client
                .publish_durable(
                    &durable, spec, subject, payload, headers, &msg_id, &policy, deadline,
                )
                .await;
            for entry in entries {
                let batched = match &stored {
                    Ok(()) => Batched::Stored,
                    // Refused before JetStream could take it: alone, each
                    // call may still be (its subject permitted, its size
                    // within bounds).
                    Err((error, _))
                        if matches!(
                            error.kind(),
                            ErrorKind::PayloadTooLarge | ErrorKind::PermissionDenied
                        ) =>
                    {
                        Batched::NotSent
                    }
                    Err((error, tries)) => Batched::Failed(annotate(error.clone(), *tries)),
                };
                let _ = entry.stored.send(batched);
            }
        });
    }

    /// Looks, in a task of its own, for the consumer through which the
    /// workers of `spec` take batches of durable calls.
    fn ask_takes_batches(&self, durable: &Arc<DurableClient>, of: Of) {
        let (durable, spec) = (durable.clone(), of.spec);
        let stream = subjects::calls_stream(self.prefix(), spec.service);
        tokio::spawn(async move {
            let consumer = durable
                .js
                .get_consumer_from_stream::<pull::Config, _, _>(
                    subjects::durable_batch_consumer(spec.name),
                    stream,
                )
                .await;
            durable.batcher.takes(of, consumer.is_ok());
        });
    }
}

/// The call that began a batch, until it has taken it: dropped before (its
/// caller gave up), it stores the batch anyway, so the calls that joined
/// it are not left waiting for a batch nobody stores.
struct Leading<'a> {
    client: &'a Client,
    durable: &'a Arc<DurableClient>,
    of: Of,
    generation: u64,
    policy: RetryPolicy,
    deadline: Instant,
    done: bool,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(entries) = self.durable.batcher.take(self.of, self.generation) {
            self.client
                .store_batch(self.durable, self.of, entries, self.policy, self.deadline);
        }
    }
}

/// A publish JetStream did not confirm, as an error whose kind says whether
/// trying again can help.
fn refused(e: jetstream::context::PublishError) -> Error {
    let kind = match e.kind() {
        // The ack may be lost while the call was stored; the message id
        // makes a second publish harmless.
        PublishErrorKind::TimedOut => ErrorKind::Timeout,
        PublishErrorKind::MaxPayloadExceeded => ErrorKind::PayloadTooLarge,
        // No stream answered: async-nats says so when the server has no
        // responder for the subject, which on a cluster is also what a
        // stream electing a new leader (a node lost) looks like. The
        // stream was made before the first publish, so try again.
        PublishErrorKind::StreamNotFound => {
            return Error::new(
                ErrorKind::Unavailable,
                format!("{e}: the stream has no leader to store the call (a JetStream server was lost and another is taking over?)"),
            )
            .with_source(e)
        }
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
            ErrorKind::Other
        }
        _ => ErrorKind::Connection,
    };
    Error::new(kind, e.to_string()).with_source(e)
}

/// The longest pause between two tries of a durable publish.
const DURABLE_MAX_BACKOFF_MS: u64 = 250;

/// How long a durable call's publish waits for JetStream's acknowledgement,
/// and a lookup of its stored result for an answer, before trying again.
const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// How long past a durable call's deadline its caller still waits for the
/// result: the worker's answer to a call that ran out of time is on its way.
const RESULT_GRACE: Duration = Duration::from_secs(2);

/// How often a waiting caller looks for a stored result in case the reply
/// itself was lost (a broker restart between store and reply).
const RESULT_POLL: Duration = Duration::from_secs(1);

/// A durable call that was accepted and whose result can be collected,
/// here ([`Pending::wait`]) or in another process by its id
/// (`<function>::collect(id)`).
///
/// ```no_run
/// # #[wharf::microservice] async fn add(a: i64, b: i64) -> i64 { a + b }
/// # fn main() {}
/// # async fn run() -> Result<(), wharf::Error> {
/// let pending = add::request(2, 3).start().await?;
/// let id = pending.id().to_owned();
/// // ... later, anywhere connected to the same NATS:
/// let sum = add::collect(id).wait().await?;
/// # Ok(()) }
/// ```
#[must_use = "the result is only collected by `wait`"]
pub struct Pending<R> {
    spec: &'static FnSpec,
    id: String,
    client: Option<Client>,
    reply: Option<oneshot::Receiver<Delivered>>,
    wait: Duration,
    returns: PhantomData<fn() -> R>,
}

impl<R: Returns> Pending<R> {
    /// The result of the durable call `id` of `spec`, to be collected.
    pub fn new(spec: &'static FnSpec, id: String) -> Pending<R> {
        Pending {
            spec,
            id,
            client: None,
            reply: None,
            wait: spec.timeout() + RESULT_GRACE,
            returns: PhantomData,
        }
    }

    /// The call id: what `<function>::collect` takes.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Collects through `client` instead of the one [`crate::init`] set up.
    pub fn client(mut self, client: &Client) -> Self {
        self.client = Some(client.clone());
        self
    }

    /// How long [`Pending::wait`] waits for the result.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.wait = timeout;
        self
    }

    /// Cancels the call, before or while it runs: a worker that has not
    /// started it never will, and one running it stops it (an async
    /// function at its next `.await`; a sync one sees
    /// [`crate::cancelled`]). Its result becomes a `cancelled` error (code
    /// 499) for whoever collects it. Returns false, changing nothing, when
    /// the call had completed already (its result stays).
    ///
    /// A worker that connects only after the cancel was sent may still
    /// run the call; its result is then dropped, and the call reads as
    /// cancelled all the same.
    pub async fn cancel(mut self) -> Result<bool, Error> {
        let client = match self.client.take() {
            Some(client) => client,
            None => crate::client::global()?.clone(),
        };
        self.check_id()?;
        let durable = client.durable_state().await?;
        let results = durable.results(self.spec.service).await?;
        // The cancel's record first, as a create: once it is stored no
        // worker's result replaces it, and a call that completed first
        // keeps its own.
        let message = format!(
            "durable call {} of `{}` was cancelled",
            self.id, self.spec.path
        );
        let (code, _, body) =
            crate::wire::reply::error_reply(ErrorKind::Cancelled, &message, None, Codec::Json);
        let record = record::encode(code, Codec::Json, &body);
        match results.create(self.id.as_str(), record).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => return Ok(false),
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::Connection,
                    format!(
                    "cannot cancel durable call {} of `{}`: storing its cancellation failed: {e}",
                    self.id, self.spec.path
                ),
                )
                .with_source(e))
            }
        }
        // Then every worker of the service hears it: the one running the
        // call stops it, the others remember it should they pull it.
        let subject = subjects::call_cancel(client.prefix(), self.spec.service);
        let nats = client.nats();
        let sent = nats.publish(subject, self.id.clone().into()).await;
        if sent.is_ok() {
            let _ = nats.flush().await;
        }
        Ok(true)
    }

    /// Fails unless the id is one a wharf call can have.
    fn check_id(&self) -> Result<(), Error> {
        if subjects::valid_id(self.id.as_bytes()) {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Config,
            format!(
                "`{}` is not a wharf call id (letters, digits, '-' and '_')",
                self.id
            ),
        ))
    }

    /// Waits for the call's result.
    pub async fn wait(self) -> Result<R::Value, R::Err> {
        let spec = self.spec;
        let (message, codec, _) = self.wait_message().await?;
        R::decode(spec, codec, &message)
    }

    /// Waits for the reply (or the stored result), with its codec.
    pub(crate) async fn wait_message(mut self) -> Result<(Message, Codec, u32), Error> {
        let client = match self.client.take() {
            Some(client) => client,
            None => crate::client::global()?.clone(),
        };
        let durable = client.durable_state().await?;
        self.check_id()?;
        let until = Instant::now() + self.wait;
        let mut reply = self.reply.take();
        // Collected by id (no reply to wait for), a result stored already
        // is read at once rather than after the first poll's pause.
        let mut pause = if reply.is_some() {
            RESULT_POLL
        } else {
            Duration::ZERO
        };
        loop {
            let poll =
                tokio::time::sleep(pause.min(until.saturating_duration_since(Instant::now())));
            pause = RESULT_POLL;
            // A reply sent while the connection was down is lost: the
            // stored result is read at once instead.
            let losses = client.connection().losses();
            let lost = client.connection().lost_since(losses);
            let poll = async {
                tokio::select! {
                    _ = poll => {}
                    _ = lost => {}
                }
            };
            tokio::select! {
                message = async { reply.as_mut().expect("checked").await }, if reply.is_some() => {
                    match message {
                        Ok(delivered) => {
                            let message = delivered.take();
                            let codec = reply_codec(&message);
                            return Ok((message, codec, 1));
                        }
                        Err(_) => reply = None,
                    }
                }
                _ = poll => {
                    // A lookup that fails (a node lost, its bucket electing a
                    // leader) is tried again on the next round. Boxed: the
                    // KV read's future would widen every call's.
                    let (spec, id) = (self.spec, self.id.as_str());
                    let found = out_of_line(|| async move {
                        let results = durable.results(spec.service).await.ok()?;
                        results.get(id).await.ok().flatten()
                    })
                    .await;
                    if let Some(record) = found {
                        durable.replies.waiting.lock().unwrap().remove(&self.id);
                        let (message, codec) = record::decode(record)?;
                        return Ok((message, codec, 1));
                    }
                    if Instant::now() >= until {
                        durable.replies.waiting.lock().unwrap().remove(&self.id);
                        // An answer that came while the store was read.
                        if let Some(Ok(delivered)) = reply.as_mut().map(|reply| reply.try_recv()) {
                            let message = delivered.take();
                            let codec = reply_codec(&message);
                            return Ok((message, codec, 1));
                        }
                        return Err(Error::new(
                            ErrorKind::Timeout,
                            format!(
                                "no result for durable call {} of `{}` within {:?}; it stays queued or running: collect it later with `{}::collect(\"{}\")`",
                                self.id, self.spec.path, self.wait, self.spec.name, self.id
                            ),
                        ));
                    }
                }
            }
        }
    }
}
