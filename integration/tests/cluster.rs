//! wharf on a three-node JetStream cluster in containers (production
//! profile: fsync before every acknowledgement), a worker container
//! attached to each node and a caller on each, under 64-way load, through
//! each node fault in turn: killed (`docker kill`) and restarted, paused
//! (`docker pause`), and partitioned away (`docker network disconnect`)
//! and healed. Durable calls lose nothing and none is stuck; idempotent
//! calls never fail; other plain calls fail only as `connection_lost` or
//! `worker_lost` (they may have run), each within 2 s. Each test prints
//! `REPORT` lines: calls, lost, duplicates, failures by kind, and the
//! outage window (from the fault to calls flowing again).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wharf::settings::Credentials;
use wharf::testing::eventually;
use wharf::{Client, ErrorKind, RetryPolicy};
use wharf_integration::cluster::{Cluster, Profile};
use wharf_integration::{add, echo_slowly, tally, TALLY_BUCKET};

/// Calls in flight at once, over the three callers.
const IN_FLIGHT: usize = 64;

/// How long calls flow before the fault, and after the heal.
const CALM: Duration = Duration::from_secs(3);

/// How long a fault lasts before it is healed.
const FAULT: Duration = Duration::from_secs(5);

/// The most a failed call that is not idempotent may take.
const FAIL_FAST: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Durable,
    Idempotent,
    Plain,
}

/// One call: what, through which caller, when, and how it ended.
struct Outcome {
    kind: Kind,
    /// The call's number (its argument).
    n: u64,
    caller: usize,
    started: Instant,
    ended: Instant,
    failure: Option<(ErrorKind, String)>,
}

/// What a scenario does to node `victim` and how it undoes it.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill,
    Pause,
    Partition,
}

