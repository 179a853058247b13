//! wharf on a three-node JetStream cluster on this host (nats-server
//! processes with routes between them), in one run:
//!
//! - plain and durable calls/s at 256 in flight with every stream at one
//!   replica (R1) and at three (R3), in interleaved rounds, so the table
//!   shows what replication costs; and durable calls with R3 on nodes that
//!   fsync every write (the production profile, `sync_interval: always`);
//! - the outage window after a node is SIGKILLed: the longest time without
//!   a call going through, for idempotent plain calls and for durable calls
//!   with R3, killing the node the caller is connected to (its connection
//!   is lost too).
//!
//! `cargo run --release -p wharf-examples --bin cluster_bench`
//! (`-- --quick`: a short smoke run).

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wharf::testing::NatsCluster;
use wharf_examples::{median, Samples};

/// The function under test.
#[wharf::microservice(service = "cbench")]
pub async fn add(a: i64, b: i64) -> i64 {
    a.wrapping_add(b)
}

/// The same, idempotent: retried through a lost connection or worker.
#[wharf::microservice(service = "cbench", idempotent)]
pub async fn add_again(a: i64, b: i64) -> i64 {
    a.wrapping_add(b)
}

/// What a run measures.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Plain,
    Idempotent,
    Durable,
}

#[wharf::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quick = match std::env::args().nth(1).as_deref() {
        Some("--quick") => true,
        None => false,
        Some(other) => {
            return Err(format!("unknown argument `{other}`; use --quick or nothing").into())
        }
    };
    let (rounds, calls) = if quick { (1, 2_000) } else { (5, 30_000) };

    // Default fsync (every two minutes), R1 and R3 side by side.
    let cluster = NatsCluster::start(3, "")?;
    let urls = cluster.urls_from(0);
    let mut workers = Vec::new();
    let mut clients = Vec::new();
    for replicas in [1, 3] {
        let prefix = format!("cb_r{replicas}");
        workers.push(spawn_worker(&urls, &prefix, replicas)?);
        workers.push(spawn_worker(&urls, &prefix, replicas)?);
        let client = wharf::Client::connect(&urls).await?.with_prefix(&prefix);
        wait_served(&client).await?;
        clients.push((replicas, client));
    }
    let mut results = Samples::default();
    let mut record = |key: String, value: f64| results.record(key, value);
    for round in 0..rounds {
        eprintln!("round {} of {rounds}", round + 1);
        let order: Vec<&(u32, wharf::Client)> = if round % 2 == 0 {
            clients.iter().collect()
        } else {
            clients.iter().rev().collect()
        };
        for (replicas, client) in order {
            for kind in [Kind::Plain, Kind::Durable] {
                let n = if kind == Kind::Durable {
                    calls / 4
                } else {
                    calls
                };
                let rate = throughput(client, kind, n, 256).await?;
                record(format!("{kind:?} R{replicas}"), rate);
            }
        }
    }

    // Durable calls on nodes that fsync every write.
    let durable_cluster = NatsCluster::start(3, "jetstream { sync_interval: always }")?;
    let durable_urls = durable_cluster.urls_from(0);
    let durable_workers = vec![
        spawn_worker(&durable_urls, "cb_sync", 3)?,
        spawn_worker(&durable_urls, "cb_sync", 3)?,
    ];
    let synced = wharf::Client::connect(&durable_urls)
        .await?
        .with_prefix("cb_sync");
    wait_served(&synced).await?;
    for round in 0..rounds {
        eprintln!("fsync round {} of {rounds}", round + 1);
        let rate = throughput(&synced, Kind::Durable, calls / 8, 256).await?;
        record("Durable R3, fsync always".to_owned(), rate);
    }
    drop(durable_workers);
    drop(durable_cluster);

    let of = |key: &str| median(results.of(key));
    println!("| calls/s at 256 in flight | R1 | R3 | R3 / R1 |");
    println!("| --- | ---: | ---: | ---: |");
    for kind in ["Plain", "Durable"] {
        let (r1, r3) = (of(&format!("{kind} R1")), of(&format!("{kind} R3")));
        println!(
            "| {} | {r1:.0} | {r3:.0} | {:.3} |",
            kind.to_lowercase(),
            r3 / r1
        );
    }
    let synced_rate = of("Durable R3, fsync always");
    println!(
        "| durable, fsync always | | {synced_rate:.0} | {:.3} |",
        synced_rate / of("Durable R1")
    );
    println!();
    println!(
        "rounds: {rounds}, medians over rounds; plain calls per run: {calls}, durable: {}",
        calls / 4
    );
    println!();

    // The outage window after a node is killed, R3.
    let mut cluster = cluster;
    let (_, client) = &clients[1];
    println!("| outage after a node is SIGKILLed (R3), 64 calls in flight | window |");
    println!("| --- | ---: |");
    for (kind, victim) in [
        (Kind::Idempotent, Victim::Callers),
        (Kind::Durable, Victim::Follower),
        (Kind::Durable, Victim::Leader),
    ] {
        let (window, failed) = outage(&mut cluster, client, kind, victim).await?;
        println!(
            "| {} calls, {} | {} ms ({failed} failed) |",
            format!("{kind:?}").to_lowercase(),
            victim.describe(),
            window.as_millis()
        );
    }
    drop(workers);
    Ok(())
}

