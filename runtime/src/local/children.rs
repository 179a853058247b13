//! Processes wharf starts on the user's behalf (nats-server, workers) and
//! the guarantee that none outlives the program.
//!
//! Three layers, because no single one covers every way a program ends:
//! - `PR_SET_PDEATHSIG`: the kernel sends SIGTERM to each child when its
//!   parent dies, even by SIGKILL. The signal follows the *thread* that
//!   spawned the child, so every spawn happens on one thread that never exits.
//! - an `atexit` hook: on a normal exit or a panic in `main`, children are
//!   stopped in order (workers first, so they drain against a live server)
//!   and the server's temporary store is removed.
//! - a Ctrl-C / SIGTERM handler (installed by `wharf::init`) that does the
//!   same and exits.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// What a child is, which decides the order it is stopped in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Worker,
    Server,
}

struct Tracked {
    child: Child,
    role: Role,
    /// Removed after the child has exited (the server's store directory).
    scratch: Option<PathBuf>,
}

static CHILDREN: Mutex<Vec<Tracked>> = Mutex::new(Vec::new());

fn children() -> MutexGuard<'static, Vec<Tracked>> {
    // A panic while holding the lock leaves the list intact; keep using it.
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

type Job = Box<dyn FnOnce() + Send>;

/// The thread every child is spawned from (see the module docs).
fn spawner() -> &'static Mutex<mpsc::Sender<Job>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (sender, receiver) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("wharf-spawner".into())
            .spawn(move || {
                for job in receiver {
                    job();
                }
                // The sender lives in a static, so the loop never ends and
                // this thread lives as long as the process.
            })
            .expect("cannot start the wharf-spawner thread");
        unsafe_register_atexit();
        Mutex::new(sender)
    })
}

/// Set once [`stop_all`] began: nothing new is started after it.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process is stopping its children.
pub(crate) fn stopping() -> bool {
    STOPPING.load(std::sync::atomic::Ordering::SeqCst)
}

/// Spawns `command` as a child that dies with this process, and tracks it.
/// Returns its pid.
pub(crate) async fn spawn(
    command: Command,
    role: Role,
    scratch: Option<PathBuf>,
) -> io::Result<u32> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    submit(command, Box::new(move |spawned| drop(tx.send(spawned))))?;
    let child = rx
        .await
        .map_err(|_| io::Error::other("the wharf-spawner thread dropped the request"))??;
    Ok(track(child, role, scratch))
}

/// [`spawn`] for synchronous callers (a supervisor backend): blocks for the
/// fork and exec only.
pub(crate) fn spawn_now(command: Command, role: Role) -> io::Result<u32> {
    let (tx, rx) = mpsc::sync_channel(1);
    submit(command, Box::new(move |spawned| drop(tx.send(spawned))))?;
    let child = rx
        .recv()
        .map_err(|_| io::Error::other("the wharf-spawner thread dropped the request"))??;
    Ok(track(child, role, None))
}

fn track(child: Child, role: Role, scratch: Option<PathBuf>) -> u32 {
    let pid = child.id();
    children().push(Tracked {
        child,
        role,
        scratch,
    });
    pid
}

/// Whether the tracked child `pid` still runs (reaping it if it exited).
pub(crate) fn running(pid: u32) -> bool {
    children()
        .iter_mut()
        .find(|t| t.child.id() == pid)
        .is_some_and(|t| matches!(t.child.try_wait(), Ok(None)))
}

/// Hands `command` to the spawner thread; `done` gets the result there.
fn submit(mut command: Command, done: Box<dyn FnOnce(io::Result<Child>) + Send>) -> io::Result<()> {
    if stopping() {
        return Err(io::Error::other("the program is stopping its children"));
    }
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let job: Job = Box::new(move || done(command.spawn()));
    spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .map_err(|_| io::Error::other("the wharf-spawner thread is gone"))
}

/// A child that has exited, with its status text.
pub(crate) fn exited(role: Role) -> Option<(u32, String)> {
    let mut list = children();
    for tracked in list.iter_mut().filter(|t| t.role == role) {
        if let Ok(Some(status)) = tracked.child.try_wait() {
            return Some((tracked.child.id(), status.to_string()));
        }
    }
    None
}

/// Pids of the running tracked children with `role`.
pub(crate) fn pids(role: Role) -> Vec<u32> {
    children()
        .iter_mut()
        .filter_map(|t| {
            let running = t.role == role && matches!(t.child.try_wait(), Ok(None));
            running.then(|| t.child.id())
        })
        .collect()
}

/// Stops every child: workers first (SIGTERM, so they drain), then the
/// server; SIGKILL for any that outstays `grace`. Removes scratch dirs.
pub(crate) fn stop_all(grace: Duration) {
    STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut list = std::mem::take(&mut *children());
    for role in [Role::Worker, Role::Server] {
        let group: Vec<&mut Tracked> = list.iter_mut().filter(|t| t.role == role).collect();
        stop_group(group, grace);
    }
    for tracked in list {
        if let Some(dir) = tracked.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn stop_group(mut group: Vec<&mut Tracked>, grace: Duration) {
    for tracked in group.iter_mut() {
        if let Ok(None) = tracked.child.try_wait() {
            // Not reaped yet, so the pid still names it.
            crate::process::terminate(tracked.child.id());
        }
    }
    let until = Instant::now() + grace;
    for tracked in group {
        loop {
            match tracked.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= until => {
                    crate::process::kill_child(&mut tracked.child);
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

extern "C" fn stop_at_exit() {
    stop_all(Duration::from_secs(3));
}

fn unsafe_register_atexit() {
    // SAFETY: registers a plain `extern "C"` function; it runs once, at exit.
    unsafe {
        libc::atexit(stop_at_exit);
    }
}

/// Stops children and exits when the process gets Ctrl-C or SIGTERM, which
/// would otherwise end it without running exit hooks. The watcher has a
/// thread and runtime of its own, so it outlives whichever runtime called
/// `wharf::init` (a test's, say).
pub(crate) fn stop_on_signals() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let watcher = std::thread::Builder::new()
            .name("wharf-signals".into())
            .spawn(|| {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                let code = runtime.block_on(async {
                    use tokio::signal::unix::{signal, SignalKind};
                    let (Ok(mut int), Ok(mut term)) = (
                        signal(SignalKind::interrupt()),
                        signal(SignalKind::terminate()),
                    ) else {
                        return None;
                    };
                    tokio::select! {
                        _ = int.recv() => Some(130),
                        _ = term.recv() => Some(143),
                    }
                });
                if let Some(code) = code {
                    stop_all(Duration::from_secs(3));
                    std::process::exit(code);
                }
            });
        if let Err(error) = watcher {
            tracing::warn!("cannot watch for Ctrl-C ({error}); children are still stopped at exit");
        }
    });
}

/// Removes store directories left by embedded servers of processes that no
/// longer exist (killed before they could clean up).
pub(crate) fn sweep_stale_scratch(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
