//! A 1 GiB stream of 64 KiB items through a worker process to a reader
//! that pauses now and then: every byte arrives, and neither side's peak
//! memory grows with the stream (credit bounds what is in flight). Alone in
//! its binary, so the caller's peak is this stream's.

use std::time::{Duration, Instant};
use wharf::testing::NatsServer;
use wharf::Client;
use wharf_integration::{chunks, spawn_worker, wait_for_workers};

const ITEM: u64 = 64 * 1024;
const ITEMS: u64 = 16 * 1024;

/// Peak resident memory of process `pid` (`self` for this one), in MiB.
fn peak_rss_mib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_stream_to_a_slow_reader_keeps_memory_bounded_on_both_sides() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;
    let worker_pid = worker.pid().to_string();
    let (caller_before, worker_before) = (peak_rss_mib("self"), peak_rss_mib(&worker_pid));

    let started = Instant::now();
    let mut items = chunks::call(&client, String::new(), ITEMS, ITEM as u32)
        .await
        .unwrap();
    let mut read = 0u64;
    while let Some(item) = items.next().await {
        let item = item.unwrap();
        assert_eq!(item.len() as u64, ITEM, "item {read} is whole");
        assert!(
            item[0] == read as u8 && item[item.len() - 1] == read as u8,
            "item {read} holds its index"
        );
        read += 1;
        // A slow reader: it stops for a while every 512 items.
        if read % 512 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(read, ITEMS, "every item arrived");

    let (caller_peak, worker_peak) = (peak_rss_mib("self"), peak_rss_mib(&worker_pid));
    eprintln!(
        "1 GiB in {elapsed:.1?} ({:.0} MB/s); peak RSS: caller {caller_peak} MiB (was {caller_before}), worker {worker_peak} MiB (was {worker_before})",
        (ITEMS * ITEM) as f64 / 1e6 / elapsed.as_secs_f64()
    );
    // A credit of 32 items is 2 MiB in flight; what either side holds must
    // stay far below the 1 GiB that went through.
    assert!(
        caller_peak < caller_before + 96,
        "the caller's peak RSS grew from {caller_before} to {caller_peak} MiB"
    );
    assert!(
        worker_peak < worker_before + 96,
        "the worker's peak RSS grew from {worker_before} to {worker_peak} MiB"
    );
}
