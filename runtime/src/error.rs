//! Errors: [`Error`] for everything wharf and NATS can get wrong, kept apart
//! from the function's own error type through [`CallError`].

use std::fmt;
use std::sync::Arc;

/// What went wrong, as a closed set a caller can match on.
///
/// Kinds that a worker reports carry the ADR-32 status code of the wire
/// contract ([`ErrorKind::code`]); the others arise in the caller's process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Connecting to NATS failed, or the connection was lost mid-call.
    Connection,
    /// No worker is subscribed to the function's subject.
    NoResponders,
    /// No reply arrived within the call's timeout.
    Timeout,
    /// The worker could not decode the request (code 400).
    BadRequest,
    /// The worker does not serve that function (code 404).
    UnknownFunction,
    /// Caller and worker were built from different signatures (code 409).
    SignatureMismatch,
    /// The transaction's owning instance is gone, and its state with it
    /// (code 410).
    TransactionLost,
    /// The transaction id is unknown, or its lease expired (code 404,
    /// kind `unknown_transaction`).
    UnknownTransaction,
    /// The function returned its own error (code 422); see [`CallError`].
    Application,
    /// The function panicked on the worker (code 500).
    Panicked,
    /// The worker is draining or overloaded (code 503).
    Unavailable,
    /// The call's deadline passed before it could run (code 504).
    DeadlineExceeded,
    /// The encoded request is larger than the server's `max_payload`.
    PayloadTooLarge,
    /// The arguments or the reply could not be encoded or decoded here.
    Codec,
    /// wharf is not set up: `wharf::init()` was not called, or the
    /// configuration is invalid.
    Config,
    /// Starting or supervising a local process (nats-server, a worker) failed.
    Process,
    /// The worker running this call stopped before it answered (it was
    /// killed, or lost its connection), or the request or reply was lost
    /// with a server: no worker holds the call any more. The call may have
    /// run. Retried for idempotent functions.
    WorkerLost,
    /// This process's connection to NATS was lost after the call was sent
    /// and before its reply came: the call may have run. Retried (on the
    /// new connection) for idempotent functions; other calls fail at once
    /// instead of waiting out their deadline.
    ConnectionLost,
    /// A durable call was given up: its arguments could not be decoded, or
    /// it was delivered `max_deliver` times without completing. The call
    /// sits in the dead-letter stream (wire code 500, kind `dead_letter`).
    DeadLetter,
    /// No object at the reference's URI: never stored, deleted, or
    /// expired (code 404, kind `object_not_found`).
    ObjectNotFound,
    /// An object's bytes do not match its reference's digest (code 500,
    /// kind `digest_mismatch`).
    DigestMismatch,
    /// A reference was read as another type than it was stored as (code
    /// 400, kind `object_type_mismatch`).
    ObjectTypeMismatch,
    /// The object store could not be reached (code 503 from the objects
    /// service, kind `store_unavailable`).
    StoreUnavailable,
    /// A URI or store URL names a scheme or store this process does not
    /// know (code 400, kind `unsupported_store`).
    UnsupportedStore,
    /// The server refused this process's credentials (user and password,
    /// token, NKey, creds), or they could not be used.
    Unauthorized,
    /// The server refused a publish or subscribe these credentials are not
    /// permitted.
    PermissionDenied,
    /// The call was cancelled (code 499, kind `cancelled`): a durable
    /// call cancelled by id ([`crate::Pending::cancel`]) before it
    /// completed. A plain call whose caller gave it up gets no reply.
    Cancelled,
    /// A reply carried a status code this version does not know.
    Other,
}

impl ErrorKind {
    /// The wire status code of this kind, for kinds a worker reports.
    pub fn code(self) -> Option<u16> {
        Some(match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::UnknownFunction => 404,
            ErrorKind::SignatureMismatch => 409,
            ErrorKind::TransactionLost => 410,
            ErrorKind::UnknownTransaction => 404,
            ErrorKind::Application => 422,
            ErrorKind::Panicked => 500,
            ErrorKind::Unavailable => 503,
            ErrorKind::DeadlineExceeded => 504,
            ErrorKind::DeadLetter => 500,
            ErrorKind::ObjectNotFound => 404,
            ErrorKind::DigestMismatch => 500,
            ErrorKind::ObjectTypeMismatch => 400,
            ErrorKind::StoreUnavailable => 503,
            ErrorKind::UnsupportedStore => 400,
            ErrorKind::Cancelled => 499,
            _ => return None,
        })
    }

    /// The kind a wire status code stands for.
    pub fn from_code(code: u16) -> ErrorKind {
        match code {
            400 => ErrorKind::BadRequest,
            404 => ErrorKind::UnknownFunction,
            409 => ErrorKind::SignatureMismatch,
            410 => ErrorKind::TransactionLost,
            422 => ErrorKind::Application,
            499 => ErrorKind::Cancelled,
            500 => ErrorKind::Panicked,
            503 => ErrorKind::Unavailable,
            504 => ErrorKind::DeadlineExceeded,
            _ => ErrorKind::Other,
        }
    }

    /// The kind of an error reply: the body's `kind` when it names one a
    /// worker reports, else the status code's.
    pub fn from_wire(code: u16, kind: Option<&str>) -> ErrorKind {
        match kind {
            Some("dead_letter") => ErrorKind::DeadLetter,
            Some("unknown_transaction") => ErrorKind::UnknownTransaction,
            Some("object_not_found") => ErrorKind::ObjectNotFound,
            Some("digest_mismatch") => ErrorKind::DigestMismatch,
            Some("object_type_mismatch") => ErrorKind::ObjectTypeMismatch,
            Some("store_unavailable") => ErrorKind::StoreUnavailable,
            Some("unsupported_store") => ErrorKind::UnsupportedStore,
            _ => ErrorKind::from_code(code),
        }
    }

    /// The `kind` string used in error bodies on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connection => "connection",
            ErrorKind::NoResponders => "no_responders",
            ErrorKind::Timeout => "timeout",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::UnknownFunction => "unknown_function",
            ErrorKind::SignatureMismatch => "signature_mismatch",
            ErrorKind::TransactionLost => "transaction_lost",
            ErrorKind::UnknownTransaction => "unknown_transaction",
            ErrorKind::Application => "application",
            ErrorKind::Panicked => "panicked",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::Codec => "codec",
            ErrorKind::Config => "config",
            ErrorKind::Process => "process",
            ErrorKind::WorkerLost => "worker_lost",
            ErrorKind::ConnectionLost => "connection_lost",
            ErrorKind::DeadLetter => "dead_letter",
            ErrorKind::ObjectNotFound => "object_not_found",
            ErrorKind::DigestMismatch => "digest_mismatch",
            ErrorKind::ObjectTypeMismatch => "object_type_mismatch",
            ErrorKind::StoreUnavailable => "store_unavailable",
            ErrorKind::UnsupportedStore => "unsupported_store",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Other => "other",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An infrastructure or remote-runtime failure: connection, routing,
