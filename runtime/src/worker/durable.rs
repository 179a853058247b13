//! Durable calls on the worker: pulls them from the service's work queue
//! (no more than there are free slots), runs each while keeping it claimed,
//! stores the result, replies, and only then acks (a call of a batch whose
//! caller confirms the answers it takes replies first, and its result is
//! stored only if the caller did not take it); a call that cannot succeed
//! goes to the dead-letter stream.

use super::dispatch::{batch_entry, read_request};
use super::endpoint::{Endpoint, Stop};
use super::reply::ReplyTo;
use super::stores::{NotStored, Stores};
use crate::boxed::{out_of_line, OutOfLine};
use crate::durable::streams::{ack_wait, max_deliver};
use crate::error::ErrorKind;
use crate::handler::Fault;
use crate::wire::batch::{self, MAX_BATCH_CALLS};
use crate::wire::codec::Codec;
use crate::wire::reply::one_line;
use crate::wire::subjects;
use crate::wire::{headers, record};
use async_nats::jetstream::{self, consumer::pull, kv, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{oneshot, watch};

/// Most calls one pull asks for.
const MAX_BATCH: usize = 256;

/// How long one pull waits on the server for calls.
const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// Pulls `endpoint`'s durable calls until `stop` turns true. A pull asks
/// for no more calls than the worker has free permits, so a busy worker
/// leaves the queue to the others.
///
/// With `batched`, each message of the consumer is a batch of calls
/// ([`crate::wire::batch`]): every call in it takes a permit, and the
/// message is acked once all of them have settled ([`take_batch`]).
pub(crate) async fn serve(
    endpoint: Arc<Endpoint>,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    js: jetstream::Context,
    mut stop: watch::Receiver<bool>,
    batched: bool,
) {
    let permits = endpoint.shared.permits.clone();
    // The batches of the last pull whose calls are not yet all running
    // or in line for a slot (each closes its channel once they are).
    let mut starting: Vec<oneshot::Receiver<()>> = Vec::new();
    loop {
        // Those first: until their calls are in line, free slots are
        // theirs, not room for more calls.
        for started in starting.drain(..) {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                _ = started => {}
            }
        }
        // Room first: a worker with no free permit asks for nothing. The
        // permit is only looked at, not held while the pull waits.
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            permit = permits.acquire() => match permit {
                Ok(permit) => drop(permit),
                Err(_) => return,
            },
        }
        let room = if batched {
            // A batch holds up to MAX_BATCH_CALLS calls.
            (permits.available_permits() / MAX_BATCH_CALLS).clamp(1, MAX_BATCH)
        } else {
            permits.available_permits().clamp(1, MAX_BATCH)
        };
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
            if batched {
                let (started, starts) = oneshot::channel();
                take_batch(&endpoint, &js, &permits, message, started);
                starting.push(starts);
                continue;
            }
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

/// How a durable message leaves (or stays in) the work queue.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Settle {
    /// Done: its result (or its dead letter) is stored.
    Ack,
    /// Not done: delivered again after a pause.
    Nak,
    /// Never to be delivered again (cancelled, dead-lettered).
    Term,
}

/// Runs one durable call while keeping its message claimed, then settles
/// the message.
async fn handle(endpoint: &Endpoint, js: &jetstream::Context, message: jetstream::Message) {
    let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
    // While the call runs (and its result is stored), tell JetStream it is
    // still ours, so it is not handed to another worker after the ack wait.
    let settle = tokio::select! {
        settle = process(endpoint, js, &message.message, delivered, None) => settle,
        never = keep_claimed(&message) => match never {},
    };
    settle_message(&message, settle).await;
}

