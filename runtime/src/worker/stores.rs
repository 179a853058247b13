//! Durable results on their way into JetStream: each a KV create (a
//! publish with `Nats-Expected-Last-Subject-Sequence: 0`), its
//! acknowledgement routed back on one wildcard subscription.
//!
//! This is what async-nats's `jetstream::Context::send_publish` does, less
//! what a worker storing one result per durable call does not need on that
//! path: a new inbox string, a second timer for the send, an in-flight
//! semaphore and a full JSON decode of every acknowledgement. Those cost a
//! sixth of a worker's CPU per durable call (docs/BENCHMARKS.md).

use async_nats::{HeaderMap, Message, StatusCode, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// How long a store waits for its acknowledgement (async-nats's default
/// for JetStream requests): one not confirmed by then is tried again.
const ACK_WAIT: Duration = Duration::from_secs(5);

/// JetStream's error code for a failed `Nats-Expected-Last-Subject-Sequence`.
const WRONG_LAST_SEQUENCE: &[u8] = b"\"err_code\":10071";

/// Why a store did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotStored {
    /// A value is stored under the key already.
    Exists,
    /// Not confirmed: the connection, the stream or its leader is not
    /// there (now). Trying again may help.
    Unconfirmed,
}

/// A worker's result stores awaiting their acknowledgements.
pub(crate) struct Stores {
    nats: async_nats::Client,
    /// `<inbox>.stores`: each store's acknowledgement comes to `<prefix>.<n>`.
    prefix: String,
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Message>>>,
    /// `Nats-Expected-Last-Subject-Sequence: 0`, made once: cloned, it
    /// costs no parsing per store.
    create: HeaderMap,
    /// Dropped with this, which ends the routing task and its subscription.
    _routing: oneshot::Sender<()>,
}

impl Stores {
    /// Subscribes for acknowledgements and routes them to the stores
    /// waiting for them.
    pub(crate) async fn start(
        nats: &async_nats::Client,
    ) -> Result<Arc<Stores>, async_nats::SubscribeError> {
        let prefix = format!("{}.stores", nats.new_inbox());
        let acks = nats.subscribe(format!("{prefix}.*")).await?;
        let (routing, dropped) = oneshot::channel::<()>();
        let stores = Arc::new(Stores {
            nats: nats.clone(),
            prefix,
            next: AtomicU64::new(0),
            waiting: Mutex::new(HashMap::new()),
            create: {
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
                headers
            },
            _routing: routing,
        });
        let routes = Arc::downgrade(&stores);
        route_by_token(acks, dropped, move |ack| {
            let stores = routes.upgrade()?;
            let n = last_token(&ack.subject).parse::<u64>().ok();
            let waiter = n.and_then(|n| stores.waiting.lock().unwrap().remove(&n));
            if let Some(waiter) = waiter {
                let _ = waiter.send(ack);
            }
            Some(())
        });
        Ok(stores)
    }

    /// Stores `value` on `subject` (a KV key's subject) unless a value is
    /// there already, and waits for JetStream to confirm.
    pub(crate) async fn create(&self, subject: String, value: Bytes) -> Result<(), NotStored> {
        let (n, reply, rx) = self.register();
        // Removed however this ends, so a lost acknowledgement leaves
        // nothing behind.
        let _waiting = Waiting { stores: self, n };
        self.nats
            .publish_with_reply_and_headers(subject, reply, self.create.clone(), value)
            .await
            .map_err(|_| NotStored::Unconfirmed)?;
        match tokio::time::timeout(ACK_WAIT, rx).await {
            Ok(Ok(ack)) => read_ack(&ack),
            _ => Err(NotStored::Unconfirmed),
        }
    }

    /// A number of its own, its reply subject `<prefix>.<n>`, and where
    /// the message sent there comes.
    fn register(&self) -> (u64, Subject, oneshot::Receiver<Message>) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap().insert(n, tx);
        let mut reply = String::with_capacity(self.prefix.len() + 21);
        reply.push_str(&self.prefix);
        reply.push('.');
        let _ = write!(reply, "{n}");
        (n, Subject::from(reply), rx)
    }
}

/// Hands each message of `subscription` (replies to `<prefix>.<token>`,
/// see [`last_token`]) to `route`, until `dropped` fires (its owner is
/// gone) or `route` says its owner is gone (None).
pub(crate) fn route_by_token(
    mut subscription: async_nats::Subscriber,
    mut dropped: oneshot::Receiver<()>,
    route: impl Fn(Message) -> Option<()> + Send + 'static,
) {
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                message = subscription.next() => message,
                _ = &mut dropped => None,
            };
            let Some(message) = message else { return };
            if route(message).is_none() {
                return;
            }
        }
    });
}

/// The last token of a reply subject: what [`route_by_token`] routes by.
pub(crate) fn last_token(subject: &Subject) -> &str {
    subject.rsplit('.').next().unwrap_or("")
}

/// Takes a store's waiter out of the map when the store ends.
struct Waiting<'a> {
    stores: &'a Stores,
    n: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.stores.waiting.lock().unwrap().remove(&self.n);
    }
}

/// What a JetStream publish acknowledgement says: `{"stream":..,"seq":..}`
/// when stored, `{"error":{..,"err_code":..}}` when not, or a 503 status
/// when no stream takes the subject (or its leader is gone).
fn read_ack(ack: &Message) -> Result<(), NotStored> {
    if ack.status.is_some_and(|status| status != StatusCode::OK) {
        return Err(NotStored::Unconfirmed);
    }
    let payload = &ack.payload[..];
    if find(payload, b"\"error\"") {
        if find(payload, WRONG_LAST_SEQUENCE) {
            return Err(NotStored::Exists);
        }
        return Err(NotStored::Unconfirmed);
    }
    if find(payload, b"\"seq\"") {
        Ok(())
    } else {
        Err(NotStored::Unconfirmed)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(payload: &'static str) -> Message {
        Message {
            subject: "_INBOX.x.stores.1".into(),
            reply: None,
            payload: Bytes::from_static(payload.as_bytes()),
            headers: None,
            status: None,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn acknowledgements_are_read() {
        assert_eq!(read_ack(&ack(r#"{"stream":"KV_r","seq":7}"#)), Ok(()));
        assert_eq!(
            read_ack(&ack(
                r#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"},"stream":"KV_r","seq":0}"#
            )),
            Err(NotStored::Exists)
        );
        assert_eq!(
            read_ack(&ack(
                r#"{"error":{"code":503,"err_code":10077,"description":"JetStream system temporarily unavailable"}}"#
            )),
            Err(NotStored::Unconfirmed)
        );
        assert_eq!(read_ack(&ack("")), Err(NotStored::Unconfirmed));
        let mut no_stream = ack("");
        no_stream.status = Some(StatusCode::NO_RESPONDERS);
        assert_eq!(read_ack(&no_stream), Err(NotStored::Unconfirmed));
    }
}
