//! The supervisor with real worker processes: a killed worker is replaced,
//! a hung one is killed and replaced, load scales a service up and back
//! down, and a standby supervisor takes over from a killed leader without
//! duplicating instances. The supervisors run as `svc supervise`
//! processes, so they too can be killed for real.

use futures_util::StreamExt;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wharf::heartbeat::Heartbeat;
use wharf::supervisor::Event;
use wharf::testing::NatsServer;
use wharf::testing::{eventually, holds_for};
use wharf::Client;
use wharf_integration::{
    accumulate, burn, descendants, echo_slowly, hang, remove_containers, signal, spawn_svc,
    svc_binary, svc_image, unique_name, versioned, WorkerProcess, SVC_IMAGE,
};

/// How the instances run.
#[derive(Clone, Copy, PartialEq)]
enum Runs {
    Processes,
    Containers,
    /// Tasks of a Docker Swarm service.
    Swarm,
}

impl Runs {
    fn name(self) -> &'static str {
        match self {
            Runs::Processes => "process",
            Runs::Containers => "container",
            Runs::Swarm => "swarm",
        }
    }
}

/// A `wharf.toml` for service `itest` served by `svc worker`.
fn config(dir: &std::path::Path, url: &str, runs: Runs, extra: &str) -> std::path::PathBuf {
    let path = dir.join("wharf.toml");
    let backend = match runs {
        Runs::Processes => format!("command = [\"{}\", \"worker\"]", svc_binary().display()),
        Runs::Containers => {
            format!("backend = \"docker\"\nimage = \"{SVC_IMAGE}\"\ncommand = [\"worker\"]")
        }
        Runs::Swarm => {
            format!("backend = \"swarm\"\nimage = \"{SVC_IMAGE}\"\ncommand = [\"worker\"]")
        }
    };
    let text =
        format!("[broker]\nurl = \"{url}\"\n\n[[service]]\nname = \"itest\"\n{backend}\n{extra}\n");
    std::fs::write(&path, text).unwrap();
    path
}

/// Everything a test starts, stopped when it ends, even on a panic: the
/// supervisors are asked down, and every worker pid seen is killed.
struct Scene {
    runs: Runs,
    server: NatsServer,
    client: Client,
    /// This scene's own subject prefix, which also labels its containers.
    prefix: String,
    dir: wharf::testing::TempDir,
    supervisors: Vec<WorkerProcess>,
    /// Worker processes, or containers, seen in heartbeats.
    seen: Arc<Mutex<HashSet<Place>>>,
    events: Arc<Mutex<Vec<Event>>>,
}

/// Where an instance runs.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Place {
    Pid(u32),
    Container(String),
}

impl Place {
    fn of(beat: &Heartbeat) -> Place {
        match &beat.container {
            // A Swarm task's container, by its task id.
            Some(name) => match name.strip_prefix(wharf::backend::swarm::TASK_PREFIX) {
                Some(task) => {
                    let found = std::process::Command::new("docker")
                        .args(["ps", "--all", "--quiet", "--filter"])
                        .arg(format!("label=com.docker.swarm.task.id={task}"))
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                        .unwrap_or_default();
                    Place::Container(found)
                }
                None => Place::Container(name.clone()),
            },
            None => Place::Pid(beat.pid),
        }
    }

    /// SIGKILL, to the process or the container.
    fn kill(&self) {
        match self {
            Place::Pid(pid) => signal(*pid, libc::SIGKILL),
            Place::Container(name) => {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "--force", name])
                    .output();
            }
        }
    }

    fn alive(&self) -> bool {
        match self {
            Place::Pid(pid) => wharf_integration::alive(*pid),
            Place::Container(name) => std::process::Command::new("docker")
                .args(["inspect", "--format", "{{.State.Running}}", name])
                .output()
                .is_ok_and(|o| o.stdout.starts_with(b"true")),
        }
    }
}

impl Scene {
    /// A scene, or `None` when containers are asked for and Docker is
    /// missing (and not required).
    async fn new(runs: Runs) -> Option<Scene> {
        if runs != Runs::Processes {
            svc_image()?;
        }
        let server = NatsServer::start().unwrap();
        let prefix = unique_name("sup");
        let client = Client::connect(&server.url())
            .await
            .unwrap()
            .with_prefix(&prefix);
        let dir = wharf::testing::TempDir::new(&prefix);
        let events = Arc::new(Mutex::new(Vec::new()));
        let mut feed = client
            .nats()
            .subscribe(wharf::wire::subjects::events(&prefix))
            .await
            .unwrap();
        let log = events.clone();
        tokio::spawn(async move {
            while let Some(message) = feed.next().await {
                if let Ok(event) = serde_json::from_slice(&message.payload) {
                    log.lock().unwrap().push(event);
                }
            }
        });
        client.nats().flush().await.unwrap();
        Some(Scene {
            runs,
            server,
            client,
            prefix,
            dir,
            supervisors: Vec::new(),
            seen: Arc::default(),
            events,
        })
    }

    /// Starts a supervisor (`svc supervise`) of the config at `path`.
    fn supervise_file(&mut self, path: &std::path::Path) -> u32 {
        let supervisor = spawn_svc(
            &["supervise", path.to_str().unwrap()],
            &[("WHARF_PREFIX", &self.prefix)],
        );
        let pid = supervisor.pid();
        self.supervisors.push(supervisor);
        pid
    }

    fn supervise(&mut self, extra: &str) -> u32 {
        let path = config(self.dir.path(), &self.server.url(), self.runs, extra);
        self.supervise_file(&path)
    }

