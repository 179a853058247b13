//! What a generated handler sees and returns: the call as it arrived
//! ([`Incoming`]), a failure as the worker answers it ([`Fault`]), and the
//! registry of every function linked into the binary.

use crate::error::{Error, ErrorKind};
use crate::spec::FnSpec;
use crate::txn::lease::outside;
use crate::txn::state::{Slot, State};
use crate::wire::codec::Codec;
use crate::wire::headers::{STREAM_CREDIT_TO, STREAM_ITEM};
use crate::wire::reply::{error_reply, ApplicationErrorBody};
use crate::wire::request::StreamAsk;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Arguments of at least this many bytes are decoded with the runtime
/// told that the thread blocks: decoding takes milliseconds per MiB (far
/// more in a debug build), and the worker's other tasks, its answers to
/// the probes of callers among them, must run meanwhile.
const LARGE_PAYLOAD: usize = 1 << 20;

/// Runs `f`, which blocks for a while, letting a multi-threaded runtime
/// move this thread's other tasks elsewhere; on another runtime, as it is.
fn off_the_queue<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The future a generated handler returns.
#[doc(hidden)]
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Bytes, Fault>> + Send>>;

/// A call as a handler sees it: the payload, its codec and the function.
#[doc(hidden)]
pub struct Incoming {
    pub(crate) codec: Codec,
    pub(crate) payload: Bytes,
    pub(crate) spec: &'static FnSpec,
    /// The call's deadline (unix ms, 0 none), inherited by calls it makes.
    pub(crate) deadline_ms: u64,
    /// The transaction of a stateful call, owned by this instance.
    pub(crate) txn: Option<Arc<Slot>>,
    /// Where a streamed result goes, when the caller asked for one.
    pub(crate) stream: Option<StreamOut>,
}

/// The caller's side of a streamed result, as the worker sends to it.
#[doc(hidden)]
pub struct StreamOut {
    pub(crate) nats: async_nats::Client,
    pub(crate) ask: Box<StreamAsk>,
}

impl Incoming {
    /// Decodes the arguments; failure is a 400 naming the function.
    pub fn decode<A: DeserializeOwned>(&self) -> Result<A, Fault> {
        let decode = || self.codec.decode_args::<A>(&self.payload);
        let decoded = if self.payload.len() >= LARGE_PAYLOAD {
            off_the_queue(decode)
        } else {
            decode()
        };
        decoded.map_err(|e| {
            Fault::new(
                ErrorKind::BadRequest,
                format!(
                    "cannot decode the arguments of `{}.{}` ({}) as {:?}: {e}",
                    self.spec.service, self.spec.name, self.spec.signature, self.codec
                ),
            )
        })
    }

