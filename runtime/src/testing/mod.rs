//! A real nats-server for tests: one per test, on a free port, with
//! JetStream and a temporary store, stopped when dropped.
//!
//! ```no_run
//! # async fn run() -> Result<(), wharf::Error> {
//! let server = wharf::testing::NatsServer::start()?;
//! let client = wharf::Client::connect(&server.url()).await?;
//! let worker = wharf::Worker::new(&client).start().await?;
//! # Ok(()) }
//! ```

mod cluster;
mod secure;

pub use cluster::NatsCluster;
pub use secure::{JwtAccount, Pki};

use crate::{Error, ErrorKind};
use std::future::Future;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

/// A nats-server child process owned by a test.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    port: u16,
    monitoring: u16,
    dir: PathBuf,
    jetstream: bool,
}

impl NatsServer {
    /// Starts a server with default settings and waits until it listens.
    pub fn start() -> Result<NatsServer, Error> {
        NatsServer::start_with_config("")
    }

    /// Starts a server with extra configuration in nats-server's config
    /// syntax, for example `max_payload: 4096`. Address, port and the
    /// JetStream store are set by the helper.
    pub fn start_with_config(config: &str) -> Result<NatsServer, Error> {
        NatsServer::launch(config, true)
    }

    /// Starts a server without JetStream (and with extra `config`): no
    /// durable calls, transactions or object store.
    pub fn start_without_jetstream(config: &str) -> Result<NatsServer, Error> {
        NatsServer::launch(config, false)
    }

    fn launch(config: &str, jetstream: bool) -> Result<NatsServer, Error> {
        let binary = crate::local::server::nats_server_binary()?;
        let dir = std::env::temp_dir().join(format!("wharf-test-nats-{}", nuid::next().as_str()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::new(ErrorKind::Process, format!("cannot create {dir:?}: {e}")))?;
        let config_file = dir.join("server.conf");
        std::fs::write(&config_file, config).map_err(|e| {
            Error::new(
                ErrorKind::Process,
                format!("cannot write {config_file:?}: {e}"),
            )
        })?;
        let child = spawn(&binary, &dir, None, jetstream)?;
        let mut server = NatsServer {
            child,
            port: 0,
            monitoring: 0,
            dir,
            jetstream,
        };
        server.wait_listening()?;
        Ok(server)
    }

    /// Kills the server with SIGKILL, as a crash would, and starts it again
    /// on the same ports with the same JetStream store. Clients reconnect on
    /// their own.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill();
        self.revive()
    }

    /// Kills the server with SIGKILL, as a crash would; [`revive`] starts
    /// it again.
    ///
    /// [`revive`]: NatsServer::revive
    pub fn kill(&mut self) {
        crate::process::kill_child(&mut self.child);
    }

    /// Starts a killed server again on the same ports with the same
    /// JetStream store.
    pub fn revive(&mut self) -> Result<(), Error> {
        let binary = crate::local::server::nats_server_binary()?;
        let _ = std::fs::remove_file(
            self.dir
                .join(format!("nats-server_{}.ports", self.child.id())),
        );
        self.child = spawn(
            &binary,
            &self.dir,
            Some((self.port, self.monitoring)),
            self.jetstream,
        )?;
        self.wait_listening()
    }

