//! Scaling decisions for one service, from what its instances report.
//! Pure logic: no NATS, no processes, so every rule is unit-tested.

use std::time::{Duration, Instant};

/// How one service is scaled.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalePolicy {
    /// Fewest instances (0 allows scale to zero).
    pub min: usize,
    /// Most instances.
    pub max: usize,
    /// Average CPU per instance to aim for, percent of one core.
    pub cpu_target: f32,
    /// Average CPU below which an instance may be removed.
    pub cpu_low: f32,
    /// Waiting calls per instance above which instances are added.
    pub backlog_per_instance: usize,
    /// How long load must stay low before one instance is removed.
    pub scale_down_after: Duration,
    /// With `min = 0`: how long a service must be idle before its last
    /// instance is removed.
    pub idle_to_zero: Duration,
}

impl Default for ScalePolicy {
    fn default() -> Self {
        ScalePolicy {
            min: 1,
            max: 4,
            cpu_target: 50.0,
            cpu_low: 30.0,
            backlog_per_instance: 50,
            scale_down_after: Duration::from_secs(10),
            idle_to_zero: Duration::from_secs(60),
        }
    }
}

/// What a service's instances report right now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// Instances running or starting, not draining.
    pub instances: usize,
    /// Instances with a fresh heartbeat.
    pub reporting: usize,
    /// Sum of the reporting instances' CPU, percent of one core.
    pub cpu_sum: f32,
    /// Calls waiting for a slot, summed.
    pub backlog: usize,
    /// Calls running, summed.
    pub in_flight: usize,
    /// Calls answered per second, summed.
    pub calls_per_s: f64,
    /// A caller found no worker (cold start).
    pub demand: bool,
}

/// What to do with a service.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing.
    Hold,
    /// Run `to` instances, and why.
    Scale {
        /// The new instance count.
        to: usize,
        /// Why, in one word, for metrics: `below_min`, `above_max`,
        /// `cold_start`, `cpu`, `backlog`, `cpu_low` or `idle`.
        cause: &'static str,
        /// Why, for the event log.
        reason: String,
    },
}

/// The scaler of one service: the rules plus the timers that keep it from
/// flapping.
#[derive(Debug, Default)]
pub struct Scaler {
    low_since: Option<Instant>,
    idle_since: Option<Instant>,
}

impl Scaler {
    /// Decides from `seen` under `policy` at `now`.
    ///
    /// Up: as Kubernetes' HPA, `desired = ceil(total CPU / target)` (for
    /// reporting instances, so instances still starting do not trigger more),
    /// and at least `ceil(backlog / backlog_per_instance)`; all at once.
    /// Down: one instance at a time, once average CPU stayed below `cpu_low`
    /// with no backlog for `scale_down_after`, and only if the others would
    /// stay under the target; the last one only after `idle_to_zero` without
    /// calls.
    pub fn decide(&mut self, policy: &ScalePolicy, seen: &Observed, now: Instant) -> Decision {
        let n = seen.instances;
        let clamp = |to: usize| to.clamp(policy.min, policy.max.max(policy.min));
        if n < policy.min {
            self.reset();
            return scale(
                policy.min,
                "below_min",
                format!("{n} instances, below min {}", policy.min),
            );
        }
        if n == 0 {
            if seen.demand && policy.max > 0 {
                return scale(
                    1,
                    "cold_start",
                    "a call found no worker: cold start".to_owned(),
                );
            }
            return Decision::Hold;
        }
        let target = policy.cpu_target.max(1.0);
        let by_cpu = (seen.cpu_sum / target).ceil() as usize;
        let per = policy.backlog_per_instance.max(1);
        let by_backlog = seen.backlog.div_ceil(per);
        let desired = clamp(by_cpu.max(by_backlog));
        if desired > n {
            self.reset();
            let avg = seen.cpu_sum / seen.reporting.max(1) as f32;
            let (cause, reason) = if by_backlog > by_cpu {
                let reason = format!(
                    "backlog {} is over {per} per instance on {n} instances",
                    seen.backlog
                );
                ("backlog", reason)
            } else {
                let reason = format!(
                    "average CPU {avg:.0}% is over the {target:.0}% target on {n} instances"
                );
                ("cpu", reason)
            };
            return scale(desired, cause, reason);
        }
        if n > policy.max {
            return scale(
                policy.max,
                "above_max",
                format!("{n} instances, above max {}", policy.max),
            );
        }

        let avg = seen.cpu_sum / seen.reporting.max(1) as f32;
        let busy = seen.backlog > 0 || seen.reporting < n;
        // Would the others stay under the target without one instance?
        let fits = n > 1 && seen.cpu_sum / ((n - 1) as f32) < target;
        let low = !busy && avg < policy.cpu_low && (fits || n == 1);
        if !low || n <= policy.min {
            self.reset();
            return Decision::Hold;
        }
        if n == 1 {
            // Scale to zero: the last instance goes only when nothing at all
            // happened for a while.
            let idle = seen.in_flight == 0 && seen.calls_per_s == 0.0;
            if !idle {
                self.idle_since = None;
                return Decision::Hold;
            }
            let since = *self.idle_since.get_or_insert(now);
            if now.duration_since(since) >= policy.idle_to_zero {
                self.reset();
                return scale(
                    0,
                    "idle",
                    format!("idle for {:?}: scale to zero", policy.idle_to_zero),
                );
            }
            return Decision::Hold;
        }
        let since = *self.low_since.get_or_insert(now);
        if now.duration_since(since) >= policy.scale_down_after {
            // The window restarts, so removals are spaced out.
            self.low_since = Some(now);
            return scale(
                n - 1,
                "cpu_low",
                format!(
                    "average CPU {avg:.0}% under {:.0}% with no backlog for {:?}",
                    policy.cpu_low, policy.scale_down_after
                ),
            );
        }
        Decision::Hold
    }

