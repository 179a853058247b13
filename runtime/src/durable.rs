//! Durable calls: at least once, through JetStream.
//!
//! A durable call is published into the service's work-queue stream
//! (`<prefix>_calls_<service>`, subjects `<prefix>.durable.<service>.<fn>`)
//! instead of being requested. A worker pulls it (no more than it has
//! permits for), runs it, stores the result in KV `wharf_results` under the
//! call id, replies to the caller's `Wharf-Reply` subject, and only then
//! acks. A worker killed mid-call means redelivery after the consumer's
//! ack wait; a call that cannot be decoded, or that was delivered more than
//! `max_deliver` times, moves to the dead-letter stream and its caller gets
//! [`ErrorKind::DeadLetter`].

use crate::client::{CallOptions, CallState, Client};
use crate::settings::Settings;
use crate::wire::codec::Codec;
use crate::wire::reply::{one_line, reply_codec};
use crate::wire::request::Prepared;
use crate::wire::subjects::{self, RESULTS_BUCKET};
use crate::wire::{headers, record};
use crate::worker::{read_request, Endpoint, Fault};
use crate::{Error, ErrorKind, FnSpec, Returns};
use async_nats::jetstream::AckKind;
use async_nats::jetstream::{self, consumer::pull, kv, stream};
use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{oneshot, watch};

pub use crate::settings::{DEFAULT_ACK_WAIT, DEFAULT_MAX_DELIVER, DEFAULT_RESULTS_TTL};

fn ack_wait() -> Duration {
    Settings::get().map_or(DEFAULT_ACK_WAIT, |s| s.ack_wait)
}

fn max_deliver() -> i64 {
    Settings::get().map_or(DEFAULT_MAX_DELIVER, |s| s.max_deliver)
}

/// Creates (or finds) the results bucket.
pub(crate) async fn results_bucket(js: &jetstream::Context) -> Result<kv::Store, Error> {
    let ttl = Settings::get()?.results_ttl;
    crate::bucket::bucket(
        js,
        RESULTS_BUCKET,
        "wharf: durable call results and idempotency records",
        ttl,
        stream::StorageType::File,
    )
    .await
}

/// Creates (or finds) the work-queue stream of `service`.
pub(crate) async fn calls_stream(
    js: &jetstream::Context,
    prefix: &str,
    service: &str,
) -> Result<stream::Stream, Error> {
    let name = subjects::calls_stream(prefix, service);
    js.get_or_create_stream(stream::Config {
        name: name.clone(),
        description: Some(format!("wharf: durable calls of service {service}")),
        subjects: vec![subjects::durable_calls(prefix, service)],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        // A caller that re-publishes after a lost ack stores its call once.
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| jetstream_error(format!("cannot create stream `{name}`: {e}")))
}

/// Creates (or finds) the dead-letter stream.
pub(crate) async fn dead_letters(js: &jetstream::Context, prefix: &str) -> Result<(), Error> {
    let name = subjects::dead_letter_stream(prefix);
    js.get_or_create_stream(stream::Config {
        name: name.clone(),
        description: Some("wharf: durable calls given up on".to_owned()),
        subjects: vec![subjects::dead_letters(prefix)],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map(|_| ())
    .map_err(|e| jetstream_error(format!("cannot create stream `{name}`: {e}")))
}

/// Creates (or finds) the pull consumer through which workers take
/// `spec`'s durable calls.
pub(crate) async fn consumer(
    stream: &stream::Stream,
    prefix: &str,
    spec: &FnSpec,
) -> Result<jetstream::consumer::Consumer<pull::Config>, Error> {
    stream
        .get_or_create_consumer(
            &subjects::durable_consumer(spec.name),
            pull::Config {
                durable_name: Some(subjects::durable_consumer(spec.name)),
                description: Some(format!("wharf: workers of {}.{}", spec.service, spec.name)),
                filter_subject: subjects::durable_call(prefix, spec.service, spec.name),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: ack_wait(),
                // Workers count deliveries themselves, so the last one is
                // dead-lettered by a worker rather than dropped by the server.
                max_deliver: -1,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| {
            jetstream_error(format!(
                "cannot create the consumer of `{}.{}`: {e}",
                spec.service, spec.name
            ))
        })
}

fn jetstream_error(message: String) -> Error {
    Error::new(
        ErrorKind::Connection,
        format!("{message}; durable calls need JetStream (nats-server -js)"),
    )
}

/// A client's durable-call state: its JetStream context, the streams it
/// knows exist, and the subscription on which workers' replies arrive.
pub(crate) struct DurableClient {
    js: jetstream::Context,
    streams: Mutex<HashSet<&'static str>>,
    replies: Arc<Replies>,
    results: tokio::sync::OnceCell<kv::Store>,
}

impl std::fmt::Debug for DurableClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableClient").finish_non_exhaustive()
    }
}

impl DurableClient {
    pub(crate) async fn new(nats: &async_nats::Client) -> Result<DurableClient, Error> {
        Ok(DurableClient {
            js: jetstream::new(nats.clone()),
            streams: Mutex::new(HashSet::new()),
            replies: Replies::start(nats).await?,
            results: tokio::sync::OnceCell::new(),
        })
    }

    async fn results(&self) -> Result<&kv::Store, Error> {
        self.results
            .get_or_try_init(|| results_bucket(&self.js))
            .await
    }

    async fn ensure_stream(&self, prefix: &str, service: &'static str) -> Result<(), Error> {
        if self.streams.lock().unwrap().contains(service) {
            return Ok(());
        }
        calls_stream(&self.js, prefix, service).await?;
        self.streams.lock().unwrap().insert(service);
        Ok(())
    }
}

/// Routes replies of durable calls, all on one wildcard subscription, to
/// the calls waiting for them.
struct Replies {
    prefix: String,
    waiting: Mutex<HashMap<String, oneshot::Sender<Message>>>,
}

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
            })?;
        let replies = Arc::new(Replies {
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
                let waiter = replies.waiting.lock().unwrap().remove(id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(message);
                }
            }
        });
        Ok(replies)
    }

    fn subject(&self, id: &str) -> String {
        subjects::durable_reply(&self.prefix, id)
    }

    fn register(&self, id: &str) -> oneshot::Receiver<Message> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap().insert(id.to_owned(), tx);
        rx
    }
}

