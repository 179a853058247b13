//! `wharf`: call, load-test and run microservices from the command line.
//!
//! ```text
//! wharf call <service>.<function> '<json args>' [options]
//! wharf bench <service>.<function> '<json args>' [--calls N] [--concurrency C] [options]
//! wharf up [-c wharf.toml]
//! wharf status [--json]
//! wharf events
//! wharf down
//! wharf objects
//! wharf completions <shell>
//! ```
//!
//! `call` and `bench` call with JSON, so they need nothing of the service
//! but its name. All but `up` connect to `NATS_URL` (default
//! `nats://127.0.0.1:4222`); `up` uses `NATS_URL` or `broker.url` from
//! `wharf.toml`, or starts a nats-server on port 4222.

mod top;

use clap::{Args, CommandFactory, Parser, Subcommand};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wharf::{Client, Codec, Error, ErrorKind, FnSpec, Request, RetryPolicy, Returns};

const ENVIRONMENT: &str = "\
Environment:
  NATS_URL      server(s) to connect to (default: the nats-server `wharf up`
                started, nats://127.0.0.1:4222)
  NATS_USER, NATS_PASSWORD, NATS_TOKEN, NATS_NKEY, NATS_CREDS
                how to authenticate (or nats://user:password@host in NATS_URL)
  NATS_CA, NATS_CERT, NATS_KEY, NATS_TLS_FIRST
                TLS: the server's CA, a client certificate, TLS first
  WHARF_PREFIX  subject prefix (default wharf)
  RUST_LOG      what wharf logs to stderr (default: wharf at info)";

/// Where `wharf up` starts its own nats-server when none is given.
const UP_PORT: u16 = 4222;

/// Call, load-test and run wharf microservices.
#[derive(Parser)]
#[command(name = "wharf", version, after_help = ENVIRONMENT)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Call a function once and print its result as JSON.
    Call(Target),
    /// Drive load at a function; ends with one line:
    /// `ok=… failed=… calls/s=… p50=… p99=… retries=… failures=…`.
    Bench {
        #[command(flatten)]
        target: Target,
        /// Calls in all.
        #[arg(long, default_value_t = 10_000)]
        calls: u64,
        /// Calls in flight at once.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
        concurrency: u64,
    },
    /// Run the services of wharf.toml, healed and scaled, until Ctrl-C,
    /// SIGTERM or `wharf down`.
    Up {
        /// The file that declares the services.
        #[arg(short = 'c', long = "config", default_value = "wharf.toml")]
        config: PathBuf,
        /// Ask the running `wharf up` to read its file again (as SIGHUP
        /// does): scaling changes hold at once, a service whose command,
        /// image or environment changed is rolled out one instance at a
        /// time. Prints what changed, or why the file was refused.
        #[arg(long)]
        reload: bool,
    },
    /// Every live instance: CPU, memory, load, health.
    Status {
        /// Print the instances' heartbeats as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A live view of services, instances and the supervisor's decisions:
    /// calls/s, p50/p99, errors, CPU, memory, backlog, transactions.
    Top {
        /// How often it refreshes, e.g. `1s`, `500ms`.
        #[arg(long, default_value = "1s", value_parser = refresh_every)]
        every: Duration,
    },
    /// Follow the supervisor's decisions and their reasons.
    Events,
    /// Stop what `wharf up` started.
    Down,
    /// Serve the object store (`<prefix>.objects.put/get/stat/delete`);
    /// `wharf up` serves it too.
    Objects,
    /// Write least-privilege NATS permissions for each role of wharf.toml:
    /// the supervisor, a worker of each service, each `[[caller]]`.
    Auth {
        /// The file that declares the services and callers.
        #[arg(short = 'c', long = "config", default_value = "wharf.toml")]
        config: PathBuf,
        /// `server`: a nats-server `authorization` block (passwords from
        /// the server's environment); `jwt`: permissions JSON per user, for
        /// nsc and JWT accounts.
        #[arg(long, default_value = "server", value_parser = ["server", "jwt"])]
        format: String,
    },
    /// Write Kubernetes manifests for the services of wharf.toml: a
    /// Deployment each (image, environment, credentials from a Secret,
    /// readiness, a draining preStop) and, with `--keda`, a KEDA
    /// ScaledObject each. Reads each image's functions with Docker.
    K8s {
        /// The file that declares the services.
        #[arg(short = 'c', long = "config", default_value = "wharf.toml")]
        config: PathBuf,
        /// Scale with KEDA (JetStream lag, backlog through Prometheus, CPU)
        /// instead of fixed replicas (each service's `min`).
        #[arg(long)]
        keda: bool,
        /// The workers' metrics and readiness port.
        #[arg(long, default_value_t = 9464)]
        metrics_port: u16,
        /// The Secret holding the NATS credentials (keys NATS_USER,
        /// NATS_PASSWORD, NATS_TOKEN, NATS_NKEY, or credential files).
        #[arg(long, default_value = "wharf-nats")]
        secret: String,
        /// The Prometheus server KEDA queries.
        #[arg(long, default_value = "http://prometheus.monitoring.svc:9090")]
        prometheus: String,
        /// nats-server's monitoring endpoint for KEDA (default: the broker
        /// URL's host, port 8222).
        #[arg(long)]
        nats_monitoring: Option<String>,
        /// The NATS account of the calls streams.
        #[arg(long, default_value = "$G")]
        nats_account: String,
    },
    /// Print a completion script for a shell, e.g. `wharf completions bash`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// What `call` and `bench` call, and how.
#[derive(Args, Clone)]
struct Target {
    /// `<service>.<function>`, for example `quickstart.add`.
    #[arg(value_name = "SERVICE.FUNCTION", value_parser = parse_target)]
    function: (String, String),
    /// The arguments: a JSON object keyed by parameter name, or a JSON
    /// array in declaration order (`{}` or `[]` for none).
    #[arg(value_name = "JSON", value_parser = parse_arguments)]
    args: serde_json::Value,
    /// Deadline of each call, e.g. 500ms, 5s, 2m.
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    timeout: Duration,
    /// Tries per call, the first included.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    attempts: u32,
    /// Also retry after a timeout or a lost worker.
    #[arg(long)]
    idempotent: bool,
    /// Send through JetStream, at least once.
    #[arg(long)]
    durable: bool,
}

fn parse_target(text: &str) -> Result<(String, String), String> {
    text.split_once('.')
        .filter(|(s, f)| !s.is_empty() && !f.is_empty() && !f.contains('.'))
        .map(|(s, f)| (s.to_owned(), f.to_owned()))
        .ok_or_else(|| {
            format!("`{text}` is not <service>.<function>, for example `quickstart.add`")
        })
}

fn parse_arguments(text: &str) -> Result<serde_json::Value, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        format!("the arguments are not JSON ({e}): pass an object like '{{\"a\": 2}}' or an array like '[2, 3]'")
    })?;
    if value.is_object() || value.is_array() {
        Ok(value)
    } else {
        Err(format!(
            "the arguments must be a JSON object or array, not `{text}`: for one argument write '[{text}]'"
        ))
    }
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    match wharf::settings::parse_duration(text) {
        Ok(timeout) if !timeout.is_zero() => Ok(timeout),
        _ => Err(format!(
            "`{text}` is not a duration such as 500ms, 5s or 2m"
        )),
    }
}

