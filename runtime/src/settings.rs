//! Settings: every `WHARF_*` variable (and `NATS_URL`) read and checked in
//! one place, once per process, with one rule: a value that is set but
//! invalid is an error naming the variable, the value and what is allowed;
//! an unset (or empty) variable takes its default.
//!
//! `wharf.toml`'s `[broker]` keys are read through the same rules
//! ([`Settings::with_file`]); the environment overrides the file.

use crate::error::{Error, ErrorKind};
use crate::wire::subjects;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// Calls one worker runs at once unless `WHARF_CONCURRENCY` says otherwise.
pub const DEFAULT_CONCURRENCY: usize = 1024;

/// The most calls one worker runs at once (permits are counted in `u32`).
pub const MAX_CONCURRENCY: usize = 1 << 20;

/// How long a result stays collectable unless `WHARF_RESULTS_TTL` says
/// otherwise.
pub const DEFAULT_RESULTS_TTL: Duration = Duration::from_secs(3600);

/// A consumer's ack wait unless `WHARF_ACK_WAIT` says otherwise: how long a
/// call held by a dead worker waits for redelivery. A live worker extends
/// it while a long call runs.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(10);

/// Deliveries of one durable call before it is dead-lettered, unless
/// `WHARF_MAX_DELIVER` says otherwise.
pub const DEFAULT_MAX_DELIVER: i64 = 5;

/// How long a transaction lives after its last call unless
/// `WHARF_TXN_LEASE` says otherwise.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Worker processes local mode starts unless `WHARF_WORKERS` says otherwise.
pub const DEFAULT_WORKERS: usize = 2;

/// Most worker processes local mode scales to unless `WHARF_MAX_WORKERS`
/// says otherwise.
pub const DEFAULT_MAX_WORKERS: usize = 4;

/// What this process was started as (`WHARF_ROLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A program that calls (and, in local mode, starts workers).
    Caller,
    /// A worker: it serves every microservice linked into it.
    Worker,
    /// Prints the microservices linked into it as JSON and exits, without
    /// connecting (`wharf auth` reads a binary's functions this way).
    Describe,
    /// Asks the worker `WHARF_INSTANCE_ID` to drain, waits until it has
    /// stopped, and exits (a Kubernetes preStop hook).
    Drain,
}

/// How this process writes its log lines (`WHARF_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One readable line per event (the default).
    #[default]
    Text,
    /// One JSON object per line, for a log collector.
    Json,
}

impl LogFormat {
    /// `WHARF_LOG_FORMAT`'s value: unset or empty is [`LogFormat::Text`].
    pub fn from_env() -> Result<LogFormat, Error> {
        LogFormat::parse(std::env::var("WHARF_LOG_FORMAT").ok().as_deref())
    }

    fn parse(value: Option<&str>) -> Result<LogFormat, Error> {
        match value.map(str::trim) {
            None | Some("") | Some("text") => Ok(LogFormat::Text),
            Some("json") => Ok(LogFormat::Json),
            Some(other) => Err(invalid(
                "WHARF_LOG_FORMAT",
                other,
                "`text` (readable lines, the default) or `json` (one object per line)",
            )),
        }
    }
}

