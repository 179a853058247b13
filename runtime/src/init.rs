//! Setting wharf up in a process: [`init`] (connect, or start local mode),
//! the worker role's whole life, and [`shutdown`].

use crate::client::{self, Client};
use crate::error::{Error, ErrorKind};
use crate::handler::registered;
use crate::local::{children, server, workers};
use crate::settings::{Credentials, LogFormat, Role, Settings};
use crate::worker::Worker;
use std::time::Duration;

/// How [`init_with`] sets wharf up.
#[derive(Debug, Clone)]
pub struct Config {
    nats_url: Option<String>,
    workers: usize,
    max_workers: usize,
    drain_grace: Duration,
}

impl Config {
    /// Reads `NATS_URL` (absent: local mode), `WHARF_WORKERS` (local
    /// mode's worker count, default 2) and `WHARF_MAX_WORKERS` (default 4),
    /// through [`Settings`].
    pub fn from_env() -> Result<Config, Error> {
        let settings = Settings::get()?;
        Ok(Config {
            nats_url: settings.nats_url.clone(),
            workers: settings.workers,
            max_workers: settings.max_workers,
            drain_grace: Duration::from_secs(10),
        })
    }

    /// Connects to this NATS server instead of starting one.
    pub fn nats_url(mut self, url: impl Into<String>) -> Config {
        self.nats_url = Some(url.into());
        self
    }

    /// How many worker processes local mode starts.
    pub fn workers(mut self, workers: usize) -> Config {
        self.workers = workers;
        self.max_workers = self.max_workers.max(workers);
        self
    }

    /// How many worker processes local mode may scale up to.
    pub fn max_workers(mut self, max_workers: usize) -> Config {
        self.max_workers = max_workers.max(self.workers).max(1);
        self
    }
}

/// Sets wharf up for this process, once, as `ray.init()` does:
///
/// - with `NATS_URL` set, connects to that server;
/// - without it (local mode), starts nats-server (JetStream on, free port,
///   temporary store) and `WHARF_WORKERS` (default 2) worker subprocesses of
///   this executable, and returns once every function answers. They are all
///   stopped when the program exits, panics, or gets Ctrl-C or SIGTERM.
///
/// In a worker process (`WHARF_ROLE=worker`, or first argument `worker`)
/// this serves every microservice until SIGTERM and then exits the process:
/// it does not return.
pub async fn init() -> Result<Client, Error> {
    init_with(Config::from_env()?).await
}

/// [`init`] with explicit settings.
pub async fn init_with(config: Config) -> Result<Client, Error> {
    install_logging();
    // Already set up, by an earlier call or, in a worker, by the worker
    // itself (so a microservice that calls another one simply gets the
    // worker's connection).
    if let Ok(client) = client::global() {
        return Ok(client.clone());
    }
    describe_if_asked();
    if is_drain_role() {
        std::process::exit(drain_process().await);
    }
    if is_worker_role() {
        let code = worker_process(config.drain_grace).await;
        std::process::exit(code);
    }
    // Concurrent first calls must not each start a server and workers.
    static INIT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _once = INIT.lock().await;
    if let Ok(client) = client::global() {
        return Ok(client.clone());
    }
    let client = match &config.nats_url {
        Some(url) => Client::connect(url).await?,
        None => {
            let started = start_local(&config).await;
            if started.is_err() {
                // Leave nothing half-started behind a failed init.
                shutdown().await;
            }
            started?
        }
    };
    Ok(client::set_global(client).clone())
}

/// Local mode: a nats-server of our own, then the workers.
async fn start_local(config: &Config) -> Result<Client, Error> {
    let url = server::start_nats_server().await?;
    children::stop_on_signals();
    // Its own server takes only the token in its URL, whatever
    // credentials the environment holds for other servers.
    Settings::get()?;
    let client = Client::connect_with(&url, &Credentials::default()).await?;
    if registered().next().is_some() && config.workers > 0 {
        let supervisor =
            workers::supervise_workers(&client, config.workers, config.max_workers).await?;
        *LOCAL_SUPERVISOR.lock().unwrap_or_else(|e| e.into_inner()) = Some(supervisor);
    }
    Ok(client)
}

/// Local mode's in-process supervisor, stopped before the workers are.
static LOCAL_SUPERVISOR: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>> =
    std::sync::Mutex::new(None);

/// Stops what local mode started (workers drain first, then the server).
/// Runs by itself at exit; call it to stop earlier. The process-wide client
/// stays set afterwards (pointing at the stopped server), so call it only
/// when the program is done calling.
pub async fn shutdown() {
    // Else it would replace the workers as they stop.
    if let Some(supervisor) = LOCAL_SUPERVISOR
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        supervisor.abort();
    }
    let _ = tokio::task::spawn_blocking(|| children::stop_all(Duration::from_secs(5))).await;
}

