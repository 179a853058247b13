//! Dispatch: checks a call (signature, deadline), decodes, runs and
//! encodes it within its deadline, and turns a panic into a 500; the plain
//! call's whole path lives here.

use super::endpoint::{Admission, Endpoint};
use super::reply::ReplyTo;
use crate::boxed::out_of_line;
use crate::error::ErrorKind;
use crate::handler::{panic_message, Fault, Incoming, StreamOut};
use crate::objects::store as objects;
use crate::spec::FnSpec;
use crate::trace::TraceContext;
use crate::txn::state::Slot;
use crate::wire::codec::Codec;
use crate::wire::request::{self, CallMeta};
use bytes::Bytes;
use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::Instrument;

impl Endpoint {
    /// The common call, admitted by [`Endpoint::handle`]: runs the function
    /// and publishes a plain reply here; any other answer (an error, a
    /// spill, headers) goes through [`Endpoint::respond`].
    pub(crate) async fn run_plain(
        self: Arc<Self>,
        admission: Admission,
        reply: ReplyTo,
        codec: Codec,
        meta: CallMeta,
        args: Bytes,
        started: SystemTime,
    ) {
        // Held here until answered, so a caller whose call takes a while
        // can ask whether it still runs (or was lost with a connection).
        self.track(&meta.call_id);
        let Some(_permit) = admission.run(&self.shared).await else {
            self.untrack(&meta.call_id);
            return;
        };
        match self.call_handler(codec, &meta, args, None).await {
            Ok(body)
                if codec == Codec::Postcard
                    && !meta.report_instance
                    && body.len() <= self.shared.spill_at =>
            {
                // A failed publish means the connection is gone; the
                // caller's probe then finds the call no longer held.
                self.send_reply(reply, None, body).await;
                self.record(started, None);
            }
            outcome => out_of_line(|| self.respond(reply, codec, &meta, outcome, started)).await,
        }
        self.untrack(&meta.call_id);
    }

    /// Runs the function: checks signature and deadline, decodes, calls,
    /// encodes; a panic becomes a 500.
    pub(crate) async fn execute(
        &self,
        codec: Codec,
        meta: &CallMeta,
        args: Bytes,
        started: SystemTime,
        txn: Option<Arc<Slot>>,
    ) -> Result<Bytes, Fault> {
        admit(self.registration.spec, meta, started)?;
        self.call_handler(codec, meta, args, txn).await
    }

    /// Decodes, calls and encodes, within the call's deadline and in its
    /// trace; a panic becomes a 500.
    pub(crate) async fn call_handler(
        &self,
        codec: Codec,
        meta: &CallMeta,
        args: Bytes,
        txn: Option<Arc<Slot>>,
    ) -> Result<Bytes, Fault> {
        let spec = self.registration.spec;
        let deadline_ms = meta.deadline_ms.unwrap_or(0);
        let incoming = Incoming {
            codec,
            payload: args,
            spec,
            deadline_ms,
            txn,
            stream: meta.stream.as_ref().map(|ask| StreamOut {
                nats: self.shared.nats.clone(),
                ask: ask.clone(),
            }),
        };
        let handler = AssertUnwindSafe((self.registration.handler)(incoming)).catch_unwind();
        let panicked = |panic: Box<dyn std::any::Any + Send>| {
            Err(Fault::panicked(spec, &panic_message(panic.as_ref())))
        };
        // The worker's own span is a child of the caller's, and the calls
        // the function makes are children of it; while spans are exported, a
        // call that came without a trace starts one.
        let trace = match meta.trace.as_deref() {
            Some(parent) => Some(parent.child()),
            None if meta.unsampled => Some(TraceContext::UNSAMPLED),
            None => crate::trace::new_root_if_exporting(),
        };
        let span = server_span(spec, meta, trace.as_ref());
        if span.is_disabled() && !trace.as_ref().is_some_and(TraceContext::has_ids) {
            // The common call: no span to keep (dropped here, so the call's
            // future does not hold it), and no trace or one without ids,
            // whose decision the function's calls carry on.
            drop(span);
            let handled = match trace {
                None => crate::context::scope(deadline_ms, handler).await,
                Some(unsampled) => {
                    let carried = crate::trace::in_trace(unsampled, handler);
                    crate::context::scope(deadline_ms, carried).await
                }
            };
            return handled.unwrap_or_else(panicked);
        }
        let traced = crate::trace::maybe_in(trace, handler);
        let instrumented = span.clone();
        let outcome = out_of_line(move || {
            crate::context::scope(deadline_ms, traced).instrument(instrumented)
        })
        .await
        .unwrap_or_else(panicked);
        if !span.is_disabled() {
            let kind = outcome
                .as_ref()
                .err()
                .map_or("ok", |fault| fault.kind().as_str());
            span.record("rpc.outcome", kind);
        }
        outcome
    }

