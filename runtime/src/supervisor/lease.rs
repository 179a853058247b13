//! The lease: only the supervisor holding KV `wharf_supervisor`'s
//! `leader` key acts; it renews the lease every tick, and another takes
//! over when it lapses.

use super::state::Supervisor;
use crate::wire::subjects;

impl Supervisor {
    pub(crate) async fn hold_lease(&mut self) {
        let value = self.id.clone().into_bytes();
        self.lease_revision = match self.lease_revision {
            Some(revision) => self
                .lease
                .update(subjects::LEADER_KEY, value.into(), revision)
                .await
                .ok(),
            None => self
                .lease
                .create(subjects::LEADER_KEY, value.into())
                .await
                .ok(),
        };
    }
}
