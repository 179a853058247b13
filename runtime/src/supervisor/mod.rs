//! The supervisor: keeps each declared service between its `min` and `max`
//! instances, replaces instances that die or hang, scales on CPU and
//! backlog, and logs every decision as an event with its reason.
//!
//! Only one supervisor acts at a time: the one holding the lease in KV
//! `wharf_supervisor`. Others stand by and take over (adopting the running
//! instances, not duplicating them) when the lease lapses.
//!
//! `config` reads `wharf.toml`; `state` is what a supervisor knows; each
//! tick (`run`) goes through `lease`, `health` and `reconcile` (which
//! leaves a service with instances of an older revision to `rollout`);
//! `events` publishes what it decided.

mod config;
mod events;
mod health;
mod lease;
mod metrics;
mod reconcile;
mod rollout;
mod run;
mod state;

pub use crate::wire::subjects::LEASE_BUCKET;
pub use config::{BrokerConfig, CallerConfig, ServiceConfig, UpConfig};
pub use events::{Event, EventKind};
pub use run::{instances, supervise_file};
pub use state::{
    Supervisor, CRASH_WINDOW, DRAIN_GRACE, LEASE_TTL, MISSES_ALLOWED, STARTUP_GRACE, TICK,
};
