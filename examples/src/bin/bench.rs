//! wharf against raw async-nats request-reply, in one run.
//!
//! `cargo run --release -p wharf-examples --bin bench` starts a nats-server,
//! two raw responder processes (one spawns a task per request, one answers
//! inside its subscription loop: the two ways a user writes one) and one
//! wharf worker process, then measures in interleaved rounds: serial
//! latency (p50/p99, the sides' calls interleaved one by one) and calls/s at
//! 16 and 256 calls in flight. Both sides move the same postcard payload, `(i64, i64)`
//! in and `i64` out. It also measures a wharf worker's start-to-ready time
//! and its idle RSS, robust-call variants against plain calls, and stateful
//! calls (in a transaction) against stateless ones. `--quick` runs a short
//! smoke version, `--focus` only the 256-in-flight throughput, `--serial`
//! only serial latency, with each side's context switches, system calls and
//! CPU per call (`--serial wharf`, `raw` or `raw-inline`: that side's serial
//! calls alone for 30 s, for a profiler), `--stateful` only the stateful comparison, `--tls` calls/s at 16 and 256 in flight
//! over plain TCP and over TLS (a second server, certificates made for the
//! run), raw and wharf on each, in interleaved rounds; `--auth` the same
//! with a user and password in place of TLS; `--metrics` the same with
//! Prometheus metrics on (worker and caller) in place of TLS; `--otel` (built
//! with `--features otel`) the same with wharf's spans exported over OTLP at
//! 1% sampling (worker and caller), to `OTEL_EXPORTER_OTLP_ENDPOINT` or, when
//! that is unset, to the receiver of integration/python/otlp_receiver.py.
//! `--routing` measures what routing by signature costs: plain calls, one
//! message each, on the signature's subject against the plain subject.
//! `--cancel` measures cancellation: a call tree of depth 3 over three
//! worker processes, dropped at the top once its last level runs, timed
//! until every level has told the caller it stopped.

use bytes::Bytes;
use futures_util::StreamExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use wharf::testing::NatsServer;
use wharf_examples::{cpu_ticks, median, ratio_row, rss_kib, spawn_self, Samples};

/// The function under test: the same work the raw responder does.
#[wharf::microservice(service = "bench")]
pub async fn add(a: i64, b: i64) -> i64 {
    a.wrapping_add(b)
}

/// The same function marked idempotent: its calls are watched by probes
/// and their results kept when a caller shows it may retry.
#[wharf::microservice(service = "bench", idempotent)]
pub async fn add_idempotent(a: i64, b: i64) -> i64 {
    a.wrapping_add(b)
}

/// Hangs in the process `pid`, answers at once anywhere else: a call that
/// only another worker can complete.
#[wharf::microservice(service = "bench", idempotent, timeout = "60s")]
pub async fn stall(pid: u32) -> u32 {
    if std::process::id() == pid {
        tokio::time::sleep(Duration::from_secs(120)).await;
    }
    std::process::id()
}

/// The same sum as a stateful function: it runs in a transaction, on the
/// instance that owns it, and counts its calls in the transaction's state.
#[wharf::microservice(service = "bench", stateful)]
pub async fn add_stateful(a: i64, b: i64, calls: wharf::State<u64>) -> i64 {
    let mut calls = calls;
    *calls += 1;
    a.wrapping_add(b)
}

/// Where [`chain`] tells the caller what its levels do: `started <level>`
/// and `stopped <level>` on `bench.chain.<run>`.
fn chain_subject(run: u32) -> String {
    format!("bench.chain.{run}")
}

/// Publishes `text` on `subject` through the worker's connection, from a
/// task of its own (Drop cannot await).
fn tell(subject: String, text: String) {
    let Ok(client) = wharf::client() else { return };
    let nats = client.nats().clone();
    tokio::spawn(async move {
        let _ = nats.publish(subject, text.into()).await;
        let _ = nats.flush().await;
    });
}

/// Tells that a level stopped, when its call's future is dropped.
struct ChainLevel(u32, u32);

impl Drop for ChainLevel {
    fn drop(&mut self) {
        tell(chain_subject(self.0), format!("stopped {}", self.1));
    }
}

/// One level of a call tree that runs until cancelled: levels below 3 call
/// the next one, level 3 waits.
#[wharf::microservice(service = "bench", timeout = "60s")]
pub async fn chain(run: u32, level: u32) -> u32 {
    let _level = ChainLevel(run, level);
    tell(
        chain_subject(run),
        format!("started {level} {}", std::process::id()),
    );
    if level < 3 {
        chain(run, level + 1).await.unwrap_or(0)
    } else {
        tokio::time::sleep(Duration::from_secs(60)).await;
        level
    }
}

/// Open transactions the stateful calls take turns on: as many as calls in
/// flight, so calls of one transaction rarely wait for each other.
static TXNS: OnceLock<Vec<wharf::Transaction>> = OnceLock::new();
static NEXT_TXN: AtomicUsize = AtomicUsize::new(0);

const RAW_SUBJECT: &str = "raw.bench.add";
const RAW_INLINE_SUBJECT: &str = "raw.bench.add.inline";

struct Plan {
    rounds: usize,
    serial_calls: usize,
    parallel_calls: usize,
    spawn_samples: usize,
}

