//! Permissions the server refused this connection: a publish or subscribe
//! it is not allowed comes back as an asynchronous `-ERR`, with no reply
//! to wait for. Noted here, it fails the calls to that subject at once.

use crate::error::{Error, ErrorKind};
use crate::wire::subjects;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::Notify;

/// The subjects this connection was refused, and who waits to hear of one.
#[derive(Debug, Default)]
pub(crate) struct Denials {
    /// Whether refusals are possible at all: only a connection that
    /// authenticated as a user (password, NKey, creds) has permissions to
    /// break. The others skip the wait, which costs every call a
    /// registration.
    pub(crate) watching: bool,
    /// What was refused (`publish`, `subscribe`) on which subject.
    refused: Mutex<HashSet<(&'static str, String)>>,
    /// Set on the first refusal: until then a check costs one load.
    any: AtomicBool,
    /// Names this connection's permissions: new on each reconnect, when
    /// they may have changed. Never 0.
    generation: AtomicU64,
    notify: Notify,
}

impl Denials {
    /// Reads a server error; notes it when it is a permissions violation.
    pub(crate) fn note_server_error(&self, text: &str) {
        let Some((what, subject)) = violation(text) else {
            return;
        };
        self.refused
            .lock()
            .unwrap()
            .insert((what, subject.to_owned()));
        self.any.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Forgets every refusal: after a reconnect the server's permissions
    /// may be others.
    pub(crate) fn clear(&self) {
        self.refused.lock().unwrap().clear();
        self.any.store(false, Ordering::Release);
        self.generation.store(next_generation(), Ordering::Relaxed);
    }

    /// A connection's refusals; `watching` as above.
    pub(crate) fn new(watching: bool) -> Denials {
        Denials {
            watching,
            generation: AtomicU64::new(next_generation()),
            ..Denials::default()
        }
    }

    /// This connection's permissions, as `FnSpec::permitted_on` takes them.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The error for a call publishing to `subject` when the server refused
    /// that publish, or refused this connection its reply inbox (no reply
    /// could then reach any call).
    pub(crate) fn check(&self, subject: &str) -> Option<Error> {
        self.check_for("publish", subject)
    }

    /// The error when the server refused `what` (`publish`, `subscribe`) on
    /// `subject`, or this connection its inbox.
    pub(crate) fn check_for(&self, what: &'static str, subject: &str) -> Option<Error> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let refused = self.refused.lock().unwrap();
        if refused.contains(&(what, subject.to_owned())) {
            return Some(denied(what, subject));
        }
        let inbox_prefix = crate::settings::Settings::get()
            .map_or(subjects::DEFAULT_INBOX_PREFIX, |s| {
                s.credentials.inbox_prefix()
            });
        let inbox = |subject: &str| {
            subjects::is_inbox(subject, subjects::DEFAULT_INBOX_PREFIX)
                || subjects::is_inbox(subject, inbox_prefix)
        };
        refused
            .iter()
            .find(|(what, subject)| *what == "subscribe" && inbox(subject))
            .map(|(what, subject)| denied(what, subject))
    }

    /// Resolves once the server refuses publishing to `subject`; pends
    /// otherwise (at once, without waiting, when this connection is not
    /// watching).
    pub(crate) async fn refused(&self, subject: &str) -> Error {
        self.refused_for("publish", subject).await
    }

    /// Resolves once the server refuses `what` on `subject`.
    pub(crate) async fn refused_for(&self, what: &'static str, subject: &str) -> Error {
        if !self.watching {
            return std::future::pending().await;
        }
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(error) = self.check_for(what, subject) {
                return error;
            }
            notified.await;
        }
    }
}

/// A permissions generation no connection has had.
fn next_generation() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The error of a refused `what` (`publish`, `subscribe`) on `subject`.
pub(crate) fn denied(what: &str, subject: &str) -> Error {
    let readable = crate::wire::subjects::readable(subject);
    // A signature subject: say which function it is, and that wharf uses
    // both of its subjects.
    let which = if readable != subject {
        format!(" (the subject of `{readable}`; wharf calls and serves a function on both its subjects, see `wharf auth`)")
    } else {
        String::new()
    };
    Error::new(
        ErrorKind::PermissionDenied,
        format!("the server does not permit these credentials to {what} `{subject}`{which}: grant them {what} permission on it (a `{what}` allow in the user's permissions), or use credentials that have it"),
    )
}

/// `Permissions Violation for Publish to "subject"` (or `Subscription to`,
/// possibly `using queue "q"`): what was refused, and on which subject.
fn violation(text: &str) -> Option<(&'static str, &str)> {
    let lower = text.to_ascii_lowercase();
    let at = lower.find("permissions violation for ")?;
    let rest = &lower[at + "permissions violation for ".len()..];
    let what = if rest.starts_with("publish") {
        "publish"
    } else if rest.starts_with("subscription") {
        "subscribe"
    } else {
        return None;
    };
    // The subject keeps its case: take it from the original text.
    let start = text[at..].find('"')? + at + 1;
    let end = text[start..].find('"')? + start;
    Some((what, &text[start..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violations_are_read() {
        assert_eq!(
            violation("Permissions Violation for Publish to \"wharf.q.Divide\""),
            Some(("publish", "wharf.q.Divide"))
        );
        assert_eq!(
            violation(
                "permissions violation for subscription to \"wharf.q.add\" using queue \"q\""
            ),
            Some(("subscribe", "wharf.q.add"))
        );
        assert_eq!(violation("maximum payload exceeded"), None);
        let denials = Denials::default();
        assert!(denials.check("a.b").is_none());
        denials.note_server_error("Permissions Violation for Publish to \"a.b\"");
        assert_eq!(
            denials.check("a.b").unwrap().kind(),
            ErrorKind::PermissionDenied
        );
        assert!(denials.check("a.c").is_none());
        assert!(denials.check_for("subscribe", "a.b").is_none());
        denials.note_server_error("Permissions Violation for Subscription to \"_INBOX.x.*\"");
        assert!(denials.check("a.c").unwrap().message().contains("_INBOX"));
        denials.clear();
        assert!(denials.check("a.b").is_none());
    }
}