/// Takes a batch of durable calls: one task keeps the message claimed
/// from the moment it arrives, runs each call as a call alone runs (in a
/// slot of its own: a batch of more calls than the worker has slots runs
/// as many as there are), and settles the message once all have settled:
/// acked when every call is done, else delivered again (the calls whose
/// results are stored are then answered from them). The last call's slot
/// is held until the message is settled, so a drain does not end between
/// a call's answer and its batch's ack. `started` is dropped once every
/// call of the batch is running or in line for a slot.
fn take_batch(
    endpoint: &Arc<Endpoint>,
    js: &jetstream::Context,
    permits: &Arc<tokio::sync::Semaphore>,
    message: jetstream::Message,
    started: oneshot::Sender<()>,
) {
    let (endpoint, js, permits) = (endpoint.clone(), js.clone(), permits.clone());
    tokio::spawn(async move {
        let settle = tokio::select! {
            settle = run_batch(&endpoint, &js, &permits, &message, started) => settle,
            never = keep_claimed(&message) => match never {},
        };
        // None: the worker shut down before the calls could start; the
        // message is delivered again, to another worker.
        if let Some((settle, _held)) = settle {
            settle_message(&message, settle).await;
        }
    });
}

/// Runs the calls of a batch ([`take_batch`]); says how to settle its
/// message, with the slot to keep until it is settled.
async fn run_batch(
    endpoint: &Endpoint,
    js: &jetstream::Context,
    permits: &Arc<tokio::sync::Semaphore>,
    message: &jetstream::Message,
    started: oneshot::Sender<()>,
) -> Option<(Settle, tokio::sync::OwnedSemaphorePermit)> {
    let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
    let calls = match batch::decode_requests(&message.payload) {
        Ok(calls) => calls,
        Err(reason) => {
            // Its calls cannot be told apart: the batch as a whole is
            // moved to the dead letters, its callers time out.
            let held = permits.clone().acquire_owned().await.ok()?;
            drop(started);
            let fate = Fate {
                codec: Codec::Postcard,
                id: None,
                reply: None,
            };
            let reason = format!("a batch of durable calls that does not decode: {reason}");
            let settle = dead_letter(endpoint, js, &message.message, fate, &reason).await;
            return Some((settle, held));
        }
    };
    let base = message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::REPLY))
        .map(|v| v.as_str());
    let batch_reply =
        base.map(|base| async_nats::Subject::from(subjects::durable_batch_reply(base)));
    let batch_reply = batch_reply.as_ref();
    let confirm = message
        .headers
        .as_ref()
        .is_some_and(|h| h.get(headers::CONFIRM).is_some());
    let kept = Kept::default();
    let kept = &kept;
    let width = calls.len().clamp(1, endpoint.shared.concurrency);
    let mut left = calls.len();
    let mut settled = futures_util::stream::iter((0u32..).zip(calls))
        .map(|(index, payload)| {
            let request = batch_entry(&message.subject, payload);
            async move {
                // A slot of its own, one at a time: a batch never holds
                // slots it is not using, nor waits for several at once.
                let permit = permits.clone().acquire_owned().await.ok()?;
                let within = Within {
                    base,
                    batch_reply,
                    confirm,
                    kept,
                    index,
                };
                let settle = process(endpoint, js, &request, delivered, Some(within)).await;
                Some((settle, permit))
            }
        })
        // The batch's calls run concurrently in one task rather than a
        // task each: a task per call cost a tenth of the worker's CPU, and
        // nothing is lost, as sync functions run on the blocking pool and
        // each call keeps its own slot, deadline and cancel.
        .buffer_unordered(width);
    // Polled once, every call of the batch is running or in line for a
    // slot (the semaphore is fair): only then may the pull loop look for
    // room again, so it never counts this batch's slots as free.
    let polled = futures_util::poll!(settled.next());
    drop(started);
    let mut next = match polled {
        std::task::Poll::Ready(next) => next,
        std::task::Poll::Pending => settled.next().await,
    };
    let (mut again, mut held) = (false, None);
    while let Some(done) = next {
        left -= 1;
        match done {
            Some((settle, permit)) => {
                again |= !matches!(settle, Settle::Ack | Settle::Term);
                // The last call's slot stays until the message is
                // settled; the others are free at once.
                if left == 0 {
                    held = Some(permit);
                }
            }
            None => again = true,
        }
        next = settled.next().await;
    }
    if again {
        // Delivered again, the batch's calls whose answers were taken are
        // answered from their results rather than run again.
        let kept = std::mem::take(&mut *kept.lock().unwrap());
        let service = endpoint.registration.spec.service;
        for (id, code, codec, body) in kept {
            let record = record::encode(code, codec, &body);
            store_patiently(&endpoint.shared.stores, service, &id, &record).await;
        }
    }
    let settle = if again { Settle::Nak } else { Settle::Ack };
    Some((settle, held?))
}

