//! `wharf`: call and load-test microservices from the command line.
//!
//! ```text
//! wharf call <service>.<function> '<json args>' [options]
//! wharf bench <service>.<function> '<json args>' [--calls N] [--concurrency C] [options]
//! wharf up [-c wharf.toml]
//! wharf status [--json]
//! wharf events
//! wharf down
//! ```
//!
//! `call` and `bench` call with JSON, so they need nothing of the service
//! but its name. All but `up` connect to `NATS_URL` (default
//! `nats://127.0.0.1:4222`); `up` uses `broker.url` from `wharf.toml`, or
//! starts a nats-server on port 4222.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wharf::{Client, Codec, Error, ErrorKind, FnSpec, Request, RetryPolicy, Returns};

const USAGE: &str = "\
usage:
  wharf call  <service>.<function> '<json args>' [options]
  wharf bench <service>.<function> '<json args>' [--calls N] [--concurrency C] [options]
  wharf up [-c wharf.toml]   run the services of wharf.toml, healed and scaled
  wharf status [--json]      every instance: CPU, memory, load, health
  wharf events               follow the supervisor's decisions and their reasons
  wharf down                 stop what `wharf up` started
  wharf objects              serve the object store (wharf.objects.put/get/stat/delete);
                             `wharf up` serves it too

Arguments are a JSON object keyed by parameter name, or a JSON array in
declaration order ('{}' or '[]' for none).

options:
  --timeout <duration>   deadline of each call (default 30s), e.g. 500ms, 5s
  --attempts <n>         tries per call, the first included (default 10)
  --idempotent           also retry after a timeout or a lost worker
  --durable              send through JetStream, at least once
  --calls <n>            bench: calls in all (default 10000)
  --concurrency <n>      bench: calls in flight (default 64)

