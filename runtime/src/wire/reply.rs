//! Replies: the error reply every failure becomes (ADR-32 headers and a
//! `{kind, message}` body), how a caller reads one back, and the headers a
//! successful reply may carry.

use crate::error::{Error, ErrorKind};
use crate::wire::codec::Codec;
use crate::wire::headers;
use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The body of an error reply: `{kind, message}` in the request's codec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// [`ErrorKind::as_str`](crate::ErrorKind::as_str) of the failure.
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

/// The wire form of a failure: status code, ADR-32 headers and the
/// `{kind, message}` body in `codec` (or `body`, an application error's
/// already-encoded one).
pub(crate) fn error_reply(
    kind: ErrorKind,
    message: &str,
    body: Option<&Bytes>,
    codec: Codec,
) -> (u16, HeaderMap, Bytes) {
    let code = kind.code().unwrap_or(500);
    let body = match body {
        Some(body) => body.clone(),
        None => codec
            .encode(&ErrorBody {
                kind: kind.as_str().to_owned(),
                message: message.to_owned(),
            })
            .unwrap_or_default(),
    };
    let mut headers = HeaderMap::new();
    headers.insert(headers::SERVICE_ERROR, one_line(message).as_str());
    headers.insert(headers::SERVICE_ERROR_CODE, code.to_string());
    if codec != Codec::Postcard {
        headers.insert(headers::CONTENT_TYPE, codec.content_type());
    }
    (code, headers, body)
}

/// Headers of a successful reply that needs any: its codec when not
/// postcard, the serving worker's identity when asked for.
pub(crate) fn success_headers(codec: Codec, identity: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if codec != Codec::Postcard {
        headers.insert(headers::CONTENT_TYPE, codec.content_type());
    }
    if let Some(identity) = identity {
        headers.insert(headers::INSTANCE, identity);
    }
    headers
}

/// Names the instance that owns a reply's transaction (`Wharf-Txn-Owner`).
pub(crate) fn name_owner(headers: &mut HeaderMap, instance: &str) {
    headers.insert(headers::TXN_OWNER, instance);
}

/// The instance a reply names as its transaction's owner.
pub(crate) fn owner(message: &Message) -> Option<&str> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::TXN_OWNER))
        .map(|v| v.as_str())
}

/// Marks a payload as spilled into the object at `uri` (`Wharf-Spill`).
pub(crate) fn mark_spilled(headers: &mut HeaderMap, uri: &str, digest: &str) {
    headers.insert(headers::SPILL, uri);
    headers.insert(headers::SPILL_DIGEST, digest);
}

/// The object a spilled message names: its URI and digest.
pub(crate) fn spilled(message: &Message) -> Option<(String, String)> {
    let headers = message.headers.as_ref()?;
    let uri = headers.get(headers::SPILL)?.as_str().to_owned();
    let digest = headers
        .get(headers::SPILL_DIGEST)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    Some((uri, digest))
}

/// The codec a reply names (`Content-Type`), postcard when it names none.
pub(crate) fn reply_codec(message: &Message) -> Codec {
    let value = message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::CONTENT_TYPE))
        .map(|v| v.as_str());
    Codec::from_content_type(value).unwrap_or(Codec::Postcard)
}

/// The serving worker's identity in a reply (`Wharf-Instance`).
pub(crate) fn instance(message: &Message) -> Option<String> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::INSTANCE))
        .map(|v| v.as_str().to_owned())
}

/// The status code of an error reply.
pub(crate) fn status_code(message: &Message) -> Option<u16> {
    let code = message.headers.as_ref()?.get(headers::SERVICE_ERROR_CODE)?;
    code.as_str().trim().parse().ok()
}

/// The status code and error of an error reply, `None` for a success.
pub(crate) fn remote_failure(codec: Codec, message: &Message) -> Option<(u16, Error)> {
    let headers = message.headers.as_ref()?;
    let code = headers.get(headers::SERVICE_ERROR_CODE)?.as_str();
    let code: u16 = code.trim().parse().unwrap_or(0);
    let header_text = headers
        .get(headers::SERVICE_ERROR)
        .map(|v| v.as_str().to_owned());
    // A 422 body has a trailing `error` field; the lenient decode reads
    // `{kind, message}` and leaves the rest.
    let (body_kind, body_message) = match codec.decode_lenient::<ErrorBody>(&message.payload) {
        Ok(body) => (Some(body.kind), Some(body.message)),
        Err(_) => (None, None),
    };
    let text = body_message
        .or(header_text)
        .unwrap_or_else(|| format!("the worker answered with status {code}"));
    let kind = ErrorKind::from_wire(code, body_kind.as_deref());
    Some((code, Error::new(kind, text)))
}

/// A header value is one line.
pub(crate) fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
