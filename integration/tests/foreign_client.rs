//! A Python client (nats-py), written from docs/protocol.md alone,
//! discovers and calls a wharf service served by a worker process.

use std::process::Command;
use wharf::testing::NatsServer;
use wharf::Client;
use wharf_integration::{add, spawn_worker, wait_for_workers};

#[tokio::test]
async fn nats_py_calls_a_wharf_service() {
    let has_nats_py = Command::new("python3")
        .args(["-c", "import nats"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_nats_py {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with nats-py is required under CI: pip install nats-py"
        );
        eprintln!("SKIP: python3 with nats-py is not installed (pip install nats-py)");
        return;
    }
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _worker = spawn_worker(&server.url());
    wait_for_workers(&client, 1).await;
    let _objects = wharf::objects::service::serve(&client).await.unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/foreign_client.py");
    let output = tokio::process::Command::new("python3")
        .arg(script)
        .arg(server.url())
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "the Python client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    let mut itest: Vec<&str> = wharf::registered()
        .filter(|spec| spec.service == "itest")
        .map(|spec| spec.name)
        .collect();
    itest.sort_unstable();
    assert_eq!(seen["endpoints"], serde_json::json!(itest));
    assert_eq!(seen["add_sig"], add::SPEC.sig_hex());
    assert_eq!(seen["add_args"], "a: i64, b: i64");
    assert_eq!(seen["by_name"], 42);
    assert_eq!(seen["by_position"], 3);
    assert_eq!(seen["app_error"]["code"], "422");
    assert_eq!(seen["app_error"]["body"]["kind"], "application");
    assert_eq!(seen["app_error"]["body"]["error"]["OutOfStock"]["left"], 10);
    assert_eq!(seen["bad_request"]["code"], "400");
    assert_eq!(seen["bad_request"]["body"]["kind"], "bad_request");
    assert_eq!(seen["mismatch"]["code"], "409");
    assert_eq!(seen["postcard"], serde_json::json!([10]));
    assert_eq!(seen["durable"], 42);
    assert_eq!(seen["durable_stored"], serde_json::json!([200, 1, 42]));
    assert_eq!(seen["txn_totals"], serde_json::json!([5, 11, 18]));
    assert_eq!(seen["txn_lease"]["owner"], seen["txn_owner"]);
    assert_eq!(seen["txn_lease"]["service"], "itest");
    assert_eq!(seen["txn_after_end"]["code"], "404");
    assert_eq!(seen["txn_after_end"]["body"]["kind"], "unknown_transaction");
    assert_eq!(seen["objects_read_by_rust"], seen["objects_expected"]);
    assert_eq!(seen["objects_big_ref"]["type"], "bytes");
    assert_eq!(seen["objects_big_ref"]["size"], 1_800_000);
    assert!(seen["objects_big_ref"]["uri"]
        .as_str()
        .unwrap()
        .starts_with("wharf://jetstream/wharf_blobs/"));
    assert_eq!(seen["objects_range_ok"], true);
    assert_eq!(seen["objects_missing"]["code"], "404");
    assert_eq!(seen["objects_missing"]["body"]["kind"], "object_not_found");
    assert_eq!(seen["objects_elsewhere"]["code"], "400");
    assert_eq!(
        seen["objects_elsewhere"]["body"]["kind"],
        "unsupported_store"
    );
    assert_eq!(seen["stream_items"], serde_json::json!([5, 4, 3, 2, 1, 0]));
    assert_eq!(seen["stream_end"], 6);
}