#[wharf::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (quick, focus, stateful_only) = match args.next().as_deref() {
        Some("raw-worker") => return raw_worker(false).await,
        Some("raw-inline-worker") => return raw_worker(true).await,
        Some("--quick") => (true, false, false),
        Some("--focus") => (false, true, false),
        Some("--stateful") => (false, true, true),
        Some("--tls") => return comparison(Secured::Tls).await,
        Some("--auth") => return comparison(Secured::Creds).await,
        Some("--metrics") => return comparison(Secured::Metrics).await,
        Some("--otel") => return comparison(Secured::Otel).await,
        Some("--cancel") => return cancel_latency().await,
        Some("--durable") => return durable_against_plain().await,
        Some("--routing") => return routing_against_plain_subject().await,
        Some("--serial") => return serial_profile(args.next()).await,
        None => (false, false, false),
        Some(other) => {
            return Err(format!(
                "unknown argument `{other}`; use --quick, --focus, --stateful, --serial, --durable, --routing, --cancel, --tls, --auth, --metrics, --otel or nothing"
            )
            .into())
        }
    };
    let plan = if quick {
        Plan {
            rounds: 1,
            serial_calls: 200,
            parallel_calls: 2_000,
            spawn_samples: 2,
        }
    } else {
        Plan {
            rounds: 7,
            serial_calls: 5_000,
            parallel_calls: 60_000,
            spawn_samples: 10,
        }
    };

    let Run {
        server,
        url,
        nats,
        client,
        mut raw,
        mut raw_inline,
        mut worker,
    } = Run::start().await?;
    // The first durable call sets up the client's JetStream state.
    Side::Durable
        .call(&nats, &client)
        .await
        .map_err(|e| e.to_string())?;
    // Transactions for the stateful calls, each claimed by its first call.
    let mut txns = Vec::new();
    for _ in 0..256 {
        let tx = client.transaction().await?;
        add_stateful::request(1, 1).transaction(&tx).await?;
        txns.push(tx);
    }
    let _ = TXNS.set(txns);

    let mut results: Vec<(&str, &str, Vec<f64>)> = Vec::new();
    let mut record = |metric: &'static str, side: &'static str, value: f64| match results
        .iter_mut()
        .find(|(m, s, _)| *m == metric && *s == side)
    {
        Some((_, _, values)) => values.push(value),
        None => results.push((metric, side, vec![value])),
    };

    for round in 0..plan.rounds {
        eprintln!("round {} of {}", round + 1, plan.rounds);
        // Rotate which side goes first, so none always runs on a system
        // still busy with another's load.
        let mut sides = [Side::Raw, Side::RawInline, Side::Wharf];
        sides.rotate_left(round % 3);
        if !focus {
            // Call by call, in turn: each side sees the same machine.
            let latencies = serial_interleaved(plan.serial_calls, &sides, &nats, &client).await?;
            for (side, (p50, p99)) in sides.into_iter().zip(latencies) {
                record("serial p50 (µs)", side.name(), p50);
                record("serial p99 (µs)", side.name(), p99);
            }
        }
        let loads: &[(&'static str, usize)] = if stateful_only {
            &[]
        } else if focus {
            &[("calls/s, 256 in flight", 256)]
        } else {
            &[
                ("calls/s, 16 in flight", 16),
                ("calls/s, 256 in flight", 256),
            ]
        };
        for &(metric, in_flight) in loads {
            for side in sides {
                let pids = [
                    server.pid(),
                    match side {
                        Side::Raw => raw.id(),
                        Side::RawInline => raw_inline.id(),
                        _ => worker.id(),
                    },
                    std::process::id(),
                ];
                let (syscalls_before, messages_before) = (syscalls(&pids), server.messages()?);
                let (rate, cpu) =
                    measure(side, &nats, &client, plan.parallel_calls, in_flight, &pids).await?;
                record(metric, side.name(), rate);
                record_cpu(&mut record, in_flight, side.name(), cpu);
                if in_flight == 256 {
                    // What bounds a call: its messages through the server
                    // and each process's socket reads and writes.
                    // Per 100 calls: one decimal still shows a fraction
                    // of one per call.
                    let per_call = |n: u64| n as f64 * 100.0 / plan.parallel_calls as f64;
                    let (received, sent) = server.messages()?;
                    record(
                        "server messages per 100 calls (in + out), 256 in flight",
                        side.name(),
                        per_call(received + sent - messages_before.0 - messages_before.1),
                    );
                    let names = [
                        "read/write syscalls per 100 calls, server, 256 in flight",
                        "read/write syscalls per 100 calls, worker, 256 in flight",
                        "read/write syscalls per 100 calls, caller, 256 in flight",
                    ];
                    for ((name, after), before) in
                        names.into_iter().zip(syscalls(&pids)).zip(syscalls_before)
                    {
                        record(name, side.name(), per_call(after - before));
                    }
                }
            }
        }
        if !focus || stateful_only {
            // Stateful calls against the same function stateless.
            let sides = if round % 2 == 0 {
                [Side::Wharf, Side::Stateful]
            } else {
                [Side::Stateful, Side::Wharf]
            };
            let latencies = serial_interleaved(plan.serial_calls, &sides, &nats, &client).await?;
            for (side, (p50, p99)) in sides.into_iter().zip(latencies) {
                record(STATEFUL_METRICS[0], side.pairing(), p50);
                record(STATEFUL_METRICS[1], side.pairing(), p99);
            }
            for (metric, in_flight) in [(STATEFUL_METRICS[2], 16), (STATEFUL_METRICS[3], 256)] {
                for side in sides {
                    let pids = [server.pid(), worker.id(), std::process::id()];
                    let (rate, cpu) =
                        measure(side, &nats, &client, plan.parallel_calls, in_flight, &pids)
                            .await?;
                    record(metric, side.pairing(), rate);
                    if in_flight == 256 {
                        for (name, value) in STATEFUL_CPU.into_iter().zip(cpu) {
                            record(name, side.pairing(), value);
                        }
                    }
                }
            }
        }
        if !focus {
            // Robust-call variants against plain wharf calls, 256 in flight.
            // Durable calls are slower, so they make fewer calls.
            // Rotated each round, so no variant always runs first or last.
            let mut variants = [
                Side::Wharf,
                Side::Requested,
                Side::NoRetry,
                Side::Idempotent,
                Side::Durable,
            ];
            let turn = round % variants.len();
            variants.rotate_left(turn);
            for side in variants {
                let calls = if matches!(side, Side::Durable) {
                    plan.parallel_calls / 3
                } else {
                    plan.parallel_calls
                };
                let pids = [server.pid(), worker.id(), std::process::id()];
                let (rate, cpu) = measure(side, &nats, &client, calls, 256, &pids).await?;
                record(ROBUST_METRIC, side.name(), rate);
                record(ROBUST_CPU, side.name(), cpu.iter().sum());
            }
        }
    }

    let busy_rss = rss_kib(worker.id());
    stop(&mut raw);
    stop(&mut raw_inline);
    stop(&mut worker);

    let of_metric = |metric: &str, side: &str| {
        results
            .iter()
            .find(|(m, s, _)| *m == metric && *s == side)
            .map(|(_, _, values)| values.clone())
            .unwrap_or_default()
    };
    if !focus || stateful_only {
        println!("| stateful call (in a transaction) vs stateless | stateless | stateful | stateful / stateless | per-round ratio, min to max |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for metric in STATEFUL_METRICS.into_iter().chain(STATEFUL_CPU) {
            println!(
                "{}",
                ratio_row(
                    metric,
                    &of_metric(metric, "stateless"),
                    &of_metric(metric, "stateful")
                )
            );
        }
        println!();
        if stateful_only {
            stop(&mut raw);
            stop(&mut worker);
            println!(
                "rounds: {}, serial calls per round: {}, calls per throughput run: {}, medians over rounds",
                plan.rounds, plan.serial_calls, plan.parallel_calls
            );
            return Ok(());
        }
    }

    let failover_ms = if focus {
        Vec::new()
    } else {
        failover(&url, &nats, &client, plan.spawn_samples.min(5)).await?
    };

    // A fresh worker: time from spawn to serving, then its idle RSS.
    let mut ready_ms = Vec::new();
    let mut idle_rss = Vec::new();
    for _ in 0..plan.spawn_samples {
        let started = Instant::now();
        let mut fresh = spawn_ready_worker(&nats, &url).await?;
        ready_ms.push(started.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(500)).await;
        idle_rss.push(rss_kib(fresh.id()) as f64 / 1024.0);
        stop(&mut fresh);
    }

    println!("| metric | raw async-nats | wharf | wharf / raw | per-round ratio, min to max |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let metrics: Vec<&str> = results
        .iter()
        .filter(|(_, side, _)| *side == "raw")
        .map(|(m, _, _)| *m)
        .collect();
    for metric in &metrics {
        println!(
            "{}",
            ratio_row(
                metric,
                &of_metric(metric, "raw"),
                &of_metric(metric, "wharf")
            )
        );
    }
    println!();
    println!("| metric | raw async-nats, inline | wharf | wharf / raw inline | per-round ratio, min to max |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for metric in &metrics {
        println!(
            "{}",
            ratio_row(
                metric,
                &of_metric(metric, "raw inline"),
                &of_metric(metric, "wharf")
            )
        );
    }
    if !focus {
        println!();
        println!("| robust calls, 256 in flight | calls/s | / plain wharf call | per-round ratio, min to max | CPU µs/call, all processes |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        let of = |side: &str| of_metric(ROBUST_METRIC, side);
        let plain = of("wharf");
        for (side, label) in [
            ("wharf", "plain call, `add::call(&client, ..)`"),
            (
                "requested",
                "plain call through the builder, `add::request(..).client(..)`",
            ),
            ("no-retry", "the same with `.retry(RetryPolicy::NONE)`"),
            ("idempotent", "idempotent function"),
            ("durable", "durable call (JetStream)"),
        ] {
            let values = of(side);
            let ratios: Vec<f64> = values.iter().zip(&plain).map(|(v, p)| v / p).collect();
            let low = ratios.iter().cloned().fold(f64::INFINITY, f64::min);
            let high = ratios.iter().cloned().fold(0.0, f64::max);
            println!(
                "| {label} | {:.1} | {:.3} | {low:.3} to {high:.3} | {:.1} |",
                median(&values),
                median(&values) / median(&plain),
                median(&of_metric(ROBUST_CPU, side)),
            );
        }
        println!();
        println!("| failover | median | max |");
        println!("| --- | ---: | ---: |");
        println!(
            "| worker SIGKILLed mid-call to the retry answered by another (ms) | {:.0} | {:.0} |",
            median(&failover_ms),
            failover_ms.iter().cloned().fold(0.0, f64::max)
        );
    }
    println!();
    println!("| worker | median | max |");
    println!("| --- | ---: | ---: |");
    println!(
        "| start to ready (ms) | {:.1} | {:.1} |",
        median(&ready_ms),
        ready_ms.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "| idle RSS (MiB) | {:.1} | {:.1} |",
        median(&idle_rss),
        idle_rss.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "| RSS after the load runs (MiB) | {:.1} | |",
        busy_rss as f64 / 1024.0
    );
    println!();
    println!(
        "rounds: {}, serial calls per round: {}, calls per throughput run: {}, medians over rounds",
        plan.rounds, plan.serial_calls, plan.parallel_calls
    );
    Ok(())
}

const ROBUST_METRIC: &str = "robust calls/s, 256 in flight";
const ROBUST_CPU: &str = "robust CPU µs/call, 256 in flight";
const STATEFUL_CPU: [&str; 3] = [
    "CPU µs/call at 256 in flight, server",
    "CPU µs/call at 256 in flight, worker",
    "CPU µs/call at 256 in flight, caller",
];
const STATEFUL_METRICS: [&str; 4] = [
    "serial p50 (µs)",
    "serial p99 (µs)",
    "calls/s, 16 in flight",
    "calls/s, 256 in flight",
];

/// The things compared: raw async-nats, and wharf calls of several kinds.
#[derive(Clone, Copy)]
enum Side {
    Raw,
    RawInline,
    Wharf,
    /// A plain async-nats request written from docs/protocol.md (envelope
    /// and arguments on the function's signature subject) to the wharf
    /// worker: what the worker alone costs, without wharf's caller.
    RawToWharf,
    Requested,
    NoRetry,
    Idempotent,
    Durable,
    Stateful,
    /// Not a call: one raw JetStream store of a result-sized record under
    /// a new key, as a KV create, the part of a durable call no batching
    /// can share.
    RawStore,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Raw => "raw",
            Side::RawInline => "raw inline",
            Side::Wharf => "wharf",
            Side::RawToWharf => "raw to wharf",
            Side::Requested => "requested",
            Side::NoRetry => "no-retry",
            Side::Idempotent => "idempotent",
            Side::Durable => "durable",
            Side::Stateful => "stateful",
            Side::RawStore => "raw store",
        }
    }

    /// Its name in the stateful-against-stateless comparison.
    fn pairing(self) -> &'static str {
        match self {
            Side::Stateful => "stateful",
            _ => "stateless",
        }
    }

    async fn call(self, nats: &async_nats::Client, client: &wharf::Client) -> CallResult {
        match self {
            Side::Raw => raw_call(nats).await,
            Side::RawInline => raw_call_to(nats, RAW_INLINE_SUBJECT).await,
            Side::Wharf => wharf_call(client).await,
            Side::RawToWharf => raw_to_wharf(nats, client).await,
            Side::Requested => check(add::request(20, 22).client(client).await?),
            Side::NoRetry => check(
                add::request(20, 22)
                    .client(client)
                    .retry(wharf::RetryPolicy::NONE)
                    .await?,
            ),
            Side::Idempotent => check(add_idempotent::call(client, 20, 22).await?),
            Side::Durable => check(add::request(20, 22).client(client).durable(true).await?),
            Side::RawStore => raw_store(nats).await,
            Side::Stateful => {
                let txns = TXNS.get().expect("transactions are opened first");
                let tx = &txns[NEXT_TXN.fetch_add(1, Ordering::Relaxed) % txns.len()];
                check(add_stateful::request(20, 22).transaction(tx).await?)
            }
        }
    }
}

