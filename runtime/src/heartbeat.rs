//! Heartbeats: every worker instance writes what it is doing to KV
//! `wharf_instances` once a second, and listens for a drain request from
//! the supervisor on `<prefix>._control.<instance>`.

use crate::error::Error;
use crate::micro::EndpointStats;
use async_nats::jetstream::{self, kv, stream};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

pub use crate::wire::subjects::INSTANCES_BUCKET;

/// How often a worker writes its heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// How long a heartbeat stays in the bucket: an instance that stopped
/// writing disappears after this (the bucket's max age, which with one
/// write a second acts as a per-key TTL).
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(5);

/// One worker instance's heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Instance id (also `wharf.instance` in its ADR-32 metadata).
    pub instance: String,
    /// Services the instance serves.
    pub services: Vec<String>,
    /// Host name.
    pub host: String,
    /// Process id on that host.
    pub pid: u32,
    /// Container id, when it runs in one (`WHARF_CONTAINER`).
    pub container: Option<String>,
    /// CPU use since the last heartbeat, percent of one core.
    pub cpu: f32,
    /// Resident memory, bytes.
    pub rss: u64,
    /// Calls running.
    pub in_flight: usize,
    /// Calls waiting for a free slot.
    pub backlog: usize,
    /// Calls answered since the instance started.
    pub calls: u64,
    /// Calls answered with an error since the instance started.
    #[serde(default)]
    pub errors: u64,
    /// Calls answered per second since the last heartbeat.
    pub calls_per_s: f64,
    /// Mean processing time since the last heartbeat, milliseconds.
    pub mean_ms: f64,
    /// Median processing time since the last heartbeat, milliseconds
    /// (a bucket's upper bound, within 25%).
    pub p50_ms: f64,
    /// 99th percentile of the processing time since the last heartbeat,
    /// milliseconds (within 25%).
    pub p99_ms: f64,
    /// Open transactions this instance owns (stateful services); a
    /// draining instance waits for them to end.
    #[serde(default)]
    pub transactions: usize,
    /// Draining: it takes no new calls and exits when done.
    pub draining: bool,
    /// The version of the crate that defines its functions.
    #[serde(default)]
    pub version: String,
    /// The revision of the `wharf.toml` service it was started from
    /// (`WHARF_REVISION`, set by the supervisor): a rollout replaces the
    /// instances of other revisions.
    #[serde(default)]
    pub revision: Option<String>,
    /// Each function it serves, as `service.function`, with the signature
    /// hash it serves (16 hex digits, as in `Wharf-Sig`).
    #[serde(default)]
    pub signatures: BTreeMap<String, String>,
    /// Calls taken since it started on each function's signature subject,
    /// that is from wharf callers built against its signature.
    #[serde(default)]
    pub signed_calls: BTreeMap<String, u64>,
    /// When it was written, unix milliseconds.
    pub at_ms: u64,
}

/// Creates (or finds) the heartbeat bucket.
pub async fn instances_bucket(js: &jetstream::Context) -> Result<kv::Store, Error> {
    crate::storage::bucket(
        js,
        INSTANCES_BUCKET,
        "wharf: worker heartbeats",
        HEARTBEAT_TTL,
        stream::StorageType::Memory,
    )
    .await
}

/// How busy an instance is right now.
pub(crate) struct Load {
    pub(crate) in_flight: usize,
    pub(crate) backlog: usize,
    pub(crate) transactions: usize,
}

/// One function a worker serves, and its counters.
pub(crate) struct Function {
    pub(crate) spec: &'static crate::spec::FnSpec,
    pub(crate) stats: Arc<EndpointStats>,
}

/// What the heartbeat task reads from the worker.
pub(crate) struct Source {
    pub(crate) instance: String,
    pub(crate) services: Vec<String>,
    pub(crate) host: String,
    pub(crate) endpoints: Vec<Function>,
    pub(crate) load: Arc<dyn Fn() -> Load + Send + Sync>,
    pub(crate) draining: Arc<std::sync::atomic::AtomicBool>,
}

