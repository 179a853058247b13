//! The object store as a service, `<prefix>.objects.<verb>`, so a client in
//! any language reads and writes objects with plain requests:
//!
//! | verb | request | reply |
//! | --- | --- | --- |
//! | `put` | the bytes; headers `Wharf-Object-Type`, `Wharf-Object-Ttl` (s) | the reference, JSON |
//! | `put` in parts | `Wharf-Upload: <id>` and `Wharf-Part: <n>` per part, then `Wharf-Parts: <count>` with no body | `{"part": n}` per part, then the reference |
//! | `get` | JSON `{"uri", "digest"?, "offset"?, "length"?}` | the bytes; header `Wharf-Object-Offset` |
//! | `stat` | JSON `{"uri"}` | JSON `{"uri", "size", "digest"}` |
//! | `delete` | JSON `{"uri"}` | JSON `{"deleted": true}` |
//!
//! Errors are ADR-32 headers and a JSON `{kind, message}` body, as for
//! every wharf call. `docs/protocol.md` has the details.

use super::bytes::{digest_of, read_error, Algorithm, Hashing, Pieces, BYTES_TYPE};
use super::reference::{Blob, ObjectRef, Objects};
use super::store::{self, Location, Target};
use super::{external, jetstream};
use crate::metrics::{Exposition, Outcomes, Source};
use crate::wire::codec::{self, Codec};
use crate::wire::reply::error_reply;
use crate::wire::{headers, subjects};
use crate::{Client, Error, ErrorKind};
use async_nats::{HeaderMap, HeaderName, Message};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;

/// The service's name: its subjects are `<prefix>.objects.<verb>`.
pub const SERVICE: &str = "objects";

/// How long uploaded parts wait for their commit.
const PART_TTL: Duration = Duration::from_secs(3600);

/// How often expired blobs are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// A running object service; dropping it stops serving.
pub struct ObjectService {
    tasks: Vec<JoinHandle<()>>,
    /// Its metrics, shown at scrapes for as long as it serves.
    _metrics: Arc<dyn Source>,
}

/// The verbs the service answers, in the order of [`ServiceMetrics`]'
/// durations.
const VERBS: [&str; 4] = ["put", "get", "stat", "delete"];

/// What the objects service shows at a scrape.
#[derive(Default)]
struct ServiceMetrics {
    /// Object bytes received (`put`) and sent (`get`).
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Request durations by verb (as [`VERBS`]) and outcome.
    durations: [Outcomes; 4],
}

impl Source for ServiceMetrics {
    fn write(&self, out: &mut Exposition) {
        for (direction, bytes) in [("in", &self.bytes_in), ("out", &self.bytes_out)] {
            out.counter(
                "wharf_object_bytes_total",
                "Object bytes the objects service received (in: put) and sent (out: get).",
                &[("direction", direction)],
                bytes.load(Ordering::Relaxed),
            );
        }
        for (verb, durations) in VERBS.iter().zip(&self.durations) {
            durations.write(
                out,
                "wharf_objects_request_duration_seconds",
                "Duration of the objects service's requests, by verb and outcome.",
                &[("verb", verb)],
            );
        }
    }
}

impl Drop for ObjectService {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl std::fmt::Debug for ObjectService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObjectService")
    }
}

/// Serves `<prefix>.objects.put/get/stat/delete` through `client` (queue
/// group `q`, so any number of processes may serve it), and sweeps
/// expired blobs. `wharf up` runs one.
pub async fn serve(client: &Client) -> Result<ObjectService, Error> {
    let objects = Objects::new(client)?;
    let metrics = Arc::new(ServiceMetrics::default());
    let mut tasks = Vec::new();
    for (index, verb) in VERBS.into_iter().enumerate() {
        let subject = subjects::objects(client.prefix(), verb);
        let mut requests = client
            .nats()
            .queue_subscribe(subject.clone(), subjects::QUEUE_GROUP.into())
            .await
            .map_err(|e| crate::micro::subscribe_failed(&subject, e))?;
        let objects = objects.clone();
        let metrics = metrics.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(message) = requests.next().await {
                let objects = objects.clone();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let Some(reply) = message.reply.clone() else {
                        return;
                    };
                    let started = std::time::Instant::now();
                    let answer = match verb {
                        "put" => put(&objects, &message).await,
                        "get" => get(&objects, &message).await,
                        "stat" => stat(&objects, &message).await,
                        _ => remove(&objects, &message).await,
                    };
                    metrics.durations[index]
                        .observe(started.elapsed(), answer.as_ref().err().map(Error::kind));
                    if verb == "put" {
                        let received = message.payload.len() as u64;
                        metrics.bytes_in.fetch_add(received, Ordering::Relaxed);
                    }
                    if let ("get", Ok((_, body))) = (verb, &answer) {
                        let sent = body.len() as u64;
                        metrics.bytes_out.fetch_add(sent, Ordering::Relaxed);
                    }
                    let (headers, body) = answer.unwrap_or_else(|error| failure(&error));
                    let _ = objects
                        .client
                        .nats()
                        .publish_with_headers(reply, headers, body)
                        .await;
                });
            }
        }));
    }
    let sweeper = client.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::time::sleep(SWEEP_EVERY).await;
            let _ = jetstream::sweep(&sweeper).await;
        }
    }));
    client.nats().flush().await.map_err(|e| {
        Error::new(
            ErrorKind::Connection,
            format!("cannot confirm subscriptions with NATS: {e}"),
        )
        .with_source(e)
    })?;
    let metrics: Arc<dyn Source> = metrics;
    crate::metrics::register(&metrics);
    Ok(ObjectService {
        tasks,
        _metrics: metrics,
    })
}

