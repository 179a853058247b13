//! Requests: how a call is encoded by the caller (envelope or `Wharf-*`
//! headers, then the arguments) and read back by the worker.

use crate::error::{Error, ErrorKind};
use crate::trace::TraceContext;
use crate::wire::codec::{self, Codec, CodecError};
use crate::wire::envelope::{
    Envelope, ENVELOPE_VERSION, FLAG_REPORT_INSTANCE, FLAG_TRACE, FLAG_TXN, FLAG_UNSAMPLED,
};
use crate::wire::headers;
use crate::wire::reply::spilled;
use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use serde::Serialize;

/// What a caller says about one try of a call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outgoing<'a> {
    pub(crate) codec: Codec,
    /// Signature hash the caller was built against; 0 skips the check.
    pub(crate) sig: u64,
    /// Absolute deadline, unix milliseconds.
    pub(crate) deadline_ms: u64,
    pub(crate) call_id: &'a str,
    /// Attempt number from 1.
    pub(crate) attempt: u32,
    /// Ask the worker to name itself in the reply.
    pub(crate) report_instance: bool,
    /// The transaction of a stateful call.
    pub(crate) txn: Option<&'a str>,
    /// The caller's span, when a trace is current.
    pub(crate) trace: Option<&'a TraceContext>,
}

/// An encoded try, ready to send.
#[derive(Clone)]
pub(crate) struct Prepared {
    pub(crate) payload: Bytes,
    pub(crate) headers: Option<HeaderMap>,
    /// Where the arguments start in a postcard payload (after the envelope).
    pub(crate) args_at: usize,
}

/// Encodes one try: for postcard the envelope and the arguments in one
/// buffer and no headers; for JSON the arguments and `Wharf-*` headers.
/// The error is the encoder's own message.
pub(crate) fn encode<A: Serialize>(call: &Outgoing, args: &A) -> Result<Prepared, CodecError> {
    match call.codec {
        Codec::Postcard => {
            // An unsampled trace without ids is the flag bit alone.
            let trace = crate::trace::with_ids(call.trace);
            let trace_flag = match call.trace {
                Some(_) if trace.is_some() => FLAG_TRACE,
                Some(_) => FLAG_UNSAMPLED,
                None => 0,
            };
            let envelope = Envelope {
                version: ENVELOPE_VERSION,
                sig: call.sig,
                deadline_ms: call.deadline_ms,
                call_id: call.call_id.as_bytes(),
                attempt: call.attempt,
                flags: if call.report_instance {
                    FLAG_REPORT_INSTANCE
                } else {
                    0
                } | if call.txn.is_some() { FLAG_TXN } else { 0 }
                    | trace_flag,
            };
            let mut buffer = postcard::to_extend(&envelope, Vec::with_capacity(64))?;
            if let Some(txn) = call.txn {
                buffer = postcard::to_extend(txn.as_bytes(), buffer)?;
            }
            if let Some(trace) = trace {
                buffer = postcard::to_extend(trace.traceparent().as_bytes(), buffer)?;
                let state = trace.tracestate().unwrap_or_default();
                buffer = postcard::to_extend(state.as_bytes(), buffer)?;
            }
            let args_at = buffer.len();
            let buffer = postcard::to_extend(args, buffer)?;
            Ok(Prepared {
                payload: buffer.into(),
                headers: None,
                args_at,
            })
        }
        Codec::Json => {
            let mut headers = HeaderMap::new();
            headers.insert(headers::CONTENT_TYPE, codec::JSON);
            if call.sig != 0 {
                headers.insert(headers::SIG, format!("{:016x}", call.sig));
            }
            headers.insert(headers::DEADLINE, call.deadline_ms.to_string());
            headers.insert(headers::CALL_ID, call.call_id);
            headers.insert(headers::ATTEMPT, call.attempt.to_string());
            if call.report_instance {
                headers.insert(headers::REPORT, "instance");
            }
            if let Some(txn) = call.txn {
                headers.insert(headers::TXN, txn);
            }
            if let Some(trace) = call.trace {
                headers.insert(headers::TRACEPARENT, trace.traceparent());
                if let Some(state) = trace.tracestate() {
                    headers.insert(headers::TRACESTATE, state);
                }
            }
            Ok(Prepared {
                payload: Codec::Json.encode(args)?,
                headers: Some(headers),
                args_at: 0,
            })
        }
    }
}

