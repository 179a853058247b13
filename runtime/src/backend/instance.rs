//! The contract between the supervisor and a backend: what to start
//! ([`Launch`]), how a backend starts it ([`Backend`]), and what it reports
//! on a running instance ([`Instance`]).

use crate::error::Error;
use std::collections::BTreeMap;

/// What to start: one instance of a service.
#[derive(Clone)]
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

impl std::fmt::Debug for Launch {
    /// The environment by name only: it holds credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launch")
            .field("service", &self.service)
            .field("instance", &self.instance)
            .field("prefix", &self.prefix)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A running instance, as its backend sees it.
pub trait Instance: Send + Sync {
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
    /// The backend as a [`Pool`], when it runs a service's instances
    /// itself (an orchestrator) rather than one at a time.
    fn pool(&self) -> Option<&dyn Pool> {
        None
    }
}

/// A backend that runs all of a service's instances itself, as Docker Swarm
/// does: the supervisor only says how many, from its own signals (CPU,
/// backlog, demand); the orchestrator places them on its nodes, restarts
/// those that exit, and stops those it removes with SIGTERM, on which a
/// worker drains (or quiesces). The supervisor knows the instances from
/// their heartbeats.
pub trait Pool: Send + Sync {
    /// Makes the service run `replicas` instances of `launch`, creating it
    /// when it does not exist yet. `launch.instance` is not used: each
    /// instance is named by the orchestrator.
    fn scale<'a>(&'a self, launch: &'a Launch, replicas: usize)
        -> BoxFuture<'a, Result<(), Error>>;
    /// Removes the service; its instances drain on the way out.
    fn remove<'a>(&'a self, launch: &'a Launch) -> BoxFuture<'a, Result<(), Error>>;
}

/// A boxed future of a [`Pool`].
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
