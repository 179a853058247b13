//! Intake: takes calls from an endpoint's subscription, admits each (a
//! slot now, a place in the bounded backlog, or a 503), leaves the queue
//! group without losing a call when a drain begins, and routes each call
//! to the stage that serves it.

use super::dispatch::{admit, batch_entry, read_request};
use super::endpoint::{round_trip, Admission, Endpoint, Stop};
use super::reply::ReplyTo;
use crate::boxed::out_of_line;
use crate::error::ErrorKind;
use crate::handler::Fault;
use crate::wire::batch;
use crate::wire::codec::Codec;
use crate::wire::request::CallMeta;
use bytes::Bytes;
use futures_util::StreamExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// Calls a draining endpoint may still be sent, beyond those it has taken,
/// until its first tightening: more than can be in flight between the
/// server and the endpoint loop.
const DRAIN_HEADROOM: u64 = 1024;

/// How long a draining endpoint waits without a call before it leaves.
const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// How often a draining endpoint that still takes calls lowers its limit
/// to what its rate of calls brings in a few round trips.
const DRAIN_TIGHTEN: Duration = Duration::from_millis(300);

/// Round trips' worth of calls, at the rate seen since the drain began, a
/// tightened limit leaves room for: calls the server routes here after
/// the measuring round trip and before it reads the new limit.
const TIGHTEN_ROUND_TRIPS: f64 = 8.0;

/// A subscription leaving its queue group, without losing a call.
///
/// A plain UNSUB (or async-nats's drain) drops the subscription at once on
/// the client, and calls the server routed here before it read the UNSUB
/// are thrown away. An UNSUB with a message limit makes server and client
/// stop at the same count, so every call the server sends still arrives
/// and is served. The limit starts at [`DRAIN_HEADROOM`], which a busy
/// endpoint soon reaches; one that takes calls at a trickle would not (and
/// would hold the drain until its grace ran out, with calls running), so
/// every [`DRAIN_TIGHTEN`] the limit is lowered to the calls delivered so
/// far (known exactly after a round trip to the server) plus what
/// [`TIGHTEN_ROUND_TRIPS`] round trips bring at the rate seen. One that
/// takes none for [`DRAIN_QUIET`], checked by a round trip too, leaves
/// outright. What is left to chance is a burst of more calls than that
/// room within one round trip, or a call in the round trip after a quiet
/// spell: NATS core offers no leave that is exact.
struct Leaving {
    /// When the drain began, and the calls taken by then.
    since: std::time::Instant,
    taken_before: u64,
    /// The message limit last sent.
    limit: u64,
    next_tighten: std::time::Instant,
    /// Calls read off the subscription while tightening, to be taken next.
    read: std::collections::VecDeque<async_nats::Message>,
    /// The subscription ended while tightening: its limit was reached.
    ended: bool,
}

/// What a leaving subscription gives the intake loop next.
enum Step {
    /// A call to take, or `None`: the limit was reached.
    Call(Option<async_nats::Message>),
    /// It left the queue group with nothing on its way.
    Left,
}

impl Leaving {
    /// Starts leaving, with `taken` calls taken so far.
    async fn start(subscriber: &mut async_nats::Subscriber, taken: u64) -> Self {
        let limit = taken + DRAIN_HEADROOM;
        let _ = subscriber.unsubscribe_after(limit).await;
        let now = std::time::Instant::now();
        Self {
            since: now,
            taken_before: taken,
            limit,
            next_tighten: now + DRAIN_TIGHTEN,
            read: Default::default(),
            ended: false,
        }
    }

    /// The next call, `taken` calls having been taken so far.
    async fn next(
        &mut self,
        nats: &async_nats::Client,
        subscriber: &mut async_nats::Subscriber,
        taken: u64,
    ) -> Step {
        loop {
            if let Some(message) = self.read.pop_front() {
                return Step::Call(Some(message));
            }
            if self.ended {
                return Step::Call(None);
            }
            let now = std::time::Instant::now();
            if now >= self.next_tighten {
                self.tighten(nats, subscriber, taken).await;
                continue;
            }
            let wait = DRAIN_QUIET.min(self.next_tighten - now);
            match tokio::time::timeout(wait, subscriber.next()).await {
                Ok(message) => return Step::Call(message),
                Err(_) if wait < DRAIN_QUIET => continue,
                Err(_) => match confirm_quiet(nats, subscriber).await {
                    Quiet::Yes => {
                        let _ = subscriber.unsubscribe().await;
                        return Step::Left;
                    }
                    Quiet::No(message) => return Step::Call(message),
                    Quiet::Unsure => continue,
                },
            }
        }
    }

