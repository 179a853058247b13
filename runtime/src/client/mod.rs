//! The caller's side: a [`Client`] (one NATS connection and the prefix its
//! subjects start with), the call path every generated stub goes through
//! ([`call`]), and how replies become Rust values ([`returns`]).
//!
//! The layers above keep per-connection state of their own (durable
//! replies, object buckets, the lease bucket) as [`Client::extension`]s,
//! so this module does not know them.

pub(crate) mod call;
pub(crate) mod coalesce;
pub(crate) mod connect;
pub(crate) mod connection;
pub(crate) mod denials;
pub(crate) mod returns;
pub(crate) mod stream;
pub(crate) mod stream_arg;

use crate::boxed::out_of_line;
use crate::error::{Error, ErrorKind};
use crate::settings::{Credentials, Settings};
use crate::wire::subjects;
use denials::Denials;
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// A connection to NATS through which microservices are called and served.
/// Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    nats: async_nats::Client,
    prefix: String,
    url: String,
    /// What it authenticated with, for the processes it starts.
    credentials: Credentials,
    /// Publishes and subscribes the server refused.
    denials: Arc<Denials>,
    /// The times the connection was lost, which calls in flight watch.
    connection: Arc<connection::Connection>,
    /// State of the layers above, one value per type, made on first use.
    extensions: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
    /// Payloads larger than this are spilled to the object store; 0 until
    /// first needed.
    spill_at: AtomicUsize,
    /// Coalesced calls, set up by the first call that may coalesce (none
    /// when that failed: calls then go out alone). Shared by clones of
    /// other prefixes: the same connection.
    coalescer: Arc<tokio::sync::OnceCell<Option<Arc<coalesce::Coalescer>>>>,
    /// Durable-call state, made by the first durable call and typed by
    /// that layer: a slot of its own, read without a lock, rather than an
    /// extension, as every durable call reads it twice.
    durable: tokio::sync::OnceCell<Box<dyn Any + Send + Sync>>,
    /// False for a client made by [`Client::without_coalescing`].
    coalescing: bool,
    /// False for a client made by [`Client::without_signature_routing`].
    routing: bool,
}