/// Results of a batch's calls not stored (their answers were taken): call
/// id, code, codec and body, made into records only if they are stored.
type Kept = std::sync::Mutex<Vec<(String, u16, Codec, Bytes)>>;

/// Acks, naks or terminates `message` as `settle` says.
async fn settle_message(message: &jetstream::Message, settle: Settle) {
    let _ = match settle {
        Settle::Ack => message.ack().await,
        Settle::Nak => {
            message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await
        }
        Settle::Term => message.ack_with(AckKind::Term).await,
    };
}

/// Where one call of a batch stands in it.
#[derive(Clone, Copy)]
struct Within<'a> {
    /// The batch's reply base (`Wharf-Reply`), if it named one.
    base: Option<&'a str>,
    /// Where the answers of the batch's calls go together (made once per
    /// batch), if it named a base.
    batch_reply: Option<&'a async_nats::Subject>,
    /// Its caller confirms the answers it takes (`Wharf-Confirm`).
    confirm: bool,
    /// The results of its calls whose answers were taken and not stored:
    /// stored after all should the batch have to be delivered again.
    kept: &'a Kept,
    /// The call's place in the batch, from 0.
    index: u32,
}

/// Runs one durable call: checks it, runs it, stores the result, and
/// replies; says how its message is to be settled. `request` is the call's
/// message, or one call of a batch (`within`).
async fn process(
    endpoint: &Endpoint,
    js: &jetstream::Context,
    request: &async_nats::Message,
    delivered: i64,
    within: Option<Within<'_>>,
) -> Settle {
    let started = SystemTime::now();
    if delivered > 1 {
        endpoint.stats.redeliveries.fetch_add(1, Ordering::Relaxed);
    }
    let inbox_prefix = crate::settings::Settings::get()
        .map_or(subjects::DEFAULT_INBOX_PREFIX, |s| {
            s.credentials.inbox_prefix()
        });
    let parts = read_request(request);
    let (codec, id) = match &parts {
        Ok((codec, meta, _)) => (
            *codec,
            subjects::valid_id(&meta.call_id)
                .then(|| String::from_utf8_lossy(&meta.call_id).into_owned()),
        ),
        Err((codec, _)) => (*codec, None),
    };
    let named = match within {
        None => request
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::REPLY))
            .map(|v| v.as_str().to_owned()),
        Some(within) => within
            .base
            .zip(id.as_deref())
            .map(|(base, id)| subjects::durable_reply(base, id)),
    };
    // A worker answers only to an inbox: a request must not be able to make
    // it publish onto any other subject (a drain, a stop, another call).
    let (reply, refused) = match named {
        Some(named) if subjects::valid_reply(&named, inbox_prefix) => {
            (Some(async_nats::Subject::from(named)), None)
        }
        named => (None, named),
    };
    if let Some(named) = refused {
        let fate = Fate {
            codec,
            id,
            reply: None,
        };
        let reason = format!(
            "Wharf-Reply `{}` is not an inbox subject: a durable call's reply goes to `_INBOX.<...>` (see docs/protocol.md)",
            subjects::shown(&named)
        );
        return dead_letter(endpoint, js, request, fate, &reason).await;
    }
    let (codec, meta, args) = match parts {
        Ok(parts) => parts,
        Err((codec, fault)) => {
            let fate = Fate {
                codec,
                id: None,
                reply,
            };
            return dead_letter(endpoint, js, request, fate, fault.message()).await;
        }
    };
    let fate = Fate {
        codec,
        id: id.clone(),
        reply,
    };
    let (Some(id), Some(results)) = (id, endpoint.results.as_ref()) else {
        let reason = "a durable call needs a Wharf-Call-Id of letters, digits, '-' and '_' (see docs/protocol.md)";
        return dead_letter(endpoint, js, request, fate, reason).await;
    };
    if delivered > 1 {
        // A redelivery of a call that completed but whose ack was lost (or
        // of a batch another of whose calls did not complete): answer from
        // the stored result instead of running it again.
        if answer_stored(endpoint, results, &id, fate.reply.clone()).await {
            return Settle::Ack;
        }
    }
    // Checked only for calls that did not complete: a completed call is
    // never dead-lettered for its deliveries.
    let limit = max_deliver();
    if delivered > limit {
        let reason = format!(
            "delivered {delivered} times without completing (the limit is {limit}, WHARF_MAX_DELIVER); the workers that took it died or lost their connection"
        );
        return dead_letter(endpoint, js, request, fate, &reason).await;
    }
    if endpoint.shared.cancels.contains(id.as_bytes()) {
        // Cancelled before it reached a worker: it never runs.
        endpoint.shared.cancelled.fetch_add(1, Ordering::Relaxed);
        return settle_cancelled(endpoint, fate, &id).await;
    }
    // Held while it runs, so a cancel finds it and stops it.
    let held = Bytes::copy_from_slice(id.as_bytes());
    let (stop, stopped) = tokio::sync::oneshot::channel();
    endpoint.track(&held);
    endpoint.shared.running.attach(&held, Stop::Signal(stop));
    let outcome = tokio::select! {
        outcome = endpoint.execute(codec, &meta, args, started, None) => Some(outcome),
        Ok(()) = stopped => None,
    };
    endpoint.untrack(&held);
    let Some(outcome) = outcome else {
        return settle_cancelled(endpoint, fate, &id).await;
    };
    let (code, headers, body) = match &outcome {
        Ok(body) => (
            record::OK,
            endpoint.reply_headers(codec, &meta),
            body.clone(),
        ),
        // Arguments that cannot be decoded never will be: no redelivery.
        Err(fault) if fault.kind() == ErrorKind::BadRequest => {
            return dead_letter(endpoint, js, request, fate, fault.message()).await;
        }
        Err(fault) => fault.answer(codec),
    };
    let service = endpoint.registration.spec.service;
    // The answers of a batch's calls gather in the outbox and go to the
    // caller together, as they become ready.
    let batched = within
        .filter(|_| fate.reply.is_some())
        .and_then(|within| Some((within, within.batch_reply?)));
    if let Some((within, subject)) = batched.filter(|(within, _)| within.confirm) {
        // Its caller confirms the answers it takes: the result of one it
        // took need not be stored (nobody else knows the call's id), and
        // the call leaves the work queue; the result of one it did not
        // take is stored as any other, before the ack.
        let (confirm, confirmed) = oneshot::channel();
        let to = batch_answer(subject, within.index, Some(confirm));
        endpoint
            .send_reply(to, Some(with_call_id(headers, &id)), body.clone())
            .await;
        // Counted once answered: its processing time is the call's, not
        // the caller's round trip to confirm it.
        endpoint.record(started, outcome.as_ref().err());
        if confirmed.await.unwrap_or(false) {
            within.kept.lock().unwrap().push((id, code, codec, body));
        } else {
            let record = record::encode(code, codec, &body);
            let stored = store_patiently(&endpoint.shared.stores, service, &id, &record).await;
            if matches!(stored, Stored::Not) {
                return Settle::Nak;
            }
        }
        return Settle::Ack;
    }
    // Stored before the reply and the ack: a caller that misses the reply
    // still finds the result, and a crash before the ack at worst runs the
    // call again. The call has run: while JetStream cannot take the result
    // (its bucket electing a leader after a node loss), keep trying, still
    // holding the call, rather than give it up to run again and count a
    // delivery towards the dead-letter limit.
    let record = record::encode(code, codec, &body);
    match store_patiently(&endpoint.shared.stores, service, &id, &record).await {
        Stored::Now => match batched {
            Some((within, subject)) => {
                let to = batch_answer(subject, within.index, None);
                endpoint
                    .send_reply(to, Some(with_call_id(headers, &id)), body)
                    .await;
            }
            None => answer(endpoint, fate.reply, headers, body).await,
        },
        Stored::Before => {
            // Cancelled meanwhile (by a canceller whose cancel this worker
            // did not hear), or run before: what is stored is the answer.
            answer_stored(endpoint, results, &id, fate.reply).await;
        }
        Stored::Not => return Settle::Nak,
    }
    endpoint.record(started, outcome.as_ref().err());
    Settle::Ack
}