    /// Lowers the limit: after a round trip every call routed here before
    /// the server read it has been delivered, and reading them off the
    /// subscription counts them.
    async fn tighten(
        &mut self,
        nats: &async_nats::Client,
        subscriber: &mut async_nats::Subscriber,
        taken: u64,
    ) {
        self.next_tighten = std::time::Instant::now() + DRAIN_TIGHTEN;
        let sent = std::time::Instant::now();
        if !round_trip(nats, DRAIN_TIGHTEN).await {
            return;
        }
        let round_trip = sent.elapsed();
        while let Some(message) = futures_util::FutureExt::now_or_never(subscriber.next()) {
            match message {
                Some(message) => self.read.push_back(message),
                None => {
                    self.ended = true;
                    return;
                }
            }
        }
        let delivered = taken + self.read.len() as u64;
        let rate = (delivered - self.taken_before) as f64 / self.since.elapsed().as_secs_f64();
        let room = (rate * round_trip.as_secs_f64() * TIGHTEN_ROUND_TRIPS).ceil() as u64 + 2;
        if delivered + room < self.limit {
            self.limit = delivered + room;
            let _ = subscriber.unsubscribe_after(self.limit).await;
        }
    }
}

/// What a round trip to the server says of a draining subscription that
/// seemed quiet.
enum Quiet {
    /// Nothing was on its way: it may leave.
    Yes,
    /// A call was on its way (or the subscription ended): the drain goes on.
    No(Option<async_nats::Message>),
    /// The server did not answer in time.
    Unsure,
}

/// A draining subscription seemed quiet, but a starved process can miss
/// calls the server already sent: its timer fires before the connection
/// reads them. A round trip to the server settles it: every call routed
/// here before the server read ours has been delivered by its return.
async fn confirm_quiet(
    nats: &async_nats::Client,
    subscriber: &mut async_nats::Subscriber,
) -> Quiet {
    if nats.connection_state() != async_nats::connection::State::Connected {
        // Nothing more can arrive on a connection that is down.
        return Quiet::Yes;
    }
    if !round_trip(nats, DRAIN_QUIET).await {
        // Too slow to tell; the drain's grace bounds the waiting.
        return Quiet::Unsure;
    }
    match futures_util::FutureExt::now_or_never(subscriber.next()) {
        None => Quiet::Yes,
        Some(message) => Quiet::No(message),
    }
}

/// Which of an endpoint's subjects a subscription takes calls from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// The plain subject, in the queue group.
    Plain,
    /// The subject of this build's signature, in the queue group.
    Signed,
    /// This instance's own subject for the transactions it owns.
    Owner,
    /// The subject of this build's signature for batches of calls.
    Batch,
}

impl Endpoint {
    /// Takes calls from `subscriber` until `stop` turns true, then
    /// unsubscribes and still runs every call already delivered. `via`
    /// says which of the endpoint's subjects the subscription is.
    pub(crate) async fn serve(
        self: Arc<Self>,
        mut subscriber: async_nats::Subscriber,
        mut stop: watch::Receiver<bool>,
        via: Via,
    ) {
        let endpoint = self;
        let direct = via == Via::Owner;
        let mut leaving: Option<Leaving> = None;
        // Messages taken from the subscription, for a lossless leave.
        let mut received: u64 = 0;
        // Made once, not per message: this loop is the hot path.
        let stop_signal = stop.changed();
        tokio::pin!(stop_signal);
        loop {
            let message = if let Some(leave) = &mut leaving {
                match leave
                    .next(&endpoint.shared.nats, &mut subscriber, received)
                    .await
                {
                    Step::Call(message) => message,
                    Step::Left => return,
                }
            } else {
                tokio::select! {
                    // Stop first: under load a message is always ready, and
                    // intake must still end when a drain begins.
                    biased;
                    _ = &mut stop_signal => {
                        leaving = Some(Leaving::start(&mut subscriber, received).await);
                        continue;
                    }
                    message = subscriber.next() => message,
                }
            };
            let Some(message) = message else { return };
            received += 1;
            if via == Via::Signed {
                // This loop is the only writer: a plain store, not a locked
                // add, on the hot path.
                endpoint.stats.signed.store(received, Ordering::Relaxed);
            }
            if via == Via::Batch {
                if !endpoint.take_batch(message).await {
                    return;
                }
                continue;
            }
            let reply = message.reply.clone().map(ReplyTo::Inbox);
            if !endpoint.take(message, reply, direct).await {
                return;
            }
        }
    }

