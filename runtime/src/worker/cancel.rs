//! Cancellation on the worker: every worker of a service listens on
//! `<prefix>._cancel.<service>` (payload call ids separated by spaces) and
//! stops the calls it holds; the ids of the others are remembered a while
//! ([`super::endpoint::Cancelled`]), so that a durable call cancelled
//! before a worker pulls it never runs.

use super::endpoint::Shared;
use crate::error::Error;
use crate::wire::subjects;
use futures_util::StreamExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::task::JoinHandle;

/// Listens for cancels of `service`'s calls: a call held here is stopped
/// (a cancel of an unknown or finished call is not an error, only
/// remembered).
pub(crate) async fn answer_cancels(
    nats: &async_nats::Client,
    prefix: &str,
    service: &str,
    shared: Arc<Shared>,
) -> Result<JoinHandle<()>, Error> {
    let subject = subjects::call_cancel(prefix, service);
    let mut cancels = nats
        .subscribe(subject.clone())
        .await
        .map_err(|e| crate::micro::subscribe_failed(&subject, e))?;
    Ok(tokio::spawn(async move {
        while let Some(cancel) = cancels.next().await {
            for id in crate::wire::probe::ids(&cancel.payload) {
                if shared.running.cancel(id) {
                    shared.cancelled.fetch_add(1, Ordering::Relaxed);
                } else {
                    shared.cancels.note(id);
                }
            }
        }
    }))
}
