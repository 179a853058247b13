//! Coalesced calls: many postcard requests to one function in one NATS
//! message, and their replies, several to a message (docs/protocol.md,
//! "Coalesced calls").
//!
//! A batch request is
//!
//! ```text
//! version: u8 (1) | count: varint | count × (length: varint, request bytes)
//! ```
//!
//! where each request is exactly the payload a single postcard call sends
//! (envelope, then arguments). A batch reply is
//!
//! ```text
//! version: u8 (1) | count: varint | count × (index: varint,
//!     headers: varint count × (name, value), body)
//! ```
//!
//! with names, values and bodies as a varint length and the bytes. Varints
//! are unsigned LEB128, as postcard writes them.

use async_nats::HeaderMap;
use bytes::{BufMut, Bytes, BytesMut};

/// Version byte that opens every batch request and reply.
pub const BATCH_VERSION: u8 = 1;

/// Most calls a caller puts in one batch: enough to pay per message a
/// fraction of what a call costs, few enough that a queue group of several
/// workers still shares the load of one busy caller.
pub const MAX_BATCH_CALLS: usize = 32;

/// Most bytes of requests a caller puts in one batch (below any server's
/// `max_payload`, which is checked as well).
pub const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Bytes a batch spends on one entry beside its request or body: the
/// largest varint a length can take, and the index.
pub const ENTRY_OVERHEAD: usize = 10;

/// Writes `value` as an unsigned LEB128 varint.
fn put_varint(out: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        out.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

/// Reads an unsigned LEB128 varint at `*at`, moving past it.
fn varint(bytes: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&byte) = bytes.get(*at) else {
            return Err(format!("the batch ends inside a varint at byte {at}"));
        };
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(format!("a varint longer than 10 bytes ends at byte {at}"))
}

/// Reads a varint length and that many bytes at `*at`, as a view into
/// `bytes`.
fn chunk(bytes: &Bytes, at: &mut usize, what: &str) -> Result<Bytes, String> {
    let start = *at;
    let len = varint(bytes, at)? as usize;
    let end = at
        .checked_add(len)
        .filter(|end| *end <= bytes.len())
        .ok_or_else(|| {
            format!(
                "{what} at byte {start} says {len} bytes, but only {} remain",
                bytes.len() - *at
            )
        })?;
    let out = bytes.slice(*at..end);
    *at = end;
    Ok(out)
}

/// Reads the version byte and the count at the start of a batch.
fn open(bytes: &[u8]) -> Result<(usize, usize), String> {
    match bytes.first() {
        Some(&BATCH_VERSION) => {}
        Some(other) => {
            return Err(format!(
                "batch version {other} is not one this worker reads (expected {BATCH_VERSION})"
            ))
        }
        None => return Err("an empty batch".to_owned()),
    }
    let mut at = 1;
    let count = varint(bytes, &mut at)? as usize;
    // Each entry takes at least one byte: a count above what is left is a
    // lie, and must not size an allocation.
    if count > bytes.len() - at {
        return Err(format!(
            "the batch says {count} entries in {} bytes",
            bytes.len() - at
        ));
    }
    Ok((count, at))
}

/// Builds one batch request from single postcard requests.
pub fn encode_requests<'a>(requests: impl ExactSizeIterator<Item = &'a Bytes>) -> Bytes {
    let count = requests.len();
    let mut out = BytesMut::with_capacity(16 + count * 32);
    out.put_u8(BATCH_VERSION);
    put_varint(&mut out, count as u64);
    for request in requests {
        put_varint(&mut out, request.len() as u64);
        out.extend_from_slice(request);
    }
    out.freeze()
}

/// The single requests of a batch request, as views into its payload; an
/// error says where the batch stops making sense.
pub fn decode_requests(payload: &Bytes) -> Result<Vec<Bytes>, String> {
    let (count, mut at) = open(payload)?;
    if count == 0 {
        // Nothing in it would be answered: the caller hears why instead.
        return Err("a batch of no calls (a batch holds at least one)".to_owned());
    }
    let mut requests = Vec::with_capacity(count);
    for index in 0..count {
        requests.push(chunk(payload, &mut at, &format!("request {index}"))?);
    }
    if at != payload.len() {
        return Err(format!(
            "{} bytes follow the batch's {count} requests",
            payload.len() - at
        ));
    }
    Ok(requests)
}

/// One call's answer in a batch reply.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The call's place in its batch request, from 0.
    pub index: u32,
    /// The reply's headers, as a single reply would carry them.
    pub headers: Option<HeaderMap>,
    /// The reply's payload.
    pub body: Bytes,
}

impl Answer {
    /// Bytes this answer takes in a batch reply, near enough to bound one.
    pub fn size(&self) -> usize {
        let headers = self.headers.as_ref().map_or(0, |headers| {
            headers
                .iter()
                .map(|(name, values)| {
                    values
                        .iter()
                        .map(|v| {
                            AsRef::<str>::as_ref(name).len() + v.as_str().len() + 2 * ENTRY_OVERHEAD
                        })
                        .sum::<usize>()
                })
                .sum()
        });
        self.body.len() + headers + 2 * ENTRY_OVERHEAD
    }
}

