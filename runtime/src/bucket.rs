//! The KV buckets wharf keeps its state in, found or created on first use
//! ("create buckets idempotently; never assume they exist").

use crate::{Error, ErrorKind};
use async_nats::jetstream::{self, kv, stream::StorageType};
use std::time::Duration;

/// Finds bucket `name`, or creates it with one value per key, entries
/// expiring after `max_age` (zero: never), in `storage`.
pub(crate) async fn bucket(
    js: &jetstream::Context,
    name: &str,
    description: &str,
    max_age: Duration,
    storage: StorageType,
) -> Result<kv::Store, Error> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: name.to_owned(),
        description: description.to_owned(),
        history: 1,
        max_age,
        storage,
        ..Default::default()
    })
    .await
    .map_err(|e| {
        Error::new(
            ErrorKind::Connection,
            format!("cannot create KV bucket `{name}`: {e}; wharf keeps its state in JetStream (nats-server -js)"),
        )
.with_source(e)
    })
}
