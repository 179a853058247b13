//! The request builder every call starts from (`<function>::request(..)`,
//! or a generated stub's plain call): per-call options, then a plain,
//! durable or transactional call.

use crate::boxed::out_of_line;
use crate::client::call::{CallOptions, CallState};
use crate::client::returns::{Reply, Returns};
use crate::client::stream_arg::Encoded;
use crate::client::{global, Client};
use crate::durable::caller::Pending;
use crate::error::{Error, ErrorKind};
use crate::retry::RetryPolicy;
use crate::spec::FnSpec;
use crate::stream::Stream;
use crate::txn::lease::outside;
use crate::txn::transaction::{current, Transaction};
use crate::wire::codec::Codec;
use crate::wire::reply::instance;
use async_nats::Message;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// A call being prepared: set options, then `.await` it (or call
/// [`Request::send`]). Made by `<function>::request(args..)`.
///
/// ```no_run
/// # #[wharf::microservice] async fn add(a: i64, b: i64) -> i64 { a + b }
/// # fn main() {}
/// # async fn run() -> Result<(), wharf::Error> {
/// use std::time::Duration;
/// let sum = add::request(2, 3).timeout(Duration::from_millis(200)).await?;
/// # Ok(()) }
/// ```
#[must_use = "a request does nothing until it is sent or awaited"]
pub struct Request<A, R> {
    spec: &'static FnSpec,
    args: A,
    client: Option<Client>,
    options: CallOptions,
    /// The transaction the call is made in, when the request names one.
    txn: Option<Transaction>,
    /// The items of a stream argument, encoded once the codec is known.
    input: Option<StreamArg>,
    returns: PhantomData<fn() -> R>,
}

/// A stream argument waiting for its call's codec.
type StreamArg = Box<dyn FnOnce(Codec) -> Encoded + Send>;

impl<A: Serialize, R> Request<A, R> {
    /// A request for `spec` with encoded-later arguments `args`.
    pub fn new(spec: &'static FnSpec, args: A) -> Self {
        Request {
            spec,
            args,
            client: None,
            options: CallOptions::default(),
            txn: None,
            input: None,
            returns: PhantomData,
        }
    }

    /// Sends `items` as the function's stream argument (generated stubs of
    /// functions that take a [`Stream<T>`]).
    #[doc(hidden)]
    pub fn with_stream<T: Serialize + Send + 'static>(mut self, items: Stream<T>) -> Self {
        let path = self.spec.path;
        self.input = Some(Box::new(move |codec: Codec| {
            items
                .map(move |item| {
                    let item = item?;
                    codec.encode(&item).map_err(|e| {
                        Error::new(
                            ErrorKind::Codec,
                            format!(
                                "an item of the stream argument of `{path}` cannot be encoded: {e}"
                            ),
                        )
                    })
                })
                .boxed()
        }));
        self
    }

    /// Sends through `client` instead of the one [`crate::init`] set up.
    pub fn client(mut self, client: &Client) -> Self {
        self.client = Some(client.clone());
        self
    }

    /// Overrides the function's timeout for this call.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.options.timeout = Some(timeout);
        self
    }

    /// Encodes this call with `codec` (postcard by default).
    pub fn codec(mut self, codec: Codec) -> Self {
        self.options.codec = codec;
        self
    }

    /// Retries this call by `policy` instead of the function's.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.options.retry = Some(policy);
        self
    }
}

impl<A: Serialize, R: Returns> Request<A, R> {
    /// Sends this call through JetStream (`true`), at least once even if
    /// workers die, or as a plain request (`false`), whatever the
    /// function's `durable` option says.
    pub fn durable(mut self, durable: bool) -> Self {
        self.options.durable = Some(durable);
        self
    }

    /// Makes this call in transaction `txn` (a call to a
    /// `#[microservice(stateful)]` function needs one; see
    /// [`crate::transaction`]).
    pub fn transaction(mut self, txn: &Transaction) -> Self {
        self.txn = Some(txn.clone());
        self
    }

    /// Starts this call durably and returns without waiting for the
    /// result: [`Pending::wait`] collects it, here or, through
    /// `<function>::collect(id)`, in any other process.
    pub async fn start(mut self) -> Result<Pending<R>, Error> {
        if self.input.is_some() {
            return Err(durable_stream(self.spec));
        }
        if self.spec.stateful {
            return Err(Error::new(
                ErrorKind::Config,
                format!("`{}` is stateful: its calls go to the instance that owns the transaction, so they cannot be started durably", self.spec.path),
            ));
        }
        let client = match self.client.take() {
            Some(client) => client,
            None => global()?.clone(),
        };
        let call = CallState::new(self.spec, &self.options)?;
        let prepared = client.prepare(self.spec, &self.args, &self.options, &call)?;
        client
            .start_durable::<R>(self.spec, prepared, call, &self.options, false)
            .await
    }

