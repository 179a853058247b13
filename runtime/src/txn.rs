//! Stateful microservices: transactions pinned to the instance that owns
//! them.
//!
//! A caller opens a transaction ([`transaction`]): a lease record in KV
//! `wharf_txn`, keyed by the transaction id, with no owner yet. Its first
//! call travels through the queue group like any other; the instance that
//! takes it claims the transaction by a compare-and-set on the record and
//! names itself in the reply (`Wharf-Txn-Owner`). Every later call goes to
//! that instance's own subject, `<prefix>._inst.<instance>.<service>.<fn>`,
//! where the transaction's state ([`State`]) lives in memory. An instance
//! that gets a call of a transaction another instance owns forwards it
//! there, so two callers racing to claim one transaction share one owner.
//!
//! The owner renews the lease while the transaction is in use and drops
//! both lease and state once it has been idle for the lease's length. A
//! call whose owner is gone fails with [`ErrorKind::TransactionLost`]; it
//! never runs elsewhere on empty state.

use crate::wire::subjects::{self, TXN_BUCKET};
use crate::{Client, Error, ErrorKind, FnSpec};
use async_nats::jetstream::{self, kv};
use async_nats::{HeaderMap, Subject};
use serde::{Deserialize, Serialize};
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::settings::DEFAULT_LEASE;

/// The longest a quiescing instance waits for its transactions to end.
pub const QUIESCE_LIMIT: Duration = Duration::from_secs(600);

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

use crate::wire::subjects::valid_txn_id;

fn malformed(id: &str) -> Error {
    Error::new(
        ErrorKind::BadRequest,
        format!("`{id}` is not a well-formed transaction id: use 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-' (wharf::transaction() makes one)"),
    )
}

fn unknown(id: &str) -> Error {
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
    if let Ok(store) = js.get_key_value(TXN_BUCKET).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: TXN_BUCKET.to_owned(),
        description: "wharf: transaction leases (id -> owning instance)".to_owned(),
        history: 1,
        // Per-key TTLs: every write sets its lease's length.
        limit_markers: Some(Duration::from_secs(1)),
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| {
        Error::new(
            ErrorKind::Connection,
            format!("cannot create KV bucket `{TXN_BUCKET}`: {e}; stateful services keep their leases in JetStream (nats-server -js, version 2.11 or later)"),
        )
    })
}

/// Writes `lease` under `id`, expiring `lease.lease_s` after this write:
/// a create when `revision` is 0, else a compare-and-set on `revision`.
/// Returns the new revision; `Ok(None)` when the record changed meanwhile.
async fn write_lease(
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
async fn read_lease(store: &kv::Store, id: &str) -> Result<Option<(Lease, u64)>, Error> {
    let entry = store.entry(id).await.map_err(|e| kv_error("read", id, e))?;
    let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
        return Ok(None);
    };
    let lease = serde_json::from_slice(&entry.value).map_err(|e| {
        Error::new(
            ErrorKind::Codec,
            format!("the lease of transaction `{id}` in `{TXN_BUCKET}` is not valid JSON: {e}"),
        )
    })?;
    Ok(Some((lease, entry.revision)))
}

fn kv_error(what: &str, id: &str, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Connection,
        format!("cannot {what} the lease of transaction `{id}` in `{TXN_BUCKET}`: {e}"),
    )
}

/// The lease length of new transactions: `WHARF_TXN_LEASE` seconds, or
/// [`DEFAULT_LEASE`].
fn default_lease() -> Duration {
    crate::settings::Settings::get().map_or(DEFAULT_LEASE, |s| s.txn_lease)
}

// ---------------------------------------------------------------------------
// The caller's side

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
    inner: Arc<TxnInner>,
}

#[derive(Debug)]
struct TxnInner {
    id: String,
    client: Client,
    /// The owning instance once a reply has named it.
    owner: Mutex<Option<Route>>,
}

/// Where a transaction's calls go: its owner, and the owner's subject per
/// function (built once, not per call).
#[derive(Debug)]
struct Route {
    owner: Arc<str>,
    /// By the address of the function's spec.
    subjects: Vec<(usize, Subject)>,
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

    pub(crate) async fn txn_store(&self) -> Result<&kv::Store, Error> {
        self.txn_cell()
            .get_or_try_init(|| async {
                txn_bucket(&async_nats::jetstream::new(self.nats().clone())).await
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
            inner: Arc::new(TxnInner {
                id: id.to_owned(),
                client: client.clone(),
                owner: Mutex::new(None),
            }),
        })
    }

    /// The transaction id, as sent in `Wharf-Txn`.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The instance that owns this transaction, once a call has found it.
    pub fn owner(&self) -> Option<String> {
        let route = self.inner.owner.lock().unwrap();
        route.as_ref().map(|r| r.owner.to_string())
    }

