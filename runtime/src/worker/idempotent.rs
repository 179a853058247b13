//! Idempotent calls: the worker registers each while it runs, answers a
//! caller's probe for it, and keeps its result for a caller that asks again.

use super::endpoint::{Endpoint, Shared};
use super::reply::ReplyTo;
use crate::error::Error;
use crate::wire::codec::Codec;
use crate::wire::request::CallMeta;
use crate::wire::{record, subjects};
use bytes::Bytes;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::task::JoinHandle;

/// How long a retried idempotent call looks for its kept result.
const KEPT_LOOKUP: std::time::Duration = std::time::Duration::from_secs(1);

impl Endpoint {
    /// An idempotent call: a retry of a call whose result was kept gets
    /// that result; a result is kept when the call was retried or probed,
    /// the two ways a caller shows it may ask again.
    pub(crate) async fn run_idempotent(
        &self,
        reply: ReplyTo,
        codec: Codec,
        meta: CallMeta,
        args: Bytes,
        started: SystemTime,
    ) {
        let results = self
            .results
            .as_ref()
            .filter(|_| subjects::valid_id(&meta.call_id));
        let key = results.map(|_| String::from_utf8_lossy(&meta.call_id).into_owned());
        if let (Some(results), Some(key), true) = (results, &key, meta.attempt > 1) {
            // Not for long: without the kept result the call runs again,
            // which an idempotent function allows (and a caller retrying
            // after a node loss should not wait for its results bucket).
            let kept = tokio::time::timeout(KEPT_LOOKUP, results.get(key.as_str())).await;
            if let Ok(Ok(Some(record))) = kept {
                self.untrack(&meta.call_id);
                if let Ok((message, _)) = record::decode(record) {
                    self.send_reply(reply, message.headers, message.payload)
                        .await;
                    return;
                }
            }
        }
        let outcome = self.execute(codec, &meta, args, started, None).await;
        let probed = self.untrack(&meta.call_id);
        if let (Some(key), Ok(body)) = (&key, &outcome) {
            if probed || meta.attempt > 1 {
                let record = record::encode(record::OK, codec, body);
                // Best effort: losing the record costs a re-run, which an
                // idempotent function allows.
                let _ = self
                    .shared
                    .nats
                    .publish(
                        subjects::kv_key(
                            &subjects::results_bucket(self.registration.spec.service),
                            key,
                        ),
                        record,
                    )
                    .await;
            }
        }
        self.respond(reply, codec, &meta, outcome, started).await;
    }
}

/// Answers call-status probes for `service` (`<prefix>._status.<service>`,
/// payload one call id or several separated by spaces): the ids of those
/// this worker holds, separated by spaces; silence when it holds none. A
/// probed call's result is kept for a retry (idempotent calls).
pub(crate) async fn answer_probes(
    nats: &async_nats::Client,
    prefix: &str,
    service: &str,
    shared: Arc<Shared>,
) -> Result<JoinHandle<()>, Error> {
    let subject = subjects::call_status(prefix, service);
    let mut probes = nats
        .subscribe(subject.clone())
        .await
        .map_err(|e| crate::micro::subscribe_failed(&subject, e))?;
    let nats = nats.clone();
    Ok(tokio::spawn(async move {
        while let Some(probe) = probes.next().await {
            let Some(reply) = probe.reply else { continue };
            let held = crate::wire::probe::answer(&probe.payload, |id| shared.running.probe(id));
            if !held.is_empty() {
                let _ = nats.publish(reply, held.into()).await;
            }
        }
    }))
}