    /// Sends the call and decodes the reply.
    pub async fn send(self) -> Result<R::Value, R::Err> {
        self.dispatch(false).await.map(|reply| reply.value)
    }

    /// Sends the call and returns the value with the serving worker's
    /// identity ([`Reply::instance`]).
    pub async fn send_detailed(self) -> Result<Reply<R::Value>, R::Err> {
        self.dispatch(true).await
    }

    async fn dispatch(mut self, report_instance: bool) -> Result<Reply<R::Value>, R::Err> {
        self.options.report_instance = report_instance;
        if self.spec.stateful && self.txn.is_none() {
            self.txn = current();
        }
        if self.spec.stateful {
            if self.txn.is_none() {
                return Err(outside(self.spec).into());
            }
            if self.options.durable == Some(true) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("`{}` is stateful: its calls go to the instance that owns the transaction, so they cannot be durable", self.spec.path),
                )
                .into());
            }
        }
        self.options.txn = self.txn.as_ref().map(|txn| txn.route().clone());
        let client = match (self.client.take(), &self.txn) {
            (Some(client), _) => client,
            (None, Some(txn)) => txn.client().clone(),
            (None, None) => global()?.clone(),
        };
        let call = CallState::new(self.spec, &self.options)?;
        let span = call.span(self.spec);
        let started = Instant::now();
        let prepared = client.prepare(self.spec, &self.args, &self.options, &call)?;
        let input = self.input.take();
        let answer = async {
            if let Some(input) = input {
                if self.options.durable == Some(true) {
                    return Err(durable_stream(self.spec));
                }
                let items = input(self.options.codec);
                let (message, attempts) = out_of_line(|| {
                    client.call_with_stream(self.spec, prepared, call, &self.options, items)
                })
                .await?;
                Ok((message, self.options.codec, attempts))
            } else if self.options.durable.unwrap_or(self.spec.durable) {
                // Boxed: the durable path's future is large, and inline it
                // would be moved with every plain call's future as well.
                let (client, spec, options) = (&client, self.spec, &self.options);
                out_of_line(move || async move {
                    let pending = client
                        .start_durable::<R>(spec, prepared, call, options, true)
                        .await?;
                    pending.wait_message().await
                })
                .await
            } else {
                let (message, attempts) = client
                    .invoke(self.spec, prepared, call, &self.options)
                    .await?;
                Ok((message, self.options.codec, attempts))
            }
        };
        let answer = answer.instrument(span.clone()).await;
        record_outcome(
            self.spec,
            started,
            &span,
            answer.as_ref().map(|(message, _, _)| message),
        );
        let (message, codec, attempts) = answer?;
        let value = R::decode(self.spec, codec, &message)?;
        let instance = instance(&message);
        Ok(Reply {
            value,
            instance,
            attempts,
        })
    }
}

impl<A, R> IntoFuture for Request<A, R>
where
    A: Serialize + Send + 'static,
    R: Returns + 'static,
    R::Value: Send,
    R::Err: Send,
{
    type Output = Result<R::Value, R::Err>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

/// What a [`Request`] for a function returning [`Stream<T>`] returns: it
/// is opened ([`Request::open`], or `.await`), not sent.
pub struct Streamed<T>(PhantomData<fn() -> T>);

impl<A: Serialize, T: DeserializeOwned + Send + 'static> Request<A, Streamed<T>> {
    /// Lets the worker send `items` items (at least one) before the caller
    /// grants more (32 unless set): what either side holds of a stream is
    /// bounded by about this many items.
    pub fn credit(mut self, items: u32) -> Self {
        self.options.credit = Some(u64::from(items.max(1)));
        self
    }

    /// Calls the function and returns its stream once the worker answers:
    /// items are read from it as they arrive.
    pub async fn open(mut self) -> Result<Stream<T>, Error> {
        let client = match self.client.take() {
            Some(client) => client,
            None => global()?.clone(),
        };
        let call = CallState::new(self.spec, &self.options)?;
        let started = Instant::now();
        let prepared = client.prepare(self.spec, &self.args, &self.options, &call)?;
        drop(self.args);
        let opened = client
            .open_stream(self.spec, prepared, call, &self.options)
            .await;
        // A stream counts as a call from its request to its first answer.
        if crate::metrics::on() {
            let failure = opened.as_ref().err().map(Error::kind);
            self.spec.observe_call(started.elapsed(), failure);
        }
        opened
    }
}

