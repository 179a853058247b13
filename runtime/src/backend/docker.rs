//! The Docker backend: each instance is a container of a locally built
//! image, labelled so that `wharf down` and the supervisor touch only their
//! own. Containers use the host's network, so the supervisor's `NATS_URL`
//! works inside them unchanged.

use super::instance::{Backend, Instance, Launch};
use crate::{Error, ErrorKind};
use std::process::{Command, Stdio};

/// Label every container started by wharf carries.
pub const MANAGED_LABEL: &str = "wharf.managed";

/// Label naming the subject prefix of the deployment a container belongs
/// to, so one deployment's containers can be found (and removed) without
/// touching another's on the same host.
pub const PREFIX_LABEL: &str = "wharf.prefix";

/// Runs each instance as `docker run <image> <args>`.
#[derive(Debug, Clone)]
pub struct DockerBackend {
    image: String,
    args: Vec<String>,
    network: Option<String>,
}

impl DockerBackend {
    /// A backend running `image` (a local tag; nothing is pulled) with
    /// `args`, for example `["worker"]`, on `network` (or the host's).
    pub fn new(
        image: String,
        args: Vec<String>,
        network: Option<String>,
    ) -> Result<DockerBackend, Error> {
        if image.trim().is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "the docker backend needs an image, for example image = \"myapp:local\"",
            ));
        }
        Ok(DockerBackend {
            image,
            args,
            network,
        })
    }
}

impl Backend for DockerBackend {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn start(&self, launch: &Launch) -> Result<Box<dyn Instance>, Error> {
        let name = container_name(&launch.instance);
        let mut command = Command::new("docker");
        command.args([
            "run",
            "--detach",
            "--rm",
            "--network",
            self.network.as_deref().unwrap_or("host"),
            "--name",
            &name,
        ]);
        command.args(["--label", &format!("{MANAGED_LABEL}=1")]);
        command.args(["--label", &format!("{PREFIX_LABEL}={}", launch.prefix)]);
        command.args(["--label", &format!("wharf.service={}", launch.service)]);
        command.args(["--label", &format!("wharf.instance={}", launch.instance)]);
        for (key, value) in &launch.env {
            // Files the credentials name are mounted read-only where the
            // instance finds them.
            let value = match key.as_str() {
                "NATS_CREDS" | "NATS_CA" | "NATS_CERT" | "NATS_KEY" => {
                    let inside = format!("/run/wharf/{}", key.to_ascii_lowercase());
                    command.args(["--volume", &format!("{value}:{inside}:ro")]);
                    inside
                }
                _ => value.clone(),
            };
            let secret = matches!(key.as_str(), "NATS_PASSWORD" | "NATS_TOKEN" | "NATS_NKEY")
                || (key == "NATS_URL" && value.contains('@'));
            if secret {
                // `--env NAME` takes the value from the docker command's own
                // environment, so no secret is on a command line (`ps`).
                command.args(["--env", key]).env(key, value);
            } else {
                command.args(["--env", &format!("{key}={value}")]);
            }
        }
        command.args(["--env", &format!("WHARF_CONTAINER={name}")]);
        command.arg(&self.image).args(&self.args);
        let output = command.stdin(Stdio::null()).output().map_err(|e| {
            Error::new(
                ErrorKind::Process,
                format!(
                    "cannot run docker for service `{}`: {e}; is Docker installed?",
                    launch.service
                ),
            )
            .with_source(e)
        })?;
        if !output.status.success() {
            return Err(Error::new(
                ErrorKind::Process,
                format!(
                    "docker run {} for service `{}` failed: {}",
                    self.image,
                    launch.service,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            ));
        }
        Ok(Box::new(Container::new(name)))
    }
}

/// The container name of instance `instance`.
pub fn container_name(instance: &str) -> String {
    format!("wharf-{instance}")
}

/// A container, by name.
pub(super) struct Container {
    name: String,
    /// When `docker inspect` last found it running: the supervisor asks
    /// every tick, and one `docker` process per container per tick is more
    /// than a death noticed within a second is worth.
    seen_running: Option<std::time::Instant>,
}

impl Container {
    pub(super) fn new(name: String) -> Container {
        Container {
            name,
            seen_running: None,
        }
    }
}

impl Instance for Container {
    fn location(&self) -> String {
        format!("container {}", self.name)
    }

    fn alive(&mut self) -> bool {
        let fresh = self
            .seen_running
            .is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(1));
        if fresh {
            return true;
        }
        let running = running(&self.name);
        self.seen_running = running.then(std::time::Instant::now);
        running
    }

    fn kill(&mut self) {
        self.seen_running = None;
        docker(&["kill", &self.name]);
    }

    fn terminate(&mut self) {
        docker(&["kill", "--signal", "TERM", &self.name]);
    }
}

/// Whether container `name` runs.
fn running(name: &str) -> bool {
    Command::new("docker")
        .args(["inspect", "--format", "{{.State.Running}}", name])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"true"))
}

fn docker(args: &[&str]) {
    let _ = Command::new("docker")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
