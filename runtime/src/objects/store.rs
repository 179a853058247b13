//! The object stores underneath references: where a URI points, opening,
//! fetching and deleting what it names, putting bytes into a target store,
//! and the registry of stores of your own. Below the client's call path,
//! which spills large payloads through it.

use super::bytes::{digest_mismatch, read_error, Algorithm, Hashing, Verified, BYTES_TYPE};
use super::jetstream::{BLOBS_BUCKET, OBJECTS_BUCKET};
use super::{external, jetstream};
use crate::client::Client;
use crate::error::{Error, ErrorKind};
use crate::settings::Settings;
use crate::wire::subjects::{shown, valid_id, MAX_URI};
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// Where new objects go.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    JetStream,
    /// An `object_store` URL to put objects under.
    External(String),
    /// A store registered under this name.
    Custom(String),
}

impl Target {
    pub(crate) fn parse(spec: &str) -> Result<Target, Error> {
        let spec = spec.trim();
        if spec.is_empty() || spec == "jetstream" || spec == "wharf://jetstream" {
            return Ok(Target::JetStream);
        }
        if let Some(name) = spec.strip_prefix("wharf://") {
            let name = name.trim_end_matches('/');
            if custom(name).is_none() {
                return Err(unknown_store(name));
            }
            return Ok(Target::Custom(name.to_owned()));
        }
        external::check_base(spec)?;
        Ok(Target::External(spec.trim_end_matches('/').to_owned()))
    }
}

/// Where a URI points.
pub(crate) enum Location<'a> {
    /// A value in KV `wharf_objects`.
    Inline(&'a str),
    /// An object in the Object Store `wharf_blobs`.
    Blob(&'a str),
    /// A registered store and a key in it.
    Custom(Arc<dyn Store>, &'a str),
    /// An `object_store` URL.
    External,
}

pub(crate) fn locate(uri: &str) -> Result<Location<'_>, Error> {
    if uri.len() > MAX_URI {
        return Err(Error::new(
            ErrorKind::BadRequest,
            format!(
                "object URI `{}` is too long: object URIs are at most {MAX_URI} characters",
                shown(uri)
            ),
        ));
    }
    if let Some(rest) = uri.strip_prefix("wharf://") {
        let (store, key) = rest.split_once('/').unwrap_or((rest, ""));
        // The key becomes a subject token and a KV key: check it first.
        let key_in_bucket = key.split_once('/').map_or(key, |(_, k)| k);
        let checked = if store == "jetstream" {
            key_in_bucket
        } else {
            key
        };
        if !checked.is_empty() && !valid_id(checked.as_bytes()) {
            return Err(Error::new(
                ErrorKind::BadRequest,
                format!(
                    "`{}` in `{}` is not an object key: keys are 1 to 128 characters of A-Z, a-z, 0-9, '-' and '_'",
                    shown(checked),
                    shown(uri)
                ),
            ));
        }
        if store == "jetstream" {
            return match key.split_once('/') {
                Some((OBJECTS_BUCKET, key)) if !key.is_empty() => Ok(Location::Inline(key)),
                Some((BLOBS_BUCKET, key)) if !key.is_empty() => Ok(Location::Blob(key)),
                _ => Err(Error::new(
                    ErrorKind::UnsupportedStore,
                    format!("`{uri}` names no JetStream object: expected wharf://jetstream/{OBJECTS_BUCKET}/<key> or wharf://jetstream/{BLOBS_BUCKET}/<key>"),
                )),
            };
        }
        let store_ref = custom(store).ok_or_else(|| unknown_store(store))?;
        return Ok(Location::Custom(store_ref, key));
    }
    Ok(Location::External)
}

/// Opens the object at `uri` for reading, checking it against `digest`.
pub(crate) async fn open(client: &Client, uri: &str, digest: &str) -> Result<ObjectReader, Error> {
    let inner: Pin<Box<dyn AsyncRead + Send>> = match locate(uri)? {
        Location::Inline(key) => {
            let bytes = jetstream::get_inline(client, uri, key).await?;
            Box::pin(Verified::new(std::io::Cursor::new(bytes), uri, digest))
        }
        Location::Blob(key) => jetstream::get_blob(client, uri, key, digest).await?,
        Location::Custom(store, key) => Box::pin(Verified::new(store.get(key).await?, uri, digest)),
        Location::External => Box::pin(Verified::new(external::get(uri).await?, uri, digest)),
    };
    Ok(ObjectReader { inner })
}

/// The whole object at `uri`, checked against `digest`. Objects a store
/// hands over in one piece are not copied.
pub(crate) async fn fetch(client: &Client, uri: &str, digest: &str) -> Result<bytes::Bytes, Error> {
    let algorithm = Algorithm::of(digest).unwrap_or(Algorithm::Sha256);
    let whole = match locate(uri)? {
        Location::Inline(key) => {
            let bytes = jetstream::get_inline(client, uri, key).await?;
            let actual = algorithm.digest(&bytes);
            Some((bytes, actual))
        }
        Location::External => external::get_whole(uri, algorithm).await?,
        _ => None,
    };
    if let Some((bytes, actual)) = whole {
        if actual != digest {
            return Err(Error::new(
                ErrorKind::DigestMismatch,
                digest_mismatch(uri, digest, &actual).to_string(),
            ));
        }
        return Ok(bytes);
    }
    let mut bytes = Vec::new();
    open(client, uri, digest)
        .await?
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| read_error(uri, e))?;
    Ok(bytes.into())
}

