//! Coalescing: while many calls of one function are in flight from this
//! connection, the calls ready to go leave together in one NATS message (a
//! [batch](crate::wire::batch)), and their answers come back several to a
//! message, on one subscription for all batches.
//!
//! Nothing waits for a batch to fill: the first call of a batch lets the
//! runtime run once (so calls that are ready join it), then sends what has
//! gathered. With few calls in flight every call goes out alone, exactly as
//! it would without coalescing. Each call keeps its own id, deadline,
//! retries, probe and cancellation: only the message it travels in is
//! shared.

use crate::spec::FnSpec;
use crate::wire::batch::{self, Answer, ENTRY_OVERHEAD, MAX_BATCH_BYTES, MAX_BATCH_CALLS};
use crate::wire::subjects;
use async_nats::{Message, RequestError, RequestErrorKind, StatusCode, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Calls of one function in flight from this connection at which further
/// calls start to coalesce. Below it, a call goes out alone at once.
const COALESCE_FROM: usize = 4;

/// Requests larger than this go out alone: batching saves per message,
/// which a large request does not notice.
pub(crate) const MAX_ENTRY_BYTES: usize = 8 * 1024;

/// How long a function whose batch subject had no responders (workers of
/// a wharf that does not take batches) sends its calls alone.
const UNBATCHED_FOR: Duration = Duration::from_secs(5);

/// Sent batches are looked over for abandoned calls once per this many.
const SWEEP_EVERY: u64 = 1024;

/// What a call waits on for its answer.
type Slot = oneshot::Sender<Result<Message, RequestError>>;

/// A connection's coalescing state.
pub(crate) struct Coalescer {
    nats: async_nats::Client,
    /// Batch `n` is answered on `<inbox>.<n>`.
    inbox: String,
    next: AtomicU64,
    /// The most bytes of requests in one batch.
    max_bytes: usize,
    /// Batches sent and not yet fully answered, by number.
    sent: Mutex<HashMap<u64, Sent>>,
    /// Each function's calls in flight and the batch gathering, by the
    /// function's signature subject.
    queues: Mutex<HashMap<String, Queue>>,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer").finish_non_exhaustive()
    }
}

/// A sent batch's calls still waiting, by their place in it.
struct Sent {
    slots: Vec<Option<Slot>>,
    open: usize,
}

/// One function's calls on this connection.
struct Queue {
    /// Where its batches go.
    subject: Subject,
    /// Calls sent (alone or in a batch) and not yet answered.
    in_flight: usize,
    /// The batch gathering: requests and where their answers go.
    gathering: Vec<(Bytes, Slot)>,
    bytes: usize,
    /// Counts the batches that began gathering, so the call that began one
    /// knows whether another call has sent it already (it was full).
    generation: u64,
    /// Until when calls go out alone (no worker took a batch).
    unbatched_until: Option<Instant>,
}

/// How a call goes out.
enum Turn {
    /// Alone, as without coalescing.
    Alone,
    /// In a batch another call sends.
    Joined(oneshot::Receiver<Result<Message, RequestError>>),
    /// In a batch this call began: it sends it once the runtime has run.
    Began(oneshot::Receiver<Result<Message, RequestError>>, u64),
    /// In a batch this call filled: it sends it now.
    Filled(
        oneshot::Receiver<Result<Message, RequestError>>,
        Subject,
        Vec<(Bytes, Slot)>,
    ),
}

impl Coalescer {
    /// Subscribes for this connection's batch answers.
    pub(crate) async fn start(nats: &async_nats::Client) -> Result<Arc<Coalescer>, RequestError> {
        let inbox = format!("{}.", nats.new_inbox());
        let mut answers = nats
            .subscribe(format!("{inbox}*"))
            .await
            .map_err(|_| RequestError::new(RequestErrorKind::Other))?;
        let max_payload = nats.server_info().max_payload;
        let coalescer = Arc::new(Coalescer {
            nats: nats.clone(),
            inbox,
            next: AtomicU64::new(0),
            max_bytes: MAX_BATCH_BYTES.min(max_payload.saturating_sub(1024).max(1024)),
            sent: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
        });
        let routes: Weak<Coalescer> = Arc::downgrade(&coalescer);
        tokio::spawn(async move {
            while let Some(message) = answers.next().await {
                let Some(coalescer) = routes.upgrade() else {
                    return;
                };
                coalescer.route(message);
            }
        });
        Ok(coalescer)
    }