/// Writes a heartbeat every [`HEARTBEAT_INTERVAL`] until aborted.
pub(crate) async fn beat(store: kv::Store, source: Source) {
    let pid = std::process::id();
    let mut system = System::new();
    let refresh = ProcessRefreshKind::nothing().with_cpu().with_memory();
    let mut last_calls = 0;
    let mut last_ns = 0;
    let mut last = std::time::Instant::now();
    let mut last_latencies = [0u64; crate::histogram::BUCKETS];
    let settings = crate::settings::Settings::get().ok();
    let container = settings.and_then(|s| s.container.clone());
    let revision = settings.and_then(|s| s.revision.clone());
    let name = |f: &Function| format!("{}.{}", f.spec.service, f.spec.name);
    let signatures: BTreeMap<String, String> = source
        .endpoints
        .iter()
        .map(|f| (name(f), f.spec.sig_hex()))
        .collect();
    let version = source
        .endpoints
        .first()
        .map_or("0.0.0", |f| f.spec.version)
        .to_owned();
    loop {
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[Pid::from_u32(pid)]),
            true,
            refresh,
        );
        let (cpu, rss) = system
            .process(Pid::from_u32(pid))
            .map(|p| (p.cpu_usage(), p.memory()))
            .unwrap_or((0.0, 0));
        let (calls, ns) = source
            .endpoints
            .iter()
            .map(|f| f.stats.totals())
            .fold((0, 0), |(c, n), (c2, n2)| (c + c2, n + n2));
        let errors = source.endpoints.iter().map(|f| f.stats.errors()).sum();
        let mut latencies = [0u64; crate::histogram::BUCKETS];
        for endpoint in &source.endpoints {
            for (sum, count) in latencies.iter_mut().zip(endpoint.stats.latencies()) {
                *sum += count;
            }
        }
        let mut recent = latencies;
        for (now, before) in recent.iter_mut().zip(last_latencies) {
            *now = now.saturating_sub(before);
        }
        last_latencies = latencies;
        let quantile_ms = |q| crate::histogram::quantile(&recent, q) as f64 / 1e6;
        let elapsed = last.elapsed().as_secs_f64().max(1e-3);
        let new_calls = calls - last_calls;
        let Load {
            in_flight,
            backlog,
            transactions,
        } = (source.load)();
        let heartbeat = Heartbeat {
            instance: source.instance.clone(),
            services: source.services.clone(),
            host: source.host.clone(),
            pid,
            container: container.clone(),
            cpu,
            rss,
            in_flight,
            backlog,
            calls,
            errors,
            calls_per_s: new_calls as f64 / elapsed,
            mean_ms: if new_calls == 0 {
                0.0
            } else {
                (ns - last_ns) as f64 / new_calls as f64 / 1e6
            },
            p50_ms: quantile_ms(0.50),
            p99_ms: quantile_ms(0.99),
            transactions,
            draining: source.draining.load(std::sync::atomic::Ordering::Relaxed),
            version: version.clone(),
            revision: revision.clone(),
            signatures: signatures.clone(),
            signed_calls: source
                .endpoints
                .iter()
                .map(|f| {
                    let stats = &f.stats;
                    let signed = stats.signed.load(Ordering::Relaxed)
                        + stats.batched.load(Ordering::Relaxed);
                    (name(f), signed)
                })
                .collect(),
            at_ms: crate::context::unix_ms(),
        };
        (last_calls, last_ns, last) = (calls, ns, std::time::Instant::now());
        if let Ok(json) = serde_json::to_vec(&heartbeat) {
            // Fire and forget: a missed beat is what the supervisor watches
            // for, and waiting here would only delay the next one.
            let _ = store.put(source.instance.as_str(), json.into()).await;
        }
        tokio::time::sleep(HEARTBEAT_INTERVAL).await;
    }
}
