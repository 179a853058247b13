//! A stream argument on the worker's side: the worker grants the caller
//! credit for items on an inbox of the call's own, and the function reads
//! them as a [`Stream`] that grants more as it goes, so the caller never
//! sends more than about the credit ahead of the function
//! (docs/protocol.md, "Stream arguments").

use crate::error::{Error, ErrorKind};
use crate::spec::FnSpec;
use crate::stream::{Stream, GIVE_UP, KEEPALIVE};
use crate::wire::codec::Codec;
use crate::wire::headers::{STREAM_CREDIT, STREAM_END, STREAM_ITEM, STREAM_ITEMS_TO};
use async_nats::{HeaderMap, Message, Subject, Subscriber};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use std::marker::PhantomData;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The items a caller may send before the worker grants more: as for a
/// streamed result (`client::stream::DEFAULT_CREDIT`), enough that credit
/// never stalls a fast function, few enough to bound memory.
pub(crate) const CREDIT: u64 = 32;

/// Subscribes for the items, grants the first credit and returns the stream
/// the function reads.
pub(crate) async fn open<T: DeserializeOwned + Send + 'static>(
    nats: &async_nats::Client,
    codec: Codec,
    spec: &'static FnSpec,
    reply: Subject,
    deadline_ms: u64,
) -> Result<Stream<T>, Error> {
    let failed = |e: &dyn std::fmt::Display| {
        Error::new(
            ErrorKind::Connection,
            format!(
                "the stream argument of `{}.{}` cannot be taken: {e}",
                spec.service, spec.name
            ),
        )
    };
    let items_to = nats.new_inbox();
    let subscriber = nats
        .subscribe(items_to.clone())
        .await
        .map_err(|e| failed(&e))?;
    let inlet = Inlet {
        nats: nats.clone(),
        codec,
        spec,
        reply,
        items_to: Subject::from(items_to),
        subscriber,
        deadline_ms,
        granted: CREDIT,
        next: 0,
        done: false,
        item: PhantomData::<fn() -> T>,
    };
    inlet.grant().await.map_err(|e| failed(&e))?;
    Ok(Stream::from_results(futures_util::stream::unfold(
        inlet,
        |mut inlet| async move {
            let item = inlet.next_item().await?;
            Some((item, inlet))
        },
    )))
}

/// The worker's side of a stream argument.
struct Inlet<T> {
    nats: async_nats::Client,
    codec: Codec,
    spec: &'static FnSpec,
    /// The caller's inbox, which grants go to.
    reply: Subject,
    /// Where the caller sends the items, subscribed by `subscriber`.
    items_to: Subject,
    subscriber: Subscriber,
    /// The call's deadline (unix ms, 0 none).
    deadline_ms: u64,
    /// The items granted in all.
    granted: u64,
    /// The index of the next item.
    next: u64,
    done: bool,
    item: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Inlet<T> {
    async fn next_item(&mut self) -> Option<Result<T, Error>> {
        if self.done {
            return None;
        }
        let outcome = loop {
            let message = match self.receive().await {
                Ok(message) => message,
                Err(error) => break Some(Err(error)),
            };
            let header = |name| {
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|value| value.as_str().trim().to_owned())
            };
            if let Some(index) = header(STREAM_ITEM) {
                if self.next >= self.granted {
                    break Some(Err(Error::new(
                        ErrorKind::BadRequest,
                        format!(
                            "the caller of `{}.{}` sent item {index} of its stream argument beyond the {} items granted: send only what Wharf-Stream-Credit allows",
                            self.spec.service, self.spec.name, self.granted
                        ),
                    )));
                }
                if index.parse() != Ok(self.next) {
                    break Some(Err(self.lost(format!(
                        "item {} was lost on the way (the next message was item {index})",
                        self.next
                    ))));
                }
                return Some(self.item(&message).await);
            }
            if let Some(count) = header(STREAM_END) {
                break self.end(&count, &message);
            }
            // Not of this protocol (a repeated or stray message): ignored.
        };
        self.done = true;
        outcome
    }