/// The same prepared call as try `attempt`: a new envelope (postcard) or a
/// new `Wharf-Attempt` header (JSON) in front of the same arguments.
pub(crate) fn with_attempt(prepared: &Prepared, codec: Codec, attempt: u32) -> Prepared {
    match codec {
        Codec::Postcard => {
            let (envelope, at) = Envelope::split(&prepared.payload)
                .expect("a prepared postcard call starts with a valid envelope");
            let envelope = Envelope {
                attempt,
                ..envelope
            };
            let mut buffer = postcard::to_allocvec(&envelope).expect("an envelope always encodes");
            // What follows the envelope (a transaction id, the arguments)
            // stays as it was.
            let args_at = buffer.len() + (prepared.args_at - at);
            buffer.extend_from_slice(&prepared.payload[at..]);
            Prepared {
                payload: buffer.into(),
                headers: prepared.headers.clone(),
                args_at,
            }
        }
        Codec::Json => {
            let mut headers = prepared.headers.clone().unwrap_or_default();
            headers.insert(headers::ATTEMPT, attempt.to_string());
            Prepared {
                payload: prepared.payload.clone(),
                headers: Some(headers),
                args_at: 0,
            }
        }
    }
}

/// What a request says about itself, from the envelope (postcard) or the
/// `Wharf-*` headers (JSON).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct CallMeta {
    pub(crate) sig: Option<u64>,
    pub(crate) deadline_ms: Option<u64>,
    pub(crate) report_instance: bool,
    /// Unique per logical call; empty when the caller sent none.
    pub(crate) call_id: Bytes,
    /// Attempt number from 1; 0 when not counted.
    pub(crate) attempt: u32,
    /// Transaction id of a stateful call; empty when none.
    pub(crate) txn: Bytes,
    /// The object holding the arguments, when they were spilled: URI and
    /// digest. Boxed: every call's future carries this struct.
    pub(crate) spill: Option<Box<(String, String)>>,
    /// The caller's trace context; `None` when none was sent or it was
    /// malformed (ignored, never a failed call). Boxed like `spill`.
    pub(crate) trace: Option<Box<TraceContext>>,
    /// The caller is in a trace it does not sample and sent no ids
    /// (postcard flag bit 3; a JSON caller sends a `traceparent` instead).
    pub(crate) unsampled: bool,
    /// A call that asks for a streamed result: where the items go and the
    /// caller's first credit. Boxed like `spill`.
    pub(crate) stream: Option<Box<StreamAsk>>,
}

/// What a call with a stream asks for: `Wharf-Stream-Credit` for a
/// streamed result, `Wharf-Stream-Input` for a stream argument.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StreamAsk {
    /// The items the worker may send before the caller grants more; 0 when
    /// the call does not ask for a streamed result.
    pub(crate) credit: u64,
    /// The caller sends the items of a stream argument when granted.
    pub(crate) input: bool,
    /// The caller's inbox, which every item, grant and the final reply go to.
    pub(crate) reply: async_nats::Subject,
}

/// The stream a request asks for, if any; a credit that is not a number is
/// a bad request.
fn stream_ask(message: &Message) -> Result<Option<Box<StreamAsk>>, String> {
    let header = |name| message.headers.as_ref().and_then(|h| h.get(name));
    let (credit, input) = (
        header(headers::STREAM_CREDIT),
        header(headers::STREAM_INPUT),
    );
    if credit.is_none() && input.is_none() {
        return Ok(None);
    }
    let credit = match credit {
        None => 0,
        Some(credit) => {
            let credit = credit.as_str().trim();
            credit
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    format!("header Wharf-Stream-Credit must be a number of items above 0, got `{credit}`")
                })?
        }
    };
    let input = match input.map(|value| value.as_str().trim()) {
        None => false,
        Some("1") => true,
        Some(other) => {
            return Err(format!(
                "header Wharf-Stream-Input must be `1` (the caller sends the stream argument's items when granted), got `{other}`"
            ))
        }
    };
    let reply = message
        .reply
        .clone()
        .ok_or("a stream call needs a reply subject: publish it as a request")?;
    Ok(Some(Box::new(StreamAsk {
        credit,
        input,
        reply,
    })))
}

/// The spilled-arguments object a request names, if any.
fn spilled_args(message: &Message) -> Option<Box<(String, String)>> {
    message.headers.as_ref()?;
    spilled(message).map(Box::new)
}