    /// The transaction's state of type `S` (see [`crate::State`]), locked
    /// for this call.
    pub async fn state<S: Default + Send + 'static>(&self) -> Result<State<S>, Fault> {
        match &self.txn {
            Some(slot) => Ok(slot.state::<S>().await),
            None => Err(outside(self.spec).into()),
        }
    }

    /// Encodes a successful return value.
    pub fn reply<T: Serialize>(&self, value: &T) -> Result<Bytes, Fault> {
        self.codec.encode(value).map_err(|e| {
            Fault::new(
                ErrorKind::Codec,
                format!(
                    "`{}.{}` returned a value that cannot be encoded: {e}",
                    self.spec.service, self.spec.name
                ),
            )
        })
    }

    /// Encodes the function's own error as a 422 reply.
    pub fn application_error<E: Serialize>(
        &self,
        error: &E,
        message: String,
    ) -> Result<Bytes, Fault> {
        let body = ApplicationErrorBody {
            kind: ErrorKind::Application.as_str().to_owned(),
            message,
            error,
        };
        let encoded = self.reply(&body)?;
        Err(Fault {
            kind: ErrorKind::Application,
            message: body.message,
            body: Some(encoded),
        })
    }

    /// Sends a function's streamed result: each item as the caller's credit
    /// allows (the stream is polled only then, so a slow reader pauses the
    /// producer), then the reply that ends the stream, the number of items
    /// sent. An item that is an error ends the stream with that error.
    pub async fn stream<T: Serialize>(&self, mut items: crate::Stream<T>) -> Result<Bytes, Fault> {
        let spec = self.spec;
        let Some(out) = self.stream.as_ref().filter(|out| out.ask.credit > 0) else {
            return Err(Fault::new(
                ErrorKind::BadRequest,
                format!(
                    "`{}.{}` returns a stream: send the request with header Wharf-Stream-Credit (the items you take before granting more; docs/protocol.md, \"Streams\")",
                    spec.service, spec.name
                ),
            ));
        };
        let failed = |kind, what: String| {
            Fault::new(
                kind,
                format!("the stream of `{}.{}` {what}", spec.service, spec.name),
            )
        };
        // Credit comes on a subject of this stream's own, from its first item on.
        let credit_to = out.nats.new_inbox();
        let mut credits = out
            .nats
            .subscribe(credit_to.clone())
            .await
            .map_err(|e| failed(ErrorKind::Connection, format!("cannot take credit: {e}")))?;
        let mut granted = out.ask.credit;
        let mut sent: u64 = 0;
        loop {
            // Granted since: taken without waiting, so the producer rarely stops.
            while let Some(Some(grant)) = credits.next().now_or_never() {
                granted = granted.max(read_credit(&grant.payload));
            }
            while sent >= granted {
                match tokio::time::timeout(crate::stream::GIVE_UP, credits.next()).await {
                    Ok(Some(grant)) => granted = granted.max(read_credit(&grant.payload)),
                    Ok(None) => {
                        return Err(failed(
                            ErrorKind::Connection,
                            "lost its credit subscription".to_owned(),
                        ))
                    }
                    Err(_) => {
                        return Err(failed(
                            ErrorKind::Cancelled,
                            format!(
                                "stopped after {sent} items: its caller granted no credit for {} s and is taken for gone",
                                crate::stream::GIVE_UP.as_secs()
                            ),
                        ))
                    }
                }
            }
            let Some(item) = items.next().await else {
                break;
            };
            let item = item.map_err(Fault::from)?;
            let body = self.codec.encode(&item).map_err(|e| {
                failed(
                    ErrorKind::Codec,
                    format!("has item {sent}, which cannot be encoded: {e}"),
                )
            })?;
            let mut headers = HeaderMap::new();
            headers.insert(STREAM_ITEM, sent.to_string());
            if sent == 0 {
                headers.insert(STREAM_CREDIT_TO, credit_to.as_str());
            }
            let size = body.len();
            out.nats
                .publish_with_headers(out.ask.reply.clone(), headers, body)
                .await
                .map_err(|e| match e.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => failed(
                        ErrorKind::PayloadTooLarge,
                        format!("has item {sent} of {size} bytes, more than the server's max_payload: send smaller items"),
                    ),
                    _ => failed(ErrorKind::Connection, format!("cannot send item {sent}: {e}")),
                })?;
            sent += 1;
        }
        drop(credits);
        self.reply(&sent)
    }

    /// The function's stream argument: items arrive as the worker grants
    /// credit for them, so a caller sending faster than the function reads
    /// is paused (docs/protocol.md, "Stream arguments").
    pub async fn input<T: DeserializeOwned + Send + 'static>(
        &self,
    ) -> Result<crate::Stream<T>, Fault> {
        let spec = self.spec;
        let Some(out) = self.stream.as_ref().filter(|out| out.ask.input) else {
            return Err(Fault::new(
                ErrorKind::BadRequest,
                format!(
                    "`{}.{}` takes a stream argument: send the request with header Wharf-Stream-Input: 1 and send the items when granted (docs/protocol.md, \"Stream arguments\")",
                    spec.service, spec.name
                ),
            ));
        };
        crate::stream::inlet::open(
            &out.nats,
            self.codec,
            spec,
            out.ask.reply.clone(),
            self.deadline_ms,
        )
        .await
        .map_err(Fault::from)
    }

    /// Runs a sync function on the blocking pool, off the async threads.
    pub async fn blocking<T, F>(&self, f: F) -> Result<T, Fault>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let deadline_ms = self.deadline_ms;
        // Read here, in the call's task, for the blocking thread.
        let trace = crate::trace::carried();
        // Raised when this future is dropped: a cancelled call's task is
        // aborted while the function runs on, and sees the flag through
        // `wharf::cancelled()`. (Raised after a normal end too, when nothing
        // reads it any more.)
        struct Raise(Arc<AtomicBool>);
        impl Drop for Raise {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let flag = Arc::new(AtomicBool::new(false));
        let raise = Raise(flag.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            crate::context::scope_blocking(deadline_ms, flag, || {
                crate::trace::in_blocking(trace, f)
            })
        })
        .await;
        drop(raise);
        outcome.map_err(|e| {
            let message = if e.is_panic() {
                panic_message(e.into_panic().as_ref())
            } else {
                "the blocking task was cancelled".to_owned()
            };
            Fault::panicked(self.spec, &message)
        })
    }
}

