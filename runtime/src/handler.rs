//! What a generated handler sees and returns: the call as it arrived
//! ([`Incoming`]), a failure as the worker answers it ([`Fault`]), and the
//! registry of every function linked into the binary.

use crate::error::{Error, ErrorKind};
use crate::spec::FnSpec;
use crate::txn::lease::outside;
use crate::txn::state::{Slot, State};
use crate::wire::codec::Codec;
use crate::wire::reply::{error_reply, ApplicationErrorBody};
use async_nats::HeaderMap;
use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
}

impl Incoming {
    /// Decodes the arguments; failure is a 400 naming the function.
    pub fn decode<A: DeserializeOwned>(&self) -> Result<A, Fault> {
        self.codec.decode_args(&self.payload).map_err(|e| {
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