/// Reads the codec, the call metadata and the argument bytes of a request.
/// A request that cannot be read is a `bad_request`, to be answered in the
/// returned codec.
pub(crate) fn read(message: &Message) -> Result<(Codec, CallMeta, Bytes), (Codec, Error)> {
    let headers = message.headers.as_ref();
    let header =
        |name: async_nats::HeaderName| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
    // An unknown codec cannot be answered in kind; JSON is what a human reads.
    let codec =
        Codec::from_content_type(header(headers::CONTENT_TYPE)).map_err(|e| (Codec::Json, e))?;
    let bad = |text: String| (codec, Error::new(ErrorKind::BadRequest, text));
    match codec {
        Codec::Postcard => {
            let (envelope, at) = Envelope::split(&message.payload).map_err(bad)?;
            let (txn, at) = envelope.split_txn(&message.payload, at).map_err(bad)?;
            let (trace, at) = envelope.split_trace(&message.payload, at).map_err(bad)?;
            let trace = trace.and_then(|(parent, state)| {
                let parent = std::str::from_utf8(parent).ok()?;
                let state = std::str::from_utf8(state).ok().filter(|s| !s.is_empty());
                TraceContext::parse(parent, state).map(Box::new)
            });
            let meta = CallMeta {
                sig: (envelope.sig != 0).then_some(envelope.sig),
                deadline_ms: (envelope.deadline_ms != 0).then_some(envelope.deadline_ms),
                report_instance: envelope.flags & FLAG_REPORT_INSTANCE != 0,
                // A view into the payload, not a copy.
                call_id: if envelope.call_id.is_empty() {
                    Bytes::new()
                } else {
                    message.payload.slice_ref(envelope.call_id)
                },
                attempt: envelope.attempt,
                txn: if txn.is_empty() {
                    Bytes::new()
                } else {
                    message.payload.slice_ref(txn)
                },
                spill: spilled_args(message),
                unsampled: trace.is_none() && envelope.flags & FLAG_UNSAMPLED != 0,
                trace,
                stream: match message.headers {
                    Some(_) => stream_ask(message).map_err(bad)?,
                    None => None,
                },
            };
            Ok((codec, meta, message.payload.slice(at..)))
        }
        Codec::Json => {
            let invalid = |what: &str, value: &str| bad(format!("header {what}, got `{value}`"));
            let sig = match header(headers::SIG) {
                Some(text) => Some(
                    u64::from_str_radix(text.trim(), 16)
                        .map_err(|_| invalid("Wharf-Sig must be 16 hex digits", text))?,
                ),
                None => None,
            };
            let deadline_ms = match header(headers::DEADLINE) {
                Some(text) => Some(
                    text.trim()
                        .parse()
                        .map_err(|_| invalid("Wharf-Deadline must be unix milliseconds", text))?,
                ),
                None => None,
            };
            let attempt = match header(headers::ATTEMPT) {
                Some(text) => text
                    .trim()
                    .parse()
                    .map_err(|_| invalid("Wharf-Attempt must be a number", text))?,
                None => 0,
            };
            let meta = CallMeta {
                sig,
                deadline_ms,
                report_instance: header(headers::REPORT) == Some("instance"),
                call_id: header(headers::CALL_ID)
                    .map(|id| Bytes::copy_from_slice(id.as_bytes()))
                    .unwrap_or_default(),
                attempt,
                txn: header(headers::TXN)
                    .map(|id| Bytes::copy_from_slice(id.as_bytes()))
                    .unwrap_or_default(),
                spill: spilled_args(message),
                trace: header(headers::TRACEPARENT)
                    .and_then(|parent| TraceContext::parse(parent, header(headers::TRACESTATE)))
                    .map(Box::new),
                unsampled: false,
                stream: stream_ask(message).map_err(bad)?,
            };
            Ok((codec, meta, message.payload.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(prepared: Prepared) -> Message {
        Message {
            subject: async_nats::Subject::from_static("w.s.f"),
            reply: None,
            length: prepared.payload.len(),
            payload: prepared.payload,
            headers: prepared.headers,
            status: None,
            description: None,
        }
    }

    #[test]
    fn both_codecs_read_back_what_was_encoded() {
        let trace = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("congo=t61rcWkgMzE"),
        )
        .unwrap();
        for codec in [Codec::Postcard, Codec::Json] {
            let call = Outgoing {
                codec,
                sig: 0xab,
                deadline_ms: 1_700_000_000_000,
                call_id: "call-1",
                attempt: 1,
                report_instance: true,
                txn: Some("tx_1"),
                trace: Some(&trace),
            };
            let prepared = encode(&call, &(2i64, 3i64)).unwrap();
            let again = with_attempt(&prepared, codec, 2);
            let (read_codec, meta, args) = read(&message(again)).unwrap_or_else(|_| panic!());
            assert_eq!(read_codec, codec);
            assert_eq!(meta.sig, Some(0xab));
            assert_eq!(meta.deadline_ms, Some(1_700_000_000_000));
            assert_eq!(&meta.call_id[..], b"call-1");
            assert_eq!(meta.attempt, 2);
            assert!(meta.report_instance);
            assert_eq!(&meta.txn[..], b"tx_1");
            assert_eq!(meta.trace.as_deref(), Some(&trace));
            let decoded: (i64, i64) = codec.decode_args(&args).unwrap();
            assert_eq!(decoded, (2, 3));
        }
    }

    #[test]
    fn an_unsampled_trace_without_ids_is_one_flag_bit() {
        let plain = Outgoing {
            codec: Codec::Postcard,
            sig: 0xab,
            deadline_ms: 1_700_000_000_000,
            call_id: "call-1",
            attempt: 1,
            report_instance: false,
            txn: None,
            trace: None,
        };
        let unsampled = Outgoing {
            trace: Some(&TraceContext::UNSAMPLED),
            ..plain
        };
        let without = encode(&plain, &(2i64, 3i64)).unwrap();
        let with = encode(&unsampled, &(2i64, 3i64)).unwrap();
        // The same bytes but for the flag: no ids travel.
        assert_eq!(with.payload.len(), without.payload.len());
        let (_, meta, args) = read(&message(with)).unwrap_or_else(|_| panic!());
        assert!(meta.unsampled && meta.trace.is_none());
        assert_eq!(
            Codec::Postcard.decode_args::<(i64, i64)>(&args).unwrap(),
            (2, 3)
        );
        let (_, meta, _) = read(&message(without)).unwrap_or_else(|_| panic!());
        assert!(!meta.unsampled);
        // JSON has no flag bit: it sends fresh ids with the sampled flag clear.
        let json = encode(
            &Outgoing {
                codec: Codec::Json,
                ..unsampled
            },
            &(2i64, 3i64),
        )
        .unwrap();
        let (_, meta, _) = read(&message(json)).unwrap_or_else(|_| panic!());
        let trace = meta.trace.expect("a traceparent");
        assert!(trace.has_ids() && !trace.sampled());
    }

    #[test]
    fn a_malformed_traceparent_is_ignored() {
        let mut headers = HeaderMap::new();
        headers.insert(headers::CONTENT_TYPE, codec::JSON);
        headers.insert(headers::TRACEPARENT, "00-not-a-trace-01");
        let prepared = Prepared {
            payload: Bytes::from_static(b"{}"),
            headers: Some(headers),
            args_at: 0,
        };
        let (_, meta, _) = read(&message(prepared)).unwrap_or_else(|_| panic!());
        assert_eq!(meta.trace, None);
        // The same in the envelope: the call still reads, with no trace.
        let mut payload = postcard::to_allocvec(&Envelope {
            version: ENVELOPE_VERSION,
            sig: 0,
            deadline_ms: 0,
            call_id: b"",
            attempt: 0,
            flags: FLAG_TRACE,
        })
        .unwrap();
        payload = postcard::to_extend(&b"00-zz"[..], payload).unwrap();
        payload = postcard::to_extend(&b""[..], payload).unwrap();
        payload = postcard::to_extend(&(2i64, 3i64), payload).unwrap();
        let prepared = Prepared {
            payload: payload.into(),
            headers: None,
            args_at: 0,
        };
        let (_, meta, args) = read(&message(prepared)).unwrap_or_else(|_| panic!());
        assert_eq!(meta.trace, None);
        assert_eq!(
            Codec::Postcard.decode_args::<(i64, i64)>(&args).unwrap(),
            (2, 3)
        );
    }

    #[test]
    fn bad_headers_are_bad_requests() {
        let mut headers = HeaderMap::new();
        headers.insert(headers::CONTENT_TYPE, codec::JSON);
        headers.insert(headers::SIG, "xyz");
        let prepared = Prepared {
            payload: Bytes::from_static(b"{}"),
            headers: Some(headers),
            args_at: 0,
        };
        let (codec, error) = read(&message(prepared)).unwrap_err();
        assert_eq!(codec, Codec::Json);
        assert_eq!(error.kind(), ErrorKind::BadRequest);
        assert!(error.message().contains("Wharf-Sig"), "{error}");
    }
}
