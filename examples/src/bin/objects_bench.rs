//! wharf's object store against the stores it is built on, in one run.
//!
//! `cargo run --release -p wharf-examples --bin objects_bench` starts a
//! nats-server and one wharf worker, then measures in interleaved rounds:
//! - put and get throughput (MB/s) for 1 KiB, 1 MiB and 64 MiB objects:
//!   wharf's JetStream store against raw async-nats Object Store calls, and
//!   wharf's `file://` store against raw `object_store` calls on the same
//!   directory, paired operation by operation in alternating order;
//! - the latency of a call with a 4 MiB argument spilled automatically
//!   against the same call with the argument put first and passed by
//!   explicit reference.
//!
//! `--quick` runs a short smoke version.

use bytes::Bytes;
use object_store::{path::Path, ObjectStoreExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use wharf::objects::Objects;
use wharf::testing::{NatsServer, Pattern};
use wharf::ObjectRef;
use wharf_examples::median;

/// Takes a large argument inline: spilled on the way when it is large.
#[wharf::microservice(service = "objects_bench", timeout = "60s")]
pub async fn weigh(data: Vec<u8>) -> u64 {
    data.len() as u64
}

/// Takes the same argument by reference and fetches it.
#[wharf::microservice(service = "objects_bench", timeout = "60s")]
pub async fn weigh_ref(data: ObjectRef<Vec<u8>>) -> Result<u64, String> {
    let data = data.get().await.map_err(|e| e.to_string())?;
    Ok(data.len() as u64)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[wharf::main]
async fn main() -> Result<(), BoxError> {
    let quick = match std::env::args().nth(1).as_deref() {
        Some("--quick") => true,
        None => false,
        Some(other) => {
            return Err(format!("unknown argument `{other}`; use --quick or nothing").into())
        }
    };
    let rounds = if quick { 1 } else { 5 };
    let sizes: &[(&str, usize, usize)] = if quick {
        &[
            ("1 KiB", 1 << 10, 20),
            ("1 MiB", 1 << 20, 3),
            ("64 MiB", 64 << 20, 1),
        ]
    } else {
        &[
            ("1 KiB", 1 << 10, 500),
            ("1 MiB", 1 << 20, 40),
            ("64 MiB", 64 << 20, 4),
        ]
    };

    let server = NatsServer::start()?;
    let url = server.url();
    let client = wharf::Client::connect(&url).await?;
    let js = async_nats::jetstream::new(client.nats().clone());
    let dir = std::env::temp_dir().join(format!("wharf-objects-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let raw_fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)?;
    let wharf_js = Objects::new(&client)?.store("jetstream")?;
    let wharf_fs = Objects::new(&client)?.store(&format!("file://{}", dir.display()))?;

    // (metric, side) -> (object size, seconds of each operation).
    let mut results: Vec<(String, &str, usize, Vec<f64>)> = Vec::new();
    let mut record = |metric: String, side: &'static str, size: usize, time: Duration| {
        let seconds = time.as_secs_f64();
        match results
            .iter_mut()
            .find(|(m, s, ..)| *m == metric && *s == side)
        {
            Some((.., times)) => times.push(seconds),
            None => results.push((metric, side, size, vec![seconds])),
        }
    };
    for round in 0..rounds {
        eprintln!("round {} of {rounds}", round + 1);
        // A bucket per round: raw async-nats reads leave an ordered
        // consumer behind each (until it expires), and the server allows
        // 1000 per stream.
        let raw_blobs = js
            .create_object_store(async_nats::jetstream::object_store::Config {
                bucket: format!("raw_bench_{round}"),
                ..Default::default()
            })
            .await?;
        for &(label, size, count) in sizes {
            let data = Bytes::from(Pattern::bytes(size as u64));
            let stores = [
                ("JetStream", Raw::JetStream(&raw_blobs), &wharf_js),
                ("file", Raw::File(&raw_fs), &wharf_fs),
            ];
            for (name, raw, wharf) in stores {
                // Paired by operation, in alternating order: raw and wharf
                // see the same disk, page cache and server state, which
                // whole loops one after the other do not.
                let keys: Vec<String> = (0..count).map(|i| format!("r{round}-{i}")).collect();
                let mut refs = Vec::with_capacity(count);
                for (i, key) in keys.iter().enumerate() {
                    for raw_turn in order(round + i) {
                        if size >= 1 << 20 {
                            // Each large write starts with no dirty pages
                            // left by the one before, so neither side pays
                            // for the other's writeback.
                            // SAFETY: sync has no preconditions.
                            unsafe { libc::sync() };
                        }
                        let started = Instant::now();
                        let metric = format!("{name} put {label}");
                        if raw_turn {
                            raw.put(key, &data).await?;
                            record(metric, "raw", size, started.elapsed());
                        } else {
                            refs.push(wharf.put_bytes(data.clone()).await?);
                            record(metric, "wharf", size, started.elapsed());
                        }
                    }
                }
                for (i, (key, r)) in keys.iter().zip(&refs).enumerate() {
                    for raw_turn in order(round + i) {
                        let started = Instant::now();
                        let (read, side) = if raw_turn {
                            (raw.get(key, size).await?, "raw")
                        } else {
                            (r.bytes_with(&client).await?.len(), "wharf")
                        };
                        record(format!("{name} get {label}"), side, size, started.elapsed());
                        if read != size {
                            return Err(format!("{name} read {read} bytes of {size}").into());
                        }
                    }
                }
                for (key, r) in keys.iter().zip(&refs) {
                    raw.delete(key).await?;
                    r.delete_with(&client).await?;
                }
            }
        }
    }

    // Spilled against explicit reference, through a worker process.
    let mut worker = spawn_worker(&url)?;
    let arg = Pattern::bytes(4 << 20);
    let until = Instant::now() + Duration::from_secs(15);
    while weigh::call(&client, vec![1]).await.is_err() {
        if Instant::now() > until {
            return Err("the worker did not answer within 15 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let calls = if quick { 3 } else { 30 };
    let (mut spilled, mut explicit) = (Vec::new(), Vec::new());
    for _ in 0..calls {
        let started = Instant::now();
        let n = weigh::call(&client, arg.clone()).await?;
        spilled.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        let stored = wharf_js.put(&arg).await?;
        let m = weigh_ref::call(&client, stored.clone())
            .await
            .map_err(|e| e.to_string())?;
        explicit.push(started.elapsed().as_secs_f64() * 1e3);
        stored.delete_with(&client).await?;
        if n != arg.len() as u64 || m != n {
            return Err(format!("wrong lengths {n}, {m}").into());
        }
    }
    let _ = worker.kill();
    let _ = worker.wait();
    let _ = std::fs::remove_dir_all(&dir);

    println!("| store, operation, size | raw (MB/s) | wharf (MB/s) | wharf / raw | fastest operations, wharf / raw |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (metric, side, size, raw_times) in &results {
        if *side != "raw" {
            continue;
        }
        let Some((.., wharf_times)) = results
            .iter()
            .find(|(m, s, ..)| m == metric && *s == "wharf")
        else {
            continue;
        };
        let fastest = |times: &[f64]| times.iter().cloned().fold(f64::INFINITY, f64::min);
        let (raw_mbs, wharf_mbs) = (
            *size as f64 / 1e6 / median(raw_times),
            *size as f64 / 1e6 / median(wharf_times),
        );
        println!(
            "| {metric} | {raw_mbs:.1} | {wharf_mbs:.1} | {:.3} | {:.3} |",
            wharf_mbs / raw_mbs,
            fastest(raw_times) / fastest(wharf_times)
        );
    }
    println!();
    println!("| call with a 4 MiB argument | p50 (ms) | max (ms) |");
    println!("| --- | ---: | ---: |");
    for (label, values) in [
        ("spilled automatically, `weigh(data)`", &spilled),
        (
            "by explicit reference, `put` then `weigh_ref(r)`",
            &explicit,
        ),
    ] {
        println!(
            "| {label} | {:.1} | {:.1} |",
            median(values),
            values.iter().cloned().fold(0.0, f64::max)
        );
    }
    println!();
    println!(
        "rounds: {rounds}, objects per size and round: {:?}, calls: {calls}",
        sizes.iter().map(|s| s.2).collect::<Vec<_>>()
    );
    Ok(())
}

fn spawn_worker(url: &str) -> std::io::Result<Child> {
    Command::new(std::env::current_exe()?)
        .env("NATS_URL", url)
        .env("WHARF_ROLE", "worker")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// Which side goes first for the `n`th operation: raw (`true`) on even.
fn order(n: usize) -> [bool; 2] {
    let raw_first = n % 2 == 0;
    [raw_first, !raw_first]
}

/// A store used directly, as its own client library offers it.
#[derive(Clone, Copy)]
enum Raw<'a> {
    /// An async-nats Object Store bucket.
    JetStream(&'a async_nats::jetstream::object_store::ObjectStore),
    /// `object_store` on a local directory.
    File(&'a object_store::local::LocalFileSystem),
}

impl Raw<'_> {
    async fn put(self, key: &str, data: &Bytes) -> Result<(), BoxError> {
        match self {
            Raw::JetStream(store) => {
                store.put(key, &mut &data[..]).await?;
            }
            Raw::File(store) => {
                store.put(&Path::from(key), data.clone().into()).await?;
            }
        }
        Ok(())
    }

    /// Reads the object whole; returns its length.
    async fn get(self, key: &str, size: usize) -> Result<usize, BoxError> {
        match self {
            Raw::JetStream(store) => {
                let mut out = Vec::with_capacity(size);
                store.get(key).await?.read_to_end(&mut out).await?;
                Ok(out.len())
            }
            Raw::File(store) => Ok(store.get(&Path::from(key)).await?.bytes().await?.len()),
        }
    }

    async fn delete(self, key: &str) -> Result<(), BoxError> {
        match self {
            Raw::JetStream(store) => store.delete(key).await?,
            Raw::File(store) => store.delete(&Path::from(key)).await?,
        }
        Ok(())
    }
}
