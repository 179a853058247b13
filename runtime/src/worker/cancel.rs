//! Cancellation on the worker: every worker of a service listens on
//! `<prefix>._cancel.<service>` (payload call ids separated by spaces) and
//! stops the calls it holds; the ids of the others are remembered a while,
//! so that a durable call cancelled before a worker pulls it never runs.

use super::endpoint::Shared;
use crate::error::Error;
use crate::wire::subjects;
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// How long a cancel of a call not held here is remembered: longer than a
/// durable call waits in its queue in any sane deployment.
const REMEMBER: Duration = Duration::from_secs(600);

/// Most cancels remembered; past it the oldest go first.
const REMEMBER_MAX: usize = 65_536;

/// Cancels that found no call held here, with when they came.
#[derive(Default)]
pub(crate) struct Cancelled {
    ids: Mutex<HashMap<Bytes, Instant>>,
}

impl Cancelled {
    fn note(&self, id: &[u8]) {
        let mut ids = self.ids.lock().unwrap();
        if ids.len() >= REMEMBER_MAX {
            let now = Instant::now();
            ids.retain(|_, at| now.duration_since(*at) < REMEMBER);
            if ids.len() >= REMEMBER_MAX {
                // A flood of cancels: forget rather than grow.
                ids.clear();
            }
        }
        ids.insert(Bytes::copy_from_slice(id), Instant::now());
    }

    /// Whether call `id` was cancelled before it reached this worker.
    pub(crate) fn contains(&self, id: &[u8]) -> bool {
        let ids = self.ids.lock().unwrap();
        ids.get(id).is_some_and(|at| at.elapsed() < REMEMBER)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancels_are_remembered_and_bounded() {
        let cancelled = Cancelled::default();
        assert!(!cancelled.contains(b"a1"));
        cancelled.note(b"a1");
        assert!(cancelled.contains(b"a1"));
        for n in 0..REMEMBER_MAX + 10 {
            cancelled.note(format!("id{n}").as_bytes());
        }
        assert!(cancelled.ids.lock().unwrap().len() <= REMEMBER_MAX);
    }
}