/// Every setting of this process, checked. Its `Debug` shows the URL
/// redacted and secrets as `***`.
#[derive(Clone)]
pub struct Settings {
    /// `NATS_URL`: the server(s) to connect to; `None` means local mode.
    pub nats_url: Option<String>,
    /// `WHARF_PREFIX`: the subject prefix.
    pub prefix: String,
    /// `WHARF_ROLE` (or a first argument `worker`).
    pub role: Role,
    /// `WHARF_LOG_FORMAT`: readable lines or JSON.
    pub log_format: LogFormat,
    /// `WHARF_WORKERS`: local mode's worker processes.
    pub workers: usize,
    /// `WHARF_MAX_WORKERS`: local mode scales up to this many.
    pub max_workers: usize,
    /// `WHARF_CONCURRENCY`: calls one worker runs at once.
    pub concurrency: usize,
    /// `WHARF_BACKLOG`: calls that may wait for a slot; `None`: as many as
    /// `concurrency`.
    pub backlog: Option<usize>,
    /// `WHARF_INSTANCE_ID`: the instance id a supervisor gave this worker.
    pub instance_id: Option<String>,
    /// `WHARF_CONTAINER`: the container this worker runs in, if any.
    pub container: Option<String>,
    /// `WHARF_REVISION`: the revision of the `wharf.toml` service a
    /// supervisor started this worker from (its heartbeat reports it).
    pub revision: Option<String>,
    /// `WHARF_OBJECT_STORE`: where new objects go; `None`: JetStream.
    pub object_store: Option<String>,
    /// `WHARF_TXN_LEASE`: the lease of new transactions.
    pub txn_lease: Duration,
    /// `WHARF_SPILL_BYTES`: payloads above this go to the object store;
    /// `None`: the server's `max_payload` decides.
    pub spill_bytes: Option<usize>,
    /// `WHARF_ACK_WAIT`: durable consumers' ack wait.
    pub ack_wait: Duration,
    /// `WHARF_MAX_DELIVER`: deliveries before a durable call is dead-lettered.
    pub max_deliver: i64,
    /// `WHARF_RESULTS_TTL`: how long results stay collectable.
    pub results_ttl: Duration,
    /// `WHARF_NATS_SERVER`: the nats-server binary local mode starts.
    pub nats_server: Option<PathBuf>,
    /// `WHARF_READY_SUBJECT`: where a local-mode worker says it serves.
    pub ready_subject: Option<String>,
    /// `WHARF_PARENT_PID`: the local-mode program that started this worker.
    pub parent_pid: Option<u32>,
    /// `WHARF_REPLICAS` (or `[broker] replicas`): replicas of every stream
    /// and bucket wharf creates; `None`: 3 on a cluster of at least 3
    /// servers, else 1.
    pub replicas: Option<usize>,
    /// `WHARF_PLACEMENT` (comma-separated, or `[broker] placement`, a
    /// list): JetStream placement tags of the streams wharf creates.
    pub placement: Vec<String>,
    /// `WHARF_METRICS_PORT`: serve Prometheus metrics on this port (0: any
    /// free port); `None`: no metrics.
    pub metrics_port: Option<u16>,
    /// `WHARF_COALESCE` (`on`, the default, or `off`): whether calls of a
    /// function in flight together from one connection travel in batches
    /// (docs/protocol.md, "Coalesced calls").
    pub coalesce: bool,
    /// How to authenticate to NATS and check the server (`NATS_USER`,
    /// `NATS_CREDS`, `NATS_CA`, ...).
    pub credentials: Credentials,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("nats_url", &self.nats_url.as_deref().map(redact))
            .field("prefix", &self.prefix)
            .field("role", &self.role)
            .field("log_format", &self.log_format)
            .field("workers", &self.workers)
            .field("max_workers", &self.max_workers)
            .field("concurrency", &self.concurrency)
            .field("backlog", &self.backlog)
            .field("replicas", &self.replicas)
            .field("placement", &self.placement)
            .field("metrics_port", &self.metrics_port)
            .field("coalesce", &self.coalesce)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

/// `[broker]` of `wharf.toml`: where NATS is and how to connect to it. The
/// environment overrides each key (`NATS_URL`, `WHARF_PREFIX`, `NATS_USER`,
/// ...).
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    /// NATS URL(s), comma-separated.
    pub url: Option<String>,
    /// Subject prefix.
    pub prefix: Option<String>,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<String>,
    /// Authentication token.
    pub token: Option<String>,
    /// NKey seed, or a file holding one.
    pub nkey: Option<String>,
    /// Creds file (JWT and NKey seed).
    pub creds: Option<String>,
    /// CA certificate(s) of the server's certificate.
    pub ca: Option<String>,
    /// Client certificate (mutual TLS).
    pub cert: Option<String>,
    /// Client private key (mutual TLS).
    pub key: Option<String>,
    /// TLS before the NATS handshake.
    pub tls_first: Option<bool>,
    /// The inbox prefix of this deployment's connections.
    pub inbox_prefix: Option<String>,
    /// Replicas of every stream and bucket (1 to 5).
    pub replicas: Option<usize>,
    /// JetStream placement tags of the streams wharf creates.
    pub placement: Option<Vec<String>>,
    /// `random` (NATS's default) or `listed`: the order servers are tried.
    pub server_order: Option<String>,
}

impl std::fmt::Debug for FileSettings {
    /// Secrets as `***`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |value: &Option<String>| value.as_ref().map(|_| "***");
        f.debug_struct("FileSettings")
            .field("url", &self.url.as_deref().map(redact))
            .field("prefix", &self.prefix)
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("nkey", &hidden(&self.nkey))
            .field("creds", &self.creds)
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("tls_first", &self.tls_first)
            .field("inbox_prefix", &self.inbox_prefix)
            .field("replicas", &self.replicas)
            .field("placement", &self.placement)
            .field("server_order", &self.server_order)
            .finish()
    }
}

