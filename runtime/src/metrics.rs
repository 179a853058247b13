//! Prometheus metrics: `GET /metrics` on `WHARF_METRICS_PORT`, off unless
//! that is set; `GET /ready` on the same port says whether a worker serves.
//!
//! Nothing is kept for metrics that wharf does not count anyway: the
//! endpoints' ADR-32 counters, the workers' load, the supervisor's
//! instances and the objects service's byte counts are read when a scrape
//! comes. Only the call-duration histograms are extra, and they are fed only
//! while metrics are on (two relaxed atomic adds per call); with metrics
//! off, a call pays one relaxed load. So there is no registry library here:
//! each part of wharf that has something to show registers a [`Source`]
//! that writes its families into an [`Exposition`] at scrape time.

use crate::error::{Error, ErrorKind};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Whether this process serves metrics (set once the server listens).
static ON: AtomicBool = AtomicBool::new(false);

/// Whether metrics are on: call durations are only counted then.
#[inline]
pub(crate) fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Turns this process's counting on or off while it serves metrics: for
/// the bench, which compares calls with and without metrics in one run.
pub fn set_counting(on: bool) {
    ON.store(on && address().is_some(), Ordering::Relaxed);
}

/// Upper bounds, in seconds, of the call-duration buckets: from 100 µs
/// (a call on one host) to a minute (the longest default deadline).
const BOUNDS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 60.0,
];

/// The same bounds in nanoseconds, to place a duration without floats.
const BOUNDS_NS: [u64; 17] = {
    let mut ns = [0; 17];
    let mut i = 0;
    while i < BOUNDS.len() {
        ns[i] = (BOUNDS[i] * 1e9) as u64;
        i += 1;
    }
    ns
};

/// A Prometheus histogram of durations, lock-free: one count per bucket
/// (made cumulative when written) and the sum.
pub(crate) struct Durations {
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_ns: AtomicU64,
}

impl Durations {
    /// An empty histogram, usable in a `static`.
    pub(crate) const fn new() -> Durations {
        Durations {
            buckets: [const { AtomicU64::new(0) }; BOUNDS.len() + 1],
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Counts one duration.
    pub(crate) fn observe(&self, elapsed: Duration) {
        let ns = elapsed.as_nanos().min(u128::from(u64::MAX)) as u64;
        let bucket = BOUNDS_NS.partition_point(|&bound| bound < ns);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

impl Default for Durations {
    fn default() -> Durations {
        Durations::new()
    }
}

/// Durations of calls by how they ended: `ok` without a lock, each error
/// kind in a list only the error path takes a lock for.
pub(crate) struct Outcomes {
    ok: Durations,
    failed: Mutex<Vec<(ErrorKind, Arc<Durations>)>>,
}

impl Outcomes {
    /// Nothing counted yet, usable in a `static`.
    pub(crate) const fn new() -> Outcomes {
        Outcomes {
            ok: Durations::new(),
            failed: Mutex::new(Vec::new()),
        }
    }

    /// Counts a call that took `elapsed` and failed with `failure`, if it
    /// did; nothing while metrics are off.
    #[inline]
    pub(crate) fn observe(&self, elapsed: Duration, failure: Option<ErrorKind>) {
        if !on() {
            return;
        }
        match failure {
            None => self.ok.observe(elapsed),
            Some(kind) => self.failed(kind).observe(elapsed),
        }
    }

    fn failed(&self, kind: ErrorKind) -> Arc<Durations> {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, durations)) = failed.iter().find(|(k, _)| *k == kind) {
            return durations.clone();
        }
        let durations = Arc::new(Durations::new());
        failed.push((kind, durations.clone()));
        durations
    }

    /// Writes one histogram per outcome seen, labelled `code` (`ok` or
    /// the error's kind, as on the wire) besides `labels`.
    pub(crate) fn write(
        &self,
        out: &mut Exposition,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
    ) {
        let mut all = labels.to_vec();
        all.push(("code", "ok"));
        out.histogram(name, help, &all, &self.ok);
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (kind, durations) in failed {
            *all.last_mut().expect("the code label") = ("code", kind.as_str());
            out.histogram(name, help, &all, &durations);
        }
    }
}

impl Default for Outcomes {
    fn default() -> Outcomes {
        Outcomes::new()
    }
}

/// Something that shows metrics: asked to write them at every scrape.
pub(crate) trait Source: Send + Sync {
    /// Fetches what must be asked for (a consumer's pending count) before
    /// [`Source::write`]; bounded by the scrape.
    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }

    /// Writes this source's samples.
    fn write(&self, out: &mut Exposition);

    /// Whether this source takes work now (a worker: serving, not
    /// draining); `None` for sources that take none.
    fn ready(&self) -> Option<bool> {
        None
    }
}

/// `/ready`: serving when some source takes work and none is draining.
fn readiness() -> (&'static str, String) {
    let sources: Vec<Arc<dyn Source>> = SOURCES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    let states: Vec<bool> = sources.iter().filter_map(|s| s.ready()).collect();
    if states.contains(&false) {
        ("503 Service Unavailable", "draining\n".to_owned())
    } else if states.is_empty() {
        ("503 Service Unavailable", "not serving yet\n".to_owned())
    } else {
        ("200 OK", "ready\n".to_owned())
    }
}

/// How long a scrape waits for sources to refresh: a JetStream that does
/// not answer must not make the scrape itself time out.
const REFRESH_WITHIN: Duration = Duration::from_secs(2);

/// The sources of this process. Held weakly: a worker or supervisor that
/// stops drops out of the next scrape.
static SOURCES: Mutex<Vec<Weak<dyn Source>>> = Mutex::new(Vec::new());

/// Adds a source to every later scrape, for as long as it lives.
pub(crate) fn register(source: &Arc<dyn Source>) {
    let mut sources = SOURCES.lock().unwrap_or_else(|e| e.into_inner());
    sources.retain(|s| s.strong_count() > 0);
    sources.push(Arc::downgrade(source));
}

/// Sources that are not tied to one object's life (the caller's counts,
/// kept in the functions' specs): written at every scrape.
type Always = fn(&mut Exposition);

static ALWAYS: Mutex<Vec<Always>> = Mutex::new(Vec::new());

/// Adds `write` to every scrape, once.
pub(crate) fn register_always(write: Always) {
    let mut always = ALWAYS.lock().unwrap_or_else(|e| e.into_inner());
    if !always.iter().any(|w| std::ptr::fn_addr_eq(*w, write)) {
        always.push(write);
    }
}

/// The text exposition format (version 0.0.4) being written: samples are
/// grouped by family, so several sources (two workers in one process) may
/// write the same family.
#[derive(Default)]
pub(crate) struct Exposition {
    families: BTreeMap<&'static str, Family>,
}

struct Family {
    kind: &'static str,
    help: &'static str,
    samples: String,
}

impl Exposition {
    fn family(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
    ) -> &mut String {
        &mut self
            .families
            .entry(name)
            .or_insert_with(|| Family {
                kind,
                help,
                samples: String::new(),
            })
            .samples
    }

