//! A program whose microservices live in a library crate
//! (`wharf_integration`), as a user's often do.
//!
//! - `svc worker`: serve, against `NATS_URL`.
//! - `svc`: `wharf::init()` (local mode unless `NATS_URL` is set), call each
//!   function, print the results and the pids of the processes it started.
//! - `svc panic`: the same, then panic.
//! - `svc wait`: the same, then wait for a signal.
//! - `svc supervise <wharf.toml>`: run a supervisor (as `wharf up` does) until
//!   SIGTERM, so tests can kill one for real.
//! - `svc put-object`: store a string through `NATS_URL`, leave its reference
//!   in KV `itest_refs` under `greeting`, and exit.
//! - `svc objects`: serve the object store through `NATS_URL` until SIGTERM,
//!   as `wharf objects` does.
//! - `svc traced <n>`: call `traced_nested` `n` times through `NATS_URL` and
//!   print one JSON line per call of what it answered.

use wharf_integration::{add, take, whoami, InventoryError};

#[wharf::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mode = std::env::args().nth(1).unwrap_or_default();
    if mode == "supervise" {
        let path = std::env::args()
            .nth(2)
            .ok_or("svc supervise <wharf.toml>")?;
        wharf::install_logging();
        return Ok(wharf::supervisor::supervise_file(path.as_ref()).await?);
    }
    if mode == "objects" {
        let url = std::env::var("NATS_URL").map_err(|_| "svc objects needs NATS_URL")?;
        let client = wharf::Client::connect(&url).await?;
        let _service = wharf::objects::service::serve(&client).await?;
        println!("ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        term.recv().await;
        return Ok(());
    }
    if mode == "put-object" {
        let client = wharf::init().await?;
        let stored = wharf::put(&"stored by a process that has exited".to_owned()).await?;
        let js = async_nats::jetstream::new(client.nats().clone());
        let kv = js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: "itest_refs".to_owned(),
                ..Default::default()
            })
            .await?;
        // On a cluster a bucket just made is reachable from every server a
        // moment later: until then a put finds no stream, and is made again.
        let reference: bytes::Bytes = serde_json::to_vec(&stored)?.into();
        wharf::testing::eventually(
            "the new bucket to take the reference",
            std::time::Duration::from_secs(10),
            || async {
                kv.put("greeting", reference.clone())
                    .await
                    .map_err(|e| e.to_string())
            },
        )
        .await;
        return Ok(());
    }
    if mode == "traced" {
        let times: usize = std::env::args().nth(2).unwrap_or_default().parse()?;
        wharf::init().await?;
        for _ in 0..times {
            let answer = wharf_integration::traced_nested().await?;
            println!("{}", serde_json::to_string(&answer)?);
        }
        return Ok(());
    }
    wharf::init().await?;
    println!("workers {:?}", wharf::local_workers());
    println!("server {:?}", wharf::local_server());
    println!("add {}", add(2, 3).await?);
    println!("whoami {}", whoami().await?);
    println!("take {}", take(3).await?);
    match take(11).await {
        Err(wharf::CallError::Application(InventoryError::OutOfStock { left })) => {
            println!("out of stock, {left} left")
        }
        other => return Err(format!("expected OutOfStock, got {other:?}").into()),
    }
    println!("ready");
    match mode.as_str() {
        "panic" => panic!("svc panics on purpose"),
        "wait" => loop {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        },
        _ => Ok(()),
    }
}
