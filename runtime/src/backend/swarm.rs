//! The Docker Swarm backend: each wharf service is one Swarm service of a
//! locally built image (nothing is pulled), whose replica count the
//! supervisor sets from its own signals (CPU, backlog, demand): the
//! autoscaler Swarm lacks. Swarm places the tasks across its nodes and
//! restarts those that exit; a task Swarm removes gets SIGTERM, on which
//! its worker drains (a stateful one quiesces first), within a stop grace
//! period long enough for both.
//!
//! Each task names itself in its heartbeats (`WHARF_INSTANCE_ID =
//! <service>-<task id>`, `WHARF_CONTAINER = swarm:<task id>`), through
//! Swarm's templates. Credentials that are files (creds, CA, client
//! certificate and key, an NKey seed) reach the tasks as Swarm secrets,
//! mounted read-only; a password or a token would sit in the service's
//! spec for anyone who can `docker service inspect` to read, so the swarm
//! backend refuses them.

use super::docker::{MANAGED_LABEL, PREFIX_LABEL};
use super::instance::{Backend, BoxFuture, Instance, Launch, Pool};
use crate::error::{Error, ErrorKind};
use bollard::models::{
    NetworkAttachmentConfig, SecretSpec, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated,
    ServiceSpecUpdateConfig, ServiceSpecUpdateConfigFailureActionEnum,
    ServiceSpecUpdateConfigOrderEnum, TaskSpec, TaskSpecContainerSpec, TaskSpecContainerSpecFile,
    TaskSpecContainerSpecSecrets, TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum,
};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::OnceCell;

/// How long Swarm watches a task of a new revision for failure before the
/// rollout moves on: as long as the supervisor gives a new instance to
/// send its first heartbeat.
const UPDATE_MONITOR: Duration = Duration::from_secs(10);

/// The label naming the wharf service of a Swarm service.
pub const SERVICE_LABEL: &str = "wharf.service";

/// What a task's container is called in its heartbeats' `container`.
pub const TASK_PREFIX: &str = "swarm:";

/// How long a removed task may take to drain before Swarm kills it: a
/// stateful instance's quiesce and the drain after it (the supervisor's
/// drain grace, 30 s).
const STOP_GRACE: Duration = Duration::from_secs(crate::txn::owner::QUIESCE_LIMIT.as_secs() + 30);

/// Runs each service as a Swarm service of `image` with `args`.
pub struct SwarmBackend {
    image: String,
    args: Vec<String>,
    /// A Swarm network to attach the tasks to; `None`: the host's, as the
    /// docker backend does, so the supervisor's `NATS_URL` works inside.
    network: Option<String>,
    docker: OnceCell<bollard::Docker>,
}

impl std::fmt::Debug for SwarmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwarmBackend")
            .field("image", &self.image)
            .field("args", &self.args)
            .field("network", &self.network)
            .finish_non_exhaustive()
    }
}

