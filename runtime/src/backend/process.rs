//! The process backend: each instance is a subprocess on this host.

use super::instance::{Backend, Instance, Launch};
use crate::{Error, ErrorKind};
use std::process::{Child, Command, Stdio};

/// Runs each instance as a subprocess: `command[0]` with the rest as
/// arguments, for example the user's binary and `worker`.
#[derive(Debug, Clone)]
pub struct ProcessBackend {
    command: Vec<String>,
}

impl ProcessBackend {
    /// A backend running `command` (program and arguments).
    pub fn new(command: Vec<String>) -> Result<ProcessBackend, Error> {
        if command.is_empty() || command[0].trim().is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "the process backend needs a command, for example [\"target/release/app\", \"worker\"]",
            ));
        }
        Ok(ProcessBackend { command })
    }
}

impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    fn start(&self, launch: &Launch) -> Result<Box<dyn Instance>, Error> {
        let mut command = Command::new(&self.command[0]);
        command
            .args(&self.command[1..])
            // The supervisor's own metrics port is not its workers': two
            // processes cannot listen on it. A service's `env` may set one.
            .env_remove("WHARF_METRICS_PORT")
            .envs(&launch.env)
            .stdin(Stdio::null());
        let child = command.spawn().map_err(|e| {
            Error::new(
                ErrorKind::Process,
                format!(
                    "cannot start `{}` for service `{}`: {e}",
                    self.command.join(" "),
                    launch.service
                ),
            )
            .with_source(e)
        })?;
        Ok(Box::new(ChildInstance { child }))
    }
}

struct ChildInstance {
    child: Child,
}

impl Instance for ChildInstance {
    fn location(&self) -> String {
        format!("pid {}", self.child.id())
    }

    fn alive(&mut self) -> bool {
        // try_wait also reaps it, so no zombie is left behind.
        matches!(self.child.try_wait(), Ok(None))
    }

    fn kill(&mut self) {
        crate::process::kill_child(&mut self.child);
    }

    fn terminate(&mut self) {
        crate::process::terminate(self.child.id());
    }
}
