//! The default object store: small values in KV `wharf_objects`, larger
//! ones chunked into the Object Store `wharf_blobs`.

use super::bytes::{digest_mismatch, digest_of, Pieces, Verified, BYTES_TYPE};
use crate::wire::subjects;
use crate::{Client, Error, ErrorKind};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, kv, object_store, stream::StorageType};
use async_nats::HeaderMap;
use bytes::Bytes;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

pub use crate::wire::subjects::{BLOBS_BUCKET, OBJECTS_BUCKET};

/// Values up to this size are kept in KV `wharf_objects`; larger ones in
/// the Object Store `wharf_blobs`.
pub const INLINE_LIMIT: usize = 256 * 1024;

/// Object Store metadata: unix ms after which the object is expired.
const EXPIRES: &str = "wharf.expires_ms";

/// Object Store metadata: the type the object was stored as.
const TYPE: &str = "wharf.type";

/// The largest object kept in KV through `client`: [`INLINE_LIMIT`], or
/// less when the server's max_payload is small.
pub(super) fn inline_limit(client: &Client) -> usize {
    INLINE_LIMIT.min(room(client))
}

/// What one message may carry with room for its headers.
fn room(client: &Client) -> usize {
    let max_payload = client.nats().server_info().max_payload;
    max_payload
        .saturating_sub((1024).min(max_payload / 4))
        .max(1)
}

/// Both buckets, found or created once per client.
pub(crate) struct JsStores {
    js: jetstream::Context,
    kv: kv::Store,
    blobs: object_store::ObjectStore,
    /// The stream under `blobs`, whose chunks readers pull.
    blob_stream: jetstream::stream::Stream,
}

impl std::fmt::Debug for JsStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsStores")
    }
}