impl SwarmBackend {
    /// A backend running `image` (a local tag) with `args`, on `network`
    /// (or the host's).
    pub fn new(
        image: String,
        args: Vec<String>,
        network: Option<String>,
    ) -> Result<SwarmBackend, Error> {
        if image.trim().is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "the swarm backend needs an image, for example image = \"myapp:local\" (built on every node; nothing is pulled)",
            ));
        }
        Ok(SwarmBackend {
            image,
            args,
            network,
            docker: OnceCell::new(),
        })
    }

    /// The local Docker engine, which must be a Swarm manager.
    async fn docker(&self) -> Result<&bollard::Docker, Error> {
        self.docker
            .get_or_try_init(|| async {
                let docker =
                    bollard::Docker::connect_with_local_defaults().map_err(|e| unreachable(&e))?;
                // An older engine speaks an older API: agree on one.
                docker
                    .negotiate_version()
                    .await
                    .map_err(|e| unreachable(&e))
            })
            .await
    }

    /// The spec of `launch`'s service with `replicas` tasks, its secret
    /// files created as Swarm secrets.
    async fn spec(&self, launch: &Launch, replicas: usize) -> Result<ServiceSpec, Error> {
        let docker = self.docker().await?;
        let name = service_name(&launch.prefix, &launch.service);
        let mut env = Vec::new();
        let mut secrets = Vec::new();
        for (key, value) in &launch.env {
            match key.as_str() {
                "WHARF_INSTANCE_ID" | "WHARF_CONTAINER" => {}
                "NATS_PASSWORD" | "NATS_TOKEN" => return Err(refused_secret(key, &launch.service)),
                "NATS_URL" if value.contains('@') => {
                    return Err(refused_secret(
                        "a password or token in NATS_URL",
                        &launch.service,
                    ))
                }
                "NATS_CREDS" | "NATS_CA" | "NATS_CERT" | "NATS_KEY" | "NATS_NKEY" => {
                    // An NKey is a seed or a file holding one; either way
                    // the task reads it from a file.
                    let content = if key == "NATS_NKEY" && value.starts_with("SU") {
                        value.clone().into_bytes()
                    } else {
                        std::fs::read(value).map_err(|e| {
                            Error::new(
                                ErrorKind::Config,
                                format!("{key} names `{value}`, which cannot be read to hand to service `{}`'s Swarm tasks: {e}", launch.service),
                            )
                            .with_source(e)
                        })?
                    };
                    let secret =
                        ensure_secret(docker, &launch.prefix, &name, key, &content).await?;
                    let inside = format!("/run/wharf/{}", key.to_ascii_lowercase());
                    secrets.push(TaskSpecContainerSpecSecrets {
                        file: Some(TaskSpecContainerSpecFile {
                            name: Some(inside.clone()),
                            uid: Some("0".into()),
                            gid: Some("0".into()),
                            mode: Some(0o400),
                        }),
                        secret_id: Some(secret.0),
                        secret_name: Some(secret.1),
                    });
                    env.push(format!("{key}={inside}"));
                }
                _ => env.push(format!("{key}={value}")),
            }
        }
        // Swarm fills these in per task.
        env.push(format!(
            "WHARF_INSTANCE_ID={}-{{{{.Task.ID}}}}",
            launch.service
        ));
        env.push(format!("WHARF_CONTAINER={TASK_PREFIX}{{{{.Task.ID}}}}"));
        env.sort();
        let labels = HashMap::from([
            (MANAGED_LABEL.to_owned(), "1".to_owned()),
            (PREFIX_LABEL.to_owned(), launch.prefix.clone()),
            (SERVICE_LABEL.to_owned(), launch.service.clone()),
        ]);
        let network = self.network.clone().unwrap_or_else(|| "host".to_owned());
        Ok(ServiceSpec {
            name: Some(name),
            labels: Some(labels.clone()),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(self.image.clone()),
                    args: Some(self.args.clone()),
                    env: Some(env),
                    labels: Some(labels),
                    secrets: (!secrets.is_empty()).then_some(secrets),
                    stop_grace_period: Some(STOP_GRACE.as_nanos() as i64),
                    ..Default::default()
                }),
                restart_policy: Some(TaskSpecRestartPolicy {
                    condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
                    delay: Some(Duration::from_secs(1).as_nanos() as i64),
                    ..Default::default()
                }),
                networks: Some(vec![NetworkAttachmentConfig {
                    target: Some(network),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            mode: Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated {
                    replicas: Some(replicas as i64),
                }),
                ..Default::default()
            }),
            // A new revision (image, arguments, environment) rolls out as
            // the process backend's does: one task at a time, the new one
            // started before the old one stops (which drains on SIGTERM),
            // rolled back by Swarm if a new task fails while it is watched.
            update_config: Some(ServiceSpecUpdateConfig {
                parallelism: Some(1),
                order: Some(ServiceSpecUpdateConfigOrderEnum::START_FIRST),
                failure_action: Some(ServiceSpecUpdateConfigFailureActionEnum::ROLLBACK),
                monitor: Some(UPDATE_MONITOR.as_nanos() as i64),
                ..Default::default()
            }),
            ..Default::default()
        })
    }
}

impl Backend for SwarmBackend {
    fn name(&self) -> &'static str {
        "swarm"
    }

    fn start(&self, launch: &Launch) -> Result<Box<dyn Instance>, Error> {
        Err(Error::new(
            ErrorKind::Config,
            format!(
                "service `{}`: Swarm starts the instances of a swarm service; the supervisor sets their number",
                launch.service
            ),
        ))
    }

    fn pool(&self) -> Option<&dyn Pool> {
        Some(self)
    }
}

impl Pool for SwarmBackend {
    fn scale<'a>(
        &'a self,
        launch: &'a Launch,
        replicas: usize,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let docker = self.docker().await?;
            let name = service_name(&launch.prefix, &launch.service);
            let spec = self.spec(launch, replicas).await?;
            match docker.inspect_service(&name, None).await {
                Ok(existing) => {
                    let version = existing.version.and_then(|v| v.index).unwrap_or_default();
                    let options = bollard::query_parameters::UpdateServiceOptionsBuilder::new()
                        .version(version as i32)
                        .build();
                    docker
                        .update_service(&name, spec, options, None)
                        .await
                        .map(|_| ())
                        .map_err(|e| swarm_failed(&name, "update", &e))
                }
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => docker
                    .create_service(spec, None)
                    .await
                    .map(|_| ())
                    .map_err(|e| swarm_failed(&name, "create", &e)),
                Err(e) => Err(swarm_failed(&name, "inspect", &e)),
            }
        })
    }

    fn remove<'a>(&'a self, launch: &'a Launch) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let docker = self.docker().await?;
            let name = service_name(&launch.prefix, &launch.service);
            match docker.delete_service(&name).await {
                Ok(())
                | Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => Ok(()),
                Err(e) => Err(swarm_failed(&name, "remove", &e)),
            }
        })
    }
}

