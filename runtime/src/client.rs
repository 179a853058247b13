//! The caller's side: a [`Client`] and the request path every generated stub
//! goes through.

use crate::codec::{
    self, ApplicationErrorBody, Codec, Envelope, ErrorBody, ENVELOPE_VERSION, FLAG_REPORT_INSTANCE,
};
use crate::headers;
use crate::{Error, ErrorKind, FnSpec};
use async_nats::{HeaderMap, Message, RequestErrorKind};
use serde::{de::DeserializeOwned, Serialize};
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Subject prefix when neither `WHARF_PREFIX` nor [`Client::with_prefix`]
/// sets one.
pub const DEFAULT_PREFIX: &str = "wharf";

/// A connection to NATS through which microservices are called and served.
/// Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    nats: async_nats::Client,
    prefix: String,
    url: String,
}

impl Client {
    /// Connects to the NATS server at `url`, or to any of a cluster's
    /// servers given comma-separated (`nats://a:4222,nats://b:4222`). The
    /// subject prefix comes from `WHARF_PREFIX` (default `wharf`).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), wharf::Error> {
    /// let client = wharf::Client::connect("nats://127.0.0.1:4222").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Client, Error> {
        let servers: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let nats = async_nats::ConnectOptions::new()
            .name("wharf")
            .connect(servers.as_slice())
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    format!("cannot connect to NATS at `{url}`: {e}; start nats-server there, or unset NATS_URL to let wharf::init() start one"),
                )
            })?;
        Ok(Client::from_nats(nats, url))
    }

    /// Wraps an existing async-nats connection (`url` is used in messages).
    pub fn from_nats(nats: async_nats::Client, url: impl Into<String>) -> Client {
        let prefix = std::env::var("WHARF_PREFIX")
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        Client {
            inner: Arc::new(Inner {
                nats,
                prefix,
                url: url.into(),
            }),
        }
    }

    /// The same connection with another subject prefix.
    pub fn with_prefix(&self, prefix: impl Into<String>) -> Client {
        Client {
            inner: Arc::new(Inner {
                nats: self.inner.nats.clone(),
                prefix: prefix.into(),
                url: self.inner.url.clone(),
            }),
        }
    }

    /// The underlying async-nats client.
    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.nats
    }

    /// The subject prefix, `wharf` by default.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The URL this client connected to.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Encodes one call: for postcard the envelope and the arguments in
    /// one buffer and no headers; for JSON the arguments and `Wharf-*`
    /// headers. Synchronous, so `args` is not held across an await.
    fn prepare<A: Serialize>(
        &self,
        spec: &'static FnSpec,
        args: &A,
        options: &CallOptions,
    ) -> Result<Prepared, Error> {
        let timeout = options.timeout.unwrap_or_else(|| spec.timeout());
        let deadline = deadline_ms(timeout);
        let encode_error = |e: String| {
            Error::new(
                ErrorKind::Codec,
                format!("cannot encode the arguments of `{}`: {e}", spec.path),
            )
        };
        let id = call_id();
        let request = async_nats::Request::new().timeout(Some(timeout));
        let request = match options.codec {
            Codec::Postcard => {
                let envelope = Envelope {
                    version: ENVELOPE_VERSION,
                    sig: spec.sig,
                    deadline_ms: deadline,
                    call_id: id.as_str().as_bytes(),
                    attempt: 1,
                    flags: if options.report_instance {
                        FLAG_REPORT_INSTANCE
                    } else {
                        0
                    },
                };
                let buffer = postcard::to_extend(&envelope, Vec::with_capacity(64))
                    .and_then(|buffer| postcard::to_extend(args, buffer))
                    .map_err(|e| encode_error(e.to_string()))?;
                request.payload(buffer.into())
            }
            Codec::Json => {
                let mut headers = HeaderMap::new();
                headers.insert(headers::CONTENT_TYPE, codec::JSON);
                headers.insert(headers::SIG, spec.sig_hex());
                headers.insert(headers::DEADLINE, deadline.to_string());
                headers.insert(headers::CALL_ID, id.as_str());
                if options.report_instance {
                    headers.insert(headers::REPORT, "instance");
                }
                let payload = Codec::Json.encode(args).map_err(encode_error)?;
                request.payload(payload).headers(headers)
            }
        };
        Ok(Prepared {
            subject: spec.subject(&self.inner.prefix),
            request,
            timeout,
        })
    }

    /// Sends a prepared call and returns the raw reply message. Error
    /// replies are returned as messages too; [`Returns`] interprets them.
    async fn send(&self, spec: &'static FnSpec, prepared: Prepared) -> Result<Message, Error> {
        let Prepared {
            subject,
            request,
            timeout,
        } = prepared;
        self.inner
            .nats
            .send_request(subject.clone(), request)
            .await
            .map_err(|e| match e.kind() {
                RequestErrorKind::NoResponders => Error::new(
                    ErrorKind::NoResponders,
                    format!("no worker serves `{subject}` ({}): start a worker for service `{}` (`<binary> worker` with NATS_URL set), or check the service and function names", spec.path, spec.service),
                ),
                RequestErrorKind::TimedOut => Error::new(
                    ErrorKind::Timeout,
                    format!("no reply from `{subject}` within {timeout:?}; raise the timeout (#[microservice(timeout = \"..\")] or .timeout(..) on the request) or add workers"),
                ),
                RequestErrorKind::MaxPayloadExceeded => Error::new(
                    ErrorKind::PayloadTooLarge,
                    format!("call to `{subject}` not sent: {e}; pass large values by reference, or raise max_payload in the nats-server configuration"),
                ),
                _ => Error::new(
                    ErrorKind::Connection,
                    format!("call to `{subject}` failed on the connection to `{}`: {e}", self.inner.url),
                ),
            })
    }
}

