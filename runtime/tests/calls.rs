//! Calls through a real nats-server and an in-process worker: the call
//! path, the wire contract and every bad input the core must survive.

use bytes::Bytes;
use futures_util::StreamExt;
mod common;
use common::{add, divide, MathError};
use std::time::Duration;
use wharf::testing::{eventually, NatsServer};
use wharf::{CallError, Client, Codec, ErrorKind, RetryPolicy, Worker};

/// Greets.
#[wharf::microservice(service = "calls")]
pub async fn greet(name: String) -> String {
    format!("Hello, {name}!")
}

/// Panics.
#[wharf::microservice(service = "calls")]
pub async fn explode(reason: String) -> u8 {
    panic!("exploded: {reason}")
}

/// Panics on the blocking pool.
#[wharf::microservice(service = "calls")]
pub fn explode_sync(reason: String) -> u8 {
    panic!("sync exploded: {reason}")
}

/// Succeeds only off the async worker threads: `block_on` panics on them.
#[wharf::microservice(service = "calls")]
pub fn on_blocking_pool() -> bool {
    tokio::runtime::Handle::current().block_on(async { true })
}

/// Served under another name.
#[wharf::microservice(service = "calls", name = "renamed_on_wire")]
pub async fn local_name(x: u32) -> u32 {
    x * 2
}

/// Takes and returns nothing.
#[wharf::microservice(service = "calls")]
pub async fn nothing() {}

/// Sleeps `ms`; its calls time out after 200 ms.
#[wharf::microservice(service = "calls", timeout = "200ms")]
pub async fn slow(ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

/// A server, a client and a worker serving every function above.
async fn setup() -> (NatsServer, Client, wharf::RunningWorker) {
    let server = NatsServer::start().expect("nats-server starts");
    let client = Client::connect(&server.url()).await.expect("connects");
    let worker = Worker::new(&client).start().await.expect("worker starts");
    (server, client, worker)
}

async fn raw_request(
    client: &Client,
    subject: &str,
    headers: &[(&str, &str)],
    payload: impl Into<Bytes>,
) -> async_nats::Message {
    let mut map = async_nats::HeaderMap::new();
    for (name, value) in headers {
        map.insert(*name, *value);
    }
    client
        .nats()
        .request_with_headers(subject.to_owned(), map, payload.into())
        .await
        .expect("a reply")
}

/// A postcard request as a foreign client writes it: envelope, then args.
fn postcard_request(sig: u64, deadline_ms: u64, args: &[u8]) -> Vec<u8> {
    let envelope = wharf::wire::envelope::Envelope {
        version: wharf::wire::envelope::ENVELOPE_VERSION,
        sig,
        deadline_ms,
        call_id: b"test-call",
        attempt: 1,
        flags: 0,
    };
    let mut bytes = postcard::to_allocvec(&envelope).unwrap();
    bytes.extend_from_slice(args);
    bytes
}

fn header<'a>(message: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    message.headers.as_ref()?.get(name).map(|v| v.as_str())
}

#[tokio::test]
async fn calls_return_values_and_application_errors() {
    let (_server, client, _worker) = setup().await;
    assert_eq!(add::call(&client, 2, 3).await.unwrap(), 5);
    assert_eq!(
        greet::call(&client, "Ada".into()).await.unwrap(),
        "Hello, Ada!"
    );
    assert_eq!(divide::call(&client, 1.0, 4.0).await.unwrap(), 0.25);
    let error = divide::call(&client, 1.0, 0.0).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Application);
    assert_eq!(error, CallError::Application(MathError::DivisionByZero));
    nothing::call(&client).await.unwrap();
    assert_eq!(local_name::call(&client, 21).await.unwrap(), 42);
    assert_eq!(add::local(2, 3).await, 5);
    assert_eq!(divide::local(1.0, 0.0), Err(MathError::DivisionByZero));
}

