//! Stateful microservices against a real nats-server and real worker
//! processes: transactions stay on one instance, survive a scale-down, are
//! reported lost when their owner dies, and are claimed once when two
//! callers race.

use futures_util::{stream, StreamExt};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use wharf::testing::{eventually, NatsServer};
use wharf::{Client, ErrorKind, Transaction};
use wharf_integration::{accumulate, spawn_worker, wait_for_workers, wait_gone, WorkerProcess};

/// `count` workers and a client, all on a fresh server.
async fn cluster(count: usize) -> (NatsServer, Client, Vec<WorkerProcess>) {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let workers = (0..count).map(|_| spawn_worker(&server.url())).collect();
    wait_for_workers(&client, count).await;
    (server, client, workers)
}

/// One call of `accumulate` in `tx` (through the client `tx` was opened
/// or joined with).
async fn add(tx: &Transaction, by: u64) -> Result<(u64, u32), wharf::Error> {
    accumulate::request(by, 0).transaction(tx).await
}

#[tokio::test]
async fn a_thousand_transactions_each_stay_on_one_instance() {
    let (_server, client, workers) = cluster(3).await;
    let pids: BTreeSet<u32> = workers.iter().map(WorkerProcess::pid).collect();
    let owners: Vec<u32> = stream::iter(0..1000)
        .map(|_| {
            let client = client.clone();
            async move {
                let tx = client.transaction().await.unwrap();
                let mut served = BTreeSet::new();
                let mut expected = 0;
                for by in 1..=4 {
                    let (total, pid) = add(&tx, by).await.unwrap();
                    expected += by;
                    assert_eq!(total, expected, "transaction {} lost its state", tx.id());
                    served.insert(pid);
                    if by == 1 {
                        assert!(tx.owner().is_some(), "the first reply names the owner");
                    }
                }
                assert_eq!(served.len(), 1, "transaction {} moved: {served:?}", tx.id());
                tx.end().await.unwrap();
                served.into_iter().next().unwrap()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let mut per_instance = BTreeMap::<u32, usize>::new();
    for pid in owners {
        assert!(pids.contains(&pid));
        *per_instance.entry(pid).or_default() += 1;
    }
    wharf_integration::report!("REPORT 1000 transactions over 3 instances: {per_instance:?}");
    assert_eq!(
        per_instance.len(),
        3,
        "the queue group spreads transactions"
    );
}

#[tokio::test]
async fn a_scale_down_breaks_no_open_transaction() {
    let (server, client, workers) = cluster(3).await;
    let mut open = Vec::new();
    for _ in 0..30 {
        let tx = client.transaction().await.unwrap();
        let (_, pid) = add(&tx, 1).await.unwrap();
        open.push((tx, pid, 1u64));
    }
    // Scale down the instance holding the first transaction, as the
    // supervisor does: ask it to drain.
    let leaving_pid = open[0].1;
    let leaving = open[0].0.owner().unwrap();
    client
        .nats()
        .request(
            wharf::wire::subjects::control(client.prefix(), &leaving),
            "drain".into(),
        )
        .await
        .unwrap();
    let held = open
        .iter()
        .filter(|(_, pid, _)| *pid == leaving_pid)
        .count();
    assert!(held > 0);
    // While its transactions are open the instance keeps serving them, and
    // takes no new ones.
    for round in 0..5 {
        for (tx, pid, total) in &mut open {
            let (now, served) = add(tx, 1).await.unwrap();
            *total += 1;
            assert_eq!((now, served), (*total, *pid), "round {round}: {}", tx.id());
        }
        let fresh = client.transaction().await.unwrap();
        let (_, pid) = add(&fresh, 1).await.unwrap();
        assert_ne!(
            pid, leaving_pid,
            "a quiescing instance took a new transaction"
        );
        fresh.end().await.unwrap();
        // Spaced rounds: an instance that left too early would show it.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        wharf::process::alive(leaving_pid),
        "the instance left with {held} transactions open"
    );
    // Once they end, it leaves.
    let started = Instant::now();
    for (tx, _, _) in open {
        tx.end().await.unwrap();
    }
    assert!(
        wait_gone(&[leaving_pid], Duration::from_secs(30)),
        "the quiesced instance did not exit within 30 s of its transactions' end"
    );
    wharf_integration::report!("REPORT scale-down: {held} open transactions kept through 5 rounds; the instance exited {} ms after they ended",
        started.elapsed().as_millis()
    );
    drop((server, workers));
}

#[tokio::test]
async fn calls_of_a_transaction_whose_owner_died_fail_as_lost() {
    let (server, client, mut workers) = cluster(2).await;
    let tx = client.transaction().await.unwrap();
    let (_, pid) = add(&tx, 5).await.unwrap();
    let owner = tx.owner().unwrap();
    let victim = workers.iter().position(|w| w.pid() == pid).unwrap();
    workers[victim].kill();
    server.wait_for_connections(2).await.unwrap();

    let error = add(&tx, 1).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::TransactionLost, "{error}");
    assert!(error.message().contains(tx.id()), "{error}");
    assert!(error.message().contains(&owner), "{error}");
    // A caller that does not know the owner reaches a survivor, which must
    // not run the call on empty state either.
    let joined = Transaction::join(&client, tx.id()).unwrap();
    let error = add(&joined, 1).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::TransactionLost, "{error}");
    // New transactions go to the survivor.
    let fresh = client.transaction().await.unwrap();
    assert_eq!(add(&fresh, 2).await.unwrap().0, 2);
    tx.end().await.unwrap();
}

#[tokio::test]
async fn two_callers_racing_to_claim_a_transaction_get_one_owner() {
    let (server, client, _workers) = cluster(3).await;
    let other = Client::connect(&server.url()).await.unwrap();
    for _ in 0..200 {
        let tx = client.transaction().await.unwrap();
        let a = Transaction::join(&client, tx.id()).unwrap();
        let b = Transaction::join(&other, tx.id()).unwrap();
        let (first, second) = tokio::join!(add(&a, 1), add(&b, 1));
        let (first, second) = (first.unwrap(), second.unwrap());
        assert_eq!(first.1, second.1, "two owners for {}", tx.id());
        let mut totals = [first.0, second.0];
        totals.sort();
        assert_eq!(totals, [1, 2], "both calls ran on the one state");
        assert_eq!(a.owner(), b.owner());
        tx.end().await.unwrap();
    }
    // With three instances, two of every three races land the two first
    // calls on different instances, and one claim loses the compare-and-set.
    wharf_integration::report!("REPORT claim race: 200 races, one owner each");
}

#[tokio::test]
async fn bad_transactions_get_clear_errors() {
    let (_server, client, _workers) = cluster(1).await;

    // Outside a transaction.
    let error = accumulate::call(&client, 1, 0).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BadRequest);
    assert!(error.message().contains("inside a transaction"), "{error}");

    // Not well-formed.
    let error = Transaction::join(&client, "not a txn!").unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BadRequest);
    assert!(
        error.message().contains("not a well-formed transaction id"),
        "{error}"
    );

    // Unknown.
    let ghost = Transaction::join(&client, "noSuchTransaction").unwrap();
    let error = add(&ghost, 1).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::UnknownTransaction, "{error}");
    assert!(error.message().contains("noSuchTransaction"), "{error}");

    // Ended.
    let tx = client.transaction().await.unwrap();
    add(&tx, 1).await.unwrap();
    let again = Transaction::join(&client, tx.id()).unwrap();
    tx.end().await.unwrap();
    let error = add(&again, 1).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::UnknownTransaction, "{error}");

    // Expired: a one-second lease, then silence.
    let short = client
        .transaction_with_lease(Duration::from_secs(1))
        .await
        .unwrap();
    add(&short, 1).await.unwrap();
    // Left alone, its lease expires in KV (read there, so the wait itself
    // does not renew it).
    let leases = async_nats::jetstream::new(client.nats().clone())
        .get_key_value(wharf::TXN_BUCKET)
        .await
        .unwrap();
    eventually(
        "the idle transaction's lease to expire",
        Duration::from_secs(30),
        || async {
            match leases.entry(short.id()).await {
                Ok(Some(entry)) if entry.operation == async_nats::jetstream::kv::Operation::Put => {
                    Err(format!("lease at revision {}", entry.revision))
                }
                Ok(_) => Ok(()),
                Err(error) => Err(error.to_string()),
            }
        },
    )
    .await;
    let error = add(&short, 1).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::UnknownTransaction, "{error}");
    // ... while a lease in use is renewed past its length: calls spaced a
    // quarter of the lease apart, for twice its length.
    let busy = client
        .transaction_with_lease(Duration::from_secs(2))
        .await
        .unwrap();
    let started = Instant::now();
    for n in 1..=8 {
        assert_eq!(add(&busy, 1).await.unwrap().0, n);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(started.elapsed() > Duration::from_secs(2));

    // A foreign client: JSON with a malformed, then a missing Wharf-Txn.
    for txn in [Some("bad.id"), None] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", "application/json");
        if let Some(txn) = txn {
            headers.insert("Wharf-Txn", txn);
        }
        let reply = client
            .nats()
            .request_with_headers(
                format!("{}.itest.accumulate", client.prefix()),
                headers,
                r#"{"by": 1, "ms": 0}"#.into(),
            )
            .await
            .unwrap();
        let headers = reply.headers.unwrap();
        assert_eq!(
            headers.get("Nats-Service-Error-Code").unwrap().as_str(),
            "400"
        );
        let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        let message = body["message"].as_str().unwrap();
        match txn {
            Some(_) => assert!(
                message.contains("`bad.id` is not a well-formed"),
                "{message}"
            ),
            None => assert!(message.contains("inside a transaction"), "{message}"),
        }
    }
    // The worker keeps serving.
    let tx = client.transaction().await.unwrap();
    assert_eq!(add(&tx, 3).await.unwrap().0, 3);
}