    /// A counter's value.
    pub(crate) fn counter(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: u64,
    ) {
        let out = self.family(name, "counter", help);
        sample(out, name, "", labels, None, value as f64);
    }

    /// A gauge's value.
    pub(crate) fn gauge(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        let out = self.family(name, "gauge", help);
        sample(out, name, "", labels, None, value);
    }

    /// A histogram of durations, in seconds.
    pub(crate) fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        durations: &Durations,
    ) {
        let out = self.family(name, "histogram", help);
        let mut count = 0;
        for (i, bucket) in durations.buckets.iter().enumerate() {
            count += bucket.load(Ordering::Relaxed);
            let le = BOUNDS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), f64::to_string);
            sample(out, name, "_bucket", labels, Some(&le), count as f64);
        }
        let sum = durations.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        sample(out, name, "_sum", labels, None, sum);
        sample(out, name, "_count", labels, None, count as f64);
    }

    /// The whole exposition.
    pub(crate) fn render(&self) -> String {
        let mut text = String::new();
        for (name, family) in &self.families {
            let _ = writeln!(text, "# HELP {name} {}", family.help);
            let _ = writeln!(text, "# TYPE {name} {}", family.kind);
            text.push_str(&family.samples);
        }
        text
    }
}

fn sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[(&str, &str)],
    le: Option<&str>,
    value: f64,
) {
    out.push_str(name);
    out.push_str(suffix);
    let le = le.map(|le| ("le", le));
    let mut first = true;
    for (key, value) in labels.iter().copied().chain(le) {
        out.push(if first { '{' } else { ',' });
        first = false;
        let _ = write!(out, "{key}=\"");
        escape(out, value);
        out.push('"');
    }
    if !first {
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Label values escape `\`, `"` and newlines.
fn escape(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Every source's samples now.
pub(crate) async fn scrape() -> String {
    let sources: Vec<Arc<dyn Source>> = SOURCES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    let refreshed = futures_util::future::join_all(sources.iter().map(|s| s.refresh()));
    let _ = tokio::time::timeout(REFRESH_WITHIN, refreshed).await;
    let mut out = Exposition::default();
    let always = ALWAYS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for write in always {
        write(&mut out);
    }
    for source in sources {
        source.write(&mut out);
    }
    out.render()
}

/// The address metrics are served on, once they are.
static SERVING: OnceLock<std::net::SocketAddr> = OnceLock::new();

/// The address this process serves metrics on, if it does.
pub fn address() -> Option<std::net::SocketAddr> {
    SERVING.get().copied()
}

/// Serves Prometheus metrics at `/metrics` on `port` (all interfaces; 0
/// picks a free port) from now on, once per process: a later call returns
/// the address already served. `WHARF_METRICS_PORT` does the same for any
/// wharf process (a worker, `wharf up`, a program that calls); this is for
/// programs that choose the port themselves.
pub async fn serve(port: u16) -> Result<std::net::SocketAddr, Error> {
    static STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _once = STARTING.lock().await;
    if let Some(address) = address() {
        return Ok(address);
    }
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .map_err(|e| {
            let why = if e.kind() == std::io::ErrorKind::AddrInUse {
                "it is in use by another process".to_owned()
            } else {
                e.to_string()
            };
            Error::new(
                ErrorKind::Config,
                format!("cannot serve metrics on port {port} (WHARF_METRICS_PORT): {why}; choose a free port, 0 for any, or unset WHARF_METRICS_PORT"),
            )
            .with_source(e)
        })?;
    let address = listener.local_addr().map_err(|e| {
        Error::new(ErrorKind::Config, format!("metrics listener: {e}")).with_source(e)
    })?;
    ON.store(true, Ordering::Relaxed);
    let _ = SERVING.set(address);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream));
                }
                // Out of file descriptors, say: try again shortly rather
                // than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tracing::info!("serving Prometheus metrics on http://{address}/metrics");
    Ok(address)
}