#[tokio::test]
async fn request_builder_options_and_instance_report() {
    let (_server, client, worker) = setup().await;
    let reply = add::request(40, 2)
        .client(&client)
        .timeout(Duration::from_secs(2))
        .send_detailed()
        .await
        .unwrap();
    assert_eq!(reply.value, 42);
    assert_eq!(reply.pid(), Some(std::process::id()));
    assert!(reply.instance.unwrap().starts_with(worker.instance()));
    // JSON end to end through the typed API.
    let sum = add::request(1, 1)
        .client(&client)
        .codec(Codec::Json)
        .await
        .unwrap();
    assert_eq!(sum, 2);
    let error = divide::request(1.0, 0.0)
        .client(&client)
        .codec(Codec::Json)
        .await
        .unwrap_err();
    assert_eq!(error, CallError::Application(MathError::DivisionByZero));
}

#[tokio::test]
async fn sync_functions_run_off_the_async_threads() {
    let (_server, client, _worker) = setup().await;
    assert!(on_blocking_pool::call(&client).await.unwrap());
}

#[tokio::test]
async fn json_by_name_by_position_and_json_errors() {
    let (_server, client, _worker) = setup().await;
    let json = [("Content-Type", "application/json")];
    let reply = raw_request(&client, "wharf.calls.add", &json, r#"{"a": 2, "b": 40}"#).await;
    assert_eq!(header(&reply, "Nats-Service-Error-Code"), None);
    assert_eq!(&reply.payload[..], b"42");
    assert_eq!(header(&reply, "Content-Type"), Some("application/json"));
    let reply = raw_request(&client, "wharf.calls.greet", &json, r#"["Bob"]"#).await;
    assert_eq!(&reply.payload[..], br#""Hello, Bob!""#);
    let reply = raw_request(&client, "wharf.calls.nothing", &json, "").await;
    assert_eq!(&reply.payload[..], b"null");

    let reply = raw_request(&client, "wharf.calls.divide", &json, r#"{"a":1,"b":0}"#).await;
    assert_eq!(header(&reply, "Nats-Service-Error-Code"), Some("422"));
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(body["kind"], "application");
    assert_eq!(body["message"], "division by zero");
    assert_eq!(body["error"], "DivisionByZero");

    let reply = raw_request(&client, "wharf.calls.add", &json, r#"{"a":1,"c":2}"#).await;
    assert_eq!(header(&reply, "Nats-Service-Error-Code"), Some("400"));
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(body["kind"], "bad_request");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("calls.add") && message.contains("unknown field `c`"),
        "{message}"
    );
}

#[tokio::test]
async fn undecodable_arguments_get_400_and_the_worker_keeps_serving() {
    let (_server, client, _worker) = setup().await;
    let garbage = postcard_request(add::SPEC.sig, 0, &[0xff; 3]);
    let reply = raw_request(&client, "wharf.calls.add", &[], garbage).await;
    assert_eq!(header(&reply, "Nats-Service-Error-Code"), Some("400"));
    let text = header(&reply, "Nats-Service-Error").unwrap();
    assert!(text.contains("calls.add"), "{text}");
    assert!(text.contains("add(a:i64,b:i64)->i64"), "{text}");
    let body: wharf::wire::reply::ErrorBody = postcard::from_bytes(&reply.payload).unwrap();
    assert_eq!(body.kind, "bad_request");

    // Arguments without the envelope.
    let bare = Codec::Postcard.encode(&(1i64, 2i64)).unwrap();
    let reply = raw_request(&client, "wharf.calls.add", &[], bare).await;
    assert_eq!(header(&reply, "Nats-Service-Error-Code"), Some("400"));
    assert!(header(&reply, "Nats-Service-Error")
        .unwrap()
        .contains("envelope"));

    let reply = raw_request(
        &client,
        "wharf.calls.add",
        &[("Content-Type", "text/csv")],
        "1,2",
    )
    .await;
    assert_eq!(header(&reply, "Nats-Service-Error-Code"), Some("400"));
    assert!(header(&reply, "Nats-Service-Error")
        .unwrap()
        .contains("text/csv"));

    let json = [("Content-Type", "application/json"), ("Wharf-Sig", "zz")];
    let reply = raw_request(&client, "wharf.calls.add", &json, "[1,2]").await;
    assert_eq!(header(&reply, "Nats-Service-Error-Code"), Some("400"));
    assert!(header(&reply, "Nats-Service-Error")
        .unwrap()
        .contains("Wharf-Sig"));

    assert_eq!(add::call(&client, 1, 1).await.unwrap(), 2);
}

#[tokio::test]
async fn panics_get_500_and_the_worker_keeps_serving() {
    let (_server, client, _worker) = setup().await;
    for _ in 0..3 {
        let error = explode::call(&client, "on purpose".into())
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Panicked);
        assert!(error.message().contains("exploded: on purpose"), "{error}");
        let error = explode_sync::call(&client, "too".into()).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Panicked);
        assert!(error.message().contains("sync exploded: too"), "{error}");
    }
    assert_eq!(add::call(&client, 2, 2).await.unwrap(), 4);
}

#[tokio::test]
async fn no_worker_is_no_responders_naming_the_subject() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let error = add::request(1, 2)
        .client(&client)
        .retry(RetryPolicy::NONE)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NoResponders);
    assert!(error.message().contains("wharf.calls.add"), "{error}");
    assert!(error.message().contains("no worker serves"), "{error}");
}

