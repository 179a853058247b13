//! Retries: which failures a call may be retried after, and how long to
//! wait between attempts (exponential backoff with full jitter).

use crate::error::{Error, ErrorKind};
use std::cell::Cell;
use std::future::Future;
use std::time::{Duration, Instant};

/// How a call is retried: at most `attempts` tries (the first included),
/// waiting a random time in `[0, min(max_backoff, backoff * 2^(n-1))]`
/// before try `n + 1` ("full jitter"), never past the call's deadline.
///
/// Set per function with `#[microservice(attempts = 5, backoff = "25ms",
/// max_backoff = "2s")]`, or per call with [`crate::Request::retry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries per call, the first included; 1 means never retry.
    pub attempts: u32,
    /// Upper bound of the first delay, in milliseconds.
    pub backoff_ms: u64,
    /// Upper bound of any delay, in milliseconds.
    pub max_backoff_ms: u64,
}

impl RetryPolicy {
    /// Ten tries, delays bounded by 25 ms doubling up to 2 s: about seven
    /// seconds of waiting at most, long enough for a supervisor to start a
    /// worker where none runs.
    pub const DEFAULT: RetryPolicy = RetryPolicy {
        attempts: 10,
        backoff_ms: 25,
        max_backoff_ms: 2_000,
    };

    /// One try, no retry.
    pub const NONE: RetryPolicy = RetryPolicy {
        attempts: 1,
        backoff_ms: 0,
        max_backoff_ms: 0,
    };

    /// A policy of `attempts` tries with the default delays. Zero tries is
    /// a configuration error: a call needs at least one.
    pub fn attempts(attempts: u32) -> Result<RetryPolicy, Error> {
        if attempts == 0 {
            return Err(Error::new(
                ErrorKind::Config,
                "a retry policy needs at least 1 attempt (the first try counts); use RetryPolicy::NONE to never retry",
            ));
        }
        Ok(RetryPolicy {
            attempts,
            ..RetryPolicy::DEFAULT
        })
    }

    /// The same policy with other delay bounds. `max_backoff` below
    /// `backoff` is raised to it.
    pub fn backoff(mut self, backoff: Duration, max_backoff: Duration) -> RetryPolicy {
        self.backoff_ms = backoff.as_millis() as u64;
        self.max_backoff_ms = (max_backoff.as_millis() as u64).max(self.backoff_ms);
        self
    }

    /// The delay before try `attempt + 1`, after `attempt` failed tries.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(32);
        let ceiling = self
            .backoff_ms
            .saturating_mul(1u64 << exponent)
            .min(self.max_backoff_ms);
        if ceiling == 0 {
            return Duration::ZERO;
        }
        // Full jitter: uniform in [0, ceiling], so callers that failed
        // together do not retry together.
        Duration::from_millis(random() % (ceiling + 1))
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::DEFAULT
    }
}

/// Whether a failed try may be retried. Failures where the call cannot
/// have run (no worker, a refusal, a send that failed, a worker of another
/// signature, which refuses before running: during a rollout a compatible
/// one may be starting) always may; a timeout or a lost worker, where it
/// may have run, only for idempotent functions.
pub(crate) fn retryable(kind: ErrorKind, idempotent: bool) -> bool {
    match kind {
        ErrorKind::NoResponders
        | ErrorKind::Unavailable
        | ErrorKind::Connection
        | ErrorKind::SignatureMismatch => true,
        ErrorKind::Timeout | ErrorKind::WorkerLost | ErrorKind::ConnectionLost => idempotent,
        _ => false,
    }
}