/// A secret setting (password, token, NKey seed): shown as `***` by
/// `Debug`, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret.
    pub fn new(secret: impl Into<String>) -> Secret {
        Secret(secret.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// How this process proves who it is to NATS and checks the server, by the
/// NATS conventions: `NATS_USER`/`NATS_PASSWORD`, `NATS_TOKEN`,
/// `NATS_NKEY` (a seed, or a file holding one), `NATS_CREDS` (a creds
/// file), `NATS_CA`, `NATS_CERT`/`NATS_KEY`, `NATS_TLS_FIRST`; or the same
/// keys under `[broker]` in `wharf.toml`. A user and password in `NATS_URL`
/// (`nats://alice:secret@host:4222`) work too.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    /// `NATS_USER`.
    pub user: Option<String>,
    /// `NATS_PASSWORD`.
    pub password: Option<Secret>,
    /// `NATS_TOKEN`.
    pub token: Option<Secret>,
    /// `NATS_NKEY`: the seed (`SU…`).
    pub nkey: Option<Secret>,
    /// `NATS_CREDS`: a creds file (JWT and NKey seed), as `nsc` writes.
    pub creds: Option<PathBuf>,
    /// `NATS_CA`: the CA certificate(s) that sign the server's.
    pub ca: Option<PathBuf>,
    /// `NATS_CERT`: this client's certificate (mutual TLS).
    pub cert: Option<PathBuf>,
    /// `NATS_KEY`: this client's private key (mutual TLS).
    pub key: Option<PathBuf>,
    /// `NATS_TLS_FIRST`: TLS before the NATS handshake, for servers set to
    /// `handshake_first`.
    pub tls_first: bool,
    /// `WHARF_INBOX_PREFIX`: the inbox prefix of the connections made with
    /// these credentials, for permissions that give each user its own
    /// inboxes (`wharf auth` gives user `U` `_INBOX.U`); `None`: `_INBOX`.
    /// Durable replies may go there as well as to `_INBOX`.
    pub inbox_prefix: Option<String>,
    /// `WHARF_SERVER_ORDER=listed` (or `[broker] server_order`): try the
    /// servers of the URL list in the order given, the first that answers
    /// (a process's nearest node first), rather than in NATS's random order.
    pub servers_in_order: bool,
}

impl Credentials {
    /// Reads the credentials through `var`, then `file`; checks that they
    /// make sense together and that the files they name can be read.
    fn read(
        var: &dyn Fn(&str) -> Option<String>,
        file: Option<&FileSettings>,
    ) -> Result<Credentials, Error> {
        let pick =
            |name: &str, key: &str, from_file: Option<&String>| -> Option<(String, String)> {
                match var(name) {
                    Some(value) => Some((name.to_owned(), value)),
                    None => from_file
                        .filter(|v| !v.trim().is_empty())
                        .map(|v| (format!("wharf.toml [broker] {key}"), v.clone())),
                }
            };
        let f = |get: fn(&FileSettings) -> Option<&String>| file.and_then(get);
        let user = pick("NATS_USER", "user", f(|f| f.user.as_ref()));
        let password = pick("NATS_PASSWORD", "password", f(|f| f.password.as_ref()));
        let token = pick("NATS_TOKEN", "token", f(|f| f.token.as_ref()));
        let nkey = pick("NATS_NKEY", "nkey", f(|f| f.nkey.as_ref()));
        let creds = pick("NATS_CREDS", "creds", f(|f| f.creds.as_ref()));
        let ca = pick("NATS_CA", "ca", f(|f| f.ca.as_ref()));
        let cert = pick("NATS_CERT", "cert", f(|f| f.cert.as_ref()));
        let key = pick("NATS_KEY", "key", f(|f| f.key.as_ref()));
        let inbox_prefix = match pick(
            "WHARF_INBOX_PREFIX",
            "inbox_prefix",
            f(|f| f.inbox_prefix.as_ref()),
        ) {
            Some((name, prefix)) => Some(check_prefix(&name, prefix)?),
            None => None,
        }
        .filter(|prefix| prefix != subjects::DEFAULT_INBOX_PREFIX);
        let servers_in_order =
            match var("WHARF_SERVER_ORDER")
                .map(|v| ("WHARF_SERVER_ORDER", v))
                .or_else(|| {
                    file.and_then(|f| f.server_order.clone())
                        .map(|v| ("wharf.toml [broker] server_order", v))
                }) {
                None => false,
                Some((name, order)) => match order.trim() {
                    "random" => false,
                    "listed" => true,
                    other => return Err(invalid(
                        name,
                        other,
                        "`random` (try servers in a random order) or `listed` (in the order given)",
                    )),
                },
            };
        let tls_first = match var("NATS_TLS_FIRST") {
            Some(text) => {
                switch(&text).ok_or_else(|| invalid("NATS_TLS_FIRST", &text, "true or false"))?
            }
            None => file.and_then(|f| f.tls_first).unwrap_or(false),
        };
        match (&user, &password) {
            (Some((name, _)), None) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("{name} is set without a password: set NATS_PASSWORD (or [broker] password) too"),
                ))
            }
            (None, Some((name, _))) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("{name} is set without a user: set NATS_USER (or [broker] user) too"),
                ))
            }
            _ => {}
        }
        let methods: Vec<&str> = [
            user.as_ref().map(|_| "a user and password"),
            token.as_ref().map(|(n, _)| n.as_str()),
            nkey.as_ref().map(|(n, _)| n.as_str()),
            creds.as_ref().map(|(n, _)| n.as_str()),
        ]
        .into_iter()
        .flatten()
        .collect();
        if methods.len() > 1 {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "{} are set; a connection authenticates one way: keep one of them",
                    methods.join(" and ")
                ),
            ));
        }
        let readable = |setting: Option<(String, String)>| -> Result<Option<PathBuf>, Error> {
            let Some((name, path)) = setting else {
                return Ok(None);
            };
            let given = PathBuf::from(path.trim());
            // Absolute, so a process started elsewhere (or a container
            // mount) finds the same file.
            let path = std::fs::canonicalize(&given).unwrap_or(given);
            std::fs::metadata(&path)
                .and_then(|m| {
                    if m.is_file() {
                        Ok(())
                    } else {
                        Err(std::io::Error::other("not a file"))
                    }
                })
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Config,
                        format!(
                            "{name} names `{}`, which cannot be read: {e}",
                            path.display()
                        ),
                    )
                    .with_source(e)
                })?;
            Ok(Some(path))
        };
        let nkey = match nkey {
            Some((name, value)) => Some(Secret(nkey_seed(&name, value.trim())?)),
            None => None,
        };
        let cert = readable(cert)?;
        let key = readable(key)?;
        if cert.is_some() != key.is_some() {
            return Err(Error::new(
                ErrorKind::Config,
                "a client certificate needs its key: set both NATS_CERT and NATS_KEY (or [broker] cert and key)",
            ));
        }
        Ok(Credentials {
            user: user.map(|(_, v)| v),
            password: password.map(|(_, v)| Secret(v)),
            token: token.map(|(_, v)| Secret(v)),
            nkey,
            creds: readable(creds)?,
            ca: readable(ca)?,
            cert,
            key,
            tls_first,
            inbox_prefix,
            servers_in_order,
        })
    }

    /// The inbox prefix of connections made with these credentials.
    pub fn inbox_prefix(&self) -> &str {
        self.inbox_prefix
            .as_deref()
            .unwrap_or(subjects::DEFAULT_INBOX_PREFIX)
    }

    /// Which credentials these are, for messages: never a secret.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(user) = &self.user {
            parts.push(format!("user `{user}` with a password"));
        }
        if self.token.is_some() {
            parts.push("a token".to_owned());
        }
        if self.nkey.is_some() {
            parts.push("an NKey".to_owned());
        }
        if let Some(creds) = &self.creds {
            parts.push(format!("creds file `{}`", creds.display()));
        }
        if let Some(cert) = &self.cert {
            parts.push(format!("client certificate `{}`", cert.display()));
        }
        if parts.is_empty() {
            "no credentials".to_owned()
        } else {
            parts.join(", ")
        }
    }

    /// The environment that hands these credentials to a process this one
    /// starts (never its command line): variable, value.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = Vec::new();
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        if let Some(user) = &self.user {
            env.push(("NATS_USER", user.clone()));
        }
        if let Some(password) = &self.password {
            env.push(("NATS_PASSWORD", password.expose().to_owned()));
        }
        if let Some(token) = &self.token {
            env.push(("NATS_TOKEN", token.expose().to_owned()));
        }
        if let Some(seed) = &self.nkey {
            env.push(("NATS_NKEY", seed.expose().to_owned()));
        }
        for (name, value) in [
            ("NATS_CREDS", &self.creds),
            ("NATS_CA", &self.ca),
            ("NATS_CERT", &self.cert),
            ("NATS_KEY", &self.key),
        ] {
            if let Some(value) = value {
                env.push((name, path(value)));
            }
        }
        if self.tls_first {
            env.push(("NATS_TLS_FIRST", "true".to_owned()));
        }
        if let Some(prefix) = &self.inbox_prefix {
            env.push(("WHARF_INBOX_PREFIX", prefix.clone()));
        }
        if self.servers_in_order {
            env.push(("WHARF_SERVER_ORDER", "listed".to_owned()));
        }
        env
    }
}

