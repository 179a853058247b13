//! Cancellation across processes, against a real nats-server and worker
//! processes: a call tree of depth 3 over three workers stops at every
//! level when its caller drops the top call (the last level a sync
//! function that sees `wharf::cancelled()`), a call whose deadline passes
//! is stopped on its worker, a cancelled call's slot goes at once to the
//! call queued behind it, cancels of unknown calls change nothing, and a
//! durable call is cancelled by id while it runs and before it reaches a
//! worker.

use futures_util::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use wharf::testing::{eventually, NatsServer};
use wharf::{Client, ErrorKind};
use wharf_integration::{
    add, hold, sleep_ms, spawn_worker, spawn_worker_with, tree, tree_leaf, tree_subject,
    wait_for_workers,
};

/// What the levels of one tree told: pid by level, for starts and stops.
#[derive(Default, Debug)]
struct Seen {
    started: BTreeMap<u32, u32>,
    stopped: BTreeMap<u32, u32>,
}

impl Seen {
    /// Reads events from `events` until `done` holds, failing after
    /// `within` with what was seen.
    async fn until(
        &mut self,
        events: &mut async_nats::Subscriber,
        within: Duration,
        what: &str,
        done: impl Fn(&Seen) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        while !done(self) {
            let event = tokio::time::timeout_at(deadline, events.next())
                .await
                .unwrap_or_else(|_| panic!("waited {within:?} for {what}; seen {self:?}"))
                .expect("the subscription stays open");
            let text = String::from_utf8_lossy(&event.payload).into_owned();
            let parts: Vec<&str> = text.split(' ').collect();
            let [kind, level, pid] = parts[..] else {
                panic!("a malformed event: {text}");
            };
            let (level, pid) = (level.parse().unwrap(), pid.parse().unwrap());
            match kind {
                "started" => self.started.insert(level, pid),
                "stopped" => self.stopped.insert(level, pid),
                _ => panic!("a malformed event: {text}"),
            };
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_tree_stops_at_every_level_across_processes() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _workers: Vec<_> = (0..3).map(|_| spawn_worker(&server.url())).collect();
    wait_for_workers(&client, 3).await;
    // The queue group places each level at random: rounds go on until one
    // tree spans all three workers (each round must stop entirely anyway).
    for round in 0..60 {
        let run = format!("r{round}");
        let mut events = client.nats().subscribe(tree_subject(&run)).await.unwrap();
        client.nats().flush().await.unwrap();
        let top = tokio::spawn({
            let client = client.clone();
            let run = run.clone();
            async move { tree::request(run, 1).client(&client).await }
        });
        let mut seen = Seen::default();
        seen.until(
            &mut events,
            Duration::from_secs(30),
            "every level to start",
            |s| s.started.len() == 3,
        )
        .await;
        assert!(!top.is_finished(), "the tree runs until cancelled");
        // Dropping the top call's future cancels it.
        top.abort();
        seen.until(
            &mut events,
            Duration::from_secs(10),
            "every level to stop",
            |s| s.stopped.len() == 3,
        )
        .await;
        assert_eq!(
            seen.started, seen.stopped,
            "each level stopped where it ran"
        );
        let workers: BTreeSet<u32> = seen.started.values().copied().collect();
        if workers.len() == 3 {
            // The workers' slots are free again: a call gets through at once.
            let n = sleep_ms::request(1).client(&client).await.unwrap();
            assert_eq!(n, 1);
            // Each worker counts what it stopped in its STATS.
            let counted = cancelled_in_stats(&client).await;
            assert!(
                counted >= 3 * (round + 1),
                "STATS count {counted} cancelled calls"
            );
            return;
        }
    }
    panic!("in 60 rounds no tree spanned three workers");
}

/// The calls the workers of `itest` say they stopped (STATS `data`),
/// summed over every worker that answers within half a second.
async fn cancelled_in_stats(client: &Client) -> u64 {
    let nats = client.nats();
    let inbox = nats.new_inbox();
    let mut answers = nats.subscribe(inbox.clone()).await.unwrap();
    nats.publish_with_reply("$SRV.STATS.itest", inbox, "".into())
        .await
        .unwrap();
    let mut total = 0;
    while let Ok(Some(answer)) =
        tokio::time::timeout(Duration::from_millis(500), answers.next()).await
    {
        let stats: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
        // Every endpoint carries the instance's count: read it once.
        total += stats["endpoints"][0]["data"]["cancelled"]
            .as_u64()
            .expect("STATS data names `cancelled`");
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_deadline_passes_is_stopped_on_its_worker() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;
    let run = "deadline";
    let mut events = client.nats().subscribe(tree_subject(run)).await.unwrap();
    client.nats().flush().await.unwrap();
    let outcome = tree::request(run.to_owned(), 1)
        .client(&client)
        .timeout(Duration::from_millis(1500))
        .await;
    // The levels below inherit the same deadline, so two timers end at the
    // same instant: the caller's (a timeout), or level 2's, after which
    // level 1 answers 0 just in time. Either way every level must stop.
    match outcome {
        Err(error) => assert_eq!(error.kind(), ErrorKind::Timeout, "{error}"),
        Ok(answer) => assert_eq!(answer, 0, "only a level whose call below timed out answers"),
    }
    let mut seen = Seen::default();
    seen.until(
        &mut events,
        Duration::from_secs(10),
        "every level to stop after the deadline",
        |s| s.stopped.len() == 3,
    )
    .await;
    assert_eq!(seen.started.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_frees_its_slot_for_the_queued_one_and_stray_cancels_change_nothing() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    // One slot: a second call waits in the worker's backlog.
    let _worker = spawn_worker_with(&server.url(), &[("WHARF_CONCURRENCY", "1")]);
    wait_for_workers(&client, 1).await;
    let nats = client.nats();

    // Cancels of calls no worker holds, and ones that do not read: ignored,
    // and the worker serves on.
    let long_id = "x".repeat(60_000);
    for junk in [
        "",
        "no_such_call",
        "a b  c",
        "\u{0}\u{7f}",
        long_id.as_str(),
    ] {
        nats.publish("wharf._cancel.itest", junk.to_owned().into())
            .await
            .unwrap();
    }
    nats.flush().await.unwrap();
    assert_eq!(add::call(&client, 1, 2).await.unwrap(), 3);

    // A call that holds the only slot until it is cancelled (at most 60 s),
    // and one queued behind it.
    let run = "slot";
    let mut events = nats.subscribe(tree_subject(run)).await.unwrap();
    nats.flush().await.unwrap();
    let holder = tokio::spawn({
        let client = client.clone();
        async move { tree_leaf::call(&client, run.to_owned()).await }
    });
    let mut seen = Seen::default();
    seen.until(
        &mut events,
        Duration::from_secs(30),
        "the holder to start",
        |s| !s.started.is_empty(),
    )
    .await;
    let queued = tokio::spawn({
        let client = client.clone();
        async move { sleep_ms::call(&client, 1).await }
    });
    // The queued call waits in the worker's backlog while the holder runs.
    eventually(
        "the worker to report the second call waiting",
        Duration::from_secs(30),
        || async {
            let beats = wharf::supervisor::instances(&client)
                .await
                .map_err(|e| e.to_string())?;
            match beats.iter().map(|b| b.backlog).max() {
                Some(1) => Ok(()),
                other => Err(format!("backlog {other:?}")),
            }
        },
    )
    .await;
    assert!(
        !queued.is_finished(),
        "the second call waited for the only slot"
    );
    holder.abort();
    // Its slot is free at once: the queued call runs long before the
    // holder's minute is up.
    let ran = tokio::time::timeout(Duration::from_secs(20), queued)
        .await
        .expect("the queued call runs once the holder is cancelled")
        .unwrap()
        .unwrap();
    assert_eq!(ran, 1);
    seen.until(
        &mut events,
        Duration::from_secs(10),
        "the holder to see it was cancelled",
        |s| !s.stopped.is_empty(),
    )
    .await;
    // Counted once, the stray cancels not at all.
    eventually(
        "STATS to count one cancelled call",
        Duration::from_secs(20),
        || async {
            match cancelled_in_stats(&client).await {
                1 => Ok(()),
                counted => Err(format!("{counted} cancelled")),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_call_is_cancelled_by_id_while_it_runs_and_before() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    // One slot: while the first call holds it, the second waits in the
    // work queue.
    let _worker = spawn_worker_with(&server.url(), &[("WHARF_CONCURRENCY", "1")]);
    wait_for_workers(&client, 1).await;
    let mut events = client.nats().subscribe(tree_subject("d.*")).await.unwrap();
    let mut queued_events = client.nats().subscribe(tree_subject("q")).await.unwrap();
    client.nats().flush().await.unwrap();

    let running = hold::request("d.1".to_owned())
        .client(&client)
        .start()
        .await
        .unwrap();
    let running_id = running.id().to_owned();
    let mut seen = Seen::default();
    seen.until(
        &mut events,
        Duration::from_secs(30),
        "the durable call to start",
        |s| !s.started.is_empty(),
    )
    .await;
    let queued = hold::request("q".to_owned())
        .client(&client)
        .start()
        .await
        .unwrap();
    let queued_id = queued.id().to_owned();

    // Cancelled before it runs: the worker hears it while busy, and never
    // runs it once its slot is free.
    let cancelled = hold::collect(queued_id.clone())
        .client(&client)
        .cancel()
        .await
        .unwrap();
    assert!(cancelled, "a queued call is cancelled");
    // Cancelled while it runs: it stops.
    let cancelled = hold::collect(running_id.clone())
        .client(&client)
        .cancel()
        .await
        .unwrap();
    assert!(cancelled, "a running call is cancelled");
    seen.until(
        &mut events,
        Duration::from_secs(10),
        "the running call to stop",
        |s| !s.stopped.is_empty(),
    )
    .await;

    for id in [&running_id, &queued_id] {
        let error = hold::collect(id.clone())
            .client(&client)
            .wait()
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Cancelled, "{error}");
        assert!(error.message().contains("cancelled"), "{error}");
    }
    // The worker is free and took the queued call off its queue without
    // running it: a new call runs at once, and the queued one never told
    // of a start.
    let mut fresh = Seen::default();
    let next = hold::request("d.2".to_owned())
        .client(&client)
        .start()
        .await
        .unwrap();
    fresh
        .until(
            &mut events,
            Duration::from_secs(30),
            "a new durable call to start",
            |s| !s.started.is_empty(),
        )
        .await;
    assert!(next.cancel().await.unwrap());
    // The work queue hands calls out in order, so the cancelled call was
    // settled before the new one started; had it started, its event would
    // have arrived on this connection before the new call's.
    assert!(
        futures_util::FutureExt::now_or_never(queued_events.next()).is_none(),
        "the call cancelled before it ran never started"
    );

    // A call that completed keeps its result: cancelling it changes nothing.
    let done = wharf_integration::tally::request(7, 1)
        .client(&client)
        .start()
        .await
        .unwrap();
    let done_id = done.id().to_owned();
    assert_eq!(done.wait().await.unwrap(), 7);
    let cancelled = wharf_integration::tally::collect(done_id.clone())
        .client(&client)
        .cancel()
        .await
        .unwrap();
    assert!(!cancelled, "a finished call is not cancelled");
    let again = wharf_integration::tally::collect(done_id)
        .client(&client)
        .wait()
        .await
        .unwrap();
    assert_eq!(again, 7);
    // A cancel of an id no worker holds is no error either (nothing
    // stored under it yet: it would read as cancelled).
    let unknown = hold::collect("no_such_call".to_owned())
        .client(&client)
        .cancel()
        .await
        .unwrap();
    assert!(unknown);
}
