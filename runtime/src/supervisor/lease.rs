//! The lease: only the supervisor holding KV `wharf_supervisor`'s
//! `leader` key acts; it renews the lease every tick, and another takes
//! over when it lapses. A renewal that fails for a reason other than a
//! lost race keeps the revision: the next tick tries again, and the fence
//! ([`Supervisor::is_leader`]) stops the supervisor acting meanwhile once
//! its lease may be running out.
//!
//! A write whose answer timed out may still have been stored (a bucket
//! electing a leader commits it late): the next write then meets a
//! revision it did not expect, or a key that already exists, and finds its
//! own id there. That is this supervisor's own lease, not a lost one, and
//! it renews from the stored revision; only the compare-and-set of that
//! renewal says the lease is held, never the read.

use super::state::{Supervisor, LEASE_TTL};
use crate::wire::subjects;
use async_nats::jetstream::kv::{CreateErrorKind, Operation, UpdateErrorKind};
use std::time::Instant;

impl Supervisor {
    pub(crate) async fn hold_lease(&mut self) {
        let value = self.id.clone().into_bytes();
        // Counted from before the request: the server's expiry is later.
        let sent = Instant::now();
        match self.lease_revision {
            Some(revision) => match bounded(self.lease.update(
                subjects::LEADER_KEY,
                value.into(),
                revision,
            ))
            .await
            {
                Some(Ok(revision)) => self.renewed(revision, sent),
                // Another supervisor holds it now, or it expired and went,
                // or an earlier renewal of ours was stored after all.
                Some(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    self.renew_stored_write(sent).await
                }
                // Unknown (no quorum, a timeout): try again next tick.
                _ => {}
            },
            None => match bounded(self.lease.create(subjects::LEADER_KEY, value.into())).await {
                Some(Ok(revision)) => self.renewed(revision, sent),
                Some(Err(e)) if e.kind() == CreateErrorKind::AlreadyExists => {
                    self.renew_stored_write(sent).await
                }
                _ => {}
            },
        }
    }

    /// The lease key was not where this supervisor's last known write left
    /// it: renews it if the key holds this supervisor's id (a write of ours
    /// whose answer was lost), else counts the lease as lost.
    async fn renew_stored_write(&mut self, sent: Instant) {
        let stored = match bounded(self.lease.entry(subjects::LEADER_KEY)).await {
            Some(Ok(Some(entry)))
                if entry.operation == Operation::Put && entry.value == self.id.as_bytes() =>
            {
                entry.revision
            }
            // Another's id, or no key: lost. Unknown: try again next tick.
            Some(Ok(_)) => return self.lost_lease(),
            _ => return,
        };
        let value = self.id.clone().into_bytes();
        match bounded(
            self.lease
                .update(subjects::LEADER_KEY, value.into(), stored),
        )
        .await
        {
            Some(Ok(revision)) => {
                tracing::debug!("renewed the lease from a write of ours whose answer was lost");
                self.renewed(revision, sent)
            }
            Some(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => self.lost_lease(),
            _ => {}
        }
    }

    fn renewed(&mut self, revision: u64, sent: Instant) {
        self.lease_revision = Some(revision);
        self.lease_until = Some(sent + LEASE_TTL);
    }

    fn lost_lease(&mut self) {
        if self.lease_revision.is_some() {
            // Another supervisor runs the instances now.
            self.managed.clear();
        }
        self.lease_revision = None;
        self.lease_until = None;
    }
}

/// A lease request, given up (`None`: its outcome unknown) when it is not
/// answered soon: a renewal that cannot be confirmed soon is as good as
/// failed, and the fence, not this bound, keeps a cut-off leader from
/// acting. Bounded here rather than by the JetStream context's timeout,
/// which also bounds the creation of the buckets, slower on a loaded
/// cluster.
pub(crate) async fn bounded<T>(request: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(LEASE_TTL / 3, request).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::NatsServer;

    /// A write of the lease whose answer was lost is renewed from, not
    /// taken for another supervisor's; another's id is a lost lease.
    #[tokio::test]
    async fn a_stored_write_whose_answer_was_lost_keeps_the_lease() {
        let server = NatsServer::start().unwrap();
        let client = crate::Client::connect(&server.url()).await.unwrap();
        let mut supervisor = Supervisor::with_backends(&client, Vec::new())
            .await
            .unwrap();
        supervisor.hold_lease().await;
        assert!(
            supervisor.is_leader(),
            "the only supervisor takes the lease"
        );

        // Renewed on the server, the answer lost: our revision is stale.
        let ours = supervisor.id.clone().into_bytes();
        let stale = supervisor.lease_revision.unwrap();
        let stored = supervisor
            .lease
            .update(subjects::LEADER_KEY, ours.clone().into(), stale)
            .await
            .unwrap();
        supervisor.hold_lease().await;
        assert!(supervisor.is_leader(), "its own late write is its lease");
        assert!(supervisor.lease_revision.unwrap() > stored);

        // Taken (created) on the server, the answer lost: no revision yet.
        supervisor.lease_revision = None;
        supervisor.hold_lease().await;
        assert!(supervisor.is_leader(), "its own late create is its lease");

        // Another supervisor's id: lost.
        let current = supervisor.lease_revision.unwrap();
        supervisor
            .lease
            .update(subjects::LEADER_KEY, "other-id".into(), current)
            .await
            .unwrap();
        supervisor.hold_lease().await;
        assert!(!supervisor.is_leader(), "another's lease is not ours");
        assert_eq!(supervisor.lease_revision, None);
    }
}
