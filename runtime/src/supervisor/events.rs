//! The supervisor's decisions, each published on `<prefix>._events` with
//! its reason (`wharf events` follows them) and logged.

use crate::client::Client;
use crate::wire::subjects;
use serde::{Deserialize, Serialize};
use std::fmt;

/// What a supervisor decided or saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// It took the lease: it acts from now on.
    Leader,
    /// It stands by: another supervisor holds the lease.
    Standby,
    /// It started an instance.
    Start,
    /// Starting an instance failed.
    StartFailed,
    /// An instance exited on its own; it is replaced.
    Exited,
    /// An instance stopped answering; it was killed and is replaced.
    Hung,
    /// A service's wanted instance count changed.
    Scale,
    /// It set the instance count of a service an orchestrator runs (Docker
    /// Swarm), which starts and stops the instances itself.
    Replicas,
    /// It asked an instance to drain.
    Drain,
    /// A draining instance finished and exited.
    Drained,
    /// A draining instance took too long and was killed.
    Killed,
    /// A service's instances keep dying at start: restarts pause.
    CrashLoop,
    /// It took over an instance a previous supervisor started.
    Adopt,
    /// It stops (`wharf down`, or its process ends).
    Stop,
    /// It read its `wharf.toml` again (SIGHUP or `wharf up --reload`), or
    /// could not: the reason says what changed or what is wrong.
    Reload,
    /// A step of a rollout: instances of a service's new revision replace
    /// those of the old, one at a time.
    Rollout,
    /// A rollout stopped: an instance of the new revision did not become
    /// ready, and the old revision keeps serving.
    RolloutFailed,
}

impl EventKind {
    /// The name on the wire: `start`, `start-failed`, `crash-loop`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Leader => "leader",
            EventKind::Standby => "standby",
            EventKind::Start => "start",
            EventKind::StartFailed => "start-failed",
            EventKind::Exited => "exited",
            EventKind::Hung => "hung",
            EventKind::Scale => "scale",
            EventKind::Replicas => "replicas",
            EventKind::Drain => "drain",
            EventKind::Drained => "drained",
            EventKind::Killed => "killed",
            EventKind::CrashLoop => "crash-loop",
            EventKind::Adopt => "adopt",
            EventKind::Stop => "stop",
            EventKind::Reload => "reload",
            EventKind::Rollout => "rollout",
            EventKind::RolloutFailed => "rollout-failed",
        }
    }

    /// Routine events (starts, drains, leadership) that local mode does
    /// not print.
    pub fn routine(self) -> bool {
        matches!(
            self,
            EventKind::Leader
                | EventKind::Start
                | EventKind::Adopt
                | EventKind::Drain
                | EventKind::Drained
                | EventKind::Stop
        )
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for EventKind {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for EventKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One health or scaling decision, published on `<prefix>._events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// The service, if the event is about one.
    pub service: Option<String>,
    /// What happened.
    pub kind: EventKind,
    /// The instance concerned, if any.
    pub instance: Option<String>,
    /// Why.
    pub reason: String,
    /// The supervisor that decided (its id, which starts with its pid).
    #[serde(default)]
    pub supervisor: String,
}

/// Publishes `event` on `<prefix>._events` and logs it; `quiet` (local
/// mode) leaves routine events out of the log.
pub(crate) async fn publish(client: &Client, quiet: bool, event: &Event) {
    if !(quiet && event.kind.routine()) {
        let service = event.service.as_deref().unwrap_or("-");
        let instance = event.instance.as_deref().unwrap_or("-");
        match event.kind {
            EventKind::Exited
            | EventKind::Hung
            | EventKind::Killed
            | EventKind::CrashLoop
            | EventKind::StartFailed
            | EventKind::RolloutFailed => {
                tracing::warn!(kind = %event.kind, service, instance, "{}", event.reason)
            }
            _ => tracing::info!(kind = %event.kind, service, instance, "{}", event.reason),
        }
    }
    if let Ok(json) = serde_json::to_vec(event) {
        let _ = client
            .nats()
            .publish(subjects::events(client.prefix()), json.into())
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_keep_their_wire_names() {
        let event = Event {
            supervisor: "1-x".into(),
            at_ms: 1,
            service: Some("s".into()),
            kind: EventKind::CrashLoop,
            instance: None,
            reason: "r".into(),
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["kind"], "crash-loop");
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back.kind, EventKind::CrashLoop);
        assert!(back.kind == "crash-loop");
        assert!(EventKind::Start.routine() && !EventKind::Hung.routine());
    }
}