async fn stores(client: &Client) -> Result<Arc<JsStores>, Error> {
    client
        .extension(|| async {
            let js = jetstream::new(client.nats().clone());
            let kv = crate::storage::key_value(
                &js,
                kv::Config {
                    bucket: OBJECTS_BUCKET.to_owned(),
                    description: "wharf: objects by reference, small values".to_owned(),
                    history: 1,
                    // Per-key TTLs for objects put with one.
                    limit_markers: Some(Duration::from_secs(1)),
                    storage: StorageType::File,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| unreachable_store(OBJECTS_BUCKET, e))?;
            let blobs = crate::storage::object_store(
                &js,
                object_store::Config {
                    bucket: BLOBS_BUCKET.to_owned(),
                    description: Some("wharf: objects by reference, large values".to_owned()),
                    storage: StorageType::File,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| unreachable_store(BLOBS_BUCKET, e))?;
            let blob_stream = js
                .get_stream(subjects::object_store_stream(BLOBS_BUCKET))
                .await
                .map_err(|e| unreachable_store(BLOBS_BUCKET, e))?;
            Ok(JsStores {
                js,
                kv,
                blobs,
                blob_stream,
            })
        })
        .await
}

/// KV `wharf_objects`.
pub(super) async fn inline_bucket(client: &Client) -> Result<kv::Store, Error> {
    Ok(stores(client).await?.kv.clone())
}

fn unreachable_store(bucket: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(
        ErrorKind::StoreUnavailable,
        format!("the JetStream object store (bucket `{bucket}`) is unavailable: {e}; objects need nats-server with JetStream (-js)"),
    )
.with_source(e)
}

fn uri(bucket: &str, key: &str) -> String {
    format!("wharf://jetstream/{bucket}/{key}")
}

fn not_found(uri: &str) -> Error {
    Error::new(
        ErrorKind::ObjectNotFound,
        format!("object `{uri}` not found: it was never stored, was deleted, or expired"),
    )
}

/// Stores a small value in KV; returns its URI and digest.
pub(super) async fn put_inline(
    client: &Client,
    key: &str,
    bytes: &[u8],
    ttl: Option<Duration>,
) -> Result<(String, String), Error> {
    let stores = stores(client).await?;
    let mut headers = HeaderMap::new();
    if let Some(ttl) = ttl {
        headers.insert(
            async_nats::header::NATS_MESSAGE_TTL,
            format!("{}s", ttl.as_secs().max(1)),
        );
    }
    stores
        .js
        .publish_with_headers(
            subjects::kv_key(OBJECTS_BUCKET, key),
            headers,
            Bytes::copy_from_slice(bytes),
        )
        .await
        .map_err(|e| unreachable_store(OBJECTS_BUCKET, e))?
        .await
        .map_err(|e| unreachable_store(OBJECTS_BUCKET, e))?;
    Ok((uri(OBJECTS_BUCKET, key), digest_of(bytes)))
}

/// Stores what `reader` yields: in KV when it turns out small, else
/// streamed into the Object Store. Returns URI, size and digest.
pub(super) async fn put_stream(
    client: &Client,
    key: &str,
    reader: &mut (dyn AsyncRead + Send + Unpin),
    ty: &str,
    ttl: Option<Duration>,
) -> Result<(String, u64, String), Error> {
    // Read at most one byte past the inline limit to learn which store.
    let mut head = Vec::with_capacity(64 * 1024);
    let inline = inline_limit(client);
    let mut limited = (&mut *reader).take(inline as u64 + 1);
    limited
        .read_to_end(&mut head)
        .await
        .map_err(|e| read_failed(key, e))?;
    if head.len() <= inline {
        let (uri, digest) = put_inline(client, key, &head, ttl).await?;
        return Ok((uri, head.len() as u64, digest));
    }
    let stores = stores(client).await?;
    let mut metadata = HashMap::from([(TYPE.to_owned(), ty.to_owned())]);
    if let Some(ttl) = ttl {
        let expires = crate::context::unix_ms().saturating_add(ttl.as_millis() as u64);
        metadata.insert(EXPIRES.to_owned(), expires.to_string());
    }
    let meta = object_store::ObjectMetadata {
        name: key.to_owned(),
        metadata,
        // 128 KiB chunks, or smaller when one would not fit a message.
        chunk_size: Some((128 * 1024).min(room(client))),
        ..Default::default()
    };
    let mut rest = std::io::Cursor::new(head).chain(reader);
    let info = stores
        .blobs
        .put(meta, &mut rest)
        .await
        .map_err(|e| unreachable_store(BLOBS_BUCKET, e))?;
    let digest = info.digest.unwrap_or_default();
    Ok((uri(BLOBS_BUCKET, key), info.size as u64, digest))
}

fn read_failed(key: &str, e: std::io::Error) -> Error {
    Error::new(
        ErrorKind::Other,
        format!("reading the data for object `{key}` failed: {e}"),
    )
    .with_source(e)
}

/// The bytes of a KV-held object.
pub(super) async fn get_inline(client: &Client, uri: &str, key: &str) -> Result<Bytes, Error> {
    let stores = stores(client).await?;
    stores
        .kv
        .get(key)
        .await
        .map_err(|e| unreachable_store(OBJECTS_BUCKET, e))?
        .ok_or_else(|| not_found(uri))
}

/// A stream of an Object-Store-held object, after checking that it is the
/// one `digest` names and has not expired.
pub(super) async fn get_blob(
    client: &Client,
    uri: &str,
    key: &str,
    digest: &str,
) -> Result<Pin<Box<dyn AsyncRead + Send>>, Error> {
    let stores = stores(client).await?;
    // `get` reads the object's info and subscribes only on the first read.
    let object = match stores.blobs.get(key).await {
        Ok(object) => object,
        Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Err(not_found(uri)),
        Err(e) => return Err(unreachable_store(BLOBS_BUCKET, e)),
    };
    let info = object.info().clone();
    if expired(&info.metadata) {
        let _ = stores.blobs.delete(key).await;
        return Err(not_found(uri));
    }
    let stored = info.digest.clone().unwrap_or_default();
    if stored != digest {
        return Err(Error::new(
            ErrorKind::DigestMismatch,
            digest_mismatch(uri, digest, &stored).to_string(),
        ));
    }
    if info.chunks <= CHUNKS_IN_FLIGHT {
        // Small enough that however fast its chunks arrive they fit in
        // memory: async-nats's own reader (which checks the digest) is
        // one request cheaper than a pull consumer.
        return Ok(Box::pin(Checked {
            object,
            uri: uri.to_owned(),
            digest: digest.to_owned(),
        }));
    }
    drop(object);
    // The chunks are pulled a few at a time: async-nats's own object
    // reader takes pushed chunks as fast as the server sends them, and a
    // reader slower than the network would buffer most of the object.
    let stream = stores.blob_stream.clone();
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: subjects::object_chunks(BLOBS_BUCKET, &info.nuid),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            // Deleted by the reader's guard when it is done; the threshold
            // only cleans up after a reader that died. Generous, so a reader
            // on a loaded machine never finds its consumer gone mid-object.
            inactive_threshold: Duration::from_secs(120),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(|e| unreachable_store(BLOBS_BUCKET, e))?;
    let name = consumer.cached_info().name.clone();
    let messages = consumer
        .stream()
        .max_messages_per_batch(CHUNKS_IN_FLIGHT)
        .messages()
        .await
        .map_err(|e| unreachable_store(BLOBS_BUCKET, e))?;
    // One chunk in memory at a time (beyond the pull's batch); the guard
    // deletes the consumer when the reader is dropped.
    let messages = Arc::new(tokio::sync::Mutex::new(messages));
    let cleanup = DeleteConsumer(Some((stream, name)));
    let mut left = info.chunks;
    let chunks = Pieces::new(move || {
        let _ = &cleanup;
        if left == 0 {
            return None;
        }
        left -= 1;
        let messages = messages.clone();
        Some(Box::pin(async move {
            use futures_util::StreamExt;
            match messages.lock().await.next().await {
                Some(Ok(message)) => Ok(message.message.payload.clone()),
                Some(Err(e)) => Err(std::io::Error::other(e)),
                None => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the object's chunks ended early",
                )),
            }
        }))
    });
    Ok(Box::pin(Verified::new(chunks, uri, digest)))
}

