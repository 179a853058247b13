//! A CPU-bound service for the autoscaler, and a load that rises and stops.
//!
//! ```sh
//! cargo build --release -p wharf-examples --bin autoscale
//! wharf up -c examples/wharf.toml          # serves `autoscale`, min 1, max 4
//! cargo run --release -p wharf-examples --bin autoscale   # the load
//! wharf events                              # why instances come and go
//! ```
//!
//! `autoscale worker` only serves. Without arguments it drives load against
//! `NATS_URL` (`wharf up` without `broker.url` serves on
//! `nats://127.0.0.1:4222`; without `NATS_URL` it runs in local mode): 1, 2,
//! 4, then 8 callers of
//! `work(50)`, ten seconds each, then nothing; every second it prints the
//! calls per second and how many instances answered.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Burns CPU for `ms` milliseconds and returns how many rounds it spun.
#[wharf::microservice(service = "autoscale", idempotent, timeout = "60s")]
pub fn work(ms: u64) -> u64 {
    wharf_examples::burn_cpu(ms)
}

#[wharf::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = wharf::init().await?;
    let served_by = Arc::new(Mutex::new(HashSet::new()));
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut callers = Vec::new();
    for (step, target) in [1usize, 2, 4, 8].into_iter().enumerate() {
        while callers.len() < target {
            let (client, served_by, calls) = (client.clone(), served_by.clone(), calls.clone());
            callers.push(tokio::spawn(async move {
                loop {
                    if let Ok(reply) = work::request(50).client(&client).send_detailed().await {
                        served_by.lock().unwrap().insert(reply.pid());
                        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }));
        }
        for second in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let done = calls.swap(0, std::sync::atomic::Ordering::Relaxed);
            let instances = std::mem::take(&mut *served_by.lock().unwrap()).len();
            println!(
                "t={:>3}s callers={target} calls/s={done} instances answering={instances}",
                step * 10 + second + 1
            );
        }
    }
    for caller in callers {
        caller.abort();
    }
    println!("load stopped: watch `wharf status` shrink back to min");
    Ok(())
}
