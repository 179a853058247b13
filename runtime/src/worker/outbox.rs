//! The answers of batched calls (wire/batch.rs) on their way out: gathered
//! while a batch's intake runs, sent together, one message per batch.

use super::stores::{last_token, route_by_token};
use crate::wire::batch::{self, Answer};
use async_nats::Subject;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

/// How long a batch reply waits for its caller to confirm the answers it
/// took; the results of those it did not are then stored.
pub(crate) const CONFIRM_WAIT: Duration = Duration::from_secs(2);

/// Where an answer learns whether its caller took it (true) or its
/// result must be stored (false).
pub(crate) type Confirm = oneshot::Sender<bool>;

/// The answers of batched calls not yet sent. A batch's intake sends what
/// is ready once it has given each of its calls a first poll; a call that
/// ends later wakes a sender task, which sends what has gathered by the
/// time it runs: never a timer, always whatever is ready.
pub(crate) struct Outbox {
    nats: async_nats::Client,
    /// Where confirmations of batch replies come back.
    confirms: Arc<Confirms>,
    max_payload: usize,
    ready: Mutex<Vec<(Subject, Answer, Option<Confirm>)>>,
    /// Batch intakes running now: they send what is ready when done, so
    /// no wake is needed meanwhile.
    gathering: AtomicUsize,
    wake: Arc<Notify>,
}

impl Outbox {
    /// An outbox and the task that sends the answers of calls that end
    /// after their batch's intake.
    pub(crate) async fn start(
        nats: &async_nats::Client,
    ) -> Result<Arc<Outbox>, async_nats::SubscribeError> {
        let wake = Arc::new(Notify::new());
        let outbox = Arc::new(Outbox {
            nats: nats.clone(),
            confirms: Confirms::start(nats).await?,
            max_payload: nats.server_info().max_payload.max(1024),
            ready: Mutex::new(Vec::new()),
            gathering: AtomicUsize::new(0),
            wake: wake.clone(),
        });
        let sender = Arc::downgrade(&outbox);
        tokio::spawn(async move {
            loop {
                wake.notified().await;
                let Some(outbox) = sender.upgrade() else {
                    return;
                };
                outbox.send_ready().await;
            }
        });
        Ok(outbox)
    }

    /// Queues one answer to go out with the others that are ready; with
    /// `confirm`, its caller is asked to confirm it took it.
    pub(crate) fn put(&self, subject: Subject, answer: Answer, confirm: Option<Confirm>) {
        let first = {
            let mut ready = self.ready.lock().unwrap();
            ready.push((subject, answer, confirm));
            ready.len() == 1
        };
        if first && self.gathering.load(Ordering::Acquire) == 0 {
            self.wake.notify_one();
        }
    }

    /// A batch's intake begins: what its calls answer at once waits for
    /// [`Outbox::end_batch`].
    pub(crate) fn begin_batch(&self) {
        self.gathering.fetch_add(1, Ordering::AcqRel);
    }

    /// A batch's intake is done: sends every answer that is ready.
    pub(crate) async fn end_batch(&self) {
        self.gathering.fetch_sub(1, Ordering::AcqRel);
        self.send_ready().await;
    }

    /// Sends the ready answers, one message per batch (more when they do
    /// not fit one message).
    async fn send_ready(&self) {
        let ready = {
            let mut ready = self.ready.lock().unwrap();
            if ready.is_empty() {
                return;
            }
            // Left with room for as many, so the next answers do not grow it.
            let room = ready.len();
            std::mem::replace(&mut *ready, Vec::with_capacity(room))
        };
        // Few batches at once: a short list, in the order answers came.
        let mut groups: Vec<Group> = Vec::with_capacity(4);
        for (subject, answer, confirm) in ready {
            let size = answer.size();
            let group = match groups.iter_mut().rposition(|group| {
                group.subject == subject && group.bytes + size + 16 <= self.max_payload
            }) {
                Some(at) => &mut groups[at],
                None => {
                    groups.push(Group {
                        subject,
                        answers: Vec::with_capacity(16),
                        confirms: Vec::new(),
                        bytes: 0,
                    });
                    groups.last_mut().expect("pushed")
                }
            };
            if let Some(confirm) = confirm {
                group.confirms.push((group.answers.len(), confirm));
            }
            group.answers.push(answer);
            group.bytes += size;
        }
        for group in groups {
            let payload = batch::encode_answers(&group.answers);
            if group.confirms.is_empty() {
                // A failed publish means the connection is gone; the
                // callers' probes then find these calls no longer held.
                let _ = self.nats.publish(group.subject, payload).await;
                continue;
            }
            // Asked as a request: the caller answers which answers it took.
            let (reply, token, confirmed) = self.confirms.expect();
            let sent = self
                .nats
                .publish_with_reply(group.subject, reply, payload)
                .await
                .is_ok();
            let confirms = self.confirms.clone();
            tokio::spawn(async move {
                let taken = match sent {
                    true => tokio::time::timeout(CONFIRM_WAIT, confirmed).await.ok(),
                    false => None,
                };
                confirms.waiting.lock().unwrap().remove(&token);
                let taken = taken.and_then(Result::ok).unwrap_or_default();
                for (at, confirm) in group.confirms {
                    let _ = confirm.send(taken.get(at) == Some(&1));
                }
            });
        }
    }
}

/// The answers that go out in one batch reply.
struct Group {
    subject: Subject,
    answers: Vec<Answer>,
    /// The answers (by place in `answers`) whose callers are asked to
    /// confirm them.
    confirms: Vec<(usize, Confirm)>,
    bytes: usize,
}

/// Callers' confirmations of batch replies, on a wildcard subscription of
/// an inbox of their own (not the inbox of the worker's result stores,
/// which no caller learns: a caller could otherwise answer for a store).
/// Each batch reply asks on `<inbox>.<token>`, a token drawn from the
/// operating system's randomness, so no caller can confirm another's.
struct Confirms {
    prefix: String,
    waiting: Mutex<HashMap<String, oneshot::Sender<Bytes>>>,
    /// Dropped with this, which ends the routing task and its subscription.
    _routing: oneshot::Sender<()>,
}

impl Confirms {
    async fn start(nats: &async_nats::Client) -> Result<Arc<Confirms>, async_nats::SubscribeError> {
        let prefix = nats.new_inbox();
        let confirmations = nats.subscribe(format!("{prefix}.*")).await?;
        let (routing, dropped) = oneshot::channel::<()>();
        let confirms = Arc::new(Confirms {
            prefix,
            waiting: Mutex::new(HashMap::new()),
            _routing: routing,
        });
        let routes = Arc::downgrade(&confirms);
        route_by_token(confirmations, dropped, move |confirmation| {
            let confirms = routes.upgrade()?;
            let token = last_token(&confirmation.subject);
            let waiter = confirms.waiting.lock().unwrap().remove(token);
            if let Some(waiter) = waiter {
                let _ = waiter.send(confirmation.payload);
            }
            Some(())
        });
        Ok(confirms)
    }

    /// A reply subject for one batch reply, its token, and where the
    /// confirmation sent to it comes.
    fn expect(&self) -> (Subject, String, oneshot::Receiver<Bytes>) {
        // A fresh generator: its prefix is random, and so is the token.
        let token = nuid::NUID::new().next().as_str().to_owned();
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap().insert(token.clone(), tx);
        let reply = Subject::from(format!("{}.{token}", self.prefix));
        (reply, token, rx)
    }
}
