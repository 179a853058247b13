//! Streamed results and stream arguments against a raw async-nats publish
//! loop, in one run.
//!
//! `cargo run --release -p wharf-examples --bin stream_bench` starts a
//! nats-server, a wharf worker process and a raw producer process (both
//! this binary), then, in interleaved rounds, reads 256 MiB of 64 KiB
//! items from each: the wharf function streams them with credit-based
//! flow control (the default credit of 32 items, and 128), the raw producer
//! publishes them to the caller's inbox in a plain loop, as a user would
//! write it, with no flow control at all. Both make each item the same way
//! (a fresh buffer filled with the item's index). The other way, the bench
//! sends 256 MiB to each: as a wharf stream argument (under the worker's
//! credit), and raw, published in a loop to a subject the raw process
//! counts, then a request that it answers once it has read them all.
//! Prints MB/s per side and the ratio per round.

use bytes::Bytes;
use futures_util::StreamExt;
use std::time::{Duration, Instant};
use wharf::testing::NatsServer;
use wharf_examples::{median, ratio_row, spawn_self};

const RAW_SUBJECT: &str = "raw.bench.stream";
const ITEM: u32 = 64 * 1024;
const ITEMS: u64 = 4096;
const ROUNDS: usize = 7;

/// `count` items of `size` bytes, every byte of item `i` being `i as u8`.
#[wharf::microservice(service = "stream_bench", timeout = "600s")]
pub async fn items(count: u64, size: u32) -> wharf::Stream<Bytes> {
    wharf::Stream::iter((0..count).map(move |i| item(i, size)))
}

/// The bytes of `items`, read to their end.
#[wharf::microservice(service = "stream_bench", timeout = "600s")]
pub async fn take_items(items: wharf::Stream<Bytes>) -> Result<u64, String> {
    let mut items = items;
    let mut bytes = 0;
    while let Some(item) = items.next().await {
        bytes += item.map_err(|e| e.to_string())?.len() as u64;
    }
    Ok(bytes)
}

/// Where the raw consumer takes items, and where it is asked what it took.
const RAW_UPLOAD: &str = "raw.bench.upload";
const RAW_UPLOAD_END: &str = "raw.bench.upload.end";

fn item(i: u64, size: u32) -> Bytes {
    Bytes::from(vec![i as u8; size as usize])
}

#[wharf::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().nth(1).as_deref() == Some("raw-producer") {
        return raw_producer().await;
    }
    let server = NatsServer::start()?;
    let url = server.url();
    let client = wharf::Client::connect(&url).await?;
    let nats = client.nats().clone();
    let mut children = vec![
        spawn_self(&url, &[], &[("WHARF_ROLE", "worker")])?,
        spawn_self(&url, &["raw-producer"], &[])?,
    ];
    // Both sides answer a small stream before the rounds start.
    let until = Instant::now() + Duration::from_secs(15);
    while raw_round(&nats, 1, 16).await.is_err() || wharf_round(&client, 1, 16, None).await.is_err()
    {
        if Instant::now() > until {
            return Err("the producers did not answer within 15 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mb = (ITEMS * u64::from(ITEM)) as f64 / 1e6;
    let (mut raw, mut wharf_default, mut wharf_wide) = (Vec::new(), Vec::new(), Vec::new());
    let (mut raw_up, mut wharf_up) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        raw_up.push(mb / raw_upload(&nats, ITEMS, ITEM).await?.as_secs_f64());
        wharf_up.push(mb / wharf_upload(&client, ITEMS, ITEM).await?.as_secs_f64());
        raw.push(mb / raw_round(&nats, ITEMS, ITEM).await?.as_secs_f64());
        wharf_default.push(mb / wharf_round(&client, ITEMS, ITEM, None).await?.as_secs_f64());
        wharf_wide.push(
            mb / wharf_round(&client, ITEMS, ITEM, Some(128))
                .await?
                .as_secs_f64(),
        );
    }
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    println!(
        "streaming {} MiB of {} KiB items, {ROUNDS} rounds, MB/s:",
        (ITEMS * u64::from(ITEM)) >> 20,
        ITEM >> 10
    );
    println!("| wharf stream vs raw publish loop | raw | wharf | ratio | per round |");
    println!("| --- | --- | --- | --- | --- |");
    println!("{}", ratio_row("credit 32 (default)", &raw, &wharf_default));
    println!("{}", ratio_row("credit 128", &raw, &wharf_wide));
    println!(
        "{}",
        ratio_row("stream argument (credit 32)", &raw_up, &wharf_up)
    );
    println!(
        "raw median {:.0} MB/s; wharf {:.0} / {:.0} MB/s; sending: raw {:.0}, wharf {:.0} MB/s",
        median(&raw),
        median(&wharf_default),
        median(&wharf_wide),
        median(&raw_up),
        median(&wharf_up)
    );
    Ok(())
}

/// One stream read from the wharf worker, every item checked for size.
async fn wharf_round(
    client: &wharf::Client,
    count: u64,
    size: u32,
    credit: Option<u32>,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let started = Instant::now();
    let mut request = items::request(count, size).client(client);
    if let Some(credit) = credit {
        request = request.credit(credit);
    }
    let mut stream = request.await?;
    let mut read = 0;
    while let Some(item) = stream.next().await {
        if item?.len() != size as usize {
            return Err("a short item".into());
        }
        read += 1;
    }
    if read != count {
        return Err(format!("{read} of {count} items arrived").into());
    }
    Ok(started.elapsed())
}

/// One stream read from the raw producer: a request naming the count and
/// size, the items on the inbox, then an empty message.
async fn raw_round(
    nats: &async_nats::Client,
    count: u64,
    size: u32,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let started = Instant::now();
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(inbox.clone()).await?;
    let request = postcard::to_allocvec(&(count, size))?;
    nats.publish_with_reply(RAW_SUBJECT, inbox, request.into())
        .await?;
    let mut read = 0;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await?
            .ok_or("the subscription ended")?;
        if message.payload.is_empty() {
            break;
        }
        if message.payload.len() != size as usize {
            return Err("a short item".into());
        }
        read += 1;
    }
    if read != count {
        return Err(format!(
            "{read} of {count} items arrived (no flow control: the rest were dropped)"
        )
        .into());
    }
    Ok(started.elapsed())
}