/// Runs calls through `callers` until `stop`, 64 at a time.
async fn load(callers: Vec<Client>, stop: Arc<AtomicBool>) -> Vec<Outcome> {
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|task| {
            let client = callers[task % callers.len()].clone();
            let caller = task % callers.len();
            let (stop, next, outcomes) = (stop.clone(), next.clone(), outcomes.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let kind = match n % 3 {
                        0 => Kind::Durable,
                        1 => Kind::Idempotent,
                        _ => Kind::Plain,
                    };
                    let started = Instant::now();
                    let failure = match kind {
                        Kind::Durable => tally::request(n, 0)
                            .client(&client)
                            .timeout(Duration::from_secs(60))
                            .retry(RetryPolicy::attempts(100).unwrap())
                            .await
                            .map(|got| assert_eq!(got, n))
                            .err(),
                        Kind::Idempotent => echo_slowly::request(n, 1)
                            .client(&client)
                            .timeout(Duration::from_secs(30))
                            .retry(RetryPolicy::attempts(100).unwrap())
                            .await
                            .map(|got| assert_eq!(got, n))
                            .err(),
                        Kind::Plain => add::request(n as i64, 1)
                            .client(&client)
                            .timeout(Duration::from_secs(30))
                            .await
                            .map(|got| assert_eq!(got, n as i64 + 1))
                            .err(),
                    };
                    outcomes.lock().unwrap().push(Outcome {
                        kind,
                        n,
                        caller,
                        started,
                        ended: Instant::now(),
                        failure: failure.map(|e| (e.kind(), e.to_string())),
                    });
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a load task panicked");
    }
    Arc::try_unwrap(outcomes)
        .ok()
        .expect("every task is done")
        .into_inner()
        .unwrap()
}

/// The node (0-based) that leads the stream `stream`.
async fn leader_of(client: &Client, stream: &str) -> usize {
    let js = async_nats::jetstream::new(client.nats().clone());
    let info = eventually(
        &format!("stream `{stream}` to have a leader"),
        Duration::from_secs(30),
        || {
            let js = js.clone();
            async move {
                let mut stream = js.get_stream(stream).await.map_err(|e| e.to_string())?;
                let info = stream.info().await.map_err(|e| e.to_string())?;
                info.cluster
                    .as_ref()
                    .and_then(|c| c.leader.clone())
                    .map(|leader| (leader, info.config.num_replicas))
                    .ok_or_else(|| "no leader yet".to_owned())
            }
        },
    )
    .await;
    assert_eq!(info.1, 3, "`{stream}` has {} replicas, not 3", info.1);
    let node: usize = info
        .0
        .rsplit('n')
        .next()
        .and_then(|i| i.parse().ok())
        .unwrap();
    node - 1
}

/// How many times each of `calls` durable calls ran (0: never).
async fn runs(client: &Client, calls: &[u64]) -> BTreeMap<u64, u64> {
    let js = async_nats::jetstream::new(client.nats().clone());
    // Read from the stream's leader: a KV get is a direct get, which any
    // replica answers, and one that rejoined after the fault may not have
    // caught up yet (a count read there as absent is not a lost call).
    let stream = js
        .get_stream_no_info(wharf::wire::subjects::kv_stream(TALLY_BUCKET))
        .await
        .unwrap();
    let mut runs = BTreeMap::new();
    for n in calls {
        let count = eventually(
            &format!("the run count of call {n}"),
            Duration::from_secs(30),
            || {
                let stream = stream.clone();
                async move {
                    use async_nats::jetstream::stream::LastRawMessageErrorKind;
                    let subject = wharf::wire::subjects::kv_key(TALLY_BUCKET, &n.to_string());
                    match stream.get_last_raw_message_by_subject(&subject).await {
                        Ok(m) => Ok(String::from_utf8_lossy(&m.payload).parse().unwrap_or(0)),
                        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
                        Err(e) => Err(e.to_string()),
                    }
                }
            },
        )
        .await;
        runs.insert(*n, count);
    }
    runs
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn scenario(fault: Fault) {
    let stem = format!("{fault:?}").to_lowercase();
    let Some(mut cluster) = Cluster::start(&stem, Profile::Production).await else {
        return;
    };
    let prefix = cluster.name.replace('-', "_");
    for node in 0..3 {
        cluster
            .worker(
                node,
                &[
                    ("WHARF_PREFIX", prefix.as_str()),
                    ("WHARF_SERVER_ORDER", "listed"),
                    // A call held by a worker that was cut off is
                    // redelivered soon.
                    ("WHARF_ACK_WAIT", "3s"),
                ],
            )
            .await;
    }
    // One caller attached to each node (the others are its fallbacks).
    let mut callers = Vec::new();
    for node in 0..3 {
        let credentials = Credentials {
            servers_in_order: true,
            ..Credentials::default()
        };
        let client = Client::connect_with(&cluster.urls_from(node), &credentials)
            .await
            .unwrap()
            .with_prefix(&prefix);
        callers.push(client);
    }
    // The run counts survive a node too.
    let js = async_nats::jetstream::new(callers[0].nats().clone());
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: TALLY_BUCKET.to_owned(),
        history: 1,
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    // Every worker serves, plain and durable (which makes the streams).
    let instances = eventually(
        "a worker on each node to answer",
        Duration::from_secs(60),
        || {
            let callers = callers.clone();
            async move {
                let mut seen = std::collections::BTreeSet::new();
                for client in callers.iter().cycle().take(60) {
                    let reply = add::request(1, 1)
                        .client(client)
                        .send_detailed()
                        .await
                        .map_err(|e| e.to_string())?;
                    seen.insert(reply.instance.unwrap_or_default());
                }
                tally::request(u64::MAX, 0)
                    .client(&callers[0])
                    .await
                    .map_err(|e| e.to_string())?;
                if seen.len() == 3 {
                    Ok(seen)
                } else {
                    Err(format!("instances answering: {seen:?}"))
                }
            }
        },
    )
    .await;
    assert_eq!(instances.len(), 3);
    // The node that holds the calls stream: the one whose loss matters most.
    let stream = wharf::wire::subjects::calls_stream(&prefix, "itest");
    let victim = leader_of(&callers[0], &stream).await;

    let attached: Vec<String> = callers
        .iter()
        .map(|c| c.nats().server_info().server_name)
        .collect();
    wharf_integration::report!("REPORT cluster {stem}: callers attached to {attached:?}");
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(callers.clone(), stop.clone()));
    tokio::time::sleep(CALM).await;
    match fault {
        Fault::Kill => cluster.kill(victim),
        Fault::Pause => cluster.pause(victim).await,
        Fault::Partition => cluster.partition(victim),
    }
    // When the fault is in place.
    let at = Instant::now();
    tokio::time::sleep(FAULT).await;
    match fault {
        Fault::Kill => cluster.restart(victim).await,
        Fault::Pause => cluster.unpause(victim).await,
        Fault::Partition => cluster.heal(victim),
    }
    tokio::time::sleep(CALM).await;
    stop.store(true, Ordering::Relaxed);
    let outcomes = running.await.unwrap();

    // What happened to each kind.
    let mut failures: BTreeMap<(Kind, &'static str), usize> = BTreeMap::new();
    let mut examples: BTreeMap<(Kind, &'static str), &str> = BTreeMap::new();
    let mut slow_failures = Vec::new();
    for outcome in &outcomes {
        if let Some((kind, text)) = &outcome.failure {
            *failures.entry((outcome.kind, kind.as_str())).or_default() += 1;
            examples
                .entry((outcome.kind, kind.as_str()))
                .or_insert(text);
            let took = outcome.ended - outcome.started;
            if outcome.kind == Kind::Plain && took > FAIL_FAST {
                slow_failures.push(format!("{kind} after {took:?}: {text}"));
            }
        }
    }
    let durable: Vec<u64> = outcomes
        .iter()
        .filter(|o| o.kind == Kind::Durable)
        .map(|o| o.n)
        .collect();
    let durable_calls = durable.len();
    let tallied = runs(&callers[(victim + 1) % 3], &durable).await;
    let lost = tallied.values().filter(|runs| **runs == 0).count();
    let duplicates: u64 = tallied.values().map(|runs| runs.saturating_sub(1)).sum();
    // The outage window of each caller and kind: the longest time without
    // a call going through, from the fault on (calls flowing again).
    let mut outages: BTreeMap<Kind, Vec<Duration>> = BTreeMap::new();
    for kind in [Kind::Durable, Kind::Idempotent, Kind::Plain] {
        for caller in 0..3 {
            let mut ends: Vec<Instant> = outcomes
                .iter()
                .filter(|o| o.kind == kind && o.caller == caller && o.failure.is_none())
                .map(|o| o.ended)
                .filter(|ended| *ended >= at)
                .collect();
            ends.sort();
            let mut last = at;
            let mut window = Duration::ZERO;
            for ended in ends {
                window = window.max(ended - last);
                last = ended;
            }
            wharf_integration::report!("REPORT cluster {stem} caller {caller} {kind:?}: at most {window:?} without a call through, from the fault on");
            outages.entry(kind).or_default().push(window);
        }
    }
    for windows in outages.values_mut() {
        windows.sort();
    }
    wharf_integration::report!("REPORT cluster {stem} of node {} (the calls stream's leader): {} calls ({durable_calls} durable), {lost} durable lost, {duplicates} duplicates, failures {failures:?}",
        victim + 1,
        outcomes.len(),
    );
    for kind in [Kind::Durable, Kind::Idempotent, Kind::Plain] {
        let mut took: Vec<Duration> = outcomes
            .iter()
            .filter(|o| o.kind == kind && o.failure.is_none())
            .map(|o| o.ended - o.started)
            .collect();
        took.sort();
        wharf_integration::report!("REPORT cluster {stem} {kind:?} calls: {} went through, latency p50 {:?}, p99 {:?}, max {:?}",
            took.len(),
            percentile(&took, 0.5),
            percentile(&took, 0.99),
            percentile(&took, 1.0)
        );
    }
    for (kind, windows) in &outages {
        wharf_integration::report!(
            "REPORT cluster {stem} outage window, {kind:?} calls: p50 {:?}, max {:?}",
            percentile(windows, 0.5),
            percentile(windows, 1.0)
        );
    }
    for ((kind, error), text) in &examples {
        wharf_integration::report!("REPORT cluster {stem} e.g. {kind:?} {error}: {text}");
    }
    assert_eq!(lost, 0, "durable calls lost");
    for ((kind, error), count) in &failures {
        match kind {
            Kind::Durable | Kind::Idempotent => {
                panic!("{count} {kind:?} calls failed as {error}")
            }
            Kind::Plain => assert!(
                [
                    ErrorKind::ConnectionLost.as_str(),
                    ErrorKind::WorkerLost.as_str()
                ]
                .contains(error),
                "{count} plain calls failed as {error}, not as a lost connection or worker"
            ),
        }
    }
    assert!(
        slow_failures.is_empty(),
        "plain calls failed slower than {FAIL_FAST:?}: {slow_failures:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_and_restarted_under_load() {
    scenario(Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_under_load() {
    scenario(Fault::Pause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_partitioned_away_and_healed_under_load() {
    scenario(Fault::Partition).await;
}

/// Now, in unix milliseconds (the clock events are stamped with).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Kills, when dropped, every process started under a supervisor: those
/// seen by [`Reaped::note`] (an instance may outlive its supervisor: a
/// supervisor that is not sure it leads stops none) and those still under
/// it. Made right after the supervisor's own guard, it drops first.
struct Reaped {
    supervisor: u32,
    seen: Vec<u32>,
}

impl Reaped {
    fn new(supervisor: u32) -> Reaped {
        Reaped {
            supervisor,
            seen: Vec::new(),
        }
    }

    /// Remembers the supervisor's instances as they are now.
    fn note(&mut self) {
        for pid in wharf_integration::descendants(self.supervisor) {
            if !self.seen.contains(&pid) {
                self.seen.push(pid);
            }
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        self.note();
        for pid in &self.seen {
            wharf::process::kill(*pid);
        }
    }
}

/// Every supervisor event heard through `client`, as it comes.
async fn hear_events(client: &Client, heard: Arc<Mutex<Vec<wharf::supervisor::Event>>>) {
    use futures_util::StreamExt;
    let mut events = client
        .nats()
        .subscribe(wharf::wire::subjects::events(client.prefix()))
        .await
        .unwrap();
    client.nats().flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(message) = events.next().await {
            if let Ok(event) = serde_json::from_slice(&message.payload) {
                let mut heard = heard.lock().unwrap();
                if !heard.contains(&event) {
                    heard.push(event);
                }
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_cut_off_from_the_quorum_stops_acting_and_another_takes_over() {
    use wharf::supervisor::EventKind;
    let Some(cluster) = Cluster::start("fence", Profile::Default).await else {
        return;
    };
    let prefix = cluster.name.replace('-', "_");
    let dir = wharf::testing::TempDir::new("fence");
    // The instances sit on the majority side; each supervisor on its node.
    let majority = format!("{},{}", cluster.url(1), cluster.url(2));
    let config = |node: usize| {
        let path = dir.path().join(format!("wharf-{node}.toml"));
        std::fs::write(
            &path,
            format!(
                "[broker]\nurl = \"{}\"\nprefix = \"{prefix}\"\n\n[[service]]\nname = \"itest\"\n\
                 command = [\"{}\", \"worker\"]\nmin = 2\nmax = 2\nenv = {{ NATS_URL = \"{majority}\" }}\n",
                cluster.url(node),
                wharf_integration::svc_binary().display()
            ),
        )
        .unwrap();
        path.to_string_lossy().into_owned()
    };
    let (config_1, config_2) = (config(0), config(1));
    let heard = Arc::new(Mutex::new(Vec::new()));
    let on_1 = Client::connect(&cluster.url(0))
        .await
        .unwrap()
        .with_prefix(&prefix);
    let on_2 = Client::connect(&cluster.url(1))
        .await
        .unwrap()
        .with_prefix(&prefix);
    hear_events(&on_1, heard.clone()).await;
    hear_events(&on_2, heard.clone()).await;
    let saw = |supervisor: u32, kind: EventKind, after_ms: u64| {
        let heard = heard.clone();
        move || {
            let heard = heard.lock().unwrap();
            let found = heard
                .iter()
                .find(|e| {
                    e.kind == kind
                        && e.at_ms >= after_ms
                        && e.supervisor.starts_with(&format!("{supervisor}-"))
                })
                .cloned();
            let recent: Vec<String> = heard
                .iter()
                .rev()
                .take(8)
                .map(|e| format!("{} {} {}", e.supervisor, e.kind, e.reason))
                .collect();
            async move { found.ok_or_else(|| format!("latest events: {recent:?}")) }
        }
    };

    // The first supervisor leads and starts two instances; the second stands by.
    let first = wharf_integration::spawn_svc(&["supervise", &config_1], &[]);
    let mut first_instances = Reaped::new(first.pid());
    eventually(
        "the first supervisor to lead",
        Duration::from_secs(60),
        saw(first.pid(), EventKind::Leader, 0),
    )
    .await;
    let second = wharf_integration::spawn_svc(&["supervise", &config_2], &[]);
    let mut second_instances = Reaped::new(second.pid());
    eventually(
        "the second supervisor to stand by",
        Duration::from_secs(60),
        saw(second.pid(), EventKind::Standby, 0),
    )
    .await;
    let instances = eventually(
        "two instances of the first supervisor to serve",
        Duration::from_secs(60),
        || {
            let started = wharf_integration::descendants(first.pid());
            async move {
                if started.len() == 2 {
                    Ok(started)
                } else {
                    Err(format!("instances: {started:?}"))
                }
            }
        },
    )
    .await;
    first_instances.note();
    wharf_integration::wait_for_workers(&on_2, 2).await;

    // Cut the first supervisor's node off, and lose an instance with it.
    cluster.partition(0);
    let cut_ms = now_ms();
    wharf::process::kill(instances[0]);
    // It stops acting; the second takes the lease and runs two instances
    // again: the survivor adopted, the lost one replaced (by the first,
    // when it saw the loss while its lease still surely held, or by the
    // second).
    let fenced = eventually(
        "the cut-off supervisor to stop acting",
        Duration::from_secs(30),
        saw(first.pid(), EventKind::Standby, cut_ms),
    )
    .await;
    let leads = eventually(
        "the second supervisor to take the lease",
        Duration::from_secs(90),
        saw(second.pid(), EventKind::Leader, cut_ms),
    )
    .await;
    eventually(
        "the second supervisor to adopt the surviving instance",
        Duration::from_secs(60),
        saw(second.pid(), EventKind::Adopt, leads.at_ms),
    )
    .await;
    eventually(
        "the second supervisor to run two instances (adopted or started)",
        Duration::from_secs(60),
        || {
            let heard = heard.lock().unwrap();
            let mine: Vec<_> = heard
                .iter()
                .filter(|e| {
                    e.supervisor.starts_with(&format!("{}-", second.pid()))
                        && e.at_ms >= leads.at_ms
                })
                .collect();
            let running = mine
                .iter()
                .filter(|e| matches!(e.kind, EventKind::Adopt | EventKind::Start))
                .count();
            let mine: Vec<String> = mine
                .iter()
                .map(|e| format!("{} {}", e.kind, e.reason))
                .collect();
            async move {
                if running >= 2 {
                    Ok(())
                } else {
                    Err(format!("its events since it leads: {mine:?}"))
                }
            }
        },
    )
    .await;
    first_instances.note();
    second_instances.note();
    wharf_integration::wait_for_workers(&on_2, 2).await;
    // Healed, either may lead later (a lease the second cannot renew on a
    // loaded cluster lapses), but never both at once.
    cluster.heal(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut heard = heard.lock().unwrap().clone();
    heard.sort_by_key(|e| e.at_ms);
    let of = |pid: u32| format!("{pid}-");
    let last_act = heard
        .iter()
        .filter(|e| e.supervisor.starts_with(&of(first.pid())) && acts(e.kind))
        .filter(|e| e.at_ms < leads.at_ms)
        .map(|e| e.at_ms)
        .max()
        .unwrap_or(0);
    wharf_integration::report!("REPORT fencing: partitioned at {cut_ms}; the cut-off supervisor's last action at {last_act}, it stopped at {} ({} ms after the cut), the other led at {} ({} ms after the cut)",
        fenced.at_ms,
        fenced.at_ms.saturating_sub(cut_ms),
        leads.at_ms,
        leads.at_ms.saturating_sub(cut_ms)
    );
    assert!(
        last_act < fenced.at_ms && fenced.at_ms < leads.at_ms,
        "the supervisors' actions overlap: {heard:#?}"
    );
    if let Err(overlap) = one_acts_at_a_time(&heard) {
        panic!("{overlap}: {heard:#?}");
    }
    // Stopped, the one that leads drains what it runs; a standby exits at once.
    first_instances.note();
    second_instances.note();
    wharf_integration::signal(second.pid(), libc::SIGTERM);
    assert!(second.exit_status().await.success());
    wharf_integration::signal(first.pid(), libc::SIGTERM);
    assert!(first.exit_status().await.success());
}

/// Whether the events `heard` (in time order) show supervisors acting only
/// while they lead, and taking the lease only while no other leads; a
/// lease lapses with the `standby` event that says so.
fn one_acts_at_a_time(heard: &[wharf::supervisor::Event]) -> Result<(), String> {
    use wharf::supervisor::EventKind;
    let mut leading: std::collections::HashMap<&str, bool> = Default::default();
    for e in heard {
        match e.kind {
            EventKind::Leader => {
                if let Some((other, _)) = leading
                    .iter()
                    .find(|(other, leads)| **leads && **other != e.supervisor)
                {
                    return Err(format!(
                        "{} took the lease at {} while {other} led",
                        e.supervisor, e.at_ms
                    ));
                }
                leading.insert(&e.supervisor, true);
            }
            EventKind::Standby => {
                leading.insert(&e.supervisor, false);
            }
            kind if acts(kind) && !leading.get(e.supervisor.as_str()).copied().unwrap_or(false) => {
                return Err(format!(
                    "{} acted ({kind}) at {} without the lease",
                    e.supervisor, e.at_ms
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether an event of `kind` is a supervisor acting on instances.
fn acts(kind: wharf::supervisor::EventKind) -> bool {
    use wharf::supervisor::EventKind;
    matches!(
        kind,
        EventKind::Start
            | EventKind::Drain
            | EventKind::Killed
            | EventKind::Hung
            | EventKind::Adopt
    )
}

/// Replicas and leader of stream `name`.
async fn layout_of(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> (usize, String, Vec<String>) {
    let info = eventually(
        &format!("stream `{name}` to exist with a leader"),
        Duration::from_secs(60),
        || {
            let js = js.clone();
            async move {
                let mut stream = js.get_stream(name).await.map_err(|e| e.to_string())?;
                let info = stream.info().await.map_err(|e| e.to_string())?;
                match info.cluster.as_ref().and_then(|c| c.leader.clone()) {
                    Some(_) => Ok(info.clone()),
                    None => Err("no leader yet".to_owned()),
                }
            }
        },
    )
    .await;
    let tags = info
        .config
        .placement
        .as_ref()
        .map(|p| p.tags.clone())
        .unwrap_or_default();
    (
        info.config.num_replicas,
        info.cluster.and_then(|c| c.leader).unwrap_or_default(),
        tags,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_and_bucket_is_replicated_on_a_cluster() {
    let Some(mut cluster) = Cluster::start("replicas", Profile::Default).await else {
        return;
    };
    let prefix = cluster.name.replace('-', "_");
    let client = Client::connect(&cluster.urls_from(0))
        .await
        .unwrap()
        .with_prefix(&prefix);
    let js = async_nats::jetstream::new(client.nats().clone());
    // A bucket made before, by hand, with one replica: left alone by
    // processes with the default count, raised by one that asks for three.
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: wharf::wire::subjects::OBJECTS_BUCKET.to_owned(),
        history: 1,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    // A worker (with a transaction and an object) makes the rest.
    cluster
        .worker(1, &[("WHARF_PREFIX", prefix.as_str())])
        .await;
    wharf_integration::wait_for_workers(&client, 1).await;
    assert_eq!(
        tally::request(1, 0).client(&client).await.unwrap(),
        1,
        "a durable call goes through"
    );
    // Small (KV) and large (Object Store).
    let objects = wharf::objects::Objects::new(&client).unwrap();
    for size in [10, 300 * 1024] {
        let data = bytes::Bytes::from(vec![7u8; size]);
        let stored = objects.put_bytes(data.clone()).await.unwrap();
        assert_eq!(stored.bytes_with(&client).await.unwrap(), data);
    }
    let txn = client.transaction().await.unwrap();
    txn.end().await.unwrap();
    let objects_stream = wharf::wire::subjects::kv_stream(wharf::wire::subjects::OBJECTS_BUCKET);
    assert_eq!(
        layout_of(&js, &objects_stream).await.0,
        1,
        "raised without being asked"
    );
    let url = cluster.urls_from(0);
    let asked = wharf_integration::spawn_svc(
        &["put-object"],
        &[
            ("NATS_URL", url.as_str()),
            ("WHARF_PREFIX", prefix.as_str()),
            ("WHARF_REPLICAS", "3"),
        ],
    );
    assert!(asked.exit_status().await.success(), "svc put-object failed");
    let streams = [
        wharf::wire::subjects::calls_stream(&prefix, "itest"),
        wharf::wire::subjects::dead_letter_stream(&prefix),
        wharf::wire::subjects::kv_stream(&wharf::wire::subjects::results_bucket("itest")),
        wharf::wire::subjects::kv_stream(wharf::wire::subjects::INSTANCES_BUCKET),
        wharf::wire::subjects::kv_stream(wharf::wire::subjects::TXN_BUCKET),
        wharf::wire::subjects::kv_stream(wharf::wire::subjects::OBJECTS_BUCKET),
        wharf::wire::subjects::object_store_stream(wharf::wire::subjects::BLOBS_BUCKET),
    ];
    for stream in &streams {
        let (replicas, leader, _) = layout_of(&js, stream).await;
        wharf_integration::report!("REPORT replicas: {stream} has {replicas}, led by {leader}");
        assert_eq!(replicas, 3, "`{stream}` has {replicas} replicas");
    }

    // Asked for one replica, placed by tag: on node 3 alone.
    let placed = format!("{prefix}_placed");
    cluster
        .worker(
            0,
            &[
                ("WHARF_PREFIX", placed.as_str()),
                ("WHARF_REPLICAS", "1"),
                ("WHARF_PLACEMENT", "node:3"),
            ],
        )
        .await;
    let (replicas, leader, tags) =
        layout_of(&js, &wharf::wire::subjects::calls_stream(&placed, "itest")).await;
    assert_eq!((replicas, tags), (1, vec!["node:3".to_owned()]));
    assert!(leader.ends_with("-n3"), "placed on {leader}, not node 3");
}
