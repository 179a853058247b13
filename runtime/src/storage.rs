//! Every stream and bucket wharf keeps state in, found or created on first
//! use ("never assume they exist") with the deployment's replica count and
//! placement, and raised to that replica count when an existing one has
//! fewer.
//!
//! The replica count is `WHARF_REPLICAS` (or `[broker] replicas`); unset,
//! it is 3 when the server reports a cluster of at least 3 servers and 1
//! otherwise. Placement tags (`WHARF_PLACEMENT`, `[broker] placement`) pass
//! through to JetStream for new streams.

use crate::error::{Error, ErrorKind};
use crate::settings::Settings;
use async_nats::jetstream::{self, kv, object_store, stream};

/// Replicas when the cluster is large enough and no setting says otherwise.
const CLUSTER_REPLICAS: usize = 3;

/// Where a deployment's streams live: how many replicas, placed where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Replicas of every stream and bucket.
    pub(crate) replicas: usize,
    /// Whether `replicas` was set (a setting) rather than chosen here.
    pub(crate) asked: bool,
    /// JetStream placement of new streams, if any tags are set.
    pub(crate) placement: Option<stream::Placement>,
}

impl Layout {
    /// The layout for the server `js` is connected to: the settings', or
    /// by the size of its cluster.
    pub(crate) fn of(js: &jetstream::Context) -> Layout {
        let settings = Settings::get().ok();
        // The default is taken once per process, from the first server
        // asked: while a node is down the others report a smaller cluster,
        // and streams made then would get fewer replicas.
        static DEFAULT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let (replicas, asked) = match settings.and_then(|s| s.replicas) {
            Some(replicas) => (replicas, true),
            None => (
                *DEFAULT.get_or_init(|| default_replicas(&js.client().server_info())),
                false,
            ),
        };
        let placement = settings
            .map(|s| s.placement.clone())
            .filter(|tags| !tags.is_empty())
            .map(|tags| stream::Placement {
                cluster: None,
                tags,
            });
        Layout {
            replicas,
            asked,
            placement,
        }
    }

    /// What to say when a stream of `replicas` cannot be had.
    fn advice(&self) -> String {
        if self.asked {
            format!("WHARF_REPLICAS (or [broker] replicas) asks for {}: the cluster needs that many JetStream servers (and the placement tags' servers) up; set it lower to go on with fewer", self.replicas)
        } else {
            format!("the server reports a cluster, so wharf asks for {} replicas: start all its JetStream servers, or set WHARF_REPLICAS=1", self.replicas)
        }
    }
}

/// 3 replicas on a cluster of at least 3 servers (the servers a client is
/// told of in `connect_urls`), else 1.
fn default_replicas(info: &async_nats::ServerInfo) -> usize {
    let servers: std::collections::HashSet<&String> = info.connect_urls.iter().collect();
    if !info.cluster.as_deref().unwrap_or("").is_empty() && servers.len() >= CLUSTER_REPLICAS {
        CLUSTER_REPLICAS
    } else {
        1
    }
}

/// Finds the stream `config.name`, or creates it with the layout; an
/// existing one with fewer replicas is raised to the layout's.
pub(crate) async fn stream(
    js: &jetstream::Context,
    mut config: stream::Config,
) -> Result<stream::Stream, Error> {
    let layout = Layout::of(js);
    let name = config.name.clone();
    if let Some(stream) = existing(js, &name).await? {
        raise(js, &name, &layout).await?;
        return Ok(stream);
    }
    config.num_replicas = layout.replicas;
    config.placement = layout.placement.clone();
    let stream = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| created_failed("stream", &name, &layout, e))?;
    made(js, &name, &layout).await;
    Ok(stream)
}

/// Finds KV bucket `config.bucket`, or creates it with the layout; an
/// existing one with fewer replicas is raised to the layout's.
pub(crate) async fn key_value(
    js: &jetstream::Context,
    mut config: kv::Config,
) -> Result<kv::Store, Error> {
    let layout = Layout::of(js);
    let name = config.bucket.clone();
    let stream = crate::wire::subjects::kv_stream(&name);
    if existing(js, &stream).await?.is_some() {
        if let Ok(store) = js.get_key_value(&name).await {
            raise(js, &stream, &layout).await?;
            return Ok(store);
        }
    }
    config.num_replicas = layout.replicas;
    config.placement = layout.placement.clone();
    let store = match js.create_key_value(config).await {
        Ok(store) => store,
        // Another process created it meanwhile.
        Err(e) => match js.get_key_value(&name).await {
            Ok(store) => store,
            Err(_) => return Err(created_failed("KV bucket", &name, &layout, e)),
        },
    };
    made(js, &stream, &layout).await;
    Ok(store)
}

/// Finds Object Store bucket `config.bucket`, or creates it with the
/// layout; an existing one with fewer replicas is raised to the layout's.
pub(crate) async fn object_store(
    js: &jetstream::Context,
    mut config: object_store::Config,
) -> Result<object_store::ObjectStore, Error> {
    let layout = Layout::of(js);
    let name = config.bucket.clone();
    let stream = crate::wire::subjects::object_store_stream(&name);
    if existing(js, &stream).await?.is_some() {
        if let Ok(store) = js.get_object_store(&name).await {
            raise(js, &stream, &layout).await?;
            return Ok(store);
        }
    }
    config.num_replicas = layout.replicas;
    config.placement = layout.placement.clone();
    let store = match js.create_object_store(config).await {
        Ok(store) => store,
        Err(e) => match js.get_object_store(&name).await {
            Ok(store) => store,
            Err(_) => return Err(created_failed("Object Store bucket", &name, &layout, e)),
        },
    };
    made(js, &stream, &layout).await;
    Ok(store)
}