#[tokio::test]
async fn a_function_its_service_does_not_serve_is_an_unknown_function() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _worker = Worker::new(&client).start().await.unwrap();
    let nope = wharf::FnSpec::untyped("calls", "nope", false);
    let error = wharf::Request::<_, wharf::Plain<i64>>::new(nope, serde_json::json!([]))
        .client(&client)
        .codec(Codec::Json)
        .retry(RetryPolicy::NONE)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::UnknownFunction, "{error}");
    assert!(
        error
            .message()
            .contains("no worker serves `wharf.calls.nope`"),
        "{error}"
    );
    assert!(
        error.message().contains("add"),
        "names what is served: {error}"
    );
    // A service that runs nowhere stays `no_responders`.
    let elsewhere = wharf::FnSpec::untyped("elsewhere", "add", false);
    let error = wharf::Request::<_, wharf::Plain<i64>>::new(elsewhere, serde_json::json!([]))
        .client(&client)
        .codec(Codec::Json)
        .retry(RetryPolicy::NONE)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NoResponders, "{error}");
}

#[tokio::test]
async fn an_unreachable_server_is_an_error_naming_the_url() {
    let error = Client::connect("nats://127.0.0.1:1").await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection);
    assert!(error.message().contains("nats://127.0.0.1:1"), "{error}");
}

#[tokio::test]
async fn oversized_payloads_spill_or_are_refused_before_sending() {
    // With JetStream, an argument and a result above max_payload travel
    // through the object store.
    let server = NatsServer::start_with_config("max_payload: 4096").unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _worker = Worker::new(&client).start().await.unwrap();
    let long = "x".repeat(8192);
    let greeting = greet::call(&client, long.clone()).await.unwrap();
    assert_eq!(greeting, format!("Hello, {long}!"));
    assert_eq!(greet::call(&client, "y".into()).await.unwrap(), "Hello, y!");

    // Without it, nothing can hold the arguments: refused, and said why.
    let plain = NatsServer::start_without_jetstream("max_payload: 4096").unwrap();
    let plain_client = Client::connect(&plain.url()).await.unwrap();
    let error = greet::call(&plain_client, long).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PayloadTooLarge, "{error}");
    assert!(error.message().contains("wharf.calls.greet"), "{error}");
    assert!(error.message().contains("4096"), "{error}");
}

/// A caller built against another signature of `calls.add`.
static OLD_ADD: wharf::FnSpec = wharf::FnSpec {
    service: "calls",
    name: "add",
    sig: 0x0123_4567_89ab_cdef,
    signature: "add(a:i32,b:i32)->i32",
    args: &[],
    returns: "i32",
    error: None,
    timeout_ms: 5_000,
    idempotent: false,
    durable: false,
    stateful: false,
    retry: wharf::RetryPolicy::NONE,
    blocking: false,
    version: "0.0.1",
    path: "old::add",
    subject: wharf::__private::SubjectCache::new(),
};

