//! wharf's call spans exported over OTLP/gRPC (the `otel` feature).
//!
//! Every call is a `wharf.call` span on the caller and a `wharf.serve` span
//! on the worker, with the ids of the W3C trace context that travels with
//! the call ([`crate::trace`]). This module turns those spans into
//! OpenTelemetry spans with the same ids, so that a caller, the worker that
//! serves it and every call made inside are one trace in any OTLP backend,
//! across processes, whichever of them export.
//!
//! Configured as every OpenTelemetry SDK is, from the environment:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! turns export on; `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`
//! name the process; `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`
//! sample new traces; `OTEL_BSP_*` tune the batching; `OTEL_SDK_DISABLED`
//! turns it all off. Spans are batched and sent from a thread of their own,
//! so a call pays for recording its span, never for the export.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::error::{Error, ErrorKind};

/// The names of wharf's call spans, the only spans exported.
pub(crate) const SPAN_NAMES: [&str; 2] = ["wharf.call", "wharf.serve"];

/// What the environment asks for: whether to export, and which share of
/// new traces to sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Export {
    /// The share of traces that start here and are sampled, 0 to 1.
    pub(crate) ratio: f64,
}

/// Reads the standard OpenTelemetry variables through `var`: `None` when
/// nothing is to be exported, an error naming the variable when one has a
/// value wharf cannot use.
pub(crate) fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Export>, Error> {
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    match set("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
        None | Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => {
            return Err(config(format!(
                "OTEL_TRACES_EXPORTER is `{other}`; wharf exports spans over OTLP only: set it to `otlp` or `none`, or unset it"
            )))
        }
    }
    if set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        && set("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
    {
        return Ok(None);
    }
    let ratio = || -> Result<f64, Error> {
        let Some(arg) = set("OTEL_TRACES_SAMPLER_ARG") else {
            return Ok(1.0);
        };
        match arg.trim().parse::<f64>() {
            Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
            _ => Err(config(format!(
                "OTEL_TRACES_SAMPLER_ARG is `{arg}`; give the share of traces to sample as a number from 0 to 1, such as 0.01"
            ))),
        }
    };
    // A call that arrives in a trace always follows the sampled flag its
    // caller sent (as the parent-based samplers do); the sampler decides
    // for the traces that start here.
    let ratio = match set("OTEL_TRACES_SAMPLER").as_deref().map(str::trim) {
        None | Some("always_on") | Some("parentbased_always_on") => 1.0,
        Some("always_off") | Some("parentbased_always_off") => 0.0,
        Some("traceidratio") | Some("parentbased_traceidratio") => ratio()?,
        Some(other) => {
            return Err(config(format!(
                "OTEL_TRACES_SAMPLER is `{other}`; wharf samples with `always_on`, `always_off`, `traceidratio` or their `parentbased_` forms"
            )))
        }
    };
    Ok(Some(Export { ratio }))
}

fn config(message: String) -> Error {
    Error::new(ErrorKind::Config, message)
}

/// Whether spans are exported now: on once the layer is made. The bench
/// turns it off and on to measure both in one process
/// (`__private::set_span_export`).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The sampling ratio the layer was made with.
static RATIO: OnceLock<f64> = OnceLock::new();

/// Whether wharf's call spans are recorded for export now.
pub(crate) fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Turns export off (no span recorded, no trace started) or back on.
pub fn set_exporting(on: bool) {
    match (on, RATIO.get()) {
        (true, Some(ratio)) => {
            crate::trace::start_roots(*ratio);
            EXPORTING.store(true, Ordering::Relaxed);
        }
        _ => {
            EXPORTING.store(false, Ordering::Relaxed);
            crate::trace::stop_roots();
        }
    }
}

/// The processor that batches and sends spans, once made.
static PROCESSOR: OnceLock<Arc<BatchSpanProcessor>> = OnceLock::new();

/// The runtime the OTLP client lives on: its own, so that export goes on
/// whatever runtime the program has (or has shut down) until it exits.
static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// Makes the exporter and the layer that feeds it, and starts new traces
/// by themselves from now on. Once per process; a second call gets the
/// same processor.
pub(crate) fn layer(export: Export) -> Result<SpanLayer, Error> {
    let processor = match PROCESSOR.get() {
        Some(processor) => processor.clone(),
        None => {
            let runtime = RUNTIME.get_or_init(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("wharf-otlp")
                    .enable_all()
                    .build()
                    .expect("a one-thread tokio runtime for the OTLP client")
            });
            // The gRPC channel is made on that runtime and served by it; the
            // batch processor's thread only waits for its answers. (Entered,
            // not blocked on: this may run inside the program's runtime.)
            let entered = runtime.enter();
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build();
            drop(entered);
            let exporter = exporter.map_err(|e| {
                config(format!(
                    "cannot make the OTLP span exporter from OTEL_EXPORTER_OTLP_ENDPOINT: {e}"
                ))
            })?;
            let mut processor = BatchSpanProcessor::builder(exporter).build();
            // `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` name the
            // process (the builder reads them); without them, the program does.
            let mut resource = Resource::builder().build();
            let named = resource
                .get(&opentelemetry::Key::from_static_str("service.name"))
                .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
            if !named {
                let program = std::env::current_exe()
                    .ok()
                    .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| "wharf".to_owned());
                resource = Resource::builder().with_service_name(program).build();
            }
            processor.set_resource(&resource);
            PROCESSOR.get_or_init(|| Arc::new(processor)).clone()
        }
    };
    let _ = RATIO.set(export.ratio);
    set_exporting(true);
    Ok(SpanLayer {
        processor,
        scope: InstrumentationScope::builder("wharf")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    })
}