/// A wharf worker process, returned once it reports ready.
async fn spawn_ready_worker(
    nats: &async_nats::Client,
    url: &str,
) -> Result<Child, Box<dyn std::error::Error>> {
    let subject = format!("_BENCH.ready.{}", nats.new_inbox());
    let mut ready = nats.subscribe(subject.clone()).await?;
    nats.flush().await?;
    let child = spawn_self(
        url,
        &[],
        &[("WHARF_ROLE", "worker"), ("WHARF_READY_SUBJECT", &subject)],
    )?;
    tokio::time::timeout(Duration::from_secs(10), ready.next())
        .await
        .map_err(|_| "a worker did not report ready within 10 s")?;
    Ok(child)
}

/// Time from SIGKILL of the worker holding an idempotent call to the
/// call's answer from another worker, `samples` times.
async fn failover(
    url: &str,
    nats: &async_nats::Client,
    client: &wharf::Client,
    samples: usize,
) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let mut other = spawn_ready_worker(nats, url).await?;
    let mut times = Vec::new();
    while times.len() < samples {
        let mut victim = spawn_ready_worker(nats, url).await?;
        let victim_pid = victim.id();
        // Until a call lands on the victim (the other answers at once).
        let held = loop {
            let call = tokio::spawn({
                let client = client.clone();
                async move { stall::call(&client, victim_pid).await }
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
            if call.is_finished() {
                call.await??;
            } else {
                break call;
            }
        };
        let killed = Instant::now();
        stop(&mut victim);
        let served_by = held.await??;
        times.push(killed.elapsed().as_secs_f64() * 1e3);
        if served_by != other.id() {
            return Err(format!(
                "the retried call was served by {served_by}, not by the other worker"
            )
            .into());
        }
    }
    stop(&mut other);
    Ok(times)
}

/// One raw request to the task-per-request responder.
async fn raw_call(
    nats: &async_nats::Client,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    raw_call_to(nats, RAW_SUBJECT).await
}

/// One raw request: postcard `(i64, i64)` out, postcard `i64` back.
async fn raw_call_to(
    nats: &async_nats::Client,
    subject: &'static str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let payload = postcard::to_allocvec(&(20i64, 22i64))?;
    let reply = nats.request(subject, payload.into()).await?;
    let sum: i64 = postcard::from_bytes(&reply.payload)?;
    check(sum)
}

/// The KV bucket the raw store side writes to.
const RAW_STORE_BUCKET: &str = "bench_raw_store";

/// Keys of the raw store side: each store writes a key never used before.
static NEXT_KEY: AtomicUsize = AtomicUsize::new(0);

/// One raw KV create, written the plain async-nats way: publish with
/// `Nats-Expected-Last-Subject-Sequence: 0` and wait for the server's ack.
async fn raw_store(nats: &async_nats::Client) -> CallResult {
    static JS: OnceLock<async_nats::jetstream::Context> = OnceLock::new();
    let js = JS.get_or_init(|| async_nats::jetstream::new(nats.clone()));
    let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload(Bytes::from_static(&[0, 0, 0, 42]))
        .expected_last_subject_sequence(0);
    js.send_publish(format!("$KV.{RAW_STORE_BUCKET}.k{key}"), publish)
        .await?
        .await?;
    Ok(())
}

/// One call of `add` to the wharf worker by a hand-written caller: the
/// postcard envelope (signature, deadline, a call id) in front of the
/// arguments, one async-nats request, the postcard answer back.
async fn raw_to_wharf(nats: &async_nats::Client, client: &wharf::Client) -> CallResult {
    use wharf::wire::envelope::{Envelope, ENVELOPE_VERSION};
    static SUBJECT: OnceLock<async_nats::Subject> = OnceLock::new();
    static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
    let subject = SUBJECT.get_or_init(|| add::SPEC.signed_subject(client.prefix()));
    let deadline = std::time::SystemTime::now() + Duration::from_secs(30);
    let deadline_ms = deadline.duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    let id = format!("bench{:017}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let envelope = Envelope {
        version: ENVELOPE_VERSION,
        sig: add::SPEC.sig,
        deadline_ms,
        call_id: id.as_bytes(),
        attempt: 1,
        flags: 0,
    };
    let payload = postcard::to_extend(&(20i64, 22i64), postcard::to_allocvec(&envelope)?)?;
    let reply = nats.request(subject.clone(), payload.into()).await?;
    let sum: i64 = postcard::from_bytes(&reply.payload)?;
    check(sum)
}

async fn wharf_call(
    client: &wharf::Client,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let sum = add::call(client, 20, 22).await?;
    check(sum)
}

fn check(sum: i64) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if sum == 42 {
        Ok(())
    } else {
        Err(format!("wrong sum {sum}").into())
    }
}

type CallResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Serial latency of each of `sides`, p50 and p99 in microseconds: `calls`
/// calls each, one side's call after another's, so a machine that slows
/// down or speeds up in the middle of a run does so for every side alike
/// (side after side, the per-round ratio of two identical sides spans
/// about 0.9 to 1.2 on a busy two-core machine).
async fn serial_interleaved(
    calls: usize,
    sides: &[Side],
    nats: &async_nats::Client,
    client: &wharf::Client,
) -> Result<Vec<(f64, f64)>, Box<dyn std::error::Error>> {
    let mut samples = vec![Vec::with_capacity(calls); sides.len()];
    for _ in 0..calls {
        for (side, samples) in sides.iter().zip(&mut samples) {
            let start = Instant::now();
            side.call(nats, client).await.map_err(|e| e.to_string())?;
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(samples.into_iter().map(percentiles).collect())
}

/// p50 and p99 of `samples`.
fn percentiles(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.50), at(0.99))
}

/// Calls/s of `side` with `in_flight` callers sharing `calls` calls, and
/// the CPU µs per call of each of `pids` (server, worker, caller).
async fn measure(
    side: Side,
    nats: &async_nats::Client,
    client: &wharf::Client,
    calls: usize,
    in_flight: usize,
    pids: &[u32],
) -> Result<(f64, [f64; 3]), Box<dyn std::error::Error>> {
    let cpu_before = cpu_ticks(pids);
    let rate = throughput(calls, in_flight, side, nats, client).await?;
    Ok((rate, cpu_per_call(cpu_before, pids, calls)))
}

/// Calls per second of `side` with `in_flight` callers sharing `calls`
/// calls. Each caller holds its own clients, cloned once, so the loop
/// measures calls and not the clients' clones.
async fn throughput(
    calls: usize,
    in_flight: usize,
    side: Side,
    nats: &async_nats::Client,
    client: &wharf::Client,
) -> Result<f64, Box<dyn std::error::Error>> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(in_flight);
    for _ in 0..in_flight {
        let next = next.clone();
        let (nats, client) = (nats.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                side.call(&nats, &client).await?;
            }
            CallResult::Ok(())
        }));
    }
    for task in tasks {
        task.await?.map_err(|e| e.to_string())?;
    }
    Ok(calls as f64 / start.elapsed().as_secs_f64())
}

/// Read and write system calls each of `pids` has made so far
/// (`/proc/<pid>/io`: `syscr` + `syscw`).
fn syscalls(pids: &[u32; 3]) -> [u64; 3] {
    pids.map(|pid| {
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
        io.lines()
            .filter(|line| line.starts_with("syscr:") || line.starts_with("syscw:"))
            .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum()
    })
}

/// CPU microseconds per call of each pid since `before`.
fn cpu_per_call(before: Vec<u64>, pids: &[u32], calls: usize) -> [f64; 3] {
    let after = cpu_ticks(pids);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut out = [0.0; 3];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = (after[i].saturating_sub(before[i])) as f64 / hz * 1e6 / calls as f64;
    }
    out
}

fn record_cpu(
    record: &mut impl FnMut(&'static str, &'static str, f64),
    in_flight: usize,
    side: &'static str,
    cpu: [f64; 3],
) {
    let names: [&'static str; 3] = if in_flight == 16 {
        [
            "CPU µs/call, server, 16 in flight",
            "CPU µs/call, worker, 16 in flight",
            "CPU µs/call, caller, 16 in flight",
        ]
    } else {
        [
            "CPU µs/call, server, 256 in flight",
            "CPU µs/call, worker, 256 in flight",
            "CPU µs/call, caller, 256 in flight",
        ]
    };
    for (name, value) in names.into_iter().zip(cpu) {
        record(name, side, value);
    }
}

/// What a run compares: a nats-server, the two raw responders and the wharf
/// worker, each its own process, and this process's connections.
struct Run {
    server: NatsServer,
    url: String,
    nats: async_nats::Client,
    client: wharf::Client,
    raw: Child,
    raw_inline: Child,
    worker: Child,
}