    /// The arguments of a spilled call, from the object store.
    pub(crate) async fn unspill(&self, (uri, digest): &(String, String)) -> Result<Bytes, Fault> {
        objects::fetch_spilled(&self.shared.client, uri, digest)
            .await
            .map_err(|e| {
                let spec = self.registration.spec;
                Fault::new(
                    e.kind(),
                    format!(
                        "the arguments of `{}.{}` were spilled to `{uri}`, which cannot be read: {}",
                        spec.service,
                        spec.name,
                        e.message()
                    ),
                )
            })
    }
}

/// The worker's span of a call (a `debug` span: off unless a subscriber
/// asks for it), with the OpenTelemetry RPC attributes and wharf's own.
fn server_span(spec: &FnSpec, meta: &CallMeta, trace: Option<&TraceContext>) -> tracing::Span {
    let trace = crate::trace::with_ids(trace);
    crate::trace::with_sampled_hint(trace, || {
        tracing::debug_span!(
            "wharf.serve",
            otel.name = %format_args!("{}/{}", spec.service, spec.name),
            otel.kind = "server",
            rpc.system = "nats",
            rpc.service = spec.service,
            rpc.method = spec.name,
            wharf.call_id = %String::from_utf8_lossy(&meta.call_id),
            wharf.attempt = meta.attempt,
            wharf.txn = %String::from_utf8_lossy(&meta.txn),
            trace_id = trace.map(TraceContext::trace_id),
            span_id = trace.map(TraceContext::span_id),
            parent_span_id = meta.trace.as_deref().map(TraceContext::span_id),
            trace.sampled = trace.map(TraceContext::sampled),
            rpc.outcome = tracing::field::Empty,
        )
    })
}

/// Reads a request; one that cannot be read is answered as a fault.
pub(crate) fn read_request(
    message: &async_nats::Message,
) -> Result<(Codec, CallMeta, Bytes), (Codec, Fault)> {
    request::read(message).map_err(|(codec, error)| (codec, Fault::from(error)))
}

/// Checks what must hold before a call runs: matching signature, deadline
/// not yet passed.
pub(crate) fn admit(spec: &FnSpec, meta: &CallMeta, now: SystemTime) -> Result<(), Fault> {
    if let Some(sig) = meta.sig {
        if sig != spec.sig {
            return Err(Fault::new(
                ErrorKind::SignatureMismatch,
                format!(
                    "signature mismatch on `{}.{}`: the caller was built against signature {sig:016x}, this worker serves {:016x} ({}); rebuild caller and worker from the same source",
                    spec.service, spec.name, spec.sig, spec.signature
                ),
            ));
        }
    }
    if let Some(deadline) = meta.deadline_ms {
        let now = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        if now > deadline {
            return Err(Fault::new(
                ErrorKind::DeadlineExceeded,
                format!(
                    "the deadline of this call to `{}.{}` passed {} ms before it could run",
                    spec.service,
                    spec.name,
                    now - deadline
                ),
            ));
        }
    }
    Ok(())
}

/// One call of a batch as the message it would have been alone, with no
/// reply subject of its own (its answer goes into the batch's reply).
pub(crate) fn batch_entry(subject: &async_nats::Subject, payload: Bytes) -> async_nats::Message {
    async_nats::Message {
        subject: subject.clone(),
        reply: None,
        length: payload.len(),
        payload,
        headers: None,
        status: None,
        description: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    static SPEC: FnSpec = FnSpec {
        service: "math",
        name: "add",
        sig: 0xaa,
        signature: "add(a:i64,b:i64)->i64",
        args: &[],
        returns: "i64",
        error: None,
        timeout_ms: 1000,
        idempotent: false,
        durable: false,
        stateful: false,
        retry: crate::RetryPolicy::DEFAULT,
        blocking: false,
        version: "0.1.0",
        path: "math::add",
        subject: crate::spec::SubjectCache::new(),
    };

    fn meta(sig: Option<u64>, deadline_ms: Option<u64>) -> CallMeta {
        CallMeta {
            sig,
            deadline_ms,
            ..CallMeta::default()
        }
    }

    #[test]
    fn admit_checks_signature_and_deadline() {
        assert!(admit(&SPEC, &meta(Some(0xaa), None), SystemTime::now()).is_ok());
        let mismatch = admit(&SPEC, &meta(Some(0xbb), None), SystemTime::now()).unwrap_err();
        assert_eq!(mismatch.kind, ErrorKind::SignatureMismatch);
        assert!(mismatch.message.contains("00000000000000bb"));
        assert!(mismatch.message.contains("00000000000000aa"));
        let late = admit(&SPEC, &meta(None, Some(1000)), SystemTime::now()).unwrap_err();
        assert_eq!(late.kind, ErrorKind::DeadlineExceeded);
        let far = (SystemTime::now() + Duration::from_secs(60))
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(admit(&SPEC, &meta(None, Some(far)), SystemTime::now()).is_ok());
    }
}
