//! Least-privilege NATS permissions for each role of a deployment, written
//! from `wharf.toml` (`wharf auth`): a worker of a service may take only its
//! own calls and use only its own streams; a caller only the functions it
//! names; the supervisor alone may drain, stop and hear demand.
//!
//! Two forms, the two users deploy: a nats-server `authorization` block
//! (users with passwords taken from the server's environment) and one
//! permissions JSON document per user, as `nsc` and JWT accounts take them.

use crate::supervisor::{ServiceConfig, UpConfig};
use crate::wire::subjects::{
    self, BLOBS_BUCKET, INSTANCES_BUCKET, LEASE_BUCKET, OBJECTS_BUCKET, TXN_BUCKET,
};
use serde::Serialize;
use std::collections::BTreeMap;

/// What one user may publish and subscribe to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Permissions {
    /// Subjects it may publish to.
    pub publish: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
}

/// One user of the deployment: its name and permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// The user name: `supervisor`, `worker-<service>`, or a caller's name.
    pub user: String,
    /// What it may do.
    pub permissions: Permissions,
}

impl Role {
    /// The environment variable nats-server reads this user's password
    /// from in the generated `authorization` block.
    pub fn password_variable(&self) -> String {
        let name: String = self
            .user
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("WHARF_PASSWORD_{name}")
    }
}

/// The JetStream API subjects that create, inspect and read a stream.
fn stream_api(stream: &str) -> Vec<String> {
    [
        "STREAM.INFO",
        "STREAM.CREATE",
        "STREAM.UPDATE",
        "STREAM.MSG.GET",
    ]
    .iter()
    .map(|verb| subjects::js_api(verb, stream))
    .chain([
        subjects::js_direct_get(stream),
        subjects::js_api_any("DIRECT.GET", stream),
    ])
    .collect()
}

/// The JetStream API subjects of `stream`'s consumers: create, inspect,
/// delete and pull from them.
fn consumer_api(stream: &str) -> Vec<String> {
    vec![
        subjects::js_api("CONSUMER.*", stream),
        subjects::js_api_any("CONSUMER.*", stream),
        subjects::js_api_consumer("CONSUMER.MSG.NEXT", stream),
    ]
}

/// A KV bucket's stream, its API and its writes.
fn bucket(name: &str) -> Vec<String> {
    let mut subjects = stream_api(&subjects::kv_stream(name));
    subjects.push(subjects::kv_keys(name));
    subjects
}

/// What calling `service.function` takes, plain, durable or in a
/// transaction.
fn calling(prefix: &str, service: &str, function: &str) -> Vec<String> {
    let stream = subjects::calls_stream(prefix, service);
    let mut publish = vec![
        subjects::call(prefix, service, function),
        subjects::signed_calls(prefix, service, function),
        subjects::call_status(prefix, service),
        subjects::call_cancel(prefix, service),
        subjects::demand(prefix, service),
        subjects::durable_call(prefix, service, function),
        // Durable calls in batches, once the workers' batch consumer is
        // seen to be there.
        subjects::durable_batch_call(prefix, service, function),
        subjects::js_api(
            "CONSUMER.INFO",
            &format!("{stream}.{}", subjects::durable_batch_consumer(function)),
        ),
        subjects::instance_call(prefix, "*", service, function),
        subjects::transaction_end(prefix, "*"),
    ];
    publish.extend(stream_api(&stream));
    // Collecting a durable call's result.
    publish.extend(bucket(&subjects::results_bucket(service)));
    publish
}

/// The inbox prefix of `user`'s connections: `_INBOX.<user>`. Each role
/// may subscribe only to its own inboxes, so no role reads another's
/// replies; its processes set `WHARF_INBOX_PREFIX` to this.
pub fn inbox_prefix(user: &str) -> String {
    subjects::user_inbox_prefix(user)
}