/// A spilled payload: only the JetStream store holds those, so a message
/// cannot make a process read (or later delete) anything else.
pub(crate) async fn fetch_spilled(
    client: &Client,
    uri: &str,
    digest: &str,
) -> Result<bytes::Bytes, Error> {
    match locate(uri)? {
        Location::Inline(_) | Location::Blob(_) => fetch(client, uri, digest).await,
        _ => Err(Error::new(
            ErrorKind::BadRequest,
            format!("`{uri}` cannot hold a spilled payload: spilled payloads live in the JetStream store (wharf://jetstream/...)"),
        )),
    }
}

/// Deletes the object at `uri`.
pub(crate) async fn delete(client: &Client, uri: &str) -> Result<(), Error> {
    match locate(uri)? {
        Location::Inline(key) => jetstream::delete_inline(client, uri, key).await,
        Location::Blob(key) => jetstream::delete_blob(client, uri, key).await,
        Location::Custom(store, key) => store.delete(key).await,
        Location::External => external::delete(uri).await,
    }
}

/// The stored bytes of an object, as a stream ([`ObjectRef::reader`]).
pub struct ObjectReader {
    inner: Pin<Box<dyn AsyncRead + Send>>,
}

impl AsyncRead for ObjectReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_read(cx, buf)
    }
}

impl std::fmt::Debug for ObjectReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObjectReader")
    }
}

/// A store of your own: bytes in, bytes out, by key. Register it with
/// [`register_store`]; its objects get URIs `wharf://<name>/<key>`.
/// Digests are computed and checked by wharf around it.
pub trait Store: Send + Sync + 'static {
    /// Stores everything `data` yields under `key`; `ttl`, when given, is
    /// how long the object should live.
    fn put<'a>(
        &'a self,
        key: &'a str,
        data: &'a mut (dyn AsyncRead + Send + Unpin),
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// The bytes stored under `key`; [`ErrorKind::ObjectNotFound`] when
    /// there are none.
    fn get<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Pin<Box<dyn AsyncRead + Send>>, Error>>;

    /// Removes `key`; succeeds when it is already gone.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), Error>>;
}

type Registry = Mutex<HashMap<String, Arc<dyn Store>>>;

fn registry() -> &'static Registry {
    static STORES: OnceLock<Registry> = OnceLock::new();
    STORES.get_or_init(Registry::default)
}

/// Registers `store` under `name` (one subject-safe word, not
/// `jetstream`) in this process, for URIs `wharf://<name>/<key>` and
/// [`Objects::store`]`("wharf://<name>")`. Every process that resolves
/// such URIs registers the same store.
pub fn register_store(name: &str, store: Arc<dyn Store>) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name != "jetstream"
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "`{name}` cannot name a store: use A-Z, a-z, 0-9, '_' and '-', and not `jetstream`"
            ),
        ));
    }
    registry().lock().unwrap().insert(name.to_owned(), store);
    Ok(())
}