/// The `index`th answer of a batch, to go out with the others on
/// `subject` (asking its caller to confirm it, with `confirm`).
fn batch_answer(
    subject: &async_nats::Subject,
    index: u32,
    confirm: Option<super::outbox::Confirm>,
) -> ReplyTo {
    ReplyTo::Batch {
        subject: subject.clone(),
        index,
        confirm,
    }
}

/// A batch answer's headers: the call's reply headers and its call id, by
/// which its caller matches it to the call.
fn with_call_id(mut headers: HeaderMap, id: &str) -> HeaderMap {
    headers.insert(headers::CALL_ID, id);
    headers
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

/// Answers a durable call from the result stored under `id`, if there is
/// one; false when none is stored (or the store cannot be read).
///
/// This and the other rare ends of a durable call ([`settle_cancelled`],
/// [`dead_letter`]) are boxed: inline, their futures (a KV read, a
/// JetStream publish) made every call's future several KiB, which a batch
/// allocates per call and the runtime moves.
fn answer_stored<'a>(
    endpoint: &'a Endpoint,
    results: &'a kv::Store,
    id: &'a str,
    reply: Option<async_nats::Subject>,
) -> OutOfLine<'a, bool> {
    out_of_line(move || answer_stored_now(endpoint, results, id, reply))
}