/// An encoded call, ready to send.
struct Prepared {
    subject: async_nats::Subject,
    request: async_nats::Request,
    timeout: Duration,
}

/// A new call id. Each thread keeps its own generator: the global one in
/// `nuid` sits behind a mutex that every concurrent call would contend on.
fn call_id() -> nuid::NUIDStr {
    thread_local! {
        // `NUID::new` is a placeholder state; the first `next` seeds it from
        // the OS random source, so threads never share a sequence.
        static NUID: std::cell::RefCell<nuid::NUID> = const { std::cell::RefCell::new(nuid::NUID::new()) };
    }
    NUID.with(|n| n.borrow_mut().next())
}

/// Absolute deadline, unix milliseconds, `timeout` from now; 0 (none)
/// for a timeout too large to express.
fn deadline_ms(timeout: Duration) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    now.checked_add(timeout)
        .and_then(|deadline| u64::try_from(deadline.as_millis()).ok())
        .unwrap_or(0)
}

/// Per-call settings. Unset fields fall back to the function's attribute.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    timeout: Option<Duration>,
    codec: Codec,
    report_instance: bool,
}

/// A decoded reply together with what the worker reported about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply<T> {
    /// The function's return value.
    pub value: T,
    /// `Wharf-Instance` of the worker that served the call:
    /// `<instance id> <pid> <host>`.
    pub instance: Option<String>,
}

impl<T> Reply<T> {
    /// The pid of the worker that served the call, when it reported one.
    pub fn pid(&self) -> Option<u32> {
        self.instance.as_deref()?.split(' ').nth(1)?.parse().ok()
    }
}

/// How a function's reply is turned into a Rust result: [`Plain`] for
/// functions returning `T`, [`Fallible`] for `Result<T, E>`.
pub trait Returns {
    /// The successful value.
    type Value;
    /// The error: [`Error`] or [`crate::CallError<E>`].
    type Err: From<Error>;
    /// Interprets a reply message encoded with `codec`.
    fn decode(spec: &FnSpec, codec: Codec, message: &Message) -> Result<Self::Value, Self::Err>;
}

/// [`Returns`] for a function returning `T`.
pub struct Plain<T>(PhantomData<fn() -> T>);

/// [`Returns`] for a function returning `Result<T, E>`.
pub struct Fallible<T, E>(PhantomData<fn() -> (T, E)>);

impl<T: DeserializeOwned> Returns for Plain<T> {
    type Value = T;
    type Err = Error;
    fn decode(spec: &FnSpec, codec: Codec, message: &Message) -> Result<T, Error> {
        if let Some((_, error)) = remote_failure(codec, message) {
            return Err(error);
        }
        decode_value(spec, codec, message)
    }
}

