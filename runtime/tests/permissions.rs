//! The permissions `wharf auth` writes, on a real nats-server: each role can
//! do its work and nothing it should not.

use futures_util::StreamExt;
use std::time::Duration;
use wharf::settings::{Credentials, Secret};
use wharf::supervisor::UpConfig;
use wharf::testing::{eventually, NatsServer};
use wharf::{Client, ErrorKind, Worker};

/// Adds.
#[wharf::microservice(service = "perm")]
pub async fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Divides; the caller may not call it.
#[wharf::microservice(service = "perm")]
pub async fn divide(a: i64, b: i64) -> i64 {
    a / b.max(1)
}

fn user(name: &str) -> Credentials {
    Credentials {
        user: Some(name.to_owned()),
        password: Some(Secret::new(format!("pw-{name}"))),
        inbox_prefix: Some(wharf::permissions::inbox_prefix(name)),
        ..Credentials::default()
    }
}

/// The server errors a raw connection as `name` gets.
async fn raw_as(
    url: &str,
    name: &str,
) -> (
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client =
        async_nats::ConnectOptions::with_user_and_password(name.into(), format!("pw-{name}"))
            .custom_inbox_prefix(wharf::permissions::inbox_prefix(name))
            .event_callback(move |event| {
                if let async_nats::Event::ServerError(error) = event {
                    let _ = tx.send(error.to_string());
                }
                async {}
            })
            .connect(url)
            .await
            .unwrap();
    (client, rx)
}

#[tokio::test]
async fn generated_permissions_let_each_role_work_and_nothing_more() {
    let config = UpConfig::from_toml(
        "[[service]]\nname = \"perm\"\ncommand = [\"x\"]\n\
         [[caller]]\nname = \"web\"\nfunctions = [\"perm.add\"]\n",
    )
    .unwrap();
    let roles = wharf::permissions::roles(&config, "wharf");
    let mut text = wharf::permissions::server_config(&roles);
    for role in &roles {
        // What nats-server would read from its environment.
        text = text.replace(
            &format!("${}", role.password_variable()),
            &format!("\"pw-{}\"", role.user),
        );
    }
    let server = NatsServer::start_with_config(&text).unwrap();
    let url = server.url();

    // The worker serves; the caller calls what it may, plain and durable.
    let worker_client = Client::connect_with(&url, &user("worker-perm"))
        .await
        .unwrap();
    let _worker = Worker::new(&worker_client).start().await.unwrap();
    let web = Client::connect_with(&url, &user("web")).await.unwrap();
    assert_eq!(add::call(&web, 2, 3).await.unwrap(), 5);
    let durable = add::request(40, 2)
        .client(&web)
        .durable(true)
        .timeout(Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(durable, 42);

    // Not what it was not given: refused at once, not after the call's
    // 20 s timeout (a second or so on a loaded machine).
    let started = std::time::Instant::now();
    let error = divide::request(6, 3)
        .client(&web)
        .timeout(Duration::from_secs(20))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(error.kind(), ErrorKind::PermissionDenied, "{error}");
    assert!(error.message().contains("wharf.perm.divide"), "{error}");
    // Past the harness's capture: every run shows it.
    let _ = std::io::Write::write_fmt(
        &mut std::io::stderr(),
        format_args!("REPORT permission_denied after {} ms\n", took.as_millis()),
    );
    assert!(
        took < Duration::from_secs(5),
        "permission_denied took {took:?}: it must not wait for the deadline"
    );

    // A worker's credentials cannot drain another instance, stop the
    // supervisor, or read another service's results.
    let (raw, mut errors) = raw_as(&url, "worker-perm").await;
    for subject in [
        "wharf._control.another-instance",
        "wharf._supervisor.down",
        "$JS.API.DIRECT.GET.KV_wharf_results_other.$KV.wharf_results_other.call-1",
    ] {
        raw.publish(subject, "drain".into()).await.unwrap();
        raw.flush().await.unwrap();
        let seen = eventually(
            &format!("the server to refuse publishing to {subject}"),
            Duration::from_secs(10),
            || {
                let seen = errors.try_recv().map_err(|e| e.to_string());
                async move { seen }
            },
        )
        .await;
        assert!(seen.contains(subject), "{seen}");
    }

    // The objects service serves with its own credentials, small objects
    // and large ones (chunked into the Object Store).
    let (objects_raw, mut objects_errors) = raw_as(&url, "objects").await;
    let objects_client = Client::from_nats(objects_raw, url.clone());
    let _objects = wharf::objects::service::serve(&objects_client)
        .await
        .unwrap();
    eventually(
        "the objects service to answer",
        Duration::from_secs(30),
        || {
            let nats = web.nats().clone();
            async move {
                nats.request("wharf.objects.stat", "{}".into())
                    .await
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await;
    for size in [100usize, 300 * 1024] {
        let data = vec![7u8; size];
        let put = web
            .nats()
            .request("wharf.objects.put", data.clone().into())
            .await
            .unwrap_or_else(|e| {
                let mut refused = Vec::new();
                while let Ok(error) = objects_errors.try_recv() {
                    refused.push(error);
                }
                panic!("put: {e}; the objects service was refused: {refused:?}")
            });
        let stored: serde_json::Value = serde_json::from_slice(&put.payload).unwrap();
        let uri = stored["uri"].as_str().unwrap_or_else(|| panic!("{stored}"));
        let got = web
            .nats()
            .request(
                "wharf.objects.get",
                serde_json::json!({ "uri": uri }).to_string().into(),
            )
            .await
            .unwrap_or_else(|e| {
                let mut refused = Vec::new();
                while let Ok(error) = objects_errors.try_recv() {
                    refused.push(error);
                }
                panic!("get {uri}: {e}; the objects service was refused: {refused:?}")
            });
        assert_eq!(got.payload.len(), size, "{:?}", got.headers);
    }

    // The supervisor takes its lease and announces it under its
    // permissions (a service of its own with no instance: nothing here is
    // adopted or started).
    let quiet =
        UpConfig::from_toml("[[service]]\nname = \"idle\"\ncommand = [\"x\"]\nmin = 0\n").unwrap();
    let (watcher, _) = raw_as(&url, "supervisor").await;
    let mut events = watcher.subscribe("wharf._events").await.unwrap();
    watcher.flush().await.unwrap();
    let supervisor_client = Client::connect_with(&url, &user("supervisor"))
        .await
        .unwrap();
    let supervisor = wharf::supervisor::Supervisor::new(&supervisor_client, &quiet)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(supervisor.run(async {
        let _ = stopped.await;
    }));
    let leader = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(message) = events.next().await {
            let event: wharf::supervisor::Event = serde_json::from_slice(&message.payload).unwrap();
            if event.kind == "leader" {
                return event;
            }
        }
        panic!("the events ended");
    })
    .await
    .expect("a leader event within 30 s");
    assert!(leader.reason.contains("holds the lease"), "{leader:?}");
    let _ = stop.send(());
    running.await.unwrap().unwrap();

    // And no one gets in without credentials.
    let error = Client::connect_with(&url, &Credentials::default())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthorized, "{error}");
}
