//! Coalesced durable calls: while several durable calls of one function
//! are being stored from this client, the ones ready to go are stored
//! together, as one JetStream message holding a [batch](crate::wire::batch)
//! of calls, with one acknowledgement for all of them (docs/protocol.md,
//! "Coalesced durable calls").
//!
//! As with plain calls, nothing waits for a batch to fill: the call that
//! begins one lets the runtime run once, then the batch is stored with the
//! calls that joined meanwhile. Each call keeps its own id (results,
//! collect-by-id, cancel), reply and deadline; only the message that
//! carries it into the work queue is shared.

use crate::error::Error;
use crate::spec::FnSpec;
use crate::wire::batch::{ENTRY_OVERHEAD, MAX_BATCH_BYTES, MAX_BATCH_CALLS};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Durable calls of one function being stored at once from this client at
/// which further ones start to coalesce.
const COALESCE_FROM: usize = 4;

/// How long a function whose workers do not take batches (no batch
/// consumer on its stream) stores its durable calls alone before it looks
/// again.
const LOOK_AGAIN_AFTER: Duration = Duration::from_secs(5);

/// How long a function whose workers take batches is trusted to before it
/// is looked at again (its stream may have been made again meanwhile,
/// without a batch consumer).
const CHECK_AGAIN_AFTER: Duration = Duration::from_secs(30);

/// What became of the batch a call travelled in.
#[derive(Debug)]
pub(super) enum Batched {
    /// JetStream stored it.
    Stored,
    /// It was not sent, or refused outright (too large, or its subject
    /// not permitted): the call is stored alone.
    NotSent,
    /// It may have been stored: the call fails with this error rather
    /// than be stored a second time, under another message id, and run
    /// twice.
    Failed(Error),
}

/// One call in a batch: its request (envelope and arguments, postcard),
/// its id, and where it learns whether the batch was stored.
pub(super) struct Entry {
    pub(super) request: Bytes,
    pub(super) id: String,
    pub(super) stored: oneshot::Sender<Batched>,
}

/// Whether the workers of a function take batches of durable calls.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Takes {
    /// Not yet asked.
    Unknown,
    /// Being asked.
    Asking,
    /// Its batch consumer existed when last asked: ask again after this.
    YesUntil(Instant),
    /// It did not, when last asked: ask again after this.
    NotUntil(Instant),
}

/// One function's durable calls being stored from this client.
struct Queue {
    in_flight: usize,
    gathering: Vec<Entry>,
    bytes: usize,
    /// Counts the batches that began gathering, so the call that began one
    /// knows whether a call that filled it has sent it already.
    generation: u64,
    takes: Takes,
}

/// How a durable call is stored.
pub(super) enum Turn {
    /// Alone, as without coalescing.
    Alone,
    /// Alone, and the batch consumer of its function is to be looked for.
    Ask,
    /// In a batch another call stores.
    Joined(oneshot::Receiver<Batched>),
    /// In a batch this call began: it stores it once the runtime has run.
    Began(oneshot::Receiver<Batched>, u64),
    /// In a batch this call filled: it stores it now.
    Filled(oneshot::Receiver<Batched>, Vec<Entry>),
}

/// Which calls may share a batch: those of one function whose callers
/// await their answers now, or those of one function started to be
/// collected later (whose batches ask for no confirmation).
#[derive(Clone, Copy)]
pub(super) struct Of {
    pub(super) spec: &'static FnSpec,
    pub(super) awaited: bool,
}

impl Of {
    fn key(self) -> (&'static str, bool) {
        (self.spec.path, self.awaited)
    }
}

/// A client's durable calls being stored, by function and [`Of`].
#[derive(Default)]
pub(super) struct Batcher {
    queues: Mutex<HashMap<(&'static str, bool), Queue>>,
}

impl Batcher {
    /// Counts a call of `of` being stored (alone or in a batch) until the
    /// guard is dropped.
    pub(super) fn enter(&self, of: Of) -> Storing<'_> {
        let mut queues = self.queues.lock().unwrap();
        let queue = queues.entry(of.key()).or_insert_with(|| Queue {
            in_flight: 0,
            gathering: Vec::new(),
            bytes: 0,
            generation: 0,
            takes: Takes::Unknown,
        });
        queue.in_flight += 1;
        Storing { batcher: self, of }
    }