impl<T: DeserializeOwned, E: DeserializeOwned> Returns for Fallible<T, E> {
    type Value = T;
    type Err = crate::CallError<E>;
    fn decode(spec: &FnSpec, codec: Codec, message: &Message) -> Result<T, Self::Err> {
        match remote_failure(codec, message) {
            Some((422, _)) => {
                let body: ApplicationErrorBody<E> =
                    codec.decode(&message.payload).map_err(|e| {
                        Error::new(
                            ErrorKind::Codec,
                            format!("cannot decode the error value of `{}`: {e}", spec.path),
                        )
                    })?;
                Err(crate::CallError::Application(body.error))
            }
            Some((_, error)) => Err(error.into()),
            None => Ok(decode_value(spec, codec, message)?),
        }
    }
}

fn decode_value<T: DeserializeOwned>(
    spec: &FnSpec,
    codec: Codec,
    message: &Message,
) -> Result<T, Error> {
    codec.decode(&message.payload).map_err(|e| {
        Error::new(
            ErrorKind::Codec,
            format!(
                "cannot decode the reply of `{}` as `{}`: {e}",
                spec.path, spec.returns
            ),
        )
    })
}

/// The status code and error of an error reply, `None` for a success.
fn remote_failure(codec: Codec, message: &Message) -> Option<(u16, Error)> {
    let headers = message.headers.as_ref()?;
    let code = headers.get(headers::SERVICE_ERROR_CODE)?.as_str();
    let code: u16 = code.trim().parse().unwrap_or(0);
    let header_text = headers
        .get(headers::SERVICE_ERROR)
        .map(|v| v.as_str().to_owned());
    // A 422 body has a trailing `error` field; the lenient decode reads
    // `{kind, message}` and leaves the rest.
    let body_message = codec
        .decode_lenient::<ErrorBody>(&message.payload)
        .ok()
        .map(|b| b.message);
    let text = body_message
        .or(header_text)
        .unwrap_or_else(|| format!("the worker answered with status {code}"));
    Some((code, Error::new(ErrorKind::from_code(code), text)))
}

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
    returns: PhantomData<fn() -> R>,
}

impl<A: Serialize, R: Returns> Request<A, R> {
    /// A request for `spec` with encoded-later arguments `args`.
    pub fn new(spec: &'static FnSpec, args: A) -> Self {
        Request {
            spec,
            args,
            client: None,
            options: CallOptions::default(),
            returns: PhantomData,
        }
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
        let client = match self.client.take() {
            Some(client) => client,
            None => global()?.clone(),
        };
        self.options.report_instance = report_instance;
        let prepared = client.prepare(self.spec, &self.args, &self.options)?;
        let message = client.send(self.spec, prepared).await?;
        let value = R::decode(self.spec, self.options.codec, &message)?;
        let instance = message
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::INSTANCE))
            .map(|v| v.as_str().to_owned());
        Ok(Reply { value, instance })
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

/// Calls `spec` through `client` with default options (generated stubs).
#[doc(hidden)]
pub async fn call<A: Serialize, R: Returns>(
    client: &Client,
    spec: &'static FnSpec,
    args: A,
) -> Result<R::Value, R::Err> {
    let options = CallOptions::default();
    let prepared = client.prepare(spec, &args, &options)?;
    let message = client.send(spec, prepared).await?;
    R::decode(spec, options.codec, &message)
}

/// Calls `spec` through the client set up by [`crate::init`].
#[doc(hidden)]
pub async fn call_global<A: Serialize, R: Returns>(
    spec: &'static FnSpec,
    args: A,
) -> Result<R::Value, R::Err> {
    call::<A, R>(global()?, spec, args).await
}

static GLOBAL: OnceLock<Client> = OnceLock::new();

/// The process-wide client set up by [`crate::init`].
pub fn global() -> Result<&'static Client, Error> {
    GLOBAL.get().ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            "wharf is not initialized: call `wharf::init().await?` once at the start of the program \
             (or pass a client explicitly with `<function>::call(&client, ..)`)",
        )
    })
}

/// Installs `client` as the process-wide client; the first one set wins.
pub(crate) fn set_global(client: Client) -> &'static Client {
    GLOBAL.get_or_init(|| client)
}
