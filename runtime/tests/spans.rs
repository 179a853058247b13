//! Every call is a span on the caller and on the worker, with the fields an
//! OpenTelemetry exporter needs.
//!
//! A test binary of its own: the spans are caught by a subscriber set for
//! this thread only, and tracing caches per call site whether anyone is
//! listening; another test thread that reaches the same call site while
//! this one sets its subscriber can leave that cache saying nobody is.

mod common;
use common::{add, divide};
use wharf::testing::NatsServer;
use wharf::{CallError, Client, Worker};

async fn setup() -> (NatsServer, Client, wharf::RunningWorker) {
    let server = NatsServer::start().expect("nats-server starts");
    let client = Client::connect(&server.url()).await.expect("connects");
    let worker = Worker::new(&client).start().await.expect("worker starts");
    (server, client, worker)
}

/// A span's fields by name.
type SpanFields = std::collections::BTreeMap<String, String>;

/// The spans of one thread's calls: name and fields, as a subscriber
/// (an OpenTelemetry layer, say) would get them.
#[derive(Clone, Default)]
struct Spans(std::sync::Arc<std::sync::Mutex<Vec<(String, SpanFields)>>>);

struct Fields<'a>(&'a mut std::collections::BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = std::collections::BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        fields.insert("id".to_owned(), id.into_u64().to_string());
        self.0
            .lock()
            .unwrap()
            .push((attrs.metadata().name().to_owned(), fields));
    }
    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let id = id.into_u64().to_string();
        for (_, fields) in self.0.lock().unwrap().iter_mut() {
            if fields["id"] == id {
                values.record(&mut Fields(fields));
            }
        }
    }
}

#[tokio::test]
async fn every_call_is_a_span_on_the_caller_and_the_worker() {
    use tracing_subscriber::layer::SubscriberExt;
    let spans = Spans::default();
    let _default =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    let (_server, client, _worker) = setup().await;
    let root = wharf::trace::TraceContext::new_root(true);
    let sum = wharf::trace::in_trace(root.clone(), add::call(&client, 2, 3))
        .await
        .unwrap();
    assert_eq!(sum, 5);
    let found = |name: &str| {
        let spans = spans.0.lock().unwrap();
        spans
            .iter()
            .rev()
            .find(|(n, f)| n == name && f.get("rpc.method").map(String::as_str) == Some("add"))
            .map(|(_, fields)| fields.clone())
            .unwrap_or_else(|| panic!("no `{name}` span of `add` among {spans:?}"))
    };
    let (client_span, server_span) = (found("wharf.call"), found("wharf.serve"));
    for (span, kind) in [(&client_span, "client"), (&server_span, "server")] {
        assert_eq!(span["rpc.system"], "nats", "{span:?}");
        assert_eq!(span["rpc.service"], "calls", "{span:?}");
        assert_eq!(span["otel.kind"], kind, "{span:?}");
        assert_eq!(span["otel.name"], "calls/add", "{span:?}");
        assert_eq!(span["rpc.outcome"], "ok", "{span:?}");
        assert_eq!(span["trace_id"], root.trace_id(), "{span:?}");
    }
    assert_eq!(
        server_span["parent_span_id"], client_span["span_id"],
        "the worker's span is a child of the caller's"
    );
    assert_eq!(server_span["wharf.call_id"], client_span["wharf.call_id"]);
    assert_eq!(server_span["wharf.attempt"], "1");

    // A failed call says how it failed, on both sides.
    let error = divide::call(&client, 1.0, 0.0).await.unwrap_err();
    assert!(matches!(error, CallError::Application(_)), "{error:?}");
    let spans = spans.0.lock().unwrap();
    let outcomes: Vec<_> = spans
        .iter()
        .filter(|(_, f)| f.get("rpc.method").map(String::as_str) == Some("divide"))
        .map(|(name, f)| (name.clone(), f.get("rpc.outcome").cloned()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("wharf.call".to_owned(), Some("application".to_owned())),
            ("wharf.serve".to_owned(), Some("application".to_owned()))
        ],
        "{spans:?}"
    );
}
