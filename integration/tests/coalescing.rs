//! Coalesced calls against a real nats-server and real worker processes:
//! concurrent calls travel in batches (seen on the wire), each keeps its own
//! answer and error, STATS count calls rather than messages, a lone call
//! goes out alone, and a batch that does not decode is answered 400 while
//! the worker keeps serving.

use bytes::Bytes;
use futures_util::StreamExt;
use std::time::Duration;
use wharf::testing::NatsServer;
use wharf::wire::batch;
use wharf::wire::subjects;
use wharf::Client;
use wharf_integration::{
    add, spawn_worker, spawn_worker_with, take, wait_for_workers, InventoryError,
};

/// Calls in flight from the one client.
const IN_FLIGHT: usize = 128;

/// Calls each of them makes.
const EACH: usize = 40;

/// Counts the messages on `subject` (a plain subscription beside the
/// workers' queue group sees each one) until the returned sender fires.
async fn count_messages(
    nats: &async_nats::Client,
    subject: String,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<u64>,
) {
    let mut seen = nats.subscribe(subject).await.unwrap();
    nats.flush().await.unwrap();
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let counter = tokio::spawn(async move {
        let mut count = 0;
        loop {
            tokio::select! {
                _ = &mut stopped => return count,
                message = seen.next() => match message {
                    Some(_) => count += 1,
                    None => return count,
                },
            }
        }
    });
    (stop, counter)
}

/// `num_requests` of the endpoint `name` summed over the STATS answers of
/// `workers` itest workers (asked until all of them answer).
async fn requests_in_stats(nats: &async_nats::Client, name: &str, workers: usize) -> u64 {
    wharf::testing::eventually(
        "a STATS answer from every worker",
        Duration::from_secs(30),
        || async {
            let inbox = nats.new_inbox();
            let mut answers = nats.subscribe(inbox.clone()).await.unwrap();
            nats.publish_with_reply("$SRV.STATS.itest", inbox, "".into())
                .await
                .unwrap();
            let (mut total, mut heard) = (0, 0);
            while heard < workers {
                let Ok(Some(answer)) =
                    tokio::time::timeout(Duration::from_secs(2), answers.next()).await
                else {
                    return Err(format!("{heard} of {workers} answered"));
                };
                heard += 1;
                let stats: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
                for endpoint in stats["endpoints"].as_array().unwrap() {
                    if endpoint["name"] == name {
                        total += endpoint["num_requests"].as_u64().unwrap();
                    }
                }
            }
            Ok(total)
        },
    )
    .await
}

