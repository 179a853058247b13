//! W3C trace context (`traceparent`, `tracestate`) carried with calls.
//!
//! A call made while a trace is current carries it: a JSON request in the
//! standard `traceparent` and `tracestate` headers, a postcard request
//! after its envelope (flag bit 2, docs/protocol.md). The worker runs the
//! function with the call's trace current, so every call the function
//! makes is a child of the one it serves, across processes; durable calls
//! keep it through JetStream, as part of the stored request. Without a
//! current trace nothing is carried: the call pays two thread-local
//! lookups and a disabled span.
//!
//! The trace is current in the task that serves a call (and on the
//! blocking thread of a sync function); a task the function spawns with
//! `tokio::spawn` does not inherit it: wrap that task's future in
//! [`in_current`] to keep its calls in the trace (and in an unsampled
//! trace's decision, which [`current`] does not show).
//!
//! A trace starts where a program says so ([`in_trace`], with a context of
//! its own or [`TraceContext::new_root`]) or where a foreign client sends
//! a `traceparent`. A malformed one is ignored: the call runs as if none
//! had been sent, and never fails for it. While spans are exported (the
//! `otel` feature), every call made or served outside a trace starts one,
//! sampled at the configured ratio; a call inside a trace follows its
//! sampled flag. A trace started so and not sampled has no ids: calls carry
//! it as one envelope flag bit, and [`current`] is `None` inside it.

use std::cell::RefCell;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// One span's place in a trace: the trace id, the id of the span that is
/// the parent of whatever is made under it, the W3C trace flags, and the
/// vendors' `tracestate`, passed on unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    flags: u8,
    state: Option<Box<str>>,
}

/// The W3C trace flag that says the trace is sampled.
const SAMPLED: u8 = 1;

impl TraceContext {
    /// A trace that is not sampled and has no ids: what a caller that
    /// exports spans starts for a call it does not sample. It travels as one
    /// envelope flag bit (docs/protocol.md), so that the worker and every
    /// nested call follow the decision without ids made, formatted and
    /// parsed for a trace nobody records.
    pub(crate) const UNSAMPLED: TraceContext = TraceContext {
        trace_id: 0,
        span_id: 0,
        flags: 0,
        state: None,
    };

    /// Whether this trace has ids (every trace but [`Self::UNSAMPLED`]).
    pub(crate) fn has_ids(&self) -> bool {
        self.trace_id != 0
    }

    /// Reads a `traceparent` header (and its `tracestate`), as the W3C
    /// Trace Context recommendation has it; `None` when it is malformed
    /// (wrong lengths, not lowercase hex, version `ff`, an id of zeros).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<TraceContext> {
        let text = traceparent.trim();
        let mut parts = text.split('-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let span_id = parts.next()?;
        let flags = parts.next()?;
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !hex(version, 2) || version == "ff" || !hex(trace_id, 32) || !hex(span_id, 16) {
            return None;
        }
        if !hex(flags, 2) {
            return None;
        }
        // Version 00 has exactly four fields; a later version may add more.
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id = u128::from_str_radix(trace_id, 16).ok()?;
        let span_id = u64::from_str_radix(span_id, 16).ok()?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        // Printable ASCII only: it is passed on as a NATS header, where a
        // control character (CR, LF) has no place.
        let state = tracestate
            .map(str::trim)
            .filter(|s| {
                !s.is_empty()
                    && s.len() <= MAX_TRACESTATE
                    && s.bytes().all(|b| (0x20..0x7f).contains(&b))
            })
            .map(Into::into);
        // Only the sampled bit is defined for version 00; the rest are
        // passed on as zero, as the recommendation asks.
        Some(TraceContext {
            trace_id,
            span_id,
            flags: u8::from_str_radix(flags, 16).ok()? & SAMPLED,
            state,
        })
    }

    /// The start of a new trace, sampled or not.
    pub fn new_root(sampled: bool) -> TraceContext {
        TraceContext::root(sampled, random_trace_id())
    }

    fn root(sampled: bool, trace_id: u128) -> TraceContext {
        TraceContext {
            trace_id,
            span_id: random_id(),
            flags: if sampled { SAMPLED } else { 0 },
            state: None,
        }
    }

    /// A new span in the same trace, under this one.
    pub fn child(&self) -> TraceContext {
        if !self.has_ids() {
            return TraceContext::UNSAMPLED;
        }
        TraceContext {
            span_id: random_id(),
            ..self.clone()
        }
    }

    /// The `traceparent` header naming this span.
    pub fn traceparent(&self) -> String {
        if !self.has_ids() {
            // Where no flag bit can say "unsampled" (a JSON request), a
            // header with fresh ids and the sampled flag clear says it.
            return TraceContext::root(false, random_trace_id()).traceparent();
        }
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }

    /// The `tracestate` passed on with it, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.state.as_deref()
    }

    /// The id of this span, as a number (what span exporters take).
    pub(crate) fn span_number(&self) -> u64 {
        self.span_id
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// This span's id, 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// Whether the trace is sampled (W3C flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }
}

