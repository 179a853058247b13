//! Durable calls: at least once, through JetStream.
//!
//! A durable call is published into the service's work-queue stream
//! (`<prefix>_calls_<service>`, subjects `<prefix>.durable.<service>.<fn>`)
//! instead of being requested. A worker pulls it (no more than it has
//! permits for), runs it, stores the result in KV `wharf_results_<service>` under the
//! call id, replies to the caller's `Wharf-Reply` subject, and only then
//! acks. A worker killed mid-call means redelivery after the consumer's
//! ack wait; a call that cannot be decoded, or that was delivered more than
//! `max_deliver` times, moves to the dead-letter stream and its caller gets
//! [`ErrorKind::DeadLetter`](crate::ErrorKind::DeadLetter).
//!
//! While several durable calls of one function are being stored from one
//! client, they are stored as one message, a batch, on
//! `<prefix>.durable.<service>.<fn>-batch` (`batcher`).
//!
//! `caller` is the caller's side, `streams` what both sides share; the
//! worker's side is `worker::durable`.

mod batcher;
pub(crate) mod caller;
pub(crate) mod streams;

pub use crate::settings::{DEFAULT_ACK_WAIT, DEFAULT_MAX_DELIVER, DEFAULT_RESULTS_TTL};
pub use caller::Pending;