#[tokio::test]
async fn another_signature_gets_409_naming_both_hashes() {
    let (_server, client, _worker) = setup().await;
    let error = wharf::Request::<(i32, i32), wharf::Plain<i32>>::new(&OLD_ADD, (1, 2))
        .client(&client)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::SignatureMismatch);
    assert!(error.message().contains("0123456789abcdef"), "{error}");
    assert!(error.message().contains(&add::SPEC.sig_hex()), "{error}");
}

#[tokio::test]
async fn a_passed_deadline_gets_504_and_slow_calls_time_out() {
    let (_server, client, _worker) = setup().await;
    let args = Codec::Postcard.encode(&(1i64, 2i64)).unwrap();
    let reply = raw_request(
        &client,
        "wharf.calls.add",
        &[],
        postcard_request(0, 1000, &args),
    )
    .await;
    assert_eq!(header(&reply, "Nats-Service-Error-Code"), Some("504"));
    let json = [
        ("Content-Type", "application/json"),
        ("Wharf-Deadline", "1000"),
    ];
    let reply = raw_request(&client, "wharf.calls.add", &json, "[1,2]").await;
    assert_eq!(header(&reply, "Nats-Service-Error-Code"), Some("504"));
    // A foreign client may skip signature and deadline (zeros).
    let reply = raw_request(
        &client,
        "wharf.calls.add",
        &[],
        postcard_request(0, 0, &args),
    )
    .await;
    assert_eq!(postcard::from_bytes::<i64>(&reply.payload).unwrap(), 3);
    let error = slow::call(&client, 2_000).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert!(error.message().contains("wharf.calls.slow"), "{error}");
    assert_eq!(slow::call(&client, 1).await.unwrap(), 1);
}

/// Asks a `$SRV` subject and parses the JSON answer.
async fn discover(client: &Client, subject: &str) -> serde_json::Value {
    let reply = client
        .nats()
        .request(subject.to_owned(), Bytes::new())
        .await
        .expect("a discovery answer");
    serde_json::from_slice(&reply.payload).expect("JSON")
}

/// The entry of endpoint `name` in an INFO or STATS document.
fn endpoint<'a>(document: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    document["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("endpoint {name} is listed"))
}

#[tokio::test]
async fn discovery_through_the_micro_protocol() {
    let (_server, client, worker) = setup().await;
    let info = discover(&client, "$SRV.INFO.calls").await;
    assert_eq!(info["name"], "calls");
    assert_eq!(info["metadata"]["wharf.instance"], worker.instance());
    let add_info = endpoint(&info, "add");
    assert_eq!(add_info["subject"], "wharf.calls.add");
    assert_eq!(add_info["metadata"]["wharf.sig"], add::SPEC.sig_hex());
    assert_eq!(add_info["metadata"]["wharf.args"], "a: i64, b: i64");
    assert_eq!(add_info["metadata"]["wharf.returns"], "i64");
    let divide_info = endpoint(&info, "divide");
    assert_eq!(divide_info["metadata"]["wharf.kind"], "sync");
    assert_eq!(divide_info["metadata"]["wharf.error"], "MathError");

    add::call(&client, 1, 1).await.unwrap();
    let stats = discover(&client, "$SRV.STATS.calls").await;
    let add_stats = endpoint(&stats, "add");
    assert_eq!(add_stats["num_requests"], 1);
    assert_eq!(add_stats["num_errors"], 0);
    assert_eq!(add_stats["data"]["in_flight"], 0);
    assert!(add_stats["data"]["concurrency"].as_u64().unwrap() > 0);

    // Error replies count as errors, with the last one kept.
    divide::call(&client, 1.0, 0.0).await.unwrap_err();
    let stats = discover(&client, "$SRV.STATS.calls").await;
    let divide_stats = endpoint(&stats, "divide");
    assert_eq!(divide_stats["num_errors"], 1);
    assert!(divide_stats["last_error"]
        .as_str()
        .unwrap()
        .starts_with("422:"));

    let ping = discover(&client, "$SRV.PING.calls").await;
    assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");
    assert_eq!(ping["id"], info["id"]);
}

