//! A streamed result on the caller's side: the request on an inbox of the
//! call's own, then each item as it arrives, with credit granted back to
//! the worker as items are read, and a cancel when the stream is dropped
//! before its end (docs/protocol.md, "Streams").

use super::call::{annotate, publish_cancel, CallOptions, CallState, WATCH_AFTER};
use super::Client;
use crate::error::{Error, ErrorKind};
use crate::retry::with_retries;
use crate::spec::FnSpec;
use crate::stream::{Stream, KEEPALIVE};
use crate::wire::codec::Codec;
use crate::wire::headers::{STREAM_CREDIT, STREAM_CREDIT_TO, STREAM_ITEM};
use crate::wire::reply::{remote_failure, status_code};
use crate::wire::request::{self, Prepared};
use crate::wire::subjects;
use async_nats::{HeaderName, Message, StatusCode, Subject, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use std::marker::PhantomData;
use std::time::Instant;
use tokio::sync::watch;

/// The items a caller takes before it grants more, unless the request says
/// otherwise: enough that credit never stalls a fast reader (it is granted
/// again when half is read), few enough that a stream of large items holds
/// little memory on either side.
pub(crate) const DEFAULT_CREDIT: u64 = 32;

impl Client {
    /// Opens a stream: tries the call as its retry policy allows until a
    /// worker answers with its first item (or with the reply that ends the
    /// stream at once).
    pub(crate) async fn open_stream<T: DeserializeOwned + Send + 'static>(
        &self,
        spec: &'static FnSpec,
        prepared: Prepared,
        call: CallState,
        options: &CallOptions,
    ) -> Result<Stream<T>, Error> {
        let credit = options.credit.unwrap_or(DEFAULT_CREDIT);
        let ask = (STREAM_CREDIT, credit.to_string());
        let (opened, _) = self.open(spec, prepared, &call, options, ask).await?;
        let reader = Reader {
            client: self.clone(),
            spec,
            call,
            codec: options.codec,
            subscriber: opened.subscriber,
            first: Some(opened.first),
            losses: opened.losses,
            credit,
            granted: credit,
            next: 0,
            grants: None,
            done: false,
            item: PhantomData,
        };
        Ok(Stream::from_results(futures_util::stream::unfold(
            reader,
            |mut reader| async move {
                let item = reader.next_item().await?;
                Some((item, reader))
            },
        )))
    }

    /// Tries a stream call as its retry policy allows until a worker
    /// answers: the request carries header `ask`, which says what stream
    /// it has. Returns the answer and the tries it took.
    pub(super) async fn open(
        &self,
        spec: &'static FnSpec,
        prepared: Prepared,
        call: &CallState,
        options: &CallOptions,
        ask: (HeaderName, String),
    ) -> Result<(Opened, u32), Error> {
        if prepared.payload.len() > self.spill_at() {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "call to `{}` not sent: its request is {} bytes, more than one message holds; a stream call does not spill its arguments: pass large values by reference (wharf::put)",
                    spec.path,
                    prepared.payload.len()
                ),
            ));
        }
        let policy = options.retry.unwrap_or(spec.retry);
        let (prepared, ask) = (&prepared, &ask);
        with_retries(
            &policy,
            spec.idempotent,
            call.deadline,
            |attempt| {
                let prepared = if attempt == 1 {
                    prepared.clone()
                } else {
                    request::with_attempt(prepared, options.codec, attempt)
                };
                // The subject of the caller's signature first, then, when
                // no worker serves it, the plain one (as for a plain call).
                async move {
                    let again = prepared.clone();
                    match self
                        .open_once(spec, call, prepared, options.codec, ask, true)
                        .await
                    {
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::NoResponders | ErrorKind::PermissionDenied
                            ) =>
                        {
                            self.open_once(spec, call, again, options.codec, ask, false)
                                .await
                        }
                        outcome => outcome,
                    }
                }
            },
            |failure| spec.observe_retry(failure),
        )
        .await
        .map_err(|(failure, tries)| annotate(failure, tries))
    }

    /// One try: the request, sent with its reply on a new inbox, and the
    /// first message that answers it.
    async fn open_once(
        &self,
        spec: &'static FnSpec,
        call: &CallState,
        prepared: Prepared,
        codec: Codec,
        ask: &(HeaderName, String),
        signed: bool,
    ) -> Result<Opened, Error> {
        let subject = if signed {
            spec.signed_subject(self.prefix())
        } else {
            spec.subject(self.prefix())
        };
        if call.deadline <= Instant::now() {
            return Err(call.deadline_passed(spec, &subject));
        }
        let nats = self.nats();
        // A subject the server refused fails at once, before and while the
        // call waits (as for a plain call).
        let denials = self.denials();
        if let Some(denied) = denials.check(&subject) {
            return Err(denied);
        }
        let inbox = nats.new_inbox();
        let connection_failed = |e: &dyn std::fmt::Display| {
            Error::new(
                ErrorKind::Connection,
                format!(
                    "stream call to `{subject}` failed on the connection to `{}`: {e}",
                    crate::settings::redact(self.url())
                ),
            )
        };
        let mut subscriber = nats
            .subscribe(inbox.clone())
            .await
            .map_err(|e| connection_failed(&e))?;
        let mut headers = prepared.headers.unwrap_or_default();
        headers.insert(ask.0.clone(), ask.1.as_str());
        let losses = self.connection().losses();
        nats.publish_with_reply_and_headers(subject.clone(), inbox, headers, prepared.payload)
            .await
            .map_err(|e| connection_failed(&e))?;
        // Dropped before an answer (or given up at the deadline), the call
        // is cancelled on the worker that took it.
        let mut cancel = Armed::new(self, spec, call);
        let first = tokio::select! {
            first = receive(self, spec, call, &mut subscriber, losses) => first,
            denied = denials.refused(&subject) => Err(denied),
        };
        let first = match first {
            Ok(message) => message,
            Err(error) => {
                cancel.0 = error.kind() == ErrorKind::Timeout;
                return Err(error);
            }
        };
        cancel.0 = false;
        if first.status == Some(StatusCode::NO_RESPONDERS) {
            if !signed {
                let demand = subjects::demand(self.prefix(), spec.service);
                let _ = nats.publish(demand, Bytes::new()).await;
            }
            return Err(Error::new(
                ErrorKind::NoResponders,
                format!("no worker serves `{subject}` ({}): start a worker for service `{}`, or check the service and function names", spec.path, spec.service),
            ));
        }
        if status_code(&first) == Some(503) {
            // Draining or overloaded: the call did not run there.
            return Err(remote_failure(codec, &first)
                .map(|(_, error)| error)
                .unwrap_or_else(|| Error::new(ErrorKind::Unavailable, "unavailable")));
        }
        Ok(Opened {
            subscriber,
            first,
            losses,
        })
    }
}

