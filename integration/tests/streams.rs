//! Streamed results against a real nats-server and worker process: items
//! arrive in order, a slow reader pauses the producer (credit), an error
//! mid-stream ends the stream with it, dropping the stream cancels the
//! producer, and bad input (an item that does not decode, a stream call
//! without credit) gets a clear error.

use futures_util::StreamExt;
use std::time::Duration;
use wharf::testing::NatsServer;
use wharf::{Client, ErrorKind};
use wharf_integration::{
    add, chunks, countdown, produced_subject, spawn_worker, tree_subject, wait_for_workers,
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
