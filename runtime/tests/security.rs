//! Every way NATS authenticates, against real nats-server processes with
//! generated configurations, keys and certificates: a wharf client and
//! worker connect, call, and fail clearly (and without printing a secret)
//! when the credentials are wrong.

use wharf::settings::{Credentials, Secret};
use wharf::testing::{JwtAccount, NatsServer, Pki, TempDir};
use wharf::{Client, ErrorKind, Worker};

/// Adds.
#[wharf::microservice(service = "secure")]
pub async fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Connects with `credentials`, serves, and calls through the same client.
async fn round_trip(url: &str, credentials: &Credentials) -> Result<i64, wharf::Error> {
    let client = Client::connect_with(url, credentials).await?;
    let _worker = Worker::new(&client).start().await?;
    add::call(&client, 2, 3).await
}

fn password(user: &str, password: &str) -> Credentials {
    Credentials {
        user: Some(user.to_owned()),
        password: Some(Secret::new(password)),
        ..Credentials::default()
    }
}

#[tokio::test]
async fn user_and_password_in_the_url_or_the_settings() {
    let server =
        NatsServer::start_with_config("authorization { user: alice, password: \"s3cret-pw\" }")
            .unwrap();
    let in_url = format!("nats://alice:s3cret-pw@127.0.0.1:{}", server.port());
    assert_eq!(
        round_trip(&in_url, &Credentials::default()).await.unwrap(),
        5
    );
    assert_eq!(
        round_trip(&server.url(), &password("alice", "s3cret-pw"))
            .await
            .unwrap(),
        5
    );

    let error = Client::connect_with(&server.url(), &password("alice", "wrong-pw"))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthorized, "{error}");
    let text = error.to_string();
    assert!(text.contains("user `alice`"), "{text}");
    assert!(!text.contains("wrong-pw"), "a password is printed: {text}");

    let wrong_url = format!("nats://alice:wrong-pw@127.0.0.1:{}", server.port());
    let error = Client::connect_with(&wrong_url, &Credentials::default())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthorized, "{error}");
    let text = error.to_string();
    assert!(text.contains("alice:***@"), "{text}");
    assert!(!text.contains("wrong-pw"), "a password is printed: {text}");

    let error = Client::connect_with(&server.url(), &Credentials::default())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthorized, "{error}");
    assert!(error.to_string().contains("no credentials"), "{error}");
}

#[tokio::test]
async fn a_token_in_the_url_or_the_settings() {
    let server =
        NatsServer::start_with_config("authorization { token: \"t0ken-s3cret\" }").unwrap();
    let token = Credentials {
        token: Some(Secret::new("t0ken-s3cret")),
        ..Credentials::default()
    };
    assert_eq!(round_trip(&server.url(), &token).await.unwrap(), 5);
    let in_url = format!("nats://t0ken-s3cret@127.0.0.1:{}", server.port());
    assert_eq!(
        round_trip(&in_url, &Credentials::default()).await.unwrap(),
        5
    );

    let wrong = Credentials {
        token: Some(Secret::new("not-the-t0ken")),
        ..Credentials::default()
    };
    let error = Client::connect_with(&server.url(), &wrong)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthorized, "{error}");
    assert!(!error.to_string().contains("not-the-t0ken"), "{error}");
    // Nor does the settings' Debug form show it.
    assert!(!format!("{wrong:?}").contains("not-the-t0ken"));
}

#[tokio::test]
async fn an_nkey() {
    let user = nkeys::KeyPair::new_user();
    let server = NatsServer::start_with_config(&format!(
        "authorization {{ users: [ {{ nkey: \"{}\" }} ] }}",
        user.public_key()
    ))
    .unwrap();
    let nkey = Credentials {
        nkey: Some(Secret::new(user.seed().unwrap())),
        ..Credentials::default()
    };
    assert_eq!(round_trip(&server.url(), &nkey).await.unwrap(), 5);

    let stranger = nkeys::KeyPair::new_user();
    let other = Credentials {
        nkey: Some(Secret::new(stranger.seed().unwrap())),
        ..Credentials::default()
    };
    let error = Client::connect_with(&server.url(), &other)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthorized, "{error}");
    assert!(!error.to_string().contains(&stranger.seed().unwrap()));
}

#[tokio::test]
async fn mutual_tls_with_a_custom_ca() {
    let dir = TempDir::new("tls");
    let pki = Pki::new(dir.path(), &[]);
    let server = NatsServer::start_with_config(&pki.server_tls(true)).unwrap();
    let full = Credentials {
        ca: Some(pki.ca.clone()),
        cert: Some(pki.client_cert.clone()),
        key: Some(pki.client_key.clone()),
        ..Credentials::default()
    };
    assert_eq!(round_trip(&server.url(), &full).await.unwrap(), 5);
    let tls_url = format!("tls://127.0.0.1:{}", server.port());
    assert_eq!(round_trip(&tls_url, &full).await.unwrap(), 5);

    // The server's certificate is not trusted without the CA.
    let untrusted = Credentials {
        cert: Some(pki.client_cert.clone()),
        key: Some(pki.client_key.clone()),
        ..Credentials::default()
    };
    let error = Client::connect_with(&tls_url, &untrusted)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert!(error.to_string().contains("NATS_CA"), "{error}");

    // The server asks for a client certificate.
    let no_client_cert = Credentials {
        ca: Some(pki.ca.clone()),
        ..Credentials::default()
    };
    assert!(Client::connect_with(&server.url(), &no_client_cert)
        .await
        .is_err());
}