/// Pids of the worker processes local mode started.
pub fn local_workers() -> Vec<u32> {
    children::pids(children::Role::Worker)
}

/// Pid of the nats-server local mode started, if it started one.
pub fn local_server() -> Option<u32> {
    children::pids(children::Role::Server).first().copied()
}

/// With `WHARF_ROLE=describe`: prints the microservices linked into this
/// binary as JSON (`{"functions": [{"service", "name", "signature",
/// "durable", "stateful", "idempotent"}]}`) and exits, without connecting.
/// `wharf auth` reads them to grant each worker exactly its subjects.
pub fn describe_if_asked() {
    if !Settings::get().is_ok_and(|s| s.role == Role::Describe) {
        return;
    }
    let functions: Vec<serde_json::Value> = registered()
        .map(|spec| {
            serde_json::json!({
                "service": spec.service,
                "name": spec.name,
                "signature": spec.signature,
                "durable": spec.durable,
                "stateful": spec.stateful,
                "idempotent": spec.idempotent,
            })
        })
        .collect();
    println!("{}", serde_json::json!({ "functions": functions }));
    std::process::exit(0);
}

/// Whether this process was started to drain a worker: `WHARF_ROLE=drain`,
/// or `drain` as its first argument.
pub fn is_drain_role() -> bool {
    Settings::get().is_ok_and(|s| s.role == Role::Drain)
        || std::env::args().nth(1).is_some_and(|arg| arg == "drain")
}

/// The drain role's whole life (a Kubernetes preStop hook, run in the
/// worker's container with its environment): asks the worker named by
/// `WHARF_INSTANCE_ID` to drain, then waits until it has stopped answering
/// its control subject, so the pod's termination waits for the drain.
/// Returns the process exit code.
pub(crate) async fn drain_process() -> i32 {
    install_logging();
    match drain_instance().await {
        Ok(()) => 0,
        Err(error) => {
            tracing::error!("wharf drain: {error}");
            1
        }
    }
}

async fn drain_instance() -> Result<(), Error> {
    let settings = Settings::get()?;
    let url = settings.nats_url.as_deref().ok_or_else(|| {
        Error::new(ErrorKind::Config, "NATS_URL is not set: the drain role asks the worker through the NATS server it serves on")
    })?;
    let instance = settings.instance_id.as_deref().ok_or_else(|| {
        Error::new(ErrorKind::Config, "WHARF_INSTANCE_ID is not set: the drain role drains the worker of that id (in Kubernetes, the pod's name)")
    })?;
    // Plain async-nats: this short-lived process must not serve metrics on
    // the port its worker holds.
    let options = crate::client::connect::options(url, &settings.credentials).await?;
    let servers = crate::client::connect::servers(url);
    let nats = options
        .connect(servers.as_slice())
        .await
        .map_err(|e| crate::client::connect::failed(url, &settings.credentials, e))?;
    let control = crate::wire::subjects::control(&settings.prefix, instance);
    let asked = nats.request(control.clone(), "drain".into()).await;
    if asked.is_err() {
        // No worker of that id answers: nothing left to drain.
        return Ok(());
    }
    tracing::info!("asked worker {instance} to drain; waiting until it stops");
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The control subscription lives until the worker exits, after its
        // drain (and the quiesce of its transactions).
        if nats
            .request(control.clone(), "status".into())
            .await
            .is_err()
        {
            return Ok(());
        }
    }
}

/// Whether this process was started to serve: `WHARF_ROLE=worker`, or
/// `worker` as its first argument.
pub fn is_worker_role() -> bool {
    // With settings that do not validate, `init()` reports why.
    Settings::get().is_ok_and(|s| s.role == Role::Worker)
        || std::env::args().nth(1).is_some_and(|arg| arg == "worker")
}

/// The worker role's whole life: connect, serve, drain on SIGTERM/SIGINT.
/// Returns the process exit code.
pub(crate) async fn worker_process(grace: Duration) -> i32 {
    install_logging();
    let settings = match Settings::get() {
        Ok(settings) => settings,
        Err(error) => {
            tracing::error!("wharf worker: {error}");
            return 2;
        }
    };
    let Some(url) = settings.nats_url.as_deref() else {
        tracing::error!("wharf worker: NATS_URL is not set; a worker serves through the NATS server its callers use, e.g. NATS_URL=nats://127.0.0.1:4222");
        return 2;
    };
    let code = match serve_until_signal(url, grace).await {
        Ok(()) => 0,
        Err(error) => {
            tracing::error!("wharf worker: {error}");
            1
        }
    };
    // The spans of the last calls, before the process exits.
    #[cfg(feature = "otel")]
    crate::otel::flush();
    code
}