impl Run {
    /// Starts them all and returns once each responder answers.
    async fn start() -> Result<Run, Box<dyn std::error::Error>> {
        let server = NatsServer::start()?;
        let url = server.url();
        let nats = async_nats::connect(&url).await?;
        let client = wharf::Client::connect(&url).await?;
        let raw = spawn_self(&url, &["raw-worker"], &[])?;
        let raw_inline = spawn_self(&url, &["raw-inline-worker"], &[])?;
        let worker = spawn_self(&url, &[], &[("WHARF_ROLE", "worker")])?;
        wait_until_served(&nats, &client, &[Side::Raw, Side::RawInline, Side::Wharf]).await?;
        Ok(Run {
            server,
            url,
            nats,
            client,
            raw,
            raw_inline,
            worker,
        })
    }

    /// The process that answers `side`'s calls.
    fn pid_of(&self, side: Side) -> u32 {
        match side {
            Side::Raw => self.raw.id(),
            Side::RawInline => self.raw_inline.id(),
            _ => self.worker.id(),
        }
    }

    /// Stops the responders (the server stops when dropped).
    fn stop(&mut self) {
        stop(&mut self.raw);
        stop(&mut self.raw_inline);
        stop(&mut self.worker);
    }
}

/// What one serial call costs each process, by /proc: context switches
/// (each one a sleep and a wake-up on the call's path), read and write
/// system calls, and CPU time, summed over the process's threads.
#[derive(Clone, Copy, Default)]
struct Costs {
    switches: u64,
    syscalls: u64,
    cpu_ns: u64,
}

impl Costs {
    fn of(pid: u32) -> Costs {
        let mut costs = Costs {
            syscalls: syscalls(&[pid, pid, pid])[0],
            ..Costs::default()
        };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return costs;
        };
        for task in tasks.flatten() {
            let path = task.path();
            let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
            costs.switches += status
                .lines()
                .filter(|line| line.contains("ctxt_switches:"))
                .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
            // The first field: nanoseconds on a CPU.
            let schedstat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
            costs.cpu_ns += schedstat
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse::<u64>().ok())
                .unwrap_or(0);
        }
        costs
    }

    /// Per call, from `before` to now.
    fn per_call(pid: u32, before: Costs, calls: usize) -> [f64; 3] {
        let now = Costs::of(pid);
        let per = |after: u64, before: u64| after.saturating_sub(before) as f64 / calls as f64;
        [
            per(now.switches, before.switches),
            per(now.syscalls, before.syscalls),
            per(now.cpu_ns, before.cpu_ns) / 1e3,
        ]
    }
}

