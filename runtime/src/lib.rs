//! wharf turns ordinary Rust functions into horizontally scaled
//! microservices over NATS.
//!
//! ```no_run
//! #[wharf::microservice]
//! async fn add(a: i64, b: i64) -> i64 {
//!     a + b
//! }
//!
//! #[wharf::main]
//! async fn main() -> Result<(), wharf::Error> {
//!     wharf::init().await?; // starts nats-server and workers unless NATS_URL is set
//!     assert_eq!(add(2, 3).await?, 5); // a NATS request on `wharf.<crate>.add`
//!     assert_eq!(add::local(2, 3).await, 5); // the body, in this process
//!     Ok(())
//! }
//! ```
//!
//! Every call to `add` is a NATS request on its own subject, answered by a
//! worker process in a queue group. The wire contract (subjects, codecs,
//! headers, error codes) is in `docs/protocol.md`.
//!
//! # What `#[microservice]` accepts
//!
//! A free `fn` or `async fn` at module level (not inside a function body),
//! with owned `Serialize + DeserializeOwned` arguments bound to plain names.
//! A return type written `Result<T, E>` (two arguments, any path ending in
//! `Result`) makes `E` the function's own error, returned as
//! [`CallError::Application`]; any other return type, a one-argument alias
//! such as `io::Result<T>` included, is sent back as one value. A return
//! type written `wharf::Stream<T>` (or `Stream<T>` imported from wharf)
//! streams its items to the caller as they are made, at the caller's pace
//! ([`Stream`]); the stub then returns `Result<Stream<T>, Error>`.
//!
//! A `#[microservice(stateful)]` function may also take one
//! [`State<S>`](State) argument (`S: Default + Send + 'static`): the state
//! of the transaction the call belongs to, kept by the instance that owns
//! it. The caller does not pass it; see [`transaction`].

//!
//! # The layers
//!
//! From the bottom: `error`, `context`, `process` and `boxed` need nothing
//! of wharf; `wire` is the wire contract (headers, codecs, envelope,
//! request and reply encoding, every subject and bucket name); `settings`,
//! `retry`, `spec`, `handler`, `metrics` and the shared halves of `txn`, `durable`
//! and `objects` sit on it; `client` and `worker` are the two sides of a
//! call, with the caller's and the worker's halves of durable calls,
//! transactions and objects beside them; `request` is the builder every
//! call starts from; `supervisor`, `backend` and `local` run instances;
//! `init` sets a process up. docs/ARCHITECTURE.md draws the picture, and a
//! test (`tests/layers.rs`) keeps imports pointing down.

#[doc(hidden)]
#[path = "macro_support.rs"]
pub mod __private;
pub mod backend;
mod boxed;
mod client;
mod context;
pub mod durable;
mod error;
mod handler;
pub mod heartbeat;
mod histogram;
mod init;
pub mod k8s;
mod local;
mod metrics;
mod micro;
pub mod objects;
#[cfg(feature = "otel")]
pub mod otel;
pub mod permissions;
pub mod process;
mod request;
mod retry;
pub mod scaler;
pub mod settings;
mod spec;
mod storage;
mod stream;
pub mod supervisor;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trace;
mod txn;
pub mod wire;
pub mod worker;

pub use client::call::CallOptions;
pub use client::returns::{Fallible, Plain, Reply, Returns};
pub use client::{global as client, Client};
pub use context::{cancelled, deadline, time_left};
pub use durable::Pending;
pub use error::{CallError, Error, ErrorKind};
pub use handler::registered;
pub use init::{
    describe_if_asked, init, init_with, install_logging, is_worker_role, local_server,
    local_workers, shutdown, Config,
};
pub use local::{
    forget_local_url, nats_server_binary, remember_local_url, remembered_local_url,
    start_nats_server_on,
};
pub use metrics::{address as metrics_address, serve as serve_metrics};
pub use objects::{put, Blob, ObjectRef};
pub use request::{Request, Streamed};
pub use retry::RetryPolicy;
pub use settings::{LogFormat, Settings, DEFAULT_LEASE};
pub use spec::{ArgSpec, FnSpec};
pub use stream::{Stream, StreamSender};
pub use txn::{transaction, State, Transaction, QUIESCE_LIMIT};
pub use wharf_macros::{main, microservice};
pub use wire::codec::Codec;
pub use wire::subjects::{valid_txn_id, TXN_BUCKET};
pub use wire::{codec, headers};
pub use worker::{RunningWorker, Worker};
