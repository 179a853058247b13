//! The wire contract, and nothing above it: headers, codecs, the request
//! envelope, how requests and replies are encoded and read, error bodies,
//! stored result records, and every subject and bucket name
//! (docs/protocol.md describes the same contract for other languages).
//!
//! Everything else in wharf speaks NATS through these modules; a change to
//! the wire starts, and usually ends, here.

pub mod batch;
pub mod codec;
pub mod envelope;
pub mod headers;
pub mod probe;
pub(crate) mod record;
pub mod reply;
pub(crate) mod request;
pub mod subjects;