/// A call as the command line describes it.
struct Call {
    spec: &'static FnSpec,
    args: serde_json::Value,
    timeout: Duration,
    retry: RetryPolicy,
    durable: bool,
}

impl Call {
    fn new(target: Target) -> Result<Call, Error> {
        let (service, function) = &target.function;
        Ok(Call {
            spec: FnSpec::untyped(service, function, target.idempotent),
            args: target.args,
            timeout: target.timeout,
            retry: RetryPolicy::attempts(target.attempts)?,
            durable: target.durable,
        })
    }

    fn request(&self, client: &Client) -> Request<serde_json::Value, Json> {
        Request::new(self.spec, self.args.clone())
            .client(client)
            .codec(Codec::Json)
            .timeout(self.timeout)
            .retry(self.retry)
            .durable(self.durable)
    }
}

/// A reply as JSON; an application error (422) keeps its body, so the
/// function's own error value is printed whole.
struct Json;

impl Returns for Json {
    type Value = serde_json::Value;
    type Err = Error;

    fn decode(
        spec: &FnSpec,
        codec: Codec,
        message: &async_nats::Message,
    ) -> Result<serde_json::Value, Error> {
        let code = message
            .headers
            .as_ref()
            .and_then(|h| h.get(wharf::headers::SERVICE_ERROR_CODE))
            .and_then(|v| v.as_str().trim().parse::<u16>().ok());
        let body: Result<serde_json::Value, _> = codec.decode(&message.payload);
        match (code, body) {
            (None, Ok(value)) => Ok(value),
            (None, Err(e)) => Err(Error::new(
                ErrorKind::Codec,
                format!("the reply of `{}` is not JSON: {e}", spec.path),
            )
            .with_source(e)),
            (Some(code), Ok(body)) => {
                let kind = ErrorKind::from_wire(code, body["kind"].as_str());
                let text = match (&body["message"], &body["error"]) {
                    (serde_json::Value::String(m), serde_json::Value::Null) => m.clone(),
                    (serde_json::Value::String(m), error) => format!("{m}; error value: {error}"),
                    _ => body.to_string(),
                };
                Err(Error::new(kind, text))
            }
            (Some(code), Err(_)) => Err(Error::new(
                ErrorKind::from_code(code),
                format!("the worker answered with status {code}"),
            )),
        }
    }
}

