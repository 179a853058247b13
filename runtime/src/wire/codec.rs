//! Payload encodings: postcard (the default) and JSON (for foreign clients).

use crate::error::{Error, ErrorKind};
use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

/// The `Content-Type` value for postcard; also what an absent header means.
pub const POSTCARD: &str = "application/postcard";
/// The `Content-Type` value for JSON.
pub const JSON: &str = "application/json";

/// A value that could not be encoded or decoded, keeping the codec's own
/// error as its [`source`](std::error::Error::source).
#[derive(Debug)]
pub enum CodecError {
    /// postcard's error.
    Postcard(postcard::Error),
    /// serde_json's error.
    Json(serde_json::Error),
    /// A postcard value followed by bytes it does not use.
    Trailing(usize),
}

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CodecError::Postcard(e) => e.fmt(f),
            CodecError::Json(e) => e.fmt(f),
            CodecError::Trailing(n) => write!(f, "{n} unexpected trailing byte(s) after the value"),
        }
    }
}

impl std::error::Error for CodecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CodecError::Postcard(e) => Some(e),
            CodecError::Json(e) => Some(e),
            CodecError::Trailing(_) => None,
        }
    }
}

impl From<postcard::Error> for CodecError {
    fn from(e: postcard::Error) -> CodecError {
        CodecError::Postcard(e)
    }
}

impl From<serde_json::Error> for CodecError {
    fn from(e: serde_json::Error) -> CodecError {
        CodecError::Json(e)
    }
}

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
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes, CodecError> {
        Ok(match self {
            Codec::Postcard => postcard::to_allocvec(value)?.into(),
            Codec::Json => serde_json::to_vec(value)?.into(),
        })
    }

    /// Decodes a value; the whole input must be used, so a payload of another
    /// shape is reported rather than half-read.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        match self {
            Codec::Postcard => {
                let (value, rest) = postcard::take_from_bytes(bytes)?;
                if rest.is_empty() {
                    Ok(value)
                } else {
                    Err(CodecError::Trailing(rest.len()))
                }
            }
            Codec::Json => Ok(serde_json::from_slice(bytes)?),
        }
    }

    /// Decodes a value from the start of `bytes`, ignoring what follows
    /// (postcard) or unknown fields (JSON): for reading the common prefix of
    /// a larger structure, such as `{kind, message}` of any error body.
    pub fn decode_lenient<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        Ok(match self {
            Codec::Postcard => postcard::take_from_bytes(bytes)?.0,
            Codec::Json => serde_json::from_slice(bytes)?,
        })
    }

    /// Decodes a function's arguments. In JSON an empty payload stands for no
    /// arguments (`{}`), which is what a foreign client sends to a
    /// zero-argument function most naturally.
    pub fn decode_args<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        if self == Codec::Json && bytes.iter().all(u8::is_ascii_whitespace) {
            return self.decode(b"{}");
        }
        self.decode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

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
        assert!(error.to_string().contains("trailing"), "{error}");
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
}