/// `--serial`: serial latency alone, the three sides interleaved call by
/// call over more rounds than the full run, then where a serial call's time
/// goes: per call and per process (server, responder, caller), its context
/// switches, read/write system calls and CPU µs, each side alone.
async fn serial_profile(alone: Option<String>) -> Result<(), Box<dyn std::error::Error>> {
    const ROUNDS: usize = 9;
    const CALLS: usize = 5_000;
    let mut run = Run::start().await?;
    let (server, nats, client) = (&run.server, &run.nats, &run.client);
    let sides = [Side::Raw, Side::RawInline, Side::Wharf, Side::RawToWharf];
    if let Some(name) = alone {
        // One side's serial calls for 30 s, for a profiler to attach to
        // the processes named here.
        let side = sides
            .into_iter()
            .find(|side| side.name().replace(' ', "-") == name)
            .ok_or_else(|| {
                format!("unknown side `{name}`; use raw, raw-inline, wharf or raw-to-wharf")
            })?;
        eprintln!(
            "serial calls of {name} for 30 s: caller {}, responder {}, server {}",
            std::process::id(),
            run.pid_of(side),
            server.pid()
        );
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            side.call(nats, client).await.map_err(|e| e.to_string())?;
        }
        run.stop();
        return Ok(());
    }
    let mut results = Samples::default();
    const MESSAGES: &str = "messages per call through the server, in and out";
    const COSTS: [[&str; 3]; 3] = [
        [
            "context switches per call, server",
            "read/write syscalls per call, server",
            "CPU µs per call, server",
        ],
        [
            "context switches per call, responder",
            "read/write syscalls per call, responder",
            "CPU µs per call, responder",
        ],
        [
            "context switches per call, caller",
            "read/write syscalls per call, caller",
            "CPU µs per call, caller",
        ],
    ];
    for round in 0..ROUNDS {
        eprintln!("round {} of {ROUNDS}", round + 1);
        let mut order = sides;
        order.rotate_left(round % sides.len());
        let latencies = serial_interleaved(CALLS, &order, nats, client).await?;
        for (side, (p50, p99)) in order.into_iter().zip(latencies) {
            results.record(format!("p50|{}", side.name()), p50);
            results.record(format!("p99|{}", side.name()), p99);
        }
        for side in order {
            let pids = [server.pid(), run.pid_of(side), std::process::id()];
            let before = pids.map(Costs::of);
            let (received, sent) = server.messages()?;
            for _ in 0..CALLS / 5 {
                side.call(nats, client).await.map_err(|e| e.to_string())?;
            }
            let (received_now, sent_now) = server.messages()?;
            results.record(
                format!("{MESSAGES}|{}", side.name()),
                (received_now - received + sent_now - sent) as f64 / (CALLS / 5) as f64,
            );
            for ((pid, before), names) in pids.into_iter().zip(before).zip(COSTS) {
                for (name, value) in names
                    .into_iter()
                    .zip(Costs::per_call(pid, before, CALLS / 5))
                {
                    results.record(format!("{name}|{}", side.name()), value);
                }
            }
        }
    }
    run.stop();
    let of = |name: String| results.of(name).to_vec();
    println!("| serial call | raw async-nats, task | raw async-nats, inline | wharf | wharf / raw inline | per-round ratio, min to max | wharf / raw task | raw caller, wharf worker | its ratio to raw inline |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let names = ["raw", "raw inline", "wharf", "raw to wharf"];
    for quantile in ["p50", "p99"] {
        let [task, inline, ours, half] = names.map(|side| of(format!("{quantile}|{side}")));
        let ratios: Vec<f64> = inline.iter().zip(&ours).map(|(b, o)| o / b).collect();
        println!(
            "| {quantile} (µs) | {:.1} | {:.1} | {:.1} | {:.3} | {:.3} to {:.3} | {:.3} | {:.1} | {:.3} |",
            median(&task),
            median(&inline),
            median(&ours),
            median(&ours) / median(&inline),
            ratios.iter().cloned().fold(f64::INFINITY, f64::min),
            ratios.iter().cloned().fold(0.0, f64::max),
            median(&ours) / median(&task),
            median(&half),
            median(&half) / median(&inline),
        );
    }
    println!();
    println!("| per serial call, each side alone | raw async-nats, task | raw async-nats, inline | wharf | raw caller, wharf worker |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for costs in [[MESSAGES; 1].as_slice()]
        .into_iter()
        .chain(COSTS.iter().map(|c| c.as_slice()))
    {
        for name in costs {
            let [task, inline, ours, half] =
                names.map(|side| median(&of(format!("{name}|{side}"))));
            println!("| {name} | {task:.2} | {inline:.2} | {ours:.2} | {half:.2} |");
        }
    }
    println!();
    println!("rounds: {ROUNDS}, {CALLS} interleaved calls per side per round, then {} calls per side alone for the costs, medians over rounds", CALLS / 5);
    Ok(())
}

/// A server and one wharf worker process, with a raw and a wharf
/// connection to the server, once the worker answers.
async fn one_worker(
) -> Result<(NatsServer, async_nats::Client, wharf::Client, Child), Box<dyn std::error::Error>> {
    let server = NatsServer::start()?;
    let url = server.url();
    let nats = async_nats::connect(&url).await?;
    let client = wharf::Client::connect(&url).await?;
    let worker = spawn_self(&url, &[], &[("WHARF_ROLE", "worker")])?;
    wait_until_served(&nats, &client, &[Side::Wharf]).await?;
    Ok((server, nats, client, worker))
}

/// Plain calls on their signature's subject (what every wharf caller
/// sends) against the same calls on the plain subject, both one message
/// per call (no coalescing), at 16 and 256 in flight from one process to
/// one worker, alternating which goes first: what routing by signature
/// costs, in one run.
async fn routing_against_plain_subject() -> Result<(), Box<dyn std::error::Error>> {
    const ROUNDS: usize = 7;
    const CALLS: usize = 30_000;
    let (server, nats, client, mut worker) = one_worker().await?;
    let pids = [server.pid(), worker.id(), std::process::id()];
    let signed = client.without_coalescing();
    let plain = client.without_signature_routing();
    // [in flight][signed, plain]: calls/s and worker CPU µs per call.
    let mut rows: [[Vec<[f64; 2]>; 2]; 2] = Default::default();
    for round in 0..ROUNDS {
        eprintln!("round {} of {ROUNDS}", round + 1);
        for (slot, in_flight) in [16, 256].into_iter().enumerate() {
            let mut sides = [(0, &signed), (1, &plain)];
            sides.rotate_left(round % 2);
            for (side, client) in sides {
                let (rate, cpu) =
                    measure(Side::Wharf, &nats, client, CALLS, in_flight, &pids).await?;
                rows[slot][side].push([rate, cpu[1]]);
            }
        }
    }
    stop(&mut worker);
    println!("plain calls, one message each, {ROUNDS} rounds of {CALLS} calls per side:");
    println!("| in flight, metric | plain subject | signature's subject | signature / plain | per-round ratio, min to max |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (slot, in_flight) in [16, 256].into_iter().enumerate() {
        let column =
            |side: usize, i: usize| rows[slot][side].iter().map(|r| r[i]).collect::<Vec<f64>>();
        for (label, i) in [("calls/s", 0), ("CPU µs/call, worker", 1)] {
            println!(
                "{}",
                ratio_row(
                    &format!("{in_flight}, {label}"),
                    &column(1, i),
                    &column(0, i)
                )
            );
        }
    }
    Ok(())
}

/// Durable calls against plain calls of the same function, both at 256 in
/// flight from one process to one worker, alternating which goes first:
/// throughput and CPU per call in each process, so what a durable call
/// pays, and where, is visible.
async fn durable_against_plain() -> Result<(), Box<dyn std::error::Error>> {
    const ROUNDS: usize = 7;
    const CALLS: usize = 30_000;
    let (server, nats, client, mut worker) = one_worker().await?;
    Side::Durable
        .call(&nats, &client)
        .await
        .map_err(|e| e.to_string())?;
    // The raw store side's bucket, as wharf's results buckets are: file
    // storage, one value per key, values kept as long.
    async_nats::jetstream::new(nats.clone())
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: RAW_STORE_BUCKET.to_owned(),
            history: 1,
            max_age: wharf::durable::DEFAULT_RESULTS_TTL,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let pids = [server.pid(), worker.id(), std::process::id()];
    // Plain calls one message each, the target's measure: durable calls
    // (which coalesce) at half their speed.
    let alone = client.without_coalescing();
    let mut rows: [Vec<[f64; 5]>; 4] = Default::default();
    for round in 0..ROUNDS {
        eprintln!("round {} of {ROUNDS}", round + 1);
        let mut sides = [
            (0, Side::Wharf, &client),
            (1, Side::Durable, &client),
            (2, Side::RawStore, &client),
            (3, Side::Wharf, &alone),
        ];
        sides.rotate_left(round % 4);
        for (slot, side, client) in sides {
            let (received, sent) = server.messages()?;
            let (rate, cpu) = measure(side, &nats, client, CALLS, 256, &pids).await?;
            let (received_now, sent_now) = server.messages()?;
            // Every message through the server, in and out, per call.
            let messages = (received_now - received + sent_now - sent) as f64 / CALLS as f64;
            rows[slot].push([rate, cpu[0], cpu[1], cpu[2], messages]);
        }
    }
    stop(&mut worker);
    let column = |slot: usize, i: usize| rows[slot].iter().map(|r| r[i]).collect::<Vec<f64>>();
    let calls_table = |plain: usize, header: &str| {
        println!("| 256 in flight | {header} | per-round ratio, min to max |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for (i, label) in [
            "calls/s",
            "CPU µs/call, server",
            "CPU µs/call, worker",
            "CPU µs/call, caller",
            "messages/call through the server",
        ]
        .into_iter()
        .enumerate()
        {
            println!("{}", ratio_row(label, &column(plain, i), &column(1, i)));
        }
        println!();
    };
    calls_table(0, "plain | durable | durable / plain");
    calls_table(
        3,
        "plain, one message per call | durable | durable / plain alone",
    );
    // What bounds a durable call: its result must be stored (one JetStream
    // store per call, which no batch of calls shares), so a durable call
    // can go no faster than that store alone.
    println!(
        "| 256 in flight | raw KV create | durable | durable / raw KV create | per-round ratio, min to max |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    // (The raw side has no worker.)
    for (label, i) in [
        ("stores or calls/s", 0),
        ("CPU µs each, server", 1),
        ("CPU µs each, caller (the storing process for raw)", 3),
        ("messages each through the server", 4),
    ] {
        println!("{}", ratio_row(label, &column(2, i), &column(1, i)));
    }
    println!();
    println!("rounds: {ROUNDS}, calls per run: {CALLS}, medians over rounds");
    Ok(())
}

/// Cancellation latency across processes: per round, a [`chain`] of three
/// levels starts; once level 3 runs, the caller drops the top call and
/// times how long until each level's "stopped" reaches it.
async fn cancel_latency() -> Result<(), Box<dyn std::error::Error>> {
    const ROUNDS: u32 = 50;
    let server = NatsServer::start()?;
    let url = server.url();
    let client = wharf::Client::connect(&url).await?;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(spawn_self(&url, &[], &[("WHARF_ROLE", "worker")])?);
    }
    wait_until_served(client.nats(), &client, &[Side::Wharf]).await?;
    // Every worker registered (discovery), so the levels can spread.
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let inbox = client.nats().new_inbox();
        let mut pings = client.nats().subscribe(inbox.clone()).await?;
        client
            .nats()
            .publish_with_reply("$SRV.PING.bench", inbox, "".into())
            .await?;
        let mut answered = 0;
        while tokio::time::timeout(Duration::from_millis(300), pings.next())
            .await
            .is_ok_and(|m| m.is_some())
        {
            answered += 1;
        }
        if answered >= 3 {
            break;
        }
        if Instant::now() > until {
            return Err("three workers did not register within 15 s".into());
        }
    }
    let mut last = Vec::new();
    let mut first = Vec::new();
    // Only trees whose levels ran in three processes count: the queue group
    // places each level at random, so some trees share a worker.
    let mut tried = 0;
    while last.len() < ROUNDS as usize {
        if tried >= 20 * ROUNDS {
            return Err(
                format!("in {tried} trees only {} spanned three workers", last.len()).into(),
            );
        }
        let run = tried;
        tried += 1;
        let mut events = client.nats().subscribe(chain_subject(run)).await?;
        client.nats().flush().await?;
        let top = tokio::spawn({
            let client = client.clone();
            async move { chain::request(run, 1).client(&client).await }
        });
        let mut pids = std::collections::HashSet::new();
        loop {
            let told = next_told(&mut events).await?;
            if let Some(rest) = told.strip_prefix("started ") {
                let (level, pid) = rest.split_once(' ').unwrap_or((rest, ""));
                pids.insert(pid.to_owned());
                if level == "3" {
                    break;
                }
            }
        }
        let spread = pids.len() == 3;
        let dropped = Instant::now();
        top.abort();
        let mut stopped = 0;
        while stopped < 3 {
            if next_told(&mut events).await?.starts_with("stopped") {
                stopped += 1;
                let ms = dropped.elapsed().as_secs_f64() * 1e3;
                if stopped == 1 && spread {
                    first.push(ms);
                }
                if stopped == 3 && spread {
                    last.push(ms);
                }
            }
        }
    }
    for worker in &mut workers {
        stop(worker);
    }
    let max = |values: &[f64]| values.iter().copied().fold(0.0, f64::max);
    println!(
        "cancellation of a call tree of depth 3 over three worker processes, {ROUNDS} trees (of {tried} started; the rest shared a worker):"
    );
    println!("| from dropping the top call until | p50 (ms) | max (ms) |");
    println!("| --- | --- | --- |");
    println!(
        "| the first level stopped | {:.2} | {:.2} |",
        median(&first),
        max(&first)
    );
    println!(
        "| every level stopped | {:.2} | {:.2} |",
        median(&last),
        max(&last)
    );
    Ok(())
}

