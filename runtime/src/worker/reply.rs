//! Replies: publishes a call's outcome to its caller, spilling a value too
//! large for one message to the object store, and counts it in the
//! endpoint's stats.

use super::endpoint::Endpoint;
use crate::boxed::out_of_line;
use crate::handler::Fault;
use crate::objects::store as objects;
use crate::wire::batch::Answer;
use crate::wire::codec::Codec;
use crate::wire::reply::{mark_spilled, name_owner};
use crate::wire::request::CallMeta;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use std::time::{Duration, SystemTime};

/// Where a call's answer goes.
pub(crate) enum ReplyTo {
    /// The caller's inbox, as one message.
    Inbox(Subject),
    /// The `index`th answer of a batch (wire/batch.rs) that answers on
    /// `subject`: it joins the others that are ready in the [`Outbox`](super::outbox::Outbox);
    /// with `confirm`, its caller is asked whether it took it.
    Batch {
        subject: Subject,
        index: u32,
        confirm: Option<super::outbox::Confirm>,
    },
}

impl From<Subject> for ReplyTo {
    fn from(subject: Subject) -> ReplyTo {
        ReplyTo::Inbox(subject)
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
            ReplyTo::Batch {
                subject,
                index,
                confirm,
            } => self.shared.outbox.put(
                subject,
                Answer {
                    index,
                    headers,
                    body,
                },
                confirm,
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
