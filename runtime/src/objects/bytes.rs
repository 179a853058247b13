//! Object bytes in motion: streams fetched piece by piece, digests
//! computed and checked as the bytes pass, and the name raw bytes go by.

use crate::error::{Error, ErrorKind};
use futures_util::future::BoxFuture;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// The type name of raw bytes: what [`Blob`](super::Blob) references carry.
pub const BYTES_TYPE: &str = "bytes";

/// A read error of an object stream as a wharf error (a digest mismatch
/// keeps its kind).
pub(crate) fn read_error(uri: &str, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::InvalidData {
        Error::new(ErrorKind::DigestMismatch, e.to_string()).with_source(e)
    } else {
        Error::new(
            ErrorKind::StoreUnavailable,
            format!("reading object `{uri}` failed: {e}"),
        )
        .with_source(e)
    }
}

/// The future of one piece of a [`Pieces`] stream.
pub(crate) type Piece = BoxFuture<'static, std::io::Result<bytes::Bytes>>;

/// A byte stream fetched piece by piece, one piece in memory at a time:
/// `next` gives the next piece's fetch, or `None` at the end.
pub(crate) struct Pieces {
    next: Box<dyn FnMut() -> Option<Piece> + Send>,
    current: std::io::Cursor<bytes::Bytes>,
    pending: Option<Piece>,
}

impl Pieces {
    pub(crate) fn new(next: impl FnMut() -> Option<Piece> + Send + 'static) -> Pieces {
        Pieces {
            next: Box::new(next),
            current: std::io::Cursor::new(bytes::Bytes::new()),
            pending: None,
        }
    }
}

impl AsyncRead for Pieces {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            let before = buf.filled().len();
            match Pin::new(&mut this.current).poll_read(cx, buf) {
                Poll::Ready(Ok(())) if buf.filled().len() > before => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            if this.pending.is_none() {
                match (this.next)() {
                    Some(piece) => this.pending = Some(piece),
                    None => return Poll::Ready(Ok(())),
                }
            }
            let pending = this.pending.as_mut().expect("set above");
            match pending.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(result) => {
                    this.pending = None;
                    this.current = std::io::Cursor::new(result?);
                }
            }
        }
    }
}

/// How a store's objects are digested. The JetStream store uses SHA-256,
/// the NATS Object Store's own digest, which it computes anyway; other
/// stores use XXH3-128, which finds corruption and changed objects as
/// well at a small fraction of the cost (SHA-256 would cost more than the
/// write itself on a local disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Algorithm {
    Sha256,
    Xxh3,
}

impl Algorithm {
    /// The digest of `bytes`, in its `<name>=<base64url>` form.
    pub(crate) fn digest(self, bytes: &[u8]) -> String {
        let mut hasher = Hasher::new(self);
        hasher.update(bytes);
        hasher.finish()
    }

    /// The algorithm a digest string was made with.
    pub(crate) fn of(digest: &str) -> Option<Algorithm> {
        if digest.starts_with("SHA-256=") {
            Some(Algorithm::Sha256)
        } else if digest.starts_with("XXH3-128=") {
            Some(Algorithm::Xxh3)
        } else {
            None
        }
    }
}

/// `SHA-256=<base64url>` of `bytes`, the NATS Object Store's digest form.
pub(crate) fn digest_of(bytes: &[u8]) -> String {
    Algorithm::Sha256.digest(bytes)
}

enum Hasher {
    Sha256(Box<ring::digest::Context>),
    Xxh3(Box<twox_hash::XxHash3_128>),
}

impl Hasher {
    fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => {
                Hasher::Sha256(Box::new(ring::digest::Context::new(&ring::digest::SHA256)))
            }
            Algorithm::Xxh3 => Hasher::Xxh3(Box::new(twox_hash::XxHash3_128::new())),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(context) => context.update(bytes),
            Hasher::Xxh3(state) => state.write(bytes),
        }
    }

    fn finish(self) -> String {
        use base64::Engine;
        let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE.encode(bytes);
        match self {
            Hasher::Sha256(context) => format!("SHA-256={}", encode(context.finish().as_ref())),
            Hasher::Xxh3(state) => {
                format!("XXH3-128={}", encode(&state.finish_128().to_be_bytes()))
            }
        }
    }
}

