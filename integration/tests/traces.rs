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
