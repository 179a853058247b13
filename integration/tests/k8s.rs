//! `wharf k8s`: manifests written from a `wharf.toml` for a real image
//! (the `svc` image, described with Docker), validated against the
//! Kubernetes schemas by `kubernetes-validate`; and the two parts of a
//! worker the manifests rely on, its `/ready` and its drain role, against
//! a real nats-server and worker process.

use std::collections::BTreeMap;
use std::time::Duration;
use wharf::k8s::{Options, Scaling};
use wharf::supervisor::UpConfig;
use wharf::testing::{eventually, NatsServer, TempDir};
use wharf::Client;
use wharf_integration::{
    http_get, logged_metrics_port, sleep_ms, spawn_svc_logged, svc_image, wait_for_workers,
};

fn config(image: &str, extra: &str) -> UpConfig {
    UpConfig::from_toml(&format!(
        "[broker]\nurl = \"nats://nats.nats.svc:4222\"\nca = \"/etc/wharf/ca.pem\"\n\n\
         [[service]]\nname = \"itest\"\nbackend = \"docker\"\nimage = \"{image}\"\ncommand = [\"worker\"]\n\
         min = 2\nmax = 5\nbacklog_per_instance = 8\nenv = {{ RUST_LOG = \"info\" }}\n{extra}"
    ))
    .unwrap()
}

/// Every document of a manifest stream.
fn documents(text: &str) -> Vec<serde_json::Value> {
    text.split("\n---\n")
        .skip(1)
        .map(|doc| serde_json::from_str(doc).unwrap_or_else(|e| panic!("{e}: {doc}")))
        .collect()
}