#[tokio::test]
async fn calls_before_init_say_how_to_fix_it() {
    let error = add(1, 2).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config);
    assert!(error.message().contains("wharf::init()"), "{error}");
}

#[tokio::test]
async fn drain_finishes_calls_in_flight() {
    let (_server, client, worker) = setup().await;
    let long = tokio::spawn({
        let client = client.clone();
        async move {
            slow::request(1_000)
                .client(&client)
                .timeout(Duration::from_secs(10))
                .await
        }
    });
    eventually(
        "the slow call to be in flight",
        Duration::from_secs(30),
        || async {
            match worker.in_flight() {
                1 => Ok(()),
                n => Err(format!("{n} in flight")),
            }
        },
    )
    .await;
    worker.drain(Duration::from_secs(10)).await;
    assert_eq!(long.await.unwrap().unwrap(), 1_000);
    let error = add::request(1, 1)
        .client(&client)
        .retry(RetryPolicy::NONE)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NoResponders);
}

#[tokio::test]
async fn a_call_waits_for_a_worker_to_appear() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let call = tokio::spawn({
        let client = client.clone();
        async move { add::request(20, 22).client(&client).send_detailed().await }
    });
    // The worker starts only once the first try reached the server (and,
    // with no one subscribed, got no responders).
    eventually(
        "the first try to reach the server",
        Duration::from_secs(30),
        || async {
            match server.messages_in() {
                Ok(n) if n >= 1 => Ok(()),
                other => Err(format!("{other:?} messages in")),
            }
        },
    )
    .await;
    let _worker = Worker::new(&client).start().await.unwrap();
    let reply = call.await.unwrap().unwrap();
    assert_eq!(reply.value, 42);
    assert!(reply.attempts > 1, "the first try found no worker");
}

#[tokio::test]
async fn an_overloaded_worker_answers_503_and_the_caller_retries() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let worker = Worker::new(&client)
        .concurrency(1)
        .backlog(0)
        .start()
        .await
        .unwrap();
    let busy = tokio::spawn({
        let client = client.clone();
        async move {
            slow::request(1_000)
                .client(&client)
                .timeout(Duration::from_secs(10))
                .await
        }
    });
    eventually(
        "the slow call to take the only slot",
        Duration::from_secs(30),
        || async {
            match worker.in_flight() {
                1 => Ok(()),
                n => Err(format!("{n} in flight")),
            }
        },
    )
    .await;
    let refused = add::request(1, 2)
        .client(&client)
        .retry(RetryPolicy::NONE)
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Unavailable);
    assert!(refused.message().contains("overloaded"), "{refused}");
    // With retries the same call gets through once the slot frees up.
    let retried = add::request(1, 2)
        .client(&client)
        .retry(RetryPolicy::attempts(50).unwrap())
        .send_detailed()
        .await
        .unwrap();
    assert_eq!(retried.value, 3);
    assert!(retried.attempts > 1);
    assert_eq!(busy.await.unwrap().unwrap(), 1_000);
}

static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts how often its body runs; idempotent, so retries are deduplicated.
#[wharf::microservice(service = "calls", idempotent)]
pub async fn count_runs(tag: String) -> (String, u64) {
    (
        tag,
        RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1,
    )
}

