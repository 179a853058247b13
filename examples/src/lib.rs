//! Helpers shared by the example binaries: what a process costs, read
//! from /proc, and medians.

/// CPU time (user + system, clock ticks) of each pid, from /proc; 0 for a
/// pid that is gone.
pub fn cpu_ticks(pids: &[u32]) -> Vec<u64> {
    pids.iter()
        .map(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // Fields after the parenthesised command name; utime and
                    // stime are the 12th and 13th of them.
                    let rest = &stat[stat.rfind(')')? + 2..];
                    let fields: Vec<&str> = rest.split_whitespace().collect();
                    Some(
                        fields.get(11)?.parse::<u64>().ok()?
                            + fields.get(12)?.parse::<u64>().ok()?,
                    )
                })
                .unwrap_or(0)
        })
        .collect()
}

pub use wharf::testing::rss_kib;

/// The median of `values` (the upper one for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Clock ticks per second, for [`cpu_ticks`].
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// Burns CPU on this thread for `ms` milliseconds; returns how many rounds
/// it spun (so the work cannot be optimised away).
pub fn burn_cpu(ms: u64) -> u64 {
    let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
    let mut rounds = 0u64;
    while std::time::Instant::now() < until {
        rounds = std::hint::black_box(rounds.wrapping_add(1));
    }
    rounds
}

/// What a bench measured: the values recorded under each key, one a round,
/// keys kept in the order first recorded.
#[derive(Debug, Default)]
pub struct Samples(Vec<(String, Vec<f64>)>);

impl Samples {
    /// Adds `value` under `key`.
    pub fn record(&mut self, key: impl AsRef<str>, value: f64) {
        let key = key.as_ref();
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, values)) => values.push(value),
            None => self.0.push((key.to_owned(), vec![value])),
        }
    }

    /// The values recorded under `key` (none if it was never recorded).
    pub fn of(&self, key: impl AsRef<str>) -> &[f64] {
        let key = key.as_ref();
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map_or(&[], |(_, values)| values)
    }
}

/// One table row comparing `ours` with `base`, per round: `| label | base
/// median | ours median | ratio of medians | per-round ratio, min to max |`.
pub fn ratio_row(label: &str, base: &[f64], ours: &[f64]) -> String {
    let ratios: Vec<f64> = base.iter().zip(ours).map(|(b, o)| o / b).collect();
    let low = ratios.iter().cloned().fold(f64::INFINITY, f64::min);
    let high = ratios.iter().cloned().fold(0.0, f64::max);
    format!(
        "| {label} | {:.1} | {:.1} | {:.3} | {low:.3} to {high:.3} |",
        median(base),
        median(ours),
        median(ours) / median(base)
    )
}

/// This binary started again with `args` and `env`, against the NATS
/// server at `url` (a worker, or a baseline process of a bench), its output
/// discarded.
pub fn spawn_self(
    url: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::io::Result<std::process::Child> {
    use std::process::{Command, Stdio};
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args(args)
        .env("NATS_URL", url)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command.spawn()
}