async fn call(call: &Call, client: &Client) -> ExitCode {
    match call.request(client).await {
        Ok(value) => {
            println!("{value}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Shared counters of a bench run.
#[derive(Default)]
struct Tally {
    issued: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    failures: Mutex<BTreeMap<&'static str, u64>>,
    first_failure: Mutex<Option<String>>,
}

/// Latencies in microseconds, 1 µs to 10 minutes at 3 significant digits.
fn latencies() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

async fn bench(call: Call, client: Client, calls: u64, concurrency: u64) -> ExitCode {
    let call = Arc::new(call);
    let tally = Arc::new(Tally::default());
    let progress = ProgressBar::with_draw_target(Some(calls), ProgressDrawTarget::stderr());
    progress.set_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} calls, {per_sec}, {msg}")
            .expect("a valid template")
            .progress_chars("#>-"),
    );
    progress.set_message("0 failed");
    let started = Instant::now();
    let callers: Vec<_> = (0..concurrency.min(calls))
        .map(|_| {
            let (call, tally, client, progress) = (
                call.clone(),
                tally.clone(),
                client.clone(),
                progress.clone(),
            );
            tokio::spawn(async move {
                let mut latencies = latencies();
                while tally.issued.fetch_add(1, Ordering::Relaxed) < calls {
                    let sent = Instant::now();
                    match call.request(&client).send_detailed().await {
                        Ok(reply) => {
                            latencies.saturating_record(sent.elapsed().as_micros() as u64);
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                            tally
                                .retries
                                .fetch_add(u64::from(reply.attempts - 1), Ordering::Relaxed);
                        }
                        Err(error) => {
                            let failed = tally.failed.fetch_add(1, Ordering::Relaxed) + 1;
                            progress.set_message(format!("{failed} failed"));
                            *tally
                                .failures
                                .lock()
                                .unwrap()
                                .entry(error.kind().as_str())
                                .or_default() += 1;
                            tally
                                .first_failure
                                .lock()
                                .unwrap()
                                .get_or_insert_with(|| error.to_string());
                        }
                    }
                    progress.inc(1);
                }
                latencies
            })
        })
        .collect();
    let mut all = latencies();
    for caller in callers {
        if let Ok(latencies) = caller.await {
            let _ = all.add(&latencies);
        }
    }
    let elapsed = started.elapsed();
    progress.finish();

    let at = |q: f64| -> f64 {
        if all.is_empty() {
            0.0
        } else {
            all.value_at_quantile(q) as f64 / 1000.0
        }
    };
    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    let failures = tally.failures.lock().unwrap();
    let by_kind = if failures.is_empty() {
        "none".to_owned()
    } else {
        failures
            .iter()
            .map(|(kind, n)| format!("{kind}={n}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    if let Some(first) = tally.first_failure.lock().unwrap().as_ref() {
        eprintln!("first failure: {first}");
    }
    println!(
        "ok={ok} failed={failed} calls/s={:.0} p50={:.3}ms p99={:.3}ms retries={} failures={by_kind}",
        ok as f64 / elapsed.as_secs_f64(),
        at(0.50),
        at(0.99),
        tally.retries.load(Ordering::Relaxed),
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "wharf", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    wharf::install_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command)).unwrap_or_else(|error| {
        eprintln!("error: {error}");
        ExitCode::FAILURE
    })
}

async fn run(command: Command) -> Result<ExitCode, Error> {
    if let Command::Up { config, reload } = &command {
        if !reload {
            return up(config).await;
        }
        // Reaching the running `wharf up` as it reaches NATS: through the
        // file's `[broker]`, overridden by the environment.
        let file = wharf::supervisor::UpConfig::load(config)?;
        wharf::Settings::install(&file.broker)?;
    }
    if let Command::Auth { config, format } = &command {
        let config = wharf::supervisor::UpConfig::load(config)?;
        let prefix = config.settings()?.prefix;
        let mut served = std::collections::BTreeMap::new();
        for service in &config.services {
            match wharf::permissions::served_by(service).await {
                Ok(functions) => {
                    served.insert(service.name.clone(), functions);
                }
                Err(why) => tracing::warn!(
                    "service `{}`: its functions could not be read from its binary ({why}); its workers may take any call of `{}.*`",
                    service.name,
                    service.name
                ),
            }
        }
        let roles = wharf::permissions::roles_serving(&config, &prefix, &served);
        if format == "jwt" {
            let json = serde_json::to_string_pretty(&wharf::permissions::jwt_permissions(&roles))
                .map_err(|e| Error::new(ErrorKind::Codec, e.to_string()).with_source(e))?;
            println!("{json}");
        } else {
            print!("{}", wharf::permissions::server_config(&roles));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::K8s {
        config,
        keda,
        metrics_port,
        secret,
        prometheus,
        nats_monitoring,
        nats_account,
    } = command
    {
        let config = wharf::supervisor::UpConfig::load(&config)?;
        let options = wharf::k8s::Options {
            scaling: if keda {
                wharf::k8s::Scaling::Keda
            } else {
                wharf::k8s::Scaling::Fixed
            },
            metrics_port,
            secret,
            prometheus,
            nats_monitoring,
            nats_account,
        };
        print!("{}", wharf::k8s::manifests(&config, &options).await?);
        return Ok(ExitCode::SUCCESS);
    }
    let settings = wharf::Settings::get()?;
    let client = match &settings.nats_url {
        Some(url) => Client::connect(url).await?,
        // The nats-server a `wharf up` of this user started takes only the
        // token in its URL, whatever the environment holds for others.
        None => match wharf::remembered_local_url(UP_PORT) {
            Some(url) => Client::connect_with(&url, &Default::default()).await?,
            None => Client::connect(&format!("nats://127.0.0.1:{UP_PORT}")).await?,
        },
    };
    match command {
        Command::Call(target) => Ok(call(&Call::new(target)?, &client).await),
        Command::Bench {
            target,
            calls,
            concurrency,
        } => Ok(bench(Call::new(target)?, client, calls, concurrency).await),
        Command::Status { json } => status(&client, json).await,
        Command::Events => events(&client).await,
        Command::Top { every } => top::top(&client, every).await,
        Command::Down => down(&client).await,
        Command::Up { config, .. } => reload(&client, &config).await,
        Command::Objects => objects(&client).await,
        Command::Auth { .. } | Command::K8s { .. } | Command::Completions { .. } => {
            unreachable!("handled before")
        }
    }
}

/// `--every`: a duration of 100 ms to an hour.
fn refresh_every(text: &str) -> Result<Duration, String> {
    let every = wharf::settings::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration such as 1s or 500ms ({e})"))?;
    if every < Duration::from_millis(100) || every > Duration::from_secs(3600) {
        return Err(format!("`{text}`: refresh between 100ms and 1h"));
    }
    Ok(every)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn interrupted() -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| {
        Error::new(ErrorKind::Process, format!("cannot watch SIGTERM: {e}")).with_source(e)
    })?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// `wharf up`: supervise the services of `path` until Ctrl-C, SIGTERM or
/// `wharf down`.
async fn up(path: &std::path::Path) -> Result<ExitCode, Error> {
    let config = wharf::supervisor::UpConfig::load(path)?;
    // The file's `[broker]` keys, overridden by the environment, are this
    // process's settings (replicas and placement included).
    let settings = wharf::Settings::install(&config.broker)?.clone();
    let mut started_own = false;
    let url = match &settings.nats_url {
        Some(url) => url.clone(),
        None => {
            let url = wharf::start_nats_server_on(Some(UP_PORT))
                .await
                .map_err(|e| {
                    let message = format!(
                    "{}; if a nats-server already runs on 4222, set NATS_URL or broker.url in {}",
                    e.message(),
                    path.display()
                );
                    Error::new(e.kind(), message).with_source(e)
                })?;
            // Other `wharf` commands of this user find it (token included).
            wharf::remember_local_url(UP_PORT, &url)?;
            started_own = true;
            tracing::info!(
                "wharf up: started nats-server at {} (loopback only, with a token only this user's `wharf` commands read)",
                wharf::settings::redact(&url)
            );
            url
        }
    };
    // Its own server takes only its token.
    let credentials = if started_own {
        Default::default()
    } else {
        settings.credentials.clone()
    };
    let client = Client::connect_with(&url, &credentials)
        .await?
        .with_prefix(settings.prefix.clone());
    // Foreign clients read and write objects through it.
    let _objects = wharf::objects::service::serve(&client).await?;
    let supervisor = wharf::supervisor::Supervisor::new(&client, &config)
        .await?
        .reloading_from(path);
    tracing::info!(
        "wharf up: supervising {} service(s) through {}; `wharf events` follows its decisions",
        config.services.len(),
        wharf::settings::redact(&url)
    );
    let stop = async {
        if interrupted().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let outcome = supervisor.run(stop).await;
    if started_own {
        wharf::forget_local_url(UP_PORT);
    }
    outcome?;
    Ok(ExitCode::SUCCESS)
}

/// `wharf objects`: serves the object store until interrupted.
async fn objects(client: &Client) -> Result<ExitCode, Error> {
    let _service = wharf::objects::service::serve(client).await?;
    tracing::info!(
        "wharf objects: serving {0}.objects.put/get/stat/delete through {1}",
        client.prefix(),
        wharf::settings::redact(client.url())
    );
    interrupted().await?;
    Ok(ExitCode::SUCCESS)
}

/// `wharf status`: one row per live instance.
async fn status(client: &Client, json: bool) -> Result<ExitCode, Error> {
    let instances = wharf::supervisor::instances(client).await?;
    if json {
        let text = serde_json::to_string_pretty(&instances)
            .map_err(|e| Error::new(ErrorKind::Codec, e.to_string()).with_source(e))?;
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:<32} {:<12} {:<22} {:>6} {:>8} {:>9} {:>8} {:>9} {:>8} {:>8}  {:<8} {:<22} signatures",
        "service",
        "instance",
        "host",
        "pid/container",
        "CPU%",
        "RSS MiB",
        "in-flight",
        "backlog",
        "calls/s",
        "p50 ms",
        "p99 ms",
        "health",
        "version"
    );
    for beat in &instances {
        let location = match &beat.container {
            Some(container) => container.chars().take(12).collect(),
            None => beat.pid.to_string(),
        };
        // The crate's version and the revision of wharf.toml it was made
        // from; each function with the first 8 digits of its signature.
        let version = match &beat.revision {
            Some(revision) => format!("{} r{revision}", beat.version),
            None => beat.version.clone(),
        };
        let signatures: Vec<String> = beat
            .signatures
            .iter()
            .map(|(function, sig)| {
                let function = function
                    .split_once('.')
                    .map_or(function.as_str(), |(_, f)| f);
                format!("{function}:{}", &sig[..sig.len().min(8)])
            })
            .collect();
        println!(
            "{:<16} {:<32} {:<12} {:<22} {:>6.1} {:>8.1} {:>9} {:>8} {:>9.1} {:>8.3} {:>8.3}  {:<8} {:<22} {}",
            beat.services.join(","),
            beat.instance,
            beat.host,
            location,
            beat.cpu,
            beat.rss as f64 / (1024.0 * 1024.0),
            beat.in_flight,
            beat.backlog,
            beat.calls_per_s,
            beat.p50_ms,
            beat.p99_ms,
            if beat.draining { "draining" } else { "ok" },
            version,
            signatures.join(",")
        );
    }
    if instances.is_empty() {
        eprintln!("no instance has sent a heartbeat in the last 3 s");
    }
    Ok(ExitCode::SUCCESS)
}

/// `wharf events`: prints the supervisors' events as they happen (times in
/// UTC).
async fn events(client: &Client) -> Result<ExitCode, Error> {
    use futures_util::StreamExt;
    let subject = wharf::wire::subjects::events(client.prefix());
    let mut events = client.nats().subscribe(subject).await.map_err(|e| {
        Error::new(
            ErrorKind::Connection,
            format!("cannot subscribe for events: {e}"),
        )
        .with_source(e)
    })?;
    while let Some(message) = events.next().await {
        if let Ok(event) = serde_json::from_slice::<wharf::supervisor::Event>(&message.payload) {
            let seconds = event.at_ms / 1000;
            println!(
                "{:02}:{:02}:{:02}.{:03} {:<10} {:<16} {:<32} {}",
                seconds / 3600 % 24,
                seconds / 60 % 60,
                seconds % 60,
                event.at_ms % 1000,
                event.kind,
                event.service.unwrap_or_else(|| "-".into()),
                event.instance.unwrap_or_else(|| "-".into()),
                event.reason
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `wharf up --reload`: asks the running `wharf up` to read its file again
/// (checked here first, so that a mistake is told at once).
async fn reload(client: &Client, path: &std::path::Path) -> Result<ExitCode, Error> {
    let subject = wharf::wire::subjects::supervisor_reload(client.prefix());
    let request = async_nats::Request::new().timeout(Some(Duration::from_secs(5)));
    let reply = client
        .nats()
        .send_request(subject.clone(), request)
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::NoResponders,
                format!("no `wharf up` answered on {subject}: {e}; is it running, with the same NATS_URL and WHARF_PREFIX?"),
            )
        })?;
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload).map_err(|e| {
        Error::new(
            ErrorKind::Codec,
            format!("`wharf up` answered {subject} with something other than JSON: {e}"),
        )
    })?;
    if answer["ok"] != true {
        let why = answer["error"].as_str().unwrap_or("no reason given");
        return Err(Error::new(
            ErrorKind::Config,
            format!("`wharf up` kept its configuration: {why}"),
        ));
    }
    let changes: Vec<&str> = answer["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str())
        .collect();
    if changes.is_empty() {
        println!("wharf up reloaded {}: nothing changed", path.display());
    }
    for change in changes {
        println!("{change}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `wharf down`: asks the running `wharf up` to stop its instances and exit.
async fn down(client: &Client) -> Result<ExitCode, Error> {
    let subject = wharf::wire::subjects::supervisor_down(client.prefix());
    let request = async_nats::Request::new().timeout(Some(Duration::from_secs(5)));
    match client.nats().send_request(subject, request).await {
        Ok(_) => {
            println!("wharf up is stopping its instances");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(Error::new(
            ErrorKind::NoResponders,
            format!(
                "no `wharf up` answered on {}: {e}",
                wharf::settings::redact(client.url())
            ),
        )
        .with_source(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn verbs_and_flags_parse_as_before() {
        let cli = Cli::try_parse_from([
            "wharf",
            "bench",
            "quickstart.add",
            "[2, 3]",
            "--calls",
            "20000",
            "--concurrency",
            "64",
            "--durable",
            "--timeout",
            "500ms",
        ])
        .unwrap();
        let Command::Bench {
            target,
            calls,
            concurrency,
        } = cli.command
        else {
            panic!("not bench");
        };
        assert_eq!((calls, concurrency), (20_000, 64));
        assert_eq!(target.function, ("quickstart".into(), "add".into()));
        assert_eq!(target.timeout, Duration::from_millis(500));
        assert!(target.durable && !target.idempotent);
        let error = Cli::try_parse_from(["wharf", "cal", "a.b", "[]"])
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("call"), "suggests the verb: {error}");
        let error = Cli::try_parse_from(["wharf", "call", "add", "[]"])
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("is not <service>.<function>"), "{error}");
    }
}
