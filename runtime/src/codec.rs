//! Payload encodings: postcard (the default) and JSON (for foreign clients).

use crate::{Error, ErrorKind};
use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The `Content-Type` value for postcard; also what an absent header means.
pub const POSTCARD: &str = "application/postcard";
/// The `Content-Type` value for JSON.
pub const JSON: &str = "application/json";

/// How a payload is encoded. A reply always uses the request's codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// postcard: arguments as a tuple in declaration order. Compact and fast;
    /// the default between Rust processes.
    #[default]
    Postcard,
    /// JSON: arguments as an object keyed by parameter name, or a positional
    /// array.
    Json,
}

impl Codec {
    /// The codec named by a `Content-Type` header value; `None` (no header)
    /// means postcard.
    pub fn from_content_type(value: Option<&str>) -> Result<Codec, Error> {
        let Some(value) = value else {
            return Ok(Codec::Postcard);
        };
        // Parameters such as `; charset=utf-8` do not change the codec.
        let essence = value.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case(POSTCARD) {
            Ok(Codec::Postcard)
        } else if essence.eq_ignore_ascii_case(JSON) {
            Ok(Codec::Json)
        } else {
            Err(Error::new(
                ErrorKind::BadRequest,
                format!("unsupported Content-Type `{value}`: send `{POSTCARD}` (or no Content-Type) or `{JSON}`"),
            ))
        }
    }

    /// The `Content-Type` value naming this codec.
    pub fn content_type(self) -> &'static str {
        match self {
            Codec::Postcard => POSTCARD,
            Codec::Json => JSON,
        }
    }

    /// Encodes a value.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes, String> {
        match self {
            Codec::Postcard => postcard::to_allocvec(value)
                .map(Bytes::from)
                .map_err(|e| e.to_string()),
            Codec::Json => serde_json::to_vec(value)
                .map(Bytes::from)
                .map_err(|e| e.to_string()),
        }
    }

    /// Decodes a value; the whole input must be used, so a payload of another
    /// shape is reported rather than half-read.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, String> {
        match self {
            Codec::Postcard => {
                let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| e.to_string())?;
                if rest.is_empty() {
                    Ok(value)
                } else {
                    Err(format!(
                        "{} unexpected trailing byte(s) after the value",
                        rest.len()
                    ))
                }
            }
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        }
    }

    /// Decodes a value from the start of `bytes`, ignoring what follows
    /// (postcard) or unknown fields (JSON): for reading the common prefix of
    /// a larger structure, such as `{kind, message}` of any error body.
    pub fn decode_lenient<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, String> {
        match self {
            Codec::Postcard => postcard::take_from_bytes(bytes)
                .map(|(value, _)| value)
                .map_err(|e| e.to_string()),
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        }
    }

    /// Decodes a function's arguments. In JSON an empty payload stands for no
    /// arguments (`{}`), which is what a foreign client sends to a
    /// zero-argument function most naturally.
    pub fn decode_args<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, String> {
        if self == Codec::Json && bytes.iter().all(u8::is_ascii_whitespace) {
            return self.decode(b"{}");
        }
        self.decode(bytes)
    }
}

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
}

/// The body of an error reply: `{kind, message}` in the request's codec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// [`ErrorKind::as_str`] of the failure.
    pub kind: String,
    /// What went wrong, for a human.
    pub message: String,
}

/// The body of an application error (code 422): `{kind: "application",
/// message, error}`, where `error` is the function's own error value.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApplicationErrorBody<E> {
    /// Always `application`.
    pub kind: String,
    /// The error's `Display` (or `Debug`) text.
    pub message: String,
    /// The function's error value.
    pub error: E,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Args {
        a: i64,
        b: String,
    }

    #[test]
    fn content_types() {
        assert_eq!(Codec::from_content_type(None).unwrap(), Codec::Postcard);
        assert_eq!(
            Codec::from_content_type(Some("application/json; charset=utf-8")).unwrap(),
            Codec::Json
        );
        assert_eq!(
            Codec::from_content_type(Some("Application/Postcard")).unwrap(),
            Codec::Postcard
        );
        let error = Codec::from_content_type(Some("text/xml")).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::BadRequest);
        assert!(error.message().contains("text/xml"), "{error}");
    }

    #[test]
    fn postcard_struct_is_a_tuple() {
        let args = Args {
            a: -3,
            b: "hi".into(),
        };
        let bytes = Codec::Postcard.encode(&args).unwrap();
        assert_eq!(bytes, Codec::Postcard.encode(&(-3i64, "hi")).unwrap());
        assert_eq!(Codec::Postcard.decode::<Args>(&bytes).unwrap(), args);
    }

    #[test]
    fn postcard_rejects_trailing_bytes() {
        let mut bytes = Codec::Postcard.encode(&(1i64, "x")).unwrap().to_vec();
        bytes.push(7);
        let error = Codec::Postcard.decode::<Args>(&bytes).unwrap_err();
        assert!(error.contains("trailing"), "{error}");
    }

    #[test]
    fn json_by_name_and_by_position() {
        let by_name: Args = Codec::Json.decode(br#"{"a": 1, "b": "x"}"#).unwrap();
        let by_position: Args = Codec::Json.decode(br#"[1, "x"]"#).unwrap();
        assert_eq!(by_name, by_position);
    }

    #[test]
    fn json_empty_payload_is_no_arguments() {
        #[derive(Deserialize, Debug, PartialEq)]
        struct NoArgs {}
        assert_eq!(Codec::Json.decode_args::<NoArgs>(b"").unwrap(), NoArgs {});
        assert!(Codec::Postcard.decode_args::<Args>(b"").is_err());
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

    #[test]
    fn error_body_in_both_codecs() {
        let body = ErrorBody {
            kind: "bad_request".into(),
            message: "x".into(),
        };
        for codec in [Codec::Postcard, Codec::Json] {
            let bytes = codec.encode(&body).unwrap();
            assert_eq!(codec.decode::<ErrorBody>(&bytes).unwrap(), body);
        }
    }
}