/// A worker process, killed when dropped (the bench failing included).
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A worker process of this binary under `prefix`, its streams at
/// `replicas`, attached to the first of `urls`.
fn spawn_worker(urls: &str, prefix: &str, replicas: u32) -> std::io::Result<Worker> {
    Command::new(std::env::current_exe()?)
        .env("WHARF_ROLE", "worker")
        .env("NATS_URL", urls)
        .env("WHARF_PREFIX", prefix)
        .env("WHARF_REPLICAS", replicas.to_string())
        .envs(std::env::var("WHARF_ACK_WAIT").map(|v| ("WHARF_ACK_WAIT", v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Worker)
}

/// Waits until plain and durable calls go through `client`.
async fn wait_served(client: &wharf::Client) -> Result<(), Box<dyn std::error::Error>> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let plain = add::call(client, 1, 1).await;
        let durable = add::request(1, 1).client(client).durable(true).await;
        if plain.is_ok() && durable.is_ok() {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(format!("no worker answered within 60 s: {plain:?} {durable:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One call of `kind` through `client`.
async fn call(client: &wharf::Client, kind: Kind, i: i64) -> Result<i64, wharf::Error> {
    match kind {
        Kind::Plain => add::call(client, i, 1).await,
        Kind::Idempotent => add_again::call(client, i, 1).await,
        Kind::Durable => {
            add::request(i, 1)
                .client(client)
                .durable(true)
                .timeout(Duration::from_secs(60))
                .await
        }
    }
}

/// Calls/s of `calls` calls of `kind`, `in_flight` at a time.
async fn throughput(
    client: &wharf::Client,
    kind: Kind,
    calls: usize,
    in_flight: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    use futures_util::StreamExt;
    let started = Instant::now();
    let failures = futures_util::stream::iter(0..calls as i64)
        .map(|i| {
            let client = client.clone();
            async move { call(&client, kind, i).await.err() }
        })
        .buffer_unordered(in_flight)
        .filter_map(|failure| async move { failure })
        .collect::<Vec<_>>()
        .await;
    if let Some(failure) = failures.first() {
        return Err(format!(
            "{} of {calls} {kind:?} calls failed, e.g. {failure}",
            failures.len()
        )
        .into());
    }
    Ok(calls as f64 / started.elapsed().as_secs_f64())
}

/// Which node an outage run kills.
#[derive(Clone, Copy, Debug)]
enum Victim {
    /// The one the caller is connected to: its connection is lost too.
    Callers,
    /// A node that neither leads the calls stream nor serves the caller.
    Follower,
    /// The calls stream's leader: the stream accepts nothing until its
    /// other peers elect a new one.
    Leader,
}

impl Victim {
    fn describe(self) -> &'static str {
        match self {
            Victim::Callers => "the caller's node",
            Victim::Follower => "a node that leads nothing of theirs",
            Victim::Leader => "the calls stream's leader",
        }
    }
}

/// The node `kind` of victim is, for `client`'s calls.
async fn victim_node(
    cluster: &NatsCluster,
    client: &wharf::Client,
    victim: Victim,
) -> Result<usize, Box<dyn std::error::Error>> {
    let callers = cluster
        .node_on(client.nats().server_info().port)
        .ok_or("the client's server is not one of the cluster's")?;
    let js = async_nats::jetstream::new(client.nats().clone());
    let stream = wharf::wire::subjects::calls_stream(client.prefix(), "cbench");
    let info = js.get_stream(&stream).await?.info().await?.clone();
    let leader_name = info.cluster.and_then(|c| c.leader).unwrap_or_default();
    let leader = (1..=cluster.nodes.len())
        .find(|i| leader_name.ends_with(&format!("-n{i}")))
        .map(|i| i - 1)
        .ok_or("the calls stream has no leader")?;
    Ok(match victim {
        Victim::Callers => callers,
        Victim::Leader => leader,
        Victim::Follower => (0..cluster.nodes.len())
            .find(|n| *n != leader && *n != callers)
            .ok_or("no node is free of the stream's leader and the caller")?,
    })
}

/// Kills `victim` under 64 calls of `kind` in flight and starts it again
/// 5 s later; returns the longest time without a call going through after
/// the kill, and how many calls failed.
async fn outage(
    cluster: &mut NatsCluster,
    client: &wharf::Client,
    kind: Kind,
    victim: Victim,
) -> Result<(Duration, usize), Box<dyn std::error::Error>> {
    let done: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let (client, done, failed, stop) =
                (client.clone(), done.clone(), failed.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = t as i64 * 1_000_000;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match call(&client, kind, i).await {
                        Ok(_) => done.lock().unwrap().push(Instant::now()),
                        Err(e) => failed.lock().unwrap().push(e.to_string()),
                    }
                    i += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let victim = victim_node(cluster, client, victim).await?;
    cluster.nodes[victim].kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.nodes[victim].revive()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }
    let mut ends: Vec<Instant> = done
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|end| *end >= killed)
        .collect();
    ends.sort();
    let mut last = killed;
    let mut window = Duration::ZERO;
    for end in ends {
        window = window.max(end - last);
        last = end;
    }
    let failed = std::mem::take(&mut *failed.lock().unwrap());
    if let Some(first) = failed.first() {
        eprintln!(
            "{kind:?} calls failed {} times, first: {first}",
            failed.len()
        );
    }
    // Every node is back before the next run.
    wait_served(client).await?;
    Ok((window, failed.len()))
}
