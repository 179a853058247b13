//! Objects passed by reference: a value is stored once and a small
//! [`ObjectRef`] (a URI, the value's type, its size and digest) travels in
//! its place. Any process connected to the same NATS resolves it.
//!
//! Stores, chosen by URI or by `WHARF_OBJECT_STORE`:
//! - `jetstream` (the default): values up to [`INLINE_LIMIT`] in KV
//!   `wharf_objects`, larger ones in the Object Store `wharf_blobs`,
//!   chunked and streamed. URIs `wharf://jetstream/<bucket>/<key>`.
//! - any `object_store` URL: `file:///srv/objects`, `memory://` (this
//!   process only), `s3://bucket/prefix` with the `s3` feature. The URI is
//!   the object's URL.
//! - a [`Store`] of your own, registered under a name
//!   ([`register_store`]): URIs `wharf://<name>/<key>`.
//!
//! Every read checks the digest. Objects outlive the process that made
//! them; they end when deleted or when their TTL passes.

mod external;
pub(crate) mod jetstream;
pub mod service;

use crate::{Client, Error, ErrorKind};
use futures_util::future::BoxFuture;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

pub(crate) use jetstream::JsStores;
pub use jetstream::{BLOBS_BUCKET, OBJECTS_BUCKET};

/// Values up to this size are kept in KV `wharf_objects`; larger ones in
/// the Object Store `wharf_blobs`.
pub const INLINE_LIMIT: usize = 256 * 1024;

/// The longest TTL an object may be given (longer ones are cut to it).
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);

/// The type name of raw bytes: what [`Blob`] references carry.
pub const BYTES_TYPE: &str = "bytes";

/// Marks a reference to raw bytes, written from and read as a stream
/// ([`Objects::put_stream`], [`ObjectRef::reader`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blob;

/// A stored value of type `T`, by reference: serialize it into a call in
/// place of the value. Cheap to clone; `get` fetches the value.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct ObjectRef<T> {
    /// Where the object is: `wharf://jetstream/<bucket>/<key>`,
    /// `wharf://<store>/<key>` or an `object_store` URL.
    pub uri: String,
    /// The type it was stored as (`bytes` for a [`Blob`]).
    #[serde(rename = "type")]
    pub ty: String,
    /// Its size in bytes, as stored.
    pub size: u64,
    /// `SHA-256=<base64url>` of the stored bytes (the NATS Object Store's
    /// own form).
    pub digest: String,
    #[serde(skip)]
    kind: PhantomData<fn() -> T>,
}

impl<T> Clone for ObjectRef<T> {
    fn clone(&self) -> Self {
        ObjectRef {
            uri: self.uri.clone(),
            ty: self.ty.clone(),
            size: self.size,
            digest: self.digest.clone(),
            kind: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for ObjectRef<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectRef")
            .field("uri", &self.uri)
            .field("type", &self.ty)
            .field("size", &self.size)
            .field("digest", &self.digest)
            .finish()
    }
}

impl<T> PartialEq for ObjectRef<T> {
    fn eq(&self, other: &Self) -> bool {
        (&self.uri, &self.ty, self.size, &self.digest)
            == (&other.uri, &other.ty, other.size, &other.digest)
    }
}

/// The type name a value of `T` is stored under.
fn type_of<T: 'static>() -> &'static str {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<Blob>() {
        BYTES_TYPE
    } else {
        std::any::type_name::<T>()
    }
}

impl<T: 'static> ObjectRef<T> {
    /// The same reference read as another type; [`ObjectRef::get`] then
    /// checks the stored type.
    pub fn cast<U>(self) -> ObjectRef<U> {
        ObjectRef {
            uri: self.uri,
            ty: self.ty,
            size: self.size,
            digest: self.digest,
            kind: PhantomData,
        }
    }

    /// The stored bytes as a stream, through the client [`crate::init`]
    /// set up. The digest is checked as the stream ends: a mismatch is an
    /// `InvalidData` read error naming both digests.
    pub async fn reader(&self) -> Result<ObjectReader, Error> {
        self.reader_with(crate::client::global()?).await
    }

    /// [`ObjectRef::reader`] through `client`.
    pub async fn reader_with(&self, client: &Client) -> Result<ObjectReader, Error> {
        open(client, self.uri.as_str(), &self.digest).await
    }

    /// The stored bytes, whole, digest checked, through the client
    /// [`crate::init`] set up. For large objects prefer
    /// [`ObjectRef::reader`], which holds only a little at a time.
    pub async fn bytes(&self) -> Result<bytes::Bytes, Error> {
        self.bytes_with(crate::client::global()?).await
    }