/// An NKey user seed given directly or as a file holding one; the error
/// never shows the value.
fn nkey_seed(name: &str, value: &str) -> Result<String, Error> {
    let seed = if value.starts_with("SU") {
        value.to_owned()
    } else {
        match std::fs::read_to_string(value) {
            Ok(text) => text.trim().to_owned(),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("{name} must be an NKey user seed (`SU…`) or a file holding one; it is neither (a value of {} characters)", value.len()),
                ))
            }
        }
    };
    if seed.starts_with("SU") && seed.len() == 58 {
        Ok(seed)
    } else {
        Err(Error::new(
            ErrorKind::Config,
            format!("{name} does not hold an NKey user seed: expected 58 characters starting with `SU` (as `nk -gen user` writes)"),
        ))
    }
}

/// This process's settings, read from the environment once.
static SETTINGS: OnceLock<Result<Settings, Error>> = OnceLock::new();

/// This process's settings when a `wharf.toml` gave them
/// ([`Settings::install`]).
static INSTALLED: OnceLock<Settings> = OnceLock::new();

impl Settings {
    /// This process's settings, read from the environment on first use.
    /// Every later call returns the same settings (or the same error).
    pub fn get() -> Result<&'static Settings, Error> {
        if let Some(installed) = INSTALLED.get() {
            return Ok(installed);
        }
        SETTINGS
            .get_or_init(|| Settings::read(&|name| std::env::var(name).ok(), None))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Makes `file`'s keys, overridden by the environment, this process's
    /// settings (what [`Settings::get`] returns from then on), for a
    /// process run by a `wharf.toml` (`wharf up`): its streams and buckets
    /// then follow `[broker] replicas` and `placement` too. The first
    /// installed settings stay.
    pub fn install(file: &FileSettings) -> Result<&'static Settings, Error> {
        let settings = Settings::with_file(file)?;
        Ok(INSTALLED.get_or_init(|| settings))
    }

    /// The settings of a process that also reads `wharf.toml`: its keys,
    /// overridden by the environment.
    pub fn with_file(file: &FileSettings) -> Result<Settings, Error> {
        Settings::read(&|name| std::env::var(name).ok(), Some(file))
    }

    /// Reads every setting through `env`, then `file` for what `env` does
    /// not set.
    pub(crate) fn read(
        env: &dyn Fn(&str) -> Option<String>,
        file: Option<&FileSettings>,
    ) -> Result<Settings, Error> {
        let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let nats_url = match var("NATS_URL") {
            Some(url) => Some(check_url("NATS_URL", &url)?),
            None => match file.and_then(|f| f.url.clone()) {
                Some(url) => Some(check_url("wharf.toml [broker] url", &url)?),
                None => None,
            },
        };
        let prefix = match var("WHARF_PREFIX") {
            Some(prefix) => check_prefix("WHARF_PREFIX", prefix)?,
            None => match file.and_then(|f| f.prefix.clone()) {
                Some(prefix) => check_prefix("wharf.toml [broker] prefix", prefix)?,
                None => subjects::DEFAULT_PREFIX.to_owned(),
            },
        };
        let role = match var("WHARF_ROLE").as_deref().map(str::trim) {
            None => Role::Caller,
            Some("worker") => Role::Worker,
            Some("describe") => Role::Describe,
            Some("drain") => Role::Drain,
            Some(other) => {
                return Err(invalid(
                    "WHARF_ROLE",
                    other,
                    "`worker`, `describe` (print the functions and exit), `drain` (drain the worker WHARF_INSTANCE_ID and exit), or unset for a program that calls",
                ))
            }
        };
        let log_format = LogFormat::parse(var("WHARF_LOG_FORMAT").as_deref())?;
        // Spans are exported from the moment logging starts; a variable it
        // could not use fails the settings here, with the same message.
        #[cfg(feature = "otel")]
        crate::otel::from_vars(var)?;
        let workers = number(&var, "WHARF_WORKERS", 0, 1024)?.unwrap_or(DEFAULT_WORKERS);
        let max_workers = match number(&var, "WHARF_MAX_WORKERS", 1, 1024)? {
            Some(max) if max < workers => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("WHARF_MAX_WORKERS is {max}, fewer than WHARF_WORKERS ({workers}): set it to at least {workers}, or unset it"),
                ))
            }
            Some(max) => max,
            None => DEFAULT_MAX_WORKERS.max(workers),
        };
        let concurrency =
            number(&var, "WHARF_CONCURRENCY", 1, MAX_CONCURRENCY)?.unwrap_or(DEFAULT_CONCURRENCY);
        let backlog = number(&var, "WHARF_BACKLOG", 0, MAX_CONCURRENCY)?;
        let instance_id = match var("WHARF_INSTANCE_ID") {
            Some(id) if !subjects::valid_id(id.as_bytes()) => {
                return Err(invalid(
                    "WHARF_INSTANCE_ID",
                    &id,
                    "1 to 128 characters of A-Z, a-z, 0-9, '-' and '_'",
                ))
            }
            id => id,
        };
        let revision = match var("WHARF_REVISION") {
            Some(revision) if !subjects::valid_id(revision.as_bytes()) => {
                return Err(invalid(
                    "WHARF_REVISION",
                    &revision,
                    "1 to 128 characters of A-Z, a-z, 0-9, '-' and '_'",
                ))
            }
            revision => revision,
        };
        let txn_lease = duration(
            &var,
            "WHARF_TXN_LEASE",
            Unit::Seconds,
            Duration::from_secs(1),
        )?
        .unwrap_or(DEFAULT_LEASE);
        let spill_bytes = number(&var, "WHARF_SPILL_BYTES", 1, usize::MAX)?;
        let ack_wait = duration(
            &var,
            "WHARF_ACK_WAIT",
            Unit::Millis,
            Duration::from_millis(100),
        )?
        .unwrap_or(DEFAULT_ACK_WAIT);
        let max_deliver = number(&var, "WHARF_MAX_DELIVER", 1, i64::MAX as usize)?
            .map_or(DEFAULT_MAX_DELIVER, |n| n as i64);
        let results_ttl = duration(
            &var,
            "WHARF_RESULTS_TTL",
            Unit::Seconds,
            Duration::from_secs(1),
        )?
        .unwrap_or(DEFAULT_RESULTS_TTL);
        let parent_pid = number(&var, "WHARF_PARENT_PID", 1, u32::MAX as usize)?.map(|p| p as u32);
        let replicas = match number(&var, "WHARF_REPLICAS", 1, MAX_REPLICAS)? {
            Some(n) => Some(n),
            None => match file.and_then(|f| f.replicas) {
                Some(n) if !(1..=MAX_REPLICAS).contains(&n) => {
                    return Err(invalid(
                        "wharf.toml [broker] replicas",
                        &n.to_string(),
                        &format!("a whole number from 1 to {MAX_REPLICAS}"),
                    ))
                }
                other => other,
            },
        };
        let placement = match var("WHARF_PLACEMENT") {
            Some(tags) => check_tags("WHARF_PLACEMENT", tags.split(',').map(str::to_owned))?,
            None => match file.and_then(|f| f.placement.clone()) {
                Some(tags) => check_tags("wharf.toml [broker] placement", tags.into_iter())?,
                None => Vec::new(),
            },
        };
        let metrics_port =
            number(&var, "WHARF_METRICS_PORT", 0, u16::MAX as usize)?.map(|p| p as u16);
        let coalesce = match var("WHARF_COALESCE") {
            None => true,
            Some(text) => switch(&text).ok_or_else(|| {
                invalid(
                    "WHARF_COALESCE",
                    &text,
                    "`on` (calls in flight together travel in batches, the default) or `off` (every call its own message)",
                )
            })?,
        };
        Ok(Settings {
            nats_url,
            prefix,
            role,
            log_format,
            workers,
            max_workers,
            concurrency,
            backlog,
            instance_id,
            container: var("WHARF_CONTAINER"),
            revision,
            object_store: var("WHARF_OBJECT_STORE"),
            txn_lease,
            spill_bytes,
            ack_wait,
            max_deliver,
            results_ttl,
            nats_server: var("WHARF_NATS_SERVER").map(PathBuf::from),
            ready_subject: var("WHARF_READY_SUBJECT"),
            parent_pid,
            replicas,
            placement,
            metrics_port,
            coalesce,
            credentials: Credentials::read(&var, file)?,
        })
    }
}

