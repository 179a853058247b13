//! Where worker instances run. A backend starts an instance of a service
//! and reports on it; the supervisor and the scaler never look further, so
//! another backend (Kubernetes, say) plugs in without touching them.

mod adopted;
pub mod docker;
mod instance;
mod process;

pub use adopted::Adopted;
pub use docker::DockerBackend;
pub use instance::{Backend, Instance, Launch};
pub use process::ProcessBackend;
