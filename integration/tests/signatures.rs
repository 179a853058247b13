//! Routing by signature, against a real nats-server and two worker builds
//! of one function whose signature changed: callers of either build reach
//! only workers of theirs while both serve, side by side under load; with no
//! compatible worker left a call fails naming both signatures; clients
//! that know nothing of signatures keep using the plain subject.

use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::time::Duration;
use wharf::testing::NatsServer;
use wharf::{Client, ErrorKind};
use wharf_integration::{spawn_worker, spawn_worker_v2, versioned, wait_for_workers};

/// The new build's stub, as a caller built from the new source has it.
#[wharf::microservice(service = "itest", name = "versioned")]
async fn versioned_v2(x: i64, y: i64) -> String {
    format!("v2 {}", x + y)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_of_two_signatures_each_reach_their_own_workers() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let mut old = spawn_worker(&server.url());
    let _new = spawn_worker_v2(&server.url());
    wait_for_workers(&client, 1).await;
    wharf::testing::eventually(
        "the new build to serve",
        Duration::from_secs(30),
        || async {
            versioned_v2::call(&client, 1, 1)
                .await
                .map_err(|e| e.to_string())
        },
    )
    .await;

    // 64 calls in flight, old and new callers mixed: no call fails, and
    // each is answered by its own build.
    let mut answers: BTreeMap<&str, usize> = BTreeMap::new();
    let calls = (0..640i64).map(|i| {
        let client = client.clone();
        async move {
            if i % 2 == 0 {
                let answer = versioned::call(&client, i).await.unwrap();
                assert_eq!(
                    answer,
                    format!("v1 {i}"),
                    "an old caller reached the new build"
                );
                "v1"
            } else {
                let answer = versioned_v2::call(&client, i, 1).await.unwrap();
                assert_eq!(
                    answer,
                    format!("v2 {}", i + 1),
                    "a new caller reached the old build"
                );
                "v2"
            }
        }
    });
    let mut calls = futures_util::stream::iter(calls).buffer_unordered(64);
    while let Some(build) = calls.next().await {
        *answers.entry(build).or_default() += 1;
    }
    assert_eq!(answers, BTreeMap::from([("v1", 320), ("v2", 320)]));

    // A client that sends no signature uses the plain subject, which both
    // builds serve: the old one reads these arguments, the new one answers
    // that they lack `y`.
    let mut seen = (false, false);
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while seen != (true, true) {
        assert!(
            std::time::Instant::now() < until,
            "both builds serve the plain subject: {seen:?}"
        );
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", "application/json");
        let plain = client
            .nats()
            .request_with_headers(
                versioned::SPEC.subject("wharf"),
                headers,
                r#"{"x": 1}"#.into(),
            )
            .await
            .unwrap();
        match plain
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
        {
            None => {
                assert_eq!(
                    serde_json::from_slice::<String>(&plain.payload).unwrap(),
                    "v1 1"
                );
                seen.0 = true;
            }
            Some(code) => {
                assert_eq!(code.as_str(), "400");
                seen.1 = true;
            }
        }
    }

    // The old build gone, an old caller fails naming both signatures.
    // (Gone once the server has dropped its subscriptions: a call sent
    // before that reaches the dead worker and fails as `worker_lost`.)
    old.kill();
    let old_subject = versioned::SPEC.signed_subject("wharf");
    wharf::testing::eventually(
        "the server to drop the killed worker's subscriptions",
        Duration::from_secs(30),
        || async {
            match client.nats().request(old_subject.clone(), "".into()).await {
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let error = versioned::request(1)
        .client(&client)
        .timeout(Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::SignatureMismatch, "{error}");
    let message = error.message();
    assert!(message.contains(&versioned::SPEC.sig_hex()), "{message}");
    assert!(message.contains(&versioned_v2::SPEC.sig_hex()), "{message}");
    assert_eq!(versioned_v2::call(&client, 2, 2).await.unwrap(), "v2 4");
}