/// The most replicas JetStream keeps of a stream.
pub const MAX_REPLICAS: usize = 5;

/// Placement tags: non-empty, printable, no commas or spaces.
fn check_tags(name: &str, tags: impl Iterator<Item = String>) -> Result<Vec<String>, Error> {
    let mut checked = Vec::new();
    for tag in tags {
        let tag = tag.trim().to_owned();
        if tag.is_empty() {
            continue;
        }
        if !tag.chars().all(|c| c.is_ascii_graphic() && c != ',') {
            return Err(invalid(
                name,
                &tag,
                "server tags such as `az:eu-1` (printable, without spaces or commas)",
            ));
        }
        checked.push(tag);
    }
    Ok(checked)
}

/// Parses a duration as people write them: `500ms`, `10s`, `2m`, `1h 30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| e.to_string())
}

/// The unit of a bare number in a duration variable (kept for the
/// variables documented with one).
#[derive(Clone, Copy)]
enum Unit {
    Millis,
    Seconds,
}

/// An on/off setting's value (`on`, `true`, `yes`, `1` or their opposites,
/// in any case); `None` for anything else.
fn switch(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn invalid(name: &str, value: &str, allowed: &str) -> Error {
    Error::new(
        ErrorKind::Config,
        format!("{name} must be {allowed}, got `{value}`"),
    )
}

/// A whole number in `min..=max`, or `None` when unset.
fn number(
    var: &dyn Fn(&str) -> Option<String>,
    name: &str,
    min: usize,
    max: usize,
) -> Result<Option<usize>, Error> {
    let Some(text) = var(name) else {
        return Ok(None);
    };
    let allowed = if max == usize::MAX {
        format!("a whole number of at least {min}")
    } else {
        format!("a whole number from {min} to {max}")
    };
    match text.trim().parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(invalid(name, &text, &allowed)),
    }
}

