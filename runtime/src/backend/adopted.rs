//! Instances a previous supervisor started, taken over from their
//! heartbeats.

use super::docker::Container;
use super::instance::Instance;
use crate::heartbeat::Heartbeat;
use crate::process;

/// An instance this supervisor did not start (a previous leader did), known
/// from its heartbeat: alive while its process is, on this host.
pub struct Adopted {
    pid: u32,
    same_host: bool,
}

impl Adopted {
    /// The instance of a heartbeat: a container when it names one, else
    /// process `pid` on `host`.
    pub fn from_heartbeat(beat: &Heartbeat) -> Box<dyn Instance> {
        match &beat.container {
            #[cfg(feature = "swarm")]
            Some(name) if name.starts_with(super::swarm::TASK_PREFIX) => Box::new(
                super::swarm::Task::new(&name[super::swarm::TASK_PREFIX.len()..]),
            ),
            Some(name) => Box::new(Container::new(name.clone())),
            None => Box::new(Adopted {
                pid: beat.pid,
                same_host: beat.host == process::hostname(),
            }),
        }
    }
}

impl Instance for Adopted {
    fn location(&self) -> String {
        format!("pid {} (adopted)", self.pid)
    }

    fn alive(&mut self) -> bool {
        // Elsewhere only heartbeats can tell; the supervisor watches them.
        !self.same_host || process::alive(self.pid)
    }

    fn kill(&mut self) {
        if self.same_host {
            process::kill(self.pid);
        }
    }

    fn terminate(&mut self) {
        if self.same_host {
            process::terminate(self.pid);
        }
    }
}
