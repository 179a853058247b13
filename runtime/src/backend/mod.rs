//! Where worker instances run. A backend starts an instance of a service
//! and reports on it; the supervisor and the scaler never look further, so
//! another backend (Kubernetes, say) plugs in without touching them.

mod adopted;
pub mod docker;
mod instance;
mod process;
#[cfg(feature = "swarm")]
pub mod swarm;

pub use adopted::Adopted;
pub use docker::DockerBackend;
pub use instance::{Backend, BoxFuture, Instance, Launch, Pool};
pub use process::ProcessBackend;
#[cfg(feature = "swarm")]
pub use swarm::SwarmBackend;