    /// Finds the turn of a call of `of` being stored ([`Batcher::enter`]).
    pub(super) fn turn(&self, of: Of, request: &Bytes, id: &str, max_bytes: usize) -> Turn {
        let mut queues = self.queues.lock().unwrap();
        // What the other kind of calls of this function learnt holds for
        // these too: the workers' batch consumer is the same.
        let sibling = queues
            .get(&(of.spec.path, !of.awaited))
            .map(|queue| queue.takes);
        let Some(queue) = queues.get_mut(&of.key()) else {
            return Turn::Alone;
        };
        if queue.gathering.is_empty() && queue.in_flight <= COALESCE_FROM {
            return Turn::Alone;
        }
        if let (Takes::Unknown, Some(known @ (Takes::YesUntil(_) | Takes::NotUntil(_)))) =
            (queue.takes, sibling)
        {
            queue.takes = known;
        }
        match queue.takes {
            Takes::YesUntil(until) if Instant::now() < until => {}
            Takes::YesUntil(_) => {
                // Looked at again while calls go on coalescing; this one
                // alone asks.
                queue.takes = Takes::YesUntil(Instant::now() + CHECK_AGAIN_AFTER);
                return Turn::Ask;
            }
            Takes::Asking => return Turn::Alone,
            Takes::NotUntil(until) if Instant::now() < until => return Turn::Alone,
            Takes::Unknown | Takes::NotUntil(_) => {
                queue.takes = Takes::Asking;
                return Turn::Ask;
            }
        }
        let size = request.len() + ENTRY_OVERHEAD;
        if queue.bytes + size > max_bytes.min(MAX_BATCH_BYTES) {
            // A batch never outgrows the server's max_payload.
            return Turn::Alone;
        }
        let (tx, rx) = oneshot::channel();
        queue.gathering.push(Entry {
            request: request.clone(),
            id: id.to_owned(),
            stored: tx,
        });
        queue.bytes += size;
        if queue.gathering.len() == 1 {
            queue.generation += 1;
            return Turn::Began(rx, queue.generation);
        }
        if queue.gathering.len() >= MAX_BATCH_CALLS {
            queue.bytes = 0;
            return Turn::Filled(rx, std::mem::take(&mut queue.gathering));
        }
        Turn::Joined(rx)
    }

    /// The gathering batch of `of`, if it is still the one of
    /// `generation` (else a call that filled it has sent it).
    pub(super) fn take(&self, of: Of, generation: u64) -> Option<Vec<Entry>> {
        let mut queues = self.queues.lock().unwrap();
        let queue = queues.get_mut(&of.key())?;
        if queue.generation != generation || queue.gathering.is_empty() {
            return None;
        }
        queue.bytes = 0;
        Some(std::mem::take(&mut queue.gathering))
    }

    /// Records whether the workers of `of`'s function take batches.
    pub(super) fn takes(&self, of: Of, takes: bool) {
        let takes = if takes {
            Takes::YesUntil(Instant::now() + CHECK_AGAIN_AFTER)
        } else {
            Takes::NotUntil(Instant::now() + LOOK_AGAIN_AFTER)
        };
        let mut queues = self.queues.lock().unwrap();
        for awaited in [false, true] {
            if let Some(queue) = queues.get_mut(&(of.spec.path, awaited)) {
                queue.takes = takes;
            }
        }
    }
}

/// A call being stored, counted until dropped.
pub(super) struct Storing<'a> {
    batcher: &'a Batcher,
    of: Of,
}

impl Drop for Storing<'_> {
    fn drop(&mut self) {
        let mut queues = self.batcher.queues.lock().unwrap();
        if let Some(queue) = queues.get_mut(&self.of.key()) {
            queue.in_flight = queue.in_flight.saturating_sub(1);
        }
    }
}
