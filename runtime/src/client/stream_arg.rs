//! A stream argument on the caller's side: the request on an inbox of the
//! call's own; once a worker grants credit, the items as the credit allows
//! (the caller's stream is polled only then, so a slow function pauses the
//! producer), then the end; the call's reply ends it all
//! (docs/protocol.md, "Stream arguments").

use super::call::{CallOptions, CallState};
use super::stream::{receive, Armed, Opened};
use super::Client;
use crate::error::{Error, ErrorKind};
use crate::spec::FnSpec;
use crate::stream::KEEPALIVE;
use crate::wire::headers::{STREAM_CREDIT, STREAM_END, STREAM_INPUT, STREAM_ITEM, STREAM_ITEMS_TO};
use crate::wire::request::Prepared;
use async_nats::{HeaderMap, Message, Subject};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;

/// A stream argument's items, each encoded in the call's codec.
pub(crate) type Encoded = BoxStream<'static, Result<Bytes, Error>>;

impl Client {
    /// Calls a function that takes a stream argument: tries the call as its
    /// retry policy allows until a worker answers, then sends `items` as
    /// the worker grants credit, and returns the reply with the tries it
    /// took. Nothing is retried once the worker has answered.
    pub(crate) async fn call_with_stream(
        &self,
        spec: &'static FnSpec,
        prepared: Prepared,
        call: CallState,
        options: &CallOptions,
        items: Encoded,
    ) -> Result<(Message, u32), Error> {
        let ask = (STREAM_INPUT, "1".to_owned());
        let (opened, attempts) = self.open(spec, prepared, &call, options, ask).await?;
        let reply = self.send_items(spec, &call, opened, items).await?;
        Ok((reply, attempts))
    }

    /// Sends the items while the worker's credit allows, until its reply.
    async fn send_items(
        &self,
        spec: &'static FnSpec,
        call: &CallState,
        opened: Opened,
        mut items: Encoded,
    ) -> Result<Message, Error> {
        let Opened {
            mut subscriber,
            first,
            losses,
        } = opened;
        // Dropped (or failed) before the reply, the call is cancelled on the
        // worker.
        let mut cancel = Armed::new(self, spec, call);
        let mut message = Some(first);
        let mut outlet = Outlet {
            spec,
            granted: 0,
            sent: 0,
            to: None,
            open: true,
        };
        loop {
            if let Some(answer) = message.take() {
                if !outlet.take_grant(&answer) {
                    cancel.0 = false;
                    return Ok(answer);
                }
            }
            let ready = outlet.open && outlet.sent < outlet.granted;
            tokio::select! {
                // The reply first: once it came, items are no longer read.
                biased;
                answer = receive(self, spec, call, &mut subscriber, losses) => {
                    message = Some(answer?);
                }
                item = items.next(), if ready => outlet.send(self, item).await?,
                _ = tokio::time::sleep_until(call.deadline.into()) => {
                    return Err(call.deadline_passed(spec, &spec.subject(self.prefix())));
                }
                // Quiet (a slow producer, no credit, or the function at
                // work): the worker hears that the caller is still there.
                _ = tokio::time::sleep(KEEPALIVE) => outlet.keepalive(self).await,
            }
        }
    }
}

/// What the caller has sent of a stream argument, and may send.
struct Outlet {
    spec: &'static FnSpec,
    /// The items the worker granted in all.
    granted: u64,
    /// The items sent.
    sent: u64,
    /// Where the worker takes the items, from its first grant on.
    to: Option<Subject>,
    /// The end is not sent yet.
    open: bool,
}

impl Outlet {
    /// Takes a grant (cumulative, so a late one is harmless); false when
    /// `message` is not one but the call's reply.
    fn take_grant(&mut self, message: &Message) -> bool {
        let Some(headers) = &message.headers else {
            return false;
        };
        let Some(to) = headers.get(STREAM_ITEMS_TO) else {
            return false;
        };
        let granted = headers
            .get(STREAM_CREDIT)
            .and_then(|credit| credit.as_str().trim().parse::<u64>().ok());
        if let Some(granted) = granted {
            self.granted = self.granted.max(granted);
            self.to = Some(Subject::from(to.as_str()));
        }
        true
    }

    /// An empty message without headers to the worker's items subject,
    /// which it ignores but for knowing the caller is there.
    async fn keepalive(&self, client: &Client) {
        if let (Some(to), true) = (&self.to, self.open) {
            let _ = client.nats().publish(to.clone(), Bytes::new()).await;
        }
    }

    /// Sends the stream's next item, or its end (with why, when the
    /// caller's stream failed).
    async fn send(
        &mut self,
        client: &Client,
        item: Option<Result<Bytes, Error>>,
    ) -> Result<(), Error> {
        let Some(to) = self.to.clone() else {
            return Ok(());
        };
        let mut headers = HeaderMap::new();
        let body = match item {
            Some(Ok(body)) => {
                headers.insert(STREAM_ITEM, self.sent.to_string());
                body
            }
            end => {
                self.open = false;
                headers.insert(STREAM_END, self.sent.to_string());
                match end {
                    // Never empty: an empty end is one that did not fail.
                    Some(Err(error)) => Bytes::from(format!("{error} ")),
                    _ => Bytes::new(),
                }
            }
        };
        let size = body.len();
        client
            .nats()
            .publish_with_headers(to, headers, body)
            .await
            .map_err(|e| {
                let spec = self.spec;
                match e.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => Error::new(
                        ErrorKind::PayloadTooLarge,
                        format!(
                            "item {} of the stream argument of `{}` is {size} bytes, more than the server's max_payload: send smaller items",
                            self.sent, spec.path
                        ),
                    ),
                    _ => Error::new(
                        ErrorKind::Connection,
                        format!(
                            "item {} of the stream argument of `{}` cannot be sent: {e}",
                            self.sent, spec.path
                        ),
                    ),
                }
            })?;
        if self.open {
            self.sent += 1;
        }
        Ok(())
    }
}
