//! `wharf.toml`: the services `wharf up` keeps running and how each is
//! scaled, checked as it is read.

use crate::backend::{Backend, DockerBackend, ProcessBackend};
use crate::error::{Error, ErrorKind};
use crate::scaler::ScalePolicy;
use crate::settings::{parse_duration, FileSettings, Settings};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};

/// `wharf.toml`: what `wharf up` runs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpConfig {
    /// Where NATS is; `wharf up` starts a nats-server when `url` is unset.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// The services to keep running.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// Programs that call the services, each limited to some functions
    /// (`wharf auth` writes their permissions).
    #[serde(default, rename = "caller")]
    pub callers: Vec<CallerConfig>,
}

/// One `[[caller]]` of `wharf.toml`: a program allowed to call some
/// functions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerConfig {
    /// Its user name.
    pub name: String,
    /// The functions it may call, as `service.function`; empty: every
    /// function of every declared service.
    #[serde(default)]
    pub functions: Vec<String>,
}

/// `[broker]` of `wharf.toml`: where NATS is and how to connect to it.
pub type BrokerConfig = FileSettings;

/// One `[[service]]` of `wharf.toml`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The wharf service name (as in `wharf.<service>.<function>`).
    pub name: String,
    /// `process` (the default), `docker` or `swarm`.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Process backend: the program and its arguments. Docker backend: the
    /// arguments after the image (for example `["worker"]`).
    #[serde(default)]
    pub command: Vec<String>,
    /// Docker and swarm backends: a locally built image (nothing is
    /// pulled; for a swarm, built on every node).
    pub image: Option<String>,
    /// Docker and swarm backends: the network the instances join; unset,
    /// the host's (so the supervisor's `NATS_URL` works inside).
    pub network: Option<String>,
    /// Extra environment for each instance.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Fewest instances (0: scale to zero when idle).
    #[serde(default = "default_min")]
    pub min: usize,
    /// Most instances.
    #[serde(default = "default_max")]
    pub max: usize,
    /// Average CPU per instance to aim for, percent of one core.
    #[serde(default = "default_cpu_target")]
    pub cpu_target: f32,
    /// Average CPU below which an instance may go.
    #[serde(default = "default_cpu_low")]
    pub cpu_low: f32,
    /// Waiting calls per instance above which instances are added.
    #[serde(default = "default_backlog")]
    pub backlog_per_instance: usize,
    /// How long load must stay low before an instance goes, e.g. `"10s"`.
    #[serde(default = "default_scale_down_after")]
    pub scale_down_after: String,
    /// With `min = 0`: idle time before the last instance goes.
    #[serde(default = "default_idle_to_zero")]
    pub idle_to_zero: String,
    /// Functions this service's functions call, as `service.function`
    /// (`wharf auth` lets its workers call only these).
    #[serde(default)]
    pub calls: Vec<String>,
}

impl std::fmt::Debug for ServiceConfig {
    /// The environment by name only: it may hold credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceConfig")
            .field("name", &self.name)
            .field("backend", &self.backend)
            .field("command", &self.command)
            .field("image", &self.image)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("min", &self.min)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

fn default_backend() -> String {
    "process".to_owned()
}

fn default_min() -> usize {
    1
}

fn default_max() -> usize {
    4
}

fn default_cpu_target() -> f32 {
    50.0
}

fn default_cpu_low() -> f32 {
    30.0
}

fn default_backlog() -> usize {
    50
}

fn default_scale_down_after() -> String {
    "10s".to_owned()
}

fn default_idle_to_zero() -> String {
    "60s".to_owned()
}

impl UpConfig {
    /// Parses and checks `wharf.toml` text.
    pub fn from_toml(text: &str) -> Result<UpConfig, Error> {
        // The parser's own text quotes the failing line, which may hold a
        // password: say where and what, not the line.
        let config: UpConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            let at = line.map(|l| format!(", line {l}")).unwrap_or_default();
            Error::new(
                ErrorKind::Config,
                format!("wharf.toml{at}: {}", e.message()),
            )
        })?;
        let function = |what: &str, name: &str| -> Result<(), Error> {
            let valid = name.split_once('.').is_some_and(|(s, f)| {
                crate::wire::subjects::valid_id(s.as_bytes())
                    && crate::wire::subjects::valid_id(f.as_bytes())
            });
            if valid {
                Ok(())
            } else {
                Err(Error::new(
                    ErrorKind::Config,
                    format!("wharf.toml, {what}: `{name}` is not `service.function`"),
                ))
            }
        };
        let name = |what: &str, name: &str| -> Result<(), Error> {
            if crate::wire::subjects::valid_id(name.as_bytes()) {
                Ok(())
            } else {
                Err(Error::new(
                    ErrorKind::Config,
                    format!("wharf.toml, {what} `{}`: a name is 1 to 128 characters of A-Z, a-z, 0-9, '-' and '_'", crate::wire::subjects::shown(name)),
                ))
            }
        };
        for service in &config.services {
            name("service", &service.name)?;
        }
        for caller in &config.callers {
            name("caller", &caller.name)?;
        }
        for service in &config.services {
            for name in &service.calls {
                function(&format!("service `{}` calls", service.name), name)?;
            }
        }
        for caller in &config.callers {
            for name in &caller.functions {
                function(&format!("caller `{}` functions", caller.name), name)?;
            }
        }
        let mut names = HashSet::new();
        for service in &config.services {
            service.policy()?;
            service.backend().map_err(|e| {
                if e.message().starts_with("wharf.toml") {
                    e
                } else {
                    let message =
                        format!("wharf.toml, service `{}`: {}", service.name, e.message());
                    e.with_message(message)
                }
            })?;
            if !names.insert(service.name.as_str()) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("wharf.toml: service `{}` is declared twice", service.name),
                ));
            }
        }
        Ok(config)
    }

    /// The settings of a process run by this file: its `[broker]` keys,
    /// overridden by the environment, checked by the same rules.
    pub fn settings(&self) -> Result<Settings, Error> {
        Settings::with_file(&self.broker)
    }

    /// Reads and checks a `wharf.toml` file.
    pub fn load(path: &std::path::Path) -> Result<UpConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("cannot read {}: {e}", path.display()),
            )
            .with_source(e)
        })?;
        UpConfig::from_toml(&text)
    }
}

