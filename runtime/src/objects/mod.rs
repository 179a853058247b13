//! Objects passed by reference: a value is stored once and a small
//! [`ObjectRef`] (a URI, the value's type, its size and digest) travels in
//! its place. Any process connected to the same NATS resolves it.
//!
//! Stores, chosen by URI or by `WHARF_OBJECT_STORE`:
//! - `jetstream` (the default): values up to [`INLINE_LIMIT`] in KV
//!   `wharf_objects`, larger ones in the Object Store `wharf_blobs`,
//!   chunked and streamed. URIs `wharf://jetstream/<bucket>/<key>`.
//! - any `object_store` URL: `file:///srv/objects`, `memory://` (this
//!   process only), `s3://bucket/prefix` with the `s3` feature. The URI is
//!   the object's URL.
//! - a [`Store`] of your own, registered under a name
//!   ([`register_store`]): URIs `wharf://<name>/<key>`.
//!
//! Every read checks the digest. Objects outlive the process that made
//! them; they end when deleted or when their TTL passes.

//! `reference` is what callers use; `store` (with `jetstream`, `external`
//! and `bytes`) is the layer underneath, which the call path also spills
//! large payloads through; `service` serves the stores to other languages.

pub(crate) mod bytes;
mod external;
pub(crate) mod jetstream;
pub(crate) mod reference;
pub mod service;
pub(crate) mod store;

pub use self::bytes::BYTES_TYPE;
pub use jetstream::{BLOBS_BUCKET, INLINE_LIMIT, OBJECTS_BUCKET};
pub use reference::{put, Blob, ObjectRef, Objects, MAX_TTL};
pub use store::{register_store, ObjectReader, Store};
