//! A whole deployment under the permissions `wharf auth` writes: a real
//! nats-server with the generated users, a supervisor process as
//! `supervisor` starting worker processes as `worker-itest`, and a caller
//! as `web` limited to one function.

use futures_util::StreamExt;
use std::time::Duration;
use wharf::settings::{Credentials, Secret};
use wharf::supervisor::UpConfig;
use wharf::testing::{eventually, NatsServer, Pki, TempDir};
use wharf::ErrorKind;
use wharf_integration::{spawn_svc, svc_binary};

fn user(name: &str) -> Credentials {
    Credentials {
        user: Some(name.to_owned()),
        password: Some(Secret::new(format!("pw-{name}"))),
        inbox_prefix: Some(wharf::permissions::inbox_prefix(name)),
        ..Credentials::default()
    }
}

#[tokio::test]
async fn a_deployment_runs_under_the_permissions_wharf_auth_writes() {
    let svc = svc_binary();
    let services = format!(
        "[[service]]\nname = \"itest\"\ncommand = [\"{}\", \"worker\"]\nmin = 1\nmax = 1\n\
         env = {{ NATS_USER = \"worker-itest\", NATS_PASSWORD = \"pw-worker-itest\", WHARF_INBOX_PREFIX = \"_INBOX.worker-itest\" }}\n\
         [[caller]]\nname = \"web\"\nfunctions = [\"itest.add\", \"itest.countdown\", \"itest.sum_all\"]\n",
        svc.display()
    );
    // Read from the binary, as `wharf auth` does: the worker may take
    // exactly its functions' calls, in the workers' queue group.
    let config = UpConfig::from_toml(&services).unwrap();
    let served = wharf::permissions::served_by(&config.services[0])
        .await
        .expect("the svc binary describes its functions");
    assert!(served["itest"].contains(&"add".to_owned()), "{served:?}");
    let served = [("itest".to_owned(), served)].into();
    let roles = wharf::permissions::roles_serving(&config, "wharf", &served);
    let worker_role = roles.iter().find(|r| r.user == "worker-itest").unwrap();
    assert!(worker_role
        .permissions
        .subscribe
        .contains(&"wharf.itest.add q".to_owned()));
    assert!(!worker_role
        .permissions
        .subscribe
        .iter()
        .any(|s| s == "wharf.itest.*"));
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
            ("WHARF_INBOX_PREFIX", "_INBOX.supervisor"),
        ],
    );

    // The supervisor starts a worker under its own role; the caller reaches it.
    let web = wharf::Client::connect_with(&server.url(), &user("web"))
        .await
        .unwrap();
    let reply =
        wharf_integration::first_answer(&web, "a worker started by the supervisor to answer").await;
    let worker = reply.pid().expect("the worker names itself");
    assert!(
        wharf_integration::descendants(supervisor.pid()).contains(&worker),
        "pid {worker} was not started by the supervisor"
    );
    // A stream: items to the caller's inbox, credit to the worker's.
    let counted: Vec<u32> = wharf_integration::countdown::call(&web, 40, None)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(counted, (0..=40).rev().collect::<Vec<u32>>());
    // A stream argument: grants to the caller's inbox, items to the worker's.
    let sum = wharf_integration::sum_all::call(&web, wharf::Stream::iter(1..=100))
        .await
        .unwrap();
    assert_eq!(sum, 5050);
    // Only those functions.
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

/// Removes a test's containers when it ends, even on a panic.
struct Containers(String);

impl Drop for Containers {
    fn drop(&mut self) {
        wharf_integration::remove_containers(&format!("wharf.prefix={}", self.0));
    }
}

#[tokio::test]
async fn a_container_instance_gets_its_credential_files_mounted_read_only() {
    if wharf_integration::svc_image().is_none() {
        return; // No Docker here, and none required.
    }
    // A TLS server whose CA the instances must be given as a file.
    let dir = TempDir::new("container-tls");
    let pki = Pki::new(dir.path(), &[]);
    let ca_path = pki.ca.clone();
    let server = NatsServer::start_with_config(&pki.server_tls(false)).unwrap();
    let prefix = wharf_integration::unique_name("tlsc");
    let _containers = Containers(prefix.clone());
    let config = dir.path().join("wharf.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nurl = \"{}\"\nprefix = \"{prefix}\"\n\n[[service]]\nname = \"itest\"\n\
             backend = \"docker\"\nimage = \"{}\"\ncommand = [\"worker\"]\nmin = 1\nmax = 1\n",
            server.url(),
            wharf_integration::SVC_IMAGE
        ),
    )
    .unwrap();
    let config_path = config.to_string_lossy().into_owned();
    let ca_text = ca_path.to_string_lossy().into_owned();
    let supervisor = spawn_svc(&["supervise", &config_path], &[("NATS_CA", &ca_text)]);
    let client = wharf::Client::connect_with(
        &server.url(),
        &Credentials {
            ca: Some(ca_path.clone()),
            ..Credentials::default()
        },
    )
    .await
    .unwrap()
    .with_prefix(&prefix);
    // Only the container serves: it read the CA from its read-only mount.
    let sum = eventually(
        "the container instance to answer over TLS",
        Duration::from_secs(90),
        || {
            let client = client.clone();
            async move {
                wharf_integration::add::request(2, 3)
                    .client(&client)
                    .timeout(Duration::from_secs(5))
                    .await
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await;
    assert_eq!(sum, 5);
    let mounts = std::process::Command::new("docker")
        .args(["ps", "--filter"])
        .arg(format!("label=wharf.prefix={prefix}"))
        .args(["--format", "{{.Mounts}}"])
        .output()
        .unwrap();
    assert!(!mounts.stdout.is_empty(), "no container of this test runs");
    let inspect = std::process::Command::new("docker")
        .args(["ps", "--quiet", "--filter"])
        .arg(format!("label=wharf.prefix={prefix}"))
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&inspect.stdout).trim().to_owned();
    let details = std::process::Command::new("docker")
        .args(["inspect", "--format", "{{json .Mounts}}", &id])
        .output()
        .unwrap();
    let details = String::from_utf8_lossy(&details.stdout);
    assert!(
        details.contains("/run/wharf/nats_ca") && details.contains("\"RW\":false"),
        "the CA is not mounted read-only: {details}"
    );
    wharf_integration::signal(supervisor.pid(), libc::SIGTERM);
    let status = supervisor.exit_status().await;
    assert!(status.success(), "the supervisor exited with {status}");
}
