//! The JetStream side of durable calls that callers and workers share:
//! the work-queue stream of each service, its consumers, the dead-letter
//! stream, the results bucket, and the settings they are made with.

use crate::error::{Error, ErrorKind};
use crate::settings::{Settings, DEFAULT_ACK_WAIT, DEFAULT_MAX_DELIVER};
use crate::spec::FnSpec;
use crate::wire::subjects;
use async_nats::jetstream::{self, consumer::pull, kv, stream};
use std::time::Duration;

/// A consumer's ack wait (`WHARF_ACK_WAIT`).
pub(crate) fn ack_wait() -> Duration {
    Settings::get().map_or(DEFAULT_ACK_WAIT, |s| s.ack_wait)
}

/// Deliveries before a call is dead-lettered (`WHARF_MAX_DELIVER`).
pub(crate) fn max_deliver() -> i64 {
    Settings::get().map_or(DEFAULT_MAX_DELIVER, |s| s.max_deliver)
}

/// Creates (or finds) `service`'s results bucket.
pub(crate) async fn results_bucket(
    js: &jetstream::Context,
    service: &str,
) -> Result<kv::Store, Error> {
    let ttl = Settings::get()?.results_ttl;
    crate::storage::bucket(
        js,
        &subjects::results_bucket(service),
        "wharf: durable call results and idempotency records",
        ttl,
        stream::StorageType::File,
    )
    .await
}

/// Creates (or finds) the work-queue stream of `service`.
pub(crate) async fn calls_stream(
    js: &jetstream::Context,
    prefix: &str,
    service: &str,
) -> Result<stream::Stream, Error> {
    let name = subjects::calls_stream(prefix, service);
    crate::storage::stream(
        js,
        stream::Config {
            name: name.clone(),
            description: Some(format!("wharf: durable calls of service {service}")),
            subjects: vec![subjects::durable_calls(prefix, service)],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            // A caller that re-publishes after a lost ack stores its call once.
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        },
    )
    .await
}

/// Creates (or finds) the dead-letter stream.
pub(crate) async fn dead_letters(js: &jetstream::Context, prefix: &str) -> Result<(), Error> {
    let name = subjects::dead_letter_stream(prefix);
    crate::storage::stream(
        js,
        stream::Config {
            name,
            description: Some("wharf: durable calls given up on".to_owned()),
            subjects: vec![subjects::dead_letters(prefix)],
            storage: stream::StorageType::File,
            ..Default::default()
        },
    )
    .await
    .map(|_| ())
}

/// Creates (or finds) the pull consumer through which workers take
/// `spec`'s durable calls, or with `batched` its batches of durable calls.
pub(crate) async fn consumer(
    stream: &stream::Stream,
    prefix: &str,
    spec: &FnSpec,
    batched: bool,
) -> Result<jetstream::consumer::Consumer<pull::Config>, Error> {
    let (name, filter_subject) = if batched {
        (
            subjects::durable_batch_consumer(spec.name),
            subjects::durable_batch_call(prefix, spec.service, spec.name),
        )
    } else {
        (
            subjects::durable_consumer(spec.name),
            subjects::durable_call(prefix, spec.service, spec.name),
        )
    };
    stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                description: Some(format!("wharf: workers of {}.{}", spec.service, spec.name)),
                filter_subject,
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: ack_wait(),
                // Workers count deliveries themselves, so the last one is
                // dead-lettered by a worker rather than dropped by the server.
                max_deliver: -1,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| {
            jetstream_error(format!(
                "cannot create the consumer of `{}.{}`: {e}",
                spec.service, spec.name
            ))
            .with_source(e)
        })
}

pub(crate) fn jetstream_error(message: String) -> Error {
    Error::new(
        ErrorKind::Connection,
        format!("{message}; durable calls need JetStream (nats-server -js)"),
    )
}