impl Client {
    async fn durable_state(&self) -> Result<&DurableClient, Error> {
        self.durable_cell()
            .get_or_try_init(|| DurableClient::new(self.nats()))
            .await
    }

    /// Publishes a durable call into its service's stream and returns once
    /// JetStream has stored it.
    pub(crate) async fn start_durable<R: Returns>(
        &self,
        spec: &'static FnSpec,
        prepared: Prepared,
        call: CallState,
        options: &CallOptions,
    ) -> Result<Pending<R>, Error> {
        let durable = self.durable_state().await?;
        durable.ensure_stream(self.prefix(), spec.service).await?;
        let id = call.id.as_str().to_owned();
        let mut headers = prepared.headers.unwrap_or_default();
        headers.insert(headers::REPLY, durable.replies.subject(&id).as_str());
        headers.insert(headers::CALL_ID, id.as_str());
        let subject = subjects::durable_call(self.prefix(), spec.service, spec.name);
        let reply = durable.replies.register(&id);
        let policy = options.retry.unwrap_or(spec.retry);
        let mut attempt = 1;
        loop {
            let publish = jetstream::message::PublishMessage::build()
                .payload(prepared.payload.clone())
                .headers(headers.clone())
                // Within the stream's duplicate window a re-publish after a
                // lost ack is stored once.
                .message_id(&id);
            let stored = match durable.js.send_publish(subject.clone(), publish).await {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match stored {
                Ok(()) => break,
                Err(e) if attempt >= policy.attempts || Instant::now() >= call.deadline => {
                    durable.replies.waiting.lock().unwrap().remove(&id);
                    return Err(Error::new(
                        ErrorKind::Connection,
                        format!("durable call to `{}` not accepted by JetStream after {attempt} tries: {e}", spec.path),
                    ));
                }
                Err(_) => {
                    tokio::time::sleep(policy.delay(attempt)).await;
                    attempt += 1;
                }
            }
        }
        Ok(Pending {
            spec,
            id,
            client: Some(self.clone()),
            reply: Some(reply),
            wait: call.deadline.saturating_duration_since(Instant::now()) + RESULT_GRACE,
            returns: PhantomData,
        })
    }
}

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
    reply: Option<oneshot::Receiver<Message>>,
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
        if !subjects::valid_id(self.id.as_bytes()) {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "`{}` is not a wharf call id (letters, digits, '-' and '_')",
                    self.id
                ),
            ));
        }
        let until = Instant::now() + self.wait;
        let mut reply = self.reply.take();
        loop {
            let poll = tokio::time::sleep(
                RESULT_POLL.min(until.saturating_duration_since(Instant::now())),
            );
            tokio::select! {
                message = async { reply.as_mut().expect("checked").await }, if reply.is_some() => {
                    match message {
                        Ok(message) => {
                            let codec = reply_codec(&message);
                            return Ok((message, codec, 1));
                        }
                        Err(_) => reply = None,
                    }
                }
                _ = poll => {
                    let results = durable.results().await?;
                    if let Ok(Some(record)) = results.get(self.id.as_str()).await {
                        durable.replies.waiting.lock().unwrap().remove(&self.id);
                        let (message, codec) = record::decode(record)?;
                        return Ok((message, codec, 1));
                    }
                    if Instant::now() >= until {
                        durable.replies.waiting.lock().unwrap().remove(&self.id);
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

/// Most calls one pull asks for.
const MAX_BATCH: usize = 256;

/// How long one pull waits on the server for calls.
const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// Pulls `endpoint`'s durable calls until `stop` turns true. A pull asks
/// for no more calls than the worker has free permits, so a busy worker
/// leaves the queue to the others.
pub(crate) async fn serve(
    endpoint: Arc<Endpoint>,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    js: jetstream::Context,
    mut stop: watch::Receiver<bool>,
) {
    let permits = endpoint.shared.permits.clone();
    loop {
        // Room first: a worker with no free permit asks for nothing. The
        // permit is only looked at, not held while the pull waits.
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            permit = permits.acquire() => match permit {
                Ok(permit) => drop(permit),
                Err(_) => return,
            },
        }
        let room = permits.available_permits().clamp(1, MAX_BATCH);
        let batch = consumer
            .batch()
            .max_messages(room)
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(_) => {
                // The connection is down or JetStream is busy: try again
                // shortly rather than spin.
                tokio::select! {
                    _ = stop.wait_for(|stop| *stop) => return,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => continue,
                }
            }
        };
        // A batch ends when full or when its pull expires, so a drain waits
        // at most PULL_EXPIRES for this loop.
        while let Some(message) = batch.next().await {
            let Ok(message) = message else { break };
            // Plain calls may have taken the room meanwhile; then this call
            // waits here, already ours, for the next free permit.
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let endpoint = endpoint.clone();
            let js = js.clone();
            tokio::spawn(async move {
                handle(&endpoint, &js, message).await;
                drop(permit);
            });
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// Runs one durable call: checks it, runs it while keeping it claimed,
/// stores the result, replies, and only then acks.
async fn handle(endpoint: &Endpoint, js: &jetstream::Context, message: jetstream::Message) {
    let started = SystemTime::now();
    let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
    let reply = message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::REPLY))
        .map(|v| async_nats::Subject::from(v.as_str()));
    let (codec, meta, args) = match read_request(&message.message) {
        Ok(parts) => parts,
        Err((codec, fault)) => {
            let fate = Fate {
                codec,
                id: None,
                reply,
            };
            return dead_letter(endpoint, js, &message, fate, fault.message()).await;
        }
    };
    let id = subjects::valid_id(&meta.call_id)
        .then(|| String::from_utf8_lossy(&meta.call_id).into_owned());
    let fate = Fate {
        codec,
        id: id.clone(),
        reply,
    };
    let (Some(id), Some(results)) = (id, endpoint.shared.results.as_ref()) else {
        let reason = "a durable call needs a Wharf-Call-Id of letters, digits, '-' and '_' (see docs/protocol.md)";
        return dead_letter(endpoint, js, &message, fate, reason).await;
    };
    let limit = max_deliver();
    if delivered > limit {
        let reason = format!(
            "delivered {delivered} times without completing (the limit is {limit}, WHARF_MAX_DELIVER); the workers that took it died or lost their connection"
        );
        return dead_letter(endpoint, js, &message, fate, &reason).await;
    }
    if delivered > 1 {
        // A redelivery of a call that completed but whose ack was lost:
        // answer from the stored result instead of running it again.
        if let Ok(Some(record)) = results.get(id.as_str()).await {
            if let Ok((stored, _)) = record::decode(record) {
                let headers = stored.headers.unwrap_or_default();
                answer(endpoint, fate.reply, headers, stored.payload).await;
            }
            let _ = message.ack().await;
            return;
        }
    }
    // While the call runs, tell JetStream it is still ours, so a long call
    // is not handed to another worker after the ack wait.
    let keep_claimed = async {
        let every = ack_wait() / 3;
        loop {
            tokio::time::sleep(every).await;
            let _ = message.ack_with(AckKind::Progress).await;
        }
    };
    let outcome = tokio::select! {
        outcome = endpoint.execute(codec, &meta, args, started, None) => outcome,
        never = keep_claimed => never,
    };
    let (code, headers, body) = match &outcome {
        Ok(body) => (
            record::OK,
            endpoint.reply_headers(codec, &meta),
            body.clone(),
        ),
        // Arguments that cannot be decoded never will be: no redelivery.
        Err(fault) if fault.kind() == ErrorKind::BadRequest => {
            return dead_letter(endpoint, js, &message, fate, fault.message()).await;
        }
        Err(fault) => fault.answer(codec),
    };
    // Stored before the reply and the ack: a caller that misses the reply
    // still finds the result, and a crash before the ack at worst runs the
    // call again.
    if store(js, &id, record::encode(code, codec, &body))
        .await
        .is_err()
    {
        let _ = message
            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
            .await;
        return;
    }
    answer(endpoint, fate.reply, headers, body).await;
    let failure = outcome.as_ref().err().map(|fault| (code, fault.message()));
    endpoint.record(started, failure);
    let _ = message.ack().await;
}

/// Publishes a durable call's answer to its caller, if it named a reply
/// subject. A lost reply is not fatal: the result is also stored.
async fn answer(
    endpoint: &Endpoint,
    reply: Option<async_nats::Subject>,
    headers: HeaderMap,
    body: Bytes,
) {
    if let Some(reply) = reply {
        let _ = endpoint
            .shared
            .nats
            .publish_with_headers(reply, headers, body)
            .await;
    }
}

/// Where a durable call's answer goes.
struct Fate {
    codec: Codec,
    id: Option<String>,
    reply: Option<async_nats::Subject>,
}

/// Stores a result record under `id`, waiting for JetStream to confirm.
async fn store(js: &jetstream::Context, id: &str, record: Bytes) -> Result<(), String> {
    js.publish(subjects::kv_key(RESULTS_BUCKET, id), record)
        .await
        .map_err(|e| e.to_string())?
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Moves a call to the dead-letter stream with `reason`, answers its
/// caller with [`ErrorKind::DeadLetter`], and terminates it in the work
/// queue.
async fn dead_letter(
    endpoint: &Endpoint,
    js: &jetstream::Context,
    message: &jetstream::Message,
    fate: Fate,
    reason: &str,
) {
    let spec = endpoint.registration.spec;
    let prefix = &endpoint.shared.prefix;
    let mut headers = message.headers.clone().unwrap_or_default();
    headers.insert(headers::DEAD_REASON, one_line(reason).as_str());
    let publish = jetstream::message::PublishMessage::build()
        .payload(message.payload.clone())
        .headers(headers);
    let subject = subjects::dead_letter(prefix, spec.service, spec.name);
    let moved = match js.send_publish(subject, publish).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    if !moved {
        // Not stored anywhere yet: leave it in the work queue for later.
        let _ = message
            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
            .await;
        return;
    }
    let stream = subjects::dead_letter_stream(prefix);
    let fault = Fault::new(
        ErrorKind::DeadLetter,
        format!(
            "durable call {} of `{}.{}` was moved to the dead-letter stream `{stream}`: {reason}",
            fate.id.as_deref().unwrap_or("(no call id)"),
            spec.service,
            spec.name
        ),
    );
    let (code, headers, body) = fault.answer(fate.codec);
    if let Some(id) = &fate.id {
        let _ = store(js, id, record::encode(code, fate.codec, &body)).await;
    }
    answer(endpoint, fate.reply, headers, body).await;
    endpoint.record(SystemTime::now(), Some((code, fault.message())));
    let _ = message.ack_with(AckKind::Term).await;
}
