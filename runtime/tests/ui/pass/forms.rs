//! Every place and form a microservice can take.
#![deny(warnings)]

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub mod math {
    /// Doc comments stay on the callable function.
    #[wharf::microservice]
    #[allow(clippy::needless_return)]
    pub async fn add(a: i64, b: i64) -> i64 {
        return a + b;
    }

    pub mod deeper {
        #[wharf::microservice(service = "deep", name = "mul", timeout = "2s")]
        pub fn multiply(mut a: i64, b: i64) -> i64 {
            a *= b;
            a
        }

        // Private functions and types from the enclosing module still resolve.
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Secret(u8);

        #[wharf::microservice(timeout = 1500)]
        async fn private_one(secret: Secret) -> u8 {
            helper(secret.0)
        }

        fn helper(x: u8) -> u8 {
            x
        }

        pub async fn use_private() -> Result<u8, wharf::Error> {
            private_one(Secret(1)).await
        }
    }
}

// Re-exported, and imported under another name.
pub use math::add;
use math::deeper::multiply as times;

/// A user type named `Args` does not clash with the generated one.
#[derive(Serialize, Deserialize, Debug)]
pub struct Args {
    pub verbose: bool,
}

#[derive(Serialize, Deserialize, Debug)]
pub enum Failure {
    Nope,
}

#[wharf::microservice]
pub(crate) async fn configure(args: Args, extra: HashMap<String, Vec<u8>>) -> Result<usize, Failure> {
    if args.verbose {
        Ok(extra.len())
    } else {
        Err(Failure::Nope)
    }
}

#[wharf::microservice]
pub async fn unit() {}

#[wharf::microservice]
#[cfg(all())]
pub async fn compiled_in() -> bool {
    true
}

#[cfg(any())]
#[wharf::microservice]
pub async fn compiled_out(x: NotEvenAType) -> bool {
    true
}

#[wharf::microservice]
#[cfg(any())]
pub async fn also_compiled_out(x: NotEvenAType) -> bool {
    true
}

#[tracing::instrument]
#[wharf::microservice]
pub async fn traced_outside(x: u32) -> u32 {
    x
}

#[wharf::microservice]
#[tracing::instrument(level = "debug")]
pub async fn traced_inside(x: u32) -> u32 {
    x
}

#[wharf::microservice]
pub fn tuple_and_array(pair: (u8, String), bytes: [u8; 4]) -> Option<Vec<u8>> {
    let _ = pair;
    Some(bytes.to_vec())
}

/// Raw identifiers are plain names on the wire and in JSON.
#[wharf::microservice]
pub async fn r#match(r#type: u8) -> u8 {
    r#type
}

#[allow(dead_code)]
async fn typed_uses(client: &wharf::Client) {
    let _: Result<i64, wharf::Error> = add(1, 2).await;
    let _: i64 = add::local(1, 2).await;
    let _: Result<i64, wharf::Error> = add::call(client, 1, 2).await;
    let _: Result<i64, wharf::Error> = math::add(1, 2).await;
    let _: Result<i64, wharf::Error> = times(3, 4).await;
    let _: i64 = times::local(3, 4);
    let _: Result<i64, wharf::Error> = times::call(client, 3, 4).await;
    let _: Result<u8, wharf::Error> = math::deeper::use_private().await;
    let _: Result<usize, wharf::CallError<Failure>> =
        configure(Args { verbose: true }, HashMap::new()).await;
    let _: Result<usize, Failure> = configure::local(Args { verbose: false }, HashMap::new()).await;
    let _: Result<(), wharf::Error> = unit().await;
    let _: Result<bool, wharf::Error> = compiled_in().await;
    let _: Result<u32, wharf::Error> = traced_outside(1).await;
    let _: Result<u32, wharf::Error> = traced_inside(1).await;
    let _: Result<Option<Vec<u8>>, wharf::Error> = tuple_and_array((1, "x".into()), [0; 4]).await;
    let _: Result<i64, wharf::Error> = add::request(1, 2)
        .client(client)
        .timeout(std::time::Duration::from_secs(1))
        .await;
    let _: Result<wharf::Reply<i64>, wharf::Error> = add::request(1, 2).send_detailed().await;
    let _: add::Args = add::Args { a: 1, b: 2 };
    let _: &wharf::FnSpec = &times::SPEC;
    assert_eq!(times::SPEC.service, "deep");
    assert_eq!(times::SPEC.name, "mul");
    assert_eq!(times::SPEC.timeout_ms, 2000);
}

/// Every robustness option at once.
#[wharf::microservice(idempotent, durable, attempts = 3, backoff = "10ms", max_backoff = "1s")]
pub async fn robust(n: u64) -> u64 {
    n
}

/// A backoff above the default ceiling raises the ceiling with it.
#[wharf::microservice(backoff = "5s")]
pub async fn patient() {}

fn main() {
    assert!(robust::SPEC.idempotent && robust::SPEC.durable);
    assert_eq!(robust::SPEC.retry.attempts, 3);
    assert_eq!(robust::SPEC.retry.backoff_ms, 10);
    assert_eq!(robust::SPEC.retry.max_backoff_ms, 1000);
    assert_eq!(patient::SPEC.retry.max_backoff_ms, 5000);
    assert!(!add::SPEC.idempotent && !add::SPEC.durable);
    assert_eq!(add::SPEC.retry, wharf::RetryPolicy::DEFAULT);
    assert_eq!(add::SPEC.service, env!("CARGO_CRATE_NAME"));
    assert_eq!(add::SPEC.signature, "add(a:i64,b:i64)->i64");
    assert_eq!(wharf::registered().count(), 12);
    assert_eq!(r#match::SPEC.name, "match");
    assert_eq!(r#match::SPEC.args[0].name, "type");
    assert_eq!(r#match::SPEC.signature, "match(type:u8)->u8");
}