/// Runs `attempt` (given the try's number, from 1) until it succeeds or the
/// call must fail: out of tries, a failure that may not be retried (see
/// [`retryable`]), or a wait that would pass `deadline`. Between tries it
/// waits [`RetryPolicy::delay`]. Returns the value or the last error, with
/// the number of tries made. Every retried operation of a call goes
/// through here, plain requests and durable publishes alike.
pub(crate) async fn with_retries<T, F, Fut>(
    policy: &RetryPolicy,
    idempotent: bool,
    deadline: Instant,
    mut attempt: F,
    mut on_retry: impl FnMut(ErrorKind),
) -> Result<(T, u32), (Error, u32)>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let mut tries = 1;
    loop {
        let failure = match attempt(tries).await {
            Ok(value) => return Ok((value, tries)),
            Err(failure) => failure,
        };
        if tries >= policy.attempts || !retryable(failure.kind(), idempotent) {
            return Err((failure, tries));
        }
        let delay = policy.delay(tries);
        if Instant::now() + delay >= deadline {
            return Err((failure, tries));
        }
        on_retry(failure.kind());
        tokio::time::sleep(delay).await;
        tries += 1;
    }
}

/// A per-thread xorshift generator seeded from the clock and the thread:
/// jitter needs spread, not cryptographic randomness.
fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            let local = 0u8;
            (nanos ^ (&local as *const u8 as u64).rotate_left(32)) | 1
        });
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tries_until_success_or_a_failure_that_may_not_be_retried() {
        let policy = RetryPolicy::attempts(5)
            .unwrap()
            .backoff(Duration::ZERO, Duration::ZERO);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut retried = Vec::new();
        let outcome = with_retries(
            &policy,
            false,
            deadline,
            |n| async move {
                if n < 3 {
                    Err(Error::new(ErrorKind::NoResponders, "none yet"))
                } else {
                    Ok(n * 10)
                }
            },
            |kind| retried.push(kind),
        )
        .await;
        assert_eq!(outcome.ok(), Some((30, 3)));
        assert_eq!(retried, [ErrorKind::NoResponders; 2]);
        // A timeout may have run: not retried unless idempotent.
        let late = || async { Err::<(), _>(Error::new(ErrorKind::Timeout, "late")) };
        let (error, tries) = with_retries(&policy, false, deadline, |_| late(), |_| {})
            .await
            .unwrap_err();
        assert_eq!((error.kind(), tries), (ErrorKind::Timeout, 1));
        let (_, tries) = with_retries(&policy, true, deadline, |_| late(), |_| {})
            .await
            .unwrap_err();
        assert_eq!(tries, 5);
    }

    #[test]
    fn delays_grow_and_stay_bounded() {
        let policy = RetryPolicy::DEFAULT;
        for attempt in 1..40 {
            let ceiling = (25u64 << (attempt - 1).min(32)).min(2_000);
            for _ in 0..50 {
                assert!(policy.delay(attempt) <= Duration::from_millis(ceiling));
            }
        }
        assert_eq!(RetryPolicy::NONE.delay(3), Duration::ZERO);
    }

    #[test]
    fn delays_are_spread() {
        let policy = RetryPolicy::DEFAULT;
        let distinct: std::collections::HashSet<Duration> =
            (0..100).map(|_| policy.delay(8)).collect();
        assert!(
            distinct.len() > 20,
            "full jitter spreads delays: {distinct:?}"
        );
    }

    #[test]
    fn zero_attempts_is_an_error() {
        let error = RetryPolicy::attempts(0).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
        assert!(error.message().contains("at least 1 attempt"));
        assert_eq!(RetryPolicy::attempts(3).unwrap().attempts, 3);
    }

    #[test]
    fn only_idempotent_calls_retry_after_a_timeout() {
        assert!(retryable(ErrorKind::NoResponders, false));
        assert!(retryable(ErrorKind::Unavailable, false));
        assert!(!retryable(ErrorKind::Timeout, false));
        assert!(retryable(ErrorKind::Timeout, true));
        assert!(!retryable(ErrorKind::WorkerLost, false));
        assert!(!retryable(ErrorKind::ConnectionLost, false));
        assert!(retryable(ErrorKind::ConnectionLost, true));
        assert!(!retryable(ErrorKind::BadRequest, true));
        assert!(!retryable(ErrorKind::Application, true));
    }
}