/// A duration of at least `min`: humantime text (`30s`, `1m`) or a bare
/// number in `unit`; `None` when unset.
fn duration(
    var: &dyn Fn(&str) -> Option<String>,
    name: &str,
    unit: Unit,
    min: Duration,
) -> Result<Option<Duration>, Error> {
    let Some(text) = var(name) else {
        return Ok(None);
    };
    let trimmed = text.trim();
    let parsed = match trimmed.parse::<u64>() {
        Ok(n) => Ok(match unit {
            Unit::Millis => Duration::from_millis(n),
            Unit::Seconds => Duration::from_secs(n),
        }),
        Err(_) => parse_duration(trimmed),
    };
    let bare = match unit {
        Unit::Millis => "milliseconds",
        Unit::Seconds => "seconds",
    };
    match parsed {
        Ok(d) if d >= min => Ok(Some(d)),
        _ => Err(invalid(
            name,
            &text,
            &format!(
                "a duration of at least {} such as \"500ms\", \"30s\" or \"2m\" (a bare number is {bare})",
                humantime::format_duration(min)
            ),
        )),
    }
}

fn check_prefix(name: &str, prefix: String) -> Result<String, Error> {
    let prefix = prefix.trim().to_owned();
    if subjects::valid_prefix(&prefix) {
        Ok(prefix)
    } else {
        Err(invalid(
            name,
            &prefix,
            "subject tokens separated by '.', without spaces, '*' or '>' (for example `wharf` or `team.a`)",
        ))
    }
}

