//! The lease: only the supervisor holding KV `wharf_supervisor`'s
//! `leader` key acts; it renews the lease every tick, and another takes
//! over when it lapses. A renewal that fails for a reason other than a
//! lost race keeps the revision: the next tick tries again, and the fence
//! ([`Supervisor::is_leader`]) stops the supervisor acting meanwhile once
//! its lease may be running out.

use super::state::{Supervisor, LEASE_TTL};
use crate::wire::subjects;
use async_nats::jetstream::kv::{CreateErrorKind, UpdateErrorKind};
use std::time::Instant;

impl Supervisor {
    pub(crate) async fn hold_lease(&mut self) {
        let value = self.id.clone().into_bytes();
        // Counted from before the request: the server's expiry is later.
        let sent = Instant::now();
        match self.lease_revision {
            Some(revision) => match self
                .lease
                .update(subjects::LEADER_KEY, value.into(), revision)
                .await
            {
                Ok(revision) => self.renewed(revision, sent),
                // Another supervisor holds it now, or it expired and went.
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => self.lost_lease(),
                // Unknown (no quorum, a timeout): try again next tick.
                Err(_) => {}
            },
            None => match self.lease.create(subjects::LEADER_KEY, value.into()).await {
                Ok(revision) => self.renewed(revision, sent),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => self.lost_lease(),
                Err(_) => {}
            },
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
