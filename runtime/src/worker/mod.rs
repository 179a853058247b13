//! The serving side: a [`Worker`] registers one ADR-32 endpoint per
//! microservice linked into the binary and answers calls.
//!
//! Each request runs in its own task, at most `concurrency` at a time; a
//! panicking handler is answered with code 500 and the worker keeps serving;
//! sync functions run on the blocking pool.
//!
//! A call passes through stages, one file each: `intake` takes and admits
//! it, `dispatch` runs it, `reply` answers; `idempotent`, `stateful` and
//! `durable` are the paths of those kinds of calls; `cancel` stops the
//! calls their callers gave up; `start` sets it all up
//! and drains it; `endpoint` holds what they share.

pub(crate) mod cancel;
pub(crate) mod dispatch;
pub(crate) mod durable;
pub(crate) mod endpoint;
pub(crate) mod idempotent;
pub(crate) mod intake;
pub(crate) mod metrics;
pub(crate) mod outbox;
pub(crate) mod reply;
pub(crate) mod start;
pub(crate) mod stateful;
pub(crate) mod stores;

pub use crate::settings::{DEFAULT_CONCURRENCY, MAX_CONCURRENCY};
pub use start::{RunningWorker, Worker};
