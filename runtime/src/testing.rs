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
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A nats-server child process owned by a test.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    port: u16,
    dir: PathBuf,
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
        let binary = crate::nats_server_binary()?;
        let dir = std::env::temp_dir().join(format!("wharf-test-nats-{}", nuid::next().as_str()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::new(ErrorKind::Process, format!("cannot create {dir:?}: {e}")))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| Error::new(ErrorKind::Process, format!("no free port: {e}")))?;
        let config_file = dir.join("server.conf");
        std::fs::write(&config_file, config).map_err(|e| {
            Error::new(
                ErrorKind::Process,
                format!("cannot write {config_file:?}: {e}"),
            )
        })?;
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config_file)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.join("jetstream"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::new(ErrorKind::Process, format!("cannot start {binary:?}: {e}")))?;
        let mut server = NatsServer { child, port, dir };
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(Error::new(
                    ErrorKind::Process,
                    format!("nats-server exited before listening: {status}"),
                ));
            }
            if Instant::now() > until {
                return Err(Error::new(
                    ErrorKind::Process,
                    format!("nats-server is not listening on {port} after 10 s"),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(server)
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

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