impl std::fmt::Debug for Inner {
    /// The URL without its password or token, the credentials by kind.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &crate::settings::redact(&self.url))
            .field("prefix", &self.prefix)
            .field("credentials", &self.credentials.describe())
            .finish_non_exhaustive()
    }
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
    ///
    /// Credentials and TLS come from the settings (`NATS_USER` and
    /// `NATS_PASSWORD`, `NATS_TOKEN`, `NATS_NKEY`, `NATS_CREDS`, `NATS_CA`,
    /// `NATS_CERT` and `NATS_KEY`, `NATS_TLS_FIRST`), or from the URL
    /// (`nats://alice:secret@host:4222`).
    pub async fn connect(url: &str) -> Result<Client, Error> {
        // Settings that do not validate fail here, before any call.
        let credentials = &Settings::get()?.credentials;
        Client::connect_with(url, credentials).await
    }

    /// [`Client::connect`] with these credentials instead of the settings'
    /// (for example those of a `wharf.toml`).
    pub async fn connect_with(url: &str, credentials: &Credentials) -> Result<Client, Error> {
        // The first connection of a process that asks for metrics serves
        // them: callers, workers, supervisors and the objects service alike.
        if let Ok(settings) = Settings::get() {
            crate::metrics::serve_if_asked(settings.metrics_port).await?;
        }
        let denials = Arc::new(Denials::new(connect::as_user(url, credentials)));
        let noted = denials.clone();
        let connection = Arc::new(connection::Connection::default());
        let losses = connection.clone();
        let options = connect::options(url, credentials)
            .await?
            .event_callback(move |event| {
                match &event {
                    async_nats::Event::ServerError(error) => {
                        let text = error.to_string();
                        if !text.to_ascii_lowercase().contains("permissions violation") {
                            // (Refusals are the calls' own errors.)
                            tracing::warn!("NATS server says: {text}");
                        }
                        if text.to_ascii_lowercase().contains("expired") {
                            // The server ends the connection; reconnects
                            // are refused until the credentials are renewed.
                            tracing::error!("NATS ended this connection: {text}; issue new credentials (a new creds file for NATS_CREDS) and restart");
                        }
                        noted.note_server_error(&text)
                    }
                    async_nats::Event::Connected => noted.clear(),
                    // Replies to calls sent before cannot arrive: the
                    // server they went through is gone.
                    async_nats::Event::Disconnected | async_nats::Event::Closed => {
                        tracing::warn!("NATS connection lost ({event}); calls waiting on it go on or fail at once, and it reconnects");
                        losses.lose()
                    }
                    _ => {}
                }
                tracing::debug!("NATS: {event}");
                async {}
            });
        let servers = connect::servers(url);
        let nats = options
            .connect(servers.as_slice())
            .await
            .map_err(|e| connect::failed(url, credentials, e))?;
        Ok(Client::new(
            nats,
            url.to_owned(),
            configured_prefix(),
            credentials.clone(),
            denials,
            connection,
            Arc::default(),
        ))
    }

    /// Wraps an existing async-nats connection (`url` is used in messages).
    /// wharf does not see its events, so a call on it whose connection is
    /// lost waits for its deadline (or its worker's probe) rather than
    /// failing at once: prefer [`Client::connect`].
    pub fn from_nats(nats: async_nats::Client, url: impl Into<String>) -> Client {
        Client::new(
            nats,
            url.into(),
            configured_prefix(),
            Credentials::default(),
            Arc::default(),
            Arc::default(),
            Arc::default(),
        )
    }

    fn new(
        nats: async_nats::Client,
        url: String,
        prefix: String,
        credentials: Credentials,
        denials: Arc<Denials>,
        connection: Arc<connection::Connection>,
        coalescer: Arc<tokio::sync::OnceCell<Option<Arc<coalesce::Coalescer>>>>,
    ) -> Client {
        Client {
            inner: Arc::new(Inner {
                nats,
                prefix,
                url,
                credentials,
                denials,
                connection,
                extensions: Mutex::new(HashMap::new()),
                spill_at: AtomicUsize::new(0),
                coalescer,
                durable: tokio::sync::OnceCell::new(),
                coalescing: true,
                routing: true,
            }),
        }
    }

    /// The same connection with another subject prefix.
    pub fn with_prefix(&self, prefix: impl Into<String>) -> Client {
        // The same connection: the same credentials and refusals, and the
        // same way of sending calls.
        let mut client = Client::new(
            self.inner.nats.clone(),
            self.inner.url.clone(),
            prefix.into(),
            self.inner.credentials.clone(),
            self.inner.denials.clone(),
            self.inner.connection.clone(),
            self.inner.coalescer.clone(),
        );
        let inner = Arc::get_mut(&mut client.inner).expect("just made");
        inner.coalescing = self.inner.coalescing;
        inner.routing = self.inner.routing;
        client
    }

    /// The same connection, with calls made through it going out one
    /// message each, as with `WHARF_COALESCE=off` but for this client only
    /// (what coalescing gains can then be measured in one process).
    pub fn without_coalescing(&self) -> Client {
        let mut client = Client::new(
            self.inner.nats.clone(),
            self.inner.url.clone(),
            self.inner.prefix.clone(),
            self.inner.credentials.clone(),
            self.inner.denials.clone(),
            self.inner.connection.clone(),
            Arc::new(tokio::sync::OnceCell::new_with(Some(None))),
        );
        Arc::get_mut(&mut client.inner)
            .expect("just made")
            .coalescing = false;
        client
    }

    /// The same connection, with plain calls sent one message each on each
    /// function's plain subject instead of its signature's subject. Calls
    /// made both ways in one process show what routing by signature costs
    /// (`bench -- --routing`).
    pub fn without_signature_routing(&self) -> Client {
        let mut client = self.without_coalescing();
        Arc::get_mut(&mut client.inner).expect("just made").routing = false;
        client
    }

    /// Whether plain calls go to the subject of their signature first.
    pub(crate) fn routes_by_signature(&self) -> bool {
        self.inner.routing
    }

    /// Whether calls through this client may travel in batches (plain and
    /// durable); `WHARF_COALESCE` may still say no.
    pub(crate) fn coalesces(&self) -> bool {
        self.inner.coalescing
    }

    /// The underlying async-nats client.
    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.nats
    }

    /// The subject prefix, `wharf` by default.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The URL this client connected to (with any password in it: show
    /// it through [`redact`](crate::settings::redact)).
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// What the server refused this connection.
    pub(crate) fn denials(&self) -> &Denials {
        &self.inner.denials
    }

    /// The times this connection was lost.
    pub(crate) fn connection(&self) -> &connection::Connection {
        &self.inner.connection
    }

    /// The credentials this client connected with (its URL may carry more).
    pub fn credentials(&self) -> &Credentials {
        &self.inner.credentials
    }

    /// Where this client's durable-call state is kept.
    pub(crate) fn durable_cell(&self) -> &tokio::sync::OnceCell<Box<dyn Any + Send + Sync>> {
        &self.inner.durable
    }

    /// This connection's coalescer, set up on first use; none when
    /// `WHARF_COALESCE=off` or that failed (a subscription refused), and
    /// calls go out alone.
    pub(crate) async fn coalescer(&self) -> Option<&Arc<coalesce::Coalescer>> {
        self.inner
            .coalescer
            .get_or_init(|| async {
                // Off by setting: every call its own message.
                if !Settings::get().map_or(true, |s| s.coalesce) {
                    return None;
                }
                coalesce::Coalescer::start(&self.inner.nats).await.ok()
            })
            .await
            .as_ref()
    }

    /// This connection's value of type `T`, made by `init` the first time
    /// it is asked for (concurrent first askers wait for one `init`); an
    /// `init` that fails is tried again by the next asker.
    pub(crate) async fn extension<T, F, Fut>(&self, init: F) -> Result<Arc<T>, Error>
    where
        T: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<T, Error>> + Send,
    {
        let cell = {
            let mut extensions = self.inner.extensions.lock().unwrap();
            let cell = extensions
                .entry(TypeId::of::<T>())
                .or_insert_with(|| Arc::new(tokio::sync::OnceCell::<Arc<T>>::new()))
                .clone();
            cell.downcast::<tokio::sync::OnceCell<Arc<T>>>()
                .expect("extensions are keyed by their type")
        };
        if let Some(value) = cell.get() {
            return Ok(value.clone());
        }
        // Set up once: boxed, so the setup's (large) future does not widen
        // the future of every call that reaches this.
        out_of_line(|| cell.get_or_try_init(|| async { init().await.map(Arc::new) }))
            .await
            .cloned()
    }

    /// Payloads above this many bytes are stored as objects and passed by
    /// reference: `WHARF_SPILL_BYTES`, or the server's `max_payload` less
    /// room for headers.
    pub(crate) fn spill_at(&self) -> usize {
        let cached = self.inner.spill_at.load(Ordering::Relaxed);
        if cached != 0 {
            return cached;
        }
        let limit = spill_limit(&self.inner.nats);
        self.inner.spill_at.store(limit, Ordering::Relaxed);
        limit
    }
}

/// The prefix the settings give (`connect` has reported settings that do
/// not validate).
fn configured_prefix() -> String {
    Settings::get()
        .map(|s| s.prefix.clone())
        .unwrap_or_else(|_| subjects::DEFAULT_PREFIX.to_owned())
}

/// The spill limit for a connection: `WHARF_SPILL_BYTES`, or the server's
/// `max_payload` less 8 KiB for headers and the envelope.
pub(crate) fn spill_limit(nats: &async_nats::Client) -> usize {
    let max_payload = nats.server_info().max_payload;
    // Room for headers and the envelope: 8 KiB, or an eighth of a small
    // max_payload.
    let room = (8 * 1024).min(max_payload / 8);
    Settings::get()
        .ok()
        .and_then(|s| s.spill_bytes)
        .unwrap_or(usize::MAX)
        .min(max_payload.saturating_sub(room).max(1))
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