async fn serve_until_signal(url: &str, grace: Duration) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let started = std::time::Instant::now();
    let client = Client::connect(url).await?;
    // Calls made from inside a microservice go through this connection.
    client::set_global(client.clone());
    let worker = Worker::new(&client).start().await?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| {
        Error::new(ErrorKind::Process, format!("cannot watch SIGTERM: {e}")).with_source(e)
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| {
        Error::new(ErrorKind::Process, format!("cannot watch SIGINT: {e}")).with_source(e)
    })?;
    if let Some(subject) = Settings::get()?.ready_subject.clone() {
        let note = format!("{} {}", std::process::id(), worker.instance());
        let _ = client.nats().publish(subject, note.into()).await;
        let _ = client.nats().flush().await;
    }
    let functions: Vec<String> = registered()
        .map(|s| format!("{}.{}", s.service, s.name))
        .collect();
    tracing::info!(
        pid = std::process::id(),
        ready_ms = started.elapsed().as_millis() as u64,
        "wharf worker ready: {}",
        functions.join(", ")
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = worker.drain_requested() => {}
    }
    if parent_is_gone() {
        // Local mode, and the program that started this worker has died
        // (this SIGTERM is its parent-death signal): its nats-server is
        // going too, so there is no caller left to finish calls for.
        return Ok(());
    }
    worker.drain(grace).await;
    Ok(())
}

/// Whether this worker was started by a local-mode program that has since
/// exited (it is then reparented, so its parent pid changes).
fn parent_is_gone() -> bool {
    let Some(parent) = Settings::get().ok().and_then(|s| s.parent_pid) else {
        return false;
    };
    std::os::unix::process::parent_id() != parent
}

/// Logs wharf's messages to stderr, filtered by `RUST_LOG` (default: wharf
/// at `info`, the libraries under it at `warn`), as readable lines or, with
/// `WHARF_LOG_FORMAT=json`, one JSON object per line; unless the program
/// installed a `tracing` subscriber of its own. With the `otel` feature and
/// `OTEL_EXPORTER_OTLP_ENDPOINT` set, wharf's call spans are exported over
/// OTLP too, whatever `RUST_LOG` says (see [`crate::otel`]).
pub fn install_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer, Registry};
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,wharf=info,wharf_cli=info"));
    // Read on its own, not through `Settings::get`: logging starts before
    // a program's settings are complete. A bad value is logged here in
    // text, and fails the settings later with the same message.
    let format = LogFormat::from_env();
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let lines: Box<dyn Layer<Registry> + Send + Sync> = match format {
        Ok(LogFormat::Json) => lines
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
        _ => lines.with_ansi(std::io::stderr().is_terminal()).boxed(),
    };
    // Each layer has its own filter: `RUST_LOG` says what is logged, not
    // which call spans are exported.
    let subscriber = tracing_subscriber::registry().with(lines.with_filter(filter));
    #[cfg(feature = "otel")]
    let (subscriber, export_error) = {
        let exported = crate::otel::from_vars(|name| std::env::var(name).ok())
            .and_then(|export| export.map(crate::otel::layer).transpose());
        let (layer, error) = match exported {
            Ok(layer) => (layer, None),
            Err(error) => (None, Some(error)),
        };
        let active = layer.is_some();
        // Asked at each span, not once per callsite: whether to export
        // changes with the call (sampled or not) and the bench's toggle.
        let calls = tracing_subscriber::filter::dynamic_filter_fn(|_, _| {
            crate::otel::exporting() && crate::trace::sampled_hint()
        })
        // wharf's call spans are `debug`: without this hint the global
        // maximum would be `trace`, and every `trace!` of the libraries
        // would reach its callsite check.
        .with_max_level_hint(tracing::level_filters::LevelFilter::DEBUG)
        // Never asked at all when nothing is exported. (The layer stays, as
        // `None`: a `None` layer with no filter of its own would make every
        // callsite the logging filter turned off "sometimes", asked at each
        // event.)
        .with_callsite_filter(move |meta| {
            if active && meta.is_span() && crate::otel::SPAN_NAMES.contains(&meta.name()) {
                tracing::subscriber::Interest::sometimes()
            } else {
                tracing::subscriber::Interest::never()
            }
        });
        (subscriber.with(layer.with_filter(calls)), error)
    };
    // Fails only when a subscriber is already set: the program's own wins.
    let installed = subscriber.try_init();
    if let (Ok(()), Err(error)) = (&installed, format) {
        tracing::warn!("{error}; logging readable lines");
    }
    #[cfg(feature = "otel")]
    if let (Ok(()), Some(error)) = (&installed, export_error) {
        tracing::error!("{error}; wharf's spans are not exported");
    }
}
