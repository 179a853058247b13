//! The caller's side: a [`Client`] (one NATS connection and the prefix its
//! subjects start with), the call path every generated stub goes through
//! ([`call`]), and how replies become Rust values ([`returns`]).
//!
//! The layers above keep per-connection state of their own (durable
//! replies, object buckets, the lease bucket) as [`Client::extension`]s,
//! so this module does not know them.

pub(crate) mod call;
pub(crate) mod returns;

use crate::error::{Error, ErrorKind};
use crate::settings::{redact, Settings};
use crate::wire::subjects;
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

#[derive(Debug)]
struct Inner {
    nats: async_nats::Client,
    prefix: String,
    url: String,
    /// State of the layers above, one value per type, made on first use.
    extensions: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
    /// Payloads larger than this are spilled to the object store; 0 until
    /// first needed.
    spill_at: AtomicUsize,
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
        // Settings that do not validate fail here, before any call.
        Settings::get()?;
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
                    format!("cannot connect to NATS at `{}`: {e}; start nats-server there, or unset NATS_URL to let wharf::init() start one", redact(url)),
                )
                .with_source(e)
            })?;
        Ok(Client::from_nats(nats, url))
    }

    /// Wraps an existing async-nats connection (`url` is used in messages).
    pub fn from_nats(nats: async_nats::Client, url: impl Into<String>) -> Client {
        // `connect` has reported settings that do not validate.
        let prefix = Settings::get()
            .map(|s| s.prefix.clone())
            .unwrap_or_else(|_| subjects::DEFAULT_PREFIX.to_owned());
        Client::new(nats, url.into(), prefix)
    }

    fn new(nats: async_nats::Client, url: String, prefix: String) -> Client {
        Client {
            inner: Arc::new(Inner {
                nats,
                prefix,
                url,
                extensions: Mutex::new(HashMap::new()),
                spill_at: AtomicUsize::new(0),
            }),
        }
    }

    /// The same connection with another subject prefix.
    pub fn with_prefix(&self, prefix: impl Into<String>) -> Client {
        Client::new(
            self.inner.nats.clone(),
            self.inner.url.clone(),
            prefix.into(),
        )
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

    /// This connection's value of type `T`, made by `init` the first time
    /// it is asked for (concurrent first askers wait for one `init`); an
    /// `init` that fails is tried again by the next asker.
    pub(crate) async fn extension<T, F, Fut>(&self, init: F) -> Result<Arc<T>, Error>
    where
        T: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
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
        cell.get_or_try_init(|| async { init().await.map(Arc::new) })
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
