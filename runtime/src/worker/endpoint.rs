//! What every stage of a call shares: the worker's state ([`Shared`]),
//! one served function ([`Endpoint`]), a call's place among those running
//! ([`Admission`]), and the bookkeeping around a call.

use crate::client::Client;
use crate::handler::Registration;
use crate::micro::EndpointStats;
use crate::txn::owner::Owned;
use crate::wire::codec::Codec;
use crate::wire::reply;
use crate::wire::request::CallMeta;
use async_nats::jetstream::kv;
use async_nats::HeaderMap;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;

pub(crate) struct Shared {
    pub(crate) nats: async_nats::Client,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) concurrency: usize,
    /// Calls taken but waiting for a permit.
    pub(crate) backlog: AtomicUsize,
    /// The most calls that may wait; past it a call is answered 503.
    pub(crate) max_backlog: usize,
    /// `Wharf-Instance` value: `<instance id> <pid> <host>`.
    pub(crate) identity: String,
    /// The calls this worker holds (running or waiting for a slot), for
    /// callers' probes.
    pub(crate) running: Running,
    /// Calls stopped because their callers cancelled them.
    pub(crate) cancelled: AtomicU64,
    /// Cancels of calls not held here when they came.
    pub(crate) cancels: Cancelled,
    /// Subject prefix.
    pub(crate) prefix: String,
    /// The transactions this instance owns, when it serves stateful
    /// functions.
    pub(crate) owned: Option<Arc<Owned>>,
    /// The client, for spilled arguments and results.
    pub(crate) client: Client,
    /// Results larger than this are spilled.
    pub(crate) spill_at: usize,
    /// Answers of batched calls on their way out.
    pub(crate) outbox: Arc<super::outbox::Outbox>,
    /// Durable results being stored.
    pub(crate) stores: Arc<super::stores::Stores>,
}

impl Shared {
    pub(crate) fn in_flight(&self) -> usize {
        self.concurrency - self.permits.available_permits()
    }

    pub(crate) fn backlog(&self) -> usize {
        self.backlog.load(Ordering::Relaxed)
    }
}

/// The calls a worker holds, by call id: whether a caller has probed for
/// each (an idempotent call's result is then kept for a retry), and how to
/// stop it when its caller cancels it. Sharded by the id's last byte (call
/// ids end in random characters), so that calls starting and ending on
/// several threads rarely meet on a lock.
pub(crate) struct Running {
    shards: Box<[Mutex<HashMap<Bytes, Held, IdHash>>]>,
}

/// What [`Running`] knows of one call.
#[derive(Default)]
struct Held {
    probed: bool,
    /// A cancel came before the call could be stopped (it had no
    /// [`Stop`] yet): it is stopped as soon as it gets one.
    cancelled: bool,
    stop: Option<Stop>,
}

/// How a held call is stopped. A call that ends in its first poll has
/// none and needs none: it is over before a cancel can be read.
pub(crate) enum Stop {
    /// The call's own task: aborted, it stops at its next await, and its
    /// permit, its nested calls (each cancelled in turn) and its sync
    /// function's cancel flag are dropped with it.
    Abort(tokio::task::AbortHandle),
    /// A durable call, told to stop so that it can settle its message.
    Signal(tokio::sync::oneshot::Sender<()>),
}

impl Stop {
    fn fire(self) {
        match self {
            Stop::Abort(task) => task.abort(),
            Stop::Signal(tell) => {
                let _ = tell.send(());
            }
        }
    }
}

/// Call ids are random already: FNV-1a spreads them as well as SipHash,
/// at a fraction of the cost every call pays twice.
type IdHash = std::hash::BuildHasherDefault<Fnv>;

