//! The caller's side of transactions: opening one, running calls in it,
//! ending it.

use super::lease::{
    default_lease, kv_error, malformed, read_lease, txn_bucket, write_lease, Lease,
};
use super::route::TxnRoute;
use crate::client::Client;
use crate::error::{Error, ErrorKind};
use crate::wire::subjects::{self, valid_txn_id};
use async_nats::jetstream::kv;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// `wharf_txn` as one connection's extension.
pub(crate) struct LeaseStore(kv::Store);

/// An open transaction: calls to `#[microservice(stateful)]` functions made
/// in it are all served by one instance, which keeps the transaction's
/// state. Cheap to clone; clones are the same transaction.
///
/// ```no_run
/// #[wharf::microservice(stateful)]
/// async fn count(by: u64, total: wharf::State<u64>) -> u64 {
///     let mut total = total;
///     *total += by;
///     *total
/// }
/// # fn main() {}
/// # async fn run() -> Result<(), wharf::Error> {
/// let tx = wharf::transaction().await?;
/// tx.run(async {
///     count(2).await?;
///     assert_eq!(count(3).await?, 5);
///     Ok::<_, wharf::Error>(())
/// })
/// .await?;
/// tx.end().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Transaction {
    route: Arc<TxnRoute>,
    client: Client,
}

tokio::task_local! {
    static CURRENT: Transaction;
}

/// Opens a transaction through the client [`crate::init`] set up.
pub async fn transaction() -> Result<Transaction, Error> {
    crate::client::global()?.transaction().await
}

impl Client {
    /// Opens a transaction whose lease lasts `WHARF_TXN_LEASE` seconds
    /// (default 30) after its last call.
    pub async fn transaction(&self) -> Result<Transaction, Error> {
        self.transaction_with_lease(default_lease()).await
    }

    /// Opens a transaction whose lease lasts `lease` (whole seconds, at
    /// least one) after its last call.
    pub async fn transaction_with_lease(&self, lease: Duration) -> Result<Transaction, Error> {
        // The bucket must exist before its subject takes writes.
        self.txn_store().await?;
        let id = nuid::next().as_str().to_owned();
        let record = Lease {
            service: None,
            owner: None,
            lease_s: lease.as_secs().max(1),
        };
        let js = async_nats::jetstream::new(self.nats().clone());
        match write_lease(&js, &id, &record, 0).await? {
            Some(_) => Ok(Transaction::join(self, &id)?),
            None => Err(Error::new(
                ErrorKind::Other,
                format!("transaction id `{id}` is already taken"),
            )),
        }
    }

    /// `wharf_txn`, found once per connection.
    pub(crate) async fn txn_store(&self) -> Result<Arc<LeaseStore>, Error> {
        self.extension(|| async {
            let js = async_nats::jetstream::new(self.nats().clone());
            Ok(LeaseStore(txn_bucket(&js).await?))
        })
        .await
    }
}

impl Transaction {
    /// A handle on the existing transaction `id`, opened elsewhere (in
    /// another process, say). Its calls find the owner through the queue
    /// group, as the first call of any transaction does.
    pub fn join(client: &Client, id: &str) -> Result<Transaction, Error> {
        if !valid_txn_id(id) {
            return Err(malformed(id));
        }
        Ok(Transaction {
            route: Arc::new(TxnRoute::new(id)),
            client: client.clone(),
        })
    }

    /// The transaction id, as sent in `Wharf-Txn`.
    pub fn id(&self) -> &str {
        self.route.id()
    }

    /// The instance that owns this transaction, once a call has found it.
    pub fn owner(&self) -> Option<String> {
        self.route.owner()
    }

    /// The client this transaction was opened or joined through; its calls
    /// go through it unless a request names another.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// What the call path routes by.
    pub(crate) fn route(&self) -> &Arc<TxnRoute> {
        &self.route
    }

    /// Runs `future` inside this transaction: every stateful call it makes
    /// (without a transaction of its own) joins this one.
    pub async fn run<F: Future>(&self, future: F) -> F::Output {
        CURRENT.scope(self.clone(), future).await
    }

    /// Ends the transaction: the owner drops its state and the lease is
    /// released. Ending a transaction that already expired, or whose owner
    /// is gone, succeeds: nothing is left to release.
    pub async fn end(self) -> Result<(), Error> {
        let client = self.client();
        let store = client.txn_store().await?;
        let id = self.id();
        let Some((lease, _)) = read_lease(&store.0, id).await? else {
            return Ok(());
        };
        if let Some(owner) = &lease.owner {
            let subject = subjects::transaction_end(client.prefix(), owner);
            let request = async_nats::Request::new()
                .payload(id.as_bytes().to_vec().into())
                .timeout(Some(Duration::from_secs(5)));
            match client.nats().send_request(subject, request).await {
                Ok(_) => return Ok(()),
                // The owner is gone: release the lease here.
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
                Err(e) => {
                    return Err(Error::new(
                        ErrorKind::Connection,
                        format!("cannot end transaction `{id}` at instance `{owner}`: {e}"),
                    )
                    .with_source(e))
                }
            }
        }
        // The purge marker expires too.
        store
            .0
            .purge_with_ttl(id, Duration::from_secs(1))
            .await
            .map_err(|e| kv_error("release", id, e))
    }
}

/// The transaction stateful calls made here belong to: set by
/// [`Transaction::run`].
pub(crate) fn current() -> Option<Transaction> {
    CURRENT.try_with(Clone::clone).ok()
}