/// Sends the spans still buffered, waiting for the exporter (bounded by
/// `OTEL_BSP_EXPORT_TIMEOUT`). wharf calls it before a worker exits.
pub fn flush() {
    if let Some(processor) = PROCESSOR.get() {
        if let Err(error) = processor.force_flush() {
            tracing::warn!("cannot export the last spans: {error}");
        }
    }
}

/// A `tracing` layer that hands wharf's finished, sampled call spans to
/// the OTLP batch processor.
pub(crate) struct SpanLayer {
    processor: Arc<BatchSpanProcessor>,
    scope: InstrumentationScope,
}

/// A call span being recorded: when it started and what it said so far.
struct Open {
    start: SystemTime,
    fields: Fields,
}

/// The fields of a call span that an OpenTelemetry span needs.
#[derive(Default)]
struct Fields {
    name: Option<String>,
    server: bool,
    trace_id: Option<String>,
    span_id: Option<String>,
    parent_span_id: Option<String>,
    sampled: Option<bool>,
    outcome: Option<String>,
    attributes: Vec<KeyValue>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%value` fields arrive here, formatted by their `Display`.
        self.text(field, format!("{value:?}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "trace.sampled" {
            self.sampled = Some(value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.attributes.push(KeyValue::new(
            field.name(),
            value.min(i64::MAX as u64) as i64,
        ));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.attributes.push(KeyValue::new(field.name(), value));
    }
}

impl Fields {
    fn text(&mut self, field: &Field, value: String) {
        match field.name() {
            "otel.name" => self.name = Some(value),
            "otel.kind" => self.server = value == "server",
            "trace_id" => self.trace_id = Some(value),
            "span_id" => self.span_id = Some(value),
            "parent_span_id" => self.parent_span_id = Some(value),
            "rpc.outcome" => {
                self.attributes
                    .push(KeyValue::new("rpc.outcome", value.clone()));
                self.outcome = Some(value);
            }
            // An empty transaction id is a call outside a transaction.
            "wharf.txn" if value.is_empty() => {}
            name => self.attributes.push(KeyValue::new(name, value)),
        }
    }

    /// The OpenTelemetry span, if this one is sampled and has its ids.
    fn into_span(self, start: SystemTime, scope: &InstrumentationScope) -> Option<SpanData> {
        if self.sampled != Some(true) {
            return None;
        }
        let trace_id = TraceId::from_hex(self.trace_id.as_deref()?).ok()?;
        let span_id = SpanId::from_hex(self.span_id.as_deref()?).ok()?;
        let parent_span_id = self
            .parent_span_id
            .as_deref()
            .and_then(|id| SpanId::from_hex(id).ok())
            .unwrap_or(SpanId::INVALID);
        let status = match self.outcome.as_deref() {
            None | Some("ok") => Status::Unset,
            Some(kind) => Status::error(kind.to_owned()),
        };
        Some(SpanData {
            span_context: SpanContext::new(
                trace_id,
                span_id,
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id,
            // A worker's parent is the caller's span, in another process.
            parent_span_is_remote: self.server && parent_span_id != SpanId::INVALID,
            span_kind: if self.server {
                SpanKind::Server
            } else {
                SpanKind::Client
            },
            name: Cow::Owned(self.name.unwrap_or_else(|| "wharf".to_owned())),
            start_time: start,
            end_time: SystemTime::now(),
            attributes: self.attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: scope.clone(),
        })
    }
}

impl<S> Layer<S> for SpanLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        // Only sampled calls' spans get here (the filter asks
        // `trace::sampled_hint`).
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Open {
                start: SystemTime::now(),
                fields,
            });
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(open) = span.extensions_mut().get_mut::<Open>() {
                values.record(&mut open.fields);
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(open) = span.extensions_mut().remove::<Open>() else {
            return;
        };
        if let Some(data) = open.fields.into_span(open.start, &self.scope) {
            self.processor.on_end(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(vars: &[(&str, &str)]) -> Result<Option<Export>, Error> {
        from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn export_follows_the_standard_variables() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4317");
        assert_eq!(read(&[]).unwrap(), None);
        assert_eq!(read(&[endpoint]).unwrap(), Some(Export { ratio: 1.0 }));
        assert_eq!(
            read(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://x:4317")]).unwrap(),
            Some(Export { ratio: 1.0 })
        );
        assert_eq!(
            read(&[endpoint, ("OTEL_SDK_DISABLED", "true")]).unwrap(),
            None
        );
        assert_eq!(
            read(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]).unwrap(),
            None
        );
        let sampled = read(&[
            endpoint,
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
        ]);
        assert_eq!(sampled.unwrap(), Some(Export { ratio: 0.01 }));
        assert_eq!(
            read(&[endpoint, ("OTEL_TRACES_SAMPLER", "always_off")]).unwrap(),
            Some(Export { ratio: 0.0 })
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4317");
        for (vars, named) in [
            (
                vec![
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "2"),
                ],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (
                vec![
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "most"),
                ],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (
                vec![("OTEL_TRACES_SAMPLER", "jaeger_remote")],
                "OTEL_TRACES_SAMPLER",
            ),
            (
                vec![("OTEL_TRACES_EXPORTER", "zipkin")],
                "OTEL_TRACES_EXPORTER",
            ),
        ] {
            let mut vars = vars;
            vars.push(endpoint);
            let error = read(&vars).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Config);
            assert!(error.message().contains(named), "{error}");
        }
    }
}