/// A failed call as the worker answers it: status, message and, for
/// application errors, the already-encoded body.
#[doc(hidden)]
#[derive(Debug)]
pub struct Fault {
    pub(crate) kind: ErrorKind,
    pub(crate) message: String,
    body: Option<Bytes>,
}

impl Fault {
    pub(crate) fn new(kind: ErrorKind, message: String) -> Fault {
        Fault {
            kind,
            message,
            body: None,
        }
    }

    pub(crate) fn panicked(spec: &FnSpec, message: &str) -> Fault {
        Fault::new(
            ErrorKind::Panicked,
            format!(
                "`{}.{}` panicked: {message}; the worker keeps serving",
                spec.service, spec.name
            ),
        )
    }
}

impl Fault {
    /// The kind of failure.
    pub(crate) fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// What went wrong.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// The wire form of this failure: status code, ADR-32 headers and the
    /// `{kind, message}` body (or the application error's body).
    pub(crate) fn answer(&self, codec: Codec) -> (u16, HeaderMap, Bytes) {
        error_reply(self.kind, &self.message, self.body.as_ref(), codec)
    }
}

impl From<Error> for Fault {
    fn from(error: Error) -> Self {
        Fault::new(error.kind(), error.message().to_owned())
    }
}

/// A grant: the number of items the caller allows in all, as decimal text.
/// One that does not read grants nothing (the stream waits for the next).
fn read_credit(payload: &[u8]) -> u64 {
    std::str::from_utf8(payload)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}

/// A function a worker can serve: its spec and its handler. Collected
/// through `inventory` from every crate linked into the binary.
#[doc(hidden)]
pub struct Registration {
    pub(crate) spec: &'static FnSpec,
    pub(crate) handler: fn(Incoming) -> HandlerFuture,
}

impl Registration {
    /// Pairs a spec with its handler (used by the generated code).
    pub const fn new(spec: &'static FnSpec, handler: fn(Incoming) -> HandlerFuture) -> Self {
        Registration { spec, handler }
    }
}

inventory::collect!(Registration);

/// Every microservice registered in this binary.
pub fn registered() -> impl Iterator<Item = &'static FnSpec> {
    registrations().map(|r| r.spec)
}

pub(crate) fn registrations() -> impl Iterator<Item = &'static Registration> {
    inventory::iter::<Registration>.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages() {
        assert_eq!(panic_message(&"boom"), "boom");
        assert_eq!(panic_message(&String::from("bang")), "bang");
        assert_eq!(panic_message(&7u8), "a non-string panic payload");
    }
}