/// What every wharf connection of `user` takes: its own inboxes, replies
/// to anyone's, leases and objects.
fn common(user: &str) -> Permissions {
    let mut publish = vec![
        subjects::JS_API_INFO.to_owned(),
        // Replies, durable ones included, go to the caller's inbox.
        subjects::inboxes(subjects::DEFAULT_INBOX_PREFIX),
    ];
    for name in [TXN_BUCKET, OBJECTS_BUCKET] {
        publish.extend(bucket(name));
    }
    let blobs = subjects::object_store_stream(BLOBS_BUCKET);
    publish.extend(stream_api(&blobs));
    publish.push(subjects::object_store_subjects(BLOBS_BUCKET));
    publish.extend(consumer_api(&blobs));
    publish.push(subjects::js_api("STREAM.PURGE", &blobs));
    Permissions {
        publish,
        subscribe: vec![subjects::inboxes(&inbox_prefix(user))],
    }
}

/// The functions a service's worker binary serves, by service: what
/// `WHARF_ROLE=describe` printed (a binary serves every microservice linked
/// into it, of any service).
pub type Served = BTreeMap<String, Vec<String>>;

/// Every role of `config`, under `prefix`, when the functions of the
/// services' binaries are not known: a worker of service `S` may take any
/// call of `S` (`<prefix>.S.*`).
pub fn roles(config: &UpConfig, prefix: &str) -> Vec<Role> {
    roles_serving(config, prefix, &BTreeMap::new())
}

/// Every role of `config`, under `prefix`, with what each service's binary
/// serves (from [`Served`], by `[[service]]` name): its worker may take
/// exactly those calls, and only in the workers' queue group; a caller of
/// every function gets exactly those. Services missing from `served` are
/// granted as by [`roles`].
pub fn roles_serving(
    config: &UpConfig,
    prefix: &str,
    served: &BTreeMap<String, Served>,
) -> Vec<Role> {
    let mut roles = Vec::new();

    // The objects service on its own (`wharf objects`): its buckets only.
    let mut objects = common("objects");
    objects.publish.retain(|s| !s.contains(TXN_BUCKET));
    objects.subscribe.push(subjects::objects(prefix, "*"));
    roles.push(Role {
        user: "objects".to_owned(),
        permissions: objects,
    });

    // The supervisor (`wharf up`, which also serves the object store).
    let mut supervisor = common("supervisor");
    supervisor.publish.extend([
        subjects::control(prefix, "*"),
        subjects::events(prefix),
        subjects::discovery_at("PING", "*", "*"),
        // `wharf down` and `wharf up --reload`, run by whoever holds
        // these credentials.
        subjects::supervisor_down(prefix),
        subjects::supervisor_reload(prefix),
    ]);
    for name in [LEASE_BUCKET, INSTANCES_BUCKET] {
        supervisor.publish.extend(bucket(name));
    }
    // Watching heartbeats.
    supervisor
        .publish
        .extend(consumer_api(&subjects::kv_stream(INSTANCES_BUCKET)));
    supervisor
        .publish
        .push(subjects::JS_FLOW_CONTROL.to_owned());
    supervisor.subscribe.extend([
        subjects::demand_any(prefix),
        subjects::supervisor_down(prefix),
        subjects::supervisor_reload(prefix),
        // `wharf events`, run by whoever holds these credentials.
        subjects::events(prefix),
        subjects::objects(prefix, "*"),
    ]);
    roles.push(Role {
        user: "supervisor".to_owned(),
        permissions: supervisor,
    });

    // A worker of each service: what its binary serves.
    for service in &config.services {
        let user = format!("worker-{}", service.name);
        let mut worker = common(&user);
        worker.publish.extend(bucket(INSTANCES_BUCKET));
        worker
            .publish
            .extend(stream_api(&subjects::dead_letter_stream(prefix)));
        let unknown = BTreeMap::from([(service.name.clone(), vec!["*".to_owned()])]);
        let serves = served.get(&service.name).unwrap_or(&unknown);
        for (name, functions) in serves {
            let stream = subjects::calls_stream(prefix, name);
            // Its own services' results: no other's.
            worker
                .publish
                .extend(bucket(&subjects::results_bucket(name)));
            worker.publish.extend(stream_api(&stream));
            worker.publish.extend([
                subjects::js_api_any("CONSUMER.CREATE", &stream),
                subjects::js_api_consumer("CONSUMER.INFO", &stream),
                subjects::js_api_consumer("CONSUMER.MSG.NEXT", &stream),
                subjects::js_ack(&stream),
                subjects::dead_letter(prefix, name, "*"),
            ]);
            for function in functions {
                let call = subjects::call(prefix, name, function);
                let signed = subjects::signed_calls(prefix, name, function);
                // A known function only in the workers' queue group.
                if function == "*" {
                    worker.subscribe.extend([call, signed]);
                } else {
                    worker.subscribe.extend([
                        subjects::in_queue_group(&call),
                        subjects::in_queue_group(&signed),
                    ]);
                }
                worker
                    .subscribe
                    .push(subjects::instance_call(prefix, "*", name, function));
            }
            worker.subscribe.extend([
                subjects::call_status(prefix, name),
                subjects::call_cancel(prefix, name),
                subjects::discovery_of("*", name),
                subjects::discovery_at("*", name, "*"),
            ]);
        }
        for called in &service.calls {
            if let Some((s, f)) = called.split_once('.') {
                worker.publish.extend(calling(prefix, s, f));
            }
        }
        worker.subscribe.extend([
            subjects::transaction_end(prefix, "*"),
            subjects::control(prefix, "*"),
            subjects::discovery("*"),
        ]);
        roles.push(Role {
            user,
            permissions: worker,
        });
    }

    // Callers, each with its functions (or all of every service).
    for caller in &config.callers {
        let mut permissions = common(&caller.name);
        let functions: Vec<(String, String)> = if caller.functions.is_empty() {
            config
                .services
                .iter()
                .flat_map(|s| match served.get(&s.name) {
                    Some(serves) => serves
                        .iter()
                        .flat_map(|(service, functions)| {
                            functions.iter().map(move |f| (service.clone(), f.clone()))
                        })
                        .collect::<Vec<_>>(),
                    None => vec![(s.name.clone(), "*".to_owned())],
                })
                .collect()
        } else {
            caller
                .functions
                .iter()
                .filter_map(|f| f.split_once('.'))
                .map(|(s, f)| (s.to_owned(), f.to_owned()))
                .collect()
        };
        for (service, function) in &functions {
            permissions
                .publish
                .extend(calling(prefix, service, function));
        }
        // Objects through the objects service, as other languages do.
        permissions.publish.push(subjects::objects(prefix, "*"));
        roles.push(Role {
            user: caller.name.clone(),
            permissions,
        });
    }
    for role in &mut roles {
        role.permissions.publish.sort();
        role.permissions.publish.dedup();
        role.permissions.subscribe.sort();
        role.permissions.subscribe.dedup();
    }
    roles
}

