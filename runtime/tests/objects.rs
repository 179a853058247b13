//! Objects by reference against a real nats-server: round trips through
//! every store, TTL and delete, and a distinct error for each bad input.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use wharf::objects::{register_store, Objects, Store};
use wharf::testing::{eventually, NatsServer, Pattern, TempDir};
use wharf::{Blob, Client, Error, ErrorKind, ObjectRef};

async fn setup() -> (NatsServer, Client) {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    (server, client)
}

async fn read_all(reference: &ObjectRef<Blob>, client: &Client) -> Vec<u8> {
    let mut out = Vec::new();
    reference
        .reader_with(client)
        .await
        .unwrap()
        .read_to_end(&mut out)
        .await
        .unwrap();
    out
}

fn expected(len: u64) -> Vec<u8> {
    Pattern::bytes(len)
}

#[tokio::test]
async fn jetstream_round_trips_small_large_and_streamed() {
    let (_server, client) = setup().await;
    let objects = Objects::new(&client).unwrap();

    let small = vec![7u32; 100];
    let stored = objects.put(&small).await.unwrap();
    assert!(
        stored.uri.starts_with("wharf://jetstream/wharf_objects/"),
        "{}",
        stored.uri
    );
    assert_eq!(stored.get_with(&client).await.unwrap(), small);

    let large: Vec<u64> = (0..200_000).collect();
    let stored = objects.put(&large).await.unwrap();
    assert!(
        stored.uri.starts_with("wharf://jetstream/wharf_blobs/"),
        "{}",
        stored.uri
    );
    assert_eq!(stored.get_with(&client).await.unwrap(), large);

    let len = 20 << 20;
    let blob = objects.put_stream(&mut Pattern::new(len)).await.unwrap();
    assert_eq!(blob.size, len);
    assert_eq!(read_all(&blob, &client).await, expected(len));

    // A reference travels as a value and resolves through another client.
    let other = Client::connect(client.url()).await.unwrap();
    let sent: ObjectRef<Vec<u64>> =
        postcard::from_bytes(&postcard::to_allocvec(&stored).unwrap()).unwrap();
    assert_eq!(sent.get_with(&other).await.unwrap(), large);

    for uri in [stored.uri.clone(), blob.uri.clone()] {
        let gone: ObjectRef<Blob> = serde_json::from_value(
            serde_json::json!({"uri": uri, "type": "bytes", "size": 0, "digest": ""}),
        )
        .unwrap();
        gone.delete_with(&client).await.unwrap();
        let error = gone.reader_with(&client).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ObjectNotFound, "{error}");
        assert!(error.message().contains(&uri), "{error}");
    }
}

#[tokio::test]
async fn objects_with_a_ttl_expire() {
    let (_server, client) = setup().await;
    let objects = Objects::new(&client).unwrap().ttl(Duration::from_secs(1));
    let small = objects.put(&"short-lived".to_owned()).await.unwrap();
    let large = objects
        .put_stream(&mut Pattern::new(1 << 20))
        .await
        .unwrap();
    assert_eq!(small.get_with(&client).await.unwrap(), "short-lived");
    eventually(
        "both objects to expire",
        Duration::from_secs(30),
        || async {
            let small = small.get_with(&client).await.map(|_| ());
            let large = large.reader_with(&client).await.map(|_| ());
            match (&small, &large) {
                (Err(a), Err(b))
                    if a.kind() == ErrorKind::ObjectNotFound
                        && b.kind() == ErrorKind::ObjectNotFound =>
                {
                    Ok(())
                }
                _ => Err(format!("small: {small:?}; large: {large:?}")),
            }
        },
    )
    .await;
}

#[tokio::test]
async fn file_and_memory_stores_round_trip() {
    let (_server, client) = setup().await;
    let dir = TempDir::new("objects");
    for store in [
        format!("file://{}", dir.path().display()),
        "memory://".to_owned(),
    ] {
        let objects = Objects::new(&client).unwrap().store(&store).unwrap();
        let value: HashMap<String, u32> = [("a".to_owned(), 1), ("b".to_owned(), 2)].into();
        let stored = objects.put(&value).await.unwrap();
        assert!(
            stored.uri.starts_with(store.trim_end_matches('/')),
            "{}",
            stored.uri
        );
        assert_eq!(stored.get_with(&client).await.unwrap(), value);
        // Larger than one part: written in parts, read as a stream.
        let len = 12 << 20;
        let blob = objects.put_stream(&mut Pattern::new(len)).await.unwrap();
        assert_eq!(read_all(&blob, &client).await, expected(len));
        blob.delete_with(&client).await.unwrap();
        assert_eq!(
            blob.reader_with(&client).await.unwrap_err().kind(),
            ErrorKind::ObjectNotFound
        );
    }
}

/// A store of our own: a map in memory.
#[derive(Default)]
struct MapStore(Mutex<HashMap<String, Vec<u8>>>);

impl Store for MapStore {
    fn put<'a>(
        &'a self,
        key: &'a str,
        data: &'a mut (dyn AsyncRead + Send + Unpin),
        _ttl: Option<Duration>,
    ) -> futures_util::future::BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let mut bytes = Vec::new();
            data.read_to_end(&mut bytes)
                .await
                .map_err(|e| Error::new(ErrorKind::Other, e.to_string()))?;
            self.0.lock().unwrap().insert(key.to_owned(), bytes);
            Ok(())
        })
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<Pin<Box<dyn AsyncRead + Send>>, Error>> {
        Box::pin(async move {
            let bytes = self.0.lock().unwrap().get(key).cloned().ok_or_else(|| {
                Error::new(ErrorKind::ObjectNotFound, format!("no `{key}` in the map"))
            })?;
            Ok(Box::pin(std::io::Cursor::new(bytes)) as Pin<Box<dyn AsyncRead + Send>>)
        })
    }

    fn delete<'a>(
        &'a self,
        key: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.0.lock().unwrap().remove(key);
            Ok(())
        })
    }
}