/// The Swarm service of wharf service `service` under `prefix`:
/// `wharf-<prefix>-<service>`, in the characters Swarm allows.
pub fn service_name(prefix: &str, service: &str) -> String {
    let name: String = format!("wharf-{prefix}-{service}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.chars().take(63).collect()
}

/// The Swarm secret holding `content` for `key` of service `name`, made
/// when missing: named by the content's digest, since a Swarm secret cannot
/// change. Returns its id and name.
async fn ensure_secret(
    docker: &bollard::Docker,
    prefix: &str,
    name: &str,
    key: &str,
    content: &[u8],
) -> Result<(String, String), Error> {
    use base64::Engine;
    let digest = crate::objects::bytes::Algorithm::Xxh3.digest(content);
    let short: String = digest
        .split_once('=')
        .map_or(digest.as_str(), |(_, value)| value)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    let secret_name = format!(
        "{name}-{}-{short}",
        key.to_ascii_lowercase().replace('_', "-")
    );
    let filters = HashMap::from([("name", vec![secret_name.as_str()])]);
    let options = bollard::query_parameters::ListSecretsOptionsBuilder::new()
        .filters(&filters)
        .build();
    let existing = docker
        .list_secrets(Some(options))
        .await
        .map_err(|e| swarm_failed(&secret_name, "list secrets of", &e))?;
    if let Some(id) = existing
        .into_iter()
        .find(|s| s.spec.as_ref().and_then(|s| s.name.as_deref()) == Some(secret_name.as_str()))
        .and_then(|s| s.id)
    {
        return Ok((id, secret_name));
    }
    let spec = SecretSpec {
        name: Some(secret_name.clone()),
        labels: Some(HashMap::from([
            (MANAGED_LABEL.to_owned(), "1".to_owned()),
            (PREFIX_LABEL.to_owned(), prefix.to_owned()),
        ])),
        data: Some(base64::engine::general_purpose::STANDARD.encode(content)),
        ..Default::default()
    };
    let created = docker
        .create_secret(spec)
        .await
        .map_err(|e| swarm_failed(&secret_name, "create secret", &e))?;
    Ok((created.id, secret_name))
}

fn refused_secret(what: &str, service: &str) -> Error {
    Error::new(
        ErrorKind::Config,
        format!(
            "service `{service}`: the swarm backend does not hand {what} to its tasks (it would sit in the service's spec, readable with `docker service inspect`): use an NKey (NATS_NKEY), a creds file (NATS_CREDS) or a client certificate, which reach the tasks as Swarm secrets"
        ),
    )
}

fn unreachable(e: &bollard::errors::Error) -> Error {
    Error::new(
        ErrorKind::Process,
        format!("the swarm backend cannot reach the Docker engine: {e}; is Docker running here?"),
    )
}

fn swarm_failed(name: &str, what: &str, e: &bollard::errors::Error) -> Error {
    let text = e.to_string();
    let advice = if text.contains("not a swarm manager") || text.contains("This node is not") {
        "; the swarm backend needs this Docker engine to be a Swarm manager: run `docker swarm init` (or join it to a swarm as a manager)"
    } else {
        ""
    };
    Error::new(
        ErrorKind::Process,
        format!("cannot {what} Swarm service `{name}`: {text}{advice}"),
    )
}

/// A Swarm task, known from its heartbeats (it may run on any node).
pub(crate) struct Task {
    id: String,
}

impl Task {
    pub(crate) fn new(id: &str) -> Task {
        Task { id: id.to_owned() }
    }
}

impl Instance for Task {
    fn location(&self) -> String {
        format!("swarm task {}", self.id)
    }

    fn alive(&mut self) -> bool {
        // Swarm restarts a task that exits; the supervisor watches the
        // heartbeats, which stop with it.
        true
    }

    fn kill(&mut self) {
        // Swarm has no way to kill one task; its container can be, where
        // it runs on this node (Swarm then starts another).
        if let Ok(out) = std::process::Command::new("docker")
            .args(["ps", "--quiet", "--filter"])
            .arg(format!("label=com.docker.swarm.task.id={}", self.id))
            .output()
        {
            let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !id.is_empty() {
                let _ = std::process::Command::new("docker")
                    .args(["kill", &id])
                    .output();
            }
        }
    }

    fn terminate(&mut self) {}
}