/// The longest `tracestate` passed on (W3C: 32 members of at most 256
/// characters; real ones are far shorter). A longer one is dropped.
const MAX_TRACESTATE: usize = 8192;

/// A random, non-zero id: the std hasher's per-process random keys over a
/// per-thread counter (a span id needs to be unique, not secret).
fn random_id() -> u64 {
    thread_local! {
        static STATE: (std::collections::hash_map::RandomState, std::cell::Cell<u64>) =
            (std::collections::hash_map::RandomState::new(), std::cell::Cell::new(0));
    }
    STATE.with(|(keys, counter)| {
        counter.set(counter.get().wrapping_add(1));
        let mut hasher = keys.build_hasher();
        hasher.write_u64(counter.get());
        hasher.finish().max(1)
    })
}

fn random_trace_id() -> u128 {
    (u128::from(random_id()) << 64) | u128::from(random_id())
}

/// Which new traces are sampled while spans are exported: a trace id whose
/// low 64 bits are below this threshold is (the W3C random part, so the
/// decision is the same wherever it is made). `0` means that spans are not
/// exported and no trace starts by itself; `u64::MAX` samples every trace.
static ROOT_THRESHOLD: AtomicU64 = AtomicU64::new(0);

/// Starts traces by themselves from now on, sampling `ratio` (0 to 1) of
/// them: a span exporter is installed.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) fn start_roots(ratio: f64) {
    ROOT_THRESHOLD.store(threshold(ratio), Ordering::Relaxed);
}

/// Starts no more traces by themselves (span export is off).
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) fn stop_roots() {
    ROOT_THRESHOLD.store(0, Ordering::Relaxed);
}

/// The threshold for `ratio`, at least 1: a ratio of 0 still starts
/// (unsampled) traces, whose calls then tell workers not to sample either.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
fn threshold(ratio: f64) -> u64 {
    ((ratio.clamp(0.0, 1.0) * u64::MAX as f64) as u64).max(1)
}

fn sampled(threshold: u64, trace_id: u128) -> bool {
    threshold == u64::MAX || (trace_id as u64) < threshold
}

/// A new trace for a call made or served outside one, while spans are
/// exported ([`TraceContext::UNSAMPLED`] when it is not sampled); `None`
/// otherwise (one atomic load).
pub(crate) fn new_root_if_exporting() -> Option<TraceContext> {
    let threshold = ROOT_THRESHOLD.load(Ordering::Relaxed);
    if threshold == 0 {
        return None;
    }
    // The decision is drawn first, as the trace id's random low half; the
    // rest of the id is drawn only for a trace that is sampled.
    let low = random_id();
    if !sampled(threshold, u128::from(low)) {
        return Some(TraceContext::UNSAMPLED);
    }
    let trace_id = (u128::from(random_id()) << 64) | u128::from(low);
    Some(TraceContext::root(true, trace_id))
}

/// The trace a call's span names: `trace` unless it has no ids.
pub(crate) fn with_ids(trace: Option<&TraceContext>) -> Option<&TraceContext> {
    trace.filter(|trace| trace.has_ids())
}