#[tokio::test]
async fn manifests_pass_the_kubernetes_schemas_and_scale_with_keda() {
    let Some(image) = svc_image() else { return };
    let config = config(image, "");
    let keda = Options {
        scaling: Scaling::Keda,
        ..Options::default()
    };
    let text = wharf::k8s::manifests(&config, &keda).await.unwrap();
    let fixed = wharf::k8s::manifests(&config, &Options::default())
        .await
        .unwrap();

    // The Kubernetes schemas, strictly (no unknown fields); the KEDA
    // ScaledObject is a custom resource it has no schema for.
    let dir = TempDir::new("k8s");
    for (name, manifests) in [("keda.yaml", &text), ("fixed.yaml", &fixed)] {
        let path = dir.path().join(name);
        std::fs::write(&path, manifests).unwrap();
        let out = std::process::Command::new("kubernetes-validate")
            .args(["--strict", "--no-warn"])
            .arg(&path)
            .output()
            .expect("kubernetes-validate runs (scripts/test.sh installs it: pip install kubernetes-validate)");
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}\n{manifests}");
        assert!(
            said.contains("passed for resource deployment/wharf-itest"),
            "{said}"
        );
    }

    let docs = documents(&text);
    let deployment = &docs[0];
    assert_eq!(deployment["kind"], "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["image"], image);
    assert_eq!(container["args"], serde_json::json!(["worker"]));
    // Readiness is the worker's own; the preStop hook drains it with the
    // image's own program.
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(
        container["lifecycle"]["preStop"]["exec"]["command"],
        serde_json::json!(["/svc", "drain"])
    );
    // `itest` serves a stateful function: the grace covers the quiesce.
    assert_eq!(pod["terminationGracePeriodSeconds"], 635);
    let env: BTreeMap<String, serde_json::Value> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
        .collect();
    assert_eq!(env["NATS_URL"]["value"], "nats://nats.nats.svc:4222");
    assert_eq!(env["WHARF_METRICS_PORT"]["value"], "9464");
    assert_eq!(env["NATS_CA"]["value"], "/var/run/wharf/nats/ca.pem");
    assert_eq!(env["RUST_LOG"]["value"], "info");
    assert_eq!(
        env["WHARF_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(container["envFrom"][0]["secretRef"]["name"], "wharf-nats");
    // KEDA owns the replicas; without it, `min` does.
    assert!(deployment["spec"].get("replicas").is_none());
    assert_eq!(documents(&fixed)[0]["spec"]["replicas"], 2);
    assert_eq!(documents(&fixed).len(), 1);

    let scaled = &docs[1];
    assert_eq!(scaled["kind"], "ScaledObject");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], "wharf-itest");
    assert_eq!(scaled["spec"]["minReplicaCount"], 2);
    assert_eq!(scaled["spec"]["maxReplicaCount"], 5);
    let triggers = scaled["spec"]["triggers"].as_array().unwrap();
    let jetstream: Vec<&serde_json::Value> = triggers
        .iter()
        .filter(|t| t["type"] == "nats-jetstream")
        .collect();
    assert!(
        jetstream
            .iter()
            .any(|t| t["metadata"]["consumer"] == "tally"
                && t["metadata"]["stream"] == "wharf_calls_itest"
                && t["metadata"]["natsServerMonitoringEndpoint"] == "nats.nats.svc:8222"
                && t["metadata"]["lagThreshold"] == "8"),
        "{triggers:?}"
    );
    let prometheus = triggers
        .iter()
        .find(|t| t["type"] == "prometheus")
        .expect("a Prometheus trigger");
    assert_eq!(prometheus["metadata"]["threshold"], "8");
    assert!(prometheus["metadata"]["query"]
        .as_str()
        .unwrap()
        .contains(r#"wharf_worker_backlog{wharf_instance=~"wharf-itest-.*"}"#));
}

#[test]
fn a_service_without_an_image_or_with_credentials_in_its_env_is_refused() {
    let no_image = UpConfig::from_toml(
        "[broker]\nurl = \"nats://nats:4222\"\n\n[[service]]\nname = \"plain\"\ncommand = [\"./svc\", \"worker\"]\n",
    )
    .unwrap();
    let error = wharf::k8s::render(
        &no_image,
        &Options::default(),
        &BTreeMap::new(),
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("service `plain` has no `image`"),
        "{error}"
    );
    let secret_in_env = UpConfig::from_toml(
        "[broker]\nurl = \"nats://nats:4222\"\n\n[[service]]\nname = \"itest\"\nbackend = \"docker\"\nimage = \"svc:1\"\nenv = { NATS_PASSWORD = \"hunter2\" }\n",
    )
    .unwrap();
    let error = wharf::k8s::render(
        &secret_in_env,
        &Options::default(),
        &BTreeMap::new(),
        &BTreeMap::new(),
    )
    .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("NATS_PASSWORD") && text.contains("Secret `wharf-nats`"),
        "{text}"
    );
    assert!(
        !text.contains("hunter2"),
        "the password is not repeated: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_503_on_the_drain_role_and_the_call_in_flight_completes() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let client = Client::connect(&url).await.unwrap();
    let instance = wharf_integration::unique_name("pod");
    let env = [
        ("NATS_URL", url.as_str()),
        ("WHARF_METRICS_PORT", "0"),
        ("WHARF_INSTANCE_ID", instance.as_str()),
    ];
    let (worker, log) = spawn_svc_logged(&["worker"], &env);
    let port = logged_metrics_port(&log, "worker").await;
    wait_for_workers(&client, 1).await;
    let ready = |want: u16| async move {
        match http_get(port, "/ready") {
            Ok((status, _)) if status == want => Ok(()),
            other => Err(format!("/ready answered {other:?}")),
        }
    };
    eventually("/ready to answer 200", Duration::from_secs(30), || {
        ready(200)
    })
    .await;

    let call = {
        let client = client.clone();
        tokio::spawn(async move { sleep_ms::call(&client, 2_000).await })
    };
    eventually("the call to run", Duration::from_secs(30), || async {
        match wharf_integration::in_flight(&client, "itest").await {
            1 => Ok(()),
            n => Err(format!("{n} in flight")),
        }
    })
    .await;
    // Without an instance to drain, the drain role says what is missing.
    let (unnamed, unnamed_log) = spawn_svc_logged(&["drain"], &env[..1]);
    assert!(!unnamed.exit_status().await.success());
    // Its stderr is read by a thread that may not have caught up yet.
    eventually(
        "the drain role to say what is missing",
        Duration::from_secs(10),
        || {
            let said = unnamed_log.lock().unwrap().join("\n");
            async move {
                if said.contains("WHARF_INSTANCE_ID is not set") {
                    Ok(())
                } else {
                    Err(format!("it said: {said:?}"))
                }
            }
        },
    )
    .await;
    // The preStop hook: the same program, in the drain role, with the
    // worker's environment.
    let (drain, drain_log) = spawn_svc_logged(
        &["drain"],
        &[
            ("NATS_URL", url.as_str()),
            ("WHARF_INSTANCE_ID", instance.as_str()),
        ],
    );
    eventually(
        "/ready to answer 503 while draining",
        Duration::from_secs(30),
        || {
            let answer = http_get(port, "/ready");
            async move {
                match answer {
                    Ok((503, _)) => Ok(()),
                    // Already gone: the drain was quick.
                    Err(_) => Ok(()),
                    other => Err(format!("/ready answered {other:?}")),
                }
            }
        },
    )
    .await;
    assert_eq!(
        call.await.unwrap().unwrap(),
        2_000,
        "the call in flight completes"
    );
    let status = drain.exit_status().await;
    assert!(status.success(), "{:?}", drain_log.lock().unwrap());
    assert!(
        worker.exit_status().await.success(),
        "the worker exits after its drain"
    );
}
