//! Local mode's workers: subprocesses of this executable, kept running
//! and scaled by an in-process supervisor, that die with this process.

use super::children::{self, Role};
use crate::backend::{Backend, Instance, Launch};
use crate::client::Client;
use crate::error::{Error, ErrorKind};
use crate::process;
use crate::supervisor::{ServiceConfig, Supervisor};
use crate::wire::subjects;
use futures_util::StreamExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Local mode's workers: the in-process supervisor keeps between `min`
/// and `max` worker subprocesses of the current executable running (each
/// serves every function), replacing dead or hung ones and scaling on CPU.
/// Returns once `min` of them serve.
pub(crate) async fn supervise_workers(
    client: &Client,
    min: usize,
    max: usize,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let exe = std::env::current_exe().map_err(|e| {
        Error::new(
            ErrorKind::Process,
            format!("cannot find the current executable to start workers: {e}"),
        )
        .with_source(e)
    })?;
    let ready_subject = subjects::worker_ready(nuid::next().as_str());
    let mut ready = client
        .nats()
        .subscribe(ready_subject.clone())
        .await
        .map_err(|e| {
            Error::new(ErrorKind::Connection, format!("cannot subscribe: {e}")).with_source(e)
        })?;
    client.nats().flush().await.map_err(|e| {
        Error::new(ErrorKind::Connection, format!("cannot flush: {e}")).with_source(e)
    })?;
    let name = exe
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| subjects::valid_id(n.as_bytes()))
        .unwrap_or_else(|| "local".to_owned());
    let mut service = ServiceConfig::process(&name, Vec::new());
    service.min = min;
    service.max = max.max(min);
    let backend = LocalBackend {
        exe: exe.clone(),
        ready_subject,
    };
    let supervisor = Supervisor::with_backends(
        client,
        vec![(service, Box::new(backend) as Box<dyn Backend>)],
    )
    .await?
    .quiet();
    let task = tokio::spawn(async move {
        let _ = supervisor.run(std::future::pending()).await;
    });
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut ready_count = 0;
    while ready_count < min {
        tokio::select! {
            message = ready.next() => {
                if message.is_none() {
                    task.abort();
                    return Err(Error::new(ErrorKind::Connection, "lost the connection to NATS while starting workers"));
                }
                ready_count += 1;
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                if let Some((pid, status)) = children::exited(Role::Worker) {
                    task.abort();
                    return Err(Error::new(
                        ErrorKind::Process,
                        format!("worker pid {pid} exited ({status}) before it was ready; its output is above"),
                    ));
                }
                if tokio::time::Instant::now() > until {
                    task.abort();
                    return Err(Error::new(
                        ErrorKind::Process,
                        format!("only {ready_count} of {min} workers were ready after 15 s"),
                    ));
                }
            }
        }
    }
    Ok(task)
}

/// Starts worker subprocesses of this executable that die with it.
struct LocalBackend {
    exe: PathBuf,
    ready_subject: String,
}

impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn start(&self, launch: &Launch) -> Result<Box<dyn Instance>, Error> {
        let mut command = Command::new(&self.exe);
        command
            // The program's metrics port is its own: workers listening on
            // it too would fail to start.
            .env_remove("WHARF_METRICS_PORT")
            .envs(&launch.env)
            .env("WHARF_READY_SUBJECT", &self.ready_subject)
            .env("WHARF_PARENT_PID", std::process::id().to_string())
            // The local server takes only the token in NATS_URL: credentials
            // this program holds for other servers must not replace it.
            .env_remove("NATS_USER")
            .env_remove("NATS_PASSWORD")
            .env_remove("NATS_TOKEN")
            .env_remove("NATS_NKEY")
            .env_remove("NATS_CREDS")
            .env_remove("NATS_CA")
            .env_remove("NATS_CERT")
            .env_remove("NATS_KEY")
            .env_remove("NATS_TLS_FIRST")
            .stdin(Stdio::null());
        let pid = children::spawn_now(command, Role::Worker).map_err(|e| {
            Error::new(
                ErrorKind::Process,
                format!("cannot start worker `{}`: {e}", self.exe.display()),
            )
            .with_source(e)
        })?;
        Ok(Box::new(LocalWorker { pid }))
    }
}

/// A worker subprocess tracked with the other children of local mode.
struct LocalWorker {
    pid: u32,
}

impl Instance for LocalWorker {
    fn location(&self) -> String {
        format!("pid {}", self.pid)
    }

    fn alive(&mut self) -> bool {
        // While the program stops its children, exits are expected: none
        // is to be replaced.
        children::stopping() || children::running(self.pid)
    }

    fn kill(&mut self) {
        process::kill(self.pid);
    }

    fn terminate(&mut self) {
        process::terminate(self.pid);
    }
}