type Answer = Result<(HeaderMap, Bytes), Error>;

fn json(value: &impl serde::Serialize) -> Answer {
    let mut headers = HeaderMap::new();
    headers.insert(headers::CONTENT_TYPE, codec::JSON);
    Ok((
        headers,
        serde_json::to_vec(value).unwrap_or_default().into(),
    ))
}

fn failure(error: &Error) -> (HeaderMap, Bytes) {
    let (_, headers, body) = error_reply(error.kind(), error.message(), None, Codec::Json);
    (headers, body)
}

fn header<'a>(message: &'a Message, name: &HeaderName) -> Option<&'a str> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name.clone()))
        .map(|v| v.as_str())
}

fn bad(message: String) -> Error {
    Error::new(ErrorKind::BadRequest, message)
}

/// A number from a header, or a 400 naming the header.
fn number(message: &Message, name: &HeaderName) -> Result<Option<u64>, Error> {
    header(message, name)
        .map(|text| {
            text.trim().parse().map_err(|_| {
                bad(format!(
                    "header {name} must be a whole number, got `{text}`"
                ))
            })
        })
        .transpose()
}

async fn put(objects: &Objects, message: &Message) -> Answer {
    let mut objects = objects.clone();
    if let Some(ttl) = number(message, &headers::OBJECT_TTL)? {
        objects = objects.ttl(Duration::from_secs(ttl));
    }
    let ty = header(message, &headers::OBJECT_TYPE).unwrap_or(BYTES_TYPE);
    let Some(upload) = header(message, &headers::UPLOAD) else {
        let stored = objects.put_bytes_as(message.payload.clone(), ty).await?;
        return json(&stored);
    };
    if !subjects::valid_txn_id(upload) {
        return Err(bad(format!(
            "Wharf-Upload `{}` must be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'",
            subjects::shown(upload)
        )));
    }
    let store = parts_store(&objects.client).await?;
    if let Some(part) = number(message, &headers::PART)? {
        store
            .put_part(upload, part, message.payload.clone())
            .await?;
        return json(&serde_json::json!({ "part": part }));
    }
    let Some(count) = number(message, &headers::PARTS)? else {
        return Err(bad(
            "a put with Wharf-Upload needs Wharf-Part (one part) or Wharf-Parts (the commit)"
                .into(),
        ));
    };
    // The parts are read one at a time, in order, into the store.
    let mut next = 0;
    let (parts, id) = (store.clone(), upload.to_owned());
    let mut reader = Pieces::new(move || {
        if next >= count {
            return None;
        }
        let (parts, id, part) = (parts.clone(), id.clone(), next);
        next += 1;
        Some(Box::pin(async move { parts.get_part(&id, part).await }))
    });
    let stored: ObjectRef<Blob> = objects.put_reader(&mut reader, ty).await?;
    for part in 0..count {
        store.delete_part(upload, part).await;
    }
    json(&stored)
}

#[derive(Deserialize)]
struct Locator {
    uri: String,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    length: Option<u64>,
}

/// The request's locator, when it names an object this service may touch:
/// the JetStream store, registered stores, and its own configured store,
/// never an arbitrary file or bucket.
fn locator(objects: &Objects, message: &Message) -> Result<Locator, Error> {
    let locator: Locator = serde_json::from_slice(&message.payload).map_err(|e| {
        bad(format!(
            "the request must be JSON {{\"uri\": .., \"digest\": .. (optional), \"offset\": .., \"length\": ..}}: {e}"
        ))
        .with_source(e)
    })?;
    let own = match &objects.target {
        Target::External(base) => locator
            .uri
            .starts_with(&format!("{}/", base.trim_end_matches('/'))),
        _ => false,
    };
    match store::locate(&locator.uri)? {
        Location::External if !own => Err(Error::new(
            ErrorKind::UnsupportedStore,
            format!("`{}` is not in a store this service serves: it serves the JetStream store, registered stores and the store WHARF_OBJECT_STORE names", locator.uri),
        )),
        _ => Ok(locator),
    }
}

