//! W3C trace context across calls, against a real nats-server and worker
//! processes: a foreign client's `traceparent` reaches the function, a
//! call made inside a microservice carries it on to another process, a
//! Rust caller's trace travels in the postcard envelope (plain, sync and
//! durable calls), and a malformed header is ignored, never a failed call.

use std::time::Duration;
use wharf::testing::NatsServer;
use wharf::trace::{in_trace, TraceContext};
use wharf::Client;
use wharf_integration::{spawn_worker, traced, traced_blocking, wait_for_workers};

const SENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn parse(traceparent: &str) -> TraceContext {
    TraceContext::parse(traceparent, None)
        .unwrap_or_else(|| panic!("not a traceparent: {traceparent:?}"))
}

/// A JSON request with `headers`, as a client in any language sends it.
async fn foreign(client: &Client, function: &str, headers: &[(&str, &str)]) -> serde_json::Value {
    let mut map = async_nats::HeaderMap::new();
    map.insert("Content-Type", "application/json");
    for (name, value) in headers {
        map.insert(*name, *value);
    }
    let reply = client
        .nats()
        .request_with_headers(format!("wharf.itest.{function}"), map, "[]".into())
        .await
        .expect("a reply");
    assert!(
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .is_none(),
        "`{function}` failed: {}",
        String::from_utf8_lossy(&reply.payload)
    );
    serde_json::from_slice(&reply.payload).expect("a JSON reply")
}

#[tokio::test]
async fn a_trace_travels_with_calls_across_processes() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _workers = [spawn_worker(&server.url()), spawn_worker(&server.url())];
    wait_for_workers(&client, 2).await;
    let sent = parse(SENT);

    // A foreign client's trace, and a nested call that lands on the other
    // worker (the queue group picks one at random: asked until it does).
    let (outer, inner) = wharf::testing::eventually(
        "a nested call served by the other worker",
        Duration::from_secs(60),
        || async {
            let reply = foreign(
                &client,
                "traced_nested",
                &[("traceparent", SENT), ("tracestate", "congo=t61rcWkgMzE")],
            )
            .await;
            let outer: (u32, String) = serde_json::from_value(reply[0].clone()).unwrap();
            let inner: (u32, String) = serde_json::from_value(reply[1].clone()).unwrap();
            if outer.0 != inner.0 {
                Ok((outer, inner))
            } else {
                Err(format!("both served by {}", outer.0))
            }
        },
    )
    .await;
    let (outer, inner) = (parse(&outer.1), parse(&inner.1));
    assert_eq!(
        outer.trace_id(),
        sent.trace_id(),
        "the worker runs in the sent trace"
    );
    assert_eq!(
        inner.trace_id(),
        sent.trace_id(),
        "the nested call too, in another process"
    );
    let spans = [sent.span_id(), outer.span_id(), inner.span_id()];
    assert!(
        spans[0] != spans[1] && spans[1] != spans[2] && spans[0] != spans[2],
        "each hop is a span of its own: {spans:?}"
    );
    assert!(
        outer.sampled() && inner.sampled(),
        "the sampled flag is kept"
    );

    // A Rust caller's trace, in the postcard envelope: plain, sync, durable.
    let root = TraceContext::new_root(true);
    let plain = in_trace(root.clone(), traced::call(&client)).await.unwrap();
    assert_eq!(parse(&plain.1).trace_id(), root.trace_id());
    let sync = in_trace(root.clone(), traced_blocking::call(&client))
        .await
        .unwrap();
    assert_eq!(
        parse(&sync).trace_id(),
        root.trace_id(),
        "a sync function sees it too"
    );
    let durable = in_trace(
        root.clone(),
        traced::request().client(&client).durable(true).send(),
    )
    .await
    .unwrap();
    assert_eq!(
        parse(&durable.1).trace_id(),
        root.trace_id(),
        "kept through JetStream"
    );

    // No trace: none is made up; a malformed one is ignored.
    assert_eq!(traced::call(&client).await.unwrap().1, "");
    for bad in [
        "garbage",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    ] {
        let reply = foreign(&client, "traced", &[("traceparent", bad)]).await;
        assert_eq!(reply[1], "", "a malformed traceparent ({bad}) is no trace");
    }
}