    /// The client this transaction was opened or joined through; its calls
    /// go through it unless a request names another.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The owner and its subject for `spec`, once the owner is known.
    pub(crate) fn route(&self, prefix: &str, spec: &'static FnSpec) -> Option<(Arc<str>, Subject)> {
        let mut route = self.inner.owner.lock().unwrap();
        let route = route.as_mut()?;
        let key = spec as *const FnSpec as usize;
        let subject = match route.subjects.iter().find(|(k, _)| *k == key) {
            Some((_, subject)) => subject.clone(),
            None => {
                let subject = Subject::from(subjects::instance_call(
                    prefix,
                    &route.owner,
                    spec.service,
                    spec.name,
                ));
                route.subjects.push((key, subject.clone()));
                subject
            }
        };
        Some((route.owner.clone(), subject))
    }

    pub(crate) fn set_owner(&self, owner: &str) {
        let mut route = self.inner.owner.lock().unwrap();
        if route.as_ref().map(|r| &*r.owner) != Some(owner) {
            *route = Some(Route {
                owner: Arc::from(owner),
                subjects: Vec::new(),
            });
        }
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
        let Some((lease, _)) = read_lease(store, id).await? else {
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
                    ))
                }
            }
        }
        // The purge marker expires too.
        store
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

// ---------------------------------------------------------------------------
// The serving side

/// State of type `S` that belongs to one transaction and lives in the
/// owning instance's memory, handed to a `#[microservice(stateful)]`
/// function as an argument. Calls of one transaction that use the same `S`
/// run one at a time; the state starts as `S::default()`.
///
/// ```
/// let mut seen = wharf::State::new(Vec::<String>::new());
/// seen.push("first".into());
/// assert_eq!(seen.len(), 1);
/// ```
pub struct State<S: 'static> {
    guard: tokio::sync::OwnedMutexGuard<Box<dyn Any + Send>>,
    kind: PhantomData<fn() -> S>,
}

impl<S: Send + 'static> State<S> {
    /// State outside any transaction, for running a stateful function's
    /// body locally (`<fn>::local(.., wharf::State::new(s))`) in tests.
    pub fn new(value: S) -> State<S> {
        let cell: Arc<tokio::sync::Mutex<Box<dyn Any + Send>>> =
            Arc::new(tokio::sync::Mutex::new(Box::new(value)));
        State {
            guard: cell.try_lock_owned().expect("a new mutex is unlocked"),
            kind: PhantomData,
        }
    }
}

impl<S: 'static> Deref for State<S> {
    type Target = S;
    fn deref(&self) -> &S {
        // Cells are keyed by `TypeId::of::<S>()`, so this always holds.
        self.guard.downcast_ref().expect("state cell of type S")
    }
}

impl<S: 'static> DerefMut for State<S> {
    fn deref_mut(&mut self) -> &mut S {
        self.guard.downcast_mut().expect("state cell of type S")
    }
}

impl<S: std::fmt::Debug + 'static> std::fmt::Debug for State<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("State").field(&**self).finish()
    }
}

type Cell = Arc<tokio::sync::Mutex<Box<dyn Any + Send>>>;

/// One transaction this instance owns.
pub(crate) struct Slot {
    id: String,
    /// The service that claimed it.
    service: &'static str,
    lease: Duration,
    /// Revision of the lease record last written by this instance.
    revision: AtomicU64,
    in_flight: AtomicUsize,
    last_used_ms: AtomicU64,
    renewed_ms: AtomicU64,
    states: Mutex<HashMap<TypeId, Cell>>,
}

impl Slot {
    /// The state of type `S`, made on first use, locked for this call.
    pub(crate) async fn state<S: Default + Send + 'static>(&self) -> State<S> {
        let cell = self
            .states
            .lock()
            .unwrap()
            .entry(TypeId::of::<S>())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(Box::new(S::default()))))
            .clone();
        State {
            guard: cell.lock_owned().await,
            kind: PhantomData,
        }
    }
}

/// Marks a call of a transaction as running until dropped.
pub(crate) struct InUse(pub(crate) Arc<Slot>);