/// Checks a comma-separated list of server URLs; the error shows the list
/// without any password in it.
fn check_url(name: &str, urls: &str) -> Result<String, Error> {
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let scheme = url.split_once("://").map(|(scheme, _)| scheme);
        let known = matches!(scheme, None | Some("nats" | "tls" | "ws" | "wss"));
        let host = url.split_once("://").map_or(url, |(_, rest)| rest);
        let host = host.rsplit_once('@').map_or(host, |(_, host)| host);
        if !known || host.is_empty() || host.contains(char::is_whitespace) {
            return Err(invalid(
                name,
                &redact(urls),
                "one or more server URLs, comma-separated, such as `nats://127.0.0.1:4222` (schemes nats, tls, ws, wss)",
            ));
        }
    }
    Ok(urls.trim().to_owned())
}

/// A server URL list as it may be shown: any password or token in it
/// replaced by `***`.
pub fn redact(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let (scheme, rest) = match url.split_once("://") {
                Some((scheme, rest)) => (Some(scheme), rest),
                None => (None, url),
            };
            let rest = match rest.rsplit_once('@') {
                Some((user, host)) => match user.split_once(':') {
                    Some((name, _)) => format!("{name}:***@{host}"),
                    // A lone token.
                    None => format!("***@{host}"),
                },
                None => rest.to_owned(),
            };
            match scheme {
                Some(scheme) => format!("{scheme}://{rest}"),
                None => rest,
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Result<Settings, Error> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::read(&|name| vars.get(name).cloned(), None)
    }

    #[test]
    fn defaults() {
        let settings = read(&[]).unwrap();
        assert_eq!(settings.nats_url, None);
        assert_eq!(settings.prefix, "wharf");
        assert_eq!(settings.role, Role::Caller);
        assert_eq!(settings.log_format, LogFormat::Text);
        assert_eq!(
            read(&[("WHARF_LOG_FORMAT", "json")]).unwrap().log_format,
            LogFormat::Json
        );
        assert_eq!(settings.workers, DEFAULT_WORKERS);
        assert_eq!(settings.max_workers, DEFAULT_MAX_WORKERS);
        assert_eq!(settings.concurrency, DEFAULT_CONCURRENCY);
        assert_eq!(settings.ack_wait, DEFAULT_ACK_WAIT);
        assert_eq!(settings.txn_lease, DEFAULT_LEASE);
        // Empty means unset.
        assert_eq!(read(&[("WHARF_WORKERS", "")]).unwrap().workers, 2);
    }

    #[test]
    fn every_bad_value_is_an_error_naming_variable_value_and_rule() {
        for (name, value, allowed) in [
            ("WHARF_WORKERS", "two", "whole number"),
            ("WHARF_LOG_FORMAT", "xml", "`json`"),
            ("WHARF_MAX_WORKERS", "0", "from 1 to 1024"),
            ("WHARF_CONCURRENCY", "-1", "whole number"),
            ("WHARF_BACKLOG", "lots", "whole number"),
            ("WHARF_ACK_WAIT", "soon", "duration"),
            ("WHARF_ACK_WAIT", "5", "at least 100ms"),
            ("WHARF_TXN_LEASE", "0", "at least 1s"),
            ("WHARF_RESULTS_TTL", "1 fortnight", "duration"),
            ("WHARF_MAX_DELIVER", "0", "whole number"),
            ("WHARF_SPILL_BYTES", "big", "whole number"),
            ("WHARF_PREFIX", "a b", "subject tokens"),
            ("WHARF_ROLE", "wroker", "`worker`"),
            ("WHARF_INSTANCE_ID", "a.b", "A-Z"),
            ("WHARF_COALESCE", "sometimes", "`off`"),
            ("NATS_URL", "http://x:80", "server URLs"),
        ] {
            let error = read(&[(name, value)]).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Config);
            let text = error.message();
            assert!(text.contains(name), "{text}");
            assert!(text.contains(&format!("`{value}`")), "{text}");
            assert!(text.contains(allowed), "{name}: {text}");
        }
        let error = read(&[("WHARF_WORKERS", "6"), ("WHARF_MAX_WORKERS", "3")]).unwrap_err();
        assert!(error.message().contains("at least 6"), "{error}");
    }

    #[test]
    fn durations_take_units_or_the_documented_bare_unit() {
        let settings = read(&[
            ("WHARF_ACK_WAIT", "250"),
            ("WHARF_TXN_LEASE", "2m"),
            ("WHARF_RESULTS_TTL", "90"),
        ])
        .unwrap();
        assert_eq!(settings.ack_wait, Duration::from_millis(250));
        assert_eq!(settings.txn_lease, Duration::from_secs(120));
        assert_eq!(settings.results_ttl, Duration::from_secs(90));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("ten").is_err());
    }

    #[test]
    fn coalescing_is_on_unless_turned_off() {
        assert!(read(&[]).unwrap().coalesce);
        assert!(!read(&[("WHARF_COALESCE", "off")]).unwrap().coalesce);
        assert!(read(&[("WHARF_COALESCE", " On ")]).unwrap().coalesce);
    }

    #[test]
    fn more_workers_raise_the_default_maximum() {
        let settings = read(&[("WHARF_WORKERS", "6")]).unwrap();
        assert_eq!((settings.workers, settings.max_workers), (6, 6));
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let file = FileSettings {
            url: Some("nats://file:4222".into()),
            prefix: Some("from_file".into()),
            ..FileSettings::default()
        };
        let env = |name: &str| (name == "NATS_URL").then(|| "nats://env:4222".to_owned());
        let settings = Settings::read(&env, Some(&file)).unwrap();
        assert_eq!(settings.nats_url.as_deref(), Some("nats://env:4222"));
        assert_eq!(settings.prefix, "from_file");
        let error = Settings::read(
            &|_| None,
            Some(&FileSettings {
                prefix: Some("a b".into()),
                ..FileSettings::default()
            }),
        )
        .unwrap_err();
        assert!(
            error.message().contains("wharf.toml [broker] prefix"),
            "{error}"
        );
    }

    #[test]
    fn replicas_and_placement() {
        let settings = read(&[("WHARF_REPLICAS", "3"), ("WHARF_PLACEMENT", "az:1, ssd")]).unwrap();
        assert_eq!(settings.replicas, Some(3));
        assert_eq!(settings.placement, ["az:1", "ssd"]);
        let error = read(&[("WHARF_REPLICAS", "7")]).unwrap_err();
        assert!(
            error.message().contains("WHARF_REPLICAS") && error.message().contains("1 to 5"),
            "{error}"
        );
        let file = FileSettings {
            replicas: Some(0),
            ..FileSettings::default()
        };
        let error = Settings::read(&|_| None, Some(&file)).unwrap_err();
        assert!(error.message().contains("[broker] replicas"), "{error}");
        let file = FileSettings {
            replicas: Some(3),
            placement: Some(vec!["az:2".into()]),
            ..FileSettings::default()
        };
        let settings = Settings::read(&|_| None, Some(&file)).unwrap();
        assert_eq!(
            (settings.replicas, settings.placement),
            (Some(3), vec!["az:2".to_owned()])
        );
        assert_eq!(read(&[]).unwrap().replicas, None);
    }

    #[test]
    fn credentials_are_checked_and_never_shown() {
        let both = read(&[("NATS_USER", "alice"), ("NATS_PASSWORD", "pw-s3cret")]).unwrap();
        assert_eq!(both.credentials.user.as_deref(), Some("alice"));
        let debug = format!("{:?}", both.credentials);
        assert!(!debug.contains("pw-s3cret"), "{debug}");
        assert!(both
            .credentials
            .env()
            .contains(&("NATS_PASSWORD", "pw-s3cret".to_owned())));
        for (vars, says) in [
            (vec![("NATS_PASSWORD", "pw")], "without a user"),
            (vec![("NATS_USER", "alice")], "without a password"),
            (
                vec![
                    ("NATS_TOKEN", "t"),
                    ("NATS_USER", "a"),
                    ("NATS_PASSWORD", "p"),
                ],
                "authenticates one way",
            ),
            (vec![("NATS_NKEY", "not-a-seed-at-all")], "NKey user seed"),
            (
                vec![("NATS_CREDS", "/no/such/file.creds")],
                "cannot be read",
            ),
            (vec![("NATS_CA", "/no/such/ca.pem")], "NATS_CA names"),
            (vec![("NATS_TLS_FIRST", "maybe")], "true or false"),
        ] {
            let error = read(&vars).unwrap_err();
            assert!(error.message().contains(says), "{vars:?}: {error}");
            assert!(!error.message().contains("not-a-seed-at-all"), "{error}");
        }
        let seed = format!("SU{}", "A".repeat(56));
        let nkey = read(&[("NATS_NKEY", seed.as_str())]).unwrap();
        assert!(!format!("{:?}", nkey.credentials).contains(&seed));
    }

    #[test]
    fn passwords_are_never_shown() {
        assert_eq!(
            redact("nats://alice:secret@h:4222,nats://tok@g:4222"),
            "nats://alice:***@h:4222,nats://***@g:4222"
        );
        let error = read(&[("NATS_URL", "http://alice:secret@h:1")]).unwrap_err();
        assert!(!error.message().contains("secret"), "{error}");
        assert_eq!(redact("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }
}
