//! Transaction leases: one record per open transaction in KV `wharf_txn`,
//! written with a compare-and-set and a per-key TTL, JSON so any client can
//! read it; and the errors a transaction's calls can meet.

use crate::error::{Error, ErrorKind};
use crate::settings::{Settings, DEFAULT_LEASE};
use crate::spec::FnSpec;
use crate::wire::subjects::{self, TXN_BUCKET};
use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A lease record in `wharf_txn`, JSON so any client can read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Lease {
    /// The service whose instance owns the transaction, once claimed.
    #[serde(default)]
    pub(crate) service: Option<String>,
    /// The owning instance, once claimed.
    #[serde(default)]
    pub(crate) owner: Option<String>,
    /// Lease length in seconds: the transaction expires this long after
    /// its last use.
    pub(crate) lease_s: u64,
}

pub(crate) fn malformed(id: &str) -> Error {
    Error::new(
        ErrorKind::BadRequest,
        format!("`{id}` is not a well-formed transaction id: use 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-' (wharf::transaction() makes one)"),
    )
}

pub(crate) fn unknown(id: &str) -> Error {
    Error::new(
        ErrorKind::UnknownTransaction,
        format!("transaction `{id}` is unknown or has expired (a transaction lives until `end()` or one lease length after its last call); open a new one with wharf::transaction()"),
    )
}

pub(crate) fn lost(id: &str, owner: &str) -> Error {
    Error::new(
        ErrorKind::TransactionLost,
        format!("transaction `{id}` is lost: instance `{owner}`, which owned it and held its state, is gone; open a new transaction"),
    )
}

/// The lease bucket, found or created with per-key TTLs.
pub(crate) async fn txn_bucket(js: &jetstream::Context) -> Result<kv::Store, Error> {
    crate::storage::key_value(
        js,
        kv::Config {
            bucket: TXN_BUCKET.to_owned(),
            description: "wharf: transaction leases (id -> owning instance)".to_owned(),
            history: 1,
            // Per-key TTLs: every write sets its lease's length.
            limit_markers: Some(Duration::from_secs(1)),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| {
        let message = format!(
            "{}; stateful services keep their leases in JetStream (nats-server -js, version 2.11 or later)",
            e.message()
        );
        e.with_message(message)
    })
}

/// Writes `lease` under `id`, expiring `lease.lease_s` after this write:
/// a create when `revision` is 0, else a compare-and-set on `revision`.
/// Returns the new revision; `Ok(None)` when the record changed meanwhile.
pub(crate) async fn write_lease(
    js: &jetstream::Context,
    id: &str,
    lease: &Lease,
    revision: u64,
) -> Result<Option<u64>, Error> {
    use async_nats::header::{NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_TTL};
    // `kv::Store` has no compare-and-set with a TTL, so publish the KV
    // write ourselves: the same subject and headers it would send.
    let mut headers = HeaderMap::new();
    headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, revision.to_string());
    headers.insert(NATS_MESSAGE_TTL, format!("{}s", lease.lease_s.max(1)));
    let body = serde_json::to_vec(lease).expect("a lease always encodes");
    let ack = js
        .publish_with_headers(subjects::kv_key(TXN_BUCKET, id), headers, body.into())
        .await
        .map_err(|e| kv_error("write", id, e))?
        .await;
    match ack {
        Ok(ack) => Ok(Some(ack.sequence)),
        Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => Ok(None),
        Err(e) => Err(kv_error("write", id, e)),
    }
}

/// The lease of `id` and its revision; `None` when there is none.
pub(crate) async fn read_lease(store: &kv::Store, id: &str) -> Result<Option<(Lease, u64)>, Error> {
    let entry = store.entry(id).await.map_err(|e| kv_error("read", id, e))?;
    let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
        return Ok(None);
    };
    let lease = serde_json::from_slice(&entry.value).map_err(|e| {
        Error::new(
            ErrorKind::Codec,
            format!("the lease of transaction `{id}` in `{TXN_BUCKET}` is not valid JSON: {e}"),
        )
        .with_source(e)
    })?;
    Ok(Some((lease, entry.revision)))
}

pub(crate) fn kv_error(
    what: &str,
    id: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::new(
        ErrorKind::Connection,
        format!("cannot {what} the lease of transaction `{id}` in `{TXN_BUCKET}`: {e}"),
    )
    .with_source(e)
}

/// The lease length of new transactions: `WHARF_TXN_LEASE` seconds, or
/// [`DEFAULT_LEASE`].
pub(crate) fn default_lease() -> Duration {
    Settings::get().map_or(DEFAULT_LEASE, |s| s.txn_lease)
}

/// The error for a stateful function called with no transaction.
pub(crate) fn outside(spec: &FnSpec) -> Error {
    Error::new(
        ErrorKind::BadRequest,
        format!(
            "`{}.{}` ({}) is stateful and must be called inside a transaction: `let tx = wharf::transaction().await?;` then `tx.run(async {{ .. }})` or `{}::request(..).transaction(&tx)` (foreign clients: header Wharf-Txn)",
            spec.service, spec.name, spec.path, spec.name
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_json_is_readable_by_any_client() {
        let lease = Lease {
            service: Some("limiter".into()),
            owner: Some("limiter-abc".into()),
            lease_s: 30,
        };
        let text = serde_json::to_string(&lease).unwrap();
        assert_eq!(
            text,
            r#"{"service":"limiter","owner":"limiter-abc","lease_s":30}"#
        );
        let open: Lease = serde_json::from_str(r#"{"lease_s":5}"#).unwrap();
        assert_eq!(open.owner, None);
    }
}