/// Builds one batch reply from answers.
pub(crate) fn encode_answers(answers: &[Answer]) -> Bytes {
    let size: usize = answers.iter().map(Answer::size).sum();
    let mut out = BytesMut::with_capacity(size + 16);
    out.put_u8(BATCH_VERSION);
    put_varint(&mut out, answers.len() as u64);
    for answer in answers {
        put_varint(&mut out, u64::from(answer.index));
        match &answer.headers {
            None => put_varint(&mut out, 0),
            Some(headers) => {
                let pairs: Vec<(&str, &str)> = headers
                    .iter()
                    .flat_map(|(name, values)| {
                        values
                            .iter()
                            .map(move |v| (AsRef::<str>::as_ref(name), v.as_str()))
                    })
                    .collect();
                put_varint(&mut out, pairs.len() as u64);
                for (name, value) in pairs {
                    put_varint(&mut out, name.len() as u64);
                    out.extend_from_slice(name.as_bytes());
                    put_varint(&mut out, value.len() as u64);
                    out.extend_from_slice(value.as_bytes());
                }
            }
        }
        put_varint(&mut out, answer.body.len() as u64);
        out.extend_from_slice(&answer.body);
    }
    out.freeze()
}

/// The answers of a batch reply, bodies as views into its payload.
pub fn decode_answers(payload: &Bytes) -> Result<Vec<Answer>, String> {
    let (count, mut at) = open(payload)?;
    let mut answers = Vec::with_capacity(count);
    for _ in 0..count {
        let index = u32::try_from(varint(payload, &mut at)?)
            .map_err(|_| format!("an answer's index at byte {at} is out of range"))?;
        let pairs = varint(payload, &mut at)?;
        let headers = if pairs == 0 {
            None
        } else {
            let mut headers = HeaderMap::new();
            for _ in 0..pairs {
                let name = chunk(payload, &mut at, "a header name")?;
                let value = chunk(payload, &mut at, "a header value")?;
                let (Ok(name), Ok(value)) =
                    (std::str::from_utf8(&name), std::str::from_utf8(&value))
                else {
                    return Err(format!("a header of answer {index} is not UTF-8"));
                };
                headers.append(name, value);
            }
            Some(headers)
        };
        let body = chunk(payload, &mut at, "a body")?;
        answers.push(Answer {
            index,
            headers,
            body,
        });
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let requests = [
            Bytes::from_static(&[1, 0, 0, 0, 0, 0, 4, 6]),
            Bytes::new(),
            Bytes::from(vec![7u8; 300]),
        ];
        let batch = encode_requests(requests.iter());
        assert_eq!(&batch[..3], &[BATCH_VERSION, 3, 8]);
        assert_eq!(decode_requests(&batch).unwrap(), requests);
    }

    #[test]
    fn answers_round_trip_with_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Service-Error-Code", "422");
        headers.insert("Nats-Service-Error", "division by zero");
        let answers = [
            Answer {
                index: 0,
                headers: None,
                body: Bytes::from_static(b"\x54"),
            },
            Answer {
                index: 200,
                headers: Some(headers),
                body: Bytes::from_static(b"{}"),
            },
        ];
        let payload = encode_answers(&answers);
        assert!(payload.len() <= answers.iter().map(Answer::size).sum::<usize>() + 16);
        let read = decode_answers(&payload).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!((read[0].index, &read[0].body[..]), (0, &b"\x54"[..]));
        assert!(read[0].headers.is_none());
        let headers = read[1].headers.as_ref().unwrap();
        assert_eq!(read[1].index, 200);
        assert_eq!(
            headers.get("Nats-Service-Error-Code").unwrap().as_str(),
            "422"
        );
        assert_eq!(
            headers.get("Nats-Service-Error").unwrap().as_str(),
            "division by zero"
        );
    }

    #[test]
    fn malformed_batches_say_where() {
        let cases: [(&[u8], &str); 7] = [
            (&[], "empty"),
            (&[1, 0], "no calls"),
            (&[2, 0], "version 2"),
            (&[1, 5, 0], "says 5 entries"),
            (&[1, 1, 9, 1], "says 9 bytes"),
            (&[1, 1, 0, 0], "1 bytes follow"),
            (&[1, 1, 0xff], "inside a varint"),
        ];
        for (bytes, expected) in cases {
            let error = decode_requests(&Bytes::copy_from_slice(bytes)).unwrap_err();
            assert!(error.contains(expected), "{bytes:?}: {error}");
        }
        let error = decode_answers(&Bytes::from_static(&[1, 1, 0, 0, 4, 1])).unwrap_err();
        assert!(error.contains("a body"), "{error}");
    }
}
