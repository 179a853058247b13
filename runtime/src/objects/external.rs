//! Objects in any `object_store` backend, addressed by URL: `file://`,
//! `memory://` and, with the `s3` feature, `s3://`.

use super::bytes::{Algorithm, Hashing, Pieces};
use crate::{Error, ErrorKind};
use bytes::Bytes;
use object_store::{
    path::Path, GetResultPayload, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart,
};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Objects this small are written in one request; larger ones in parts of
/// this size (S3's smallest part), so memory stays bounded.
const PART: usize = 5 << 20;

/// Objects are read in ranges of this size: one request for most, and a
/// bounded amount of memory for any.
const RANGE: u64 = 4 << 20;

/// One backend per scheme and host, so every URL of one `memory://`
/// store (which lives in this process only) reaches the same objects.
fn backends() -> &'static Mutex<HashMap<String, Arc<dyn ObjectStore>>> {
    static BACKENDS: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    BACKENDS.get_or_init(Default::default)
}

fn unsupported(url: &str, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::UnsupportedStore,
        format!("`{url}` is not a usable object store URL ({why}): use `jetstream`, `file:///<dir>`, `memory://`, `s3://<bucket>` (with wharf's `s3` feature) or `wharf://<registered store>`"),
    )
}

/// The backend and path a URL names.
fn resolve(url: &str) -> Result<(Arc<dyn ObjectStore>, Path), Error> {
    let parsed = url::Url::parse(url).map_err(|e| unsupported(url, e))?;
    let scheme = parsed.scheme().to_owned();
    let (key, path) = match scheme.as_str() {
        // `memory://a/b`: host and path together are the key.
        "memory" => {
            let whole = format!("{}{}", parsed.host_str().unwrap_or(""), parsed.path());
            let path =
                Path::from_url_path(whole.trim_matches('/')).map_err(|e| unsupported(url, e))?;
            ("memory".to_owned(), path)
        }
        "file" => {
            let path = Path::from_url_path(parsed.path()).map_err(|e| unsupported(url, e))?;
            ("file".to_owned(), path)
        }
        _ => {
            let (_, path) = object_store::parse_url(&parsed).map_err(|e| unsupported(url, e))?;
            (
                format!("{scheme}://{}", parsed.host_str().unwrap_or("")),
                path,
            )
        }
    };
    let mut backends = backends().lock().unwrap();
    if let Some(store) = backends.get(&key) {
        return Ok((store.clone(), path));
    }
    let store: Arc<dyn ObjectStore> = match scheme.as_str() {
        "memory" => Arc::new(object_store::memory::InMemory::new()),
        "file" => Arc::new(object_store::local::LocalFileSystem::new()),
        _ => Arc::from(
            object_store::parse_url(&parsed)
                .map_err(|e| unsupported(url, e))?
                .0,
        ),
    };
    backends.insert(key, store.clone());
    Ok((store, path))
}

/// Checks that objects can be put under `base`.
pub(super) fn check_base(base: &str) -> Result<(), Error> {
    resolve(&join(base, "probe")).map(|_| ())
}

fn join(base: &str, key: &str) -> String {
    if base.ends_with('/') {
        format!("{base}{key}")
    } else {
        format!("{base}/{key}")
    }
}

fn failed(url: &str, what: &str, e: object_store::Error) -> Error {
    match e {
        object_store::Error::NotFound { .. } => Error::new(
            ErrorKind::ObjectNotFound,
            format!("object `{url}` not found: it was never stored, or was deleted"),
        ),
        e => Error::new(
            ErrorKind::StoreUnavailable,
            format!("cannot {what} object `{url}`: {e}"),
        )
        .with_source(e),
    }
}