environment:
  NATS_URL      server(s) to connect to (default nats://127.0.0.1:4222)
  WHARF_PREFIX  subject prefix (default wharf)";

/// What the command line asks for.
struct Command {
    bench: bool,
    spec: &'static FnSpec,
    args: serde_json::Value,
    timeout: Duration,
    retry: RetryPolicy,
    durable: bool,
    calls: u64,
    concurrency: u64,
}

/// Every command.
enum Verb {
    Call(Command),
    Up(std::path::PathBuf),
    Status { json: bool },
    Events,
    Down,
    Objects,
}

fn parse_verb(argv: Vec<String>) -> Result<Verb, String> {
    let rest: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
    match argv.first().map(String::as_str) {
        Some("up") => match rest.as_slice() {
            [] => Ok(Verb::Up("wharf.toml".into())),
            ["-c" | "--config", path] => Ok(Verb::Up(path.into())),
            _ => Err("usage: wharf up [-c wharf.toml]".to_owned()),
        },
        Some("status") => match rest.as_slice() {
            [] => Ok(Verb::Status { json: false }),
            ["--json"] => Ok(Verb::Status { json: true }),
            _ => Err("usage: wharf status [--json]".to_owned()),
        },
        Some("events") if rest.is_empty() => Ok(Verb::Events),
        Some("down") if rest.is_empty() => Ok(Verb::Down),
        Some("objects") if rest.is_empty() => Ok(Verb::Objects),
        _ => parse(argv.into_iter()).map(Verb::Call),
    }
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Command, String> {
    let verb = argv.next().ok_or("no command given")?;
    let bench = match verb.as_str() {
        "call" => false,
        "bench" => true,
        "-h" | "--help" | "help" => return Err(String::new()),
        other => {
            return Err(format!(
                "unknown command `{other}`: use call, bench, up, status, events, down or objects"
            ))
        }
    };
    let target = argv
        .next()
        .ok_or("missing <service>.<function>, for example `quickstart.add`")?;
    let (service, function) = target
        .split_once('.')
        .filter(|(s, f)| !s.is_empty() && !f.is_empty() && !f.contains('.'))
        .ok_or_else(|| {
            format!("`{target}` is not <service>.<function>, for example `quickstart.add`")
        })?;
    let args_text = argv
        .next()
        .ok_or("missing the arguments as JSON, for example '{\"a\": 2, \"b\": 3}' or '[2, 3]'")?;
    let args: serde_json::Value = serde_json::from_str(&args_text)
        .map_err(|e| format!("the arguments are not JSON ({e}): pass an object like '{{\"a\": 2}}' or an array like '[2, 3]'"))?;
    if !args.is_object() && !args.is_array() {
        return Err(format!(
            "the arguments must be a JSON object or array, not `{args_text}`"
        ));
    }
    let mut command = Command {
        bench,
        spec: FnSpec::untyped(service, function, false),
        args,
        timeout: Duration::from_secs(30),
        retry: RetryPolicy::DEFAULT,
        durable: false,
        calls: 10_000,
        concurrency: 64,
    };
    let mut idempotent = false;
    while let Some(flag) = argv.next() {
        let mut value = |what: &str| argv.next().ok_or_else(|| format!("{flag} needs {what}"));
        match flag.as_str() {
            "--timeout" => {
                let text = value("a duration such as 500ms or 5s")?;
                command.timeout = parse_duration(&text).ok_or_else(|| {
                    format!("--timeout `{text}` is not a duration such as 500ms, 5s or 2m")
                })?;
            }
            "--attempts" => {
                let n = number(&flag, &value("a number")?)?;
                let attempts =
                    u32::try_from(n).map_err(|_| format!("--attempts {n} is too large"))?;
                command.retry =
                    RetryPolicy::attempts(attempts).map_err(|e| e.message().to_owned())?;
            }
            "--idempotent" => idempotent = true,
            "--durable" => command.durable = true,
            "--calls" if bench => command.calls = number(&flag, &value("a number")?)?,
            "--concurrency" if bench => {
                command.concurrency = number(&flag, &value("a number")?)?.max(1);
            }
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    if idempotent {
        command.spec = FnSpec::untyped(service, function, true);
    }
    Ok(command)
}

fn number(flag: &str, text: &str) -> Result<u64, String> {
    text.parse()
        .map_err(|_| format!("{flag} takes a whole number, not `{text}`"))
}

fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let ms = match unit {
        "ms" => number,
        "s" => number.checked_mul(1_000)?,
        "m" => number.checked_mul(60_000)?,
        _ => return None,
    };
    (ms > 0).then(|| Duration::from_millis(ms))
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
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .and_then(|v| v.as_str().trim().parse::<u16>().ok());
        let body: Result<serde_json::Value, String> = codec.decode(&message.payload);
        match (code, body) {
            (None, Ok(value)) => Ok(value),
            (None, Err(e)) => Err(Error::new(
                ErrorKind::Codec,
                format!("the reply of `{}` is not JSON: {e}", spec.path),
            )),
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

fn request(command: &Command, client: &Client) -> Request<serde_json::Value, Json> {
    Request::new(command.spec, command.args.clone())
        .client(client)
        .codec(Codec::Json)
        .timeout(command.timeout)
        .retry(command.retry)
        .durable(command.durable)
}

async fn call(command: &Command, client: &Client) -> ExitCode {
    match request(command, client).await {
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
    latencies_us: Mutex<Vec<u64>>,
    failures: Mutex<BTreeMap<&'static str, u64>>,
    first_failure: Mutex<Option<String>>,
}

async fn bench(command: Command, client: Client) -> ExitCode {
    let command = Arc::new(command);
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let callers: Vec<_> = (0..command.concurrency.min(command.calls))
        .map(|_| {
            let (command, tally, client) = (command.clone(), tally.clone(), client.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while tally.issued.fetch_add(1, Ordering::Relaxed) < command.calls {
                    let sent = Instant::now();
                    match request(&command, &client).send_detailed().await {
                        Ok(reply) => {
                            latencies.push(sent.elapsed().as_micros() as u64);
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                            tally
                                .retries
                                .fetch_add(u64::from(reply.attempts - 1), Ordering::Relaxed);
                        }
                        Err(error) => {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
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
                }
                tally.latencies_us.lock().unwrap().extend(latencies);
            })
        })
        .collect();
    let progress = tokio::spawn({
        let (tally, total) = (tally.clone(), command.calls);
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                draw_progress(&tally, total, started);
            }
        }
    });
    for caller in callers {
        let _ = caller.await;
    }
    progress.abort();
    let elapsed = started.elapsed();
    draw_progress(&tally, command.calls, started);
    eprintln!();

    let mut latencies = std::mem::take(&mut *tally.latencies_us.lock().unwrap());
    latencies.sort_unstable();
    let at = |q: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * q) as usize).min(latencies.len() - 1);
        latencies[i] as f64 / 1000.0
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

/// One line on stderr, redrawn in place: a bar, counts and the rate.
fn draw_progress(tally: &Tally, total: u64, started: Instant) {
    const WIDTH: u64 = 30;
    let done = tally.ok.load(Ordering::Relaxed) + tally.failed.load(Ordering::Relaxed);
    let filled = (done * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH)
        .min(WIDTH);
    let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
    let mut stderr = std::io::stderr().lock();
    let _ = write!(
        stderr,
        "\r[{}{}] {done}/{total} calls, {rate:.0}/s, {} failed",
        "#".repeat(filled as usize),
        "-".repeat((WIDTH - filled) as usize),
        tally.failed.load(Ordering::Relaxed),
    );
    let _ = stderr.flush();
}

fn main() -> ExitCode {
    let verb = match parse_verb(std::env::args().skip(1).collect()) {
        Ok(verb) => verb,
        Err(problem) if problem.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!("error: {problem}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
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
    let outcome = runtime.block_on(async {
        if let Verb::Up(path) = &verb {
            return up(path).await;
        }
        let url = wharf::Settings::get()?
            .nats_url
            .clone()
            .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
        let client = Client::connect(&url).await?;
        match verb {
            Verb::Call(command) if command.bench => Ok(bench(command, client).await),
            Verb::Call(command) => Ok(call(&command, &client).await),
            Verb::Status { json } => status(&client, json).await,
            Verb::Events => events(&client).await,
            Verb::Down => down(&client).await,
            Verb::Objects => objects(&client).await,
            Verb::Up(_) => unreachable!("handled above"),
        }
    });
    outcome.unwrap_or_else(|error| {
        eprintln!("error: {error}");
        ExitCode::FAILURE
    })
}

/// `wharf up`: supervise the services of `path` until Ctrl-C, SIGTERM or
/// `wharf down`.
async fn up(path: &std::path::Path) -> Result<ExitCode, Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let config = wharf::supervisor::UpConfig::load(path)?;
    // `NATS_URL` and `WHARF_PREFIX` override the file's `[broker]` keys.
    let settings = config.settings()?;
    let url = match &settings.nats_url {
        Some(url) => url.clone(),
        None => {
            let url = wharf::start_nats_server_on(Some(4222)).await.map_err(|e| {
                Error::new(
                    e.kind(),
                    format!(
                        "{}; if a nats-server already runs on 4222, set NATS_URL or broker.url in {}",
                        e.message(),
                        path.display()
                    ),
                )
            })?;
            eprintln!("wharf up: started nats-server at {url}");
            url
        }
    };
    let client = Client::connect(&url)
        .await?
        .with_prefix(settings.prefix.clone());
    // Foreign clients read and write objects through it.
    let _objects = wharf::objects::service::serve(&client).await?;
    let supervisor = wharf::supervisor::Supervisor::new(&client, &config).await?;
    eprintln!(
        "wharf up: supervising {} service(s) through {}; `wharf events` follows its decisions",
        config.services.len(),
        wharf::settings::redact(&url)
    );
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::new(ErrorKind::Process, format!("cannot watch SIGTERM: {e}")))?;
    supervisor
        .run(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await?;
    Ok(ExitCode::SUCCESS)
}

/// `wharf objects`: serves the object store until interrupted.
async fn objects(client: &Client) -> Result<ExitCode, Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let _service = wharf::objects::service::serve(client).await?;
    eprintln!(
        "wharf objects: serving {0}.objects.put/get/stat/delete through {1}",
        client.prefix(),
        client.url()
    );
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::new(ErrorKind::Process, format!("cannot watch SIGTERM: {e}")))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// `wharf status`: one row per live instance.
async fn status(client: &Client, json: bool) -> Result<ExitCode, Error> {
    let instances = wharf::supervisor::instances(client).await?;
    if json {
        let text = serde_json::to_string_pretty(&instances)
            .map_err(|e| Error::new(ErrorKind::Codec, e.to_string()))?;
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:<32} {:<12} {:<22} {:>6} {:>8} {:>9} {:>8} {:>9} {:>8}  health",
        "service",
        "instance",
        "host",
        "pid/container",
        "CPU%",
        "RSS MiB",
        "in-flight",
        "backlog",
        "calls/s",
        "mean ms"
    );
    for beat in &instances {
        let location = match &beat.container {
            Some(container) => container.chars().take(12).collect(),
            None => beat.pid.to_string(),
        };
        println!(
            "{:<16} {:<32} {:<12} {:<22} {:>6.1} {:>8.1} {:>9} {:>8} {:>9.1} {:>8.3} {:>8.3}  {}",
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
            if beat.draining { "draining" } else { "ok" }
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
            format!("no `wharf up` answered on {}: {e}", client.url()),
        )),
    }
}