async fn answer_stored_now(
    endpoint: &Endpoint,
    results: &kv::Store,
    id: &str,
    reply: Option<async_nats::Subject>,
) -> bool {
    let Ok(Some(record)) = results.get(id).await else {
        return false;
    };
    if let Ok((stored, _)) = record::decode(record) {
        let headers = stored.headers.unwrap_or_default();
        answer(endpoint, reply, headers, stored.payload).await;
    }
    true
}

/// Where a durable call's answer goes.
struct Fate {
    codec: Codec,
    id: Option<String>,
    reply: Option<async_nats::Subject>,
}

/// Tells JetStream every third of the ack wait that `message` is still
/// being worked on; never ends.
async fn keep_claimed(message: &jetstream::Message) -> std::convert::Infallible {
    let every = ack_wait() / 3;
    loop {
        tokio::time::sleep(every).await;
        let _ = message.ack_with(AckKind::Progress).await;
    }
}

/// How long a worker keeps trying to store a result before it gives the
/// call back to the work queue.
const STORE_PATIENCE: Duration = Duration::from_secs(60);

/// Whether a result got stored.
enum Stored {
    /// This one, now.
    Now,
    /// Another was there already: the call was cancelled, or ran before.
    Before,
    /// JetStream did not confirm within [`STORE_PATIENCE`].
    Not,
}

