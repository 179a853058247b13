//! Objects by reference: a large value stored once and passed around as a
//! small `ObjectRef`, and a large argument spilled to the store by itself.
//!
//! `cargo run -p wharf-examples --bin objects` starts nats-server and
//! workers (no `NATS_URL` set), stores two million readings, has workers
//! summarise them by reference, then passes them inline and lets wharf
//! spill them. `objects worker` only serves, against `NATS_URL`.

use std::time::Instant;
use wharf::ObjectRef;

/// Why a stored series could not be read.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Unreadable(String);

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the readings could not be read: {}", self.0)
    }
}

impl std::error::Error for Unreadable {}

/// The mean and the largest reading, from a stored series.
#[wharf::microservice(timeout = "60s")]
pub async fn summarise(readings: ObjectRef<Vec<f64>>) -> Result<(f64, f64), Unreadable> {
    let readings = readings
        .get()
        .await
        .map_err(|e| Unreadable(e.to_string()))?;
    Ok(summary(&readings))
}

/// The same, from a series passed inline: at 16 MB it is far above the
/// server's max_payload, so wharf spills it to the store on the way.
#[wharf::microservice(timeout = "60s")]
pub async fn summarise_inline(readings: Vec<f64>) -> (f64, f64) {
    summary(&readings)
}

fn summary(readings: &[f64]) -> (f64, f64) {
    let mean = readings.iter().sum::<f64>() / readings.len().max(1) as f64;
    let max = readings.iter().cloned().fold(f64::MIN, f64::max);
    (mean, max)
}

#[wharf::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = wharf::init().await?;
    println!(
        "wharf objects: NATS at {}, workers {:?}",
        client.url(),
        wharf::local_workers()
    );
    let readings: Vec<f64> = (0..2_000_000)
        .map(|i| (i as f64 * 0.001).sin() * 10.0)
        .collect();

    let started = Instant::now();
    let stored = wharf::put(&readings).await?;
    println!(
        "stored {} bytes as {} ({}) in {:?}",
        stored.size,
        stored.uri,
        stored.digest,
        started.elapsed()
    );
    // The reference is a few dozen bytes; every worker resolves it.
    for _ in 0..2 {
        let started = Instant::now();
        let (mean, max) = summarise(stored.clone()).await?;
        println!(
            "by reference: mean {mean:.4}, max {max:.4} in {:?}",
            started.elapsed()
        );
    }
    stored.delete().await?;

    let started = Instant::now();
    let (mean, max) = summarise_inline(readings).await?;
    println!(
        "inline, spilled: mean {mean:.4}, max {max:.4} in {:?}",
        started.elapsed()
    );

    // A deleted object is gone, and the error says which.
    if let Err(error) = stored.get().await {
        println!("after delete: {error}");
    }
    Ok(())
}
