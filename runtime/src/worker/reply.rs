//! Replies: publishes a call's outcome to its caller, spilling a value too
//! large for one message to the object store, and counts it in the
//! endpoint's stats.

use super::endpoint::Endpoint;
use crate::boxed::out_of_line;
use crate::handler::Fault;
use crate::objects::store as objects;
use crate::wire::batch::{self, Answer};
use crate::wire::codec::Codec;
use crate::wire::reply::{mark_spilled, name_owner};
use crate::wire::request::CallMeta;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::Notify;

/// Where a call's answer goes.
pub(crate) enum ReplyTo {
    /// The caller's inbox, as one message.
    Inbox(Subject),
    /// The `index`th answer of a batch (wire/batch.rs) that answers on
    /// `subject`: it joins the others that are ready in the [`Outbox`].
    Batch { subject: Subject, index: u32 },
}

impl From<Subject> for ReplyTo {
    fn from(subject: Subject) -> ReplyTo {
        ReplyTo::Inbox(subject)
    }
}

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

    fn put(&self, subject: Subject, answer: Answer) {
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
        let ready = std::mem::take(&mut *self.ready.lock().unwrap());
        if ready.is_empty() {
            return;
        }
        // Few batches at once: a short list, in the order answers came.
        let mut groups: Vec<(Subject, Vec<Answer>, usize)> = Vec::new();
        for (subject, answer) in ready {
            let size = answer.size();
            let group = match groups
                .iter_mut()
                .rposition(|(s, _, bytes)| *s == subject && *bytes + size + 16 <= self.max_payload)
            {
                Some(at) => &mut groups[at],
                None => {
                    groups.push((subject, Vec::new(), 0));
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

/// How long a spilled result waits for its caller to read it.
const SPILLED_RESULT_TTL: Duration = Duration::from_secs(300);

impl Endpoint {
    /// Sends one answer where it goes.
    pub(crate) async fn send_reply(&self, reply: ReplyTo, headers: Option<HeaderMap>, body: Bytes) {
        match reply {
            // A failed publish means the connection is gone; the caller's
            // probe then finds the call no longer held.
            ReplyTo::Inbox(subject) => {
                let _ = match headers {
                    None => self.shared.nats.publish(subject, body).await,
                    Some(headers) => {
                        self.shared
                            .nats
                            .publish_with_headers(subject, headers, body)
                            .await
                    }
                };
            }
            ReplyTo::Batch { subject, index } => self.shared.outbox.put(
                subject,
                Answer {
                    index,
                    headers,
                    body,
                },
            ),
        }
    }

    /// Publishes a call's outcome to `reply`.
    pub(crate) async fn respond(
        &self,
        reply: ReplyTo,
        codec: Codec,
        meta: &CallMeta,
        outcome: Result<Bytes, Fault>,
        started: SystemTime,
    ) {
        match outcome {
            Ok(body) if body.len() > self.shared.spill_at => {
                out_of_line(|| self.respond_spilled(reply, codec, meta, body, started, None)).await
            }
            Ok(body) => {
                if codec == Codec::Postcard && !meta.report_instance {
                    self.send_reply(reply, None, body).await
                } else {
                    // Out of line: the rarer path should not enlarge every
                    // call's task.
                    out_of_line(|| {
                        self.send_reply(reply, Some(self.reply_headers(codec, meta)), body)
                    })
                    .await
                };
                self.stats
                    .record(started.elapsed().unwrap_or_default(), None);
            }
            Err(fault) => out_of_line(|| self.respond_fault(reply, codec, fault, started)).await,
        }
    }

    /// Replies with a value too large for one message: stored as an
    /// object, named in `Wharf-Spill`; the caller deletes it once read.
    pub(crate) async fn respond_spilled(
        &self,
        reply: ReplyTo,
        codec: Codec,
        meta: &CallMeta,
        body: Bytes,
        started: SystemTime,
        owner: Option<&str>,
    ) {
        match objects::put_spilled(&self.shared.client, body, SPILLED_RESULT_TTL).await {
            Ok((uri, digest)) => {
                let mut headers = self.reply_headers(codec, meta);
                if let Some(owner) = owner {
                    name_owner(&mut headers, owner);
                }
                mark_spilled(&mut headers, &uri, &digest);
                self.send_reply(reply, Some(headers), Bytes::new()).await;
                self.record(started, None);
            }
            Err(error) => {
                self.respond_fault(reply, codec, error.into(), started)
                    .await
            }
        }
    }

    pub(crate) async fn respond_fault(
        &self,
        reply: ReplyTo,
        codec: Codec,
        fault: Fault,
        started: SystemTime,
    ) {
        let (_, headers, body) = fault.answer(codec);
        self.send_reply(reply, Some(headers), body).await;
        self.record(started, Some(&fault));
    }
}