/// encoding, panics, deadlines. Never the function's own error.
///
/// The error underneath (an async-nats or I/O error, say) is kept as its
/// [`source`](std::error::Error::source); two errors are equal when their
/// kinds and messages are.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl PartialEq for Error {
    fn eq(&self, other: &Error) -> bool {
        self.kind == other.kind && self.message == other.message
    }
}

impl Eq for Error {}

impl Error {
    /// Creates an error of `kind` with a message that says what was wrong
    /// and, where it can, how to fix it.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// The same error, caused by `source`.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.source = Some(Arc::new(source));
        self
    }

    /// The same error (kind and source) with another message.
    pub(crate) fn with_message(mut self, message: String) -> Error {
        self.message = message;
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The human-readable message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

/// The outcome of calling a function that returns `Result<T, E>`: either
/// its own error value `E`, or a wharf [`Error`].
#[derive(Debug, Clone, PartialEq)]
pub enum CallError<E> {
    /// The function ran and returned `Err(e)`.
    Application(E),
    /// The call failed in wharf, NATS or the worker runtime.
    Remote(Error),
}

impl<E> CallError<E> {
    /// [`ErrorKind::Application`] for the function's own error, otherwise
    /// the infrastructure error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CallError::Application(_) => ErrorKind::Application,
            CallError::Remote(error) => error.kind(),
        }
    }

    /// The function's own error, if that is what this is.
    pub fn application(self) -> Option<E> {
        match self {
            CallError::Application(error) => Some(error),
            CallError::Remote(_) => None,
        }
    }
}

impl<E> From<Error> for CallError<E> {
    fn from(error: Error) -> Self {
        CallError::Remote(error)
    }
}

impl<E: fmt::Display> fmt::Display for CallError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Application(error) => write!(f, "application: {error}"),
            CallError::Remote(error) => error.fmt(f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for CallError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CallError::Application(error) => Some(error),
            CallError::Remote(error) => Some(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for kind in [
            ErrorKind::BadRequest,
            ErrorKind::UnknownFunction,
            ErrorKind::SignatureMismatch,
            ErrorKind::TransactionLost,
            ErrorKind::Application,
            ErrorKind::Panicked,
            ErrorKind::Unavailable,
            ErrorKind::DeadlineExceeded,
            ErrorKind::Cancelled,
        ] {
            let code = kind.code().expect("remote kinds have codes");
            assert_eq!(ErrorKind::from_code(code), kind);
        }
        assert_eq!(ErrorKind::Timeout.code(), None);
        assert_eq!(ErrorKind::from_code(418), ErrorKind::Other);
        assert_eq!(
            ErrorKind::from_wire(500, Some("dead_letter")),
            ErrorKind::DeadLetter
        );
        assert_eq!(
            ErrorKind::from_wire(404, Some("unknown_transaction")),
            ErrorKind::UnknownTransaction
        );
        assert_eq!(
            ErrorKind::from_wire(500, Some("panicked")),
            ErrorKind::Panicked
        );
    }

    #[test]
    fn display_names_kind_and_message() {
        let error = Error::new(ErrorKind::NoResponders, "no worker serves `wharf.m.add`");
        assert_eq!(
            error.to_string(),
            "no_responders: no worker serves `wharf.m.add`"
        );
    }

    #[test]
    fn the_cause_is_the_source() {
        use std::error::Error as _;
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let error = Error::new(ErrorKind::Connection, "cannot connect: refused").with_source(io);
        assert_eq!(error.source().unwrap().to_string(), "refused");
        assert_eq!(
            error,
            Error::new(ErrorKind::Connection, "cannot connect: refused")
        );
    }

    #[test]
    fn call_error_keeps_application_errors_apart() {
        let app: CallError<String> = CallError::Application("b is zero".into());
        assert_eq!(app.kind(), ErrorKind::Application);
        assert_eq!(app.to_string(), "application: b is zero");
        let remote: CallError<String> = Error::new(ErrorKind::Timeout, "late").into();
        assert_eq!(remote.kind(), ErrorKind::Timeout);
        assert_eq!(remote.application(), None);
    }
}