/// Stores what `reader` yields under `<base>/<key>`; returns the URL, size
/// and digest.
pub(super) async fn put(
    base: &str,
    key: &str,
    reader: &mut (dyn AsyncRead + Send + Unpin),
) -> Result<(String, u64, String), Error> {
    let url = join(base, key);
    let (store, path) = resolve(&url)?;
    let mut hashing = Hashing::new(reader, Algorithm::Xxh3);
    let mut part = Vec::with_capacity(64 * 1024);
    (&mut hashing)
        .take(PART as u64)
        .read_to_end(&mut part)
        .await
        .map_err(|e| read_failed(&url, e))?;
    if part.len() < PART {
        store
            .put(&path, PutPayload::from(Bytes::from(part)))
            .await
            .map_err(|e| failed(&url, "write", e))?;
    } else {
        let upload = store
            .put_multipart(&path)
            .await
            .map_err(|e| failed(&url, "write", e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        writer.write(&part);
        let mut buffer = vec![0; 1 << 20];
        loop {
            let n = hashing
                .read(&mut buffer)
                .await
                .map_err(|e| read_failed(&url, e))?;
            if n == 0 {
                break;
            }
            // At most two parts in flight: memory stays bounded.
            writer
                .wait_for_capacity(2)
                .await
                .map_err(|e| failed(&url, "write", e))?;
            writer.write(&buffer[..n]);
        }
        writer
            .finish()
            .await
            .map_err(|e| failed(&url, "write", e))?;
    }
    let (size, digest) = hashing.finish();
    Ok((url, size, digest))
}

/// Stores bytes already in memory under `<base>/<key>`, without a copy;
/// returns the URL and digest.
pub(super) async fn put_bytes(
    base: &str,
    key: &str,
    bytes: Bytes,
) -> Result<(String, String), Error> {
    let url = join(base, key);
    let (store, path) = resolve(&url)?;
    let digest = Algorithm::Xxh3.digest(&bytes);
    store
        .put(&path, PutPayload::from(bytes))
        .await
        .map_err(|e| failed(&url, "write", e))?;
    Ok((url, digest))
}

fn read_failed(url: &str, e: std::io::Error) -> Error {
    Error::new(
        ErrorKind::Other,
        format!("reading the data for object `{url}` failed: {e}"),
    )
    .with_source(e)
}

/// The object at `url` in one piece when it fits one range, else `None`
/// (read it as a stream), with its digest by `algorithm`.
pub(super) async fn get_whole(
    url: &str,
    algorithm: Algorithm,
) -> Result<Option<(Bytes, String)>, Error> {
    let (store, path) = resolve(url)?;
    let result = store.get(&path).await.map_err(|e| failed(url, "read", e))?;
    if result.meta.size > RANGE {
        return Ok(None);
    }
    match result.payload {
        GetResultPayload::File(mut file, _) => {
            let range = result.range;
            // Hashed on the thread that read it, while the bytes are still
            // in that core's cache: a hop to another thread first costs the
            // digest a trip through memory.
            let whole = tokio::task::spawn_blocking(move || {
                use std::io::{Read, Seek, SeekFrom};
                file.seek(SeekFrom::Start(range.start))?;
                let len = range.end - range.start;
                let mut buffer = Vec::with_capacity(len as usize);
                file.take(len).read_to_end(&mut buffer)?;
                if buffer.len() as u64 != len {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the file ended after {} of {len} bytes", buffer.len()),
                    ));
                }
                let digest = algorithm.digest(&buffer);
                Ok((Bytes::from(buffer), digest))
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|read| read)
            .map_err(|e| {
                Error::new(
                    ErrorKind::StoreUnavailable,
                    format!("cannot read object `{url}`: {e}"),
                )
                .with_source(e)
            })?;
            Ok(Some(whole))
        }
        GetResultPayload::Stream(_) => {
            let bytes = result.bytes().await.map_err(|e| failed(url, "read", e))?;
            let digest = algorithm.digest(&bytes);
            Ok(Some((bytes, digest)))
        }
    }
}

/// The object at `url`, as a stream.
pub(super) async fn get(url: &str) -> Result<Pin<Box<dyn AsyncRead + Send>>, Error> {
    let (store, path) = resolve(url)?;
    let result = store.get(&path).await.map_err(|e| failed(url, "read", e))?;
    let size = result.meta.size;
    if size <= RANGE {
        let bytes = result.bytes().await.map_err(|e| failed(url, "read", e))?;
        return Ok(Box::pin(std::io::Cursor::new(bytes)));
    }
    // Larger: range by range (a backend's own stream may come in small
    // pieces, each a request or a blocking read).
    drop(result);
    let mut offset = 0;
    Ok(Box::pin(Pieces::new(move || {
        if offset >= size {
            return None;
        }
        let range = offset..(offset + RANGE).min(size);
        offset = range.end;
        let (store, path) = (store.clone(), path.clone());
        Some(Box::pin(async move {
            store
                .get_range(&path, range)
                .await
                .map_err(std::io::Error::other)
        }))
    })))
}

/// Deletes the object at `url`; one already gone is not an error.
pub(super) async fn delete(url: &str) -> Result<(), Error> {
    let (store, path) = resolve(url)?;
    match store.delete(&path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(failed(url, "delete", e)),
    }
}