    /// Decodes the next item and grants more credit when half is used.
    async fn item(&mut self, message: &Message) -> Result<T, Error> {
        let index = self.next;
        let value = self.codec.decode::<T>(&message.payload).map_err(|e| {
            self.done = true;
            Error::new(
                ErrorKind::BadRequest,
                format!(
                    "item {index} of the stream argument of `{}.{}` cannot be decoded as `{}`: {e}; send items of the type in the signature `{}`",
                    self.spec.service,
                    self.spec.name,
                    std::any::type_name::<T>(),
                    self.spec.signature
                ),
            )
        })?;
        self.next += 1;
        if self.granted.saturating_sub(self.next) <= CREDIT / 2 {
            self.granted = self.next + CREDIT;
            if let Err(e) = self.grant().await {
                self.done = true;
                return Err(self.lost(format!("credit cannot be granted: {e}")));
            }
        }
        Ok(value)
    }

    /// The caller's end of the stream: the number of items it sent, which
    /// must be the number that arrived, and why it failed if it did.
    fn end(&self, count: &str, message: &Message) -> Option<Result<T, Error>> {
        if !message.payload.is_empty() {
            return Some(Err(Error::new(
                ErrorKind::Application,
                format!(
                    "the stream argument of `{}.{}` failed on its caller after {} items: {}",
                    self.spec.service,
                    self.spec.name,
                    self.next,
                    String::from_utf8_lossy(&message.payload).trim_end()
                ),
            )));
        }
        match count.parse::<u64>() {
            Ok(sent) if sent == self.next => None,
            Ok(sent) => Some(Err(self.lost(format!(
                "it ended after {sent} items, but {} arrived",
                self.next
            )))),
            Err(_) => Some(Err(Error::new(
                ErrorKind::BadRequest,
                format!(
                    "the end of the stream argument of `{}.{}` has header Wharf-Stream-End `{count}`, not a number of items",
                    self.spec.service, self.spec.name
                ),
            ))),
        }
    }

    /// The caller's next message, until the call's deadline. While it
    /// waits, the latest grant is repeated every [`KEEPALIVE`] (a grant
    /// lost on the way is made good); a caller that sends nothing, not even
    /// its keepalive, for [`GIVE_UP`] is taken for gone.
    async fn receive(&mut self) -> Result<Message, Error> {
        let deadline = match self.deadline_ms {
            0 => None,
            deadline_ms => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis() as u64;
                Some(Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now)))
            }
        };
        let quiet_since = Instant::now();
        loop {
            let mut tick = Instant::now() + KEEPALIVE;
            if let Some(deadline) = deadline {
                tick = tick.min(deadline);
            }
            match tokio::time::timeout_at(tick.into(), self.subscriber.next()).await {
                Ok(Some(message)) => return Ok(message),
                Ok(None) => return Err(self.lost("the worker lost its subscription".to_owned())),
                Err(_) => {}
            }
            let why = if deadline.is_some_and(|d| Instant::now() >= d) {
                (
                    ErrorKind::DeadlineExceeded,
                    "the call's deadline passed while it waited for the next item".to_owned(),
                )
            } else if quiet_since.elapsed() >= GIVE_UP {
                (
                    ErrorKind::Cancelled,
                    format!(
                        "its caller sent nothing for {} s, not even a keepalive, and is taken for gone",
                        GIVE_UP.as_secs()
                    ),
                )
            } else {
                if let Err(e) = self.grant().await {
                    return Err(self.lost(format!("credit cannot be granted: {e}")));
                }
                continue;
            };
            return Err(Error::new(
                why.0,
                format!(
                    "the stream argument of `{}.{}` stopped after {} items: {}",
                    self.spec.service, self.spec.name, self.next, why.1
                ),
            ));
        }
    }

    /// Tells the caller how many items it may send in all, and where.
    async fn grant(&self) -> Result<(), async_nats::PublishError> {
        let mut headers = HeaderMap::new();
        headers.insert(STREAM_CREDIT, self.granted.to_string());
        headers.insert(STREAM_ITEMS_TO, self.items_to.as_str());
        self.nats
            .publish_with_headers(self.reply.clone(), headers, Default::default())
            .await
    }

    fn lost(&self, what: String) -> Error {
        Error::new(
            ErrorKind::Connection,
            format!(
                "the stream argument of `{}.{}` broke: {what}; call again",
                self.spec.service, self.spec.name
            ),
        )
    }
}
