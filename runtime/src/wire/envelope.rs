//! The envelope in front of the arguments of every postcard request.

use serde::{Deserialize, Serialize};

/// Version byte that opens every postcard request.
pub const ENVELOPE_VERSION: u8 = 1;

/// Envelope flag: the caller asks the worker to name itself in the reply's
/// `Wharf-Instance` header.
pub const FLAG_REPORT_INSTANCE: u8 = 1;

/// Envelope flag: a transaction id follows the envelope, as postcard bytes
/// (a varint length, then the id), before the arguments. Carried here
/// rather than in a `Wharf-Txn` header for the same reason as the rest of
/// the envelope.
pub const FLAG_TXN: u8 = 2;

/// Envelope flag: the caller's W3C trace context follows (after the
/// transaction id, if any), as two postcard byte strings: `traceparent`,
/// then `tracestate` (empty when none). Set only when a trace is current,
/// so calls without one carry nothing.
pub const FLAG_TRACE: u8 = 4;

/// Envelope flag: the caller is in a trace that is not sampled and sends
/// no ids (nothing follows for it). The worker records no span for the
/// call, starts no trace of its own, and the calls the function makes
/// carry this flag in turn. Ignored when [`FLAG_TRACE`] is set too.
pub const FLAG_UNSAMPLED: u8 = 8;

/// Call metadata in front of the arguments of every postcard request.
///
/// JSON requests carry the same fields as `Wharf-*` headers. Postcard
/// requests carry them here instead, because a request with any NATS
/// header costs about a fifth of the throughput (docs/BENCHMARKS.md) and
/// postcard is the fast path. Encoded with postcard, so the request payload
/// is `postcard(Envelope) ++ postcard(arguments)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<'a> {
    /// [`ENVELOPE_VERSION`].
    pub version: u8,
    /// Signature hash the caller was built against; 0 skips the check.
    pub sig: u64,
    /// Absolute deadline, unix milliseconds; 0 means none.
    pub deadline_ms: u64,
    /// Unique per logical call, kept across retries; may be empty. Bytes
    /// on the wire (a length, then UTF-8 by convention), so reading it
    /// costs no validation.
    #[serde(borrow)]
    pub call_id: &'a [u8],
    /// Attempt number from 1; 0 when not counted.
    pub attempt: u32,
    /// Bit set of `FLAG_*`.
    pub flags: u8,
}

impl<'a> Envelope<'a> {
    /// Splits a postcard request into its envelope and the argument bytes.
    pub fn split(payload: &'a [u8]) -> Result<(Envelope<'a>, usize), String> {
        match payload.first() {
            Some(&ENVELOPE_VERSION) => {}
            Some(other) => {
                return Err(format!(
                    "unsupported envelope version {other}: a postcard request starts with the wharf envelope, version {ENVELOPE_VERSION} (see docs/protocol.md)"
                ))
            }
            None => {
                return Err(
                    "empty postcard request: it must start with the wharf envelope (see docs/protocol.md)"
                        .to_owned(),
                )
            }
        }
        let (envelope, rest) = postcard::take_from_bytes::<Envelope<'a>>(payload)
            .map_err(|e| format!("malformed wharf envelope: {e}"))?;
        Ok((envelope, payload.len() - rest.len()))
    }

    /// The transaction id after an envelope with [`FLAG_TXN`] (empty
    /// without the flag) and where the arguments start; `at` is where the
    /// envelope ends.
    pub fn split_txn(&self, payload: &'a [u8], at: usize) -> Result<(&'a [u8], usize), String> {
        if self.flags & FLAG_TXN == 0 {
            return Ok((&[], at));
        }
        let (txn, rest) = postcard::take_from_bytes::<&[u8]>(&payload[at..])
            .map_err(|e| format!("malformed transaction id after the wharf envelope: {e}"))?;
        Ok((txn, payload.len() - rest.len()))
    }

    /// The `traceparent` and `tracestate` bytes after an envelope with
    /// [`FLAG_TRACE`] (`None` without the flag) and where the arguments
    /// start; `at` is where the transaction id (or the envelope) ends.
    #[allow(clippy::type_complexity)]
    pub fn split_trace(
        &self,
        payload: &'a [u8],
        at: usize,
    ) -> Result<(Option<(&'a [u8], &'a [u8])>, usize), String> {
        if self.flags & FLAG_TRACE == 0 {
            return Ok((None, at));
        }
        let malformed =
            |e: postcard::Error| format!("malformed trace context after the wharf envelope: {e}");
        let (parent, rest) =
            postcard::take_from_bytes::<&[u8]>(&payload[at..]).map_err(malformed)?;
        let (state, rest) = postcard::take_from_bytes::<&[u8]>(rest).map_err(malformed)?;
        Ok((Some((parent, state)), payload.len() - rest.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::codec::Codec;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Args {
        a: i64,
        b: String,
    }

    #[test]
    fn envelope_then_arguments() {
        let envelope = Envelope {
            version: ENVELOPE_VERSION,
            sig: 0xdead_beef,
            deadline_ms: 1_700_000_000_000,
            call_id: b"abc",
            attempt: 1,
            flags: FLAG_REPORT_INSTANCE,
        };
        let mut bytes = postcard::to_allocvec(&envelope).unwrap();
        bytes.extend_from_slice(&Codec::Postcard.encode(&(2i64, "x")).unwrap());
        let (read, at) = Envelope::split(&bytes).unwrap();
        assert_eq!(read, envelope);
        assert_eq!(
            Codec::Postcard.decode::<Args>(&bytes[at..]).unwrap(),
            Args {
                a: 2,
                b: "x".into()
            }
        );
        // The smallest envelope a foreign client can send: no checks at all.
        let (minimal, at) = Envelope::split(&[1, 0, 0, 0, 0, 0, 42]).unwrap();
        assert_eq!(
            (minimal.sig, minimal.deadline_ms, minimal.call_id, at),
            (0, 0, &b""[..], 6)
        );
        assert!(Envelope::split(&[]).unwrap_err().contains("envelope"));
        assert!(Envelope::split(&[9, 0]).unwrap_err().contains("version 9"));
        assert!(Envelope::split(&[1, 0xff])
            .unwrap_err()
            .contains("malformed"));
    }
}
