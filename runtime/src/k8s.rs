//! Kubernetes manifests from `wharf.toml` (`wharf k8s`): a Deployment per
//! service and, with KEDA, a ScaledObject that scales it from wharf's own
//! signals.
//!
//! Each Deployment runs the service's image as a worker: NATS credentials
//! come from a Secret (never from the manifest), readiness is the worker's
//! own `/ready` on its metrics port, a preStop hook runs the image's
//! program in the drain role (it asks its worker to drain and waits until
//! it has stopped), and the termination grace covers the drain and, for
//! stateful services, the quiesce of open transactions.
//!
//! Manifests are written as a YAML stream of JSON documents (JSON is YAML):
//! exact, and without a YAML library.

use crate::error::{Error, ErrorKind};
use crate::permissions::{describe, Described};
use crate::supervisor::{ServiceConfig, UpConfig, DRAIN_GRACE};
use crate::txn::QUIESCE_LIMIT;
use crate::wire::subjects;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// How the generated Deployments are scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scaling {
    /// Fixed replicas: each service's `min` (at least 1).
    Fixed,
    /// A KEDA ScaledObject per service: the NATS JetStream scaler on each
    /// function's durable consumer, the Prometheus scaler on the workers'
    /// backlog, and the CPU scaler on `cpu_target`.
    Keda,
}

/// Choices `wharf.toml` does not make.
#[derive(Debug, Clone)]
pub struct Options {
    /// How Deployments are scaled.
    pub scaling: Scaling,
    /// The port of each worker's metrics and readiness (`WHARF_METRICS_PORT`).
    pub metrics_port: u16,
    /// The Secret whose keys become the workers' environment: `NATS_USER`,
    /// `NATS_PASSWORD`, `NATS_TOKEN`, `NATS_NKEY`, or files (a creds file,
    /// a CA, a client certificate) mounted at [`SECRET_FILES`].
    pub secret: String,
    /// The Prometheus server KEDA queries.
    pub prometheus: String,
    /// nats-server's monitoring endpoint (`host:8222`) for KEDA's JetStream
    /// scaler; `None`: the broker URL's first host on port 8222.
    pub nats_monitoring: Option<String>,
    /// The NATS account the calls streams live in (`$G` without accounts).
    pub nats_account: String,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            scaling: Scaling::Fixed,
            metrics_port: 9464,
            secret: "wharf-nats".to_owned(),
            prometheus: "http://prometheus.monitoring.svc:9090".to_owned(),
            nats_monitoring: None,
            nats_account: "$G".to_owned(),
        }
    }
}

/// Where the Secret's files are mounted in each worker.
pub const SECRET_FILES: &str = "/var/run/wharf/nats";

/// Variables that carry credentials: they come from the Secret, never from
/// a service's `env` in the manifest.
const CREDENTIALS: [&str; 8] = [
    "NATS_USER",
    "NATS_PASSWORD",
    "NATS_TOKEN",
    "NATS_NKEY",
    "NATS_CREDS",
    "NATS_CA",
    "NATS_CERT",
    "NATS_KEY",
];

/// Describes every service's image (as `wharf auth` does: the image run
/// once with `WHARF_ROLE=describe`, without a network) and writes the
/// manifests.
pub async fn manifests(config: &UpConfig, options: &Options) -> Result<String, Error> {
    let mut described = BTreeMap::new();
    for service in &config.services {
        image(service)?;
        let functions = describe(service).await.map_err(|why| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "wharf.toml, service `{}`: cannot list the functions of image `{}`: {why}",
                    service.name,
                    service.image.as_deref().unwrap_or_default()
                ),
            )
        })?;
        described.insert(service.name.clone(), functions);
    }
    render(config, options, &described, &entrypoints(config).await?)
}

/// Each image's entrypoint (from `docker image inspect`), which the preStop
/// hook runs with `drain`.
async fn entrypoints(config: &UpConfig) -> Result<BTreeMap<String, Vec<String>>, Error> {
    let mut entrypoints = BTreeMap::new();
    for service in &config.services {
        let image = image(service)?;
        let out = tokio::process::Command::new("docker")
            .args([
                "image",
                "inspect",
                "--format",
                "{{json .Config.Entrypoint}}",
                image,
            ])
            .output()
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Process,
                    format!("cannot run `docker image inspect {image}`: {e}"),
                )
            })?;
        let entrypoint: Vec<String> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if !out.status.success() || entrypoint.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "wharf.toml, service `{}`: image `{image}` has no ENTRYPOINT (the preStop hook runs it with `drain`); build it with ENTRYPOINT [\"/your-program\"]",
                    service.name
                ),
            ));
        }
        entrypoints.insert(service.name.clone(), entrypoint);
    }
    Ok(entrypoints)
}

