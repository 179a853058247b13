//! Replies: publishes a call's outcome to its caller, spilling a value too
//! large for one message to the object store, and counts it in the
//! endpoint's stats.

use super::endpoint::Endpoint;
use crate::boxed::out_of_line;
use crate::handler::Fault;
use crate::objects::store as objects;
use crate::wire::codec::Codec;
use crate::wire::reply::{mark_spilled, name_owner};
use crate::wire::request::CallMeta;
use bytes::Bytes;
use std::time::{Duration, SystemTime};

/// How long a spilled result waits for its caller to read it.
const SPILLED_RESULT_TTL: Duration = Duration::from_secs(300);

impl Endpoint {
    /// Publishes a call's outcome to `reply`.
    pub(crate) async fn respond(
        &self,
        reply: async_nats::Subject,
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
                let nats = &self.shared.nats;
                // A failed publish means the connection is gone; the caller
                // times out and nothing here can do better.
                let _ = if codec == Codec::Postcard && !meta.report_instance {
                    nats.publish(reply, body).await
                } else {
                    // Out of line: the rarer path should not enlarge every
                    // call's task.
                    out_of_line(|| {
                        nats.publish_with_headers(reply, self.reply_headers(codec, meta), body)
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
        reply: async_nats::Subject,
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
                let _ = self
                    .shared
                    .nats
                    .publish_with_headers(reply, headers, Bytes::new())
                    .await;
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
        reply: async_nats::Subject,
        codec: Codec,
        fault: Fault,
        started: SystemTime,
    ) {
        let (_, headers, body) = fault.answer(codec);
        let _ = self
            .shared
            .nats
            .publish_with_headers(reply, headers, body)
            .await;
        self.record(started, Some(&fault));
    }
}
