//! The `wharf` command against a real nats-server and an in-process worker.

use std::process::Output;
use std::time::Duration;
use wharf::testing::{eventually, eventually_blocking, NatsServer};
use wharf::{Client, Worker};

/// Adds.
#[wharf::microservice(service = "cli")]
pub async fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Fails with its own error when `n` is odd.
#[wharf::microservice(service = "cli")]
pub async fn even(n: u32) -> Result<u32, String> {
    if n % 2 == 0 {
        Ok(n)
    } else {
        Err(format!("{n} is odd"))
    }
}

async fn wharf(url: &str, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_wharf"));
    command.args(args).env("NATS_URL", url);
    command.output().await.expect("the wharf command runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn call_prints_the_result_or_the_error() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _worker = Worker::new(&client).start().await.unwrap();
    let url = server.url();

    let out = wharf(&url, &["call", "cli.add", r#"{"a": 2, "b": 3}"#]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "5");
    let out = wharf(&url, &["call", "cli.add", "[40, 2]", "--durable"]).await;
    assert_eq!(text(&out.stdout).trim(), "42", "{}", text(&out.stderr));

    let out = wharf(&url, &["call", "cli.even", "[3]"]).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("application") && err.contains("3 is odd"),
        "{err}"
    );

    let out = wharf(&url, &["call", "cli.add", r#"{"a": "x"}"#]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("bad_request"),
        "{}",
        text(&out.stderr)
    );

    let out = wharf(&url, &["call", "cli.nope", "[]", "--attempts", "1"]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no worker serves `wharf.cli.nope`"));

    let out = wharf(&url, &["call", "add", "[1, 2]"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("is not <service>.<function>"));
    let out = wharf(&url, &["call", "cli.add", "{oops"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not JSON"));
    let out = wharf("nats://127.0.0.1:1", &["call", "cli.add", "[1, 2]"]).await;
    assert!(text(&out.stderr).contains("nats://127.0.0.1:1"));
}

#[tokio::test]
async fn bench_ends_with_one_summary_line() {
    let server = NatsServer::start().unwrap();
    let client = Client::connect(&server.url()).await.unwrap();
    let _worker = Worker::new(&client).start().await.unwrap();
    let url = server.url();
    for durable in [false, true] {
        let mut args = vec![
            "bench",
            "cli.add",
            "[1, 2]",
            "--calls",
            "2000",
            "--concurrency",
            "32",
        ];
        if durable {
            args.push("--durable");
        }
        let out = wharf(&url, &args).await;
        let stdout = text(&out.stdout);
        let summary = stdout.lines().last().unwrap_or_default();
        assert!(out.status.success(), "{summary} {}", text(&out.stderr));
        assert!(
            summary.starts_with("ok=2000 failed=0 calls/s="),
            "{summary}"
        );
        for field in ["p50=", "p99=", "retries=", "failures=none"] {
            assert!(summary.contains(field), "{summary}");
        }
    }
    let out = wharf(&url, &["bench", "cli.even", "[1]", "--calls", "10"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("ok=0 failed=10"),
        "{}",
        text(&out.stdout)
    );
    assert!(text(&out.stdout).contains("failures=application=10"));
}

/// `wharf up` as a child process, killed if the test ends first.
struct Up(std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `wharf down` (as `down` makes it) until it reaches `up`, then
/// waits for `up` to exit cleanly.
async fn down_stops(up: &mut Up, down: impl Fn() -> tokio::process::Command) {
    let said = eventually(
        "`wharf down` to reach `wharf up`",
        Duration::from_secs(30),
        || {
            let mut command = down();
            async move {
                let out = command.output().await.map_err(|e| e.to_string())?;
                if out.status.success() {
                    Ok(text(&out.stdout))
                } else {
                    Err(text(&out.stderr))
                }
            }
        },
    )
    .await;
    assert!(said.contains("stopping"), "{said}");
    let status = eventually_blocking(
        "`wharf up` to exit after `wharf down`",
        Duration::from_secs(30),
        || match up.0.try_wait() {
            Ok(Some(status)) => Ok(status),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn up_honours_nats_url_and_down_stops_it() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let dir = wharf::testing::TempDir::new("cli-up");
    let config = dir.path().join("wharf.toml");
    // No `[broker] url`: without NATS_URL, `wharf up` would start its own
    // nats-server on 4222.
    std::fs::write(&config, "[broker]\n").unwrap();
    let mut up = Up(std::process::Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["up", "-c"])
        .arg(&config)
        .env("NATS_URL", &url)
        .env("WHARF_PREFIX", "cliup")
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("wharf up starts"));
    // `wharf down` reaches it through the server NATS_URL names.
    down_stops(&mut up, || {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_wharf"));
        command
            .arg("down")
            .env("NATS_URL", &url)
            .env("WHARF_PREFIX", "cliup");
        command
    })
    .await;
}

#[tokio::test]
async fn up_reload_says_what_changed_and_refuses_a_bad_file() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let dir = wharf::testing::TempDir::new("cli-reload");
    let config = dir.path().join("wharf.toml");
    std::fs::write(&config, "[broker]\n").unwrap();
    let up = Up(std::process::Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["up", "-c"])
        .arg(&config)
        .env("NATS_URL", &url)
        .env("WHARF_PREFIX", "clireload")
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("wharf up starts"));
    let reload = || {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_wharf"));
        command
            .args(["up", "--reload", "-c"])
            .arg(&config)
            .env("NATS_URL", &url)
            .env("WHARF_PREFIX", "clireload");
        command
    };
    // Once it runs (it read the file as it was), a service scaled to
    // zero is added, and nothing starts.
    let said = eventually(
        "`wharf up --reload` to reach `wharf up`",
        Duration::from_secs(30),
        || {
            let mut command = reload();
            async move {
                let out = command.output().await.map_err(|e| e.to_string())?;
                if out.status.success() {
                    Ok(text(&out.stdout))
                } else {
                    Err(text(&out.stderr))
                }
            }
        },
    )
    .await;
    assert!(said.contains("nothing changed"), "{said}");
    std::fs::write(
        &config,
        "[broker]\n[[service]]\nname = \"idle\"\ncommand = [\"/bin/sh\"]\nmin = 0\n",
    )
    .unwrap();
    let out = reload().output().await.unwrap();
    assert!(
        text(&out.stdout).contains("service `idle` added"),
        "{}",
        text(&out.stdout)
    );
    // A bad file is refused here, before it is sent, naming the mistake.
    std::fs::write(
        &config,
        "[[service]]\nname = \"idle\"\ncommand = [\"/bin/sh\"]\nmin = 5\nmax = 2\n",
    )
    .unwrap();
    let out = reload().output().await.unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("min 5 and max 2"),
        "{}",
        text(&out.stderr)
    );
    let mut up = up;
    down_stops(&mut up, || {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_wharf"));
        command
            .arg("down")
            .env("NATS_URL", &url)
            .env("WHARF_PREFIX", "clireload");
        command
    })
    .await;
}

#[tokio::test]
async fn a_bad_setting_is_an_error_naming_it() {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_wharf"));
    command
        .args(["status"])
        .env("NATS_URL", "nats://127.0.0.1:1")
        .env("WHARF_MAX_WORKERS", "many");
    let out = command.output().await.unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("WHARF_MAX_WORKERS") && err.contains("`many`") && err.contains("whole number"),
        "{err}"
    );
}

#[tokio::test]
async fn every_verb_authenticates_and_shows_no_secret() {
    let server = NatsServer::start_with_config(
        "authorization { users: [ { user: ops, password: \"s3cret-pw\" } ] }",
    )
    .unwrap();
    let url = server.url();
    let ops = wharf::settings::Credentials {
        user: Some("ops".into()),
        password: Some(wharf::settings::Secret::new("s3cret-pw")),
        ..Default::default()
    };
    let client = Client::connect_with(&url, &ops).await.unwrap();
    let _worker = Worker::new(&client).start().await.unwrap();
    let as_ops = |args: &[&str], password: &str| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_wharf"));
        command
            .args(args)
            .env("NATS_URL", &url)
            .env("NATS_USER", "ops")
            .env("NATS_PASSWORD", password);
        command
    };

    // `wharf call` with the settings; and in the URL.
    let out = as_ops(&["call", "cli.add", "[2, 3]"], "s3cret-pw")
        .output()
        .await
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "5", "{}", text(&out.stderr));
    let in_url = url.replace("nats://", "nats://ops:s3cret-pw@");
    let out = wharf(&in_url, &["call", "cli.add", "[1, 1]"]).await;
    assert_eq!(text(&out.stdout).trim(), "2", "{}", text(&out.stderr));

    // A wrong password: refused, said so, and shown nowhere.
    let out = as_ops(&["call", "cli.add", "[2, 3]"], "wrong-pw")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("unauthorized") && err.contains("`ops`"),
        "{err}"
    );
    assert!(!err.contains("wrong-pw"), "{err}");
    let bad_url = url.replace("nats://", "nats://ops:wrong-pw@");
    let out = wharf(&bad_url, &["status"]).await;
    let err = text(&out.stderr);
    assert!(
        err.contains("unauthorized") && !err.contains("wrong-pw"),
        "{err}"
    );

    // `wharf up` with its credentials in wharf.toml [broker]; `wharf down`
    // with them in the environment.
    let dir = wharf::testing::TempDir::new("cli-up-auth");
    let config = dir.path().join("wharf.toml");
    std::fs::write(
        &config,
        format!("[broker]\nurl = \"{url}\"\nprefix = \"cliauth\"\nuser = \"ops\"\npassword = \"s3cret-pw\"\n"),
    )
    .unwrap();
    let mut up = Up(std::process::Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["up", "-c"])
        .arg(&config)
        .env_remove("NATS_URL")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("wharf up starts"));
    down_stops(&mut up, || {
        let mut command = as_ops(&["down"], "s3cret-pw");
        command.env("WHARF_PREFIX", "cliauth");
        command
    })
    .await;
    let mut logged = String::new();
    std::io::Read::read_to_string(&mut up.0.stderr.take().unwrap(), &mut logged).unwrap();
    assert!(logged.contains("supervising"), "{logged}");
    assert!(
        !logged.contains("s3cret"),
        "wharf up logged a secret: {logged}"
    );

    // `wharf auth` writes the roles of a wharf.toml.
    std::fs::write(
        &config,
        "[[service]]\nname = \"cli\"\ncommand = [\"x\"]\n[[caller]]\nname = \"web\"\nfunctions = [\"cli.add\"]\n",
    )
    .unwrap();
    let out = wharf(&url, &["auth", "-c", &config.to_string_lossy()]).await;
    let block = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for expected in [
        "user: \"worker-cli\"",
        "user: \"web\"",
        "user: \"supervisor\"",
        "\"wharf.cli.add\"",
        "WHARF_INBOX_PREFIX=_INBOX.web",
    ] {
        assert!(block.contains(expected), "no {expected} in {block}");
    }
    let out = wharf(
        &url,
        &["auth", "-c", &config.to_string_lossy(), "--format", "jwt"],
    )
    .await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["web"]["sub"]["allow"][0], "_INBOX.web.>");
}

/// A tmux session of its own, killed when dropped.
struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("tmux")
            .args(args)
            .output()
            .expect("tmux runs (scripts/test.sh installs it)")
    }

    /// What the session's pane shows now.
    fn screen(&self) -> String {
        text(&self.run(&["capture-pane", "-p", "-t", &self.0]).stdout)
    }

    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", &self.0]).status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-session", "-t", &self.0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_services_instances_and_decisions_live() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let client = Client::connect(&url).await.unwrap();
    let worker = Worker::new(&client).start().await.unwrap();
    let session = Tmux(format!("wharf-top-{}", std::process::id()));
    let started = session.run(&[
        "new-session",
        "-d",
        "-s",
        &session.0,
        "-x",
        "200",
        "-y",
        "50",
        "-e",
        &format!("NATS_URL={url}"),
        env!("CARGO_BIN_EXE_wharf"),
        "top",
    ]);
    assert!(started.status.success(), "{}", text(&started.stderr));

    // Load, including errors: `even` fails for odd numbers.
    let load = {
        let client = client.clone();
        tokio::spawn(async move {
            for n in 0u32.. {
                let _ = add::call(&client, 1, 2).await;
                let _ = even::call(&client, n).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // A decision as a supervisor publishes it.
    let event = wharf::supervisor::Event {
        at_ms: 0,
        service: Some("cli".into()),
        kind: wharf::supervisor::EventKind::Scale,
        instance: None,
        reason: "1 -> 2: backlog 120 is over 50 per instance on 1 instances".into(),
        supervisor: "test".into(),
    };
    let subject = wharf::wire::subjects::events(client.prefix());
    let screen = eventually(
        "wharf top to show the service, its instance under load, errors and the decision",
        Duration::from_secs(60),
        || async {
            // Published until seen: `top` may not have subscribed yet.
            let _ = client
                .nats()
                .publish(subject.clone(), serde_json::to_vec(&event).unwrap().into())
                .await;
            let screen = session.screen();
            let service = screen
                .lines()
                .find(|line| line.contains("│cli "))
                .ok_or_else(|| format!("no service row yet:\n{screen}"))?;
            // service, instances, calls/s, p50, p99, errors/s, ...
            let cells: Vec<&str> = service
                .trim_matches(|c| c == '│' || c == ' ')
                .split_whitespace()
                .collect();
            let calls: f64 = cells.get(2).and_then(|c| c.parse().ok()).unwrap_or(0.0);
            let errors: f64 = cells.get(5).and_then(|c| c.parse().ok()).unwrap_or(0.0);
            if calls > 0.0
                && errors > 0.0
                && screen.contains(worker.instance())
                && screen.contains("backlog 120 is over 50")
            {
                Ok(screen)
            } else {
                Err(format!("calls/s {calls}, errors/s {errors}:\n{screen}"))
            }
        },
    )
    .await;
    assert!(screen.contains("supervisor decisions"), "{screen}");
    load.abort();

    session.run(&["send-keys", "-t", &session.0, "q"]);
    eventually_blocking("`q` to end wharf top", Duration::from_secs(30), || {
        if session.alive() {
            Err("its session still runs".to_owned())
        } else {
            Ok(())
        }
    });
}

#[tokio::test]
async fn status_shows_each_instance_with_its_version_and_signatures() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let client = Client::connect(&url).await.unwrap();
    let worker = Worker::new(&client).start().await.unwrap();
    let version = env!("CARGO_PKG_VERSION");
    // Each function with the first 8 digits of its signature hash.
    let add_sig = format!("add:{}", &add::SPEC.sig_hex()[..8]);
    let even_sig = format!("even:{}", &even::SPEC.sig_hex()[..8]);
    let row = eventually(
        "`wharf status` to list the worker",
        Duration::from_secs(30),
        || async {
            let out = wharf(&url, &["status"]).await;
            let stdout = text(&out.stdout);
            stdout
                .lines()
                .find(|line| line.contains(worker.instance()))
                .map(str::to_owned)
                .ok_or_else(|| format!("{stdout}{}", text(&out.stderr)))
        },
    )
    .await;
    assert!(row.starts_with("cli "), "{row}");
    assert!(row.contains(&format!(" {version} ")), "{row}");
    assert!(row.contains(&add_sig) && row.contains(&even_sig), "{row}");

    // The same, whole, for scripts.
    let out = wharf(&url, &["status", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let instances: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let beat = instances
        .as_array()
        .unwrap()
        .iter()
        .find(|beat| beat["instance"] == worker.instance())
        .expect("the worker is listed");
    assert_eq!(beat["version"], version);
    assert_eq!(beat["signatures"]["cli.add"], add::SPEC.sig_hex());
    assert_eq!(beat["signatures"]["cli.even"], even::SPEC.sig_hex());
}
