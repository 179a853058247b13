//! The NATS micro protocol (ADR-32), answered by wharf itself.
//!
//! async-nats's `service` module speaks the same protocol, but its request
//! path costs a lock, a hash lookup and a string allocation per call; with
//! it, wharf reached 0.82–0.88x raw async-nats throughput at 256 calls in
//! flight, against 0.92–0.96x when the worker owns its subscriptions
//! (docs/BENCHMARKS.md). So the endpoints here are plain queue
//! subscriptions with lock-free counters, and this module answers
//! `$SRV.PING|INFO|STATS` with the documents ADR-32 defines.

use crate::handler::Fault;
use crate::wire::subjects;
use crate::{Error, ErrorKind};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;

/// Calls per latency sample (see [`EndpointStats::record`]).
const LATENCY_SAMPLE: u64 = 4;

/// Counters of one endpoint, updated on every call without locking.
#[derive(Default)]
pub(crate) struct EndpointStats {
    requests: AtomicU64,
    errors: AtomicU64,
    processing_ns: AtomicU64,
    /// Processing times, for p50 and p99 in heartbeats.
    latency: crate::histogram::Histogram,
    /// Processing times by outcome, for Prometheus (only with metrics on).
    pub(crate) outcomes: crate::metrics::Outcomes,
    /// Durable calls delivered again (after a worker died or an ack was lost).
    pub(crate) redeliveries: AtomicU64,
    /// Durable calls moved to the dead-letter stream.
    pub(crate) dead_letters: AtomicU64,
    /// Calls taken on the subject of this build's signature: from wharf
    /// callers built against it (a supervisor keeps an old version running
    /// while they call).
    pub(crate) signed: AtomicU64,
    /// Calls taken in batches, all on subjects of this build's signature
    /// (counted apart from `signed`: each counter has one writer).
    pub(crate) batched: AtomicU64,
    /// Only written on the error path.
    last_error: Mutex<Option<(u16, String)>>,
}

impl EndpointStats {
    /// Records one answered call, and how it failed if it did.
    pub(crate) fn record(&self, elapsed: Duration, failure: Option<&Fault>) {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let ns = elapsed.as_nanos() as u64;
        self.processing_ns.fetch_add(ns, Ordering::Relaxed);
        // One call in LATENCY_SAMPLE feeds the percentiles: a contended
        // atomic per call costs measurable throughput at high rates.
        if n % LATENCY_SAMPLE == 0 {
            self.latency.add(ns);
        }
        self.outcomes.observe(elapsed, failure.map(|f| f.kind));
        if let Some(fault) = failure {
            self.errors.fetch_add(1, Ordering::Relaxed);
            let code = fault.kind.code().unwrap_or(500);
            let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
            *last = Some((code, fault.message().to_owned()));
        }
    }

    /// Calls answered and their total processing time in nanoseconds.
    pub(crate) fn totals(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.processing_ns.load(Ordering::Relaxed),
        )
    }

    /// Calls answered with an error.
    pub(crate) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Processing-time counts by histogram bucket.
    pub(crate) fn latencies(&self) -> [u64; crate::histogram::BUCKETS] {
        self.latency.snapshot()
    }

    fn to_json(&self) -> Value {
        let requests = self.requests.load(Ordering::Relaxed);
        let processing = self.processing_ns.load(Ordering::Relaxed);
        // ADR-32 gives the last error as one string, `<code>:<description>`.
        let last_error = self
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or_else(String::new, |(code, text)| format!("{code}:{text}"));
        json!({
            "num_requests": requests,
            "num_errors": self.errors.load(Ordering::Relaxed),
            "processing_time": processing,
            "average_processing_time": processing.checked_div(requests).unwrap_or(0),
            "last_error": last_error,
        })
    }
}

/// One endpoint as discovery shows it.
pub(crate) struct EndpointInfo {
    pub name: String,
    pub subject: String,
    pub metadata: HashMap<String, String>,
    pub stats: Arc<EndpointStats>,
}