/// Sends `count` items to the wharf worker as a stream argument.
async fn wharf_upload(
    client: &wharf::Client,
    count: u64,
    size: u32,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let started = Instant::now();
    let items = wharf::Stream::iter((0..count).map(move |i| item(i, size)));
    let bytes = take_items::call(client, items)
        .await
        .map_err(|e| e.to_string())?;
    if bytes != count * u64::from(size) {
        return Err(format!("the worker took {bytes} bytes").into());
    }
    Ok(started.elapsed())
}

/// Sends `count` items to the raw consumer in a loop, then asks it what it
/// took: it answers once it has read every item before the question.
async fn raw_upload(
    nats: &async_nats::Client,
    count: u64,
    size: u32,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let started = Instant::now();
    for i in 0..count {
        nats.publish(RAW_UPLOAD, item(i, size)).await?;
    }
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        nats.request(RAW_UPLOAD_END, Bytes::new()),
    )
    .await??;
    let bytes: u64 = postcard::from_bytes(&answer.payload)?;
    if bytes != count * u64::from(size) {
        return Err(format!(
            "the raw consumer took {bytes} bytes (no flow control: the rest were dropped)"
        )
        .into());
    }
    Ok(started.elapsed())
}

/// The baselines: each request's items published to its reply subject in a
/// loop, then an empty message to end them; and the items sent to
/// [`RAW_UPLOAD`] counted until a request on [`RAW_UPLOAD_END`] asks for
/// the count (one connection, so it comes after the items sent before it).
async fn raw_producer() -> Result<(), Box<dyn std::error::Error>> {
    let nats = async_nats::connect(std::env::var("NATS_URL")?).await?;
    let mut uploads = nats.subscribe(RAW_UPLOAD).await?;
    let mut ends = nats.subscribe(RAW_UPLOAD_END).await?;
    nats.flush().await?;
    let consumer = nats.clone();
    tokio::spawn(async move {
        let mut bytes = 0u64;
        loop {
            tokio::select! {
                biased;
                Some(item) = uploads.next() => bytes += item.payload.len() as u64,
                Some(end) = ends.next() => {
                    if let Some(reply) = end.reply {
                        let count = postcard::to_allocvec(&bytes).unwrap_or_default();
                        let _ = consumer.publish(reply, count.into()).await;
                    }
                    bytes = 0;
                }
                else => return,
            }
        }
    });
    let mut requests = nats.subscribe(RAW_SUBJECT).await?;
    while let Some(request) = requests.next().await {
        let (Some(reply), Ok((count, size))) = (
            request.reply,
            postcard::from_bytes::<(u64, u32)>(&request.payload),
        ) else {
            continue;
        };
        for i in 0..count {
            nats.publish(reply.clone(), item(i, size)).await?;
        }
        nats.publish(reply, Bytes::new()).await?;
        nats.flush().await?;
    }
    Ok(())
}
