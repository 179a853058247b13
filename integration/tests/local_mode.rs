//! Local mode end to end: `wharf::init()` starts nats-server and worker
//! processes, and none of them outlives the program, however it ends.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use wharf_integration::{alive, descendants, signal, svc_binary, wait_gone};

/// The local-mode program under test; if the test fails before it ends,
/// it and everything it started are killed.
struct Program(Child);

impl std::ops::Deref for Program {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Program {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let started = descendants(self.0.id());
            let _ = self.0.kill();
            let _ = self.0.wait();
            for pid in started {
                signal(pid, libc::SIGKILL);
            }
        }
    }
}

/// Starts `svc <mode>` in local mode and reads its output up to `ready`;
/// returns the child, the pids it started, and the lines it printed.
fn start_svc(mode: &str) -> (Program, Vec<u32>, Vec<String>) {
    let mut child = Command::new(svc_binary())
        .arg(mode)
        .env_remove("NATS_URL")
        .env("WHARF_WORKERS", "2")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map(Program)
        .expect("svc starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let done = line == "ready";
        lines.push(line);
        if done {
            break;
        }
    }
    assert_eq!(
        lines.last().map(String::as_str),
        Some("ready"),
        "svc output: {lines:?}"
    );
    let mut pids = Vec::new();
    for line in &lines {
        if let Some(list) = line.strip_prefix("workers ") {
            pids.extend(
                list.trim_matches(|c| c == '[' || c == ']')
                    .split(", ")
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        if let Some(server) = line.strip_prefix("server Some(") {
            pids.push(server.trim_end_matches(')').parse().unwrap());
        }
    }
    assert_eq!(pids.len(), 3, "two workers and a server: {lines:?}");
    assert!(pids.iter().all(|pid| alive(*pid)), "all started: {pids:?}");
    (child, pids, lines)
}

/// Every process local mode started is gone (waiting up to 30 s).
fn assert_no_orphans(pids: &[u32]) {
    assert!(
        wait_gone(pids, Duration::from_secs(30)),
        "processes left behind: {:?}",
        pids.iter().filter(|pid| alive(**pid)).collect::<Vec<_>>()
    );
}

#[test]
fn calls_work_and_a_normal_exit_stops_everything() {
    let (mut child, pids, lines) = start_svc("");
    assert!(lines.contains(&"add 5".to_owned()), "{lines:?}");
    assert!(lines.contains(&"take 7".to_owned()), "{lines:?}");
    assert!(
        lines.contains(&"out of stock, 10 left".to_owned()),
        "{lines:?}"
    );
    let served_by: u32 = lines
        .iter()
        .find_map(|l| l.strip_prefix("whoami "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        pids.contains(&served_by),
        "a worker served whoami, not the caller"
    );
    assert!(child.wait().unwrap().success());
    assert_no_orphans(&pids);
}

#[test]
fn a_panic_stops_everything() {
    let (mut child, pids, _) = start_svc("panic");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(101), "a panic in main exits with 101");
    assert_no_orphans(&pids);
}

#[test]
fn ctrl_c_stops_everything() {
    let (mut child, pids, _) = start_svc("wait");
    signal(child.id(), libc::SIGINT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert_no_orphans(&pids);
}

#[test]
fn sigkill_of_the_program_still_stops_everything() {
    let (mut child, pids, _) = start_svc("wait");
    signal(child.id(), libc::SIGKILL);
    child.wait().unwrap();
    // No exit hook runs on SIGKILL: the kernel's parent-death signal does it.
    assert_no_orphans(&pids);
}

#[test]
fn a_killed_local_worker_is_replaced() {
    let (mut child, pids, _) = start_svc("wait");
    let victim = pids[0];
    signal(victim, libc::SIGKILL);
    // The in-process supervisor notices on its next round and starts
    // another worker: the program is back to two workers and the server.
    wharf::testing::eventually_blocking(
        "the killed worker to be replaced",
        Duration::from_secs(60),
        || {
            let now = descendants(child.id());
            if now.len() == 3 && !now.contains(&victim) {
                Ok(())
            } else {
                Err(format!("children {now:?}, killed {victim}"))
            }
        },
    );
    let everything = descendants(child.id());
    signal(child.id(), libc::SIGINT);
    child.wait().unwrap();
    assert_no_orphans(&everything);
}