fn image(service: &ServiceConfig) -> Result<&str, Error> {
    service.image.as_deref().ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            format!(
                "wharf.toml, service `{}` has no `image`: Kubernetes runs containers; set image = \"<registry>/<name>:<tag>\" (its `command` are then the arguments after the image)",
                service.name
            ),
        )
    })
}

/// The manifests of `config`'s services, given their functions and images'
/// entrypoints (by service name).
pub fn render(
    config: &UpConfig,
    options: &Options,
    described: &BTreeMap<String, Vec<Described>>,
    entrypoints: &BTreeMap<String, Vec<String>>,
) -> Result<String, Error> {
    let url = config.broker.url.as_deref().ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            "wharf.toml has no [broker] url: the workers in the cluster need the NATS server's address, e.g. url = \"nats://nats.nats.svc:4222\"",
        )
    })?;
    let prefix = config
        .broker
        .prefix
        .clone()
        .unwrap_or_else(|| subjects::DEFAULT_PREFIX.to_owned());
    let mut documents = Vec::new();
    for service in &config.services {
        let functions = described.get(&service.name).map_or(&[][..], Vec::as_slice);
        let entrypoint = entrypoints
            .get(&service.name)
            .map_or(&[][..], Vec::as_slice);
        documents.push(deployment(
            config, options, service, url, &prefix, functions, entrypoint,
        )?);
        if options.scaling == Scaling::Keda {
            documents.push(scaled_object(options, service, url, &prefix, functions)?);
        }
    }
    let mut text = String::from(
        "# Written by `wharf k8s` from wharf.toml. NATS credentials are not here:\n# they come from the Secret each Deployment names (see docs/DEPLOYING.md).\n",
    );
    for document in documents {
        text.push_str("---\n");
        text.push_str(&serde_json::to_string_pretty(&document).unwrap_or_default());
        text.push('\n');
    }
    Ok(text)
}

/// A Kubernetes name from a wharf service name: lowercase, `-` for `_`.
fn name_of(service: &str) -> String {
    format!("wharf-{}", service.to_ascii_lowercase().replace('_', "-"))
}