/// async-nats's object reader, with our wording for a digest mismatch.
struct Checked {
    object: object_store::Object,
    uri: String,
    digest: String,
}

impl AsyncRead for Checked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.object).poll_read(cx, buf) {
            Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => Poll::Ready(Err(
                digest_mismatch(&this.uri, &this.digest, "a different one"),
            )),
            other => other,
        }
    }
}

/// Chunks of a blob fetched per pull: what a reader holds at most, besides
/// the chunk it reads (128 KiB each by default).
const CHUNKS_IN_FLIGHT: usize = 16;

/// Deletes a blob reader's consumer when dropped: the server allows an
/// account only so many, and a busy reader would otherwise run out before
/// the inactive ones expire.
struct DeleteConsumer(Option<(jetstream::stream::Stream, String)>);

impl Drop for DeleteConsumer {
    fn drop(&mut self) {
        if let Some((stream, name)) = self.0.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = stream.delete_consumer(&name).await;
                });
            }
        }
    }
}

fn expired(metadata: &HashMap<String, String>) -> bool {
    metadata
        .get(EXPIRES)
        .and_then(|ms| ms.parse::<u64>().ok())
        .is_some_and(|at| at <= crate::context::unix_ms())
}

pub(super) async fn delete_inline(client: &Client, _uri: &str, key: &str) -> Result<(), Error> {
    let stores = stores(client).await?;
    // The purge marker expires too, so deleted keys leave nothing behind.
    stores
        .kv
        .purge_with_ttl(key, Duration::from_secs(1))
        .await
        .map_err(|e| unreachable_store(OBJECTS_BUCKET, e))
}

pub(super) async fn delete_blob(client: &Client, _uri: &str, key: &str) -> Result<(), Error> {
    let stores = stores(client).await?;
    match stores.blobs.delete(key).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => Ok(()),
        Err(e) => Err(unreachable_store(BLOBS_BUCKET, e)),
    }
}

/// Deletes the blobs whose TTL has passed (KV values expire by
/// themselves); returns how many.
pub(crate) async fn sweep(client: &Client) -> Result<usize, Error> {
    use futures_util::StreamExt;
    let stores = stores(client).await?;
    let mut list = stores
        .blobs
        .list()
        .await
        .map_err(|e| unreachable_store(BLOBS_BUCKET, e))?;
    let mut expired_keys = Vec::new();
    while let Some(info) = list.next().await {
        if let Ok(info) = info {
            if !info.deleted && expired(&info.metadata) {
                expired_keys.push(info.name);
            }
        }
    }
    for key in &expired_keys {
        let _ = stores.blobs.delete(key).await;
    }
    Ok(expired_keys.len())
}

/// The size and, for blobs, digest and type of the object under `key`.
pub(super) async fn stat_blob(
    client: &Client,
    uri: &str,
    key: &str,
) -> Result<(u64, String, String), Error> {
    let stores = stores(client).await?;
    match stores.blobs.info(key).await {
        Ok(info) if !info.deleted && !expired(&info.metadata) => Ok((
            info.size as u64,
            info.digest.clone().unwrap_or_default(),
            info.metadata
                .get(TYPE)
                .cloned()
                .unwrap_or_else(|| BYTES_TYPE.to_owned()),
        )),
        Ok(_) => Err(not_found(uri)),
        Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => Err(not_found(uri)),
        Err(e) => Err(unreachable_store(BLOBS_BUCKET, e)),
    }
}
