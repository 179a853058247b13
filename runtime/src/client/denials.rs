//! Permissions the server refused this connection: a publish or subscribe
//! it is not allowed comes back as an asynchronous `-ERR`, with no reply
//! to wait for. Noted here, it fails the calls to that subject at once.

use crate::error::{Error, ErrorKind};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Refused subject, and what was refused (`publish`, `subscribe`).
    refused: Mutex<HashMap<String, &'static str>>,
    /// Set on the first refusal: until then a check costs one load.
    any: AtomicBool,
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
            .insert(subject.to_owned(), what);
        self.any.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// A connection's refusals; `watching` as above.
    pub(crate) fn new(watching: bool) -> Denials {
        Denials {
            watching,
            ..Denials::default()
        }
    }

    /// The error for `subject` when the server refused it.
    pub(crate) fn check(&self, subject: &str) -> Option<Error> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let what = *self.refused.lock().unwrap().get(subject)?;
        Some(denied(what, subject))
    }

    /// Resolves once the server refuses `subject`; pends otherwise (and
    /// at once, without waiting, when this connection is not watching).
    pub(crate) async fn refused(&self, subject: &str) -> Error {
        if !self.watching {
            return std::future::pending().await;
        }
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(error) = self.check(subject) {
                return error;
            }
            notified.await;
        }
    }
}

/// The error of a refused `what` (`publish`, `subscribe`) on `subject`.
pub(crate) fn denied(what: &str, subject: &str) -> Error {
    Error::new(
        ErrorKind::PermissionDenied,
        format!("the server does not permit these credentials to {what} `{subject}`: grant them {what} permission on it (a `{what}` allow in the user's permissions), or use credentials that have it"),
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
    }
}