impl ServiceConfig {
    /// A service run by the process backend with default scaling.
    pub fn process(name: &str, command: Vec<String>) -> ServiceConfig {
        ServiceConfig {
            name: name.to_owned(),
            backend: default_backend(),
            command,
            image: None,
            network: None,
            env: BTreeMap::new(),
            min: default_min(),
            max: default_max(),
            cpu_target: default_cpu_target(),
            cpu_low: default_cpu_low(),
            backlog_per_instance: default_backlog(),
            scale_down_after: default_scale_down_after(),
            idle_to_zero: default_idle_to_zero(),
            calls: Vec::new(),
        }
    }

    /// The scaling rules, checked.
    pub fn policy(&self) -> Result<ScalePolicy, Error> {
        let bad = |what: String| {
            Error::new(
                ErrorKind::Config,
                format!("wharf.toml, service `{}`: {what}", self.name),
            )
        };
        if self.max == 0 || self.min > self.max {
            return Err(bad(format!(
                "min {} and max {} do not allow any instance; need 0 <= min <= max and max >= 1",
                self.min, self.max
            )));
        }
        if !(self.cpu_target > 0.0 && self.cpu_target <= 10_000.0) {
            return Err(bad(format!(
                "cpu_target ({}) must be above 0 and at most 10000 (percent of one core)",
                self.cpu_target
            )));
        }
        if self.backlog_per_instance == 0 {
            return Err(bad(
                "backlog_per_instance must be at least 1 (waiting calls per instance before one is added)".to_owned(),
            ));
        }
        if !(self.cpu_low < self.cpu_target && self.cpu_low >= 0.0) {
            return Err(bad(format!(
                "cpu_low ({}) must be below cpu_target ({})",
                self.cpu_low, self.cpu_target
            )));
        }
        let duration = |text: &str, what: &str| {
            parse_duration(text).map_err(|_| {
                bad(format!(
                    "{what} `{text}` is not a duration such as \"500ms\", \"10s\" or \"2m\""
                ))
            })
        };
        Ok(ScalePolicy {
            min: self.min,
            max: self.max,
            cpu_target: self.cpu_target,
            cpu_low: self.cpu_low,
            backlog_per_instance: self.backlog_per_instance,
            scale_down_after: duration(&self.scale_down_after, "scale_down_after")?,
            idle_to_zero: duration(&self.idle_to_zero, "idle_to_zero")?,
        })
    }