/// Counts and hashes what passes through a reader.
pub(crate) struct Hashing<R> {
    inner: R,
    hasher: Hasher,
    size: u64,
}

impl<R> Hashing<R> {
    pub(crate) fn new(inner: R, algorithm: Algorithm) -> Self {
        Hashing {
            inner,
            hasher: Hasher::new(algorithm),
            size: 0,
        }
    }

    /// Bytes read and their digest.
    pub(crate) fn finish(self) -> (u64, String) {
        (self.size, self.hasher.finish())
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Hashing<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            let new = &buf.filled()[before..];
            this.hasher.update(new);
            this.size += new.len() as u64;
        }
        poll
    }
}

/// A reader that checks, as it ends, that what it read has `expected` for
/// a digest (in the algorithm `expected` names).
pub(crate) struct Verified<R> {
    hashing: Option<Hashing<R>>,
    uri: String,
    expected: String,
}

impl<R> Verified<R> {
    pub(crate) fn new(inner: R, uri: &str, expected: &str) -> Self {
        // A digest of an unknown form matches nothing, so the read fails
        // at its end rather than passing unchecked.
        let algorithm = Algorithm::of(expected).unwrap_or(Algorithm::Sha256);
        Verified {
            hashing: Some(Hashing::new(inner, algorithm)),
            uri: uri.to_owned(),
            expected: expected.to_owned(),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Verified<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let Some(hashing) = this.hashing.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let before = buf.filled().len();
        match Pin::new(hashing).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                // End of the object: its digest must match the reference's.
                let (_, actual) = this.hashing.take().expect("checked above").finish();
                if actual == this.expected {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Ready(Err(digest_mismatch(&this.uri, &this.expected, &actual)))
                }
            }
            other => other,
        }
    }
}

pub(crate) fn digest_mismatch(uri: &str, expected: &str, actual: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("object `{uri}` does not match its reference: digest {actual}, expected {expected}; it was changed or corrupted after the reference was made"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn digests_match_the_nats_object_store_form() {
        // SHA-256 of "abc", base64url with padding.
        assert_eq!(
            digest_of(b"abc"),
            "SHA-256=ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0="
        );
        let mut xxh3 = Hasher::new(Algorithm::Xxh3);
        xxh3.update(b"abc");
        let digest = xxh3.finish();
        // The reference XXH3-128 (seed 0), canonical big-endian form.
        assert_eq!(digest, "XXH3-128=BrBatnM6YYV4r1-UiS85UA==");
        assert_eq!(Algorithm::of(&digest), Some(Algorithm::Xxh3));
        // A long input, fed in uneven pieces, takes the vectorised path.
        let long: Vec<u8> = (0..64).flat_map(|_| 0..=255u8).collect();
        let mut xxh3 = Hasher::new(Algorithm::Xxh3);
        for piece in long.chunks(1000) {
            xxh3.update(piece);
        }
        assert_eq!(xxh3.finish(), "XXH3-128=UmaiOB81h_7JawTr76j23A==");
    }

    #[tokio::test]
    async fn a_verified_reader_catches_changed_bytes() {
        let good = digest_of(b"hello");
        let mut out = Vec::new();
        Verified::new(&b"hello"[..], "test://x", &good)
            .read_to_end(&mut out)
            .await
            .unwrap();
        assert_eq!(out, b"hello");
        let mut other = Hasher::new(Algorithm::Xxh3);
        other.update(b"hello");
        let other = other.finish();
        Verified::new(&b"hello"[..], "test://x", &other)
            .read_to_end(&mut Vec::new())
            .await
            .unwrap();
        let error = Verified::new(&b"jello"[..], "test://x", &good)
            .read_to_end(&mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("test://x"));
    }
}
