//! Prometheus metrics, scraped by a real Prometheus server (Debian's
//! `prometheus`) from a worker process, a supervisor process and this
//! process (a caller, and an objects service), and read back through
//! Prometheus's HTTP API.

use std::process::{Child, Command, Stdio};
use std::time::Duration;
use wharf::testing::{eventually, NatsServer, TempDir};
use wharf::Client;
use wharf_integration::{
    add, add_remotely, http_get, logged_metrics_port, spawn_svc_logged, take, tally,
    wait_for_workers,
};

/// A Prometheus server of its own, stopped when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping every target each second: `jobs` are
    /// (job name, `host:port`).
    fn start(jobs: &[(&str, String)]) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let mut config =
            String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for (job, target) in jobs {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("the `prometheus` binary starts (scripts/test.sh installs it: apt-get install prometheus)");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// The instant vector `query` returns now, as (labels, value) pairs.
    fn query(&self, query: &str) -> Result<Vec<(serde_json::Value, f64)>, String> {
        let body = ok_body(http_get(
            self.port,
            &format!("/api/v1/query?query={}", encode(query)),
        ))?;
        let answer: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if answer["status"] != "success" {
            return Err(format!("Prometheus answered {answer}"));
        }
        let result = answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(result
            .into_iter()
            .map(|series| {
                let value = series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (series["metric"].clone(), value)
            })
            .collect())
    }

    /// Each target's job, health and last error, for failure messages.
    fn targets(&self) -> String {
        let Ok(body) = ok_body(http_get(self.port, "/api/v1/targets")) else {
            return "(unknown)".to_owned();
        };
        let targets: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let active = targets["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let shown: Vec<String> = active
            .iter()
            .map(|t| {
                format!(
                    "{} {} {} {}",
                    t["labels"]["job"], t["scrapeUrl"], t["health"], t["lastError"]
                )
            })
            .collect();
        shown.join("; ")
    }

    /// Waits until `query` returns one value that `check` accepts.
    async fn wait_for(&self, query: &str, check: impl Fn(f64) -> bool) -> f64 {
        eventually(
            &format!("Prometheus to return a value for `{query}`"),
            Duration::from_secs(60),
            || async {
                match self.query(query)?.as_slice() {
                    [(_, value)] if check(*value) => Ok(*value),
                    other => Err(format!(
                        "it returned {other:?}; the targets: {}",
                        self.targets()
                    )),
                }
            },
        )
        .await
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of a 200 answer.
fn ok_body(answer: Result<(u16, String), String>) -> Result<String, String> {
    match answer? {
        (200, body) => Ok(body),
        (status, body) => Err(format!("HTTP {status}: {body}")),
    }
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn prometheus_scrapes_a_worker_a_supervisor_and_a_caller() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let prefix = wharf_integration::unique_name("metrics");
    let client = Client::connect(&url).await.unwrap().with_prefix(&prefix);
    // This process, the caller, serves its own metrics (any free port).
    let caller = wharf::serve_metrics(0).await.unwrap();
    let (_worker, worker_log) = spawn_svc_logged(
        &["worker"],
        &[
            ("NATS_URL", url.as_str()),
            ("WHARF_PREFIX", prefix.as_str()),
            ("WHARF_METRICS_PORT", "0"),
        ],
    );
    let worker_port = logged_metrics_port(&worker_log, "worker").await;
    wait_for_workers(&client, 1).await;

    // A supervisor through a server of its own, so that its instance takes
    // none of the calls counted below and it does not adopt the worker
    // above. Its instances do not inherit the supervisor's metrics port
    // (they would fail to listen on it).
    let supervised = NatsServer::start().unwrap();
    let dir = TempDir::new("metrics-up");
    let config = dir.path().join("wharf.toml");
    let svc = wharf_integration::svc_binary();
    std::fs::write(
        &config,
        format!(
            "[broker]\nurl = \"{}\"\n\n[[service]]\nname = \"itest\"\ncommand = [\"{}\", \"worker\"]\nmin = 0\nmax = 1\n",
            supervised.url(),
            svc.display()
        ),
    )
    .unwrap();
    let (supervisor, supervisor_log) = spawn_svc_logged(
        &["supervise", config.to_str().unwrap()],
        &[("WHARF_METRICS_PORT", "0")],
    );
    // Its instances go with it, even when the test fails.
    let _supervisor = wharf_integration::ProcessTree(supervisor);
    let supervisor_port = logged_metrics_port(&supervisor_log, "supervisor").await;

    let prometheus = Prometheus::start(&[
        ("worker", format!("127.0.0.1:{worker_port}")),
        ("supervisor", format!("127.0.0.1:{supervisor_port}")),
        ("caller", format!("127.0.0.1:{}", caller.port())),
    ]);

    // The objects service, in this process: one object in, read back.
    let _objects = wharf::objects::service::serve(&client).await.unwrap();
    let nats = client.nats();
    let stored = nats
        .request(format!("{prefix}.objects.put"), vec![7u8; 1000].into())
        .await
        .unwrap();
    let reference: serde_json::Value = serde_json::from_slice(&stored.payload).unwrap();
    let read = nats
        .request(
            format!("{prefix}.objects.get"),
            serde_json::to_vec(&serde_json::json!({ "uri": reference["uri"] }))
                .unwrap()
                .into(),
        )
        .await
        .unwrap();
    assert_eq!(read.payload.len(), 1000, "{reference}");

    for i in 0..50 {
        assert_eq!(add::call(&client, i, 1).await.unwrap(), i + 1);
    }
    assert!(take::call(&client, 1_000).await.is_err());
    assert_eq!(add_remotely::call(&client, 2, 3).await.unwrap(), 5);
    assert_eq!(tally::call(&client, 7, 0).await.unwrap(), 7);

    // Calls served, by outcome: 50 of `add` from here, two from inside
    // `add_remotely`.
    prometheus
        .wait_for(
            r#"rpc_server_call_duration_seconds_count{job="worker",rpc_system="nats",rpc_service="itest",rpc_method="add",code="ok"}"#,
            |n| n == 52.0,
        )
        .await;
    prometheus
        .wait_for(
            r#"rpc_server_call_duration_seconds_count{job="worker",rpc_method="take",code="application"}"#,
            |n| n == 1.0,
        )
        .await;
    // Buckets that Prometheus can take quantiles of.
    prometheus
        .wait_for(
            r#"histogram_quantile(0.5, sum by (le) (rpc_server_call_duration_seconds_bucket{rpc_method="add"}))"#,
            |seconds| seconds > 0.0 && seconds < 1.0,
        )
        .await;
    // The caller's side: this process's calls, and the worker's nested one.
    prometheus
        .wait_for(
            r#"rpc_client_call_duration_seconds_count{job="caller",rpc_method="add",code="ok"}"#,
            |n| n == 50.0,
        )
        .await;
    prometheus
        .wait_for(
            r#"rpc_client_call_duration_seconds_count{job="worker",rpc_method="add",code="ok"}"#,
            |n| n == 2.0,
        )
        .await;
    prometheus
        .wait_for(
            r#"rpc_client_call_duration_seconds_count{job="caller",rpc_method="take",code="application"}"#,
            |n| n == 1.0,
        )
        .await;
    for direction in ["in", "out"] {
        prometheus
            .wait_for(
                &format!(r#"wharf_object_bytes_total{{job="caller",direction="{direction}"}}"#),
                |bytes| bytes == 1000.0,
            )
            .await;
    }
    prometheus
        .wait_for(
            r#"wharf_objects_request_duration_seconds_count{job="caller",verb="put",code="ok"}"#,
            |n| n == 1.0,
        )
        .await;
    // Load and durable state.
    prometheus
        .wait_for(r#"wharf_worker_concurrency{job="worker"}"#, |n| n >= 1.0)
        .await;
    prometheus
        .wait_for(r#"wharf_worker_in_flight{job="worker"}"#, |n| n == 0.0)
        .await;
    prometheus
        .wait_for(
            r#"wharf_durable_pending{job="worker",rpc_method="tally"}"#,
            |n| n == 0.0,
        )
        .await;
    prometheus
        .wait_for(
            r#"wharf_durable_dead_letters_total{job="worker",rpc_method="tally"}"#,
            |n| n == 0.0,
        )
        .await;
    // The supervisor leads; a call through its server finds no worker, so
    // it cold-starts one, and the call's retries (counted by reason) find it.
    prometheus
        .wait_for(r#"wharf_supervisor_leader{job="supervisor"}"#, |n| n == 1.0)
        .await;
    let cold = Client::connect(&supervised.url()).await.unwrap();
    let reply = add::request(2, 2)
        .client(&cold)
        .send_detailed()
        .await
        .unwrap();
    assert!(reply.attempts > 1, "a cold start takes retries");
    prometheus
        .wait_for(
            r#"wharf_supervisor_scale_decisions_total{job="supervisor",service="itest",direction="up",reason="cold_start"}"#,
            |n| n == 1.0,
        )
        .await;
    prometheus
        .wait_for(
            r#"wharf_supervisor_instances{job="supervisor",service="itest",state="ready"}"#,
            |n| n == 1.0,
        )
        .await;
    prometheus
        .wait_for(
            r#"wharf_client_retries_total{job="caller",rpc_method="add",reason="no_responders"}"#,
            |n| n >= 1.0,
        )
        .await;
    // Every target was up the whole time.
    for job in ["worker", "supervisor", "caller"] {
        prometheus
            .wait_for(&format!(r#"up{{job="{job}"}}"#), |n| n == 1.0)
            .await;
    }
}

#[tokio::test]
async fn a_metrics_port_in_use_stops_the_worker_at_start_naming_port_and_setting() {
    let server = NatsServer::start().unwrap();
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (worker, log) = spawn_svc_logged(
        &["worker"],
        &[
            ("NATS_URL", server.url().as_str()),
            ("WHARF_METRICS_PORT", port.as_str()),
        ],
    );
    let status = worker.exit_status().await;
    assert!(!status.success(), "the worker exited with {status}");
    let log = log.lock().unwrap().join("\n");
    assert!(
        log.contains(&format!("port {port}")) && log.contains("WHARF_METRICS_PORT"),
        "{log}"
    );
    // A port that is no port at all is refused as well.
    let (worker, log) = spawn_svc_logged(
        &["worker"],
        &[
            ("NATS_URL", server.url().as_str()),
            ("WHARF_METRICS_PORT", "99999"),
        ],
    );
    assert!(!worker.exit_status().await.success());
    let log = log.lock().unwrap().join("\n");
    assert!(
        log.contains("WHARF_METRICS_PORT must be a whole number from 0 to 65535"),
        "{log}"
    );
    drop(taken);
}