/// One service instance as discovery shows it.
pub(crate) struct ServiceInfo {
    pub name: String,
    pub id: String,
    pub version: String,
    pub description: String,
    pub metadata: HashMap<String, String>,
    pub endpoints: Vec<EndpointInfo>,
    pub started: SystemTime,
}

impl ServiceInfo {
    fn ping(&self) -> Value {
        json!({
            "type": "io.nats.micro.v1.ping_response",
            "name": self.name,
            "id": self.id,
            "version": self.version,
            "metadata": self.metadata,
        })
    }

    fn info(&self) -> Value {
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|e| {
                json!({
                    "name": e.name,
                    "subject": e.subject,
                    "queue_group": subjects::QUEUE_GROUP,
                    "metadata": e.metadata,
                })
            })
            .collect();
        json!({
            "type": "io.nats.micro.v1.info_response",
            "name": self.name,
            "id": self.id,
            "version": self.version,
            "description": self.description,
            "metadata": self.metadata,
            "endpoints": endpoints,
        })
    }

    fn stats(&self, data: &Value) -> Value {
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|e| {
                let mut stats = e.stats.to_json();
                stats["name"] = json!(e.name);
                stats["subject"] = json!(e.subject);
                stats["queue_group"] = json!(subjects::QUEUE_GROUP);
                stats["data"] = data.clone();
                stats
            })
            .collect();
        json!({
            "type": "io.nats.micro.v1.stats_response",
            "name": self.name,
            "id": self.id,
            "version": self.version,
            "metadata": self.metadata,
            "started": rfc3339(self.started),
            "endpoints": endpoints,
        })
    }
}

/// Answers `$SRV.PING|INFO|STATS` (all, by name, by name and id) for
/// `service` until the returned task is aborted. `data` supplies each
/// endpoint's STATS `data`.
pub(crate) async fn answer_discovery(
    nats: &async_nats::Client,
    service: Arc<ServiceInfo>,
    data: impl Fn() -> Value + Send + 'static,
) -> Result<JoinHandle<()>, Error> {
    let mut subscriptions = Vec::new();
    for verb in ["PING", "INFO", "STATS"] {
        for subject in [
            subjects::discovery(verb),
            subjects::discovery_of(verb, &service.name),
            subjects::discovery_at(verb, &service.name, &service.id),
        ] {
            let subscriber = nats
                .subscribe(subject.clone())
                .await
                .map_err(|e| subscribe_failed(&subject, e))?;
            subscriptions.push(subscriber.map(move |message| (verb, message)));
        }
    }
    let nats = nats.clone();
    let mut requests = futures_util::stream::select_all(subscriptions);
    Ok(tokio::spawn(async move {
        while let Some((verb, message)) = requests.next().await {
            let Some(reply) = message.reply else { continue };
            let document = match verb {
                "PING" => service.ping(),
                "INFO" => service.info(),
                _ => service.stats(&data()),
            };
            let body = serde_json::to_vec(&document).unwrap_or_default();
            let _ = nats.publish(reply, body.into()).await;
        }
    }))
}

/// RFC 3339 in UTC with nanoseconds, as ADR-32's `started` field wants.
fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
    let of_day = seconds % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_nanos()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (the standard
/// era-based algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The error for a subscription to `subject` the server did not take.
pub(crate) fn subscribe_failed(
    subject: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::new(
        ErrorKind::Connection,
        format!("cannot subscribe `{subject}`: {e}"),
    )
    .with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::new(1_795_824_000, 5)),
            "2026-11-28T00:00:00.000000005Z"
        );
    }

    #[test]
    fn stats_count_errors_and_time() {
        let stats = EndpointStats::default();
        stats.record(Duration::from_micros(10), None);
        stats.record(
            Duration::from_micros(30),
            Some(&Fault::new(ErrorKind::Application, "no".to_owned())),
        );
        let json = stats.to_json();
        assert_eq!(json["num_requests"], 2);
        assert_eq!(json["num_errors"], 1);
        assert_eq!(json["average_processing_time"], 20_000);
        assert_eq!(json["last_error"], "422:no");
    }
}
