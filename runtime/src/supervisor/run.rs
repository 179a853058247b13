//! The supervisor's loop: a tick every [`TICK`] takes or renews the lease,
//! checks health, scales and reconciles, until it is stopped or `wharf
//! down` asks; and the helpers that run one from a file or read its view.

use super::config::UpConfig;
use super::events::EventKind;
use super::state::{Supervisor, TICK};
use crate::client::Client;
use crate::error::{Error, ErrorKind};
use crate::heartbeat::{self, Heartbeat};
use crate::wire::subjects;
use async_nats::jetstream;
use futures_util::StreamExt;

impl Supervisor {
    /// Supervises until `stop` resolves or `wharf down` asks, then stops
    /// the instances this supervisor runs and gives up the lease. SIGHUP
    /// or `wharf up --reload` reads its `wharf.toml` again (see
    /// [`Supervisor::reloading_from`]).
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) -> Result<(), Error> {
        let mut down = self
            .client
            .nats()
            .subscribe(subjects::supervisor_down(self.client.prefix()))
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    format!("cannot subscribe for `wharf down`: {e}"),
                )
                .with_source(e)
            })?;
        let mut reloads = self
            .client
            .nats()
            .subscribe(subjects::supervisor_reload(self.client.prefix()))
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    format!("cannot subscribe for `wharf up --reload`: {e}"),
                )
                .with_source(e)
            })?;
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| {
                Error::new(ErrorKind::Process, format!("cannot watch SIGHUP: {e}")).with_source(e)
            })?;
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                request = down.next() => {
                    if let Some(reply) = request.and_then(|r| r.reply) {
                        let _ = self.client.nats().publish(reply, self.id.clone().into()).await;
                        // Answered before the drain, which may outlast `wharf down`'s wait.
                        let _ = self.client.nats().flush().await;
                    }
                    self.event(None, EventKind::Stop, None, "`wharf down` asked".to_owned()).await;
                    break;
                }
                _ = hangup.recv() => {
                    let _ = self.reload().await;
                }
                request = reloads.next() => {
                    let answer = match self.reload().await {
                        Ok(changes) => serde_json::json!({ "ok": true, "changes": changes }),
                        Err(error) => serde_json::json!({ "ok": false, "error": error.message() }),
                    };
                    if let Some(reply) = request.and_then(|r| r.reply) {
                        let _ = self.client.nats().publish(reply, answer.to_string().into()).await;
                    }
                }
                _ = ticker.tick() => self.tick().await,
            }
        }
        self.shutdown().await;
        // The reply to `wharf down` and the last events are buffered
        // publishes: send them before the process can exit.
        let _ = self.client.nats().flush().await;
        Ok(())
    }

    /// One round: lease, health, scaling.
    pub(crate) async fn tick(&mut self) {
        let was_leader = self.is_leader();
        self.hold_lease().await;
        self.note_for_metrics();
        if !self.is_leader() {
            // Said once per spell of standing by. A lease that lapsed
            // between two ticks (a slow round) is unsure, not lost.
            if was_leader || !self.standing_by {
                let why = if self.lease_revision.is_some() {
                    // Perhaps still ours: it acts again once a renewal is
                    // confirmed, keeping its instances.
                    "its lease could not be renewed in time (cut off from the JetStream quorum?): it stops acting until it is".to_owned()
                } else if was_leader {
                    "lost the lease to another supervisor".to_owned()
                } else {
                    format!(
                        "supervisor {} stands by: another supervisor holds the lease",
                        self.id
                    )
                };
                self.event(None, EventKind::Standby, None, why).await;
            }
            self.standing_by = true;
            return;
        }
        self.standing_by = false;
        if !was_leader {
            self.event(
                None,
                EventKind::Leader,
                None,
                format!("supervisor {} holds the lease", self.id),
            )
            .await;
        }
        // Every round, not only on taking the lease: instances whose
        // heartbeats reach it only later (a healed partition) are adopted
        // too, rather than left running unmanaged.
        self.adopt().await;
        self.check_health().await;
        self.scale().await;
        self.reconcile().await;
    }
}

/// Runs a supervisor for the `wharf.toml` at `path`, against its
/// `broker.url`, until SIGTERM or `wharf down`, reading the file again on
/// SIGHUP: for programs that embed the supervisor in a process of their
/// own.
pub async fn supervise_file(path: &std::path::Path) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let config = UpConfig::load(path)?;
    let settings = crate::settings::Settings::install(&config.broker)?.clone();
    let url = settings.nats_url.clone().ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            format!(
                "{}: set broker.url (or NATS_URL) to the NATS server to supervise through",
                path.display()
            ),
        )
    })?;
    let client = Client::connect_with(&url, &settings.credentials)
        .await?
        .with_prefix(settings.prefix);
    let supervisor = Supervisor::new(&client, &config)
        .await?
        .reloading_from(path);
    let mut term = signal(SignalKind::terminate()).map_err(|e| {
        Error::new(ErrorKind::Process, format!("cannot watch SIGTERM: {e}")).with_source(e)
    })?;
    supervisor
        .run(async move {
            term.recv().await;
        })
        .await
}

/// The fresh heartbeats of every instance, for `wharf status`.
pub async fn instances(client: &Client) -> Result<Vec<Heartbeat>, Error> {
    let js = jetstream::new(client.nats().clone());
    let store = heartbeat::instances_bucket(&js).await?;
    // A key or heartbeat that cannot be read is an error, not an instance
    // left out: a status that silently misses one would mislead.
    let unreadable = |what: &str, e: &dyn std::fmt::Display| {
        Error::new(
            ErrorKind::Connection,
            format!("cannot read {what} from KV `{}`: {e}; try again once JetStream answers (`nats kv ls {}`)", subjects::INSTANCES_BUCKET, subjects::INSTANCES_BUCKET),
        )
    };
    let list = "the list of instances";
    let mut keys = store.keys().await.map_err(|e| unreadable(list, &e))?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| unreadable(list, &e))?;
        let value = match store.get(&key).await {
            Ok(Some(value)) => value,
            // Gone (drained, or its heartbeat expired) since it was listed.
            Ok(None) => continue,
            Err(e) => return Err(unreadable(&format!("instance `{key}`'s heartbeat"), &e)),
        };
        // A value that is no heartbeat (put there by another program) is
        // no instance.
        if let Ok(beat) = serde_json::from_slice::<Heartbeat>(&value) {
            if crate::context::unix_ms().saturating_sub(beat.at_ms) <= 3_000 {
                out.push(beat);
            }
        }
    }
    out.sort_by(|a, b| {
        a.services
            .cmp(&b.services)
            .then(a.instance.cmp(&b.instance))
    });
    Ok(out)
}

impl Supervisor {
    /// Notes the lease and the instances by state for the next scrape.
    fn note_for_metrics(&self) {
        let beats = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        let mut instances = std::collections::BTreeMap::new();
        // Every state of every service, so a state that empties shows 0
        // rather than its last count.
        for name in self.services.keys() {
            for state in ["starting", "ready", "draining"] {
                instances.insert((name.clone(), state), 0);
            }
        }
        for (id, managed) in &self.managed {
            let state = if managed.draining_since.is_some() {
                "draining"
            } else if beats.contains_key(id) {
                "ready"
            } else {
                "starting"
            };
            *instances
                .entry((managed.service.clone(), state))
                .or_default() += 1;
        }
        drop(beats);
        self.metrics.note(self.is_leader(), instances);
    }
}
