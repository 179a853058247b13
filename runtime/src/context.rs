//! The call a worker is running right now, so calls it makes to other
//! microservices inherit its deadline.
//!
//! Async handlers see it through a tokio task-local; sync handlers, which
//! run on the blocking pool, through a thread-local set around the call,
//! with the flag that says the call was cancelled ([`cancelled`]).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

tokio::task_local! {
    static DEADLINE_MS: u64;
}

thread_local! {
    static BLOCKING_DEADLINE_MS: Cell<u64> = const { Cell::new(0) };
    static BLOCKING_CANCELLED: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

/// Runs `future` as the handling of a call whose deadline is `deadline_ms`
/// (unix milliseconds, 0 for none).
pub(crate) async fn scope<F: Future>(deadline_ms: u64, future: F) -> F::Output {
    DEADLINE_MS.scope(deadline_ms, future).await
}

/// Runs a sync handler with the deadline of the call that started it and
/// the flag its cancellation sets.
pub(crate) fn scope_blocking<T>(
    deadline_ms: u64,
    cancelled: Arc<AtomicBool>,
    f: impl FnOnce() -> T,
) -> T {
    let previous = BLOCKING_DEADLINE_MS.with(|d| d.replace(deadline_ms));
    let previous_flag = BLOCKING_CANCELLED.with(|c| c.replace(Some(cancelled)));
    // Restored even if `f` panics, so a pooled thread never carries a stale
    // deadline (or cancel flag) into the next call.
    struct Restore(u64, Option<Arc<AtomicBool>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            BLOCKING_DEADLINE_MS.with(|d| d.set(self.0));
            BLOCKING_CANCELLED.with(|c| *c.borrow_mut() = self.1.take());
        }
    }
    let _restore = Restore(previous, previous_flag);
    f()
}

/// Whether the microservice call this code runs in was cancelled: its
/// caller dropped the call or its deadline passed. A sync function checks
/// it to stop long work early (its slot on the worker is already free);
/// an async function needs not, as it is stopped at its next `.await`.
/// False outside a call.
///
/// ```no_run
/// #[wharf::microservice]
/// fn crunch(n: u64) -> u64 {
///     let mut sum = 0;
///     for i in 0..n {
///         if i % 1024 == 0 && wharf::cancelled() {
///             return 0;
///         }
///         sum += i;
///     }
///     sum
/// }
/// # fn main() {}
/// ```
pub fn cancelled() -> bool {
    BLOCKING_CANCELLED.with(|c| {
        c.borrow()
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
    })
}

/// The deadline of the call being handled, unix milliseconds, if any.
pub(crate) fn inherited_deadline_ms() -> Option<u64> {
    let async_deadline = DEADLINE_MS.try_with(|d| *d).ok();
    let deadline = async_deadline.unwrap_or_else(|| BLOCKING_DEADLINE_MS.with(Cell::get));
    (deadline != 0).then_some(deadline)
}

/// The deadline of the microservice call this code is running in, if it
/// runs inside one that has a deadline. Calls made from here inherit it;
/// long work can check it to give up early.
///
/// ```no_run
/// #[wharf::microservice]
/// async fn crunch(n: u64) -> u64 {
///     if let Some(left) = wharf::time_left() {
///         if left.is_zero() { return 0; }
///     }
///     n * 2
/// }
/// # fn main() {}
/// ```
pub fn deadline() -> Option<SystemTime> {
    inherited_deadline_ms().map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
}

/// Time left until [`deadline`], zero once it has passed; `None` outside a
/// call with a deadline.
pub fn time_left() -> Option<Duration> {
    deadline().map(|d| {
        d.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    })
}

/// Now as unix milliseconds.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn async_scope_sets_and_clears_the_deadline() {
        assert_eq!(inherited_deadline_ms(), None);
        let seen = scope(42, async { inherited_deadline_ms() }).await;
        assert_eq!(seen, Some(42));
        assert_eq!(inherited_deadline_ms(), None);
        assert_eq!(scope(0, async { inherited_deadline_ms() }).await, None);
    }

    #[test]
    fn blocking_scope_restores_after_a_panic() {
        let flag = Arc::new(AtomicBool::new(true));
        let caught =
            std::panic::catch_unwind(|| scope_blocking(7, flag.clone(), || panic!("boom")));
        assert!(caught.is_err());
        assert_eq!(inherited_deadline_ms(), None);
        assert!(!cancelled());
        let fresh = Arc::new(AtomicBool::new(false));
        assert_eq!(
            scope_blocking(9, fresh.clone(), inherited_deadline_ms),
            Some(9)
        );
        assert!(scope_blocking(9, flag, cancelled));
        assert!(!scope_blocking(9, fresh, cancelled));
    }
}