    fn reset(&mut self) {
        self.low_since = None;
        self.idle_since = None;
    }
}

fn scale(to: usize, cause: &'static str, reason: String) -> Decision {
    Decision::Scale { to, cause, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(instances: usize, cpu_each: f32) -> Observed {
        Observed {
            instances,
            reporting: instances,
            cpu_sum: cpu_each * instances as f32,
            calls_per_s: 10.0,
            ..Observed::default()
        }
    }

    #[test]
    fn scales_up_in_proportion_to_cpu() {
        let policy = ScalePolicy::default();
        let mut scaler = Scaler::default();
        let now = Instant::now();
        // One instance at 180%: ceil(180 / 50) = 4 at once.
        match scaler.decide(&policy, &seen(1, 180.0), now) {
            Decision::Scale { to, reason, .. } => {
                assert_eq!(to, 4);
                assert!(reason.contains("180%"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // Slightly over the target: one more; never past max.
        assert!(matches!(
            scaler.decide(&policy, &seen(2, 60.0), now),
            Decision::Scale { to: 3, .. }
        ));
        assert!(matches!(
            scaler.decide(&policy, &seen(4, 95.0), now),
            Decision::Hold
        ));
    }

    #[test]
    fn instances_still_starting_do_not_trigger_more() {
        let policy = ScalePolicy::default();
        let mut scaler = Scaler::default();
        let starting = Observed {
            instances: 4,
            reporting: 1,
            cpu_sum: 180.0,
            ..Observed::default()
        };
        assert_eq!(
            scaler.decide(&policy, &starting, Instant::now()),
            Decision::Hold
        );
    }

    #[test]
    fn backlog_adds_instances() {
        let policy = ScalePolicy::default();
        let mut scaler = Scaler::default();
        let queued = Observed {
            backlog: 120,
            ..seen(1, 10.0)
        };
        match scaler.decide(&policy, &queued, Instant::now()) {
            Decision::Scale { to, reason, .. } => {
                assert_eq!(to, 3);
                assert!(reason.contains("backlog 120"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn scales_down_one_at_a_time_after_the_window() {
        let policy = ScalePolicy::default();
        let mut scaler = Scaler::default();
        let start = Instant::now();
        let quiet = seen(3, 5.0);
        assert_eq!(scaler.decide(&policy, &quiet, start), Decision::Hold);
        let later = start + policy.scale_down_after;
        assert!(matches!(
            scaler.decide(&policy, &quiet, later),
            Decision::Scale { to: 2, .. }
        ));
        // The window restarts after a removal.
        assert_eq!(scaler.decide(&policy, &seen(2, 5.0), later), Decision::Hold);
        let again = later + policy.scale_down_after;
        assert!(matches!(
            scaler.decide(&policy, &seen(2, 5.0), again),
            Decision::Scale { to: 1, .. }
        ));
        // Never below min.
        let much_later = again + policy.scale_down_after * 10;
        assert_eq!(
            scaler.decide(&policy, &seen(1, 0.0), much_later),
            Decision::Hold
        );
    }

    #[test]
    fn steady_load_does_not_flap() {
        // 2 instances at 28%: removing one would put the other at 56%, over
        // the target, which would add it back.
        let policy = ScalePolicy::default();
        let mut scaler = Scaler::default();
        let start = Instant::now();
        for step in 0..100 {
            let now = start + Duration::from_secs(step);
            assert_eq!(scaler.decide(&policy, &seen(2, 28.0), now), Decision::Hold);
        }
    }

    #[test]
    fn load_in_the_window_restarts_it() {
        let policy = ScalePolicy::default();
        let mut scaler = Scaler::default();
        let start = Instant::now();
        assert_eq!(scaler.decide(&policy, &seen(3, 5.0), start), Decision::Hold);
        let mid = start + policy.scale_down_after / 2;
        assert_eq!(scaler.decide(&policy, &seen(3, 40.0), mid), Decision::Hold);
        let end = start + policy.scale_down_after;
        assert_eq!(scaler.decide(&policy, &seen(3, 5.0), end), Decision::Hold);
    }

    #[test]
    fn scale_to_zero_and_cold_start() {
        let policy = ScalePolicy {
            min: 0,
            ..ScalePolicy::default()
        };
        let mut scaler = Scaler::default();
        let start = Instant::now();
        let idle = Observed {
            calls_per_s: 0.0,
            ..seen(1, 0.0)
        };
        assert_eq!(scaler.decide(&policy, &idle, start), Decision::Hold);
        let later = start + policy.idle_to_zero;
        assert!(matches!(
            scaler.decide(&policy, &idle, later),
            Decision::Scale { to: 0, .. }
        ));
        assert_eq!(
            scaler.decide(&policy, &Observed::default(), later),
            Decision::Hold
        );
        let demand = Observed {
            demand: true,
            ..Observed::default()
        };
        match scaler.decide(&policy, &demand, later) {
            Decision::Scale { to, reason, .. } => {
                assert_eq!(to, 1);
                assert!(reason.contains("cold start"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn below_min_is_restored() {
        let policy = ScalePolicy {
            min: 2,
            ..ScalePolicy::default()
        };
        let mut scaler = Scaler::default();
        assert!(matches!(
            scaler.decide(&policy, &seen(1, 0.0), Instant::now()),
            Decision::Scale { to: 2, .. }
        ));
    }
}