/// After stream `name` was made: a replicated one answers writes only once
/// its replicas have elected a leader, and a first write sent sooner (an
/// object put, a durable call) fails; so this waits until it has one.
async fn made(js: &jetstream::Context, name: &str, layout: &Layout) {
    if layout.replicas > 1 {
        settle(js, name, layout.replicas).await;
    }
}

/// Stream `name` if it exists; `None` only when JetStream says there is
/// none. Any other failure (no answer while a node is lost, say) is an
/// error: it must not be taken for a missing stream and one made anew.
async fn existing(js: &jetstream::Context, name: &str) -> Result<Option<stream::Stream>, Error> {
    use jetstream::context::GetStreamErrorKind;
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream)),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(error)
                if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(Error::new(
                ErrorKind::Connection,
                format!("cannot look up stream `{name}`: {e}; wharf keeps its state in JetStream (nats-server -js)"),
            )
            .with_source(e)),
        },
    }
}

/// Finds KV bucket `name`, or creates it with one value per key, entries
/// expiring after `max_age` (zero: never), in `storage`.
pub(crate) async fn bucket(
    js: &jetstream::Context,
    name: &str,
    description: &str,
    max_age: std::time::Duration,
    storage: stream::StorageType,
) -> Result<kv::Store, Error> {
    key_value(
        js,
        kv::Config {
            bucket: name.to_owned(),
            description: description.to_owned(),
            history: 1,
            max_age,
            storage,
            ..Default::default()
        },
    )
    .await
}

/// Raises stream `name` to the layout's replicas when it has fewer and
/// the count was asked for (`WHARF_REPLICAS`): JetStream copies its data to
/// the new peers. With the default count it is left as it is, and the log
/// says what raises it: a process whose settings differ from the rest of
/// its deployment must not change the deployment's streams. A stream with
/// more replicas is always left as it is.
async fn raise(js: &jetstream::Context, name: &str, layout: &Layout) -> Result<(), Error> {
    if layout.replicas <= 1 {
        return Ok(());
    }
    let Ok(mut stream) = js.get_stream(name).await else {
        return Ok(());
    };
    let Ok(info) = stream.info().await else {
        return Ok(());
    };
    if info.config.num_replicas.max(1) >= layout.replicas {
        return Ok(());
    }
    let had = info.config.num_replicas.max(1);
    if !layout.asked {
        tracing::warn!(
            "stream `{name}` has {had} replica(s) on a cluster where new ones get {}: set WHARF_REPLICAS={} (or [broker] replicas) to have wharf raise it, or run `nats stream edit {name} --replicas {}`",
            layout.replicas,
            layout.replicas,
            layout.replicas
        );
        return Ok(());
    }
    let mut config = info.config.clone();
    config.num_replicas = layout.replicas;
    match js.update_stream(config).await {
        Ok(_) => {
            tracing::info!(
                "stream `{name}` raised from {had} to {} replicas",
                layout.replicas
            );
            settle(js, name, layout.replicas).await;
            Ok(())
        }
        Err(e) => Err(Error::new(
            ErrorKind::Config,
            format!(
                "stream `{name}` has {had} replica(s), fewer than the {} asked, and raising it failed: {e}; raise it with `nats stream edit {name} --replicas {}` ({})",
                layout.replicas,
                layout.replicas,
                layout.advice()
            ),
        )
        .with_source(e)),
    }
}

/// Waits (a while at most) until stream `name` has a leader and its other
/// `replicas - 1` peers are current: right after it is made or raised it
/// elects, and writes meanwhile fail or time out.
async fn settle(js: &jetstream::Context, name: &str, replicas: usize) {
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while tokio::time::Instant::now() < until {
        if let Ok(mut stream) = js.get_stream(name).await {
            if let Ok(info) = stream.info().await {
                let settled = info.cluster.as_ref().is_some_and(|cluster| {
                    cluster.leader.is_some()
                        && cluster.replicas.len() + 1 >= replicas
                        && cluster.replicas.iter().all(|peer| peer.current)
                });
                if settled {
                    return;
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tracing::warn!("stream `{name}` has not settled on its {replicas} replicas yet");
}

fn created_failed(
    what: &str,
    name: &str,
    layout: &Layout,
    e: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    let text = e.to_string();
    let advice = if text.contains("insufficient resources") || text.contains("no suitable peers") {
        layout.advice()
    } else {
        "wharf keeps its state in JetStream (nats-server -js)".to_owned()
    };
    Error::new(
        ErrorKind::Connection,
        format!(
            "cannot create {what} `{name}` with {} replica(s): {text}; {advice}",
            layout.replicas
        ),
    )
    .with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_replicas_on_a_cluster_of_three() {
        let info = |cluster: Option<&str>, urls: &[&str]| async_nats::ServerInfo {
            cluster: cluster.map(str::to_owned),
            connect_urls: urls.iter().map(|u| u.to_string()).collect(),
            ..Default::default()
        };
        assert_eq!(default_replicas(&info(None, &[])), 1);
        assert_eq!(default_replicas(&info(Some("c"), &["a:1", "b:1"])), 1);
        assert_eq!(
            default_replicas(&info(Some("c"), &["a:1", "b:1", "c:1"])),
            3
        );
        assert_eq!(
            default_replicas(&info(Some("c"), &["a:1", "b:1", "c:1", "d:1", "e:1"])),
            3
        );
    }
}
