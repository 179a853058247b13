//! Header names of the wire contract, as async-nats header names (built
//! without allocating, so the call path can use them freely).

use async_nats::HeaderName;

/// Codec of the payload; absent means postcard.
pub const CONTENT_TYPE: HeaderName = HeaderName::from_static("Content-Type");
/// Absolute deadline of the call, unix milliseconds.
pub const DEADLINE: HeaderName = HeaderName::from_static("Wharf-Deadline");
/// Unique per logical call, kept across retries.
pub const CALL_ID: HeaderName = HeaderName::from_static("Wharf-Call-Id");
/// Attempt number of a retried call, from 1.
pub const ATTEMPT: HeaderName = HeaderName::from_static("Wharf-Attempt");
/// Signature hash the caller was built against.
pub const SIG: HeaderName = HeaderName::from_static("Wharf-Sig");
/// Transaction id of a stateful call.
pub const TXN: HeaderName = HeaderName::from_static("Wharf-Txn");
/// Reply header of a stateful call that reached its owner through the
/// queue group: the owning instance, whose own subject later calls of
/// the transaction go to.
pub const TXN_OWNER: HeaderName = HeaderName::from_static("Wharf-Txn-Owner");
/// W3C trace context: the caller's span (`00-<trace id>-<span id>-<flags>`).
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// W3C trace context: vendors' state, passed on with [`TRACEPARENT`].
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// `instance`: ask the worker to name itself in [`INSTANCE`].
pub const REPORT: HeaderName = HeaderName::from_static("Wharf-Report");
/// Durable calls: the subject the worker replies to.
pub const REPLY: HeaderName = HeaderName::from_static("Wharf-Reply");
/// On a batch of durable calls: its caller confirms the answers it takes
/// (docs/protocol.md, "Coalesced durable calls"), so their results need
/// not be stored.
pub const CONFIRM: HeaderName = HeaderName::from_static("Wharf-Confirm");
/// Dead-lettered calls: why the call was given up.
pub const DEAD_REASON: HeaderName = HeaderName::from_static("Wharf-Dead-Reason");
/// A spilled payload: the URI of the object holding the arguments
/// (request) or the return value (reply), which the payload leaves out.
pub const SPILL: HeaderName = HeaderName::from_static("Wharf-Spill");
/// The digest of the spilled object.
pub const SPILL_DIGEST: HeaderName = HeaderName::from_static("Wharf-Spill-Digest");
/// A call to a function returning a stream: the number of items the caller
/// takes before it grants more (its first credit).
pub const STREAM_CREDIT: HeaderName = HeaderName::from_static("Wharf-Stream-Credit");
/// A stream's item: its index, from 0. A message of the stream without it
/// is the call's reply, which ends the stream.
pub const STREAM_ITEM: HeaderName = HeaderName::from_static("Wharf-Stream-Item");
/// On a stream's first item: the subject the caller grants credit on.
pub const STREAM_CREDIT_TO: HeaderName = HeaderName::from_static("Wharf-Stream-Credit-To");
/// A call to a function taking a stream argument: `1`, the caller sends
/// the items once the worker grants credit for them.
pub const STREAM_INPUT: HeaderName = HeaderName::from_static("Wharf-Stream-Input");
/// On a worker's grant for a stream argument: the subject the caller
/// sends the items (and the end) to.
pub const STREAM_ITEMS_TO: HeaderName = HeaderName::from_static("Wharf-Stream-Items-To");
/// The end of a stream argument: the number of items sent. A payload, when
/// there is one, says why the caller's stream failed.
pub const STREAM_END: HeaderName = HeaderName::from_static("Wharf-Stream-End");
/// Reply header: `<instance id> <pid> <host>` of the serving worker.
pub const INSTANCE: HeaderName = HeaderName::from_static("Wharf-Instance");
/// Objects service `put`: the object's type name (default `bytes`).
pub const OBJECT_TYPE: HeaderName = HeaderName::from_static("Wharf-Object-Type");
/// Objects service `put`: the object's time to live, seconds.
pub const OBJECT_TTL: HeaderName = HeaderName::from_static("Wharf-Object-Ttl");
/// Objects service `put` in parts: the upload the part belongs to.
pub const UPLOAD: HeaderName = HeaderName::from_static("Wharf-Upload");
/// Objects service `put` in parts: the part's number, from 0.
pub const PART: HeaderName = HeaderName::from_static("Wharf-Part");
/// Objects service `put` in parts: the number of parts (the commit).
pub const PARTS: HeaderName = HeaderName::from_static("Wharf-Parts");
/// Objects service `get` reply: where in the object the bytes start.
pub const OBJECT_OFFSET: HeaderName = HeaderName::from_static("Wharf-Object-Offset");
/// ADR-32 error text.
pub const SERVICE_ERROR: HeaderName = HeaderName::from_static("Nats-Service-Error");
/// ADR-32 error code.
pub const SERVICE_ERROR_CODE: HeaderName = HeaderName::from_static("Nats-Service-Error-Code");