/// Stores a result record unless one is stored already, trying again
/// (with a growing pause, up to a second) until JetStream confirms or
/// [`STORE_PATIENCE`] runs out.
async fn store_patiently(stores: &Stores, service: &str, id: &str, record: &Bytes) -> Stored {
    let until = tokio::time::Instant::now() + STORE_PATIENCE;
    let mut pause = Duration::from_millis(50);
    loop {
        match store(stores, service, id, record.clone()).await {
            Ok(()) => return Stored::Now,
            Err(NotStored::Exists) => return Stored::Before,
            Err(NotStored::Unconfirmed) => {}
        }
        if tokio::time::Instant::now() + pause > until {
            return Stored::Not;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Stores a result record under `id` when none is there yet (a KV
/// create: a cancel's record, or an earlier run's, is never overwritten),
/// waiting for JetStream to confirm.
async fn store(stores: &Stores, service: &str, id: &str, record: Bytes) -> Result<(), NotStored> {
    stores
        .create(subjects::result_key(service, id), record)
        .await
}

/// Ends a durable call that was cancelled: its record (code 499) was
/// stored by whoever cancelled it; its caller is told, and the call leaves
/// the work queue for good.
fn settle_cancelled<'a>(endpoint: &'a Endpoint, fate: Fate, id: &'a str) -> OutOfLine<'a, Settle> {
    out_of_line(move || settle_cancelled_now(endpoint, fate, id))
}

async fn settle_cancelled_now(endpoint: &Endpoint, fate: Fate, id: &str) -> Settle {
    let spec = endpoint.registration.spec;
    let fault = Fault::new(
        ErrorKind::Cancelled,
        format!(
            "durable call {id} of `{}.{}` was cancelled",
            spec.service, spec.name
        ),
    );
    let (_, headers, body) = fault.answer(fate.codec);
    answer(endpoint, fate.reply, headers, body).await;
    endpoint.record(SystemTime::now(), Some(&fault));
    Settle::Term
}

/// Moves a call to the dead-letter stream with `reason`, answers its
/// caller with [`ErrorKind::DeadLetter`], and terminates it in the work
/// queue.
///
/// `request` is the call's message, or one call of a batch: its dead
/// letter then names its reply subject and call id in headers, as a call
/// sent alone would.
fn dead_letter<'a>(
    endpoint: &'a Endpoint,
    js: &'a jetstream::Context,
    request: &'a async_nats::Message,
    fate: Fate,
    reason: &'a str,
) -> OutOfLine<'a, Settle> {
    out_of_line(move || dead_letter_now(endpoint, js, request, fate, reason))
}

async fn dead_letter_now(
    endpoint: &Endpoint,
    js: &jetstream::Context,
    request: &async_nats::Message,
    fate: Fate,
    reason: &str,
) -> Settle {
    let spec = endpoint.registration.spec;
    let prefix = &endpoint.shared.prefix;
    let mut headers = request.headers.clone().unwrap_or_default();
    if headers.get(headers::REPLY).is_none() {
        if let Some(reply) = &fate.reply {
            headers.insert(headers::REPLY, reply.as_str());
        }
    }
    if headers.get(headers::CALL_ID).is_none() {
        if let Some(id) = &fate.id {
            headers.insert(headers::CALL_ID, id.as_str());
        }
    }
    headers.insert(headers::DEAD_REASON, one_line(reason).as_str());
    let publish = jetstream::message::PublishMessage::build()
        .payload(request.payload.clone())
        .headers(headers);
    let subject = subjects::dead_letter(prefix, spec.service, spec.name);
    let moved = match js.send_publish(subject, publish).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    if !moved {
        // Not stored anywhere yet: leave it in the work queue for later.
        return Settle::Nak;
    }
    endpoint.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
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
        let _ = store(
            &endpoint.shared.stores,
            endpoint.registration.spec.service,
            id,
            record::encode(code, fate.codec, &body),
        )
        .await;
    }
    answer(endpoint, fate.reply, headers, body).await;
    endpoint.record(SystemTime::now(), Some(&fault));
    Settle::Term
}