    /// Takes the calls of a batch (wire/batch.rs), each as a call of its
    /// own, then sends the answers that are ready, together. A batch that
    /// does not decode is answered 400 as a whole. False once the worker
    /// stops taking calls.
    async fn take_batch(self: &Arc<Self>, message: async_nats::Message) -> bool {
        let Some(reply) = message.reply.clone() else {
            return true;
        };
        let requests = match batch::decode_requests(&message.payload) {
            Ok(requests) => requests,
            Err(problem) => {
                let spec = self.registration.spec;
                let fault = Fault::new(
                    ErrorKind::BadRequest,
                    format!(
                        "a batch of calls to `{}.{}` does not decode: {problem}; see docs/protocol.md, \"Coalesced calls\"",
                        spec.service, spec.name
                    ),
                );
                self.respond_fault(
                    ReplyTo::Inbox(reply),
                    Codec::Postcard,
                    fault,
                    SystemTime::now(),
                )
                .await;
                return true;
            }
        };
        // This loop is the only writer.
        let taken = self.stats.batched.load(Ordering::Relaxed) + requests.len() as u64;
        self.stats.batched.store(taken, Ordering::Relaxed);
        let outbox = self.shared.outbox.clone();
        outbox.begin_batch();
        let mut open = true;
        for (index, payload) in requests.into_iter().enumerate() {
            let call = batch_entry(&message.subject, payload);
            let reply = ReplyTo::Batch {
                subject: reply.clone(),
                index: index as u32,
                confirm: None,
            };
            if !self.take(call, Some(reply), false).await {
                open = false;
                break;
            }
        }
        outbox.end_batch().await;
        open
    }

