//! A worker's Prometheus metrics: its endpoints' call durations and
//! durable counts, and its load, read from what the worker keeps anyway.

use super::endpoint::Shared;
use crate::metrics::{Exposition, Source};
use crate::micro::EndpointStats;
use crate::spec::FnSpec;
use async_nats::jetstream::consumer::{pull, Consumer};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// One served function, as its metrics show it.
pub(crate) struct Served {
    pub(crate) spec: &'static FnSpec,
    pub(crate) stats: Arc<EndpointStats>,
    /// Its durable calls' consumers (calls alone, batches of calls), when
    /// the server has JetStream.
    pub(crate) consumers: Vec<Consumer<pull::Config>>,
    /// The consumers' pending messages at the last scrape.
    pub(crate) pending: AtomicU64,
}

/// What a running worker shows at a scrape.
pub(crate) struct WorkerMetrics {
    pub(crate) instance: String,
    pub(crate) shared: Arc<Shared>,
    pub(crate) served: Vec<Served>,
    /// Set once the worker drains.
    pub(crate) draining: Arc<AtomicBool>,
}

impl Source for WorkerMetrics {
    fn ready(&self) -> Option<bool> {
        Some(!self.draining.load(Ordering::Relaxed))
    }

    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async {
            let asks = self
                .served
                .iter()
                .filter(|served| !served.consumers.is_empty())
                .map(|served| async move {
                    let infos = served.consumers.iter().map(|c| c.get_info());
                    let mut pending = 0;
                    for info in futures_util::future::join_all(infos).await {
                        let Ok(info) = info else { return };
                        // Waiting to be delivered, plus delivered and not
                        // yet acknowledged (running or about to be retried).
                        pending += info.num_pending + info.num_ack_pending as u64;
                    }
                    served.pending.store(pending, Ordering::Relaxed);
                });
            futures_util::future::join_all(asks).await;
        })
    }

    fn write(&self, out: &mut Exposition) {
        let instance = [("wharf_instance", self.instance.as_str())];
        let shared = &self.shared;
        out.gauge(
            "wharf_worker_in_flight",
            "Calls running on this worker now.",
            &instance,
            shared.in_flight() as f64,
        );
        out.gauge(
            "wharf_worker_backlog",
            "Calls taken by this worker and waiting for a free slot.",
            &instance,
            shared.backlog() as f64,
        );
        out.gauge(
            "wharf_worker_concurrency",
            "Calls this worker runs at once at most (WHARF_CONCURRENCY).",
            &instance,
            shared.concurrency as f64,
        );
        out.counter(
            "wharf_worker_cancelled_total",
            "Calls this worker stopped because their callers cancelled them.",
            &instance,
            shared.cancelled.load(Ordering::Relaxed),
        );
        if let Some(owned) = &shared.owned {
            out.gauge(
                "wharf_transactions_open",
                "Transactions this instance owns now.",
                &instance,
                owned.count() as f64,
            );
        }
        for served in &self.served {
            let labels = [
                ("rpc_system", "nats"),
                ("rpc_service", served.spec.service),
                ("rpc_method", served.spec.name),
            ];
            served.stats.outcomes.write(
                out,
                "rpc_server_call_duration_seconds",
                "Duration of calls served by this worker, by outcome (`code`: ok or the error's kind).",
                &labels,
            );
            if served.consumers.is_empty() {
                continue;
            }
            out.gauge(
                "wharf_durable_pending",
                "Durable calls of this function not yet completed (waiting or running), as JetStream counts them: a batch of calls counts once.",
                &labels,
                served.pending.load(Ordering::Relaxed) as f64,
            );
            out.counter(
                "wharf_durable_redeliveries_total",
                "Durable calls this worker received again after an earlier delivery.",
                &labels,
                served.stats.redeliveries.load(Ordering::Relaxed),
            );
            out.counter(
                "wharf_durable_dead_letters_total",
                "Durable calls this worker moved to the dead-letter stream.",
                &labels,
                served.stats.dead_letters.load(Ordering::Relaxed),
            );
        }
    }
}
