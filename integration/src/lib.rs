//! Integration and fault tests for wharf, and what they share.
//!
//! The library half defines microservices (so the `svc` binary calls
//! functions defined in another crate, as users do) and the helpers the
//! tests in `tests/` use: worker processes, process inspection and the
//! locally built NATS image.

pub mod cluster;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The function's own error type, to check it survives the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum InventoryError {
    /// Not enough items in stock.
    OutOfStock {
        /// What was left.
        left: u32,
    },
}

impl std::fmt::Display for InventoryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InventoryError::OutOfStock { left } => write!(f, "out of stock: {left} left"),
        }
    }
}

impl std::error::Error for InventoryError {}

/// Adds two numbers.
#[wharf::microservice(service = "itest")]
pub async fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Calls `add` from inside a microservice: a worker's own calls go through
/// its connection, with no `wharf::init` of their own.
#[wharf::microservice(service = "itest")]
pub async fn add_remotely(a: i64, b: i64) -> i64 {
    add(a, b).await.expect("add answers") + add(0, 0).await.expect("add answers")
}

/// The deadline this call runs under, unix milliseconds (0 for none).
#[wharf::microservice(service = "itest")]
pub async fn my_deadline() -> u64 {
    wharf::deadline()
        .and_then(|d| d.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// The deadline of a call made from inside this one; its own timeout is
/// long, so a short deadline seen inside can only be inherited.
#[wharf::microservice(service = "itest", timeout = "60s")]
pub async fn nested_deadline() -> u64 {
    my_deadline().await.expect("my_deadline answers")
}

/// Which process serves: lets tests see the load spread.
#[wharf::microservice(service = "itest")]
pub async fn whoami() -> u32 {
    std::process::id()
}

/// The serving process and the `traceparent` of the trace this call runs
/// in (empty without one).
#[wharf::microservice(service = "itest")]
pub async fn traced() -> (u32, String) {
    let trace = wharf::trace::current().map(|t| t.traceparent());
    (std::process::id(), trace.unwrap_or_default())
}

/// [`traced`] of this call, then of a [`traced`] call made from here.
#[wharf::microservice(service = "itest")]
pub async fn traced_nested() -> ((u32, String), (u32, String)) {
    let trace = wharf::trace::current().map(|t| t.traceparent());
    let inner = traced().await.expect("traced answers");
    ((std::process::id(), trace.unwrap_or_default()), inner)
}

/// [`traced`] for a sync function, which runs on the blocking pool.
#[wharf::microservice(service = "itest")]
pub fn traced_blocking() -> String {
    wharf::trace::current().map_or_else(String::new, |t| t.traceparent())
}

/// Sleeps, then answers: a call that is in flight for a while.
#[wharf::microservice(service = "itest", timeout = "30s")]
pub async fn sleep_ms(ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

/// Takes items from a stock of 10; a sync function with its own error.
#[wharf::microservice(service = "itest")]
pub fn take(count: u32) -> Result<u32, InventoryError> {
    if count <= 10 {
        Ok(10 - count)
    } else {
        Err(InventoryError::OutOfStock { left: 10 })
    }
}

/// Echoes `n` after `ms` milliseconds of work. Idempotent: a call whose
/// worker dies is retried on another.
#[wharf::microservice(service = "itest", idempotent)]
pub async fn echo_slowly(n: u64, ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    n
}

/// Kills the worker that runs it: a durable call no worker survives, which
/// must end in the dead-letter stream rather than kill workers forever.
#[wharf::microservice(service = "itest", durable, timeout = "60s")]
pub async fn crash_worker() {
    std::process::abort();
}

/// Burns CPU for `ms` milliseconds: load for the autoscaler.
#[wharf::microservice(service = "itest", idempotent, timeout = "60s")]
pub fn burn(ms: u64) -> u64 {
    let until = Instant::now() + Duration::from_millis(ms);
    let mut spins = 0u64;
    while Instant::now() < until {
        spins = std::hint::black_box(spins.wrapping_add(1));
    }
    spins
}

/// Stops its own process (SIGSTOP): alive, but it answers nothing any more,
/// heartbeats and pings included. A hung worker.
#[wharf::microservice(service = "itest", timeout = "1s", attempts = 1)]
pub async fn hang() {
    // SAFETY: raise(3) has no memory-safety preconditions.
    unsafe {
        libc::raise(libc::SIGSTOP);
    }
}

/// Where the levels of a call tree of run `run` tell what they do:
/// `itest.tree.<run>`, payloads `started <level> <pid>` and
/// `stopped <level> <pid>`.
pub fn tree_subject(run: &str) -> String {
    format!("itest.tree.{run}")
}

/// Tells [`tree_subject`] that a level stopped, when dropped: a cancelled
/// call's future is dropped where it waits.
struct Stopped {
    subject: String,
    level: u32,
}

impl Stopped {
    fn start(run: &str, level: u32) -> Stopped {
        let subject = tree_subject(run);
        tell(&subject, format!("started {level} {}", std::process::id()));
        Stopped { subject, level }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let text = format!("stopped {} {}", self.level, std::process::id());
        tell(&self.subject, text);
    }
}

/// Publishes `text` on `subject` through the worker's connection, from a
/// task of its own (callable where nothing can be awaited).
fn tell(subject: &str, text: String) {
    let nats = wharf::client().expect("a worker's client").nats().clone();
    let subject = subject.to_owned();
    tokio::runtime::Handle::current().spawn(async move {
        let _ = nats.publish(subject, text.into()).await;
        let _ = nats.flush().await;
    });
}

/// One level of a call tree that runs until it is cancelled: levels 1 and
/// 2 call the next level and wait for it; level 3 is [`tree_leaf`].
#[wharf::microservice(service = "itest", timeout = "60s")]
pub async fn tree(run: String, level: u32) -> u32 {
    let _stopped = Stopped::start(&run, level);
    // A level whose call below timed out answers 0: the test reads the
    // events, not the answer.
    if level >= 2 {
        tree_leaf(run).await.unwrap_or(0)
    } else {
        tree(run, level + 1).await.unwrap_or(0)
    }
}

/// The last level of a [`tree`]: a sync function that works until
/// `wharf::cancelled()` says to stop (at most a minute), then tells it.
#[wharf::microservice(service = "itest", timeout = "60s")]
pub fn tree_leaf(run: String) -> u32 {
    let subject = tree_subject(&run);
    let pid = std::process::id();
    tell(&subject, format!("started 3 {pid}"));
    let until = Instant::now() + Duration::from_secs(60);
    while !wharf::cancelled() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
    tell(&subject, format!("stopped 3 {pid}"));
    3
}

/// A durable call that runs until it is cancelled (at most a minute),
/// telling [`tree_subject`] of `run` when it starts and stops (level 1).
#[wharf::microservice(service = "itest", durable, timeout = "120s")]
pub async fn hold(run: String) -> u32 {
    let _stopped = Stopped::start(&run, 1);
    tokio::time::sleep(Duration::from_secs(60)).await;
    1
}

/// The first build of a function whose signature changes: the `svc_v2`
/// binary serves `versioned(x, y)` under the same name.
#[wharf::microservice(service = "itest")]
pub async fn versioned(x: i64) -> String {
    format!("v1 {x}")
}

/// Where a [`chunks`] stream of run `run` tells each item it produced:
/// `itest.stream.<run>`, payload the item's index.
pub fn produced_subject(run: &str) -> String {
    format!("itest.stream.{run}")
}

/// Streams `count` items of `size` bytes, every byte of item `i` being
/// `i as u8`. With a `run`, it tells [`produced_subject`] each item as it
/// makes it, and [`tree_subject`] (level 1) when it starts and stops.
#[wharf::microservice(service = "itest", timeout = "600s")]
pub async fn chunks(run: String, count: u64, size: u32) -> wharf::Stream<bytes::Bytes> {
    let told = (!run.is_empty()).then(|| (produced_subject(&run), Stopped::start(&run, 1)));
    wharf::Stream::new(futures_util::stream::iter(0..count).map(move |i| {
        if let Some((subject, _stopped)) = &told {
            tell(subject, i.to_string());
        }
        bytes::Bytes::from(vec![i as u8; size as usize])
    }))
}

/// Reads a stream argument of byte items, pausing `pause_ms` after each;
/// with a `run`, it tells [`produced_subject`] each index it read, and
/// [`tree_subject`] (level 1) when it starts and stops. Returns the items
/// and bytes read; an error item is returned as `<kind>: <message>`.
#[wharf::microservice(service = "itest", timeout = "600s")]
pub async fn read_bytes(
    run: String,
    pause_ms: u64,
    items: wharf::Stream<bytes::Bytes>,
) -> Result<(u64, u64), String> {
    let _stopped = (!run.is_empty()).then(|| Stopped::start(&run, 1));
    let mut items = items;
    let (mut count, mut bytes) = (0u64, 0u64);
    while let Some(item) = items.next().await {
        let item = item.map_err(|e| format!("{}: {}", e.kind().as_str(), e.message()))?;
        if !item.iter().all(|b| *b == count as u8) {
            return Err(format!("item {count} does not hold its index"));
        }
        if !run.is_empty() {
            tell(&produced_subject(&run), count.to_string());
        }
        count += 1;
        bytes += item.len() as u64;
        if pause_ms > 0 {
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        }
    }
    Ok((count, bytes))
}

/// Where a [`read_in_steps`] call of `run` waits to be told to read on.
pub fn go_subject(run: &str) -> String {
    format!("itest.go.{run}")
}

/// Reads a stream argument of byte items `step` at a time: after each
/// step it tells [`produced_subject`] of `run` how many it read, then waits
/// for a message on [`go_subject`]. Returns the number read.
#[wharf::microservice(service = "itest", timeout = "120s")]
pub async fn read_in_steps(
    run: String,
    step: u64,
    items: wharf::Stream<bytes::Bytes>,
) -> Result<u64, String> {
    let nats = wharf::client().map_err(|e| e.to_string())?.nats().clone();
    let mut go = nats
        .subscribe(go_subject(&run))
        .await
        .map_err(|e| e.to_string())?;
    nats.flush().await.map_err(|e| e.to_string())?;
    let mut items = items;
    let mut count = 0u64;
    while let Some(item) = items.next().await {
        item.map_err(|e| e.to_string())?;
        count += 1;
        if count % step.max(1) == 0 {
            tell(&produced_subject(&run), count.to_string());
            go.next().await;
        }
    }
    Ok(count)
}

/// The first of `items` above `limit`, read no further than that.
#[wharf::microservice(service = "itest")]
pub async fn first_above(limit: i64, items: wharf::Stream<i64>) -> Option<i64> {
    let mut items = items;
    while let Some(Ok(n)) = items.next().await {
        if n > limit {
            return Some(n);
        }
    }
    None
}

/// The sum of `items`; an error item is returned as `<kind>: <message>`.
#[wharf::microservice(service = "itest")]
pub async fn sum_all(items: wharf::Stream<i64>) -> Result<i64, String> {
    let mut items = items;
    let mut sum = 0;
    while let Some(item) = items.next().await {
        sum += item.map_err(|e| format!("{}: {}", e.kind().as_str(), e.message()))?;
    }
    Ok(sum)
}

/// Counts down from `from` to 0, an item at a time; with `fail_at`, the
/// stream ends with an error instead of that item.
#[wharf::microservice(service = "itest")]
pub fn countdown(from: u32, fail_at: Option<u32>) -> wharf::Stream<u32> {
    let (sender, stream) = wharf::Stream::channel(4);
    tokio::spawn(async move {
        for n in (0..=from).rev() {
            if Some(n) == fail_at {
                return sender.fail(format!("cannot count {n}")).await;
            }
            if sender.send(n).await.is_err() {
                return;
            }
        }
    });
    stream
}

/// Adds `by` to the transaction's running total after `ms` milliseconds;
/// returns the total and the pid of the instance holding it.
#[wharf::microservice(service = "itest", stateful)]
pub async fn accumulate(by: u64, ms: u64, total: wharf::State<u64>) -> (u64, u32) {
    let mut total = total;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    *total += by;
    (*total, std::process::id())
}

/// Reads a stored blob as a stream: its length and the wrapping sum of
/// its bytes, so a test can check every byte arrived without the worker
/// ever holding the whole object.
#[wharf::microservice(service = "itest", timeout = "120s")]
pub async fn blob_stats(blob: wharf::ObjectRef<wharf::Blob>) -> Result<(u64, u64), String> {
    use tokio::io::AsyncReadExt;
    let mut reader = blob.reader().await.map_err(|e| e.to_string())?;
    let mut buffer = vec![0u8; 256 * 1024];
    let (mut len, mut sum) = (0u64, 0u64);
    loop {
        let n = reader.read(&mut buffer).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok((len, sum));
        }
        len += n as u64;
        sum = buffer[..n]
            .iter()
            .fold(sum, |sum, byte| sum.wrapping_add(u64::from(*byte)));
    }
}

/// Length and byte sum of a value passed inline: a large one is spilled
/// to the object store on the way, invisibly. A plain `fn`, as the README
/// asks of CPU-bound work: summing 10 MiB on an async thread (slow in a
/// debug build) would hold up the worker's answers to probes for the call.
#[wharf::microservice(service = "itest", timeout = "60s")]
pub fn byte_sum(data: Vec<u8>) -> (u64, u64) {
    let sum = data
        .iter()
        .fold(0u64, |sum, byte| sum.wrapping_add(u64::from(*byte)));
    (data.len() as u64, sum)
}

/// `len` bytes of a pattern: a large result is spilled too.
#[wharf::microservice(service = "itest", timeout = "60s")]
pub async fn pattern(len: u64) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// KV bucket where [`tally`] counts the runs of each call.
pub const TALLY_BUCKET: &str = "itest_tally";

/// Counts one run of call `n` in KV (key `n`, value the number of runs):
/// not idempotent, so it is called durably and its duplicates are visible.
#[wharf::microservice(service = "itest", durable, timeout = "120s")]
pub async fn tally(n: u64, ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    // Counting must survive a broker restart: every step is retried.
    loop {
        match count_run(n).await {
            Ok(()) => return n,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Adds one to call `n`'s count (compare-and-set, so two runs of one call
/// racing both count).
async fn count_run(n: u64) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let nats = wharf::client()?.nats().clone();
    let js = async_nats::jetstream::new(nats);
    let kv = match js.get_key_value(TALLY_BUCKET).await {
        Ok(kv) => kv,
        Err(_) => {
            js.create_key_value(async_nats::jetstream::kv::Config {
                bucket: TALLY_BUCKET.to_owned(),
                history: 1,
                ..Default::default()
            })
            .await?
        }
    };
    let key = n.to_string();
    let (runs, revision) = match kv.entry(key.as_str()).await? {
        Some(entry) => (
            std::str::from_utf8(&entry.value)?.parse::<u64>()?,
            entry.revision,
        ),
        None => (0, 0),
    };
    let value = (runs + 1).to_string().into_bytes().into();
    if revision == 0 {
        kv.create(key.as_str(), value).await?;
    } else {
        kv.update(key.as_str(), value, revision).await?;
    }
    Ok(())
}

/// Stops callers (each returns the calls it made and its failures) and
/// sums what they did; panics on any failure, `what` naming the callers.
pub async fn settle_callers(
    what: &str,
    stop: tokio::sync::watch::Sender<bool>,
    callers: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>,
) -> u64 {
    stop.send(true).unwrap();
    let mut calls = 0;
    let mut failures = Vec::new();
    for caller in callers {
        let (made, failed) = caller.await.unwrap();
        calls += made;
        failures.extend(failed);
    }
    assert!(calls > 0, "{what} made calls");
    assert!(
        failures.is_empty(),
        "{what}: {} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    calls
}

/// Path of the `svc` binary. Cargo builds it with this crate's tests, next
/// to the `deps/` folder the test executables run from.
pub fn svc_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in <target>/<profile>/deps");
    profile_dir.join("svc")
}

/// A worker process of the `svc` binary, killed when dropped so that a
/// failing test leaves no process behind.
pub struct WorkerProcess(Child);

impl WorkerProcess {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Waits (up to 30 s) for it to exit, after a signal, and returns its
    /// status.
    pub async fn exit_status(mut self) -> std::process::ExitStatus {
        let pid = self.pid();
        wharf::testing::eventually(
            &format!("process {pid} to exit"),
            Duration::from_secs(30),
            || {
                let status = self.0.try_wait().expect("waitpid");
                async move { status.ok_or_else(|| "it still runs".to_owned()) }
            },
        )
        .await
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A process and everything it started, all killed when dropped: for a
/// supervisor, whose instances would outlive its SIGKILL.
pub struct ProcessTree(pub WorkerProcess);

impl Drop for ProcessTree {
    fn drop(&mut self) {
        // Found before the parent dies: orphans are reparented and lost.
        let started = descendants(self.0.pid());
        self.0.kill();
        for pid in started {
            // SAFETY: kill(2) on a pid of our own descendants.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// A worker process of the `svc` binary serving through `url`.
pub fn spawn_worker(url: &str) -> WorkerProcess {
    spawn_worker_with(url, &[])
}

/// A worker process with extra environment, such as `WHARF_ACK_WAIT`.
pub fn spawn_worker_with(url: &str, env: &[(&str, &str)]) -> WorkerProcess {
    let mut env: Vec<(&str, &str)> = env.to_vec();
    env.push(("NATS_URL", url));
    spawn_svc(&["worker"], &env)
}

/// A worker process of the `svc_v2` binary: the second build of
/// [`versioned`], with a changed signature.
pub fn spawn_worker_v2(url: &str) -> WorkerProcess {
    let binary = svc_binary().with_file_name("svc_v2");
    let mut command = Command::new(binary);
    command
        .arg("worker")
        .env("NATS_URL", url)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    WorkerProcess(command.spawn().expect("the svc_v2 binary starts"))
}

/// The `svc` binary with `args` and `env`, killed when dropped.
pub fn spawn_svc(args: &[&str], env: &[(&str, &str)]) -> WorkerProcess {
    let mut command = Command::new(svc_binary());
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    WorkerProcess(command.spawn().expect("the svc binary starts"))
}

/// The `svc` binary with `args` and `env`, killed when dropped, and the
/// lines it writes to stderr as they come.
pub fn spawn_svc_logged(
    args: &[&str],
    env: &[(&str, &str)],
) -> (WorkerProcess, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::BufRead;
    let mut command = Command::new(svc_binary());
    command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("the svc binary starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let heard = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            heard.lock().unwrap().push(line);
        }
    });
    (WorkerProcess(child), lines)
}

/// The port a process logged that it serves metrics on.
pub async fn logged_metrics_port(
    lines: &std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    who: &str,
) -> u16 {
    wharf::testing::eventually(
        &format!("the {who} to log its metrics address"),
        Duration::from_secs(60),
        || async {
            let lines = lines.lock().unwrap();
            lines
                .iter()
                .find_map(|line| {
                    let (_, rest) = line.split_once("serving Prometheus metrics on http://")?;
                    let address = rest.split('/').next()?;
                    address.rsplit(':').next()?.parse().ok()
                })
                .ok_or_else(|| format!("its log so far: {lines:?}"))
        },
    )
    .await
}

/// A plain HTTP/1.1 GET to `127.0.0.1:port`: the status code and the body.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| e.to_string())?;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("no HTTP head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status in `{head}`"))?;
    Ok((status, body.to_owned()))
}

/// Writes a `REPORT` line past the test harness's capture, so that every
/// run (CI's included) shows what a test measured.
pub fn report_line(line: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// `report!("REPORT ...", ..)`: [`report_line`] with `format!` arguments.
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {
        $crate::report_line(format!($($arg)*))
    };
}

/// Calls `add(2, 3)` through `client` until a worker answers (up to 60 s),
/// and returns its reply, which names the worker; `what` says which worker
/// is awaited, for the failure message.
pub async fn first_answer(client: &wharf::Client, what: &str) -> wharf::Reply<i64> {
    let reply = wharf::testing::eventually(what, Duration::from_secs(60), || {
        let client = client.clone();
        async move {
            add::request(2, 3)
                .client(&client)
                .timeout(Duration::from_secs(5))
                .send_detailed()
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    assert_eq!(reply.value, 5, "{what}");
    reply
}

/// Waits (up to 60 s) until `count` distinct processes answer `whoami`
/// through `client`; returns their pids.
pub async fn wait_for_workers(client: &wharf::Client, count: usize) -> Vec<u32> {
    let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
    wharf::testing::eventually(
        &format!("{count} workers to answer"),
        Duration::from_secs(60),
        || {
            let seen = &seen;
            async move {
                // A burst of calls per look: the queue group picks at random.
                for _ in 0..10 * count {
                    let Ok(pid) = whoami::call(client).await else {
                        break;
                    };
                    if seen.lock().unwrap().insert(pid) && seen.lock().unwrap().len() >= count {
                        break;
                    }
                }
                let seen = seen.lock().unwrap();
                if seen.len() >= count {
                    Ok(seen.iter().copied().collect())
                } else {
                    Err(format!("{} answered: {seen:?}", seen.len()))
                }
            }
        },
    )
    .await
}

/// Calls in flight on the workers of `service` right now, summed over their
/// `$SRV.STATS` replies (each worker reports its own in `data.in_flight`).
pub async fn in_flight(client: &wharf::Client, service: &str) -> u64 {
    use futures_util::StreamExt;
    let inbox = client.nats().new_inbox();
    let mut replies = client
        .nats()
        .subscribe(inbox.clone())
        .await
        .expect("subscribe");
    client
        .nats()
        .publish_with_reply(
            wharf::wire::subjects::discovery_of("STATS", service),
            inbox,
            "".into(),
        )
        .await
        .expect("publish");
    let mut total = 0;
    // Every worker answers at once; a short quiet spell ends the count.
    while let Ok(Some(reply)) =
        tokio::time::timeout(Duration::from_millis(200), replies.next()).await
    {
        let stats: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
        total += stats["endpoints"]
            .as_array()
            .and_then(|e| e.first())
            .and_then(|e| e["data"]["in_flight"].as_u64())
            .unwrap_or(0);
    }
    total
}

/// Sends a signal to a pid, and tells whether a pid is a live process: the
/// runtime's own process helpers.
pub use wharf::process::{alive, signal};

/// Waits until none of `pids` is alive; false if some still are at `within`.
pub fn wait_gone(pids: &[u32], within: Duration) -> bool {
    let until = Instant::now() + within;
    loop {
        if pids.iter().all(|pid| !alive(*pid)) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The live descendants of `pid` (children, their children, ...), from
/// /proc: what a process started, to clean up after it.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut queue = vec![pid];
    while let Some(parent) = queue.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in text
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                if !found.contains(&child) {
                    found.push(child);
                    queue.push(child);
                }
            }
        }
    }
    found.retain(|p| alive(*p));
    found
}

/// How long one docker command may take: a daemon that stops answering
/// fails the test rather than hanging the run.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `docker` with `args` (at most [`DOCKER_TIMEOUT`]) and returns what
/// it printed, or what went wrong.
pub fn try_docker(args: &[&str]) -> Result<String, String> {
    let mut child = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("docker cannot be run: {e}"))?;
    let until = Instant::now() + DOCKER_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() > until => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "docker {} did not finish within {DOCKER_TIMEOUT:?} (is the Docker daemon stuck?)",
                    args.join(" ")
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("docker {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// [`try_docker`], panicking with what went wrong.
pub fn docker(args: &[&str]) -> String {
    try_docker(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Force-removes every container (running or not) carrying `label`
/// (`key=value`); a no-op without Docker.
pub fn remove_containers(label: &str) {
    let Ok(listed) = try_docker(&[
        "ps",
        "--all",
        "--quiet",
        "--filter",
        &format!("label={label}"),
    ]) else {
        return;
    };
    // One at a time: removing many at once has been seen to wedge the
    // daemon.
    for id in listed.split_whitespace() {
        let _ = try_docker(&["rm", "--force", "--volumes", id]);
    }
}

/// A name no other test of any test process uses at the same time: for
/// subject prefixes, temporary directories and Docker names.
pub fn unique_name(stem: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{stem}_{}_{}_{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Whether tests that need Docker may skip when it is missing. Under CI or
/// with `WHARF_REQUIRE_DOCKER` set, a missing Docker is a failure.
pub fn docker_required() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os("WHARF_REQUIRE_DOCKER").is_some()
}

/// Whether a Docker engine answers.
pub fn docker_available() -> bool {
    Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether Docker can be used; when it cannot, fails if it is required
/// and otherwise prints a visible skip line.
fn docker_or_skip() -> bool {
    if docker_available() {
        return true;
    }
    assert!(
        !docker_required(),
        "Docker is required here (CI or WHARF_REQUIRE_DOCKER is set) but `docker info` fails: start the Docker engine"
    );
    eprintln!("SKIP: Docker is not available; set WHARF_REQUIRE_DOCKER=1 to make this a failure");
    false
}

/// Name and tag of the local NATS image.
pub const NATS_IMAGE: (&str, &str) = ("wharf-nats", "local");

/// Builds the local NATS image (`FROM scratch` plus the static nats-server
/// binary, from `broker-config/docker/nats.Dockerfile`).
/// Returns `None`, after printing a visible skip line, when Docker is
/// missing and not required; panics when it is required.
pub fn nats_image() -> Option<(&'static str, &'static str)> {
    if !docker_or_skip() {
        return None;
    }
    // Built once per test process; Docker's layer cache makes a rebuild of
    // an unchanged binary quick, and a changed binary is never missed.
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| build_nats_image(&format!("{}:{}", NATS_IMAGE.0, NATS_IMAGE.1)));
    Some(NATS_IMAGE)
}

/// The nats-server executable itself: an image `FROM scratch` cannot run a
/// wrapper script (such as a pyenv shim) or a dynamically linked build.
fn static_nats_server() -> PathBuf {
    let found = wharf::nats_server_binary().expect("nats-server is installed");
    let is_elf = |path: &Path| {
        std::fs::read(path)
            .map(|bytes| bytes.starts_with(b"\x7fELF"))
            .unwrap_or(false)
    };
    let real = std::fs::canonicalize(&found).unwrap_or(found.clone());
    if is_elf(&real) {
        return real;
    }
    // A pyenv shim: ask pyenv where the binary is.
    let resolved = Command::new("pyenv")
        .args(["which", "nats-server"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    match resolved {
        Some(path) if is_elf(&path) => path,
        _ => panic!(
            "{} is not the nats-server binary itself (a wrapper script?); set WHARF_NATS_SERVER to the static binary",
            found.display()
        ),
    }
}

/// Name and tag of the local worker image of the `svc` binary.
pub const SVC_IMAGE: &str = "wharf-svc:local";

/// Builds [`SVC_IMAGE`]: `FROM scratch` with the `svc` binary and the
/// shared libraries it links (found with `ldd`), so the image needs nothing
/// pulled. `None` (after a visible skip line) when Docker is missing and not
/// required.
pub fn svc_image() -> Option<&'static str> {
    if !docker_or_skip() {
        return None;
    }
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(build_svc_image);
    Some(SVC_IMAGE)
}

fn build_svc_image() {
    let binary = svc_binary();
    let dir = wharf::testing::TempDir::new("svc-image");
    let context = dir.path();
    let rootfs = context.join("rootfs");
    std::fs::create_dir_all(&rootfs).expect("build context");
    std::fs::copy(&binary, rootfs.join("svc")).expect("copy svc");
    let ldd = Command::new("ldd").arg(&binary).output().expect("ldd runs");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x…)`.
        let path = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(path) = path {
            let target = rootfs.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(target.parent().unwrap()).expect("library folder");
            std::fs::copy(path, &target).expect("copy a shared library");
        }
    }
    std::fs::write(
        context.join("Dockerfile"),
        // The label lets the test command prune the images that earlier
        // builds of `svc` left dangling.
        "FROM scratch\nLABEL wharf.test=svc\nCOPY rootfs/ /\nENTRYPOINT [\"/svc\"]\n",
    )
    .expect("Dockerfile");
    let status = Command::new("docker")
        .args(["build", "-q", "-t", SVC_IMAGE])
        .arg(context)
        .stdout(Stdio::null())
        .status()
        .expect("docker build runs");
    assert!(status.success(), "docker build of {SVC_IMAGE} failed");
}

fn build_nats_image(tag: &str) {
    let binary = static_nats_server();
    let dir = wharf::testing::TempDir::new("nats-image");
    let context = dir.path();
    std::fs::copy(&binary, context.join("nats-server")).expect("copy nats-server");
    let dockerfile =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker-config/docker/nats.Dockerfile");
    let status = Command::new("docker")
        .args(["build", "-q", "-t", tag, "-f"])
        .arg(&dockerfile)
        .arg(context)
        .stdout(Stdio::null())
        .status()
        .expect("docker build runs");
    assert!(status.success(), "docker build of {tag} failed");
}
