//! Fault tests: real worker processes killed with real signals, a real
//! nats-server restarted under load. Each test prints what it saw (retries,
//! duplicates) so a run reports them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use wharf::testing::NatsServer;
use wharf::Client;
use wharf_integration::{
    crash_worker, echo_slowly, nested_deadline, sleep_ms, spawn_worker, spawn_worker_with, tally,
    wait_for_workers, WorkerProcess, TALLY_BUCKET,
};

/// Calls a [`load`] has completed so far.
type Progress = Arc<AtomicU64>;

/// Runs `calls` calls from `callers` concurrent tasks; `call(i)` makes call
/// `i` and returns the tries it took. Panics on the first failed call.
async fn load<F, Fut>(calls: u64, callers: u64, call: F) -> (u64, Duration)
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<u32, String>> + Send,
{
    load_counted(calls, callers, call, Progress::default()).await
}

/// [`load`], counting completed calls in `done` as it goes, so a test can
/// wait until the load is well under way before it injects a fault.
async fn load_counted<F, Fut>(calls: u64, callers: u64, call: F, done: Progress) -> (u64, Duration)
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<u32, String>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (next, retries, call, done) =
                (next.clone(), retries.clone(), call.clone(), done.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= calls {
                        return;
                    }
                    match call(i).await {
                        Ok(tries) => {
                            retries.fetch_add(u64::from(tries - 1), Ordering::Relaxed);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("call {i} failed: {e}"),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("no caller panicked");
    }
    (retries.load(Ordering::Relaxed), started.elapsed())
}

/// Waits (up to 60 s) until `done` counts at least `calls` completed calls.
async fn wait_for_progress(what: &str, done: &Progress, calls: u64) {
    wharf::testing::eventually(
        &format!("{calls} {what} calls to complete"),
        Duration::from_secs(60),
        || async {
            match done.load(Ordering::Relaxed) {
                n if n >= calls => Ok(()),
                n => Err(format!("{n} completed")),
            }
        },
    )
    .await;
}

/// Kills one of `workers` (round robin) every `every` and starts a new one
/// in its place, until `stop` is set; returns how many it killed.
fn kill_loop(
    url: String,
    mut workers: Vec<WorkerProcess>,
    every: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
    env: Vec<(&'static str, &'static str)>,
) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let mut kills = 0;
        let mut victim = 0;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(every);
            if stop.load(Ordering::Relaxed) {
                break;
            }
            workers[victim].kill(); // SIGKILL
            kills += 1;
            workers[victim] = spawn_worker_with(&url, &env);
            victim = (victim + 1) % workers.len();
        }
        kills
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_calls_survive_a_worker_killed_every_second() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let workers: Vec<_> = (0..3).map(|_| spawn_worker(&server.url())).collect();
    wait_for_workers(&client, 3).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = kill_loop(
        server.url(),
        workers,
        Duration::from_secs(1),
        stop.clone(),
        Vec::new(),
    );
    let (retries, took) = load(10_000, 64, move |i| {
        let client = client.clone();
        async move {
            let reply = echo_slowly::request(i, 20)
                .client(&client)
                .send_detailed()
                .await
                .map_err(|e| e.to_string())?;
            if reply.value != i {
                return Err(format!("wrong answer {} for {i}", reply.value));
            }
            Ok(reply.attempts)
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let kills = killer.join().unwrap();
    wharf_integration::report_line(format!(
        "REPORT idempotent under kills: 10000 calls ok in {took:?}, {kills} workers SIGKILLed, {retries} retries"
    ));
    assert!(kills >= 1, "the load outlasted at least one kill");
}

/// Reads how often each of `calls` tally calls ran.
async fn tally_runs(client: &Client, calls: u64) -> Vec<u64> {
    let js = async_nats::jetstream::new(client.nats().clone());
    let kv = js.get_key_value(TALLY_BUCKET).await.unwrap();
    let mut runs = Vec::with_capacity(calls as usize);
    for n in 0..calls {
        let value = kv.get(n.to_string()).await.unwrap();
        runs.push(
            value
                .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
                .unwrap_or(0),
        );
    }
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_calls_survive_every_worker_killed_mid_run() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    // A short ack wait, so calls held by killed workers come back quickly.
    let env = [("WHARF_ACK_WAIT", "1000")];
    let mut workers: Vec<_> = (0..3)
        .map(|_| spawn_worker_with(&server.url(), &env))
        .collect();
    wait_for_workers(&client, 3).await;
    let calls = 10_000;
    let done = Progress::default();
    let load = tokio::spawn({
        let client = client.clone();
        let done = done.clone();
        load_counted(
            calls,
            64,
            move |i| {
                let client = client.clone();
                async move {
                    let n = tally::request(i, 2)
                        .client(&client)
                        .await
                        .map_err(|e| e.to_string())?;
                    if n != i {
                        return Err(format!("wrong answer {n} for {i}"));
                    }
                    Ok(1)
                }
            },
            done,
        )
    });
    // Kill mid-run: once a tenth of the calls are done, every worker dies
    // (SIGKILL) with calls in its hands.
    wait_for_progress("durable", &done, calls / 10).await;
    for worker in &mut workers {
        worker.kill();
    }
    // Calls pile up with no worker at all until the server has seen every
    // killed connection go; only then do new workers start.
    server.wait_for_connections(1).await.unwrap();
    let _workers: Vec<_> = (0..3)
        .map(|_| spawn_worker_with(&server.url(), &env))
        .collect();
    let (_, took) = load.await.unwrap();
    let runs = tally_runs(&client, calls).await;
    let lost: Vec<u64> = (0..calls).filter(|n| runs[*n as usize] == 0).collect();
    let duplicates: u64 = runs.iter().map(|r| r.saturating_sub(1)).sum();
    wharf_integration::report_line(format!(
        "REPORT durable under kills: {calls} calls answered in {took:?}, every worker SIGKILLed once, {} lost, {duplicates} ran more than once",
        lost.len()
    ));
    assert!(lost.is_empty(), "calls that never ran: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_drained_during_load_fails_no_call() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let workers: Vec<_> = (0..3).map(|_| spawn_worker(&server.url())).collect();
    wait_for_workers(&client, 3).await;
    let drained = workers[0].pid();
    let done = Progress::default();
    let load = tokio::spawn({
        let client = client.clone();
        let done = done.clone();
        // Not idempotent: a lost call would fail, not be retried.
        load_counted(
            3_000,
            64,
            move |i| {
                let client = client.clone();
                async move {
                    let ms = sleep_ms::call(&client, 5 + i % 5)
                        .await
                        .map_err(|e| e.to_string())?;
                    assert_eq!(ms, 5 + i % 5);
                    Ok(1)
                }
            },
            done,
        )
    });
    wait_for_progress("plain", &done, 300).await;
    wharf_integration::signal(drained, libc::SIGTERM);
    load.await.expect("every call succeeded");
    let mut workers = workers.into_iter();
    let status = workers.next().unwrap().exit_status().await;
    assert!(
        status.success(),
        "the drained worker exits cleanly: {status}"
    );
    wharf_integration::report_line(format!(
        "REPORT drain under load: 3000 calls, 0 failed, worker {drained} drained"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_under_load_loses_nothing() {
    let mut server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _workers: Vec<_> = (0..2)
        .map(|_| spawn_worker_with(&server.url(), &[("WHARF_ACK_WAIT", "2000")]))
        .collect();
    wait_for_workers(&client, 2).await;
    let (core_done, durable_done) = (Progress::default(), Progress::default());
    let core = tokio::spawn({
        let client = client.clone();
        let done = core_done.clone();
        load_counted(
            4_000,
            32,
            move |i| {
                let client = client.clone();
                async move {
                    let reply = echo_slowly::request(i, 2)
                        .client(&client)
                        .retry(wharf::RetryPolicy::attempts(30).unwrap())
                        .send_detailed()
                        .await
                        .map_err(|e| e.to_string())?;
                    assert_eq!(reply.value, i);
                    Ok(reply.attempts)
                }
            },
            done,
        )
    });
    let durable = tokio::spawn({
        let client = client.clone();
        let done = durable_done.clone();
        load_counted(
            2_000,
            32,
            move |i| {
                let client = client.clone();
                async move {
                    let n = tally::request(i, 2)
                        .client(&client)
                        .retry(wharf::RetryPolicy::attempts(30).unwrap())
                        .await
                        .map_err(|e| e.to_string())?;
                    assert_eq!(n, i);
                    Ok(1)
                }
            },
            done,
        )
    });
    // Restart with both loads under way and far from done.
    wait_for_progress("core", &core_done, 400).await;
    wait_for_progress("durable", &durable_done, 100).await;
    server.restart().unwrap();
    let (core_retries, core_took) = core.await.expect("core calls resumed");
    let (_, durable_took) = durable.await.expect("durable calls completed");
    let runs = tally_runs(&client, 2_000).await;
    let lost = runs.iter().filter(|r| **r == 0).count();
    let duplicates: u64 = runs.iter().map(|r| r.saturating_sub(1)).sum();
    wharf_integration::report_line(format!(
        "REPORT broker restart: 4000 core calls in {core_took:?} with {core_retries} retries; 2000 durable calls in {durable_took:?}, {lost} lost, {duplicates} duplicates"
    ));
    assert_eq!(lost, 0, "no durable call lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_kills_every_worker_ends_in_the_dead_letter_stream() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let env = [("WHARF_ACK_WAIT", "500"), ("WHARF_MAX_DELIVER", "2")];
    let mut worker = spawn_worker_with(&server.url(), &env);
    wait_for_workers(&client, 1).await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { crash_worker::request().client(&client).await }
    });
    let mut restarts = 0;
    let until = Instant::now() + Duration::from_secs(120);
    while !call.is_finished() {
        assert!(
            Instant::now() < until,
            "the poisonous call did not end within 120 s; {restarts} workers restarted so far"
        );
        if !wharf_integration::alive(worker.pid()) {
            // The supervisor's job, done by hand here.
            worker = spawn_worker_with(&server.url(), &env);
            restarts += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let error = call.await.unwrap().unwrap_err();
    assert_eq!(error.kind(), wharf::ErrorKind::DeadLetter, "{error}");
    assert!(error.message().contains("delivered 3 times"), "{error}");
    assert!(error.message().contains("wharf_dead_letters"), "{error}");
    assert_eq!(restarts, 2, "two deliveries killed two workers");
    wharf_integration::report_line(format!(
        "REPORT poisonous durable call: dead-lettered after {restarts} workers died running it"
    ));
}

#[tokio::test]
async fn nested_calls_inherit_the_callers_deadline() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;
    let now_ms = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let before = now_ms();
    let seen = nested_deadline::request()
        .client(&client)
        .timeout(Duration::from_secs(2))
        .await
        .unwrap();
    // The inner call's own timeout is 30 s; it ran under the outer 2 s.
    assert!(seen >= before + 1_900, "deadline {seen} too early");
    assert!(seen <= now_ms() + 2_000, "deadline {seen} not inherited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_connection_is_lost_does_not_wait_out_its_deadline() {
    let mut server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;
    // In flight when the server goes: one call that may not be retried
    // (30 s deadline), one idempotent call.
    let plain = tokio::spawn({
        let client = client.clone();
        async move {
            let started = Instant::now();
            let outcome = sleep_ms::request(5_000)
                .client(&client)
                .timeout(Duration::from_secs(30))
                .await;
            (outcome, started.elapsed())
        }
    });
    let idempotent = tokio::spawn({
        let client = client.clone();
        async move {
            echo_slowly::request(7, 1_500)
                .client(&client)
                .timeout(Duration::from_secs(30))
                .await
        }
    });
    wharf::testing::eventually(
        "both calls to reach the worker",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            async move {
                let held = wharf_integration::in_flight(&client, "itest").await;
                if held >= 2 {
                    Ok(())
                } else {
                    Err(format!("{held} in flight"))
                }
            }
        },
    )
    .await;
    let restarted = Instant::now();
    server.restart().unwrap();
    let (outcome, took) = plain.await.unwrap();
    let error = outcome.expect_err("the reply cannot come on the lost connection");
    assert_eq!(error.kind(), wharf::ErrorKind::ConnectionLost, "{error}");
    assert!(error.message().contains("may have run"), "{error}");
    let after_restart = restarted.elapsed().min(took);
    wharf_integration::report_line(format!(
        "REPORT connection lost: a non-idempotent call failed as connection_lost {} ms after the restart began (deadline 30 s)",
        after_restart.as_millis()
    ));
    assert!(
        took < Duration::from_secs(20),
        "it waited {took:?}, nearly its whole deadline"
    );
    // The idempotent one went on through the new connection.
    assert_eq!(idempotent.await.unwrap().unwrap(), 7);
}