    /// Admits one call (a slot now, a place in the bounded backlog, or a
    /// 503) and gives it its first poll; false once the worker stops
    /// taking calls.
    async fn take(
        self: &Arc<Self>,
        message: async_nats::Message,
        reply: Option<ReplyTo>,
        direct: bool,
    ) -> bool {
        let endpoint = self;
        let shared = &endpoint.shared;
        let admission = match shared.permits.clone().try_acquire_owned() {
            Ok(permit) => Admission::Running(permit),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                // At the limit: wait in a bounded local queue (the
                // semaphore is fair, so in arrival order), and past its
                // bound refuse with 503 so the caller tries elsewhere.
                if shared.backlog.fetch_add(1, Ordering::Relaxed) >= shared.max_backlog {
                    shared.backlog.fetch_sub(1, Ordering::Relaxed);
                    if let Some(reply) = reply {
                        tokio::spawn(endpoint.clone().refuse(message, reply));
                    }
                    return true;
                }
                Admission::Queued
            }
            Err(tokio::sync::TryAcquireError::Closed) => return false,
        };
        // A call of a fast async function usually ends in its first
        // poll (decode, run, hand the reply to the connection): that
        // poll runs here, and only a call that must wait (a sync
        // function on the blocking pool, a full backlog, a store) pays
        // for a task. The future is boxed with no wrapper around it
        // (the permit rides inside), so a spawn moves only a box.
        // A panic there ends that call only, as it would end its task.
        let (mut call, id) = endpoint.handle(message, reply, direct, admission);
        let pending = std::future::poll_fn(|cx| {
            let poll = std::panic::catch_unwind(AssertUnwindSafe(|| call.as_mut().poll(cx)));
            Poll::Ready(matches!(poll, Ok(Poll::Pending)))
        })
        .await;
        if pending {
            let task = tokio::spawn(call);
            // Only a call that outlives its first poll can be cancelled:
            // its task is what a cancel aborts.
            if !id.is_empty() {
                shared.running.attach(&id, Stop::Abort(task.abort_handle()));
            }
        }
        true
    }

    /// Answers a call this worker has no room for with 503.
    pub(crate) async fn refuse(self: Arc<Self>, message: async_nats::Message, reply: ReplyTo) {
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
    /// future, spawned as it is, with the call id under which it is held
    /// (empty when it is not: no id, or a stateful call). The common call (not spilled, not
    /// idempotent, signature and deadline checked here) gets a future of its
    /// own that holds only what it needs: every call allocates and moves
    /// its future, and that one stays small enough for the allocator's
    /// fast path.
    pub(crate) fn handle(
        self: &Arc<Self>,
        message: async_nats::Message,
        reply: Option<ReplyTo>,
        direct: bool,
        admission: Admission,
    ) -> (Pin<Box<dyn Future<Output = ()> + Send>>, Bytes) {
        // One clock read serves the deadline check and the processing time.
        let started = SystemTime::now();
        let endpoint = self.clone();
        let spec = endpoint.registration.spec;
        let Some(reply) = reply else {
            // A publish, not a request: nobody waits for an answer.
            admission.leave(&endpoint.shared);
            return (Box::pin(std::future::ready(())), Bytes::new());
        };
        if spec.stateful {
            // Workers take no batches of stateful functions (their calls
            // carry a transaction and are never coalesced).
            let ReplyTo::Inbox(reply) = reply else {
                admission.leave(&endpoint.shared);
                return (Box::pin(std::future::ready(())), Bytes::new());
            };
            let call = Box::pin(async move {
                let Some(_permit) = admission.run(&endpoint.shared).await else {
                    return;
                };
                endpoint.run_stateful(reply, message, direct, started).await;
            });
            return (call, Bytes::new());
        }
        let parts = read_request(&message);
        drop(message);
        let parts = match parts {
            Ok((codec, meta, args)) if meta.spill.is_none() && !spec.idempotent => {
                match admit(spec, &meta, started) {
                    Ok(()) => {
                        let id = meta.call_id.clone();
                        let call = endpoint.run_plain(admission, reply, codec, meta, args, started);
                        return (Box::pin(call), id);
                    }
                    Err(fault) => Err((codec, fault)),
                }
            }
            parts => parts,
        };
        let id = match &parts {
            Ok((_, meta, _)) => {
                endpoint.track(&meta.call_id);
                meta.call_id.clone()
            }
            Err(_) => Bytes::new(),
        };
        let call = Box::pin(async move {
            let Some(_permit) = admission.run(&endpoint.shared).await else {
                return;
            };
            endpoint.run(reply, parts, started).await;
        });
        (call, id)
    }

    /// A call that is not the common plain one: spilled, idempotent, or one
    /// that could not be read or admitted.
    pub(crate) async fn run(
        &self,
        reply: ReplyTo,
        parts: Result<(Codec, CallMeta, Bytes), (Codec, Fault)>,
        started: SystemTime,
    ) {
        let spec = self.registration.spec;
        let (codec, mut meta, mut args) = match parts {
            Ok(parts) => parts,
            Err((codec, fault)) => {
                return out_of_line(|| self.respond_fault(reply, codec, fault, started)).await
            }
        };
        if let Some(spilled) = meta.spill.take() {
            match out_of_line(|| self.unspill(&spilled)).await {
                Ok(bytes) => args = bytes,
                Err(fault) => {
                    // Not run: a probe must not find it running.
                    self.untrack(&meta.call_id);
                    return out_of_line(|| self.respond_fault(reply, codec, fault, started)).await;
                }
            }
        }
        if spec.idempotent {
            // Out of line: only idempotent functions pay for this larger future.
            return out_of_line(|| self.run_idempotent(reply, codec, meta, args, started)).await;
        }
        let outcome = self.execute(codec, &meta, args, started, None).await;
        self.respond(reply, codec, &meta, outcome, started).await;
        self.untrack(&meta.call_id);
    }
}