    /// Sends one call of `spec` (its postcard request, no headers) to the
    /// workers of its signature (`signed`), in a batch when others are in
    /// flight, and waits for its answer. Dropped, it gives its place up.
    pub(crate) async fn call(
        self: &Arc<Self>,
        spec: &FnSpec,
        prefix: &str,
        signed: &Subject,
        request: Bytes,
    ) -> Result<Message, RequestError> {
        let _flight = InFlight {
            coalescer: self,
            key: signed,
        };
        let turn = self.turn(spec, prefix, signed, &request);
        let answer = match turn {
            Turn::Alone => return self.alone(signed, request).await,
            Turn::Joined(answer) => answer,
            Turn::Filled(answer, subject, calls) => {
                self.send(subject, calls).await;
                answer
            }
            Turn::Began(answer, generation) => {
                // Calls that are ready to run join this batch meanwhile.
                let mut leading = Leading {
                    coalescer: self,
                    signed,
                    generation,
                    done: false,
                };
                tokio::task::yield_now().await;
                leading.done = true;
                if let Some((subject, calls)) = self.take(signed, generation) {
                    if calls.len() == 1 {
                        // Nobody joined: this call goes out alone, as it
                        // would have without coalescing.
                        return self.alone(signed, request).await;
                    }
                    self.send(subject, calls).await;
                }
                answer
            }
        };
        match answer.await {
            Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => {
                // No worker takes batches of this signature (none runs,
                // or they predate coalescing): alone, on the signature's
                // own subject, it gets the answer it would have got.
                self.unbatch(signed);
                self.alone(signed, request).await
            }
            Ok(answer) => answer,
            Err(_) => Err(RequestError::new(RequestErrorKind::Other)),
        }
    }

    fn alone(
        &self,
        signed: &Subject,
        request: Bytes,
    ) -> impl std::future::Future<Output = Result<Message, RequestError>> + '_ {
        let request = async_nats::Request::new().payload(request).timeout(None);
        self.nats.send_request(signed.clone(), request)
    }

    /// Counts the call in flight and finds its turn.
    fn turn(&self, spec: &FnSpec, prefix: &str, signed: &Subject, request: &Bytes) -> Turn {
        let mut queues = self.queues.lock().unwrap();
        if !queues.contains_key(signed.as_str()) {
            let queue = Queue {
                subject: Subject::from(subjects::batch_call(
                    prefix,
                    spec.service,
                    spec.name,
                    spec.sig,
                )),
                in_flight: 0,
                gathering: Vec::new(),
                bytes: 0,
                generation: 0,
                unbatched_until: None,
            };
            queues.insert(signed.to_string(), queue);
        }
        let queue = queues.get_mut(signed.as_str()).expect("inserted above");
        queue.in_flight += 1;
        if queue.gathering.is_empty() && queue.in_flight <= COALESCE_FROM {
            return Turn::Alone;
        }
        if let Some(until) = queue.unbatched_until {
            if Instant::now() < until {
                return Turn::Alone;
            }
            queue.unbatched_until = None;
        }
        let size = request.len() + ENTRY_OVERHEAD;
        if queue.bytes + size > self.max_bytes {
            // No room in the gathering batch (a batch never outgrows the
            // server's max_payload): this one goes out alone.
            return Turn::Alone;
        }
        let (tx, rx) = oneshot::channel();
        queue.gathering.push((request.clone(), tx));
        queue.bytes += size;
        if queue.gathering.len() == 1 {
            queue.generation += 1;
            return Turn::Began(rx, queue.generation);
        }
        if queue.gathering.len() >= MAX_BATCH_CALLS {
            let calls = std::mem::take(&mut queue.gathering);
            queue.bytes = 0;
            return Turn::Filled(rx, queue.subject.clone(), calls);
        }
        Turn::Joined(rx)
    }
}

impl Coalescer {
    /// The gathering batch of `signed`, if it is still the one of
    /// `generation` (else a call that filled it has sent it).
    fn take(&self, signed: &Subject, generation: u64) -> Option<(Subject, Vec<(Bytes, Slot)>)> {
        let mut queues = self.queues.lock().unwrap();
        let queue = queues.get_mut(signed.as_str())?;
        if queue.generation != generation || queue.gathering.is_empty() {
            return None;
        }
        queue.bytes = 0;
        Some((queue.subject.clone(), std::mem::take(&mut queue.gathering)))
    }