/// The OTLP receiver (`integration/python/otlp_receiver.py`): the spans it
/// was sent, one JSON object each. Killed when dropped.
struct Receiver {
    child: std::process::Child,
    port: u16,
    spans: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Receiver {
    fn start() -> Receiver {
        use std::io::BufRead;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/otlp_receiver.py");
        let mut child = std::process::Command::new("python3")
            .arg(script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs the OTLP receiver");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let Some(port) = first.strip_prefix("port ").and_then(|p| p.parse().ok()) else {
            let _ = child.kill();
            panic!("the OTLP receiver did not start (needs `pip install grpcio opentelemetry-proto`): {first:?}");
        };
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let heard = spans.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                heard
                    .lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).expect("a JSON span"));
            }
        });
        Receiver { child, port, spans }
    }

    /// The spans of `trace_id` received so far.
    fn trace(&self, trace_id: &str) -> Vec<serde_json::Value> {
        let spans = self.spans.lock().unwrap();
        spans
            .iter()
            .filter(|s| s["trace_id"] == trace_id)
            .cloned()
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// OTLP span kinds.
const SERVER: u64 = 2;
const CLIENT: u64 = 3;

#[tokio::test]
async fn spans_are_exported_over_otlp_as_one_trace_across_processes() {
    let receiver = Receiver::start();
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let client = Client::connect(&url).await.unwrap();
    let otel = |name: &'static str| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
            ("OTEL_SERVICE_NAME", name.to_owned()),
            // Batches go out within 100 ms, so the test waits little.
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ]
    };
    let as_env = |vars: &[(&'static str, String)]| -> Vec<(&'static str, String)> { vars.to_vec() };
    let worker = |name: &'static str| {
        let vars = as_env(&otel(name));
        let env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        wharf_integration::spawn_worker_with(&url, &env)
    };
    let workers = [worker("itest-worker-a"), worker("itest-worker-b")];
    wait_for_workers(&client, 2).await;
    let service_of = |pid: u64| {
        let index = workers.iter().position(|w| u64::from(w.pid()) == pid);
        ["itest-worker-a", "itest-worker-b"][index.expect("a pid of one of the workers")]
    };

    // A caller that samples no trace: its calls tell the workers so with a
    // flag bit and no ids. The workers sample every trace they start
    // (the default sampler), so a worker that started one for these calls,
    // or for the nested calls they make, would export it.
    let unsampled = std::process::Command::new(wharf_integration::svc_binary())
        .args(["traced", "4"])
        .env("NATS_URL", &url)
        .envs(
            otel("itest-unsampled")
                .iter()
                .map(|(k, v)| (*k, v.as_str())),
        )
        .env("OTEL_TRACES_SAMPLER", "always_off")
        .output()
        .expect("svc traced runs");
    assert!(unsampled.status.success(), "{unsampled:?}");
    let answers: Vec<((u64, String), (u64, String))> = String::from_utf8_lossy(&unsampled.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(answers.len(), 4);
    assert!(
        answers
            .iter()
            .all(|(outer, inner)| outer.1.is_empty() && inner.1.is_empty()),
        "an unsampled trace has no ids for the function to see: {answers:?}"
    );

    // The caller is a process of its own that exports too. Each of its
    // calls starts a trace; one whose nested call reached the other worker
    // is looked at (the queue group picks at random).
    let caller_env = otel("itest-caller");
    let (outer, inner) = wharf::testing::eventually(
        "a call whose nested call the other worker served",
        Duration::from_secs(60),
        || async {
            let output = std::process::Command::new(wharf_integration::svc_binary())
                .args(["traced", "8"])
                .env("NATS_URL", &url)
                .envs(caller_env.iter().map(|(k, v)| (*k, v.as_str())))
                .output()
                .map_err(|e| e.to_string())?;
            if !output.status.success() {
                return Err(format!(
                    "svc traced failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .map(|line| serde_json::from_str::<((u64, String), (u64, String))>(line).unwrap())
                .find(|(outer, inner)| outer.0 != inner.0)
                .ok_or_else(|| "every nested call landed on the same worker".to_owned())
        },
    )
    .await;
    let (outer_trace, inner_trace) = (parse(&outer.1), parse(&inner.1));
    assert_eq!(outer_trace.trace_id(), inner_trace.trace_id());
    let trace_id = outer_trace.trace_id();

    let spans = wharf::testing::eventually(
        "the four spans of the trace at the receiver",
        Duration::from_secs(60),
        || async {
            let spans = receiver.trace(&trace_id);
            if spans.len() >= 4 {
                Ok(spans)
            } else {
                Err(format!("{} so far: {spans:?}", spans.len()))
            }
        },
    )
    .await;
    assert_eq!(spans.len(), 4, "one span per hop: {spans:#?}");
    // The unsampled calls came before, through the same workers (whose
    // batches go out in order): every span of these functions exported is
    // of a trace that the exporting caller started, none of a trace a
    // worker started for them (as it does for the test's own calls, which
    // come without a trace: `whoami`, asked while waiting for workers).
    let exported = receiver.spans.lock().unwrap().clone();
    let of_traced = |span: &&serde_json::Value| {
        span["name"]
            .as_str()
            .is_some_and(|name| name.starts_with("itest/traced"))
    };
    for span in exported.iter().filter(of_traced) {
        assert!(
            receiver
                .trace(span["trace_id"].as_str().unwrap())
                .iter()
                .any(|root| { root["service"] == "itest-caller" && root["parent_span_id"] == "" }),
            "a span of a trace no sampling caller started: {span}"
        );
    }
    let find = |kind: u64, name: &str| {
        spans
            .iter()
            .find(|s| s["kind"] == kind && s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} span of kind {kind}: {spans:#?}"))
    };
    let call = find(CLIENT, "itest/traced_nested");
    let serve = find(SERVER, "itest/traced_nested");
    let nested_call = find(CLIENT, "itest/traced");
    let nested_serve = find(SERVER, "itest/traced");

    // The caller's span is the root; each hop is the child of the one before.
    assert_eq!(call["parent_span_id"], "", "{call}");
    assert_eq!(serve["parent_span_id"], call["span_id"]);
    assert_eq!(nested_call["parent_span_id"], serve["span_id"]);
    assert_eq!(nested_serve["parent_span_id"], nested_call["span_id"]);
    // The ids are wharf's own: the function saw its server span's id.
    assert_eq!(serve["span_id"], outer_trace.span_id());
    assert_eq!(nested_serve["span_id"], inner_trace.span_id());
    // Each from the process that made it.
    assert_eq!(call["service"], "itest-caller");
    assert_eq!(serve["service"], service_of(outer.0));
    assert_eq!(nested_call["service"], service_of(outer.0));
    assert_eq!(nested_serve["service"], service_of(inner.0));
    assert_ne!(serve["service"], nested_serve["service"]);
    for span in &spans {
        assert_eq!(span["scope"], "wharf", "{span}");
        let attributes = &span["attributes"];
        assert_eq!(attributes["rpc.system"], "nats", "{span}");
        assert_eq!(attributes["rpc.service"], "itest", "{span}");
        assert_eq!(attributes["rpc.outcome"], "ok", "{span}");
        assert!(
            attributes["wharf.call_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty()),
            "{span}"
        );
    }
    assert_eq!(serve["attributes"]["rpc.method"], "traced_nested");
    assert_eq!(nested_serve["attributes"]["wharf.attempt"], 1);

    // A sampler setting wharf cannot use stops a worker at start, named.
    let (refused, log) = wharf_integration::spawn_svc_logged(
        &["worker"],
        &[
            ("NATS_URL", url.as_str()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "most"),
        ],
    );
    assert!(!refused.exit_status().await.success());
    let log = log.lock().unwrap().join("\n");
    assert!(
        log.contains("OTEL_TRACES_SAMPLER_ARG is `most`"),
        "the worker names the variable: {log}"
    );
}