async fn get(objects: &Objects, message: &Message) -> Answer {
    let request = locator(objects, message)?;
    let client = &objects.client;
    let max = client.nats().server_info().max_payload.saturating_sub(4096);
    let digest = match &request.digest {
        Some(digest) => digest.clone(),
        None => stat_of(client, &request.uri).await?.1,
    };
    let mut reader = store::open(client, &request.uri, &digest).await?;
    // Skip to the offset; what is skipped still counts towards the digest.
    tokio::io::copy(
        &mut (&mut reader).take(request.offset),
        &mut tokio::io::sink(),
    )
    .await
    .map_err(|e| read_error(&request.uri, e))?;
    let length = request.length.unwrap_or(max as u64);
    if length > max as u64 {
        return Err(bad(format!(
            "length {length} is more than one reply can carry ({max} bytes): read the object in ranges"
        )));
    }
    let mut body = Vec::new();
    (&mut reader)
        .take(length)
        .read_to_end(&mut body)
        .await
        .map_err(|e| read_error(&request.uri, e))?;
    if request.length.is_none() {
        // The whole object was asked for: it must have ended here, and the
        // rest is read to check the digest.
        let mut rest = [0u8; 1];
        let more = reader
            .read(&mut rest)
            .await
            .map_err(|e| read_error(&request.uri, e))?;
        if more > 0 {
            return Err(bad(format!(
                "object `{}` is larger than one reply can carry ({max} bytes): read it in ranges with offset and length",
                request.uri
            )));
        }
    }
    let mut headers = HeaderMap::new();
    headers.insert(headers::OBJECT_OFFSET, request.offset.to_string());
    Ok((headers, body.into()))
}

/// Size and digest of the object at `uri`.
async fn stat_of(client: &Client, uri: &str) -> Result<(u64, String), Error> {
    match store::locate(uri)? {
        Location::Blob(key) => {
            let (size, digest, _) = jetstream::stat_blob(client, uri, key).await?;
            Ok((size, digest))
        }
        Location::Inline(key) => {
            let bytes = jetstream::get_inline(client, uri, key).await?;
            Ok((bytes.len() as u64, digest_of(&bytes)))
        }
        Location::External => {
            // No digest is kept beside the object: hash it.
            let reader = external::get(uri).await?;
            let mut hashing = Hashing::new(reader, Algorithm::Xxh3);
            tokio::io::copy(&mut hashing, &mut tokio::io::sink())
                .await
                .map_err(|e| read_error(uri, e))?;
            Ok(hashing.finish())
        }
        Location::Custom(store, key) => {
            let mut hashing = Hashing::new(store.get(key).await?, Algorithm::Xxh3);
            tokio::io::copy(&mut hashing, &mut tokio::io::sink())
                .await
                .map_err(|e| read_error(uri, e))?;
            Ok(hashing.finish())
        }
    }
}

async fn stat(objects: &Objects, message: &Message) -> Answer {
    let request = locator(objects, message)?;
    let (size, digest) = stat_of(&objects.client, &request.uri).await?;
    json(&serde_json::json!({ "uri": request.uri, "size": size, "digest": digest }))
}

async fn remove(objects: &Objects, message: &Message) -> Answer {
    let request = locator(objects, message)?;
    store::delete(&objects.client, &request.uri).await?;
    json(&serde_json::json!({ "deleted": true }))
}

/// Where uploaded parts wait: KV `wharf_objects`, keys
/// `_upload.<id>.<n>`, for an hour.
#[derive(Clone)]
struct PartsStore {
    client: Client,
    kv: async_nats::jetstream::kv::Store,
}

async fn parts_store(client: &Client) -> Result<Arc<PartsStore>, Error> {
    let kv = jetstream::inline_bucket(client).await?;
    Ok(Arc::new(PartsStore {
        client: client.clone(),
        kv,
    }))
}

impl PartsStore {
    fn key(upload: &str, part: u64) -> String {
        subjects::upload_part(upload, part)
    }

    async fn put_part(&self, upload: &str, part: u64, bytes: Bytes) -> Result<(), Error> {
        jetstream::put_inline(
            &self.client,
            &Self::key(upload, part),
            &bytes,
            Some(PART_TTL),
        )
        .await
        .map(|_| ())
    }

    async fn get_part(&self, upload: &str, part: u64) -> std::io::Result<Bytes> {
        match self.kv.get(Self::key(upload, part)).await {
            Ok(Some(bytes)) => Ok(bytes),
            Ok(None) => Err(std::io::Error::other(format!(
                "part {part} of upload `{upload}` is missing: put every part 0..count before the commit"
            ))),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    async fn delete_part(&self, upload: &str, part: u64) {
        let _ = self.kv.purge(Self::key(upload, part)).await;
    }
}