impl InUse {
    fn new(slot: Arc<Slot>) -> InUse {
        slot.in_flight.fetch_add(1, Ordering::AcqRel);
        slot.last_used_ms
            .store(crate::context::unix_ms(), Ordering::Relaxed);
        InUse(slot)
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.0
            .last_used_ms
            .store(crate::context::unix_ms(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where a stateful call runs.
pub(crate) enum Admitted {
    /// Here, on this slot.
    Here(InUse),
    /// At the owning instance.
    Forward(String),
}

/// The transactions one worker instance owns.
pub(crate) struct Owned {
    js: jetstream::Context,
    store: kv::Store,
    pub(crate) instance: String,
    prefix: String,
    open: Mutex<HashMap<String, Arc<Slot>>>,
    /// Serializes claims, so two calls of one new transaction arriving here
    /// together claim it once.
    claiming: tokio::sync::Mutex<()>,
    /// False once the instance quiesces: it takes no new transactions.
    accepting: AtomicBool,
    /// Woken when a transaction ends.
    ended: tokio::sync::Notify,
}

impl Owned {
    pub(crate) async fn new(
        js: jetstream::Context,
        instance: &str,
        prefix: &str,
    ) -> Result<Arc<Owned>, Error> {
        let store = txn_bucket(&js).await?;
        Ok(Arc::new(Owned {
            js,
            store,
            instance: instance.to_owned(),
            prefix: prefix.to_owned(),
            open: Mutex::new(HashMap::new()),
            claiming: tokio::sync::Mutex::new(()),
            accepting: AtomicBool::new(true),
            ended: tokio::sync::Notify::new(),
        }))
    }

    /// Open transactions owned here.
    pub(crate) fn count(&self) -> usize {
        self.open.lock().unwrap().len()
    }

    /// A call of transaction `id` when this instance owns it.
    pub(crate) fn local(&self, id: &str) -> Option<InUse> {
        self.open.lock().unwrap().get(id).cloned().map(InUse::new)
    }

    /// Decides where a call of transaction `id` to `spec` runs: here when
    /// this instance owns it or claims it now, at the owner otherwise.
    pub(crate) async fn admit(&self, spec: &FnSpec, id: Option<&str>) -> Result<Admitted, Error> {
        let Some(id) = id else {
            return Err(outside(spec));
        };
        if !valid_txn_id(id) {
            return Err(malformed(id));
        }
        if let Some(in_use) = self.local(id) {
            return Ok(Admitted::Here(in_use));
        }
        loop {
            let Some((lease, revision)) = read_lease(&self.store, id).await? else {
                return Err(unknown(id));
            };
            if let Some(service) = lease.service.as_deref().filter(|s| *s != spec.service) {
                return Err(Error::new(
                    ErrorKind::BadRequest,
                    format!("transaction `{id}` belongs to service `{service}`, not `{}`: a transaction pins the calls of one service to one instance; open one per service", spec.service),
                ));
            }
            match lease.owner {
                Some(owner) if owner == self.instance => {
                    // Claimed here by a call still finishing its claim (wait
                    // for it), or owned here before and dropped: expired.
                    let _claiming = self.claiming.lock().await;
                    return self.local(id).map(Admitted::Here).ok_or_else(|| unknown(id));
                }
                Some(owner) => return Ok(Admitted::Forward(owner)),
                None if !self.accepting.load(Ordering::Acquire) => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!("instance `{}` is shutting down and takes no new transactions; retry (another instance will take it)", self.instance),
                    ))
                }
                None => {
                    // Claims on this instance go one at a time, so a second
                    // call of the same new transaction finds the first's
                    // slot; reads and forwards above never wait here.
                    let _claiming = self.claiming.lock().await;
                    if let Some(in_use) = self.local(id) {
                        return Ok(Admitted::Here(in_use));
                    }
                    let claimed = Lease {
                        service: Some(spec.service.to_owned()),
                        owner: Some(self.instance.clone()),
                        lease_s: lease.lease_s,
                    };
                    // Lost the race: read again and follow the winner.
                    let Some(revision) = write_lease(&self.js, id, &claimed, revision).await?
                    else {
                        continue;
                    };
                    let now = crate::context::unix_ms();
                    let slot = Arc::new(Slot {
                        id: id.to_owned(),
                        service: spec.service,
                        lease: Duration::from_secs(lease.lease_s.max(1)),
                        revision: AtomicU64::new(revision),
                        in_flight: AtomicUsize::new(0),
                        last_used_ms: AtomicU64::new(now),
                        renewed_ms: AtomicU64::new(now),
                        states: Mutex::new(HashMap::new()),
                    });
                    let in_use = InUse::new(slot.clone());
                    self.open.lock().unwrap().insert(id.to_owned(), slot);
                    return Ok(Admitted::Here(in_use));
                }
            }
        }
    }

    /// Drops a transaction's state and releases its lease.
    async fn release(&self, id: &str) {
        let slot = self.open.lock().unwrap().remove(id);
        if let Some(slot) = slot {
            self.release_lease(&slot).await;
        }
    }

    /// Deletes the lease of a slot no longer held; the purge marker expires
    /// too, so ended transactions leave nothing in the bucket.
    async fn release_lease(&self, slot: &Slot) {
        let revision = slot.revision.load(Ordering::Acquire);
        let _ = self
            .store
            .purge_expect_revision_with_ttl(slot.id.as_str(), revision, Duration::from_secs(1))
            .await;
        self.ended.notify_waiters();
    }

    /// Drops a slot idle for a whole lease; decided under the lock `local`
    /// takes, so a call arriving meanwhile keeps it.
    async fn release_if_idle(&self, slot: &Arc<Slot>, now: u64) -> bool {
        let removed = {
            let mut open = self.open.lock().unwrap();
            let lease_ms = slot.lease.as_millis() as u64;
            let idle = slot.in_flight.load(Ordering::Acquire) == 0
                && now.saturating_sub(slot.last_used_ms.load(Ordering::Relaxed)) >= lease_ms;
            idle && open.remove(&slot.id).is_some()
        };
        if removed {
            self.release_lease(slot).await;
        }
        removed
    }

    /// Keeps the leases of transactions in use alive and ends those idle for
    /// a whole lease. Runs for the worker's life.
    pub(crate) async fn keep_leases(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = crate::context::unix_ms();
            let slots: Vec<Arc<Slot>> = self.open.lock().unwrap().values().cloned().collect();
            let mut due = Vec::new();
            for slot in slots {
                if self.release_if_idle(&slot, now).await {
                    continue;
                }
                let lease_ms = slot.lease.as_millis() as u64;
                if now.saturating_sub(slot.renewed_ms.load(Ordering::Relaxed)) >= lease_ms / 3 {
                    due.push(slot);
                }
            }
            // Renewed together, so thousands of transactions renew within
            // a tick rather than one round trip after another.
            for batch in due.chunks(256) {
                futures_util::future::join_all(batch.iter().map(|slot| self.renew(slot))).await;
            }
        }
    }

