//! How fast the supervisor reacts, and what watching costs.
//!
//! `cargo run --release -p wharf-examples --bin scale_bench` starts a
//! nats-server and a supervisor process (this binary, `supervise` mode) and
//! measures, with worker processes of this binary:
//! - a worker SIGKILLed to its replacement's first heartbeat (it serves);
//! - a load step to the first heartbeat over the CPU target, to the scale
//!   decision, to the first new instance's heartbeat;
//! - the supervisor's CPU and RSS while it watches 50 instances.
//!
//! `--quick` runs a short smoke version (10 instances, fewer samples).

use futures_util::StreamExt;
use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use wharf::supervisor::Event;
use wharf::testing::NatsServer;
use wharf_examples::{cpu_ticks, median, rss_kib, ticks_per_second};

/// Burns CPU for `ms` milliseconds.
#[wharf::microservice(service = "scalebench", idempotent, timeout = "60s")]
pub fn spin(ms: u64) -> u64 {
    wharf_examples::burn_cpu(ms)
}

type Fallible<T> = Result<T, Box<dyn std::error::Error>>;

#[wharf::main]
async fn main() -> Fallible<()> {
    let mut args = std::env::args().skip(1);
    let quick = match args.next().as_deref() {
        Some("supervise") => {
            let path = args.next().ok_or("scale_bench supervise <wharf.toml>")?;
            return Ok(wharf::supervisor::supervise_file(path.as_ref()).await?);
        }
        Some("--quick") => true,
        None => false,
        Some(other) => {
            return Err(format!("unknown argument `{other}`; use --quick or nothing").into())
        }
    };
    let (kills, steps, watched, watch_for) = if quick {
        (2, 1, 10, Duration::from_secs(3))
    } else {
        (5, 3, 50, Duration::from_secs(10))
    };
    let server = NatsServer::start()?;
    let client = wharf::Client::connect(&server.url()).await?;
    let dir = std::env::temp_dir().join(format!("wharf-scale-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    let replaced = replacement(&client, &server.url(), &dir, kills).await?;
    let mut cross = Vec::new();
    let mut decide = Vec::new();
    let mut serve = Vec::new();
    for _ in 0..steps {
        let (c, d, s) = load_step(&client, &server.url(), &dir).await?;
        cross.push(c);
        decide.push(d);
        serve.push(s);
    }
    let (cpu, rss) = watching(&client, &server.url(), &dir, watched, watch_for).await?;
    let _ = std::fs::remove_dir_all(&dir);

    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    println!("| supervisor | median | max | target |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| worker SIGKILLed to its replacement serving (ms) | {:.0} | {:.0} | 2000 |",
        median(&replaced),
        max(&replaced)
    );
    println!(
        "| load step to the first heartbeat over the CPU target (ms) | {:.0} | {:.0} | |",
        median(&cross),
        max(&cross)
    );
    println!(
        "| that heartbeat to the scale-up decision (ms) | {:.0} | {:.0} | 1000 |",
        median(&decide),
        max(&decide)
    );
    println!(
        "| decision to the first new instance serving (ms) | {:.0} | {:.0} | 300 |",
        median(&serve),
        max(&serve)
    );
    println!("| supervisor CPU watching {watched} instances (% of one core) | {cpu:.1} | | |");
    println!("| supervisor RSS watching {watched} instances (MiB) | {rss:.1} | | |");
    println!();
    println!(
        "samples: {kills} kills, {steps} load steps, {watched} instances watched for {watch_for:?}"
    );
    Ok(())
}

/// A supervisor process for service `scalebench` with `extra` settings.
fn start_supervisor(url: &str, dir: &std::path::Path, extra: &str) -> Fallible<Child> {
    let exe = std::env::current_exe()?;
    let path = dir.join("wharf.toml");
    std::fs::write(
        &path,
        format!(
            "[broker]\nurl = \"{url}\"\n\n[[service]]\nname = \"scalebench\"\ncommand = [\"{}\", \"worker\"]\n{extra}\n",
            exe.display()
        ),
    )?;
    Ok(Command::new(exe)
        .arg("supervise")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Asks the supervisor to stop its instances, and waits for it.
async fn stop_supervisor(client: &wharf::Client, mut supervisor: Child) -> Fallible<()> {
    let request = async_nats::Request::new().timeout(Some(Duration::from_secs(5)));
    let _ = client
        .nats()
        .send_request(
            wharf::wire::subjects::supervisor_down(client.prefix()),
            request,
        )
        .await;
    let until = Instant::now() + Duration::from_secs(40);
    while supervisor.try_wait()?.is_none() {
        if Instant::now() > until {
            let _ = supervisor.kill();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Heartbeats of the stopped instances must not count in the next run.
    tokio::time::sleep(wharf::heartbeat::HEARTBEAT_TTL).await;
    Ok(())
}

/// Live instances: instance id to pid.
async fn live(client: &wharf::Client) -> Fallible<Vec<(String, u32, f32)>> {
    Ok(wharf::supervisor::instances(client)
        .await?
        .into_iter()
        .filter(|b| !b.draining && b.services.iter().any(|s| s == "scalebench"))
        .map(|b| (b.instance, b.pid, b.cpu))
        .collect())
}

async fn wait_live(client: &wharf::Client, count: usize) -> Fallible<Vec<(String, u32, f32)>> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let now = live(client).await?;
        if now.len() >= count {
            return Ok(now);
        }
        if Instant::now() > until {
            return Err(format!("only {} of {count} instances after 60 s", now.len()).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILL to the replacement's first heartbeat, `samples` times.
async fn replacement(
    client: &wharf::Client,
    url: &str,
    dir: &std::path::Path,
    samples: usize,
) -> Fallible<Vec<f64>> {
    let supervisor = start_supervisor(url, dir, "min = 2\nmax = 2")?;
    let mut times = Vec::new();
    for _ in 0..samples {
        let before = wait_live(client, 2).await?;
        let known: HashSet<String> = before.iter().map(|(id, ..)| id.clone()).collect();
        // SAFETY: kill(2) on a worker of this bench.
        unsafe {
            libc::kill(before[0].1 as libc::pid_t, libc::SIGKILL);
        }
        let killed = Instant::now();
        loop {
            if live(client)
                .await?
                .iter()
                .any(|(id, ..)| !known.contains(id))
            {
                break;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                return Err("no replacement within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        times.push(killed.elapsed().as_secs_f64() * 1e3);
        // Let the killed instance's last heartbeat age out, and the new one
        // outlive the supervisor's crash-loop window.
        tokio::time::sleep(wharf::supervisor::CRASH_WINDOW + Duration::from_secs(1)).await;
    }
    stop_supervisor(client, supervisor).await?;
    Ok(times)
}

/// One load step on one instance: to the first heartbeat over the target,
/// from it to the scale decision, from that to a new instance serving.
async fn load_step(
    client: &wharf::Client,
    url: &str,
    dir: &std::path::Path,
) -> Fallible<(f64, f64, f64)> {
    let supervisor = start_supervisor(url, dir, "min = 1\nmax = 4")?;
    let first = wait_live(client, 1).await?;
    let mut events = client
        .nats()
        .subscribe(wharf::wire::subjects::events(client.prefix()))
        .await?;
    client.nats().flush().await?;
    let step = Instant::now();
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                loop {
                    let _ = spin::call(&client, 50).await;
                }
            })
        })
        .collect();
    let mut crossed = None;
    let mut decided = None;
    let served;
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if Instant::now() > until {
            return Err("no scale-up within 30 s".into());
        }
        let now = live(client).await?;
        if crossed.is_none() && now.iter().any(|(_, _, cpu)| *cpu > 50.0) {
            crossed = Some(Instant::now());
        }
        while let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_millis(5), events.next()).await
        {
            if let Ok(event) = serde_json::from_slice::<Event>(&message.payload) {
                if event.kind == "scale" && decided.is_none() {
                    decided = Some(Instant::now());
                }
            }
        }
        if decided.is_some() && now.iter().any(|(id, ..)| *id != first[0].0) {
            served = Instant::now();
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for caller in callers {
        caller.abort();
    }
    stop_supervisor(client, supervisor).await?;
    let crossed = crossed.unwrap_or(step);
    let decided = decided.expect("set before the loop ends");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok((
        ms(crossed - step),
        ms(decided.saturating_duration_since(crossed)),
        ms(served - decided),
    ))
}

/// The supervisor's CPU (percent of one core) and RSS (MiB) while it
/// watches `count` idle instances for `window`.
async fn watching(
    client: &wharf::Client,
    url: &str,
    dir: &std::path::Path,
    count: usize,
    window: Duration,
) -> Fallible<(f64, f64)> {
    let supervisor = start_supervisor(url, dir, &format!("min = {count}\nmax = {count}"))?;
    let pid = supervisor.id();
    wait_live(client, count).await?;
    // Past the start-up burst.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = cpu_ticks(&[pid])[0];
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let used = (cpu_ticks(&[pid])[0] - before) as f64 / ticks_per_second();
    let cpu = used / started.elapsed().as_secs_f64() * 100.0;
    let rss = rss_kib(pid) as f64 / 1024.0;
    stop_supervisor(client, supervisor).await?;
    Ok((cpu, rss))
}