/// The next event a [`chain`] told, waiting at most 10 s.
async fn next_told(events: &mut async_nats::Subscriber) -> Result<String, &'static str> {
    match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
        Ok(Some(message)) => Ok(String::from_utf8_lossy(&message.payload).into_owned()),
        _ => Err("a level told nothing within 10 s"),
    }
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits until every one of `sides` answers a call.
async fn wait_until_served(
    nats: &async_nats::Client,
    client: &wharf::Client,
    sides: &[Side],
) -> Result<(), Box<dyn std::error::Error>> {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let mut served = true;
        for side in sides {
            served &= side.call(nats, client).await.is_ok();
        }
        if served {
            return Ok(());
        }
        if Instant::now() > until {
            return Err("the workers did not answer within 15 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The baselines: a plain async-nats queue subscriber doing the same
/// decode, add and encode, either in a task per request or, with `inline`,
/// inside its subscription loop (the simplest way to write one, and the
/// fastest for a function this quick).
async fn raw_worker(inline: bool) -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL")?;
    let nats = raw_connect(
        &url,
        std::env::var_os("NATS_CA").map(Into::into),
        std::env::var_os("NATS_CREDS").map(Into::into),
    )
    .await?;
    let subject = if inline {
        RAW_INLINE_SUBJECT
    } else {
        RAW_SUBJECT
    };
    let mut requests = nats.queue_subscribe(subject, "q".into()).await?;
    nats.flush().await?;
    // The loop runs as a task on the runtime's worker threads, as the wharf
    // worker's does; left on the `block_on` thread, every spawn would have
    // to wake a worker thread first and the baseline would be slower.
    let serve = tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            if inline {
                answer(&nats, message).await;
            } else {
                let nats = nats.clone();
                tokio::spawn(async move { answer(&nats, message).await });
            }
        }
    });
    serve.await?;
    Ok(())
}

/// The raw responders' answer: decode, add, encode, publish.
async fn answer(nats: &async_nats::Client, message: async_nats::Message) {
    let Some(reply) = message.reply else { return };
    let Ok((a, b)) = postcard::from_bytes::<(i64, i64)>(&message.payload) else {
        return;
    };
    let Ok(body) = postcard::to_allocvec(&a.wrapping_add(b)) else {
        return;
    };
    let _ = nats.publish(reply, Bytes::from(body)).await;
}

/// A plain async-nats connection, over TLS with `ca` when given, with the
/// creds file `creds` when given.
async fn raw_connect(
    url: &str,
    ca: Option<std::path::PathBuf>,
    creds: Option<std::path::PathBuf>,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let mut options = async_nats::ConnectOptions::new();
    if let Some(ca) = ca {
        options = options.add_root_certificates(ca).require_tls(true);
    }
    if let Some(creds) = creds {
        options = options.credentials_file(creds).await?;
    }
    options.connect(url).await
}

/// Sets this process and the workers it starts from now on to export spans
/// at 1% sampling: to `OTEL_EXPORTER_OTLP_ENDPOINT`, or to an OTLP receiver
/// started here (returned, to be kept while the run lasts).
fn export_spans() -> Result<Option<Child>, Box<dyn std::error::Error>> {
    if !cfg!(feature = "otel") {
        return Err("bench --otel needs the otel feature: cargo run --release -p wharf-examples --features otel --bin bench -- --otel".into());
    }
    let mut receiver = None;
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
        use std::io::BufRead;
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../integration/python/otlp_receiver.py"
        );
        let mut child = Command::new("python3")
            .args([script, "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut lines = std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        let first = lines.next().transpose()?.unwrap_or_default();
        let port = first
            .strip_prefix("port ")
            .ok_or("the OTLP receiver did not start (pip install grpcio opentelemetry-proto)")?
            .to_owned();
        // Its spans are read and dropped, so that it never blocks on stdout.
        std::thread::spawn(move || lines.for_each(drop));
        std::env::set_var(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        );
        receiver = Some(child);
    }
    std::env::set_var("OTEL_TRACES_SAMPLER", "parentbased_traceidratio");
    // 1% unless asked otherwise.
    if std::env::var_os("OTEL_TRACES_SAMPLER_ARG").is_none() {
        std::env::set_var("OTEL_TRACES_SAMPLER_ARG", "0.01");
    }
    std::env::set_var("OTEL_SERVICE_NAME", "wharf-bench");
    wharf::install_logging();
    Ok(receiver)
}

