//! Where worker instances run. A backend starts an instance of a service
//! and reports on it; the supervisor and the scaler never look further, so
//! another backend (Kubernetes, say) plugs in without touching them.

pub mod docker;
mod process;

pub use docker::DockerBackend;
pub use process::{alive as process_alive, ProcessBackend};

use crate::Error;
use std::collections::BTreeMap;

/// What to start: one instance of a service.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The service the instance serves.
    pub service: String,
    /// The id the instance announces in its heartbeats
    /// (`WHARF_INSTANCE_ID`).
    pub instance: String,
    /// The subject prefix of the deployment it belongs to (`WHARF_PREFIX`):
    /// two deployments sharing a host tell their instances apart by it.
    pub prefix: String,
    /// Environment for the instance: `NATS_URL`, `WHARF_PREFIX`,
    /// `WHARF_INSTANCE_ID`, `WHARF_ROLE`, and the service's own.
    pub env: BTreeMap<String, String>,
}

/// A running instance, as its backend sees it.
pub trait Instance: Send + Sync {
    /// Its id.
    fn id(&self) -> &str;
    /// Where it runs, for `wharf status`: a pid or a container id.
    fn location(&self) -> String;
    /// Whether it still runs.
    fn alive(&mut self) -> bool;
    /// Stops it at once (SIGKILL or equivalent), for a hung instance.
    fn kill(&mut self);
    /// Asks it to stop gracefully (SIGTERM or equivalent): it drains.
    fn terminate(&mut self);
}

/// Starts instances.
pub trait Backend: Send + Sync {
    /// The backend's name, for events.
    fn name(&self) -> &'static str;
    /// Starts one instance.
    fn start(&self, launch: &Launch) -> Result<Box<dyn Instance>, Error>;
}

/// An instance this supervisor did not start (a previous leader did), known
/// from its heartbeat: alive while its process is, on this host.
pub struct Adopted {
    id: String,
    pid: u32,
    same_host: bool,
}

impl Adopted {
    /// The instance of a heartbeat: a container when it names one, else
    /// process `pid` on `host`.
    pub fn from_heartbeat(beat: &crate::heartbeat::Heartbeat) -> Box<dyn Instance> {
        match &beat.container {
            Some(name) => Box::new(docker::Container::new(beat.instance.clone(), name.clone())),
            None => Box::new(Adopted {
                id: beat.instance.clone(),
                pid: beat.pid,
                same_host: beat.host == crate::worker::hostname(),
            }),
        }
    }
}

impl Instance for Adopted {
    fn id(&self) -> &str {
        &self.id
    }

    fn location(&self) -> String {
        format!("pid {} (adopted)", self.pid)
    }

    fn alive(&mut self) -> bool {
        // Elsewhere only heartbeats can tell; the supervisor watches them.
        !self.same_host || process::alive(self.pid)
    }

    fn kill(&mut self) {
        if self.same_host {
            process::signal(self.pid, libc::SIGKILL);
        }
    }

    fn terminate(&mut self) {
        if self.same_host {
            process::signal(self.pid, libc::SIGTERM);
        }
    }
}
