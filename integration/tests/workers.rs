//! Worker processes against a real nats-server: load spreads over the queue
//! group, a killed worker leaves the others serving, a drained worker
//! finishes its calls.

use std::time::Duration;
use wharf::testing::NatsServer;
use wharf::{Client, ErrorKind};
use wharf_integration::{
    add, add_remotely, in_flight, sleep_ms, spawn_worker, take, wait_for_workers, whoami,
    InventoryError,
};

#[tokio::test]
async fn calls_spread_over_worker_processes() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let workers: Vec<_> = (0..3).map(|_| spawn_worker(&server.url())).collect();
    let pids = wait_for_workers(&client, 3).await;
    let mut served = std::collections::BTreeMap::<u32, usize>::new();
    for _ in 0..300 {
        *served
            .entry(whoami::call(&client).await.unwrap())
            .or_default() += 1;
    }
    assert_eq!(served.len(), 3, "every worker served: {served:?}");
    assert!(served.keys().all(|pid| pids.contains(pid)));
    assert_eq!(add::call(&client, 40, 2).await.unwrap(), 42);
    // A microservice calling another, from inside a worker process.
    assert_eq!(add_remotely::call(&client, 40, 2).await.unwrap(), 42);
    assert_eq!(
        take::call(&client, 12).await.unwrap_err(),
        wharf::CallError::Application(InventoryError::OutOfStock { left: 10 })
    );
    drop(workers);
}

#[tokio::test]
async fn a_killed_worker_leaves_the_others_serving() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let mut first = spawn_worker(&server.url());
    let mut second = spawn_worker(&server.url());
    wait_for_workers(&client, 2).await;
    first.kill(); // SIGKILL
                  // Calls already routed to a worker when it dies are the subject of
                  // retries; here the server has seen it go (test client + one worker).
    server.wait_for_connections(2).await.unwrap();
    for i in 0..200 {
        assert_eq!(add::call(&client, i, 1).await.unwrap(), i + 1);
    }
    second.kill();
    server.wait_for_connections(1).await.unwrap();
    let error = add::request(1, 1)
        .client(&client)
        .retry(wharf::RetryPolicy::NONE)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NoResponders);
}

#[tokio::test]
async fn sigterm_drains_calls_in_flight() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { sleep_ms::call(&client, 3_000).await })
        })
        .collect();
    // SIGTERM only once every call is running on the worker.
    wharf::testing::eventually(
        "20 calls in flight on the worker",
        Duration::from_secs(30),
        || async {
            match in_flight(&client, "itest").await {
                20 => Ok(()),
                n => Err(format!("{n} in flight")),
            }
        },
    )
    .await;
    wharf_integration::signal(worker.pid(), libc::SIGTERM);
    for call in calls {
        assert_eq!(
            call.await.unwrap().unwrap(),
            3_000,
            "no call in flight is lost"
        );
    }
    let status = worker.exit_status().await;
    assert!(status.success(), "a drained worker exits cleanly: {status}");
}

/// A drained worker that keeps being sent calls at a steady rate, too few
/// to reach its leave's first message limit soon and too many for a quiet
/// spell, still leaves the queue group and finishes what it took: none of
/// the calls (not idempotent, so none retried) fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_drained_under_steady_calls_leaves_and_loses_none() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let first = spawn_worker(&server.url());
    let _second = spawn_worker(&server.url());
    wait_for_workers(&client, 2).await;
    // About 50 calls a second reach each worker, one message each (not
    // coalesced, whose batches come in bursts with quiet between), out of
    // step with each other.
    let uncoalesced = client.without_coalescing();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let callers: Vec<_> = (0..8)
        .map(|i| {
            let (client, stopped) = (uncoalesced.clone(), stopped.clone());
            let ms = 70 + 3 * i;
            tokio::spawn(async move {
                let (mut calls, mut failures) = (0u64, Vec::new());
                while !*stopped.borrow() {
                    match sleep_ms::call(&client, ms).await {
                        Ok(slept) if slept == ms => {}
                        other => failures.push(format!("{other:?}")),
                    }
                    calls += 1;
                }
                (calls, failures)
            })
        })
        .collect();
    wharf::testing::eventually(
        "calls in flight on both workers",
        Duration::from_secs(30),
        || async {
            match in_flight(&client, "itest").await {
                n if n >= 4 => Ok(()),
                n => Err(format!("{n} in flight")),
            }
        },
    )
    .await;
    wharf_integration::signal(first.pid(), libc::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(60), first.exit_status())
        .await
        .expect("the drained worker exits");
    assert!(status.success(), "a drained worker exits cleanly: {status}");
    wharf_integration::settle_callers("the callers", stop, callers).await;
}

#[tokio::test]
async fn a_worker_logs_json_lines_when_asked_and_refuses_an_unknown_format() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let (worker, lines) = wharf_integration::spawn_svc_logged(
        &["worker"],
        &[("NATS_URL", url.as_str()), ("WHARF_LOG_FORMAT", "json")],
    );
    let ready = wharf::testing::eventually(
        "a JSON log line saying the worker is ready",
        Duration::from_secs(60),
        || {
            let lines = lines.lock().unwrap().clone();
            async move {
                lines
                    .iter()
                    .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                    .find(|event| {
                        event["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("worker ready"))
                    })
                    .ok_or_else(|| format!("its stderr so far: {lines:?}"))
            }
        },
    )
    .await;
    assert_eq!(ready["level"], "INFO", "{ready}");
    assert_eq!(
        ready["pid"],
        worker.pid(),
        "fields are keys of the object: {ready}"
    );
    assert!(ready["timestamp"].is_string(), "{ready}");
    for line in lines.lock().unwrap().iter() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "every line is a JSON object, not: {line}"
        );
    }
    drop(worker);

    let (bad, lines) = wharf_integration::spawn_svc_logged(
        &["worker"],
        &[("NATS_URL", url.as_str()), ("WHARF_LOG_FORMAT", "xml")],
    );
    let status = bad.exit_status().await;
    assert!(
        !status.success(),
        "an unknown log format is a start-up error"
    );
    wharf::testing::eventually(
        "the worker to say what was wrong with WHARF_LOG_FORMAT",
        Duration::from_secs(10),
        || {
            let lines = lines.lock().unwrap().clone();
            async move {
                if lines
                    .iter()
                    .any(|l| l.contains("WHARF_LOG_FORMAT must be `text`") && l.contains("`xml`"))
                {
                    Ok(())
                } else {
                    Err(format!("its stderr: {lines:?}"))
                }
            }
        },
    )
    .await;
}
