//! Idempotent calls: the worker registers each while it runs, answers a
//! caller's probe for it, and keeps its result for a caller that asks again.

use super::endpoint::{Endpoint, Shared};
use crate::error::Error;
use crate::wire::codec::Codec;
use crate::wire::request::CallMeta;
use crate::wire::{record, subjects};
use bytes::Bytes;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::task::JoinHandle;

impl Endpoint {
    /// An idempotent call: a retry of a call whose result was kept gets
    /// that result; a result is kept when the call was retried or probed,
    /// the two ways a caller shows it may ask again.
    pub(crate) async fn run_idempotent(
        &self,
        reply: async_nats::Subject,
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
            if let Ok(Some(record)) = results.get(key.as_str()).await {
                self.untrack(&meta.call_id);
                if let Ok((message, _)) = record::decode(record) {
                    let headers = message.headers.unwrap_or_default();
                    let _ = self
                        .shared
                        .nats
                        .publish_with_headers(reply, headers, message.payload)
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
/// payload a call id): "running" when this worker runs that idempotent
/// call, silence otherwise. A probed call's result is kept for a retry.
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
            let running = match shared.running.lock().unwrap().get_mut(&probe.payload) {
                Some(probed) => {
                    *probed = true;
                    true
                }
                None => false,
            };
            if running {
                let _ = nats.publish(reply, Bytes::from_static(b"running")).await;
            }
        }
    }))
}