#[tokio::test]
async fn tls_first_where_the_server_asks_for_it() {
    let dir = TempDir::new("tls-first");
    let pki = Pki::new(dir.path(), &[]);
    let server = NatsServer::start_with_config(&format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", handshake_first: true }}",
        pki.server_cert.display(),
        pki.server_key.display()
    ))
    .unwrap();
    let first = Credentials {
        ca: Some(pki.ca.clone()),
        tls_first: true,
        ..Credentials::default()
    };
    assert_eq!(round_trip(&server.url(), &first).await.unwrap(), 5);
}

#[tokio::test]
async fn local_mode_servers_take_only_their_token() {
    let url = wharf::start_nats_server_on(None).await.unwrap();
    let shown = wharf::settings::redact(&url);
    assert!(shown.starts_with("nats://***@127.0.0.1:"), "{shown}");
    assert_eq!(round_trip(&url, &Credentials::default()).await.unwrap(), 5);
    // Anyone else on this machine: refused.
    let open = shown.replace("***@", "");
    let error = Client::connect_with(&open, &Credentials::default())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthorized, "{error}");
    wharf::shutdown().await;
}

/// Divides; the caller below may not call it.
#[wharf::microservice(service = "secure")]
pub async fn divide(a: i64, b: i64) -> i64 {
    a / b.max(1)
}

#[tokio::test]
async fn a_refused_publish_fails_the_call_at_once_as_permission_denied() {
    let server = NatsServer::start_with_config(
        r#"authorization { users: [
            { user: worker, password: w, permissions: { publish: ">", subscribe: ">" } },
            { user: caller, password: c, permissions: {
                publish: ["wharf.secure.add", "$JS.API.>", "_INBOX.>"],
                subscribe: ["_INBOX.>"] } }
        ] }"#,
    )
    .unwrap();
    let worker_client = Client::connect_with(&server.url(), &password("worker", "w"))
        .await
        .unwrap();
    let _worker = Worker::new(&worker_client).start().await.unwrap();
    let caller = Client::connect_with(&server.url(), &password("caller", "c"))
        .await
        .unwrap();
    assert_eq!(add::call(&caller, 2, 3).await.unwrap(), 5);
    // Not a timeout: the call fails as soon as the server says no, long
    // before its 20 s deadline.
    let error = divide::request(6, 3)
        .client(&caller)
        .timeout(std::time::Duration::from_secs(20))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PermissionDenied, "{error}");
    assert!(error.message().contains("wharf.secure.divide"), "{error}");
    // And again, without sending.
    let error = divide::call(&caller, 6, 3).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PermissionDenied, "{error}");
    // The permitted call still works on the same connection.
    assert_eq!(add::call(&caller, 1, 1).await.unwrap(), 2);
}

#[tokio::test]
async fn a_creds_file_of_a_jwt_account() {
    let jwt_account = JwtAccount::start("creds").unwrap();
    let server = &jwt_account.server;
    let with_creds = jwt_account.creds("U", serde_json::json!({ "pub": {}, "sub": {} }));
    assert_eq!(round_trip(&server.url(), &with_creds).await.unwrap(), 5);
    let error = Client::connect_with(&server.url(), &Credentials::default())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthorized, "{error}");

    // An expired JWT is named as such, with what to do.
    let an_hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3600;
    let expired = jwt_account.creds_expiring(
        "old",
        serde_json::json!({ "pub": {}, "sub": {} }),
        Some(an_hour_ago),
    );
    let error = Client::connect_with(&server.url(), &expired)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthorized, "{error}");
    assert!(
        error.message().contains("expired 1h") && error.message().contains("new creds file"),
        "{error}"
    );
    assert!(!error.message().contains("SU"), "no seed shown: {error}");
}

#[tokio::test]
async fn a_worker_refused_its_subscriptions_does_not_start() {
    let server = NatsServer::start_with_config(
        r#"authorization { users: [
            { user: outsider, password: o, permissions: {
                publish: [">"],
                subscribe: { allow: [">"], deny: ["wharf.secure.divide"] } } }
        ] }"#,
    )
    .unwrap();
    let client = Client::connect_with(&server.url(), &password("outsider", "o"))
        .await
        .unwrap();
    let error = Worker::new(&client).start().await.err().unwrap();
    assert_eq!(error.kind(), ErrorKind::PermissionDenied, "{error}");
    assert!(
        error.message().contains("subscribe `wharf.secure.divide`"),
        "{error}"
    );
}

#[tokio::test]
async fn wharf_auth_jwt_permissions_hold_in_a_jwt_account() {
    let config = wharf::supervisor::UpConfig::from_toml(
        "[[service]]\nname = \"secure\"\ncommand = [\"x\"]\n\
         [[caller]]\nname = \"web\"\nfunctions = [\"secure.add\"]\n",
    )
    .unwrap();
    let roles = wharf::permissions::roles(&config, "wharf");
    let permissions = wharf::permissions::jwt_permissions(&roles);
    let jwt_account = JwtAccount::start("jwt-permissions").unwrap();
    let server = &jwt_account.server;
    // Each role's user JWT holds that role's generated permissions.
    let creds_for = |name: &str| Credentials {
        inbox_prefix: Some(wharf::permissions::inbox_prefix(name)),
        ..jwt_account.creds(name, permissions[name].clone())
    };
    let worker = Client::connect_with(&server.url(), &creds_for("worker-secure"))
        .await
        .unwrap();
    let _worker = Worker::new(&worker).start().await.unwrap();
    let web = Client::connect_with(&server.url(), &creds_for("web"))
        .await
        .unwrap();
    assert_eq!(add::call(&web, 2, 3).await.unwrap(), 5);
    let error = divide::request(6, 3)
        .client(&web)
        .timeout(std::time::Duration::from_secs(20))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PermissionDenied, "{error}");
}