fn deployment(
    config: &UpConfig,
    options: &Options,
    service: &ServiceConfig,
    url: &str,
    prefix: &str,
    functions: &[Described],
    entrypoint: &[String],
) -> Result<Value, Error> {
    let image = image(service)?;
    let policy = service.policy()?;
    let name = name_of(&service.name);
    let port = options.metrics_port;
    let mut env = vec![
        json!({ "name": "NATS_URL", "value": url }),
        json!({ "name": "WHARF_PREFIX", "value": prefix }),
        json!({ "name": "WHARF_ROLE", "value": "worker" }),
        json!({ "name": "WHARF_METRICS_PORT", "value": port.to_string() }),
        // The pod's name: the instance id in heartbeats and `wharf status`,
        // and the worker the preStop hook drains.
        json!({ "name": "WHARF_INSTANCE_ID", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }),
    ];
    // Credentials kept as files in wharf.toml are mounted from the Secret
    // under their file names.
    let broker = &config.broker;
    for (variable, path) in [
        ("NATS_CREDS", &broker.creds),
        ("NATS_CA", &broker.ca),
        ("NATS_CERT", &broker.cert),
        ("NATS_KEY", &broker.key),
    ] {
        if let Some(path) = path {
            let file = std::path::Path::new(path)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.clone());
            env.push(json!({ "name": variable, "value": format!("{SECRET_FILES}/{file}") }));
        }
    }
    for (key, value) in &service.env {
        if CREDENTIALS.contains(&key.as_str()) {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "wharf.toml, service `{}`: env sets {key}, a credential: in Kubernetes it comes from the Secret `{}` (kubectl create secret generic {} --from-literal={key}=...), not from the manifest",
                    service.name, options.secret, options.secret
                ),
            ));
        }
        if key == "WHARF_METRICS_PORT" {
            continue; // the port the probes use, set above
        }
        env.push(json!({ "name": key, "value": value }));
    }
    let stateful = functions.iter().any(|f| f.stateful);
    // SIGTERM (or the preStop hook) drains: calls in flight get DRAIN_GRACE,
    // a stateful instance first waits for its transactions to end.
    let grace = DRAIN_GRACE.as_secs() + if stateful { QUIESCE_LIMIT.as_secs() } else { 0 } + 5;
    let labels = json!({
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/part-of": "wharf",
        "wharf.service": service.name.to_ascii_lowercase().replace('_', "-"),
    });
    let mut container = json!({
        "name": "worker",
        "image": image,
        "args": service.command,
        "env": env,
        "envFrom": [{ "secretRef": { "name": options.secret, "optional": true } }],
        "ports": [{ "name": "metrics", "containerPort": port, "protocol": "TCP" }],
        "readinessProbe": {
            "httpGet": { "path": "/ready", "port": "metrics" },
            "periodSeconds": 2,
            "failureThreshold": 1,
        },
        "volumeMounts": [{ "name": "nats-credentials", "mountPath": SECRET_FILES, "readOnly": true }],
    });
    if !entrypoint.is_empty() {
        let mut drain = entrypoint.to_vec();
        drain.push("drain".to_owned());
        container["lifecycle"] = json!({ "preStop": { "exec": { "command": drain } } });
    }
    let mut spec = json!({
        "selector": { "matchLabels": { "app.kubernetes.io/name": name } },
        "template": {
            "metadata": {
                "labels": labels,
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": port.to_string(),
                    "prometheus.io/path": "/metrics",
                },
            },
            "spec": {
                "terminationGracePeriodSeconds": grace,
                "containers": [container],
                "volumes": [{
                    "name": "nats-credentials",
                    "secret": { "secretName": options.secret, "optional": true },
                }],
            },
        },
    });
    if options.scaling == Scaling::Fixed {
        // KEDA owns the replica count when it scales.
        spec["replicas"] = json!(policy.min.max(1));
    }
    Ok(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name, "labels": labels },
        "spec": spec,
    }))
}

fn scaled_object(
    options: &Options,
    service: &ServiceConfig,
    url: &str,
    prefix: &str,
    functions: &[Described],
) -> Result<Value, Error> {
    let policy = service.policy()?;
    let name = name_of(&service.name);
    let per = policy.backlog_per_instance.to_string();
    let monitoring = options
        .nats_monitoring
        .clone()
        .unwrap_or_else(|| format!("{}:8222", first_host(url)));
    // Workers are named after their pods, so the Deployment's name picks
    // this service's workers whatever labels Prometheus adds.
    let workers = format!("wharf_instance=~\"{name}-.*\"");
    let mut triggers = vec![
        json!({
            "type": "prometheus",
            "metadata": {
                "serverAddress": options.prometheus,
                // As wharf's own scaler: calls waiting for a slot, per
                // instance (KEDA divides by the replicas).
                "query": format!("sum(wharf_worker_backlog{{{workers}}}) or vector(0)"),
                "threshold": per,
                "activationThreshold": "0",
            },
        }),
        json!({
            "type": "cpu",
            "metricType": "AverageValue",
            "metadata": { "value": format!("{}m", (policy.cpu_target * 10.0).round() as u64) },
        }),
    ];
    // Every function has a durable consumer (any call may be made
    // durably); its lag is calls waiting in JetStream.
    for function in functions.iter().filter(|f| f.service == service.name) {
        triggers.push(json!({
            "type": "nats-jetstream",
            "metadata": {
                "natsServerMonitoringEndpoint": monitoring,
                "account": options.nats_account,
                "stream": subjects::calls_stream(prefix, &service.name),
                "consumer": subjects::durable_consumer(&function.name),
                "lagThreshold": per,
                "activationLagThreshold": "0",
            },
        }));
    }
    Ok(json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": { "name": name },
        "spec": {
            "scaleTargetRef": { "name": name },
            "minReplicaCount": policy.min,
            "maxReplicaCount": policy.max,
            "cooldownPeriod": policy.scale_down_after.as_secs().max(1),
            "triggers": triggers,
        },
    }))
}

/// The host of the first URL of a comma-separated list.
fn first_host(urls: &str) -> String {
    let first = urls.split(',').next().unwrap_or_default().trim();
    url::Url::parse(first)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| "nats".to_owned())
}