/// Waits until the workers' STATS count at least `calls` calls of `name`
/// and returns the count: a worker counts a call just after answering it,
/// so the count of the last calls may trail their answers a little.
async fn requests_counted(
    nats: &async_nats::Client,
    name: &str,
    workers: usize,
    calls: u64,
) -> u64 {
    wharf::testing::eventually(
        "the workers' STATS to count every call",
        Duration::from_secs(30),
        || async {
            let counted = requests_in_stats(nats, name, workers).await;
            if counted >= calls {
                Ok(counted)
            } else {
                Err(format!("{counted} of {calls} counted"))
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_travel_in_batches_each_with_its_own_answer() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _workers = [spawn_worker(&server.url()), spawn_worker(&server.url())];
    wait_for_workers(&client, 2).await;
    let add_batches = subjects::batch_call("wharf", "itest", "add", add::SPEC.sig);
    let take_batches = subjects::batch_call("wharf", "itest", "take", take::SPEC.sig);
    let (stop_add, add_counter) = count_messages(client.nats(), add_batches).await;
    let (stop_take, take_counter) = count_messages(client.nats(), take_batches).await;
    let before = requests_in_stats(client.nats(), "add", 2).await;

    // A lone call goes out alone.
    assert_eq!(add::call(&client, 1, 2).await.unwrap(), 3);

    // Many at once: an async function answered in its first poll, and a
    // sync one (on the blocking pool, answered later) whose calls succeed
    // or fail each on its own.
    let mut tasks = Vec::new();
    for task in 0..IN_FLIGHT as i64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH as i64 {
                let sum = add::call(&client, task, i).await.unwrap();
                assert_eq!(sum, task + i, "add({task}, {i})");
                let count = ((task + i) % 13) as u32;
                let taken = take::call(&client, count).await;
                if count <= 10 {
                    assert_eq!(taken.unwrap(), 10 - count);
                } else {
                    assert_eq!(
                        taken.unwrap_err(),
                        wharf::CallError::Application(InventoryError::OutOfStock { left: 10 })
                    );
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let _ = stop_add.send(());
    let _ = stop_take.send(());
    let (add_messages, take_messages) = (add_counter.await.unwrap(), take_counter.await.unwrap());
    let calls = (IN_FLIGHT * EACH) as u64;
    println!(
        "REPORT coalescing: {calls} calls of add in {add_messages} batches, {calls} of take in {take_messages}"
    );
    assert!(
        add_messages > 0 && add_messages < calls / 2,
        "{calls} concurrent calls of add went in {add_messages} batches"
    );
    assert!(
        take_messages > 0 && take_messages < calls / 2,
        "{calls} concurrent calls of take went in {take_messages} batches"
    );
    // STATS count calls, not messages.
    let after = requests_counted(client.nats(), "add", 2, before + calls + 1).await;
    assert_eq!(after - before, calls + 1, "STATS of add count every call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_does_not_decode_is_answered_400_and_the_worker_keeps_serving() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;
    let nats = client.nats();
    let subject = subjects::batch_call("wharf", "itest", "add", add::SPEC.sig);
    let ask = |payload: Bytes| {
        let subject = subject.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), nats.request(subject, payload))
                .await
                .expect("the worker answers a batch within 10 s")
                .expect("a reply")
        }
    };

    // Framing that does not hold: answered as a whole, with the headers.
    for (bad, names) in [
        (vec![7u8, 1, 0], "version 7"),
        (vec![1u8, 2, 9, 1], "says 9 bytes"),
        (vec![1u8, 1, 0, 0], "1 bytes follow"),
    ] {
        let reply = ask(Bytes::from(bad)).await;
        let headers = reply.headers.expect("error headers");
        assert_eq!(
            headers.get("Nats-Service-Error-Code").unwrap().as_str(),
            "400"
        );
        let text = headers.get("Nats-Service-Error").unwrap().as_str();
        assert!(text.contains(names) && text.contains("itest.add"), "{text}");
    }

    // A batch of a good call and a bad one: each answered at its index.
    let good = Bytes::from_static(&[1, 0, 0, 0, 0, 0, 4, 6]);
    let bad = Bytes::from_static(&[1, 0, 0, 0, 0, 0, 4]);
    let payload = {
        let mut out = vec![batch::BATCH_VERSION, 2];
        for request in [&good, &bad] {
            out.push(request.len() as u8);
            out.extend_from_slice(request);
        }
        Bytes::from(out)
    };
    let reply = ask(payload).await;
    assert!(reply.headers.is_none(), "a batch reply carries no headers");
    let mut answers = batch::decode_answers(&reply.payload).unwrap();
    answers.sort_by_key(|a| a.index);
    assert_eq!(answers.len(), 2);
    assert!(answers[0].headers.is_none());
    assert_eq!(postcard::from_bytes::<i64>(&answers[0].body).unwrap(), 5);
    let headers = answers[1].headers.as_ref().expect("the bad call's error");
    assert_eq!(
        headers.get("Nats-Service-Error-Code").unwrap().as_str(),
        "400"
    );

    // And the worker serves on, alone and in batches.
    assert_eq!(add::call(&client, 20, 22).await.unwrap(), 42);
    let calls: Vec<_> = (0..64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { add::call(&client, i, i).await.unwrap() })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap(), 2 * i as i64);
    }
}

/// Workers that take no batches (a wharf before coalescing: the plain and
/// the signature subject only) still get every call: a batch that finds
/// no responders goes out call by call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_reach_workers_that_take_no_batches() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let nats = client.nats().clone();
    // A responder written against docs/protocol.md without batches.
    let mut calls = nats
        .queue_subscribe(add::SPEC.signed_subject("wharf"), "q".to_owned())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    let responder = {
        let nats = nats.clone();
        tokio::spawn(async move {
            while let Some(call) = calls.next().await {
                let (_, at) = wharf::wire::envelope::Envelope::split(&call.payload).unwrap();
                let (a, b): (i64, i64) = postcard::from_bytes(&call.payload[at..]).unwrap();
                let sum = postcard::to_allocvec(&(a + b)).unwrap();
                nats.publish(call.reply.unwrap(), sum.into()).await.unwrap();
            }
        })
    };
    let tasks: Vec<_> = (0..64i64)
        .map(|task| {
            let client = client.clone();
            tokio::spawn(async move {
                for i in 0..20 {
                    assert_eq!(add::call(&client, task, i).await.unwrap(), task + i);
                }
            })
        })
        .collect();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("every call answered within 60 s")
            .unwrap();
    }
    responder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_durable_calls_are_stored_in_batches_and_each_is_collected_by_its_id() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _workers = [spawn_worker(&server.url()), spawn_worker(&server.url())];
    wait_for_workers(&client, 2).await;
    // The first durable call makes the stream (and the workers' batch
    // consumer is there once they serve).
    let first = add::request(1, 1).client(&client).durable(true).await;
    assert_eq!(first.unwrap(), 2);
    let batches = subjects::durable_batch_call("wharf", "itest", "add");
    let alone = subjects::durable_call("wharf", "itest", "add");
    let (stop_batches, batch_counter) = count_messages(client.nats(), batches).await;
    let (stop_alone, alone_counter) = count_messages(client.nats(), alone).await;
    // Started (stored) concurrently, collected afterwards by id.
    let started = futures_util::future::join_all((0..IN_FLIGHT as i64).map(|i| {
        let client = client.clone();
        async move {
            let pending = add::request(i, 1000).client(&client).start().await.unwrap();
            (i, pending.id().to_owned())
        }
    }))
    .await;
    let collected = futures_util::future::join_all(started.iter().map(|(_, id)| {
        let client = client.clone();
        async move { add::collect(id.clone()).client(&client).wait().await }
    }))
    .await;
    for ((i, id), sum) in started.iter().zip(collected) {
        assert_eq!(sum.unwrap(), i + 1000, "durable call {id} ({i} + 1000)");
    }
    // And called durably, waiting for each answer: the answers of a
    // batch's calls come back together.
    let batch_replies = subjects::durable_batch_reply("_INBOX.*.durable");
    let (stop_replies, reply_counter) = count_messages(client.nats(), batch_replies).await;
    let answers = futures_util::future::join_all((0..IN_FLIGHT as i64).map(|i| {
        let client = client.clone();
        async move { add::request(i, 7).client(&client).durable(true).await }
    }))
    .await;
    for (i, answer) in answers.into_iter().enumerate() {
        assert_eq!(answer.unwrap(), i as i64 + 7);
    }
    let _ = (
        stop_batches.send(()),
        stop_alone.send(()),
        stop_replies.send(()),
    );
    let (in_batches, alone) = (batch_counter.await.unwrap(), alone_counter.await.unwrap());
    let batch_replies = reply_counter.await.unwrap();
    let calls = 2 * IN_FLIGHT as u64;
    println!(
        "REPORT durable coalescing: {calls} calls, {in_batches} batch messages, {alone} alone, {batch_replies} batch replies"
    );
    assert!(in_batches > 0, "no durable call was stored in a batch");
    assert!(
        batch_replies > 0,
        "no answer of a batch's calls came back in a batch reply"
    );
    assert!(
        in_batches + alone < calls,
        "{in_batches} batches and {alone} calls alone for {calls} calls: nothing coalesced"
    );
    // Every call ran once and counts as a call in the workers' STATS
    // (the first call, and the two rounds).
    requests_counted(client.nats(), "add", 2, calls + 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_fewer_slots_than_a_batch_holds_serves_every_durable_call() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    // Four slots: a batch of more calls runs four at a time.
    let _worker = spawn_worker_with(&server.url(), &[("WHARF_CONCURRENCY", "4")]);
    wait_for_workers(&client, 1).await;
    // The largest batch stored, seen on the wire.
    let mut batches = client
        .nats()
        .subscribe(subjects::durable_batch_call("wharf", "itest", "add"))
        .await
        .unwrap();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let largest = tokio::spawn(async move {
        let mut largest = 0;
        loop {
            tokio::select! {
                Some(message) = batches.next() => {
                    let calls = batch::decode_requests(&message.payload).map_or(0, |c| c.len());
                    largest = largest.max(calls);
                }
                _ = &mut stopped => return largest,
            }
        }
    });
    // Two rounds: in the first the client learns that the workers take
    // batches.
    for round in 0..2 {
        let answers = tokio::time::timeout(
            Duration::from_secs(60),
            futures_util::future::join_all((0..IN_FLIGHT as i64).map(|i| {
                let client = client.clone();
                async move { add::request(i, round).client(&client).durable(true).await }
            })),
        )
        .await
        .expect("every durable call answered within 60 s by a worker of 4 slots");
        for (i, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.unwrap(), i as i64 + round);
        }
    }
    let _ = stop.send(());
    let largest = largest.await.unwrap();
    println!("REPORT durable coalescing, 4 slots: largest batch {largest} calls");
    assert!(
        largest > 4,
        "no batch held more calls than the worker has slots (largest: {largest})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_calls_whose_batches_are_not_permitted_are_stored_alone() {
    // The caller may publish anything but batches of durable calls.
    let server = NatsServer::start_with_config(
        r#"authorization {
  users = [
    { user: worker, password: pw-worker }
    { user: web, password: pw-web, permissions: { publish: { deny: ["wharf.durable.itest.add-batch"] } } }
  ]
}"#,
    )
    .unwrap();
    let url = |user: &str| format!("nats://{user}:pw-{user}@127.0.0.1:{}", server.port());
    let client = Client::connect(&url("web")).await.unwrap();
    let _worker = spawn_worker(&url("worker"));
    wait_for_workers(&client, 1).await;
    let alone = subjects::durable_call("wharf", "itest", "add");
    let watcher = Client::connect(&url("worker")).await.unwrap();
    let (stop_alone, alone_counter) = count_messages(watcher.nats(), alone).await;
    // Two rounds: in the first the client learns that the workers take
    // batches; in the second its batches are refused.
    for round in 0..2 {
        let answers = futures_util::future::join_all((0..IN_FLIGHT as i64).map(|i| {
            let client = client.clone();
            async move { add::request(i, round).client(&client).durable(true).await }
        }))
        .await;
        for (i, answer) in answers.into_iter().enumerate() {
            let answer = answer.unwrap_or_else(|e| panic!("durable call {i}: {e}"));
            assert_eq!(answer, i as i64 + round);
        }
    }
    let _ = stop_alone.send(());
    let alone = alone_counter.await.unwrap();
    println!(
        "REPORT durable batches not permitted: {alone} of {} calls stored alone",
        2 * IN_FLIGHT
    );
    assert_eq!(alone, 2 * IN_FLIGHT as u64, "every call stored alone, once");
}