impl<A, T> IntoFuture for Request<A, Streamed<T>>
where
    A: Serialize + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    type Output = Result<Stream<T>, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.open())
    }
}

/// Opens a stream from `spec` through `client` with default options
/// (generated stubs of functions returning [`Stream<T>`]).
#[doc(hidden)]
pub async fn open_stream<A: Serialize, T: DeserializeOwned + Send + 'static>(
    client: &Client,
    spec: &'static FnSpec,
    args: A,
) -> Result<Stream<T>, Error> {
    Request::<A, Streamed<T>>::new(spec, args)
        .client(client)
        .open()
        .await
}

/// Opens a stream through the client set up by [`crate::init`].
#[doc(hidden)]
pub async fn open_stream_global<A: Serialize, T: DeserializeOwned + Send + 'static>(
    spec: &'static FnSpec,
    args: A,
) -> Result<Stream<T>, Error> {
    open_stream::<A, T>(global()?, spec, args).await
}

/// Calls `spec` through `client` with default options (generated stubs).
#[doc(hidden)]
pub async fn call<A: Serialize, R: Returns>(
    client: &Client,
    spec: &'static FnSpec,
    args: A,
) -> Result<R::Value, R::Err> {
    if spec.durable || spec.stateful {
        return Request::<A, R>::new(spec, args).client(client).send().await;
    }
    let options = CallOptions::default();
    let call = CallState::new(spec, &options)?;
    let span = call.span(spec);
    let started = Instant::now();
    let prepared = client.prepare(spec, &args, &options, &call)?;
    drop(args);
    let answer = client
        .invoke(spec, prepared, call, &options)
        .instrument(span.clone())
        .await;
    record_outcome(
        spec,
        started,
        &span,
        answer.as_ref().map(|(message, _)| message),
    );
    let (message, _) = answer?;
    R::decode(spec, options.codec, &message)
}

/// Calls `spec`, whose stream argument is `items`, through `client` with
/// default options (generated stubs).
#[doc(hidden)]
pub async fn call_with_stream<A: Serialize, R: Returns, T: Serialize + Send + 'static>(
    client: &Client,
    spec: &'static FnSpec,
    args: A,
    items: Stream<T>,
) -> Result<R::Value, R::Err> {
    Request::<A, R>::new(spec, args)
        .with_stream(items)
        .client(client)
        .send()
        .await
}

/// Calls `spec` with a stream argument through the client set up by
/// [`crate::init`].
#[doc(hidden)]
pub async fn call_with_stream_global<A: Serialize, R: Returns, T: Serialize + Send + 'static>(
    spec: &'static FnSpec,
    args: A,
    items: Stream<T>,
) -> Result<R::Value, R::Err> {
    call_with_stream::<A, R, T>(global()?, spec, args, items).await
}

/// A durable call's arguments are stored whole, so a stream cannot be one.
fn durable_stream(spec: &FnSpec) -> Error {
    Error::new(
        ErrorKind::Config,
        format!(
            "`{}` takes a stream argument, whose items are sent as the worker reads them: it cannot be called durably",
            spec.path
        ),
    )
}

/// Notes how a call ended (`ok`, the kind of the error reply, or the kind
/// of the call's own failure) on its span and in the caller's metrics.
fn record_outcome(
    spec: &'static FnSpec,
    started: Instant,
    span: &tracing::Span,
    answer: Result<&Message, &Error>,
) {
    if span.is_disabled() && !crate::metrics::on() {
        return;
    }
    let failure = match answer {
        Ok(message) => match crate::wire::reply::status_code(message) {
            Some(code) if code >= 400 => Some(ErrorKind::from_code(code)),
            _ => None,
        },
        Err(error) => Some(error.kind()),
    };
    spec.observe_call(started.elapsed(), failure);
    span.record("rpc.outcome", failure.map_or("ok", ErrorKind::as_str));
}

/// Calls `spec` through the client set up by [`crate::init`].
#[doc(hidden)]
pub async fn call_global<A: Serialize, R: Returns>(
    spec: &'static FnSpec,
    args: A,
) -> Result<R::Value, R::Err> {
    call::<A, R>(global()?, spec, args).await
}