    /// [`ObjectRef::bytes`] through `client`.
    pub async fn bytes_with(&self, client: &Client) -> Result<bytes::Bytes, Error> {
        fetch(client, &self.uri, &self.digest).await
    }

    /// Deletes the object. Deleting one that is already gone succeeds.
    pub async fn delete(&self) -> Result<(), Error> {
        self.delete_with(crate::client::global()?).await
    }

    /// [`ObjectRef::delete`] through `client`.
    pub async fn delete_with(&self, client: &Client) -> Result<(), Error> {
        delete(client, &self.uri).await
    }
}

impl<T: DeserializeOwned + 'static> ObjectRef<T> {
    /// Fetches and decodes the value, through the client [`crate::init`]
    /// set up.
    pub async fn get(&self) -> Result<T, Error> {
        self.get_with(crate::client::global()?).await
    }

    /// [`ObjectRef::get`] through `client`.
    pub async fn get_with(&self, client: &Client) -> Result<T, Error> {
        let expected = type_of::<T>();
        if self.ty != expected {
            return Err(Error::new(
                ErrorKind::ObjectTypeMismatch,
                format!(
                    "object `{}` was stored as `{}` and cannot be read as `{expected}`; read it with that type (or as a Blob for its bytes)",
                    self.uri, self.ty
                ),
            ));
        }
        let bytes = self.bytes_with(client).await?;
        postcard::from_bytes(&bytes).map_err(|e| {
            Error::new(
                ErrorKind::Codec,
                format!("object `{}` does not decode as `{expected}`: {e}", self.uri),
            )
        })
    }
}

/// A read error of an object stream as a wharf error (a digest mismatch
/// keeps its kind).
pub(crate) fn read_error(uri: &str, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::InvalidData {
        Error::new(ErrorKind::DigestMismatch, e.to_string())
    } else {
        Error::new(
            ErrorKind::StoreUnavailable,
            format!("reading object `{uri}` failed: {e}"),
        )
    }
}

/// Stores `value` in the default store (`WHARF_OBJECT_STORE`, or
/// JetStream) through the client [`crate::init`] set up.
///
/// ```no_run
/// # async fn run() -> Result<(), wharf::Error> {
/// let scores: Vec<u32> = (0..1_000_000).collect();
/// let stored = wharf::put(&scores).await?;
/// assert_eq!(stored.get().await?.len(), 1_000_000);
/// stored.delete().await?;
/// # Ok(()) }
/// ```
pub async fn put<T: Serialize + 'static>(value: &T) -> Result<ObjectRef<T>, Error> {
    Objects::new(crate::client::global()?)?.put(value).await
}

/// Where new objects go.
#[derive(Clone, Debug)]
enum Target {
    JetStream,
    /// An `object_store` URL to put objects under.
    External(String),
    /// A store registered under this name.
    Custom(String),
}