    /// What an instance of this service is made from, as 12 hex digits:
    /// its backend, command, image, network and environment. Instances of
    /// another revision are replaced by a rollout. A one-way hash (SHA-256):
    /// environment values may be credentials.
    pub fn revision(&self) -> String {
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        // Each part with its length first, so no two configs hash alike by
        // moving text from one part to the next.
        let mut part = |bytes: &[u8]| {
            hash.update(&(bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        part(self.backend.as_bytes());
        part(&(self.command.len() as u64).to_le_bytes());
        for arg in &self.command {
            part(arg.as_bytes());
        }
        part(self.image.as_deref().unwrap_or("").as_bytes());
        part(self.network.as_deref().unwrap_or("").as_bytes());
        for (name, value) in &self.env {
            part(name.as_bytes());
            part(value.as_bytes());
        }
        hash.finish().as_ref()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub(crate) fn backend(&self) -> Result<Box<dyn Backend>, Error> {
        match self.backend.as_str() {
            "process" => Ok(Box::new(ProcessBackend::new(self.command.clone())?)),
            "docker" => Ok(Box::new(DockerBackend::new(
                self.image.clone().unwrap_or_default(),
                self.command.clone(),
                self.network.clone(),
            )?)),
            #[cfg(feature = "swarm")]
            "swarm" => Ok(Box::new(crate::backend::SwarmBackend::new(
                self.image.clone().unwrap_or_default(),
                self.command.clone(),
                self.network.clone(),
            )?)),
            #[cfg(not(feature = "swarm"))]
            "swarm" => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "wharf.toml, service `{}`: this build of wharf has no swarm backend: build it with the `swarm` feature (the `wharf` command has it)",
                    self.name
                ),
            )),
            other => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "wharf.toml, service `{}`: unknown backend `{other}`; use `process`, `docker` or `swarm`",
                    self.name
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn configs_are_checked() {
        let config = UpConfig::from_toml(
            r#"
            [broker]
            url = "nats://127.0.0.1:4222"
            [[service]]
            name = "autoscale"
            command = ["target/release/autoscale", "worker"]
            min = 1
            max = 4
            "#,
        )
        .unwrap();
        assert_eq!(config.services[0].policy().unwrap().max, 4);
        assert_eq!(config.broker.url.as_deref(), Some("nats://127.0.0.1:4222"));

        let error =
            UpConfig::from_toml("[[service]]\nname = \"a\"\nmin = 5\nmax = 2\ncommand = [\"x\"]")
                .unwrap_err();
        assert!(error.message().contains("min 5 and max 2"), "{error}");
        let error = UpConfig::from_toml(
            "[[service]]\nname = \"a\"\ncommand = [\"x\"]\nscale_down_after = \"soon\"",
        )
        .unwrap_err();
        assert!(
            error.message().contains("scale_down_after `soon`"),
            "{error}"
        );
        let error = UpConfig::from_toml("[[service]]\nname = \"a\"\nreplicas = 3").unwrap_err();
        assert!(
            error.message().contains("unknown field `replicas`"),
            "{error}"
        );
        let twice = "[[service]]\nname = \"a\"\ncommand = [\"x\"]\n[[service]]\nname = \"a\"\ncommand = [\"x\"]";
        assert!(UpConfig::from_toml(twice)
            .unwrap_err()
            .message()
            .contains("declared twice"));
        assert!(ServiceConfig::process("a", vec![]).backend().is_err());
        for (bad, said) in [
            ("name = \"a.b\"\ncommand = [\"x\"]", "service `a.b`"),
            ("name = \"a\"", "command"),
            (
                "name = \"a\"\ncommand = [\"x\"]\nbackend = \"k8s\"",
                "unknown backend",
            ),
            (
                "name = \"a\"\ncommand = [\"x\"]\nbacklog_per_instance = 0",
                "backlog_per_instance",
            ),
            (
                "name = \"a\"\ncommand = [\"x\"]\ncpu_target = -5.0",
                "cpu_target",
            ),
        ] {
            let error = UpConfig::from_toml(&format!("[[service]]\n{bad}")).unwrap_err();
            assert!(error.message().contains(said), "{bad}: {error}");
        }
        let secret = ServiceConfig {
            env: [("NATS_PASSWORD".to_owned(), "hunter2".to_owned())].into(),
            ..ServiceConfig::process("a", vec!["x".into()])
        };
        assert!(!format!("{secret:?}").contains("hunter2"));
    }

    #[test]
    fn revisions_change_with_what_instances_are_made_from() {
        let base = ServiceConfig::process("a", vec!["svc".into(), "worker".into()]);
        let revision = base.revision();
        assert_eq!(revision.len(), 12);
        assert_eq!(revision, base.clone().revision(), "stable");
        // Scaling is not part of it: a new `max` rolls nothing.
        assert_eq!(
            ServiceConfig {
                max: 9,
                ..base.clone()
            }
            .revision(),
            revision
        );
        for changed in [
            ServiceConfig::process("a", vec!["svc".into(), "worker2".into()]),
            ServiceConfig::process("a", vec!["svcworker".into()]),
            ServiceConfig {
                env: [("K".to_owned(), "v".to_owned())].into(),
                ..base.clone()
            },
            ServiceConfig {
                image: Some("img".into()),
                ..base.clone()
            },
        ] {
            assert_ne!(changed.revision(), revision, "{changed:?}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("ten").is_err());
    }
}
