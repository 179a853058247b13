//! The serving side of transactions: the ones this instance owns, how a
//! call is admitted to one (here, claimed now, or forwarded to its owner),
//! lease renewal, and the quiesce a draining instance waits out.

use super::lease::{malformed, outside, read_lease, unknown, write_lease, Lease};
use super::state::{InUse, Slot};
use crate::error::{Error, ErrorKind};
use crate::spec::FnSpec;
use crate::wire::subjects::{self, valid_txn_id};
use async_nats::jetstream::{self, kv};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The longest a quiescing instance waits for its transactions to end.
pub const QUIESCE_LIMIT: Duration = Duration::from_secs(600);

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
        let store = super::lease::txn_bucket(&js).await?;
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