pub(crate) fn custom(name: &str) -> Option<Arc<dyn Store>> {
    registry().lock().unwrap().get(name).cloned()
}

fn unknown_store(name: &str) -> Error {
    Error::new(
        ErrorKind::UnsupportedStore,
        format!("no store named `{name}` is registered in this process: register it with wharf::objects::register_store, or use `jetstream` or an object_store URL"),
    )
}

/// The default target: `WHARF_OBJECT_STORE`, or JetStream.
pub(crate) fn default_target() -> Result<Target, Error> {
    match &Settings::get()?.object_store {
        Some(spec) => Target::parse(spec),
        None => Ok(Target::JetStream),
    }
}

/// A fresh object key.
fn new_key() -> String {
    nuid::next().as_str().to_owned()
}

/// Stores bytes already in memory under a new key of `target`: URI, size
/// and digest.
pub(crate) async fn put_bytes(
    client: &Client,
    target: &Target,
    ttl: Option<Duration>,
    bytes: bytes::Bytes,
    ty: &str,
) -> Result<(String, u64, String), Error> {
    let size = bytes.len() as u64;
    match target {
        // Small values skip the stream machinery.
        Target::JetStream if bytes.len() <= jetstream::inline_limit(client) => {
            let (uri, digest) = jetstream::put_inline(client, &new_key(), &bytes, ttl).await?;
            Ok((uri, size, digest))
        }
        // Already in memory: written as it is, without a copy.
        Target::External(base) if ttl.is_none() => {
            let (uri, digest) = external::put_bytes(base, &new_key(), bytes).await?;
            Ok((uri, size, digest))
        }
        _ => put_reader(client, target, ttl, &mut &bytes[..], ty).await,
    }
}

/// Stores everything `reader` yields under a new key of `target`,
/// streaming: URI, size and digest.
pub(crate) async fn put_reader(
    client: &Client,
    target: &Target,
    ttl: Option<Duration>,
    reader: &mut (dyn AsyncRead + Send + Unpin),
    ty: &str,
) -> Result<(String, u64, String), Error> {
    let key = new_key();
    match target {
        Target::JetStream => jetstream::put_stream(client, &key, reader, ty, ttl).await,
        Target::External(base) => {
            if ttl.is_some() {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("`{base}` cannot expire objects by itself: put objects with a TTL into the JetStream store, or use the store's own lifecycle rules"),
                ));
            }
            external::put(base, &key, reader).await
        }
        Target::Custom(name) => {
            let store = custom(name).ok_or_else(|| unknown_store(name))?;
            let mut hashing = Hashing::new(reader, Algorithm::Xxh3);
            store.put(&key, &mut hashing, ttl).await?;
            let (size, digest) = hashing.finish();
            Ok((format!("wharf://{name}/{key}"), size, digest))
        }
    }
}

/// Stores a payload too large for one message in the JetStream store,
/// expiring after `ttl`: its URI and digest.
pub(crate) async fn put_spilled(
    client: &Client,
    bytes: bytes::Bytes,
    ttl: Duration,
) -> Result<(String, String), Error> {
    let ttl = ttl.max(Duration::from_secs(1));
    let (uri, _, digest) =
        put_bytes(client, &Target::JetStream, Some(ttl), bytes, BYTES_TYPE).await?;
    Ok((uri, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_their_store() {
        assert!(matches!(
            locate("wharf://jetstream/wharf_objects/abc"),
            Ok(Location::Inline("abc"))
        ));
        assert!(matches!(
            locate("wharf://jetstream/wharf_blobs/abc"),
            Ok(Location::Blob("abc"))
        ));
        assert_eq!(
            locate("wharf://jetstream/other/abc").err().unwrap().kind(),
            ErrorKind::UnsupportedStore
        );
        assert_eq!(
            locate("wharf://nosuchstore/abc").err().unwrap().kind(),
            ErrorKind::UnsupportedStore
        );
        assert_eq!(
            Target::parse("gopher://x").unwrap_err().kind(),
            ErrorKind::UnsupportedStore
        );
        assert!(matches!(Target::parse("jetstream"), Ok(Target::JetStream)));
        assert!(matches!(
            Target::parse("file:///tmp/objects"),
            Ok(Target::External(_))
        ));
    }
}