    /// Live (fresh, not draining) instances of `itest`.
    async fn live(&self) -> Vec<Heartbeat> {
        // A read that fails (JetStream slow to answer under load) is tried
        // again rather than taken for no instances.
        let all = eventually(
            "the instances to be read",
            Duration::from_secs(10),
            || async {
                wharf::supervisor::instances(&self.client)
                    .await
                    .map_err(|e| e.to_string())
            },
        )
        .await;
        let live: Vec<Heartbeat> = all
            .into_iter()
            .filter(|b| b.services.iter().any(|s| s == "itest") && !b.draining)
            .collect();
        self.seen.lock().unwrap().extend(live.iter().map(Place::of));
        live
    }

    /// Waits until `check` holds for the live instances; the failure names
    /// what was awaited, the live instances and every event so far.
    async fn wait_for(
        &self,
        what: &str,
        within: Duration,
        check: impl Fn(&[Heartbeat]) -> bool,
    ) -> Vec<Heartbeat> {
        eventually(what, within, || async {
            let live = self.live().await;
            if check(&live) {
                Ok(live)
            } else {
                Err(self.seen_so_far(&live))
            }
        })
        .await
    }

    /// Waits until at least `count` events of `kind` were published.
    async fn wait_for_events(&self, kind: &str, count: usize, within: Duration) -> Vec<Event> {
        eventually(&format!("{count} `{kind}` events"), within, || async {
            let events = self.events_of(kind);
            if events.len() >= count {
                Ok(events)
            } else {
                Err(self.seen_so_far(&self.live().await))
            }
        })
        .await
    }

    /// `Ok` while the supervisors have started exactly `starts` instances
    /// and none has exited, hung, been killed or drained.
    fn no_changes_since(&self, starts: usize) -> Result<(), String> {
        let started = self.events_of("start").len();
        let gone: usize = ["exited", "hung", "killed", "drain"]
            .iter()
            .map(|kind| self.events_of(kind).len())
            .sum();
        if started == starts && gone == 0 {
            Ok(())
        } else {
            Err(self.seen_so_far(&[]))
        }
    }

    /// The live instances and the events so far, for failure messages.
    fn seen_so_far(&self, live: &[Heartbeat]) -> String {
        let events = self.events.lock().unwrap();
        format!(
            "live instances: {:?}; events: {:#?}",
            live.iter().map(|b| &b.instance).collect::<Vec<_>>(),
            events
                .iter()
                .map(|e| format!(
                    "{} {} {}: {}",
                    e.kind,
                    e.service.as_deref().unwrap_or("-"),
                    e.instance.as_deref().unwrap_or("-"),
                    e.reason
                ))
                .collect::<Vec<_>>()
        )
    }

    fn events_of(&self, kind: &str) -> Vec<Event> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.kind == kind)
            .cloned()
            .collect()
    }

    async fn down(&mut self) {
        let request = async_nats::Request::new().timeout(Some(Duration::from_secs(5)));
        let _ = self
            .client
            .nats()
            .send_request(
                wharf::wire::subjects::supervisor_down(&self.prefix),
                request,
            )
            .await;
        for supervisor in self.supervisors.drain(..) {
            let status = supervisor.exit_status().await;
            assert!(status.success(), "the supervisor exits cleanly: {status}");
        }
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        // Whatever the test left running, even when it failed: the
        // supervisors, everything they started (seen in a heartbeat yet or
        // not), and every container labelled with this scene's prefix.
        let mut started: Vec<u32> = Vec::new();
        for supervisor in &mut self.supervisors {
            started.extend(descendants(supervisor.pid()));
            supervisor.kill();
        }
        for pid in started {
            signal(pid, libc::SIGKILL);
        }
        for place in self.seen.lock().unwrap().iter() {
            if place.alive() {
                place.kill();
            }
        }
        let label = format!("{}={}", wharf::backend::docker::PREFIX_LABEL, self.prefix);
        if self.runs == Runs::Swarm {
            // Its Swarm service first, which would start tasks again.
            if let Ok(services) = wharf_integration::try_docker(&[
                "service",
                "ls",
                "--quiet",
                "--filter",
                &format!("label={label}"),
            ]) {
                for service in services.split_whitespace() {
                    let _ = wharf_integration::try_docker(&["service", "rm", service]);
                }
            }
            let _ = eventually_blocking_gone(&label);
            if let Ok(secrets) = wharf_integration::try_docker(&[
                "secret",
                "ls",
                "--quiet",
                "--filter",
                &format!("label={label}"),
            ]) {
                for secret in secrets.split_whitespace() {
                    let _ = wharf_integration::try_docker(&["secret", "rm", secret]);
                }
            }
        }
        if self.runs != Runs::Processes {
            remove_containers(&label);
        }
    }
}

