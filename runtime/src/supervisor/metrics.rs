//! The supervisor's Prometheus metrics: its instances by state, its scale
//! decisions by cause, and whether it leads. Updated once per tick and
//! per decision, read at scrapes.

use crate::metrics::{Exposition, Source};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// What a supervisor shows at a scrape.
#[derive(Default)]
pub(crate) struct SupervisorMetrics {
    /// Instances by service and state, as of the last tick.
    instances: Mutex<BTreeMap<(String, &'static str), usize>>,
    /// Scale decisions by service, direction and cause.
    decisions: Mutex<BTreeMap<(String, &'static str, &'static str), u64>>,
    leader: AtomicBool,
}

impl SupervisorMetrics {
    /// Counts a decision to go from `from` to `to` instances.
    pub(crate) fn decided(&self, service: &str, from: usize, to: usize, cause: &'static str) {
        let direction = if to > from { "up" } else { "down" };
        let mut decisions = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        *decisions
            .entry((service.to_owned(), direction, cause))
            .or_default() += 1;
    }
}

impl SupervisorMetrics {
    /// Notes, for the next scrape, whether this supervisor leads and its
    /// instances by (service, state).
    pub(crate) fn note(&self, leader: bool, instances: BTreeMap<(String, &'static str), usize>) {
        self.leader.store(leader, Ordering::Relaxed);
        *self.instances.lock().unwrap_or_else(|e| e.into_inner()) = instances;
    }
}

impl Source for SupervisorMetrics {
    fn write(&self, out: &mut Exposition) {
        out.gauge(
            "wharf_supervisor_leader",
            "1 while this supervisor holds the lease and acts, else 0.",
            &[],
            f64::from(u8::from(self.leader.load(Ordering::Relaxed))),
        );
        let instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        for ((service, state), count) in instances.iter() {
            out.gauge(
                "wharf_supervisor_instances",
                "Instances this supervisor runs, by service and state (starting: no heartbeat yet; ready; draining).",
                &[("service", service), ("state", state)],
                *count as f64,
            );
        }
        drop(instances);
        let decisions = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        for ((service, direction, cause), count) in decisions.iter() {
            out.counter(
                "wharf_supervisor_scale_decisions_total",
                "Scale decisions, by service, direction and cause.",
                &[
                    ("service", service),
                    ("direction", direction),
                    ("reason", cause),
                ],
                *count,
            );
        }
    }
}
