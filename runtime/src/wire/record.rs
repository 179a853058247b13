//! Result records: a call's outcome as stored in KV `wharf_results_<service>`, for
//! durable calls and for idempotent calls a caller may ask for again.

use crate::error::{Error, ErrorKind};
use crate::wire::codec::Codec;
use crate::wire::headers;
use crate::wire::reply::{one_line, ErrorBody};
use async_nats::{HeaderMap, Message};
use bytes::{BufMut, Bytes, BytesMut};

/// Status code of a successful call in a stored result.
pub(crate) const OK: u16 = 200;

/// A result as stored in `wharf_results_<service>`: status code (2 bytes, big
/// endian; 200 for success), codec (1 byte: 0 postcard, 1 JSON), then the
/// reply body.
pub(crate) fn encode(code: u16, codec: Codec, body: &[u8]) -> Bytes {
    let mut record = BytesMut::with_capacity(3 + body.len());
    record.put_u16(code);
    record.put_u8(match codec {
        Codec::Postcard => 0,
        Codec::Json => 1,
    });
    record.put_slice(body);
    record.freeze()
}

/// Reads a stored result back as the reply message it stands for.
pub(crate) fn decode(record: Bytes) -> Result<(Message, Codec), Error> {
    if record.len() < 3 {
        return Err(Error::new(
            ErrorKind::Codec,
            format!(
                "a stored result is {} bytes, shorter than its 3-byte header",
                record.len()
            ),
        ));
    }
    let code = u16::from_be_bytes([record[0], record[1]]);
    let codec = if record[2] == 1 {
        Codec::Json
    } else {
        Codec::Postcard
    };
    let payload = record.slice(3..);
    let headers = (code != OK).then(|| {
        let text = codec
            .decode_lenient::<ErrorBody>(&payload)
            .map(|b| b.message)
            .unwrap_or_else(|_| format!("status {code}"));
        let mut headers = HeaderMap::new();
        headers.insert(headers::SERVICE_ERROR, one_line(&text).as_str());
        headers.insert(headers::SERVICE_ERROR_CODE, code.to_string());
        headers
    });
    let message = Message {
        subject: async_nats::Subject::from_static(""),
        reply: None,
        length: payload.len(),
        payload,
        headers,
        status: None,
        description: None,
    };
    Ok((message, codec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let (message, codec) = decode(encode(OK, Codec::Json, b"42")).unwrap();
        assert_eq!(codec, Codec::Json);
        assert_eq!(&message.payload[..], b"42");
        assert!(message.headers.is_none());

        let body = Codec::Postcard
            .encode(&ErrorBody {
                kind: "dead_letter".into(),
                message: "moved\nto dead letters".into(),
            })
            .unwrap();
        let (message, codec) = decode(encode(500, Codec::Postcard, &body)).unwrap();
        assert_eq!(codec, Codec::Postcard);
        let headers = message.headers.unwrap();
        assert_eq!(
            headers.get(headers::SERVICE_ERROR_CODE).unwrap().as_str(),
            "500"
        );
        assert_eq!(
            headers.get(headers::SERVICE_ERROR).unwrap().as_str(),
            "moved to dead letters"
        );
        assert!(decode(Bytes::from_static(b"\x00")).is_err());
    }
}
