//! Local mode: with no `NATS_URL`, wharf starts its own nats-server
//! (`server`) and worker subprocesses of the current executable
//! (`workers`), tracked as children that stop with this process
//! (`children`).

pub(crate) mod children;
pub(crate) mod server;
pub(crate) mod workers;

pub use server::{
    forget_local_url, nats_server_binary, remember_local_url, remembered_local_url,
    start_nats_server_on,
};
