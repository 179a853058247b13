//! wharf turns ordinary Rust functions into horizontally scaled
//! microservices over NATS.
//!
//! ```no_run
//! #[wharf::microservice]
//! async fn add(a: i64, b: i64) -> i64 {
//!     a + b
//! }
//!
//! #[wharf::main]
//! async fn main() -> Result<(), wharf::Error> {
//!     wharf::init().await?; // starts nats-server and workers unless NATS_URL is set
//!     assert_eq!(add(2, 3).await?, 5); // a NATS request on `wharf.<crate>.add`
//!     assert_eq!(add::local(2, 3).await, 5); // the body, in this process
//!     Ok(())
//! }
//! ```
//!
//! Every call to `add` is a NATS request on its own subject, answered by a
//! worker process in a queue group. The wire contract (subjects, codecs,
//! headers, error codes) is in `docs/protocol.md`.
//!
//! # What `#[microservice]` accepts
//!
//! A free `fn` or `async fn` at module level (not inside a function body),
//! with owned `Serialize + DeserializeOwned` arguments bound to plain names.
//! A return type written `Result<T, E>` (two arguments, any path ending in
//! `Result`) makes `E` the function's own error, returned as
//! [`CallError::Application`]; any other return type, a one-argument alias
//! such as `io::Result<T>` included, is sent back as one value.
//!
//! A `#[microservice(stateful)]` function may also take one
//! [`State<S>`](State) argument (`S: Default + Send + 'static`): the state
//! of the transaction the call belongs to, kept by the instance that owns
//! it. The caller does not pass it; see [`transaction`].

pub mod backend;
mod bucket;
mod children;
mod client;
mod context;
pub mod durable;
mod embedded;
mod error;
pub mod heartbeat;
mod histogram;
mod micro;
pub mod objects;
mod retry;
pub mod scaler;
pub mod settings;
mod spec;
pub mod supervisor;
pub mod testing;
mod txn;
pub mod wire;
pub mod worker;

pub use client::{global as client, Client, Fallible, Plain, Reply, Request, Returns};
pub use context::{deadline, time_left};
pub use durable::Pending;
pub use embedded::{nats_server_binary, start_nats_server_on};
pub use error::{CallError, Error, ErrorKind};
pub use objects::{put, Blob, ObjectRef};
pub use retry::RetryPolicy;
pub use settings::{Settings, DEFAULT_LEASE};
pub use spec::{registered, ArgSpec, FnSpec};
pub use txn::{transaction, State, Transaction, QUIESCE_LIMIT};
pub use wharf_macros::{main, microservice};
pub use wire::codec::Codec;
pub use wire::subjects::{valid_txn_id, TXN_BUCKET};
pub use wire::{codec, headers};
pub use worker::{RunningWorker, Worker};

use std::time::Duration;

/// A boxed future made in a stack frame of its own.
///
/// For the rare branches of the call path (faults, spills, retries): a
/// future built inline takes its full size in the frame of every poll of
/// the future that awaits it, even when the branch is never taken, and a
/// frame of tens of KiB costs each call stack probes and cache misses. Made
/// here, never inlined, its size stays out of the hot frame.
#[inline(never)]
pub(crate) fn out_of_line<'a, F>(
    make: impl FnOnce() -> F,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = F::Output> + Send + 'a>>
where
    F: std::future::Future + Send + 'a,
{
    Box::pin(make())
}

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
    // Already set up, by an earlier call or, in a worker, by the worker
    // itself (so a microservice that calls another one simply gets the
    // worker's connection).
    if let Ok(client) = client::global() {
        return Ok(client.clone());
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
    let url = embedded::start_nats_server().await?;
    children::stop_on_signals();
    let client = Client::connect(&url).await?;
    if registered().next().is_some() && config.workers > 0 {
        let supervisor =
            embedded::supervise_workers(&client, config.workers, config.max_workers).await?;
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

/// Whether this process was started to serve: `WHARF_ROLE=worker`, or
/// `worker` as its first argument.
pub fn is_worker_role() -> bool {
    // With settings that do not validate, `init()` reports why.
    Settings::get().is_ok_and(|s| s.role == settings::Role::Worker)
        || std::env::args().nth(1).is_some_and(|arg| arg == "worker")
}

/// The worker role's whole life: connect, serve, drain on SIGTERM/SIGINT.
/// Returns the process exit code.
async fn worker_process(grace: Duration) -> i32 {
    let settings = match Settings::get() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("wharf worker: {error}");
            return 2;
        }
    };
    let Some(url) = settings.nats_url.as_deref() else {
        eprintln!("wharf worker: NATS_URL is not set; a worker serves through the NATS server its callers use, e.g. NATS_URL=nats://127.0.0.1:4222");
        return 2;
    };
    match serve_until_signal(url, grace).await {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("wharf worker: {error}");
            1
        }
    }
}

async fn serve_until_signal(url: &str, grace: Duration) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let started = std::time::Instant::now();
    let client = Client::connect(url).await?;
    // Calls made from inside a microservice go through this connection.
    client::set_global(client.clone());
    let worker = Worker::new(&client).start().await?;
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::new(ErrorKind::Process, format!("cannot watch SIGTERM: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Error::new(ErrorKind::Process, format!("cannot watch SIGINT: {e}")))?;
    if let Some(subject) = Settings::get()?.ready_subject.clone() {
        let note = format!("{} {}", std::process::id(), worker.instance());
        let _ = client.nats().publish(subject, note.into()).await;
        let _ = client.nats().flush().await;
    }
    let functions: Vec<String> = registered()
        .map(|s| format!("{}.{}", s.service, s.name))
        .collect();
    eprintln!(
        "wharf worker {} ready in {} ms: {}",
        std::process::id(),
        started.elapsed().as_millis(),
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

/// Support for the generated code. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::client::{call, call_global, Fallible, Plain};
    pub use crate::spec::{Registration, SubjectCache};
    pub use crate::worker::{HandlerFuture, Incoming};
    pub use inventory;
    pub use serde;

    /// In the worker role, serves every microservice and exits the process.
    pub fn serve_if_worker() {
        if crate::is_worker_role() {
            let code = block_on(crate::worker_process(std::time::Duration::from_secs(10)));
            std::process::exit(code);
        }
    }

    /// Runs `future` on a new multi-threaded tokio runtime (`#[wharf::main]`).
    pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime")
            .block_on(future)
    }

    /// Text for an application error: its `Display` if it has one, else its
    /// `Debug`, else its type name. Chosen at compile time by autoref.
    pub mod describe {
        use std::fmt::{Debug, Display};

        /// Wraps the error being described.
        pub struct Describe<'a, T>(pub &'a T);

        /// Preferred: `Display`.
        pub trait ViaDisplay {
            /// The text.
            fn describe(&self) -> String;
        }
        impl<T: Display> ViaDisplay for &&Describe<'_, T> {
            fn describe(&self) -> String {
                self.0.to_string()
            }
        }

        /// Then `Debug`.
        pub trait ViaDebug {
            /// The text.
            fn describe(&self) -> String;
        }
        impl<T: Debug> ViaDebug for &Describe<'_, T> {
            fn describe(&self) -> String {
                format!("{:?}", self.0)
            }
        }

        /// Last resort: the type's name.
        pub trait ViaName {
            /// The text.
            fn describe(&self) -> String;
        }
        impl<T> ViaName for Describe<'_, T> {
            fn describe(&self) -> String {
                format!("an error of type {}", std::any::type_name::<T>())
            }
        }
    }
}