    /// Sends calls out alone for a while: no worker took their batch.
    fn unbatch(&self, signed: &Subject) {
        if let Some(queue) = self.queues.lock().unwrap().get_mut(signed.as_str()) {
            queue.unbatched_until = Some(Instant::now() + UNBATCHED_FOR);
        }
    }

    /// Publishes a batch, its answers to come on `<inbox>.<n>`.
    async fn send(&self, subject: Subject, calls: Vec<(Bytes, Slot)>) {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let payload = batch::encode_requests(calls.iter().map(|(request, _)| request));
        let slots: Vec<Option<Slot>> = calls.into_iter().map(|(_, slot)| Some(slot)).collect();
        {
            let mut sent = self.sent.lock().unwrap();
            if number % SWEEP_EVERY == 0 {
                // Batches whose calls all gave up (a worker lost, a
                // connection lost, a deadline) are never fully answered.
                sent.retain(|_, batch| batch.slots.iter().flatten().any(|slot| !slot.is_closed()));
            }
            let open = slots.len();
            sent.insert(number, Sent { slots, open });
        }
        let reply = Subject::from(format!("{}{number}", self.inbox));
        if self
            .nats
            .publish_with_reply(subject, reply, payload)
            .await
            .is_err()
        {
            // The connection is closed: every call of the batch fails as
            // a send that failed would.
            if let Some(batch) = self.sent.lock().unwrap().remove(&number) {
                for slot in batch.slots.into_iter().flatten() {
                    let _ = slot.send(Err(RequestError::new(RequestErrorKind::Other)));
                }
            }
        }
    }

    /// Hands a message on the batch inbox to the calls it answers.
    fn route(&self, message: Message) {
        let Some(number) = message
            .subject
            .rsplit_once('.')
            .and_then(|(_, n)| n.parse::<u64>().ok())
        else {
            return;
        };
        let mut sent = self.sent.lock().unwrap();
        let Some(batch) = sent.get_mut(&number) else {
            return;
        };
        if message.status == Some(StatusCode::NO_RESPONDERS) {
            let batch = sent.remove(&number).expect("found above");
            drop(sent);
            for slot in batch.slots.into_iter().flatten() {
                let _ = slot.send(Err(RequestError::new(RequestErrorKind::NoResponders)));
            }
            return;
        }
        if message.headers.is_some() {
            // A failure of the batch as a whole (it did not decode): each
            // call gets it as its own reply.
            let batch = sent.remove(&number).expect("found above");
            drop(sent);
            for slot in batch.slots.into_iter().flatten() {
                let _ = slot.send(Ok(message.clone()));
            }
            return;
        }
        let answers = match batch::decode_answers(&message.payload) {
            Ok(answers) => answers,
            Err(_) => {
                let batch = sent.remove(&number).expect("found above");
                drop(sent);
                for slot in batch.slots.into_iter().flatten() {
                    let _ = slot.send(Err(RequestError::new(RequestErrorKind::Other)));
                }
                return;
            }
        };
        let mut ready = Vec::with_capacity(answers.len());
        for answer in answers {
            if let Some(slot) = batch
                .slots
                .get_mut(answer.index as usize)
                .and_then(Option::take)
            {
                batch.open -= 1;
                ready.push((slot, answer));
            }
        }
        if batch.open == 0 {
            sent.remove(&number);
        }
        drop(sent);
        for (slot, Answer { headers, body, .. }) in ready {
            let _ = slot.send(Ok(Message {
                subject: message.subject.clone(),
                reply: None,
                length: body.len(),
                payload: body,
                headers,
                status: None,
                description: None,
            }));
        }
    }
}

/// A call counted in flight until it ends.
struct InFlight<'a> {
    coalescer: &'a Coalescer,
    key: &'a Subject,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(queue) = self
            .coalescer
            .queues
            .lock()
            .unwrap()
            .get_mut(self.key.as_str())
        {
            queue.in_flight = queue.in_flight.saturating_sub(1);
        }
    }
}

/// The call that began a batch, until it has sent it: dropped before (its
/// caller gave up), it leaves the batch to a task, so the calls that joined
/// it are not left waiting for a batch nobody sends.
struct Leading<'a> {
    coalescer: &'a Arc<Coalescer>,
    signed: &'a Subject,
    generation: u64,
    done: bool,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some((subject, calls)) = self.coalescer.take(self.signed, self.generation) {
            let coalescer = self.coalescer.clone();
            tokio::spawn(async move { coalescer.send(subject, calls).await });
        }
    }
}