#[tokio::test]
async fn a_retried_idempotent_call_that_completed_is_not_run_again() {
    let (_server, client, _worker) = setup().await;
    let headers = |attempt: &'static str| {
        [
            ("Content-Type", "application/json"),
            ("Wharf-Call-Id", "dedupe-1"),
            ("Wharf-Attempt", attempt),
        ]
    };
    let first = raw_request(&client, "wharf.calls.count_runs", &headers("2"), r#"["x"]"#).await;
    let first: (String, u64) = serde_json::from_slice(&first.payload).unwrap();
    // The record is written without waiting for it to land: wait for it.
    let results = async_nats::jetstream::new(client.nats().clone())
        .get_key_value("wharf_results_calls")
        .await
        .unwrap();
    eventually(
        "the kept result of dedupe-1",
        Duration::from_secs(30),
        || async {
            match results.get("dedupe-1").await {
                Ok(Some(_)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let again = raw_request(&client, "wharf.calls.count_runs", &headers("3"), r#"["x"]"#).await;
    let again: (String, u64) = serde_json::from_slice(&again.payload).unwrap();
    assert_eq!(again, first, "the stored result, not a second run");
    let runs_before = RUNS.load(std::sync::atomic::Ordering::SeqCst);
    let fresh = count_runs::call(&client, "y".into()).await.unwrap();
    assert_eq!(fresh.1, runs_before + 1, "another call id runs");
}

#[tokio::test]
async fn durable_calls_run_and_can_be_collected_elsewhere() {
    let (server, client, _worker) = setup().await;
    let sum = add::request(40, 2)
        .client(&client)
        .durable(true)
        .await
        .unwrap();
    assert_eq!(sum, 42);
    let error = divide::request(1.0, 0.0)
        .client(&client)
        .durable(true)
        .await
        .unwrap_err();
    assert_eq!(error, CallError::Application(MathError::DivisionByZero));

    let pending = greet::request("later".into())
        .client(&client)
        .start()
        .await
        .unwrap();
    let id = pending.id().to_owned();
    drop(pending);
    let elsewhere = Client::connect(&server.url()).await.unwrap();
    let greeting = greet::collect(id)
        .client(&elsewhere)
        .timeout(Duration::from_secs(10))
        .wait()
        .await
        .unwrap();
    assert_eq!(greeting, "Hello, later!");
}

#[tokio::test]
async fn an_undecodable_durable_call_is_dead_lettered_at_once() {
    let (_server, client, _worker) = setup().await;
    let js = async_nats::jetstream::new(client.nats().clone());
    let inbox = client.nats().new_inbox();
    let mut replies = client.nats().subscribe(inbox.clone()).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    headers.insert("Wharf-Call-Id", "bad-args-1");
    headers.insert("Wharf-Reply", inbox.as_str());
    js.publish_with_headers("wharf.durable.calls.add", headers, r#"{"a": "two"}"#.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("a reply")
        .unwrap();
    assert_eq!(header(&reply, "Nats-Service-Error-Code"), Some("500"));
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(body["kind"], "dead_letter");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("wharf_dead_letters"), "{message}");
    assert!(message.contains("cannot decode the arguments"), "{message}");
    let mut dead = js.get_stream("wharf_dead_letters").await.unwrap();
    assert_eq!(dead.info().await.unwrap().state.messages, 1);
    // The work queue holds nothing more: it is not redelivered.
    let mut queue = js.get_stream("wharf_calls_calls").await.unwrap();
    assert_eq!(queue.info().await.unwrap().state.messages, 0);
    // And collecting it says so.
    let error = add::collect("bad-args-1")
        .client(&client)
        .wait()
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::DeadLetter);
}

#[tokio::test]
async fn a_durable_call_cannot_make_a_worker_publish_outside_an_inbox() {
    let (_server, client, _worker) = setup().await;
    let js = async_nats::jetstream::new(client.nats().clone());
    let mut victim = client.nats().subscribe("victim.subject").await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    headers.insert("Wharf-Call-Id", "not-an-inbox-1");
    headers.insert("Wharf-Reply", "victim.subject");
    js.publish_with_headers("wharf.durable.calls.add", headers, r#"[2, 3]"#.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let error = add::collect("not-an-inbox-1")
        .client(&client)
        .timeout(Duration::from_secs(20))
        .wait()
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::DeadLetter, "{error}");
    assert!(error.message().contains("not an inbox subject"), "{error}");
    client.nats().flush().await.unwrap();
    let published = tokio::time::timeout(Duration::from_millis(200), victim.next()).await;
    assert!(
        published.is_err(),
        "the worker published to the named subject"
    );
}