impl Target {
    fn parse(spec: &str) -> Result<Target, Error> {
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

/// Puts objects into one store, with an optional time to live.
#[derive(Clone, Debug)]
pub struct Objects {
    client: Client,
    target: Target,
    ttl: Option<Duration>,
}

impl Objects {
    /// Objects through `client`, into the store `WHARF_OBJECT_STORE`
    /// names (`jetstream` when unset).
    pub fn new(client: &Client) -> Result<Objects, Error> {
        let target = match &crate::settings::Settings::get()?.object_store {
            Some(spec) => Target::parse(spec)?,
            None => Target::JetStream,
        };
        Ok(Objects {
            client: client.clone(),
            target,
            ttl: None,
        })
    }

    /// Puts into `store` instead: `jetstream`, an `object_store` URL
    /// (`file:///srv/objects`, `memory://`, `s3://bucket/prefix`), or
    /// `wharf://<name>` of a registered [`Store`].
    pub fn store(mut self, store: &str) -> Result<Objects, Error> {
        self.target = Target::parse(store)?;
        Ok(self)
    }

    /// Objects put from now on expire `ttl` after they are written
    /// (whole seconds, at least one). Supported by the JetStream store and
    /// by custom stores that honour it.
    pub fn ttl(mut self, ttl: Duration) -> Objects {
        self.ttl = Some(ttl.clamp(Duration::from_secs(1), MAX_TTL));
        self
    }

    /// Stores `value` (postcard-encoded) and returns its reference.
    pub async fn put<T: Serialize + 'static>(&self, value: &T) -> Result<ObjectRef<T>, Error> {
        let bytes = postcard::to_allocvec(value).map_err(|e| {
            Error::new(
                ErrorKind::Codec,
                format!("cannot encode a `{}` to store it: {e}", type_of::<T>()),
            )
        })?;
        let stored = self.put_bytes_as(bytes.into(), type_of::<T>()).await?;
        Ok(stored.cast())
    }

    /// Stores bytes already in memory as a [`Blob`].
    pub async fn put_bytes(&self, bytes: bytes::Bytes) -> Result<ObjectRef<Blob>, Error> {
        self.put_bytes_as(bytes, BYTES_TYPE).await
    }

    async fn put_bytes_as(&self, bytes: bytes::Bytes, ty: &str) -> Result<ObjectRef<Blob>, Error> {
        match &self.target {
            // Small values skip the stream machinery.
            Target::JetStream if bytes.len() <= jetstream::inline_limit(&self.client) => {
                let (uri, digest) =
                    jetstream::put_inline(&self.client, &new_key(), &bytes, self.ttl).await?;
                Ok(reference(uri, ty, bytes.len() as u64, digest))
            }
            // Already in memory: written as it is, without a copy.
            Target::External(base) if self.ttl.is_none() => {
                let size = bytes.len() as u64;
                let (uri, digest) = external::put_bytes(base, &new_key(), bytes).await?;
                Ok(reference(uri, ty, size, digest))
            }
            _ => self.put_reader(&mut &bytes[..], ty).await,
        }
    }

    /// Stores everything `reader` yields as a [`Blob`], streaming: memory
    /// stays bounded whatever the size.
    pub async fn put_stream(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<ObjectRef<Blob>, Error> {
        self.put_reader(reader, BYTES_TYPE).await
    }

    async fn put_reader(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
        ty: &str,
    ) -> Result<ObjectRef<Blob>, Error> {
        let key = new_key();
        let (uri, size, digest) = match &self.target {
            Target::JetStream => {
                jetstream::put_stream(&self.client, &key, reader, ty, self.ttl).await?
            }
            Target::External(base) => {
                if self.ttl.is_some() {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!("`{base}` cannot expire objects by itself: put objects with a TTL into the JetStream store, or use the store's own lifecycle rules"),
                    ));
                }
                external::put(base, &key, reader).await?
            }
            Target::Custom(name) => {
                let store = custom(name).ok_or_else(|| unknown_store(name))?;
                let mut hashing = Hashing::new(reader, Algorithm::Xxh3);
                store.put(&key, &mut hashing, self.ttl).await?;
                let (size, digest) = hashing.finish();
                (format!("wharf://{name}/{key}"), size, digest)
            }
        };
        Ok(reference(uri, ty, size, digest))
    }
}

fn reference<T>(uri: String, ty: &str, size: u64, digest: String) -> ObjectRef<T> {
    ObjectRef {
        uri,
        ty: ty.to_owned(),
        size,
        digest,
        kind: PhantomData,
    }
}

/// A fresh object key.
fn new_key() -> String {
    nuid::next().as_str().to_owned()
}

/// Where a URI points.
enum Location<'a> {
    /// A value in KV `wharf_objects`.
    Inline(&'a str),
    /// An object in the Object Store `wharf_blobs`.
    Blob(&'a str),
    /// A registered store and a key in it.
    Custom(Arc<dyn Store>, &'a str),
    /// An `object_store` URL.
    External,
}

fn locate(uri: &str) -> Result<Location<'_>, Error> {
    if let Some(rest) = uri.strip_prefix("wharf://") {
        let (store, key) = rest.split_once('/').unwrap_or((rest, ""));
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

fn custom(name: &str) -> Option<Arc<dyn Store>> {
    registry().lock().unwrap().get(name).cloned()
}

fn unknown_store(name: &str) -> Error {
    Error::new(
        ErrorKind::UnsupportedStore,
        format!("no store named `{name}` is registered in this process: register it with wharf::objects::register_store, or use `jetstream` or an object_store URL"),
    )
}

// ---------------------------------------------------------------------------
// Digests

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
    fn of(digest: &str) -> Option<Algorithm> {
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

    #[test]
    fn references_serialize_as_plain_json() {
        let r: ObjectRef<Vec<u8>> = reference(
            "wharf://jetstream/wharf_objects/k".into(),
            "x",
            3,
            "d".into(),
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"uri": "wharf://jetstream/wharf_objects/k", "type": "x", "size": 3, "digest": "d"})
        );
        let back: ObjectRef<Vec<u8>> = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

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