#[tokio::test]
async fn a_custom_store_round_trips() {
    let (_server, client) = setup().await;
    let map = Arc::new(MapStore::default());
    register_store("map", map.clone()).unwrap();
    let objects = Objects::new(&client).unwrap().store("wharf://map").unwrap();
    let stored = objects.put(&(1u8, "two".to_owned())).await.unwrap();
    assert!(stored.uri.starts_with("wharf://map/"), "{}", stored.uri);
    assert_eq!(
        stored.get_with(&client).await.unwrap(),
        (1, "two".to_owned())
    );
    // The digest is checked around the store: a changed value is caught.
    let key = stored.uri.trim_start_matches("wharf://map/").to_owned();
    map.0
        .lock()
        .unwrap()
        .insert(key, vec![1, 3, b't', b'w', b'x']);
    let error = stored.get_with(&client).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::DigestMismatch, "{error}");
    assert!(register_store("jetstream", map).is_err());
}

#[tokio::test]
async fn bad_references_get_distinct_errors() {
    let (_server, client) = setup().await;
    let objects = Objects::new(&client).unwrap();
    let stored = objects.put(&vec![1u8, 2, 3]).await.unwrap();

    // Read as another type.
    let error = stored
        .clone()
        .cast::<String>()
        .get_with(&client)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::ObjectTypeMismatch, "{error}");
    assert!(error.message().contains("alloc::vec::Vec<u8>"), "{error}");

    // Changed behind the reference's back.
    let key = stored.uri.rsplit('/').next().unwrap();
    let js = async_nats::jetstream::new(client.nats().clone());
    let kv = js.get_key_value("wharf_objects").await.unwrap();
    kv.put(key, postcard::to_allocvec(&vec![9u8, 9, 9]).unwrap().into())
        .await
        .unwrap();
    let error = stored.get_with(&client).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::DigestMismatch, "{error}");
    assert!(error.message().contains(&stored.uri), "{error}");

    // Missing.
    let missing: ObjectRef<Vec<u8>> = serde_json::from_value(serde_json::json!({
        "uri": "wharf://jetstream/wharf_objects/nothing-here", "type": "alloc::vec::Vec<u8>",
        "size": 3, "digest": stored.digest,
    }))
    .unwrap();
    let error = missing.get_with(&client).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::ObjectNotFound);
    assert!(error.message().contains("nothing-here"), "{error}");

    // An unknown scheme, an unknown store.
    for (store, kind) in [
        ("gopher://host/x", ErrorKind::UnsupportedStore),
        ("wharf://nosuchstore", ErrorKind::UnsupportedStore),
    ] {
        let error = Objects::new(&client).unwrap().store(store).unwrap_err();
        assert_eq!(error.kind(), kind, "{error}");
        assert!(
            error
                .message()
                .contains(store.trim_start_matches("wharf://")),
            "{error}"
        );
    }
    let odd: ObjectRef<u8> = serde_json::from_value(serde_json::json!({
        "uri": "gopher://host/x", "type": "u8", "size": 1, "digest": "",
    }))
    .unwrap();
    assert_eq!(
        odd.get_with(&client).await.unwrap_err().kind(),
        ErrorKind::UnsupportedStore
    );

    // A store that cannot be written.
    let error = Objects::new(&client)
        .unwrap()
        .store("file:///proc/wharf-cannot-write-here")
        .unwrap()
        .put(&1u8)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::StoreUnavailable, "{error}");

    // A server without JetStream has no default store.
    let plain = NatsServer::start_without_jetstream("").unwrap();
    let plain_client = Client::connect(&plain.url()).await.unwrap();
    let error = Objects::new(&plain_client)
        .unwrap()
        .put(&1u8)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::StoreUnavailable, "{error}");
    assert!(error.message().contains("JetStream"), "{error}");
}

#[tokio::test]
async fn hostile_object_requests_get_400_and_the_service_keeps_serving() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _service = wharf::objects::service::serve(&client).await.unwrap();
    let nats = client.nats();
    let get = |uri: String| {
        let body = serde_json::json!({ "uri": uri }).to_string();
        async move {
            let request = async_nats::Request::new()
                .payload(body.into())
                .timeout(Some(std::time::Duration::from_secs(10)));
            nats.send_request("wharf.objects.get", request)
                .await
                .expect("every request is answered")
        }
    };
    let long = format!("wharf://jetstream/wharf_objects/{}", "k".repeat(5_000));
    for uri in [
        long,
        "wharf://jetstream/wharf_objects/../x".to_owned(),
        "wharf://jetstream/wharf_objects/a b".to_owned(),
    ] {
        let reply = get(uri.clone()).await;
        let headers = reply.headers.expect("an error reply");
        assert_eq!(
            headers.get("Nats-Service-Error-Code").map(|v| v.as_str()),
            Some("400"),
            "{uri:.80}"
        );
        let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(body["kind"], "bad_request", "{body}");
        assert!(body["message"].as_str().unwrap().len() < 400, "{body}");
    }
    // Still connected, still serving.
    let stored = wharf::objects::Objects::new(&client)
        .unwrap()
        .put_bytes(bytes::Bytes::from_static(b"still here"))
        .await
        .unwrap();
    let reply = get(stored.uri.clone()).await;
    assert!(reply
        .headers
        .is_none_or(|h| h.get("Nats-Service-Error-Code").is_none()));
    assert_eq!(&reply.payload[..], b"still here");
}