thread_local! {
    static CALLER_EXPORTS: bool = std::env::var("BENCH_OTEL_SIDES").as_deref() != Ok("worker");
}

/// Turns this process's span export on or off (the `otel` feature).
fn set_span_export(on: bool) {
    #[cfg(feature = "otel")]
    wharf::__private::set_span_export(on);
    let _ = on;
}

/// What `comparison` secures the second server with.
#[derive(Clone, Copy, PartialEq)]
enum Secured {
    /// TLS with a CA made for the run.
    Tls,
    /// A creds file of a JWT account (which makes wharf watch for
    /// refusals, as any user connection does).
    Creds,
    /// No security: Prometheus metrics on, in the worker and in this
    /// calling process, against the same with metrics off.
    Metrics,
    /// No security: spans exported over OTLP at 1% sampling, in the worker
    /// and in this calling process, against the same with export off.
    Otel,
}

/// A server with its raw responder and wharf worker, and the bench's
/// connections to it.
struct Setup {
    server_pid: u32,
    raw: Child,
    worker: Child,
    nats: async_nats::Client,
    client: wharf::Client,
}

impl Setup {
    /// Everything on `server`, every connection with `credentials` (a CA,
    /// a creds file, or none).
    async fn start(
        server: &NatsServer,
        credentials: wharf::settings::Credentials,
        extra_env: &[(&str, &str)],
    ) -> Result<Setup, Box<dyn std::error::Error>> {
        let url = server.url();
        let env: Vec<(&str, String)> = credentials.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let raw = spawn_self(&url, &["raw-worker"], &env)?;
        let mut worker_env = env.clone();
        worker_env.push(("WHARF_ROLE", "worker"));
        worker_env.extend_from_slice(extra_env);
        let worker = spawn_self(&url, &[], &worker_env)?;
        let nats = raw_connect(&url, credentials.ca.clone(), credentials.creds.clone()).await?;
        let client = wharf::Client::connect_with(&url, &credentials).await?;
        wait_until_served(&nats, &client, &[Side::Raw, Side::Wharf]).await?;
        Ok(Setup {
            server_pid: server.pid(),
            raw,
            worker,
            nats,
            client,
        })
    }
}

/// `--tls` and `--auth`: calls/s at 16 and 256 in flight, raw and wharf,
/// on an open server and on a `secured` one, in interleaved rounds.
async fn comparison(secured: Secured) -> Result<(), Box<dyn std::error::Error>> {
    const ROUNDS: usize = 7;
    const CALLS: usize = 60_000;
    let dir = wharf::testing::TempDir::new("bench-secured");
    let open = NatsServer::start()?;
    // The open setup's worker exports nothing, whatever this process does.
    let plain_env: &[(&str, &str)] = match secured {
        Secured::Otel => &[("OTEL_SDK_DISABLED", "true")],
        _ => &[],
    };
    let mut plain = Setup::start(&open, Default::default(), plain_env).await?;
    // The secured server lives (with its creds files) until the end.
    let (mut tls, _server, _account) = match secured {
        Secured::Tls => {
            let pki = wharf::testing::Pki::new(dir.path(), &[]);
            let server = NatsServer::start_with_config(&pki.server_tls(false))?;
            let credentials = wharf::settings::Credentials {
                ca: Some(pki.ca.clone()),
                ..Default::default()
            };
            (
                Setup::start(&server, credentials, &[]).await?,
                Some(server),
                None,
            )
        }
        Secured::Creds => {
            let jwt = wharf::testing::JwtAccount::start("bench-creds")?;
            let credentials = jwt.creds("bench", serde_json::json!({ "pub": {}, "sub": {} }));
            (
                Setup::start(&jwt.server, credentials, &[]).await?,
                None,
                Some(jwt),
            )
        }
        Secured::Otel => {
            let server = NatsServer::start()?;
            let receiver = export_spans()?;
            let setup = Setup::start(&server, Default::default(), &[]).await?;
            // The receiver goes with the run.
            std::mem::forget(receiver);
            (setup, Some(server), None)
        }
        Secured::Metrics => {
            let server = NatsServer::start()?;
            // This process serves metrics too; it counts only while the
            // metrics setup is measured (below).
            wharf::serve_metrics(0).await?;
            let setup =
                Setup::start(&server, Default::default(), &[("WHARF_METRICS_PORT", "0")]).await?;
            (setup, Some(server), None)
        }
    };
    let name = match secured {
        Secured::Tls => "over TLS",
        Secured::Creds => "with a creds file",
        Secured::Metrics => "with metrics on",
        Secured::Otel => "exporting spans at 1%",
    };
    let mut results = Samples::default();
    let mut record = |key: String, value: f64| results.record(key, value);
    for round in 0..ROUNDS {
        eprintln!("round {} of {ROUNDS}", round + 1);
        let setups: [(&str, &Setup); 2] = if round % 2 == 0 {
            [("plain", &plain), ("tls", &tls)]
        } else {
            [("tls", &tls), ("plain", &plain)]
        };
        for (transport, setup) in setups {
            match secured {
                Secured::Metrics => wharf::__private::set_metrics_counting(transport == "tls"),
                Secured::Otel => set_span_export(transport == "tls" && CALLER_EXPORTS.with(|c| *c)),
                _ => {}
            }
            for in_flight in [16, 256] {
                let sides = if round % 2 == 0 {
                    [Side::Raw, Side::Wharf]
                } else {
                    [Side::Wharf, Side::Raw]
                };
                for side in sides {
                    let pids = [
                        setup.server_pid,
                        match side {
                            Side::Raw => setup.raw.id(),
                            _ => setup.worker.id(),
                        },
                        std::process::id(),
                    ];
                    let (rate, _) =
                        measure(side, &setup.nats, &setup.client, CALLS, in_flight, &pids).await?;
                    record(format!("{transport} {in_flight} {}", side.name()), rate);
                }
            }
        }
    }
    for setup in [&mut plain, &mut tls] {
        stop(&mut setup.raw);
        stop(&mut setup.worker);
    }
    let of = |key: String| results.of(key).to_vec();
    println!("| calls/s | raw | wharf | wharf / raw | raw {name} | wharf {name} | wharf / raw {name} | that ratio / open ratio |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for in_flight in [16, 256] {
        let raw = median(&of(format!("plain {in_flight} raw")));
        let wharf = median(&of(format!("plain {in_flight} wharf")));
        let raw_tls = median(&of(format!("tls {in_flight} raw")));
        let wharf_tls = median(&of(format!("tls {in_flight} wharf")));
        println!(
            "| {in_flight} in flight | {raw:.0} | {wharf:.0} | {:.3} | {raw_tls:.0} | {wharf_tls:.0} | {:.3} | {:.3} |",
            wharf / raw,
            wharf_tls / raw_tls,
            (wharf_tls / raw_tls) / (wharf / raw)
        );
    }
    println!();
    println!("rounds: {ROUNDS}, calls per throughput run: {CALLS}, medians over rounds");
    Ok(())
}
