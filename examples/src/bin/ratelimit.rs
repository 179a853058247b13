//! A stateful microservice: a per-client token-bucket rate limiter.
//!
//! Each client opens a transaction; every `take` call of that transaction
//! is served by the one instance that owns it, where the client's bucket
//! lives in memory (`wharf::State<Bucket>`). Other clients' transactions
//! spread over the other instances.
//!
//! `cargo run -p wharf-examples --bin ratelimit` starts nats-server and
//! workers (no `NATS_URL` set), lets three clients with different appetites
//! hammer the limiter, and prints what each was allowed and which worker
//! held its bucket. `ratelimit worker` only serves, against `NATS_URL`.

use std::time::{Duration, Instant};

/// Tokens a bucket holds at most: the burst a client may spend at once.
const CAPACITY: f64 = 10.0;

/// Tokens added per second: the sustained rate a client is allowed.
const REFILL_PER_S: f64 = 20.0;

/// One client's bucket.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Default for Bucket {
    /// A new client starts with a full bucket.
    fn default() -> Self {
        Bucket {
            tokens: CAPACITY,
            refilled: Instant::now(),
        }
    }
}

impl Bucket {
    fn try_take(&mut self, cost: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * REFILL_PER_S).min(CAPACITY);
        self.refilled = now;
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// Takes `cost` tokens from the calling client's bucket: `true` when the
/// request may go ahead, `false` when the client is over its rate.
#[wharf::microservice(stateful)]
pub async fn take(cost: u32, bucket: wharf::State<Bucket>) -> bool {
    let mut bucket = bucket;
    bucket.try_take(f64::from(cost), Instant::now())
}

/// The tokens left in the calling client's bucket (a second function on
/// the same state).
#[wharf::microservice(stateful)]
pub async fn tokens_left(bucket: wharf::State<Bucket>) -> f64 {
    bucket.tokens
}

#[wharf::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = wharf::init().await?;
    println!(
        "wharf rate limiter: NATS at {}, workers {:?}; each client may burst {CAPACITY} and sustain {REFILL_PER_S}/s",
        client.url(),
        wharf::local_workers()
    );
    // Three clients for two seconds: one polite, two greedy.
    let clients = [("polite", 15u64), ("greedy", 100), ("greedier", 400)];
    let run_for = Duration::from_secs(2);
    let mut runs = Vec::new();
    for (name, per_second) in clients {
        runs.push(tokio::spawn(async move {
            let tx = wharf::transaction().await?;
            let (allowed, denied) = tx
                .run(async {
                    let started = Instant::now();
                    let mut tick =
                        tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
                    let (mut allowed, mut denied) = (0u32, 0u32);
                    while started.elapsed() < run_for {
                        tick.tick().await;
                        if take(1).await? {
                            allowed += 1;
                        } else {
                            denied += 1;
                        }
                    }
                    Ok::<_, wharf::Error>((allowed, denied))
                })
                .await?;
            let left = tokens_left::request().transaction(&tx).await?;
            let owner = tx.owner().unwrap_or_default();
            tx.end().await?;
            Ok::<_, wharf::Error>((name, per_second, allowed, denied, left, owner))
        }));
    }
    for run in runs {
        let (name, per_second, allowed, denied, left, owner) = run.await??;
        println!(
            "{name:>9}: asked {per_second:>3}/s, allowed {allowed:>3}, denied {denied:>3}, {left:.1} tokens left; bucket held by instance {owner}"
        );
    }
    // Outside a transaction a stateful function says what it needs.
    if let Err(error) = take(1).await {
        println!("take(1) outside a transaction: {error}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = Bucket {
            tokens: CAPACITY,
            refilled: start,
        };
        let burst = (0..20).filter(|_| bucket.try_take(1.0, start)).count();
        assert_eq!(burst, CAPACITY as usize);
        // A quarter second later, 5 tokens have come back.
        let later = start + Duration::from_millis(250);
        let refilled = (0..20).filter(|_| bucket.try_take(1.0, later)).count();
        assert_eq!(refilled, 5);
    }

    #[tokio::test]
    async fn the_body_runs_locally_on_given_state() {
        assert!(take::local(3, wharf::State::new(Bucket::default())).await);
        let empty = Bucket {
            tokens: 0.0,
            refilled: Instant::now(),
        };
        assert!(!take::local(1, wharf::State::new(empty)).await);
    }
}
