//! The quickstart: three ordinary functions, served by worker processes.
//!
//! `cargo run -p wharf-examples --bin quickstart` starts nats-server and two
//! workers (no `NATS_URL` set), calls each function and prints which worker
//! pid served each call. `quickstart worker` only serves, against `NATS_URL`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The error `divide` returns: it travels to the caller as itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MathError {
    /// The divisor was zero.
    DivisionByZero,
}

impl fmt::Display for MathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MathError::DivisionByZero => f.write_str("division by zero"),
        }
    }
}

impl std::error::Error for MathError {}

// The service name defaults to the crate name: here the binary, `quickstart`.

/// Adds two numbers. Idempotent: safe to retry after a timeout or a lost
/// worker.
#[wharf::microservice(idempotent)]
pub async fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Greets someone by name.
#[wharf::microservice(idempotent)]
pub async fn greet(name: String) -> String {
    format!("Hello, {name}!")
}

/// Divides `a` by `b`; a sync function, so it runs on the worker's blocking
/// pool.
#[wharf::microservice]
pub fn divide(a: f64, b: f64) -> Result<f64, MathError> {
    if b == 0.0 {
        Err(MathError::DivisionByZero)
    } else {
        Ok(a / b)
    }
}

fn served_by(pid: Option<u32>) -> String {
    pid.map_or_else(|| "unknown".to_owned(), |pid| pid.to_string())
}

#[wharf::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = wharf::init().await?;
    println!(
        "wharf quickstart: NATS at {}, workers {:?}",
        client.url(),
        wharf::local_workers()
    );

    // The plain call: exactly like calling the function.
    println!("add(2, 3) = {}", add(2, 3).await?);

    // `request(..)` sets per-call options; `send_detailed` also reports
    // which worker served the call.
    for (a, b) in [(1, 2), (20, 22), (-5, 5), (1 << 40, 1)] {
        let reply = add::request(a, b).send_detailed().await?;
        println!(
            "add({a}, {b}) = {} (worker pid {})",
            reply.value,
            served_by(reply.pid())
        );
    }
    for name in ["Ada", "Grace"] {
        let reply = greet::request(name.to_owned()).send_detailed().await?;
        println!(
            "greet({name:?}) = {:?} (worker pid {})",
            reply.value,
            served_by(reply.pid())
        );
    }
    for (a, b) in [(1.0, 4.0), (1.0, 0.0)] {
        match divide::request(a, b).send_detailed().await {
            Ok(reply) => println!(
                "divide({a}, {b}) = {} (worker pid {})",
                reply.value,
                served_by(reply.pid())
            ),
            Err(wharf::CallError::Application(error)) => {
                println!("divide({a}, {b}) failed in the function: {error} ({error:?})")
            }
            Err(wharf::CallError::Remote(error)) => return Err(error.into()),
        }
    }
    // The original bodies stay callable without NATS.
    println!("add::local(2, 3) = {} (no NATS)", add::local(2, 3).await);
    Ok(())
}