    /// Waits until the server wrote its ports file, and reads the ports.
    fn wait_listening(&mut self) -> Result<(), Error> {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let pid = self.child.id();
            let ports = (
                crate::local::server::reported_port(&self.dir, pid, "nats"),
                crate::local::server::reported_port(&self.dir, pid, "monitoring"),
            );
            if let (Some(port), Some(monitoring)) = ports {
                self.port = port;
                self.monitoring = monitoring;
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Its own last words say what was wrong with the config.
                let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                let said: Vec<&str> = log.lines().rev().take(3).collect();
                return Err(Error::new(
                    ErrorKind::Process,
                    format!(
                        "nats-server exited before listening: {status}; it said: {}",
                        said.into_iter().rev().collect::<Vec<_>>().join(" / ")
                    ),
                ));
            }
            if Instant::now() > until {
                return Err(Error::new(
                    ErrorKind::Process,
                    "nats-server reported no port within 30 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl NatsServer {
    /// Client connections the server holds right now (its `/varz`).
    pub fn connections(&self) -> Result<u64, Error> {
        let varz = self.monitor("/varz")?;
        varz["connections"]
            .as_u64()
            .ok_or_else(|| Error::new(ErrorKind::Other, "`connections` missing from /varz"))
    }

    /// Waits (up to 30 s) until the server holds exactly `count` client
    /// connections, so a test knows a killed process is gone from the
    /// server's view too (its subscriptions with it), not only from the
    /// operating system's.
    pub async fn wait_for_connections(&self, count: u64) -> Result<(), Error> {
        eventually(
            &format!("the server to hold {count} client connections"),
            Duration::from_secs(30),
            || async {
                match self.connections() {
                    Ok(now) if now == count => Ok(()),
                    Ok(now) => Err(format!("{now} connections")),
                    Err(error) => Err(error.to_string()),
                }
            },
        )
        .await;
        Ok(())
    }

    /// Messages the server has received from clients so far (its `/varz`
    /// `in_msgs`): a test can wait until a request was really sent.
    pub fn messages_in(&self) -> Result<u64, Error> {
        self.messages().map(|(received, _)| received)
    }

    /// Messages the server has received from clients and sent to them so
    /// far (its `/varz` `in_msgs` and `out_msgs`).
    pub fn messages(&self) -> Result<(u64, u64), Error> {
        let varz = self.monitor("/varz")?;
        match (varz["in_msgs"].as_u64(), varz["out_msgs"].as_u64()) {
            (Some(received), Some(sent)) => Ok((received, sent)),
            _ => Err(Error::new(
                ErrorKind::Other,
                "`in_msgs` or `out_msgs` missing from /varz",
            )),
        }
    }

    /// GETs a monitoring endpoint and parses its JSON.
    fn monitor(&self, path: &str) -> Result<serde_json::Value, Error> {
        use std::io::{Read, Write};
        let fail = |e: std::io::Error| {
            Error::new(
                ErrorKind::Connection,
                format!("monitoring endpoint {path}: {e}"),
            )
        };
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", self.monitoring)).map_err(fail)?;
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .map_err(fail)?;
        let mut response = String::new();
        stream.read_to_string(&mut response).map_err(fail)?;
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str(body)
            .map_err(|e| Error::new(ErrorKind::Codec, format!("monitoring endpoint {path}: {e}")))
    }
}

/// Starts nats-server with the test configuration in `dir`, on free ports
/// or on `ports` (client, monitoring) when restarting.
fn spawn(
    binary: &std::path::Path,
    dir: &std::path::Path,
    ports: Option<(u16, u16)>,
    jetstream: bool,
) -> Result<Child, Error> {
    let mut command = crate::local::server::nats_command(binary, dir, jetstream);
    command.arg("-c").arg(dir.join("server.conf"));
    command.arg("-l").arg(dir.join("server.log"));
    match ports {
        // The last `-p` wins over the free-port one nats_command sets.
        Some((port, monitoring)) => {
            command.args(["-p", &port.to_string(), "-m", &monitoring.to_string()])
        }
        None => command.args(["-m", "-1"]),
    };
    command
        .spawn()
        .map_err(|e| Error::new(ErrorKind::Process, format!("cannot start {binary:?}: {e}")))
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        crate::process::kill_child(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `probe` succeeds and returns its value, asking again (at
/// first every few milliseconds, then every 200 ms) for at most `within`.
/// `probe` answers `Ok(value)` when the condition holds and `Err(what it
/// saw)` when it does not yet; if it still does not at the deadline, this
/// panics naming `what` was awaited, for how long, and the last thing seen.
///
/// Tests wait with this instead of sleeping a fixed time: on a loaded
/// machine a condition can take many times longer than on an idle one, and
/// the deadline is only the point where waiting longer means a bug.
///
/// ```no_run
/// # async fn run(server: wharf::testing::NatsServer) {
/// use std::time::Duration;
/// wharf::testing::eventually("the server to hold 2 connections", Duration::from_secs(30), || async {
///     match server.connections() {
///         Ok(2) => Ok(()),
///         other => Err(format!("{other:?}")),
///     }
/// })
/// .await;
/// # }
/// ```
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(seen) if started.elapsed() >= within => panic!(
                "waited {:.1?} for {what} (the limit is {within:?}); last seen: {seen}",
                started.elapsed()
            ),
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// [`eventually`] for tests without an async runtime: the same contract,
/// blocking the thread between probes.
pub fn eventually_blocking<T>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let started = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match probe() {
            Ok(value) => return value,
            Err(seen) if started.elapsed() >= within => panic!(
                "waited {:.1?} for {what} (the limit is {within:?}); last seen: {seen}",
                started.elapsed()
            ),
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// Checks that `probe` keeps succeeding for the whole of `window`, asking
/// every 100 ms; panics at the first failure with what it saw.
///
/// For properties that are an absence (a standby starts nothing, an
/// instance does not leave while it holds transactions): a wait cannot
/// show those, so a test first waits for the state that makes the absence
/// meaningful, then watches it for a while.
pub async fn holds_for<F, Fut>(what: &str, window: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let started = Instant::now();
    loop {
        if let Err(seen) = probe().await {
            panic!(
                "{what} stopped holding after {:.1?} of {window:?}: {seen}",
                started.elapsed()
            );
        }
        if started.elapsed() >= window {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A directory of its own under the system's temporary directory, removed
/// with everything in it when dropped (a failing test included).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `wharf-<stem>-<unique>`.
    pub fn new(stem: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("wharf-{stem}-{}", nuid::next().as_str()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir(path)
    }

    /// Its path.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Resident set size of `pid` in KiB, from /proc; 0 when it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `len` bytes of a fixed pseudo-random pattern, made as they are read:
/// large objects for tests and benchmarks without holding them in memory.
///
/// ```
/// # async fn run() {
/// use tokio::io::AsyncReadExt;
/// let mut bytes = Vec::new();
/// wharf::testing::Pattern::new(1000).read_to_end(&mut bytes).await.unwrap();
/// assert_eq!(bytes, wharf::testing::Pattern::bytes(1000));
/// # }
/// ```
#[derive(Debug)]
pub struct Pattern {
    left: u64,
    at: u64,
}

impl Pattern {
    /// A reader of `len` pattern bytes.
    pub fn new(len: u64) -> Pattern {
        Pattern { left: len, at: 0 }
    }

    /// The pattern's byte at offset `at`.
    pub fn byte(at: u64) -> u8 {
        (at.wrapping_mul(2_654_435_761) >> 13) as u8
    }

    /// The first `len` bytes of the pattern, in memory.
    pub fn bytes(len: u64) -> Vec<u8> {
        (0..len).map(Pattern::byte).collect()
    }

    /// The wrapping sum of the first `len` bytes of the pattern.
    pub fn sum(len: u64) -> u64 {
        (0..len).fold(0u64, |sum, at| {
            sum.wrapping_add(u64::from(Pattern::byte(at)))
        })
    }
}

impl tokio::io::AsyncRead for Pattern {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left);
        let start = self.at;
        let out = buf.initialize_unfilled_to(n as usize);
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = Pattern::byte(start + i as u64);
        }
        buf.advance(n as usize);
        self.at += n;
        self.left -= n;
        std::task::Poll::Ready(Ok(()))
    }
}
