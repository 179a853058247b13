//! Every way NATS authenticates, for real worker processes and for the
//! instances a supervisor process starts: the credentials reach them
//! through the environment (never a command line), and no secret shows in
//! a command line or the supervisor's events.

use futures_util::StreamExt;
use std::time::Duration;
use wharf::settings::{Credentials, Secret};
use wharf::testing::{JwtAccount, NatsServer, Pki, TempDir};
use wharf_integration::{spawn_svc, spawn_worker_with};

/// The command line of `pid`, as `ps` shows it.
fn command_line(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
        .unwrap_or_default()
}

/// Calls `itest.add` through `url` with `credentials` until a worker
/// answers; returns the pid of the worker that did.
async fn served(url: &str, credentials: &Credentials, what: &str) -> u32 {
    let client = wharf::Client::connect_with(url, credentials)
        .await
        .unwrap_or_else(|e| panic!("{what}: the caller cannot connect: {e}"));
    let reply = wharf_integration::first_answer(
        &client,
        &format!("a worker authenticated by {what} to answer"),
    )
    .await;
    reply.pid().expect("the worker names itself")
}

#[tokio::test]
async fn worker_processes_authenticate_every_way() {
    let dir = TempDir::new("credentials");

    // A token.
    let token_server =
        NatsServer::start_with_config("authorization { token: \"s3cret-token\" }").unwrap();
    let url = token_server.url();
    let worker = spawn_worker_with(&url, &[("NATS_TOKEN", "s3cret-token")]);
    let token = Credentials {
        token: Some(Secret::new("s3cret-token")),
        ..Credentials::default()
    };
    assert_eq!(served(&url, &token, "a token").await, worker.pid());
    assert!(!command_line(worker.pid()).contains("s3cret"));

    // An NKey seed.
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let nkey_server = NatsServer::start_with_config(&format!(
        "authorization {{ users: [ {{ nkey: {} }} ] }}",
        user.public_key()
    ))
    .unwrap();
    let url = nkey_server.url();
    let worker = spawn_worker_with(&url, &[("NATS_NKEY", &seed)]);
    let nkey = Credentials {
        nkey: Some(Secret::new(seed.clone())),
        ..Credentials::default()
    };
    assert_eq!(served(&url, &nkey, "an NKey").await, worker.pid());
    assert!(!command_line(worker.pid()).contains(&seed));

    // Mutual TLS with a CA of our own, over a tls:// URL.
    let pki = Pki::new(dir.path(), &[]);
    let tls_server = NatsServer::start_with_config(&pki.server_tls(true)).unwrap();
    let url = format!("tls://127.0.0.1:{}", tls_server.port());
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let (ca, cert, key) = (path(&pki.ca), path(&pki.client_cert), path(&pki.client_key));
    let worker = spawn_worker_with(
        &url,
        &[("NATS_CA", &ca), ("NATS_CERT", &cert), ("NATS_KEY", &key)],
    );
    let tls = Credentials {
        ca: Some(pki.ca.clone()),
        cert: Some(pki.client_cert.clone()),
        key: Some(pki.client_key.clone()),
        ..Credentials::default()
    };
    assert_eq!(
        served(&url, &tls, "a client certificate").await,
        worker.pid()
    );

    // A creds file of a JWT account.
    let account = JwtAccount::start("credentials-jwt").unwrap();
    let url = account.server.url();
    let creds = account.creds("worker", serde_json::json!({ "pub": {}, "sub": {} }));
    let creds_path = path(creds.creds.as_deref().unwrap());
    let worker = spawn_worker_with(&url, &[("NATS_CREDS", &creds_path)]);
    assert_eq!(served(&url, &creds, "a creds file").await, worker.pid());
}

#[tokio::test]
async fn a_supervisor_hands_its_credentials_to_its_instances_unseen() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let server = NatsServer::start_with_config(&format!(
        "jetstream {{}}\nauthorization {{ users: [ {{ nkey: {} }} ] }}",
        user.public_key()
    ))
    .unwrap();
    let dir = TempDir::new("credentials-supervisor");
    let config = dir.path().join("wharf.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nurl = \"{}\"\nprefix = \"credsup\"\n\n[[service]]\nname = \"itest\"\n\
             command = [\"{}\", \"worker\"]\nmin = 1\nmax = 1\n",
            server.url(),
            wharf_integration::svc_binary().display()
        ),
    )
    .unwrap();
    let nkey = Credentials {
        nkey: Some(Secret::new(seed.clone())),
        ..Credentials::default()
    };
    let watcher = wharf::Client::connect_with(&server.url(), &nkey)
        .await
        .unwrap()
        .with_prefix("credsup");
    let mut events = watcher
        .nats()
        .subscribe(wharf::wire::subjects::events("credsup"))
        .await
        .unwrap();
    watcher.nats().flush().await.unwrap();
    let supervisor = spawn_svc(
        &["supervise", &config.to_string_lossy()],
        &[("NATS_NKEY", &seed)],
    );
    let client = wharf::Client::connect_with(&server.url(), &nkey)
        .await
        .unwrap()
        .with_prefix("credsup");
    let pid = wharf_integration::first_answer(&client, "the supervisor's instance to answer")
        .await
        .pid()
        .expect("the worker names itself");
    // The instance outlives a killed supervisor (a standby adopts it), so
    // it is stopped here even if the test fails.
    let _instance = KilledOnDrop(pid);
    assert!(
        wharf_integration::descendants(supervisor.pid()).contains(&pid),
        "pid {pid} was not started by the supervisor"
    );
    for process in [supervisor.pid(), pid] {
        assert!(
            !command_line(process).contains(&seed),
            "the seed is on the command line of {process}"
        );
    }
    // Its events so far: none shows the seed.
    let mut seen = 0;
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(500), events.next()).await
    {
        seen += 1;
        assert!(
            !String::from_utf8_lossy(&event.payload).contains(&seed),
            "an event shows the seed"
        );
    }
    assert!(seen > 0, "the supervisor announced nothing");
    // Stopped, the supervisor drains its instance.
    wharf_integration::signal(supervisor.pid(), libc::SIGTERM);
    assert!(supervisor.exit_status().await.success());
    assert!(
        wharf_integration::wait_gone(&[pid], Duration::from_secs(30)),
        "the instance outlived its supervisor"
    );
}

/// Kills a process when dropped.
struct KilledOnDrop(u32);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        wharf::process::kill(self.0);
    }
}