/// The functions `service`'s binary serves, by service: it is run once
/// with `WHARF_ROLE=describe` (a process backend's command, or the docker
/// backend's image without a network), which prints them and exits.
pub async fn served_by(service: &ServiceConfig) -> Result<Served, String> {
    let mut served = Served::new();
    for function in describe(service).await? {
        served
            .entry(function.service)
            .or_default()
            .push(function.name);
    }
    Ok(served)
}

/// One function a service's binary serves, as `WHARF_ROLE=describe`
/// prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    /// Its service.
    pub service: String,
    /// Its name.
    pub name: String,
    /// Called through JetStream by default.
    pub durable: bool,
    /// Served by the instance that owns a call's transaction.
    pub stateful: bool,
}

/// Every function `service`'s binary serves: it is run once with
/// `WHARF_ROLE=describe` (a process backend's command, or a container
/// backend's image without a network), which prints them and exits.
pub async fn describe(service: &ServiceConfig) -> Result<Vec<Described>, String> {
    let mut command = match service.backend.as_str() {
        "docker" | "swarm" => {
            let mut command = tokio::process::Command::new("docker");
            command.args([
                "run",
                "--rm",
                "--network",
                "none",
                "--env",
                "WHARF_ROLE=describe",
            ]);
            command.arg(service.image.as_deref().unwrap_or_default());
            command.args(&service.command);
            command
        }
        _ => {
            let (program, args) = service
                .command
                .split_first()
                .ok_or("the service has no command")?;
            let mut command = tokio::process::Command::new(program);
            command
                .args(args)
                .envs(&service.env)
                .env("WHARF_ROLE", "describe");
            command
        }
    };
    command
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), command.output())
        .await
        .map_err(|_| "it did not answer within 60 s".to_owned())?
        .map_err(|e| format!("it cannot be started: {e}"))?;
    if !out.status.success() {
        return Err(format!("it exited with {}", out.status));
    }
    let described: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("it printed no function list ({e}); is it built with wharf?"))?;
    let functions = described["functions"].as_array().into_iter().flatten();
    Ok(functions
        .filter_map(|function| {
            Some(Described {
                service: function["service"].as_str()?.to_owned(),
                name: function["name"].as_str()?.to_owned(),
                durable: function["durable"].as_bool().unwrap_or(false),
                stateful: function["stateful"].as_bool().unwrap_or(false),
            })
        })
        .collect())
}