    async fn renew(&self, slot: &Slot) {
        let lease = Lease {
            service: Some(slot.service.to_owned()),
            owner: Some(self.instance.clone()),
            lease_s: slot.lease.as_secs(),
        };
        let revision = slot.revision.load(Ordering::Acquire);
        match write_lease(&self.js, &slot.id, &lease, revision).await {
            Ok(Some(revision)) => {
                slot.revision.store(revision, Ordering::Release);
                slot.renewed_ms
                    .store(crate::context::unix_ms(), Ordering::Relaxed);
            }
            // Someone else changed or removed the lease (ended elsewhere):
            // this instance no longer owns the transaction.
            Ok(None) => {
                let removed = self.open.lock().unwrap().remove(&slot.id);
                if removed.is_some() {
                    self.ended.notify_waiters();
                }
            }
            // The broker is away: try again on the next tick.
            Err(_) => {}
        }
    }

    /// Answers `end` requests for the transactions owned here.
    pub(crate) async fn answer_ends(
        self: Arc<Self>,
        nats: async_nats::Client,
    ) -> Result<tokio::task::JoinHandle<()>, Error> {
        use futures_util::StreamExt;
        let subject = subjects::transaction_end(&self.prefix, &self.instance);
        let mut requests = nats
            .subscribe(subject.clone())
            .await
            .map_err(|e| crate::micro::subscribe_failed(&subject, e))?;
        Ok(tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                let id = String::from_utf8_lossy(&request.payload).into_owned();
                self.release(&id).await;
                if let Some(reply) = request.reply {
                    let _ = nats.publish(reply, bytes::Bytes::from_static(b"ok")).await;
                }
            }
        }))
    }

    /// Stops taking new transactions and waits until every open one has
    /// ended or expired, at most `limit`.
    pub(crate) async fn quiesce(&self, limit: Duration) {
        self.accepting.store(false, Ordering::Release);
        let wait = async {
            loop {
                let ended = self.ended.notified();
                if self.count() == 0 {
                    return;
                }
                // Expiry is noticed by `keep_leases`, which notifies too;
                // the timeout only guards against a missed wake-up.
                let _ = tokio::time::timeout(Duration::from_secs(1), ended).await;
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
    }
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

    #[tokio::test]
    async fn state_derefs_to_its_value() {
        let mut state = State::new(5u32);
        *state += 1;
        assert_eq!(*state, 6);
        let slot = Slot {
            id: "t".into(),
            service: "s",
            lease: DEFAULT_LEASE,
            revision: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            last_used_ms: AtomicU64::new(0),
            renewed_ms: AtomicU64::new(0),
            states: Mutex::new(HashMap::new()),
        };
        {
            let mut count = slot.state::<u64>().await;
            *count += 2;
        }
        assert_eq!(*slot.state::<u64>().await, 2);
        assert!(slot.state::<String>().await.is_empty());
    }
}