/// A try that a worker answered.
pub(super) struct Opened {
    pub(super) subscriber: Subscriber,
    pub(super) first: Message,
    pub(super) losses: u64,
}

/// Cancels a call dropped while it is armed (a future that never finished).
pub(super) struct Armed<'a>(pub(super) bool, &'a Client, &'static FnSpec, &'a CallState);

impl<'a> Armed<'a> {
    pub(super) fn new(client: &'a Client, spec: &'static FnSpec, call: &'a CallState) -> Armed<'a> {
        Armed(true, client, spec, call)
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        if self.0 {
            publish_cancel(self.1, self.2, self.3.id.as_str());
        }
    }
}

/// The next message on a stream's inbox, within the call's deadline; one
/// that takes a while is watched like any call (its connection, and probes
/// that the worker still holds it).
pub(super) async fn receive(
    client: &Client,
    spec: &'static FnSpec,
    call: &CallState,
    subscriber: &mut Subscriber,
    losses: u64,
) -> Result<Message, Error> {
    let subject = spec.subject(client.prefix());
    let gone = || client.connection_lost(spec, &subject);
    let look = tokio::time::sleep_until((Instant::now() + WATCH_AFTER).min(call.deadline).into());
    tokio::select! {
        biased;
        message = subscriber.next() => return message.ok_or_else(gone),
        _ = look => {}
    }
    let connection = client.connection();
    if connection.losses() != losses {
        return Err(gone());
    }
    tokio::select! {
        biased;
        message = subscriber.next() => message.ok_or_else(gone),
        _ = connection.lost_since(losses) => Err(gone()),
        _ = tokio::time::sleep_until(call.deadline.into()) => Err(call.deadline_passed(spec, &subject)),
        lost = client.watch_call(spec, call) => Err(lost),
    }
}

/// The caller's side of an open stream.
struct Reader<T> {
    client: Client,
    spec: &'static FnSpec,
    call: CallState,
    codec: Codec,
    subscriber: Subscriber,
    /// The message that opened the stream, not yet read.
    first: Option<Message>,
    losses: u64,
    /// The items granted at a time.
    credit: u64,
    /// The items granted in all.
    granted: u64,
    /// The index of the next item.
    next: u64,
    /// The latest grant, which a task of its own sends on (and repeats).
    grants: Option<watch::Sender<u64>>,
    /// The stream has ended (its reply came, or it failed).
    done: bool,
    item: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Reader<T> {
    async fn next_item(&mut self) -> Option<Result<T, Error>> {
        if self.done {
            return None;
        }
        let message = match self.first.take() {
            Some(message) => message,
            None => {
                let received = receive(
                    &self.client,
                    self.spec,
                    &self.call,
                    &mut self.subscriber,
                    self.losses,
                )
                .await;
                match received {
                    Ok(message) => message,
                    Err(error) => return Some(Err(self.fail(error))),
                }
            }
        };
        let index = message
            .headers
            .as_ref()
            .and_then(|h| h.get(STREAM_ITEM))
            .map(|index| index.as_str().trim().to_owned());
        match index {
            Some(index) if index.parse() == Ok(self.next) => Some(self.item(self.next, &message)),
            Some(index) => {
                let error = self.lost(format!(
                    "item {} was lost on the way (the next message was item {index})",
                    self.next
                ));
                Some(Err(self.fail(error)))
            }
            None => self.end(&message),
        }
    }

    /// Decodes item `index` and grants more credit when half is used.
    fn item(&mut self, index: u64, message: &Message) -> Result<T, Error> {
        if index == 0 {
            let Some(to) = message
                .headers
                .as_ref()
                .and_then(|h| h.get(STREAM_CREDIT_TO))
            else {
                let error = self.lost(
                    "its first item named no credit subject (Wharf-Stream-Credit-To)".to_owned(),
                );
                return Err(self.fail(error));
            };
            self.grants = Some(spawn_grants(
                self.client.nats().clone(),
                Subject::from(to.as_str()),
                self.granted,
            ));
        }
        let value = match self.codec.decode::<T>(&message.payload) {
            Ok(value) => value,
            Err(e) => {
                let error = Error::new(
                    ErrorKind::BadRequest,
                    format!(
                        "item {index} of the stream from `{}` cannot be decoded as `{}`: {e}; rebuild caller and worker from the same source",
                        self.spec.path, self.spec.returns
                    ),
                );
                return Err(self.fail(error));
            }
        };
        self.next += 1;
        if self.granted - self.next <= self.credit / 2 {
            self.granted = self.next + self.credit;
            if let Some(grants) = &self.grants {
                grants.send_replace(self.granted);
            }
        }
        Ok(value)
    }

    /// The reply that ends the stream: the worker's error, or the number
    /// of items it sent, which must be the number that arrived.
    fn end(&mut self, message: &Message) -> Option<Result<T, Error>> {
        self.done = true;
        if let Some((_, error)) = remote_failure(self.codec, message) {
            return Some(Err(error));
        }
        match self.codec.decode::<u64>(&message.payload) {
            Ok(sent) if sent == self.next => None,
            Ok(sent) => {
                let error = self.lost(format!(
                    "it ended after {sent} items, but {} arrived",
                    self.next
                ));
                Some(Err(error))
            }
            Err(e) => Some(Err(Error::new(
                ErrorKind::Codec,
                format!(
                    "the reply that ends the stream from `{}` is not an item count: {e}",
                    self.spec.path
                ),
            ))),
        }
    }

    fn lost(&self, what: String) -> Error {
        Error::new(
            ErrorKind::Connection,
            format!(
                "the stream of call {} from `{}` broke: {what}; call again",
                self.call.id, self.spec.path
            ),
        )
    }

    /// Ends the stream with `error`, cancelling the producer.
    fn fail(&mut self, error: Error) -> Error {
        self.done = true;
        publish_cancel(&self.client, self.spec, self.call.id.as_str());
        error
    }
}

impl<T> Drop for Reader<T> {
    fn drop(&mut self) {
        // Dropped before its end: the worker stops producing.
        if !self.done {
            publish_cancel(&self.client, self.spec, self.call.id.as_str());
        }
    }
}

/// Sends each new grant to the worker, and repeats the latest every
/// [`KEEPALIVE`], until the reader drops the sender.
fn spawn_grants(nats: async_nats::Client, to: Subject, granted: u64) -> watch::Sender<u64> {
    let (sender, mut latest) = watch::channel(granted);
    tokio::spawn(async move {
        loop {
            if let Ok(Err(_)) = tokio::time::timeout(KEEPALIVE, latest.changed()).await {
                return;
            }
            let granted = *latest.borrow_and_update();
            if nats
                .publish(to.clone(), granted.to_string().into())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    sender
}