/// A nats-server `authorization` block: one user per role, each password
/// read from the server's environment (`WHARF_PASSWORD_<ROLE>`).
pub fn server_config(roles: &[Role]) -> String {
    let list = |subjects: &[String]| {
        subjects
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::from(
        "# Each user's processes set WHARF_INBOX_PREFIX to its own inbox prefix (below):\n\
         # each user may read only its own inboxes.\n\
         authorization {\n  users: [\n",
    );
    for role in roles {
        out.push_str(&format!(
            "    # {}: WHARF_INBOX_PREFIX={}\n",
            role.user,
            inbox_prefix(&role.user)
        ));
        out.push_str(&format!(
            "    {{ user: \"{}\", password: ${},\n      permissions: {{\n        publish: [{}],\n        subscribe: [{}],\n        allow_responses: true\n      }} }}\n",
            role.user,
            role.password_variable(),
            list(&role.permissions.publish),
            list(&role.permissions.subscribe)
        ));
    }
    out.push_str("  ]\n}\n");
    out
}

/// One permissions document per role, as JWT user claims hold them
/// (`{"pub": {"allow": [...]}, "sub": {"allow": [...]}}`).
pub fn jwt_permissions(roles: &[Role]) -> serde_json::Value {
    let users: serde_json::Map<String, serde_json::Value> = roles
        .iter()
        .map(|role| {
            (
                role.user.clone(),
                serde_json::json!({
                    "pub": { "allow": role.permissions.publish },
                    "sub": { "allow": role.permissions.subscribe },
                    "resp": { "max": 1 },
                }),
            )
        })
        .collect();
    serde_json::Value::Object(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_gets_only_its_own() {
        let config = UpConfig::from_toml(
            "[[service]]\nname = \"quickstart\"\ncommand = [\"x\"]\n[[service]]\nname = \"other\"\ncommand = [\"x\"]\n[[caller]]\nname = \"web\"\nfunctions = [\"quickstart.add\"]\n",
        )
        .unwrap();
        let roles = roles(&config, "wharf");
        let role = |name: &str| roles.iter().find(|r| r.user == name).unwrap();
        let worker = &role("worker-quickstart").permissions;
        assert!(worker.subscribe.contains(&"wharf.quickstart.*".to_owned()));
        assert!(!worker.subscribe.iter().any(|s| s.contains("other")));
        assert!(!worker.publish.iter().any(|s| s.contains("_control")));
        assert!(!worker.publish.iter().any(|s| s.contains("_supervisor")));
        assert!(worker
            .publish
            .iter()
            .any(|s| s.contains("wharf_results_quickstart")));
        assert!(!worker
            .publish
            .iter()
            .any(|s| s.contains("wharf_results_other")));
        let web = &role("web").permissions;
        assert!(web.publish.contains(&"wharf.quickstart.add".to_owned()));
        assert!(!web.publish.iter().any(|s| s.ends_with("divide")));
        let supervisor = &role("supervisor").permissions;
        assert!(supervisor.publish.contains(&"wharf._control.*".to_owned()));
        assert!(supervisor
            .subscribe
            .contains(&"wharf._supervisor.down".to_owned()));
        let text = server_config(&roles);
        assert!(
            text.contains("password: $WHARF_PASSWORD_WORKER_QUICKSTART"),
            "{text}"
        );
        assert_eq!(
            jwt_permissions(&roles)["web"]["pub"]["allow"][0],
            serde_json::json!(web.publish[0])
        );
    }
}
