//! What calls need to know of their connection: a count of the times it
//! was lost, and a wake-up for calls waiting when it is. A call notes the
//! count when it sends; if the count moves before the reply comes, the
//! reply cannot come (the server it was sent through is gone), and the
//! call goes on without waiting out its deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// How often a connection that hears nothing pings its server. Three
/// unanswered pings in a row end it, so a hung or cut-off server is left
/// within about 1.5 s. Idle connections only: any traffic from the server
/// postpones the ping.
pub(crate) const PING_INTERVAL: Duration = Duration::from_millis(500);

/// How long connecting (or reconnecting) to one server may take before the
/// next is tried: a hung server accepts TCP but never greets.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection's losses.
#[derive(Debug, Default)]
pub(crate) struct Connection {
    /// How many times it was lost.
    losses: AtomicU64,
    /// Woken at each loss.
    lost: Notify,
}

impl Connection {
    /// How many times the connection was lost so far.
    pub(crate) fn losses(&self) -> u64 {
        self.losses.load(Ordering::Acquire)
    }

    /// The connection was lost (async-nats reconnects on its own).
    pub(crate) fn lose(&self) {
        self.losses.fetch_add(1, Ordering::AcqRel);
        self.lost.notify_waiters();
    }

    /// Resolves once the connection has been lost more than `losses`
    /// times: at once if it already has.
    pub(crate) async fn lost_since(&self, losses: u64) {
        loop {
            let lost = self.lost.notified();
            tokio::pin!(lost);
            // Registered before the count is read, so no loss slips between.
            lost.as_mut().enable();
            if self.losses() != losses {
                return;
            }
            lost.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_loss_wakes_the_calls_sent_before_it() {
        let connection = std::sync::Arc::new(Connection::default());
        let before = connection.losses();
        let waiting = tokio::spawn({
            let connection = connection.clone();
            async move { connection.lost_since(before).await }
        });
        tokio::task::yield_now().await;
        connection.lose();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        // A call sent after the loss does not see it.
        let after = connection.losses();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), connection.lost_since(after))
                .await
                .is_err()
        );
    }
}