/// Serves metrics if the settings ask for it (`WHARF_METRICS_PORT`).
pub(crate) async fn serve_if_asked(port: Option<u16>) -> Result<(), Error> {
    match port {
        Some(port) => serve(port).await.map(drop),
        None => Ok(()),
    }
}

/// The most a request head may take: a scraper sends a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;

/// Answers one HTTP/1.x connection: `GET /metrics` (any query) gets the
/// exposition, `GET /ready` 200 or 503 (for a Kubernetes readiness probe),
/// anything else 404 or 405; then the connection closes.
async fn answer(mut stream: tokio::net::TcpStream) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_HEAD {
                return Err(std::io::Error::other(
                    "incomplete or oversized request head",
                ));
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    // A client that sends nothing does not hold a task for long.
    if !matches!(
        tokio::time::timeout(Duration::from_secs(10), read).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    let (status, body) = match (method, path) {
        (b"GET", b"/metrics") => ("200 OK", scrape().await),
        (b"GET", b"/ready") => readiness(),
        (_, b"/metrics" | b"/ready") => ("405 Method Not Allowed", "use GET\n".to_owned()),
        _ => (
            "404 Not Found",
            "metrics are at /metrics, readiness at /ready\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_in_cumulative_buckets_with_their_sum_and_count() {
        let durations = Durations::new();
        durations.observe(Duration::from_micros(50));
        durations.observe(Duration::from_millis(3));
        durations.observe(Duration::from_secs(100));
        let mut out = Exposition::default();
        out.histogram("d_seconds", "help", &[("rpc_method", "a\"b")], &durations);
        let text = out.render();
        assert!(text.contains("# TYPE d_seconds histogram\n"), "{text}");
        assert!(
            text.contains("d_seconds_bucket{rpc_method=\"a\\\"b\",le=\"0.0001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("d_seconds_bucket{rpc_method=\"a\\\"b\",le=\"0.005\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("d_seconds_bucket{rpc_method=\"a\\\"b\",le=\"60\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("d_seconds_bucket{rpc_method=\"a\\\"b\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("d_seconds_count{rpc_method=\"a\\\"b\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("d_seconds_sum{rpc_method=\"a\\\"b\"} 100.00305\n"),
            "{text}"
        );
    }

    #[test]
    fn a_family_written_by_two_sources_is_one_block() {
        let mut out = Exposition::default();
        out.gauge("g", "a gauge", &[("worker", "1")], 1.0);
        out.counter("c_total", "a counter", &[], 7);
        out.gauge("g", "a gauge", &[("worker", "2")], 2.5);
        let text = out.render();
        assert_eq!(
            text,
            "# HELP c_total a counter\n# TYPE c_total counter\nc_total 7\n\
             # HELP g a gauge\n# TYPE g gauge\ng{worker=\"1\"} 1\ng{worker=\"2\"} 2.5\n"
        );
    }
}