/// Waits until every durable call of `add` is acked (nothing pending or
/// unacknowledged on either of its consumers): by then every result that
/// is to be stored is.
async fn all_acked(js: &async_nats::jetstream::Context) {
    let stream = subjects::calls_stream("wharf", "itest");
    wharf::testing::eventually(
        "every durable call of add to be acked",
        Duration::from_secs(20),
        || async {
            for name in ["add", "add-batch"] {
                let consumer = js
                    .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                        name, &stream,
                    )
                    .await
                    .map_err(|e| format!("consumer {name}: {e}"))?;
                let info = consumer.get_info().await.map_err(|e| format!("{name}: {e}"))?;
                if info.num_pending > 0 || info.num_ack_pending > 0 {
                    return Err(format!(
                        "{name}: {} pending, {} unacknowledged",
                        info.num_pending, info.num_ack_pending
                    ));
                }
            }
            Ok(())
        },
    )
    .await;
}

/// A postcard request to `add(a, b)` (both under 64) with call id `id`,
/// written by hand from docs/protocol.md as a foreign client would.
fn add_request(id: &str, a: u8, b: u8) -> Bytes {
    let mut request = vec![1, 0, 0, id.len() as u8];
    request.extend_from_slice(id.as_bytes());
    // attempt, flags, then the arguments zigzag-encoded.
    request.extend_from_slice(&[0, 0, a * 2, b * 2]);
    request.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_results_of_answers_their_caller_confirmed_are_not_stored() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;
    let first = add::request(1, 1).client(&client).durable(true).await;
    assert_eq!(first.unwrap(), 2);
    let nats = client.nats();
    let js = async_nats::jetstream::new(nats.clone());

    // Waiting callers take their answers and confirm them: most results
    // are never stored. (In the first round the client learns that the
    // workers take batches; the second is counted.)
    let stores = format!("$KV.{}.>", subjects::results_bucket("itest"));
    let mut counting = None;
    for round in 0..2 {
        if round == 1 {
            all_acked(&js).await;
            counting = Some(count_messages(nats, stores.clone()).await);
        }
        let answers = futures_util::future::join_all((0..IN_FLIGHT as i64).map(|i| {
            let client = client.clone();
            async move { add::request(i, round).client(&client).durable(true).await }
        }))
        .await;
        for (i, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.unwrap(), i as i64 + round);
        }
    }
    // Acked, every result not confirmed was stored.
    all_acked(&js).await;
    let (stop_stores, store_counter) = counting.expect("counted");
    let _ = stop_stores.send(());
    let stored = store_counter.await.unwrap();
    let calls = IN_FLIGHT as u64;
    println!("REPORT confirmed answers: {stored} of {calls} awaited durable results stored");
    assert!(
        stored < calls / 2,
        "{stored} of {calls} results stored: the answers taken were not confirmed"
    );

    // A batch whose caller takes its first answer and not its second: the
    // second's result is stored, the first's is not.
    let run = "raw";
    let (taken, left) = (format!("{run}-taken"), format!("{run}-left"));
    let base = format!("_INBOX.{run}.durable");
    let mut replies = nats
        .subscribe(subjects::durable_batch_reply(&base))
        .await
        .unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Wharf-Reply", base.as_str());
    headers.insert("Wharf-Confirm", "1");
    headers.insert("Nats-Msg-Id", format!("{run}-batch").as_str());
    let payload =
        batch::encode_requests([add_request(&taken, 2, 3), add_request(&left, 4, 5)].iter());
    js.publish_with_headers(
        subjects::durable_batch_call("wharf", "itest", "add"),
        headers,
        payload,
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let mut answered = Vec::new();
    while answered.len() < 2 {
        let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .expect("the batch's answers within 10 s")
            .unwrap();
        let to = reply
            .reply
            .clone()
            .expect("a batch reply asks for confirmation");
        let answers = batch::decode_answers(&reply.payload).unwrap();
        let confirmation: Vec<u8> = answers
            .iter()
            .map(|answer| {
                let id = answer
                    .headers
                    .as_ref()
                    .unwrap()
                    .get("Wharf-Call-Id")
                    .unwrap();
                u8::from(id.as_str() == taken)
            })
            .collect();
        nats.publish(to, confirmation.into()).await.unwrap();
        answered.extend(answers);
    }
    let results = js
        .get_key_value(subjects::results_bucket("itest"))
        .await
        .unwrap();
    all_acked(&js).await;
    assert!(
        results.get(&left).await.unwrap().is_some(),
        "the result of the answer not taken was not stored"
    );
    assert_eq!(
        results.get(&taken).await.unwrap(),
        None,
        "the result of a confirmed answer was stored"
    );
}
