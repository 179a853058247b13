//! Streamed results and stream arguments against a real nats-server and
//! worker process: items arrive in order, a slow reader pauses the
//! producer (credit) in either direction, an error mid-stream ends the
//! stream with it, dropping the stream cancels the producer, and bad input
//! (an item that does not decode, a stream call without its header) gets a
//! clear error.

use futures_util::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wharf::testing::{eventually, NatsServer};
use wharf::{CallError, Client, ErrorKind};
use wharf_integration::{
    add, chunks, countdown, first_above, go_subject, produced_subject, read_bytes, read_in_steps,
    spawn_worker, sum_all, tree_subject, wait_for_workers,
};

/// The indices `produced` tells until it has been quiet for `quiet`: what
/// the producer made so far.
async fn produced_until_quiet(produced: &mut async_nats::Subscriber, quiet: Duration) -> Vec<u64> {
    let mut seen = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(quiet, produced.next()).await {
        seen.push(String::from_utf8_lossy(&message.payload).parse().unwrap());
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_arrive_in_order_and_a_slow_reader_pauses_the_producer() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;
    let run = "credit";
    let mut produced = client
        .nats()
        .subscribe(produced_subject(run))
        .await
        .unwrap();
    client.nats().flush().await.unwrap();

    const CREDIT: u64 = 8;
    const COUNT: u64 = 200;
    let mut items = chunks::request(run.to_owned(), COUNT, 1024)
        .client(&client)
        .credit(CREDIT as u32)
        .await
        .unwrap();
    let mut read = 0u64;
    while read < 20 {
        let item = items.next().await.unwrap().unwrap();
        assert_eq!(item.len(), 1024);
        assert!(
            item.iter().all(|b| *b == read as u8),
            "item {read} holds its index"
        );
        read += 1;
    }
    // The reader pauses: the producer makes only what the credit covers,
    // then waits (what it made is told as it makes it).
    let made = produced_until_quiet(&mut produced, Duration::from_millis(500)).await;
    let furthest = *made.iter().max().unwrap();
    assert!(
        furthest < read + CREDIT,
        "with {read} items read and a credit of {CREDIT}, the producer made item {furthest}"
    );
    assert!(furthest >= read - 1, "the producer made the items read");
    while let Some(item) = items.next().await {
        let item = item.unwrap();
        assert!(
            item.iter().all(|b| *b == read as u8),
            "item {read} holds its index"
        );
        read += 1;
    }
    assert_eq!(read, COUNT, "every item arrived, then the stream ended");
    assert!(items.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_mid_stream_ends_it_and_a_dropped_stream_stops_its_producer() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;

    // A sync function feeding a channel: 5, 4, 3, then its error.
    let mut items = countdown::call(&client, 5, Some(2)).await.unwrap();
    let mut got = Vec::new();
    let error = loop {
        match items.next().await.expect("the stream ends with the error") {
            Ok(n) => got.push(n),
            Err(error) => break error,
        }
    };
    assert_eq!(got, [5, 4, 3]);
    assert_eq!(error.kind(), ErrorKind::Application);
    assert_eq!(error.message(), "cannot count 2");
    assert!(items.next().await.is_none(), "nothing follows the error");

    // The whole countdown, as a futures Stream, and in this process.
    let all: Vec<u32> = countdown::call(&client, 3, None)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(all, [3, 2, 1, 0]);
    let local: Vec<u32> = countdown::local(2, None)
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(local, [2, 1, 0]);

    // A long stream dropped after three items: its producer stops.
    let run = "dropped";
    let mut events = client.nats().subscribe(tree_subject(run)).await.unwrap();
    client.nats().flush().await.unwrap();
    let mut items = chunks::call(&client, run.to_owned(), 1_000_000, 1024)
        .await
        .unwrap();
    for _ in 0..3 {
        items.next().await.unwrap().unwrap();
    }
    drop(items);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .expect("the producer of a dropped stream stops within 10 s")
            .unwrap();
        if String::from_utf8_lossy(&event.payload).starts_with("stopped 1 ") {
            break;
        }
    }
    // Its slot is free: the worker goes on serving.
    assert_eq!(add::call(&client, 2, 3).await.unwrap(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_that_does_not_decode_and_a_call_without_credit_get_clear_errors() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();

    // A producer of another build, written on raw NATS, that sends a
    // good item 0, then an item 1 that is not a postcard u32.
    let nats = client.nats().clone();
    let mut calls = nats
        .queue_subscribe(countdown::SPEC.subject("wharf"), "wharf".to_owned())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    let producer = tokio::spawn(async move {
        let call = calls.next().await.unwrap();
        let headers = call.headers.as_ref().expect("a stream call has headers");
        assert_eq!(headers.get("Wharf-Stream-Credit").unwrap().as_str(), "32");
        let reply = call.reply.clone().unwrap();
        let mut first = async_nats::HeaderMap::new();
        first.insert("Wharf-Stream-Item", "0");
        first.insert("Wharf-Stream-Credit-To", "credit.nowhere");
        nats.publish_with_headers(reply.clone(), first, vec![7].into())
            .await
            .unwrap();
        let mut second = async_nats::HeaderMap::new();
        second.insert("Wharf-Stream-Item", "1");
        nats.publish_with_headers(reply, second, vec![0xff; 6].into())
            .await
            .unwrap();
        nats.flush().await.unwrap();
    });
    let mut items = countdown::call(&client, 9, None).await.unwrap();
    assert_eq!(items.next().await.unwrap().unwrap(), 7);
    let error = items.next().await.unwrap().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BadRequest);
    assert!(error.message().contains("item 1 "), "{}", error.message());
    assert!(items.next().await.is_none(), "nothing follows the error");
    producer.await.unwrap();

    // A client that calls a streaming function without credit (as a
    // plain request) is told what to send, and the worker keeps serving.
    let _worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    let plain = client
        .nats()
        .request_with_headers(
            countdown::SPEC.subject("wharf"),
            headers,
            r#"{"from": 3, "fail_at": null}"#.into(),
        )
        .await
        .unwrap();
    let plain_headers = plain.headers.unwrap();
    assert_eq!(
        plain_headers
            .get("Nats-Service-Error-Code")
            .unwrap()
            .as_str(),
        "400"
    );
    let body: serde_json::Value = serde_json::from_slice(&plain.payload).unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("Wharf-Stream-Credit"),
        "{body}"
    );
    let all: Vec<u32> = countdown::call(&client, 1, None)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(all, [1, 0]);
}

/// The credit a worker grants for a stream argument (docs/protocol.md).
const INPUT_CREDIT: u64 = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_argument_arrives_whole_and_a_slow_function_pauses_its_caller() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;
    let run = "input";
    let mut read = client
        .nats()
        .subscribe(produced_subject(run))
        .await
        .unwrap();
    client.nats().flush().await.unwrap();

    // The caller's items are made as they are pulled: `made` says how far
    // the caller's stream got.
    const COUNT: u64 = 300;
    let made = Arc::new(AtomicU64::new(0));
    let making = made.clone();
    let items = wharf::Stream::new(futures_util::stream::iter(0..COUNT).map(move |i| {
        making.store(i + 1, Ordering::SeqCst);
        bytes::Bytes::from(vec![i as u8; 512])
    }));
    // The function reads STEP items at a time and then waits to be told
    // to go on: while it waits, the caller may have made at most what the
    // worker granted for what was read, the credit beyond it.
    const STEP: u64 = 50;
    let call = tokio::spawn({
        let client = client.clone();
        async move { read_in_steps::call(&client, run.to_owned(), STEP, items).await }
    });
    let mut furthest_ahead = 0;
    for step in 1..=COUNT / STEP {
        let message = tokio::time::timeout(Duration::from_secs(30), read.next())
            .await
            .expect("the function reads on")
            .unwrap();
        let count: u64 = String::from_utf8_lossy(&message.payload).parse().unwrap();
        assert_eq!(count, step * STEP);
        // What the caller made settles once it has used the credit.
        let settled = eventually(
            "the caller to stop making items",
            Duration::from_secs(20),
            || async {
                let before = made.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                let after = made.load(Ordering::SeqCst);
                if before == after {
                    Ok(after)
                } else {
                    Err(format!("{before} then {after} made"))
                }
            },
        )
        .await;
        assert!(
            settled <= count + INPUT_CREDIT,
            "the caller made {settled} items for a function that had read {count} (credit {INPUT_CREDIT})"
        );
        furthest_ahead = furthest_ahead.max(settled - count);
        client
            .nats()
            .publish(go_subject(run), bytes::Bytes::new())
            .await
            .unwrap();
    }
    assert_eq!(
        call.await.unwrap().unwrap(),
        COUNT,
        "every item arrived once"
    );
    println!("REPORT stream argument: {COUNT} items, the caller at most {furthest_ahead} ahead of the function");

    // Through a request (options), and run in this process.
    let items = wharf::Stream::iter((0..3u8).map(|i| bytes::Bytes::from(vec![i; 2])));
    let done = read_bytes::request(String::new(), 0, items)
        .client(&client)
        .timeout(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(done, (3, 6));
    let local =
        read_bytes::local(String::new(), 0, wharf::Stream::iter([bytes::Bytes::new()])).await;
    assert_eq!(local, Ok((1, 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_may_stop_reading_and_a_failing_stream_argument_reaches_it() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;

    // A stream far longer than the function reads: the reply comes when the
    // function is done, and the caller stops sending.
    let pulled = Arc::new(AtomicU64::new(0));
    let pulling = pulled.clone();
    let endless = wharf::Stream::new(futures_util::stream::iter(0..i64::MAX).map(move |n| {
        pulling.fetch_add(1, Ordering::SeqCst);
        n
    }));
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        first_above::call(&client, 100, endless),
    )
    .await
    .expect("the call ends once the function stops reading")
    .unwrap();
    assert_eq!(first, Some(101));
    let pulled = pulled.load(Ordering::SeqCst);
    assert!(
        pulled <= 102 + INPUT_CREDIT,
        "the caller pulled {pulled} items for a function that read 102"
    );
    // An empty stream, read to its end.
    let none = first_above::call(&client, 0, wharf::Stream::iter(Vec::<i64>::new())).await;
    assert_eq!(none.unwrap(), None);

    // The caller's stream fails after three items: the function reads the
    // error after them.
    let failing = wharf::Stream::from_results(futures_util::stream::iter(
        (0..3u8)
            .map(|i| Ok(bytes::Bytes::from(vec![i; 4])))
            .chain([Err(wharf::Error::new(ErrorKind::Application, "disk gone"))]),
    ));
    let error = read_bytes::call(&client, String::new(), 0, failing)
        .await
        .unwrap_err();
    let CallError::Application(message) = error else {
        panic!("the function's own error, got {error:?}");
    };
    assert!(
        message.starts_with("application: ")
            && message.contains("after 3 items")
            && message.contains("disk gone"),
        "{message}"
    );

    // A caller dropped mid-stream cancels the call: the function stops,
    // and the worker serves on.
    let run = "dropped-input";
    let mut events = client.nats().subscribe(tree_subject(run)).await.unwrap();
    client.nats().flush().await.unwrap();
    let slow = wharf::Stream::new(
        futures_util::stream::iter(0..u64::MAX).map(|i| bytes::Bytes::from(vec![i as u8; 8])),
    );
    // Boxed, so that dropping it drops the call (a pinned local would live on).
    let mut call = Box::pin(read_bytes::call(&client, run.to_owned(), 50, slow));
    let mut started = false;
    while !started {
        tokio::select! {
            _ = &mut call => panic!("an endless stream argument's call cannot end"),
            event = events.next() => {
                started = String::from_utf8_lossy(&event.unwrap().payload).starts_with("started 1 ");
            }
        }
    }
    drop(call);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .expect("the function of a dropped call stops within 10 s")
            .unwrap();
        if String::from_utf8_lossy(&event.payload).starts_with("stopped 1 ") {
            break;
        }
    }
    assert_eq!(add::call(&client, 2, 3).await.unwrap(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_caller_sends_a_stream_argument_by_the_protocol_and_bad_items_are_named() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;
    let nats = client.nats().clone();
    let subject = sum_all::SPEC.subject("wharf");
    let json = || {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", "application/json");
        headers
    };

    // Without Wharf-Stream-Input: a 400 that names the header.
    let plain = nats
        .request_with_headers(subject.clone(), json(), "{}".into())
        .await
        .unwrap();
    let code = plain
        .headers
        .as_ref()
        .unwrap()
        .get("Nats-Service-Error-Code");
    assert_eq!(code.unwrap().as_str(), "400");
    let body: serde_json::Value = serde_json::from_slice(&plain.payload).unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("Wharf-Stream-Input"),
        "{body}"
    );

    // By the protocol, in JSON: the request, the grant, items, the end.
    let call = |items: Vec<&'static str>| {
        let (nats, subject) = (nats.clone(), subject.clone());
        async move {
            let inbox = nats.new_inbox();
            let mut answers = nats.subscribe(inbox.clone()).await.unwrap();
            let mut headers = json();
            headers.insert("Wharf-Stream-Input", "1");
            nats.publish_with_reply_and_headers(subject, inbox, headers, "{}".into())
                .await
                .unwrap();
            let grant = answers.next().await.unwrap();
            let grant_headers = grant.headers.as_ref().expect("a grant has headers");
            let credit: u64 = grant_headers
                .get("Wharf-Stream-Credit")
                .unwrap()
                .as_str()
                .parse()
                .unwrap();
            assert!(credit >= items.len() as u64);
            let to = grant_headers
                .get("Wharf-Stream-Items-To")
                .unwrap()
                .as_str()
                .to_owned();
            for (index, item) in items.iter().enumerate() {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Wharf-Stream-Item", index.to_string());
                nats.publish_with_headers(to.clone(), headers, item.to_string().into())
                    .await
                    .unwrap();
            }
            let mut end = async_nats::HeaderMap::new();
            end.insert("Wharf-Stream-End", items.len().to_string());
            nats.publish_with_headers(to, end, bytes::Bytes::new())
                .await
                .unwrap();
            loop {
                let answer = answers.next().await.unwrap();
                if answer
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Wharf-Stream-Items-To"))
                    .is_none()
                {
                    return answer;
                }
            }
        }
    };
    let reply = call(vec!["3", "9", "12"]).await;
    assert!(reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .is_none());
    assert_eq!(&reply.payload[..], b"24");

    // Item 1 does not decode as an i64: the function reads a 400-kind
    // error naming it, and answers with it.
    let reply = call(vec!["1", "\"x\"", "7"]).await;
    let code = reply
        .headers
        .as_ref()
        .unwrap()
        .get("Nats-Service-Error-Code");
    assert_eq!(code.unwrap().as_str(), "422");
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with("bad_request: item 1 of the stream argument"),
        "{body}"
    );

    // A caller that goes silent after one item (no keepalive, as a dead
    // process): the worker repeats its grant while it waits, then takes the
    // caller for gone and the call ends, its slot free.
    let inbox = nats.new_inbox();
    let mut answers = nats.subscribe(inbox.clone()).await.unwrap();
    let mut headers = json();
    headers.insert("Wharf-Stream-Input", "1");
    nats.publish_with_reply_and_headers(subject.clone(), inbox, headers, "{}".into())
        .await
        .unwrap();
    let grant = answers.next().await.unwrap();
    let to = grant
        .headers
        .as_ref()
        .unwrap()
        .get("Wharf-Stream-Items-To")
        .unwrap()
        .as_str()
        .to_owned();
    let mut item = async_nats::HeaderMap::new();
    item.insert("Wharf-Stream-Item", "0");
    nats.publish_with_headers(to, item, "5".into())
        .await
        .unwrap();
    let mut grants = 1;
    let reply = loop {
        let answer = tokio::time::timeout(Duration::from_secs(60), answers.next())
            .await
            .expect("the worker gives a silent caller up")
            .unwrap();
        match answer
            .headers
            .as_ref()
            .and_then(|h| h.get("Wharf-Stream-Items-To"))
        {
            Some(_) => grants += 1,
            None => break answer,
        }
    };
    assert!(grants >= 2, "the worker repeated its grant while it waited");
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(
        body["error"].as_str().unwrap().starts_with("cancelled: ")
            && body["error"].as_str().unwrap().contains("taken for gone"),
        "{body}"
    );
    // The worker serves on.
    assert_eq!(add::call(&client, 1, 1).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_it_reads_a_stream_argument_fails_the_call_long_before_its_deadline()
{
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let mut worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;
    let run = "killed-reader";
    let mut read = client
        .nats()
        .subscribe(produced_subject(run))
        .await
        .unwrap();
    client.nats().flush().await.unwrap();
    let endless = wharf::Stream::new(
        futures_util::stream::iter(0..u64::MAX).map(|i| bytes::Bytes::from(vec![i as u8; 64])),
    );
    let call = tokio::spawn({
        let client = client.clone();
        async move { read_in_steps::call(&client, run.to_owned(), 10, endless).await }
    });
    // Once the function has read its first 10 items (and waits), its
    // worker dies.
    tokio::time::timeout(Duration::from_secs(30), read.next())
        .await
        .expect("the function reads")
        .unwrap();
    worker.kill();
    // The caller, out of credit, probes for the call and finds it gone:
    // it fails long before the call's 120 s deadline.
    let failed = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the caller notices the lost worker")
        .unwrap()
        .unwrap_err();
    let CallError::Remote(error) = failed else {
        panic!("a wharf error, got {failed:?}");
    };
    assert!(
        matches!(error.kind(), ErrorKind::WorkerLost | ErrorKind::Connection),
        "{error}"
    );
}
