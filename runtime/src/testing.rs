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

use crate::{Error, ErrorKind};
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
        let binary = crate::nats_server_binary()?;
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
        let _ = self.child.kill();
        let _ = self.child.wait();
        let binary = crate::nats_server_binary()?;
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
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let pid = self.child.id();
            let ports = (
                crate::embedded::reported_port(&self.dir, pid, "nats"),
                crate::embedded::reported_port(&self.dir, pid, "monitoring"),
            );
            if let (Some(port), Some(monitoring)) = ports {
                self.port = port;
                self.monitoring = monitoring;
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Error::new(
                    ErrorKind::Process,
                    format!(
                        "nats-server exited before listening: {status} (check the configuration)"
                    ),
                ));
            }
            if Instant::now() > until {
                return Err(Error::new(
                    ErrorKind::Process,
                    "nats-server reported no port within 10 s",
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

    /// Waits until the server holds exactly `count` client connections, so
    /// a test knows a killed process is gone from the server's view too
    /// (its subscriptions with it), not only from the operating system's.
    pub async fn wait_for_connections(&self, count: u64) -> Result<(), Error> {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.connections()?;
            if now == count {
                return Ok(());
            }
            if Instant::now() > until {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("the server holds {now} connections, not {count}, after 10 s"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
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
    let mut command = crate::embedded::nats_command(binary, dir, jetstream);
    command.arg("-c").arg(dir.join("server.conf"));
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
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
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