/// FNV-1a, 64 bits.
pub(crate) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl Running {
    const SHARDS: usize = 16;

    pub(crate) fn new() -> Running {
        Running {
            shards: (0..Self::SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, id: &[u8]) -> &Mutex<HashMap<Bytes, Held, IdHash>> {
        &self.shards[id.last().map_or(0, |b| *b as usize) % Self::SHARDS]
    }

    /// Registers call `id` as held here.
    pub(crate) fn insert(&self, id: &Bytes) {
        self.shard(id)
            .lock()
            .unwrap()
            .insert(id.clone(), Held::default());
    }

    /// Unregisters call `id`; true when a caller probed for it meanwhile.
    pub(crate) fn remove(&self, id: &[u8]) -> bool {
        self.shard(id)
            .lock()
            .unwrap()
            .remove(id)
            .is_some_and(|held| held.probed)
    }

    /// Whether call `id` is held here; marks it probed when it is.
    pub(crate) fn probe(&self, id: &[u8]) -> bool {
        match self.shard(id).lock().unwrap().get_mut(id) {
            Some(held) => {
                held.probed = true;
                true
            }
            None => false,
        }
    }

    /// Gives held call `id` the means to stop it; a call cancelled before
    /// that is stopped now. A call that already ended is left alone.
    pub(crate) fn attach(&self, id: &[u8], stop: Stop) {
        let mut shard = self.shard(id).lock().unwrap();
        let Some(held) = shard.get_mut(id) else {
            return;
        };
        if held.cancelled {
            if matches!(stop, Stop::Abort(_)) {
                // An aborted task never unregisters itself.
                shard.remove(id);
            }
            drop(shard);
            stop.fire();
        } else {
            held.stop = Some(stop);
        }
    }

    /// Stops held call `id`; false when it is not held here.
    pub(crate) fn cancel(&self, id: &[u8]) -> bool {
        let mut shard = self.shard(id).lock().unwrap();
        let Some(held) = shard.get_mut(id) else {
            return false;
        };
        match held.stop.take() {
            Some(stop) => {
                if matches!(stop, Stop::Abort(_)) {
                    shard.remove(id);
                }
                drop(shard);
                stop.fire();
            }
            None => held.cancelled = true,
        }
        true
    }
}

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
    /// Remembers that call `id` was cancelled.
    pub(crate) fn note(&self, id: &[u8]) {
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

/// A call's place among the calls a worker runs at once.
pub(crate) enum Admission {
    /// It holds a permit and runs now.
    Running(tokio::sync::OwnedSemaphorePermit),
    /// It waits in the backlog (already counted there) for a permit.
    Queued,
}

impl Admission {
    /// The permit the call runs under; `None` once the worker closed.
    pub(crate) async fn run(self, shared: &Shared) -> Option<tokio::sync::OwnedSemaphorePermit> {
        match self {
            Admission::Running(permit) => Some(permit),
            Admission::Queued => {
                // Left on drop too: a call cancelled while it waits
                // leaves the backlog all the same.
                struct Leave<'a>(&'a AtomicUsize);
                impl Drop for Leave<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                let _leave = Leave(&shared.backlog);
                // Boxed: only a queued call's task carries the wait.
                let permit = Box::pin(shared.permits.clone().acquire_owned()).await;
                permit.ok()
            }
        }
    }

    /// Gives up the call's place without running it.
    pub(crate) fn leave(self, shared: &Shared) {
        if let Admission::Queued = self {
            shared.backlog.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One function served by this worker.
pub(crate) struct Endpoint {
    pub(crate) registration: &'static Registration,
    pub(crate) stats: Arc<EndpointStats>,
    pub(crate) shared: Arc<Shared>,
    /// The service's results bucket, when the server has JetStream.
    pub(crate) results: Option<kv::Store>,
}

impl Endpoint {
    /// Registers a call as held here, for probes.
    pub(crate) fn track(&self, call_id: &Bytes) {
        if !call_id.is_empty() {
            self.shared.running.insert(call_id);
        }
    }

    /// Unregisters a call; true when a caller probed for it meanwhile.
    pub(crate) fn untrack(&self, call_id: &Bytes) -> bool {
        !call_id.is_empty() && self.shared.running.remove(call_id)
    }

    /// Headers of a successful reply that needs any: its codec when not
    /// postcard, the worker's identity when asked for.
    pub(crate) fn reply_headers(&self, codec: Codec, meta: &CallMeta) -> HeaderMap {
        let identity = meta
            .report_instance
            .then_some(self.shared.identity.as_str());
        reply::success_headers(codec, identity)
    }

    /// Counts a finished call in the endpoint's stats.
    pub(crate) fn record(&self, started: SystemTime, failure: Option<&crate::handler::Fault>) {
        self.stats
            .record(started.elapsed().unwrap_or_default(), failure);
    }
}

/// A round trip through the server on `nats`: a message to a fresh inbox
/// of its own, waited for (at most `limit`). The server writes to a
/// connection in order, so once it is back every message the server
/// routed to this connection before it read ours has been delivered to
/// its subscription. (async-nats's `flush` only empties the write buffer.)
/// False when it did not come back in time.
pub(crate) async fn round_trip(nats: &async_nats::Client, limit: Duration) -> bool {
    let inbox = nats.new_inbox();
    let Ok(mut echo) = nats.subscribe(inbox.clone()).await else {
        return false;
    };
    if nats.publish(inbox, Bytes::new()).await.is_err() {
        return false;
    }
    matches!(
        tokio::time::timeout(limit, futures_util::StreamExt::next(&mut echo)).await,
        Ok(Some(_))
    )
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