/// Waits (up to a minute) until no container carries `label`: a removed
/// Swarm service's tasks stop on their own, draining.
fn eventually_blocking_gone(label: &str) -> bool {
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        let left = wharf_integration::try_docker(&[
            "ps",
            "--quiet",
            "--filter",
            &format!("label={label}"),
        ])
        .unwrap_or_default();
        if left.trim().is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// This Docker engine in swarm mode for a test, and out of it again
/// afterwards (even when the test fails) if the test put it there.
struct SwarmMode {
    joined: bool,
}

impl SwarmMode {
    fn enter() -> SwarmMode {
        let state = wharf_integration::docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
        if state.trim() == "active" {
            return SwarmMode { joined: false };
        }
        wharf_integration::docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
        SwarmMode { joined: true }
    }
}

impl Drop for SwarmMode {
    fn drop(&mut self) {
        if self.joined {
            let _ = wharf_integration::try_docker(&["swarm", "leave", "--force"]);
        }
    }
}

/// Four callers that keep an instance's blocking pool burning CPU until
/// `stop` is set; each returns how many calls it made, none failed.
fn burn_load(
    client: &Client,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    Vec<tokio::task::JoinHandle<u64>>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers = (0..4)
        .map(|_| {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut calls = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    burn::call(&client, 100).await.expect("no call fails");
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    (stop, callers)
}

#[test]
fn the_annotated_example_config_parses() {
    let text = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/wharf.toml"
    ));
    let config = wharf::supervisor::UpConfig::from_toml(text).unwrap();
    assert_eq!(config.services[0].name, "autoscale");
    let policy = config.services[0].policy().unwrap();
    assert_eq!((policy.min, policy.max), (1, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_replaced_and_calls_keep_succeeding() {
    killed_and_replaced(Runs::Processes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_container_is_replaced_and_calls_keep_succeeding() {
    killed_and_replaced(Runs::Containers).await;
}

async fn killed_and_replaced(runs: Runs) {
    let Some(mut scene) = Scene::new(runs).await else {
        return;
    };
    scene.supervise("min = 2\nmax = 2");
    let first = scene
        .wait_for("2 instances", Duration::from_secs(60), |live| {
            live.len() == 2
        })
        .await;
    let calls = tokio::spawn({
        let client = scene.client.clone();
        async move {
            for i in 0..400u64 {
                let n = echo_slowly::call(&client, i, 5)
                    .await
                    .expect("every call succeeds");
                assert_eq!(n, i);
            }
        }
    });
    let victim = first[0].clone();
    Place::of(&victim).kill();
    let killed = Instant::now();
    let known: HashSet<String> = first.iter().map(|b| b.instance.clone()).collect();
    scene
        .wait_for("a replacement", Duration::from_secs(60), |live| {
            live.iter().any(|b| !known.contains(&b.instance))
        })
        .await;
    // How fast is measured by scale_bench; here it only has to happen.
    wharf_integration::report_line(format!(
        "REPORT {} SIGKILLed to its replacement's first heartbeat: {:?}",
        runs.name(),
        killed.elapsed()
    ));
    calls.await.unwrap();
    let exited = scene
        .wait_for_events("exited", 1, Duration::from_secs(30))
        .await;
    assert!(
        exited
            .iter()
            .any(|e| e.instance.as_deref() == Some(&victim.instance)),
        "the victim's exit is an event: {exited:?}"
    );
    scene.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_is_killed_and_replaced() {
    let mut scene = Scene::new(Runs::Processes).await.unwrap();
    scene.supervise("min = 1\nmax = 1");
    let first = scene
        .wait_for("1 instance", Duration::from_secs(60), |live| {
            live.len() == 1
        })
        .await;
    // The worker stops itself mid-call: alive, but deaf.
    let error = hang::call(&scene.client).await.unwrap_err();
    assert_eq!(error.kind(), wharf::ErrorKind::Timeout);
    let hung = first[0].instance.clone();
    scene
        .wait_for("a replacement", Duration::from_secs(60), |live| {
            live.len() == 1 && live[0].instance != hung
        })
        .await;
    let events = scene
        .wait_for_events("hung", 1, Duration::from_secs(30))
        .await;
    assert!(
        events.iter().any(|e| e.instance.as_deref() == Some(&hung)),
        "{events:?}"
    );
    let hung_pid = first[0].pid;
    eventually(
        "the hung process to be killed",
        Duration::from_secs(30),
        || async {
            if wharf_integration::alive(hung_pid) {
                Err(format!("pid {hung_pid} is alive"))
            } else {
                Ok(())
            }
        },
    )
    .await;
    assert_eq!(echo_slowly::call(&scene.client, 7, 1).await.unwrap(), 7);
    scene.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_scales_up_and_back_down_with_no_failed_call() {
    scales_up_and_down(Runs::Processes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_scales_containers_up_and_back_down_with_no_failed_call() {
    scales_up_and_down(Runs::Containers).await;
}

async fn scales_up_and_down(runs: Runs) {
    let Some(mut scene) = Scene::new(runs).await else {
        return;
    };
    scene.supervise("min = 1\nmax = 4\nscale_down_after = \"2s\"");
    scene
        .wait_for("1 instance", Duration::from_secs(60), |live| {
            live.len() == 1
        })
        .await;
    let (stop, callers) = burn_load(&scene.client);
    let peak = scene
        .wait_for("more instances", Duration::from_secs(90), |live| {
            live.len() >= 2
        })
        .await
        .len();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut calls = 0;
    for caller in callers {
        calls += caller.await.expect("no failed call");
    }
    scene
        .wait_for("back to min", Duration::from_secs(120), |live| {
            live.len() == 1
        })
        .await;
    let scales = scene.events_of("scale");
    assert!(
        scales.iter().any(|e| e.reason.contains("average CPU")),
        "{scales:?}"
    );
    // Drains are published as they are asked, before the instance leaves.
    scene
        .wait_for_events("drain", 1, Duration::from_secs(30))
        .await;
    wharf_integration::report_line(format!(
        "REPORT autoscale ({}): {calls} burn calls, 0 failed; peak {peak} instances; scale events: {:?}",
        runs.name(),
        scales.iter().map(|e| e.reason.clone()).collect::<Vec<_>>()
    ));
    scene.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_service_scales_with_load_drains_what_it_removes_and_replaces_a_killed_task() {
    if svc_image().is_none() {
        return;
    }
    // Declared first, so it is dropped last: after the scene removed the
    // Swarm service.
    let _swarm = SwarmMode::enter();
    let mut scene = Scene::new(Runs::Swarm).await.unwrap();
    scene.supervise("min = 1\nmax = 3\nscale_down_after = \"2s\"");
    scene
        .wait_for("1 Swarm task", Duration::from_secs(90), |live| {
            live.len() == 1
        })
        .await;
    let service = wharf::backend::swarm::service_name(&scene.prefix, "itest");
    // Plain calls (not idempotent) through the scale-up and the scale-down
    // (Swarm stops tasks with SIGTERM, on which they drain): none may fail.
    let stop_plain = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // (At a gentle rate: their CPU must let the service scale back down.)
    let plain: Vec<_> = (0..4)
        .map(|_| {
            let (client, stop) = (scene.client.clone(), stop_plain.clone());
            tokio::spawn(async move {
                let mut calls = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let sum = wharf_integration::add::request(calls as i64, 1)
                        .client(&client)
                        .await
                        .expect("no plain call fails");
                    assert_eq!(sum, calls as i64 + 1);
                    calls += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                calls
            })
        })
        .collect();
    let (stop, callers) = burn_load(&scene.client);
    let peak = scene
        .wait_for("more Swarm tasks", Duration::from_secs(120), |live| {
            live.len() >= 2
        })
        .await
        .len();
    let replicas = wharf_integration::docker(&[
        "service",
        "inspect",
        "--format",
        "{{.Spec.Mode.Replicated.Replicas}}",
        &service,
    ]);
    assert!(
        replicas.trim().parse::<usize>().unwrap() >= 2,
        "the Swarm service asks for {replicas} tasks"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut burned = 0;
    for caller in callers {
        burned += caller.await.expect("no failed burn call");
    }
    scene
        .wait_for("back to 1 Swarm task", Duration::from_secs(120), |live| {
            live.len() == 1
        })
        .await;
    stop_plain.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut calls = 0;
    for caller in plain {
        calls += caller.await.expect("no failed plain call");
    }
    // A task killed outright: Swarm starts another, which serves. (Not
    // under the plain load: a non-idempotent call in flight on a killed
    // worker fails as `worker_lost`, by design.)
    let survivor = scene.live().await[0].clone();
    Place::of(&survivor).kill();
    scene
        .wait_for("a new Swarm task", Duration::from_secs(90), |live| {
            live.iter().any(|b| b.instance != survivor.instance)
        })
        .await;
    wharf_integration::first_answer(&scene.client, "the new Swarm task").await;
    let set: Vec<String> = scene
        .events_of("replicas")
        .iter()
        .map(|e| e.reason.clone())
        .collect();
    wharf_integration::report_line(format!(
        "REPORT swarm: {burned} burn calls and {calls} plain calls, 0 failed; peak {peak} tasks; replica counts set: {set:?}"
    ));
    scene.down().await;
    assert!(
        eventually_blocking_gone(&format!(
            "{}={}",
            wharf::backend::docker::PREFIX_LABEL,
            scene.prefix
        )),
        "the Swarm service's tasks outlived `wharf down`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_service_rolls_to_a_changed_env_with_no_failed_call() {
    if svc_image().is_none() {
        return;
    }
    // Declared first, so it is dropped last: after the scene removed the
    // Swarm service.
    let _swarm = SwarmMode::enter();
    let mut scene = Scene::new(Runs::Swarm).await.unwrap();
    let extra = |roll: &str| format!("min = 2\nmax = 2\nenv = {{ ROLL = \"{roll}\" }}");
    let supervisor = scene.supervise(&extra("a"));
    let first = scene
        .wait_for("2 Swarm tasks", Duration::from_secs(90), |live| {
            live.len() == 2
        })
        .await;
    let old = revision_of(&first[0]).to_owned();
    assert!(!old.is_empty() && first.iter().all(|b| revision_of(b) == old));
    // Plain calls (not idempotent) all through the rollout: Swarm starts
    // each new task before it stops an old one, which drains on SIGTERM.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (client, stop) = (scene.client.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut calls, mut failures) = (0i64, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match wharf_integration::add::call(&client, calls, 1).await {
                        Ok(sum) if sum == calls + 1 => {}
                        other => failures.push(format!("{other:?}")),
                    }
                    calls += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (calls, failures)
            })
        })
        .collect();
    // Only the environment changes: a new revision, rolled out on SIGHUP.
    config(
        scene.dir.path(),
        &scene.server.url(),
        Runs::Swarm,
        &extra("b"),
    );
    signal(supervisor, libc::SIGHUP);
    let rolled = scene
        .wait_for(
            "2 Swarm tasks of the new revision",
            Duration::from_secs(180),
            |live| live.len() == 2 && live.iter().all(|b| revision_of(b) != old),
        )
        .await;
    let old_tasks: HashSet<&str> = first.iter().map(|b| b.instance.as_str()).collect();
    assert!(rolled
        .iter()
        .all(|b| !old_tasks.contains(b.instance.as_str())));
    // The old tasks are gone, not only draining.
    eventually(
        "the old Swarm tasks to leave",
        Duration::from_secs(60),
        || async {
            let all = wharf::supervisor::instances(&scene.client)
                .await
                .map_err(|e| e.to_string())?;
            match all.iter().find(|b| revision_of(b) == old) {
                Some(beat) => Err(format!("{} still beats", beat.instance)),
                None => Ok(()),
            }
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut calls, mut failures) = (0, Vec::new());
    for caller in callers {
        let (made, failed) = caller.await.unwrap();
        calls += made;
        failures.extend(failed);
    }
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    wharf_integration::report_line(format!(
        "REPORT swarm rollout of a changed env: 2 tasks replaced under {calls} plain calls, 0 failed"
    ));
    scene.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_from_a_killed_leader_without_duplicates() {
    let mut scene = Scene::new(Runs::Processes).await.unwrap();
    scene.supervise("min = 2\nmax = 2");
    scene
        .wait_for("2 instances", Duration::from_secs(60), |live| {
            live.len() == 2
        })
        .await;
    let before: HashSet<String> = scene.live().await.into_iter().map(|b| b.instance).collect();
    scene.supervise("min = 2\nmax = 2");
    // Once the second one knows it stands by, it must leave the instances
    // alone: watch them for a while.
    scene
        .wait_for_events("standby", 1, Duration::from_secs(60))
        .await;
    holds_for(
        "the standby starting and stopping nothing",
        Duration::from_secs(2),
        || async { scene.no_changes_since(2) },
    )
    .await;

    let js = async_nats::jetstream::new(scene.client.nats().clone());
    let lease = js
        .get_key_value(wharf::supervisor::LEASE_BUCKET)
        .await
        .unwrap();
    let holder = lease.get("leader").await.unwrap().expect("a leader");
    let leader_pid: u32 = std::str::from_utf8(&holder)
        .unwrap()
        .split('-')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let leader = scene
        .supervisors
        .iter()
        .position(|s| s.pid() == leader_pid)
        .expect("the leader is one of ours");
    let mut killed = scene.supervisors.remove(leader);
    killed.kill(); // SIGKILL
    let took_over = Instant::now();
    scene
        .wait_for_events("leader", 2, Duration::from_secs(60))
        .await;
    wharf_integration::report_line(format!(
        "REPORT leader SIGKILLed, standby leads after {:?}",
        took_over.elapsed()
    ));
    // The same two instances, adopted, for a while.
    scene
        .wait_for_events("adopt", 2, Duration::from_secs(30))
        .await;
    let pids: Vec<u32> = scene.live().await.iter().map(|b| b.pid).collect();
    holds_for(
        "the same two instances, neither lost nor duplicated",
        Duration::from_secs(3),
        || async {
            scene.no_changes_since(2)?;
            match pids.iter().find(|pid| !wharf_integration::alive(**pid)) {
                Some(pid) => Err(format!("instance process {pid} died")),
                None => Ok(()),
            }
        },
    )
    .await;
    scene
        .wait_for(
            "the two adopted instances",
            Duration::from_secs(30),
            |live| {
                live.iter()
                    .map(|b| b.instance.clone())
                    .collect::<HashSet<_>>()
                    == before
            },
        )
        .await;
    assert_eq!(scene.events_of("adopt").len(), 2);
    scene.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_to_zero_and_a_cold_start_on_the_first_call() {
    let mut scene = Scene::new(Runs::Processes).await.unwrap();
    scene.supervise("min = 0\nmax = 2\nidle_to_zero = \"2s\"");
    scene
        .wait_for_events("leader", 1, Duration::from_secs(60))
        .await;
    holds_for("min 0 starting nothing", Duration::from_secs(2), || async {
        scene.no_changes_since(0)
    })
    .await;
    // No worker: the call announces demand, the supervisor starts one, and
    // the call's retries find it.
    let started = Instant::now();
    let reply = echo_slowly::request(5, 1)
        .client(&scene.client)
        .send_detailed()
        .await
        .expect("a cold start, not a failure");
    assert_eq!(reply.value, 5);
    assert!(reply.attempts > 1);
    wharf_integration::report_line(format!(
        "REPORT cold start: first call answered after {:?} ({} tries)",
        started.elapsed(),
        reply.attempts
    ));
    let scales = scene
        .wait_for_events("scale", 1, Duration::from_secs(30))
        .await;
    assert!(
        scales.iter().any(|e| e.reason.contains("cold start")),
        "{scales:?}"
    );
    // Its heartbeat may trail its first answer: see it, then see it go.
    scene
        .wait_for(
            "the cold-started instance",
            Duration::from_secs(60),
            |live| live.len() == 1,
        )
        .await;
    // Idle for idle_to_zero: back to none.
    scene
        .wait_for("scale to zero", Duration::from_secs(60), |live| {
            live.is_empty()
        })
        .await;
    let scales = scene
        .wait_for_events("scale", 2, Duration::from_secs(30))
        .await;
    assert!(
        scales.iter().any(|e| e.reason.contains("scale to zero")),
        "{scales:?}"
    );
    scene.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_service_is_backed_off_not_restarted_hot() {
    let mut scene = Scene::new(Runs::Processes).await.unwrap();
    // A "worker" that exits at once.
    let path = scene.dir.path().join("wharf.toml");
    std::fs::write(
        &path,
        format!(
            "[broker]\nurl = \"{}\"\n\n[[service]]\nname = \"doomed\"\ncommand = [\"false\"]\nmin = 1\nmax = 1\n",
            scene.server.url()
        ),
    )
    .unwrap();
    scene.supervise_file(&path);
    // Three quick exits start the backoff; each pause is longer than the
    // last. Measured on the events' own clock, so a slow machine only
    // makes the gaps longer.
    let loops = scene
        .wait_for_events("crash-loop", 2, Duration::from_secs(90))
        .await;
    let starts_before_pause = scene
        .events_of("start")
        .iter()
        .filter(|e| e.at_ms <= loops[0].at_ms)
        .count();
    // A hot loop would have started it every tick (4 a second), on and on.
    assert!(
        starts_before_pause <= 4,
        "{starts_before_pause} starts before the first pause: {}",
        scene.seen_so_far(&[])
    );
    let gap = Duration::from_millis(loops[1].at_ms - loops[0].at_ms);
    assert!(
        gap >= Duration::from_secs(1),
        "restarts {gap:?} apart, not backed off: {}",
        scene.seen_so_far(&[])
    );
    wharf_integration::report_line(format!(
        "REPORT crash loop: {starts_before_pause} starts before the first pause, the next {gap:?} later; {}",
        loops[0].reason
    ));
    scene.down().await;
}

/// One call on each open transaction: each is served by the instance that
/// owns it, with its running total one up.
async fn use_transactions(open: &mut [(wharf::Transaction, u32, u64)]) {
    for (tx, pid, total) in open {
        let (now, served) = accumulate::request(1, 0).transaction(tx).await.unwrap();
        *total += 1;
        assert_eq!(
            (now, served),
            (*total, *pid),
            "transaction {} broke",
            tx.id()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervised_scale_down_waits_for_open_transactions() {
    let mut scene = Scene::new(Runs::Processes).await.unwrap();
    scene.supervise("min = 1\nmax = 3\nscale_down_after = \"2s\"");
    scene
        .wait_for("1 instance", Duration::from_secs(60), |live| {
            live.len() == 1
        })
        .await;
    // Load scales the service up...
    let (stop, callers) = burn_load(&scene.client);
    scene
        .wait_for("more instances", Duration::from_secs(90), |live| {
            live.len() >= 2
        })
        .await;
    // ... transactions open on every instance ...
    let mut open = Vec::new();
    for _ in 0..30 {
        let tx = scene.client.transaction().await.unwrap();
        let (total, pid) = accumulate::request(1, 0).transaction(&tx).await.unwrap();
        open.push((tx, pid, total));
    }
    let owners: HashSet<u32> = open.iter().map(|(_, pid, _)| *pid).collect();
    assert!(owners.len() >= 2, "transactions on one instance only");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }
    // ... and the supervisor scales down while they stay in use, for
    // longer than the 30 s it gives an ordinary drain.
    // Rounds go on for 40 s at least, and until the scale-down was asked
    // (at most 3 minutes).
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(40) || scene.events_of("drain").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "no scale-down within 3 minutes: {}",
            scene.seen_so_far(&scene.live().await)
        );
        use_transactions(&mut open).await;
        rounds += 1;
        // Spaced calls: the transactions stay in use without flooding.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drains = scene.events_of("drain");
    assert!(
        scene.events_of("killed").is_empty(),
        "a quiescing instance was killed: {:?}",
        scene.events_of("killed")
    );
    let quiescing: Vec<Heartbeat> = eventually(
        "drained instances waiting for their transactions",
        Duration::from_secs(30),
        || async {
            let all = wharf::supervisor::instances(&scene.client)
                .await
                .map_err(|e| e.to_string())?;
            let quiescing: Vec<Heartbeat> = all
                .iter()
                .filter(|b| b.draining && b.transactions > 0)
                .cloned()
                .collect();
            if quiescing.is_empty() {
                Err(format!("instances: {all:?}"))
            } else {
                Ok(quiescing)
            }
        },
    )
    .await;
    // Once the transactions end, the drained instances leave.
    for (tx, _, _) in open {
        tx.end().await.unwrap();
    }
    eventually(
        "the drained instances to leave",
        Duration::from_secs(60),
        || async {
            let all = wharf::supervisor::instances(&scene.client)
                .await
                .map_err(|e| e.to_string())?;
            if all.iter().all(|b| !b.draining) && all.len() == 1 {
                Ok(())
            } else {
                Err(format!("{all:?}"))
            }
        },
    )
    .await;
    wharf_integration::report_line(format!(
        "REPORT stateful scale-down: {} instances asked to drain kept {} open transactions through {rounds} rounds over 40 s, then left; 0 calls failed",
        drains.len(),
        quiescing.iter().map(|b| b.transactions).sum::<usize>()
    ));
    scene.down().await;
}

/// The new build of `versioned` (the `svc_v2` binary), as a caller built
/// from the new source has it.
#[wharf::microservice(service = "itest", name = "versioned")]
async fn versioned_v2(x: i64, y: i64) -> String {
    format!("v2 {}", x + y)
}

/// A `wharf.toml` of two `itest` instances made by `binary worker`, whose
/// kept old instance goes 2 s after its callers stop.
fn versioned_config(scene: &Scene, binary: &std::path::Path) -> std::path::PathBuf {
    let path = scene.dir.path().join("wharf.toml");
    let text = format!(
        "[broker]\nurl = \"{}\"\n\n[[service]]\nname = \"itest\"\ncommand = [\"{}\", \"worker\"]\nmin = 2\nmax = 2\nscale_down_after = \"2s\"\n",
        scene.server.url(),
        binary.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `loops` callers of one build, each calling until `stop`: the calls
/// made, and every failure (the test wants none).
fn versioned_callers(
    client: &Client,
    loops: i64,
    new_build: bool,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<(u64, Vec<String>)>> {
    (0..loops)
        .map(|i| {
            let client = client.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut calls, mut failures) = (0, Vec::new());
                while !*stop.borrow() {
                    let (answer, wanted) = if new_build {
                        (
                            versioned_v2::call(&client, i, 1).await,
                            format!("v2 {}", i + 1),
                        )
                    } else {
                        (versioned::call(&client, i).await, format!("v1 {i}"))
                    };
                    calls += 1;
                    match answer {
                        Ok(answer) if answer == wanted => {}
                        Ok(answer) => failures.push(format!("wanted {wanted}, got {answer}")),
                        Err(error) => failures.push(error.to_string()),
                    }
                }
                (calls, failures)
            })
        })
        .collect()
}

fn revision_of(beat: &Heartbeat) -> &str {
    beat.revision.as_deref().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_signature_rolls_out_and_back_under_mixed_load_with_no_failed_call() {
    let mut scene = Scene::new(Runs::Processes).await.unwrap();
    let v2_binary = svc_binary().with_file_name("svc_v2");
    let path = versioned_config(&scene, &svc_binary());
    let supervisor = scene.supervise_file(&path);
    let first = scene
        .wait_for("2 instances of v1", Duration::from_secs(60), |live| {
            live.len() == 2
        })
        .await;
    let v1 = revision_of(&first[0]).to_owned();
    assert!(!v1.is_empty() && first.iter().all(|b| revision_of(b) == v1));
    let sig_v1 = versioned::SPEC.sig_hex();
    assert_eq!(first[0].signatures.get("itest.versioned"), Some(&sig_v1));

    // 32 callers of the old build from start to end.
    let (stop_old, stopped_old) = tokio::sync::watch::channel(false);
    let old_callers = versioned_callers(&scene.client, 32, false, &stopped_old);

    // Rolled to v2 through the reload request (`wharf up --reload`).
    versioned_config(&scene, &v2_binary);
    let request = async_nats::Request::new().timeout(Some(Duration::from_secs(5)));
    let reply = scene
        .client
        .nats()
        .send_request(
            wharf::wire::subjects::supervisor_reload(&scene.prefix),
            request,
        )
        .await
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    assert!(
        answer["changes"]
            .to_string()
            .contains("rolling out revision"),
        "{answer}"
    );
    let sig_v2 = versioned_v2::SPEC.sig_hex();
    let on_v2 = scene
        .wait_for("an instance of v2", Duration::from_secs(60), |live| {
            live.iter().any(|b| revision_of(b) != v1)
        })
        .await;
    let v2 = on_v2
        .iter()
        .map(revision_of)
        .find(|r| *r != v1)
        .unwrap()
        .to_owned();
    // 32 callers of the new build join once it serves.
    let (stop_new, stopped_new) = tokio::sync::watch::channel(false);
    let new_callers = versioned_callers(&scene.client, 32, true, &stopped_new);
    // Two of v2, and one of v1 kept for the old callers.
    let rolled = scene
        .wait_for(
            "2 of v2 and 1 of v1 kept",
            Duration::from_secs(90),
            |live| live.len() == 3 && live.iter().filter(|b| revision_of(b) == v2).count() == 2,
        )
        .await;
    for beat in rolled.iter().filter(|b| revision_of(b) == v2) {
        assert_eq!(beat.signatures.get("itest.versioned"), Some(&sig_v2));
    }
    let kept = scene
        .wait_for_events("rollout", 2, Duration::from_secs(30))
        .await;
    assert!(
        kept.iter().any(|e| e.reason.contains("keeping")),
        "{kept:?}"
    );

    // Rolled back to v1 by SIGHUP, both builds still calling.
    versioned_config(&scene, &svc_binary());
    signal(supervisor, libc::SIGHUP);
    scene
        .wait_for(
            "2 of v1 and 1 of v2 kept",
            Duration::from_secs(90),
            |live| live.len() == 3 && live.iter().filter(|b| revision_of(b) == v1).count() == 2,
        )
        .await;
    let new_calls =
        wharf_integration::settle_callers("the new build's callers", stop_new, new_callers).await;
    // Its callers gone, the last v2 instance drains too.
    scene
        .wait_for("only v1", Duration::from_secs(60), |live| {
            live.len() == 2 && live.iter().all(|b| revision_of(b) == v1)
        })
        .await;
    let old_calls =
        wharf_integration::settle_callers("the old build's callers", stop_old, old_callers).await;
    let done = scene
        .wait_for_events("rollout", 5, Duration::from_secs(30))
        .await;
    assert!(
        done.iter().filter(|e| e.reason.starts_with("done")).count() >= 1,
        "{done:?}"
    );
    assert!(scene.events_of("reload").len() >= 2);
    wharf_integration::report_line(format!(
        "REPORT rollout v1 -> v2 -> v1 under 64-way mixed load: {old_calls} old-build calls, {new_calls} new-build calls, 0 failed"
    ));
    scene.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_whose_new_instances_fail_stops_and_the_old_version_keeps_serving() {
    let mut scene = Scene::new(Runs::Processes).await.unwrap();
    let path = versioned_config(&scene, &svc_binary());
    let supervisor = scene.supervise_file(&path);
    let first = scene
        .wait_for("2 instances", Duration::from_secs(60), |live| {
            live.len() == 2
        })
        .await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let callers = versioned_callers(&scene.client, 16, false, &stopped);
    // A new build that exits at once.
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &format!("command = [\"{}\", \"worker\"]", svc_binary().display()),
        "command = [\"/bin/sh\", \"-c\", \"exit 3\"]",
    );
    std::fs::write(&path, text).unwrap();
    signal(supervisor, libc::SIGHUP);
    let failed = scene
        .wait_for_events("rollout-failed", 1, Duration::from_secs(60))
        .await;
    assert!(
        failed[0].reason.contains("exited before it became ready")
            && failed[0].reason.contains("keeps serving"),
        "{failed:?}"
    );
    // The old instances were never drained, stopped or lost, and keep
    // serving. (Whether they are live is read from their heartbeats, which
    // a loaded machine can delay past the 3 s a beat counts as live: that
    // is asked at the end, with a deadline, not at every instant.)
    let known: HashSet<String> = first.iter().map(|b| b.instance.clone()).collect();
    let old_ones_left = || {
        ["drain", "drained", "killed", "exited", "hung", "stop"]
            .iter()
            .flat_map(|kind| scene.events_of(kind))
            .filter(|e| e.instance.as_ref().is_some_and(|i| known.contains(i)))
            .collect::<Vec<_>>()
    };
    holds_for(
        "the old instances to keep serving",
        Duration::from_secs(3),
        || async {
            let left = old_ones_left();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{left:?}; {}",
                    scene.seen_so_far(&scene.live().await)
                ))
            }
        },
    )
    .await;
    scene
        .wait_for("both old instances live", Duration::from_secs(30), |live| {
            live.iter().filter(|b| known.contains(&b.instance)).count() == 2
        })
        .await;
    wharf_integration::settle_callers("the callers", stop, callers).await;
    // A file that does not parse is refused, and says why.
    std::fs::write(&path, "[[service]]\nname = \"itest\"\nmin = 5\nmax = 2\n").unwrap();
    signal(supervisor, libc::SIGHUP);
    let refused = scene
        .wait_for_events("reload", 2, Duration::from_secs(30))
        .await;
    assert!(
        refused
            .iter()
            .any(|e| e.reason.contains("not applied") && e.reason.contains("min 5 and max 2")),
        "{refused:?}"
    );
    assert_eq!(versioned::call(&scene.client, 7).await.unwrap(), "v1 7");
    scene.down().await;
}

/// A `wharf.toml` of two `itest` instances whose environment holds
/// `ROLL=<roll>`: a changed value is a new revision.
fn env_config(scene: &Scene, roll: &str) -> std::path::PathBuf {
    let path = scene.dir.path().join("wharf.toml");
    let text = format!(
        "[broker]\nurl = \"{}\"\n\n[[service]]\nname = \"itest\"\ncommand = [\"{}\", \"worker\"]\nmin = 2\nmax = 2\nenv = {{ ROLL = \"{roll}\" }}\n",
        scene.server.url(),
        svc_binary().display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_of_a_changed_env_waits_for_open_transactions_on_the_old_instances() {
    let mut scene = Scene::new(Runs::Processes).await.unwrap();
    let path = env_config(&scene, "a");
    let supervisor = scene.supervise_file(&path);
    let first = scene
        .wait_for("2 instances", Duration::from_secs(60), |live| {
            live.len() == 2
        })
        .await;
    let old = revision_of(&first[0]).to_owned();
    let old_pids: HashSet<u32> = first.iter().map(|b| b.pid).collect();
    // Transactions open on both old instances.
    let mut open = Vec::new();
    for _ in 0..20 {
        let tx = scene.client.transaction().await.unwrap();
        let (total, pid) = accumulate::request(1, 0).transaction(&tx).await.unwrap();
        open.push((tx, pid, total));
    }
    let owners: HashSet<u32> = open.iter().map(|(_, pid, _)| *pid).collect();
    assert!(owners.len() == 2, "transactions on one instance only");

    // Only the environment changes: a new revision, rolled out on SIGHUP.
    env_config(&scene, "b");
    signal(supervisor, libc::SIGHUP);
    // The transactions stay in use while the rollout goes on; it must wait
    // for them, not kill their instance. Rounds go on until an old
    // instance drains with transactions open, and for 5 s after.
    let started = Instant::now();
    let mut quiescing_since: Option<Instant> = None;
    let mut rounds = 0;
    while quiescing_since.is_none_or(|at| at.elapsed() < Duration::from_secs(5)) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no old instance quiesced within 2 minutes: {}",
            scene.seen_so_far(&scene.live().await)
        );
        use_transactions(&mut open).await;
        rounds += 1;
        if quiescing_since.is_none() {
            // A failed read is tried again next round.
            let all = wharf::supervisor::instances(&scene.client)
                .await
                .unwrap_or_default();
            if all
                .iter()
                .any(|b| b.draining && b.transactions > 0 && old_pids.contains(&b.pid))
            {
                quiescing_since = Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        scene.events_of("killed").is_empty(),
        "a quiescing instance was killed: {:?}",
        scene.events_of("killed")
    );
    // The transactions end; the rollout finishes: two new instances.
    for (tx, _, _) in open {
        tx.end().await.unwrap();
    }
    let rolled = scene
        .wait_for(
            "2 instances of the new revision",
            Duration::from_secs(120),
            |live| live.len() == 2 && live.iter().all(|b| revision_of(b) != old),
        )
        .await;
    assert!(rolled.iter().all(|b| !old_pids.contains(&b.pid)));
    let events = scene
        .wait_for_events("rollout", 2, Duration::from_secs(30))
        .await;
    assert!(
        events.iter().any(|e| e.reason.starts_with("done")),
        "{events:?}"
    );
    assert!(scene.events_of("killed").is_empty());
    wharf_integration::report_line(format!(
        "REPORT env rollout of a stateful service: 20 open transactions kept through {rounds} rounds while their instances quiesced, then 2 instances of the new revision; 0 calls failed"
    ));
    scene.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_whose_new_instance_hangs_is_stopped_and_the_old_version_keeps_serving() {
    let mut scene = Scene::new(Runs::Processes).await.unwrap();
    let path = versioned_config(&scene, &svc_binary());
    let supervisor = scene.supervise_file(&path);
    let first = scene
        .wait_for("2 instances", Duration::from_secs(60), |live| {
            live.len() == 2
        })
        .await;
    let known: HashSet<String> = first.iter().map(|b| b.instance.clone()).collect();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let callers = versioned_callers(&scene.client, 8, false, &stopped);
    // A new build that starts and never becomes ready (no heartbeat).
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &format!("command = [\"{}\", \"worker\"]", svc_binary().display()),
        "command = [\"/bin/sleep\", \"3600\"]",
    );
    std::fs::write(&path, text).unwrap();
    signal(supervisor, libc::SIGHUP);
    let failed = scene
        .wait_for_events("rollout-failed", 1, Duration::from_secs(90))
        .await;
    assert!(
        failed[0].reason.contains("never became ready")
            && failed[0].reason.contains("keeps serving"),
        "{failed:?}"
    );
    // The hung instance was killed; the old ones were left alone.
    let hung = scene.events_of("hung");
    assert!(
        hung.iter()
            .all(|e| e.instance.as_ref().is_some_and(|i| !known.contains(i))),
        "{hung:?}"
    );
    assert!(!hung.is_empty(), "the hung instance was killed");
    for kind in ["drain", "drained", "killed", "exited", "stop"] {
        let touched: Vec<_> = scene
            .events_of(kind)
            .into_iter()
            .filter(|e| e.instance.as_ref().is_some_and(|i| known.contains(i)))
            .collect();
        assert!(
            touched.is_empty(),
            "an old instance was touched: {touched:?}"
        );
    }
    scene
        .wait_for("both old instances live", Duration::from_secs(30), |live| {
            live.iter().filter(|b| known.contains(&b.instance)).count() == 2
        })
        .await;
    let calls = wharf_integration::settle_callers("the callers", stop, callers).await;
    wharf_integration::report_line(format!(
        "REPORT rollout to a hung build: stopped with \"{}\"; {calls} calls to the old version, 0 failed",
        failed[0].reason
    ));
    scene.down().await;
}
