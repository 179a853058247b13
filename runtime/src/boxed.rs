//! Futures kept out of the hot frame.

/// A boxed future made in a stack frame of its own.
///
/// For the rare branches of the call path (faults, spills, retries): a
/// future built inline takes its full size in the frame of every poll of
/// the future that awaits it, even when the branch is never taken, and a
/// frame of tens of KiB costs each call stack probes and cache misses. Made
/// here, never inlined, its size stays out of the hot frame.
#[inline(never)]
pub(crate) fn out_of_line<'a, F>(make: impl FnOnce() -> F) -> OutOfLine<'a, F::Output>
where
    F: std::future::Future + Send + 'a,
{
    Box::pin(make())
}

/// What [`out_of_line`] makes.
pub(crate) type OutOfLine<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
