//! A transaction's state on the instance that owns it: one value per type,
//! locked for each call that uses it.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// State of type `S` that belongs to one transaction and lives in the
/// owning instance's memory, handed to a `#[microservice(stateful)]`
/// function as an argument. Calls of one transaction that use the same `S`
/// run one at a time; the state starts as `S::default()`.
///
/// ```
/// let mut seen = wharf::State::new(Vec::<String>::new());
/// seen.push("first".into());
/// assert_eq!(seen.len(), 1);
/// ```
pub struct State<S: 'static> {
    guard: tokio::sync::OwnedMutexGuard<Box<dyn Any + Send>>,
    kind: PhantomData<fn() -> S>,
}

impl<S: Send + 'static> State<S> {
    /// State outside any transaction, for running a stateful function's
    /// body locally (`<fn>::local(.., wharf::State::new(s))`) in tests.
    pub fn new(value: S) -> State<S> {
        let cell: Arc<tokio::sync::Mutex<Box<dyn Any + Send>>> =
            Arc::new(tokio::sync::Mutex::new(Box::new(value)));
        State {
            guard: cell.try_lock_owned().expect("a new mutex is unlocked"),
            kind: PhantomData,
        }
    }
}

impl<S: 'static> Deref for State<S> {
    type Target = S;
    fn deref(&self) -> &S {
        // Cells are keyed by `TypeId::of::<S>()`, so this always holds.
        self.guard.downcast_ref().expect("state cell of type S")
    }
}

impl<S: 'static> DerefMut for State<S> {
    fn deref_mut(&mut self) -> &mut S {
        self.guard.downcast_mut().expect("state cell of type S")
    }
}

impl<S: std::fmt::Debug + 'static> std::fmt::Debug for State<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("State").field(&**self).finish()
    }
}

type Cell = Arc<tokio::sync::Mutex<Box<dyn Any + Send>>>;

/// One transaction this instance owns.
pub(crate) struct Slot {
    pub(crate) id: String,
    /// The service that claimed it.
    pub(crate) service: &'static str,
    pub(crate) lease: Duration,
    /// Revision of the lease record last written by this instance.
    pub(crate) revision: AtomicU64,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) last_used_ms: AtomicU64,
    pub(crate) renewed_ms: AtomicU64,
    pub(crate) states: Mutex<HashMap<TypeId, Cell>>,
}

impl Slot {
    /// The state of type `S`, made on first use, locked for this call.
    pub(crate) async fn state<S: Default + Send + 'static>(&self) -> State<S> {
        let cell = self
            .states
            .lock()
            .unwrap()
            .entry(TypeId::of::<S>())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(Box::new(S::default()))))
            .clone();
        State {
            guard: cell.lock_owned().await,
            kind: PhantomData,
        }
    }
}

/// Marks a call of a transaction as running until dropped.
pub(crate) struct InUse(pub(crate) Arc<Slot>);

impl InUse {
    pub(crate) fn new(slot: Arc<Slot>) -> InUse {
        slot.in_flight.fetch_add(1, Ordering::AcqRel);
        slot.last_used_ms
            .store(crate::context::unix_ms(), Ordering::Relaxed);
        InUse(slot)
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.0
            .last_used_ms
            .store(crate::context::unix_ms(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::DEFAULT_LEASE;

    #[tokio::test]
    async fn state_derefs_to_its_value() {
        let mut state = State::new(5u32);
        *state += 1;
        assert_eq!(*state, 6);
        let slot = Slot {
            id: "t".into(),
            service: "s",
            lease: DEFAULT_LEASE,
            revision: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            last_used_ms: AtomicU64::new(0),
            renewed_ms: AtomicU64::new(0),
            states: Mutex::new(HashMap::new()),
        };
        {
            let mut count = slot.state::<u64>().await;
            *count += 2;
        }
        assert_eq!(*slot.state::<u64>().await, 2);
        assert!(slot.state::<String>().await.is_empty());
    }
}
