//! Objects by reference with real worker processes: a 256 MiB object
//! through a microservice in bounded memory, arguments and results spilled
//! automatically, and objects that outlive the process that made them.

use futures_util::StreamExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wharf::objects::Objects;
use wharf::testing::{rss_kib, NatsServer, Pattern};
use wharf::Client;
use wharf_integration::{blob_stats, byte_sum, pattern, spawn_svc, spawn_worker, wait_for_workers};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_object_passes_through_a_microservice_in_bounded_memory() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;
    let pid = worker.pid();

    let len = 256u64 << 20;
    let started = Instant::now();
    let blob = Objects::new(&client)
        .unwrap()
        .put_stream(&mut Pattern::new(len))
        .await
        .unwrap();
    let put_time = started.elapsed();
    assert_eq!(blob.size, len);

    // The worker's resident set, sampled while it reads the object.
    let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let started = Instant::now();
    let (read, sum) = blob_stats::call(&client, blob.clone()).await.unwrap();
    let get_time = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    assert_eq!(read, len);
    assert_eq!(sum, Pattern::sum(len), "every byte arrived intact");
    let peak_mib = peak.load(Ordering::Relaxed) as f64 / 1024.0;
    eprintln!(
        "REPORT 256 MiB object: put in {put_time:.1?}, read through a microservice in {get_time:.1?}; worker peak RSS {peak_mib:.1} MiB"
    );
    assert!(peak_mib < 64.0, "the worker held {peak_mib:.1} MiB");
    blob.delete_with(&client).await.unwrap();
}

/// Objects left in `wharf_blobs`.
async fn blobs(client: &Client) -> usize {
    let js = async_nats::jetstream::new(client.nats().clone());
    let Ok(store) = js.get_object_store(wharf::objects::BLOBS_BUCKET).await else {
        return 0;
    };
    let mut list = store.list().await.unwrap();
    let mut count = 0;
    while let Some(info) = list.next().await {
        if !info.unwrap().deleted {
            count += 1;
        }
    }
    count
}

#[tokio::test]
async fn large_arguments_and_results_spill_to_the_object_store() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;

    // 10 MiB, ten times the server's max_payload, as a plain argument.
    let data = Pattern::bytes(10 << 20);
    let expected = (data.len() as u64, Pattern::sum(data.len() as u64));
    let started = Instant::now();
    assert_eq!(byte_sum::call(&client, data).await.unwrap(), expected);
    let argument_time = started.elapsed();
    // 3 MiB back as a plain result.
    let started = Instant::now();
    let result = pattern::call(&client, 3 << 20).await.unwrap();
    let result_time = started.elapsed();
    assert_eq!(result.len(), 3 << 20);
    assert!(result
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (i % 251) as u8));
    // Small calls still travel inline.
    assert_eq!(
        byte_sum::call(&client, vec![1, 2, 3]).await.unwrap(),
        (3, 6)
    );

    // The spilled objects are released after the calls.
    wharf::testing::eventually(
        "the spilled objects to be released",
        Duration::from_secs(30),
        || async {
            match blobs(&client).await {
                0 => Ok(()),
                n => Err(format!("{n} objects left")),
            }
        },
    )
    .await;
    eprintln!(
        "REPORT spill: 10 MiB argument in {argument_time:.1?}, 3 MiB result in {result_time:.1?}; nothing left in the store"
    );
}

#[tokio::test]
async fn an_object_outlives_the_process_that_stored_it() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let url = server.url();
    let maker = spawn_svc(&["put-object"], &[("NATS_URL", url.as_str())]);
    let status = maker.exit_status().await;
    assert!(status.success(), "svc put-object failed: {status}");
    // It printed nothing we can read after exiting, so it left the
    // reference where any process finds it: in a KV key.
    let js = async_nats::jetstream::new(client.nats().clone());
    let kv = js.get_key_value("itest_refs").await.unwrap();
    let reference = kv.get("greeting").await.unwrap().expect("the reference");
    let reference: wharf::ObjectRef<String> = serde_json::from_slice(&reference).unwrap();
    assert_eq!(
        reference.get_with(&client).await.unwrap(),
        "stored by a process that has exited"
    );
}
