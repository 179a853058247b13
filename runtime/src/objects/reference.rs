//! Objects by reference, as callers use them: [`ObjectRef`], [`put`], and
//! [`Objects`] to choose the store and a time to live.

use super::bytes::BYTES_TYPE;
use super::store::{self, ObjectReader, Target};
use crate::client::{global, Client};
use crate::error::{Error, ErrorKind};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::marker::PhantomData;
use std::time::Duration;
use tokio::io::AsyncRead;

/// The longest TTL an object may be given (longer ones are cut to it).
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);

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
        self.reader_with(global()?).await
    }

    /// [`ObjectRef::reader`] through `client`.
    pub async fn reader_with(&self, client: &Client) -> Result<ObjectReader, Error> {
        store::open(client, self.uri.as_str(), &self.digest).await
    }

    /// The stored bytes, whole, digest checked, through the client
    /// [`crate::init`] set up. For large objects prefer
    /// [`ObjectRef::reader`], which holds only a little at a time.
    pub async fn bytes(&self) -> Result<bytes::Bytes, Error> {
        self.bytes_with(global()?).await
    }

    /// [`ObjectRef::bytes`] through `client`.
    pub async fn bytes_with(&self, client: &Client) -> Result<bytes::Bytes, Error> {
        store::fetch(client, &self.uri, &self.digest).await
    }

    /// Deletes the object. Deleting one that is already gone succeeds.
    pub async fn delete(&self) -> Result<(), Error> {
        self.delete_with(global()?).await
    }

    /// [`ObjectRef::delete`] through `client`.
    pub async fn delete_with(&self, client: &Client) -> Result<(), Error> {
        store::delete(client, &self.uri).await
    }
}

impl<T: DeserializeOwned + 'static> ObjectRef<T> {
    /// Fetches and decodes the value, through the client [`crate::init`]
    /// set up.
    pub async fn get(&self) -> Result<T, Error> {
        self.get_with(global()?).await
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
            .with_source(e)
        })
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
    Objects::new(global()?)?.put(value).await
}

/// Puts objects into one store, with an optional time to live.
#[derive(Clone, Debug)]
pub struct Objects {
    pub(crate) client: Client,
    pub(crate) target: Target,
    ttl: Option<Duration>,
}

impl Objects {
    /// Objects through `client`, into the store `WHARF_OBJECT_STORE`
    /// names (`jetstream` when unset).
    pub fn new(client: &Client) -> Result<Objects, Error> {
        let target = store::default_target()?;
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
            .with_source(e)
        })?;
        let stored = self.put_bytes_as(bytes.into(), type_of::<T>()).await?;
        Ok(stored.cast())
    }

    /// Stores bytes already in memory as a [`Blob`].
    pub async fn put_bytes(&self, bytes: bytes::Bytes) -> Result<ObjectRef<Blob>, Error> {
        self.put_bytes_as(bytes, BYTES_TYPE).await
    }

    pub(crate) async fn put_bytes_as(
        &self,
        bytes: bytes::Bytes,
        ty: &str,
    ) -> Result<ObjectRef<Blob>, Error> {
        let (uri, size, digest) =
            store::put_bytes(&self.client, &self.target, self.ttl, bytes, ty).await?;
        Ok(reference(uri, ty, size, digest))
    }

    /// Stores everything `reader` yields as a [`Blob`], streaming: memory
    /// stays bounded whatever the size.
    pub async fn put_stream(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<ObjectRef<Blob>, Error> {
        self.put_reader(reader, BYTES_TYPE).await
    }

    pub(crate) async fn put_reader(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
        ty: &str,
    ) -> Result<ObjectRef<Blob>, Error> {
        let (uri, size, digest) =
            store::put_reader(&self.client, &self.target, self.ttl, reader, ty).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
