//! Processes: the one place wharf signals, kills and looks at processes
//! by pid, and names the host it runs on.

/// Sends `signal` (`libc::SIGTERM`, `libc::SIGKILL`, ...) to `pid`.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Asks `pid` to stop (SIGTERM): a wharf worker drains, then exits.
pub fn terminate(pid: u32) {
    signal(pid, libc::SIGTERM);
}

/// Stops `pid` at once (SIGKILL).
pub fn kill(pid: u32) {
    signal(pid, libc::SIGKILL);
}

/// Stops a child of this process at once (SIGKILL) and reaps it, so no
/// zombie is left behind. (Through its handle, not its pid: a reaped
/// child's pid may already name another process.)
pub fn kill_child(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// This machine's host name, for instance identities.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        assert!(alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!alive(pid));
        assert!(!hostname().is_empty());
    }
}
