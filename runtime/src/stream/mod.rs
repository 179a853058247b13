//! Streamed results: [`Stream<T>`], what a `#[microservice]` returns to
//! send items one by one, and what its caller reads them from.
//!
//! On the worker the items are pulled from the function's stream only as
//! the caller grants credit for them, so a slow reader pauses the producer;
//! on the caller the same type yields the items as they arrive. The wire
//! form is in docs/protocol.md, "Streams". `inlet` is the worker's side
//! of a stream argument: what a function that takes a `Stream<T>` reads.

use crate::error::{Error, ErrorKind};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

pub(crate) mod inlet;

/// How often a caller repeats its latest grant while it holds a stream,
/// whether or not it reads: a grant lost on the way is made good, and the
/// worker, which waits for credit at most a few of these, knows the reader
/// is still there.
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(5);

/// How long the worker's side of a stream (a result waiting for credit, an
/// argument waiting for items) goes without a word from the caller before
/// it takes the caller for gone: a few [`KEEPALIVE`]s, so only a vanished
/// caller is silent this long.
pub(crate) const GIVE_UP: Duration = Duration::from_secs(15);

/// A stream of `T` returned by a microservice: items arrive at the caller
/// as the worker produces them, with credit-based flow control, and an
/// error ends the stream with that error.
///
/// The function builds one from any stream or iterator, or from a channel
/// it feeds; the caller reads it with [`Stream::next`] (or as a
/// `futures::Stream` of `Result<T, wharf::Error>`). Dropping it on the
/// caller cancels the producer.
///
/// ```no_run
/// #[wharf::microservice]
/// async fn countdown(from: u32) -> wharf::Stream<u32> {
///     wharf::Stream::iter((0..=from).rev())
/// }
///
/// # async fn run() -> Result<(), wharf::Error> {
/// let mut items = countdown(3).await?;
/// while let Some(n) = items.next().await {
///     println!("{}", n?);
/// }
/// # Ok(()) }
/// # fn main() {}
/// ```
pub struct Stream<T> {
    items: BoxStream<'static, Result<T, Error>>,
}

impl<T: Send + 'static> Stream<T> {
    /// The items of `items`, in order.
    pub fn new(items: impl futures_util::Stream<Item = T> + Send + 'static) -> Stream<T> {
        Stream::from_results(items.map(Ok))
    }

    /// The items of `items` until its first error, which ends the stream:
    /// the caller reads it as an [`ErrorKind::Application`] error whose
    /// message is the error's `Display`.
    pub fn try_new<E: fmt::Display>(
        items: impl futures_util::Stream<Item = Result<T, E>> + Send + 'static,
    ) -> Stream<T> {
        Stream::from_results(
            items.map(|item| item.map_err(|e| Error::new(ErrorKind::Application, e.to_string()))),
        )
    }

    /// The items of an iterator.
    pub fn iter<I>(items: I) -> Stream<T>
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: Send + 'static,
    {
        Stream::new(futures_util::stream::iter(items))
    }

    /// A stream fed through a channel that holds at most `capacity` items
    /// (at least one): [`StreamSender::send`] waits while it is full, so a
    /// producer task goes at the reader's pace.
    pub fn channel(capacity: usize) -> (StreamSender<T>, Stream<T>) {
        let (sender, mut receiver) = tokio::sync::mpsc::channel(capacity.max(1));
        let items = futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx));
        (StreamSender { sender }, Stream::from_results(items))
    }

    /// A stream of items that are each a value or an error; the first error
    /// ends it (on the caller, the error is returned as it is).
    pub fn from_results(
        items: impl futures_util::Stream<Item = Result<T, Error>> + Send + 'static,
    ) -> Stream<T> {
        // Fused: reading on after the end (or an error) keeps giving `None`.
        Stream {
            items: items.fuse().boxed(),
        }
    }
}

impl<T> Stream<T> {
    /// The next item, an error (after which the stream has ended), or
    /// `None` once every item has been read.
    pub async fn next(&mut self) -> Option<Result<T, Error>> {
        self.items.next().await
    }
}

impl<T> futures_util::Stream for Stream<T> {
    type Item = Result<T, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.items.as_mut().poll_next(cx)
    }
}

impl<T> fmt::Debug for Stream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("item", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}

/// The sending half of [`Stream::channel`].
pub struct StreamSender<T> {
    sender: tokio::sync::mpsc::Sender<Result<T, Error>>,
}

impl<T> StreamSender<T> {
    /// Sends one item, waiting while the channel is full. Fails with
    /// [`ErrorKind::Cancelled`] once the stream is gone (its caller
    /// dropped it, or the call was cancelled): stop producing then.
    pub async fn send(&self, item: T) -> Result<(), Error> {
        self.sender.send(Ok(item)).await.map_err(|_| gone())
    }

    /// Ends the stream with `error` (an [`ErrorKind::Application`] error
    /// carrying its `Display`), after the items already sent.
    pub async fn fail(self, error: impl fmt::Display) {
        let error = Error::new(ErrorKind::Application, error.to_string());
        let _ = self.sender.send(Err(error)).await;
    }

    /// Whether the stream is gone (see [`StreamSender::send`]).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

impl<T> Clone for StreamSender<T> {
    fn clone(&self) -> Self {
        StreamSender {
            sender: self.sender.clone(),
        }
    }
}

impl<T> fmt::Debug for StreamSender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamSender").finish_non_exhaustive()
    }
}

fn gone() -> Error {
    Error::new(
        ErrorKind::Cancelled,
        "the stream is gone: its caller dropped it or the call was cancelled; stop producing",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn built_streams_yield_their_items_then_end() {
        let mut items = Stream::iter([1, 2, 3]);
        let mut seen = Vec::new();
        while let Some(item) = items.next().await {
            seen.push(item.unwrap());
        }
        assert_eq!(seen, [1, 2, 3]);

        let failing = futures_util::stream::iter([Ok(1), Err("bad row 2")]);
        let mut items = Stream::try_new(failing);
        assert_eq!(items.next().await.unwrap().unwrap(), 1);
        let error = items.next().await.unwrap().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Application);
        assert_eq!(error.message(), "bad row 2");
    }

    #[tokio::test]
    async fn a_channel_stream_pauses_its_sender_and_tells_it_when_gone() {
        let (sender, mut items) = Stream::channel(1);
        sender.send(1).await.unwrap();
        // Full: the next send waits for the reader.
        let second = sender.send(2);
        tokio::pin!(second);
        assert!(futures_util::poll!(second.as_mut()).is_pending());
        assert_eq!(items.next().await.unwrap().unwrap(), 1);
        second.await.unwrap();
        drop(items);
        assert!(sender.is_closed());
        assert_eq!(
            sender.send(3).await.unwrap_err().kind(),
            ErrorKind::Cancelled
        );
    }
}
