//! The answers of batched calls (wire/batch.rs) on their way out: gathered
//! while a batch's intake runs, sent together, one message per batch.

use crate::wire::batch::{self, Answer};
use async_nats::Subject;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// The answers of batched calls not yet sent. A batch's intake sends what
/// is ready once it has given each of its calls a first poll; a call that
/// ends later wakes a sender task, which sends what has gathered by the
/// time it runs: never a timer, always whatever is ready.
pub(crate) struct Outbox {
    nats: async_nats::Client,
    max_payload: usize,
    ready: Mutex<Vec<(Subject, Answer)>>,
    /// Batch intakes running now: they send what is ready when done, so
    /// no wake is needed meanwhile.
    gathering: AtomicUsize,
    wake: Arc<Notify>,
}

impl Outbox {
    /// An outbox and the task that sends the answers of calls that end
    /// after their batch's intake.
    pub(crate) fn start(nats: &async_nats::Client) -> Arc<Outbox> {
        let wake = Arc::new(Notify::new());
        let outbox = Arc::new(Outbox {
            nats: nats.clone(),
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
        outbox
    }

    /// Queues one answer to go out with the others that are ready.
    pub(crate) fn put(&self, subject: Subject, answer: Answer) {
        let first = {
            let mut ready = self.ready.lock().unwrap();
            ready.push((subject, answer));
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
        let mut groups: Vec<(Subject, Vec<Answer>, usize)> = Vec::with_capacity(4);
        for (subject, answer) in ready {
            let size = answer.size();
            let group = match groups
                .iter_mut()
                .rposition(|(s, _, bytes)| *s == subject && *bytes + size + 16 <= self.max_payload)
            {
                Some(at) => &mut groups[at],
                None => {
                    groups.push((subject, Vec::with_capacity(16), 0));
                    groups.last_mut().expect("pushed")
                }
            };
            group.1.push(answer);
            group.2 += size;
        }
        for (subject, answers, _) in groups {
            // A failed publish means the connection is gone; the callers'
            // probes then find these calls no longer held.
            let _ = self
                .nats
                .publish(subject, batch::encode_answers(&answers))
                .await;
        }
    }
}
