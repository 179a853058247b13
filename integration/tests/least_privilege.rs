//! A whole deployment under the permissions `wharf auth` writes: a real
//! nats-server with the generated users, a supervisor process as
//! `supervisor` starting worker processes as `worker-itest`, and a caller
//! as `web` limited to one function.

use std::time::Duration;
use wharf::settings::{Credentials, Secret};
use wharf::supervisor::UpConfig;
use wharf::testing::{eventually, NatsServer, TempDir};
use wharf::ErrorKind;
use wharf_integration::{spawn_svc, svc_binary};

fn user(name: &str) -> Credentials {
    Credentials {
        user: Some(name.to_owned()),
        password: Some(Secret::new(format!("pw-{name}"))),
        ..Credentials::default()
    }
}

#[tokio::test]
async fn a_deployment_runs_under_the_permissions_wharf_auth_writes() {
    let svc = svc_binary();
    let services = format!(
        "[[service]]\nname = \"itest\"\ncommand = [\"{}\", \"worker\"]\nmin = 1\nmax = 1\n\
         env = {{ NATS_USER = \"worker-itest\", NATS_PASSWORD = \"pw-worker-itest\" }}\n\
         [[caller]]\nname = \"web\"\nfunctions = [\"itest.add\"]\n",
        svc.display()
    );
    let roles = wharf::permissions::roles(&UpConfig::from_toml(&services).unwrap(), "wharf");
    let mut authorization = wharf::permissions::server_config(&roles);
    for role in &roles {
        authorization = authorization.replace(
            &format!("${}", role.password_variable()),
            &format!("\"pw-{}\"", role.user),
        );
    }
    let server = NatsServer::start_with_config(&authorization).unwrap();
    let dir = TempDir::new("least-privilege");
    let config = dir.path().join("wharf.toml");
    std::fs::write(
        &config,
        format!("[broker]\nurl = \"{}\"\n{services}", server.url()),
    )
    .unwrap();
    let config_path = config.to_string_lossy().into_owned();
    let supervisor = spawn_svc(
        &["supervise", &config_path],
        &[
            ("NATS_USER", "supervisor"),
            ("NATS_PASSWORD", "pw-supervisor"),
        ],
    );

    // The supervisor starts a worker under its own role; the caller reaches it.
    let web = wharf::Client::connect_with(&server.url(), &user("web"))
        .await
        .unwrap();
    let reply = eventually(
        "a worker started by the supervisor to answer",
        Duration::from_secs(60),
        || {
            let web = web.clone();
            async move {
                wharf_integration::add::request(2, 3)
                    .client(&web)
                    .timeout(Duration::from_secs(5))
                    .send_detailed()
                    .await
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await;
    assert_eq!(reply.value, 5);
    let worker = reply.pid().expect("the worker names itself");
    assert!(
        wharf_integration::descendants(supervisor.pid()).contains(&worker),
        "pid {worker} was not started by the supervisor"
    );
    // Only that function.
    let error = wharf_integration::whoami::request()
        .client(&web)
        .timeout(Duration::from_secs(20))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PermissionDenied, "{error}");

    // Stopping, the supervisor drains its worker under its permissions.
    wharf_integration::signal(supervisor.pid(), libc::SIGTERM);
    let status = supervisor.exit_status().await;
    assert!(status.success(), "the supervisor exited with {status}");
    assert!(
        wharf_integration::wait_gone(&[worker], Duration::from_secs(30)),
        "the worker outlived its supervisor"
    );
}