thread_local! {
    /// Whether the call span being made now is in a sampled trace: set
    /// around the span's creation, so that the export filter, which sees
    /// only the span's static metadata, leaves unsampled calls without one.
    static SAMPLED_HINT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `make` (which makes a call's span) telling span filters whether
/// the call is in a sampled trace.
pub(crate) fn with_sampled_hint<R>(trace: Option<&TraceContext>, make: impl FnOnce() -> R) -> R {
    let sampled = trace.is_some_and(TraceContext::sampled);
    if !sampled {
        return make();
    }
    SAMPLED_HINT.with(|hint| hint.set(true));
    let made = make();
    SAMPLED_HINT.with(|hint| hint.set(false));
    made
}

/// Whether the call span being made now is in a sampled trace.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) fn sampled_hint() -> bool {
    SAMPLED_HINT.with(std::cell::Cell::get)
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

thread_local! {
    static BLOCKING: RefCell<Option<TraceContext>> = const { RefCell::new(None) };
}

/// The trace this code runs in: the call being served (when its caller
/// sent one) or an [`in_trace`] scope; calls made here carry it. `None`
/// too in a call whose caller exports spans but did not sample it: that
/// trace has no ids (calls made there still carry its decision).
pub fn current() -> Option<TraceContext> {
    carried().filter(TraceContext::has_ids)
}

/// What calls made here carry: [`current`], or the unsampled trace
/// without ids.
pub(crate) fn carried() -> Option<TraceContext> {
    CURRENT
        .try_with(Clone::clone)
        .ok()
        .or_else(|| BLOCKING.with(|t| t.borrow().clone()))
}

/// Runs `future` with `trace` current: every call it makes carries it.
///
/// ```no_run
/// # #[wharf::microservice] async fn add(a: i64, b: i64) -> i64 { a + b }
/// # fn main() {}
/// # async fn run() -> Result<(), wharf::Error> {
/// let trace = wharf::trace::TraceContext::new_root(true);
/// let sum = wharf::trace::in_trace(trace, add(2, 3)).await?;
/// # Ok(()) }
/// ```
pub async fn in_trace<F: Future>(trace: TraceContext, future: F) -> F::Output {
    CURRENT.scope(trace, future).await
}

/// Wraps `future` to run in the trace current here, when there is one:
/// for a task spawned from a call, so that its calls stay in the call's
/// trace (sampled or not, with or without ids).
///
/// ```no_run
/// #[wharf::microservice]
/// async fn add(a: i64, b: i64) -> i64 { a + b }
///
/// #[wharf::microservice]
/// async fn add_later(a: i64, b: i64) -> i64 {
///     let task = tokio::spawn(wharf::trace::in_current(add(a, b)));
///     task.await.unwrap().unwrap_or(0)
/// }
/// # fn main() {}
/// ```
pub fn in_current<F: Future>(future: F) -> impl Future<Output = F::Output> {
    maybe_in(carried(), future)
}

/// Runs `future` with `trace` current when there is one.
pub(crate) async fn maybe_in<F: Future>(trace: Option<TraceContext>, future: F) -> F::Output {
    match trace {
        Some(trace) => CURRENT.scope(trace, future).await,
        None => future.await,
    }
}

/// Runs a sync handler with `trace` current on its blocking thread.
pub(crate) fn in_blocking<T>(trace: Option<TraceContext>, f: impl FnOnce() -> T) -> T {
    if trace.is_none() {
        return f();
    }
    let previous = BLOCKING.with(|t| t.replace(trace));
    // Restored even if `f` panics: a pooled thread keeps no stale trace.
    struct Restore(Option<TraceContext>);
    impl Drop for Restore {
        fn drop(&mut self) {
            BLOCKING.with(|t| *t.borrow_mut() = self.0.take());
        }
    }
    let _restore = Restore(previous);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_and_writes_the_w3c_header() {
        let trace = TraceContext::parse(EXAMPLE, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(trace.traceparent(), EXAMPLE);
        assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace.span_id(), "00f067aa0ba902b7");
        assert!(trace.sampled());
        assert_eq!(trace.tracestate(), Some("congo=t61rcWkgMzE"));
        let child = trace.child();
        assert_eq!(child.trace_id(), trace.trace_id());
        assert_ne!(child.span_id(), trace.span_id());
        assert_eq!(child.tracestate(), trace.tracestate());
        // A later version may carry more fields.
        assert!(TraceContext::parse(&format!("01{}-extra", &EXAMPLE[2..]), None).is_some());
        // Undefined flags are passed on as zero.
        let flagged = TraceContext::parse(&EXAMPLE.replace("-01", "-ff"), None).unwrap();
        assert!(flagged.traceparent().ends_with("-01"));
        // A tracestate that could not be a header is dropped, the trace kept.
        for bad in ["a=b\r\nInjected: yes", "a=\u{7f}", "caf\u{e9}=1"] {
            let trace = TraceContext::parse(EXAMPLE, Some(bad)).unwrap();
            assert_eq!(trace.tracestate(), None, "{bad:?}");
        }
    }

    #[test]
    fn a_malformed_header_is_no_trace() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad:?}");
        }
    }

    #[test]
    fn new_traces_are_sampled_at_the_ratio() {
        let share = |ratio: f64| {
            let threshold = threshold(ratio);
            (0..100_000)
                .filter(|_| sampled(threshold, random_trace_id()))
                .count()
        };
        assert_eq!(share(1.0), 100_000);
        assert_eq!(share(0.0), 0);
        let one_percent = share(0.01);
        assert!(
            (700..1300).contains(&one_percent),
            "{one_percent} of 100000"
        );
    }

    #[tokio::test]
    async fn the_current_trace_is_scoped() {
        assert_eq!(current(), None);
        let root = TraceContext::new_root(true);
        assert!(root.sampled() && TraceContext::parse(&root.traceparent(), None).is_some());
        let seen = in_trace(root.clone(), async { current() }).await;
        assert_eq!(seen, Some(root.clone()));
        assert_eq!(current(), None);
        let caught = std::panic::catch_unwind(|| in_blocking(Some(root.clone()), || panic!()));
        assert!(caught.is_err());
        assert_eq!(current(), None);
        assert_eq!(in_blocking(Some(root.clone()), current), Some(root.clone()));
        // A spawned task keeps the trace, and the unsampled one too.
        for trace in [root, TraceContext::UNSAMPLED] {
            let spawned = in_trace(trace.clone(), async {
                tokio::spawn(in_current(async { carried() })).await.unwrap()
            })
            .await;
            assert_eq!(spawned, Some(trace));
        }
        let unsampled = in_trace(TraceContext::UNSAMPLED, async { current() }).await;
        assert_eq!(unsampled, None, "a trace without ids is not shown");
    }
}
