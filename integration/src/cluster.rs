//! A three-node JetStream cluster in containers of the local NATS image,
//! for fault tests: nodes are killed (`docker kill`), paused (`docker
//! pause`) and cut off from each other (`docker network disconnect`).
//!
//! Two networks of the cluster's own: the nodes route to each other on
//! `routes` (by aliases that exist only there) and serve clients on
//! `clients`. Cutting a node from `routes` partitions the cluster while
//! the node's own clients (worker containers on `clients`, processes on
//! this host through the node's address there) still reach it.
//! Everything carries the label `wharf.test=<name>` and is removed when the
//! cluster is dropped, even when the test fails.

use crate::{docker, unique_name};
use std::path::{Path, PathBuf};
use std::time::Duration;
use testcontainers::core::{Mount, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// The label on every container and network of a cluster test.
pub const TEST_LABEL: &str = "wharf.test";

/// How nodes store JetStream writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// nats-server's default: fsync every two minutes.
    Default,
    /// broker-config/cluster/production: fsync before every
    /// acknowledgement (`sync_interval: always`).
    Production,
}

/// One node: its container and names.
pub struct Node {
    /// The container's name (on `clients`, also its DNS name).
    pub name: String,
    /// Its alias on `routes`.
    route_alias: String,
    container: ContainerAsync<GenericImage>,
}

/// A running three-node cluster.
pub struct Cluster {
    /// Unique name: the prefix of every container and network.
    pub name: String,
    /// The network the nodes route on.
    pub routes: String,
    /// The network clients reach the nodes on.
    pub clients: String,
    /// The nodes, `n1`, `n2`, `n3`.
    pub nodes: Vec<Node>,
    /// Worker containers started on `clients`.
    workers: Vec<ContainerAsync<GenericImage>>,
    _dir: wharf::testing::TempDir,
}

impl Cluster {
    /// Starts three nodes and waits until their JetStream cluster has a
    /// leader. `None` (after a skip line) without Docker, when not required.
    pub async fn start(stem: &str, profile: Profile) -> Option<Cluster> {
        let (image, tag) = crate::nats_image()?;
        let name = unique_name(stem).replace('_', "-");
        let routes = format!("{name}-routes");
        let clients = format!("{name}-clients");
        for network in [&routes, &clients] {
            docker(&[
                "network",
                "create",
                "--label",
                &format!("{TEST_LABEL}={name}"),
                network,
            ]);
        }
        let dir = wharf::testing::TempDir::new(&format!("{stem}-cluster"));
        let mut cluster = Cluster {
            name: name.clone(),
            routes,
            clients,
            nodes: Vec::new(),
            workers: Vec::new(),
            _dir: dir,
        };
        let aliases: Vec<String> = (1..=3).map(|i| format!("{name}-r{i}")).collect();
        for i in 1..=3 {
            let node = format!("{name}-n{i}");
            let config = node_config(cluster._dir.path(), &node, i, &aliases, profile);
            let container = GenericImage::new(image, tag)
                .with_wait_for(WaitFor::message_on_stderr("Server is ready"))
                .with_container_name(&node)
                .with_network(&cluster.clients)
                .with_label(TEST_LABEL, &name)
                .with_mount(Mount::bind_mount(
                    config.to_string_lossy().into_owned(),
                    "/nats.conf",
                ))
                .with_cmd(["-c", "/nats.conf"])
                .with_host_config_modifier(unpublished)
                .start()
                .await
                .expect("a node of the local NATS image starts");
            docker(&[
                "network",
                "connect",
                "--alias",
                &aliases[i - 1],
                &cluster.routes,
                &node,
            ]);
            cluster.nodes.push(Node {
                name: node,
                route_alias: aliases[i - 1].clone(),
                container,
            });
        }
        cluster.wait_for_jetstream().await;
        Some(cluster)
    }

    /// The address of node `i` (0-based) on `clients`, as this host
    /// reaches it: `nats://<ip>:4222`.
    pub fn url(&self, i: usize) -> String {
        let ip = docker(&[
            "inspect",
            "--format",
            &format!(
                "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                self.clients
            ),
            &self.nodes[i].name,
        ]);
        format!("nats://{}:4222", ip.trim())
    }

    /// Every node's address, comma-separated, starting at node `first`.
    pub fn urls_from(&self, first: usize) -> String {
        (0..self.nodes.len())
            .map(|k| self.url((first + k) % self.nodes.len()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The address of node `i` for a container on `clients`.
    pub fn inner_url(&self, i: usize) -> String {
        format!("nats://{}:4222", self.nodes[i].name)
    }

    /// SIGKILLs node `i`, as a crash would.
    pub fn kill(&self, i: usize) {
        docker(&["kill", &self.nodes[i].name]);
    }

    /// Starts node `i` again, with its JetStream store.
    pub async fn restart(&self, i: usize) {
        self.nodes[i]
            .container
            .start()
            .await
            .expect("a killed node starts again");
    }

    /// Freezes node `i`: it keeps its connections but answers nothing.
    pub async fn pause(&self, i: usize) {
        // The kernel's cgroup freezer gives up on a busy container now and
        // then ("unable to freeze"; runc thaws it again): asked again.
        wharf::testing::eventually(
            "docker pause to freeze the node",
            Duration::from_secs(20),
            || async {
                self.nodes[i]
                    .container
                    .pause()
                    .await
                    .map_err(|e| e.to_string())
            },
        )
        .await
    }

    /// Thaws node `i`.
    pub async fn unpause(&self, i: usize) {
        self.nodes[i]
            .container
            .unpause()
            .await
            .expect("docker unpause");
    }

    /// Cuts node `i` off from the other nodes; its clients still reach it.
    pub fn partition(&self, i: usize) {
        docker(&["network", "disconnect", &self.routes, &self.nodes[i].name]);
    }

    /// Joins node `i` to the other nodes again.
    pub fn heal(&self, i: usize) {
        docker(&[
            "network",
            "connect",
            "--alias",
            &self.nodes[i].route_alias,
            &self.routes,
            &self.nodes[i].name,
        ]);
    }

    /// Starts a worker container of the `svc` image attached to node
    /// `node` (it learns the other nodes from it), with `env`; waits until
    /// it serves.
    pub async fn worker(&mut self, node: usize, env: &[(&str, &str)]) {
        let image = crate::svc_image().expect("Docker is here: the cluster runs");
        let (name, tag) = image.split_once(':').expect("a tagged image");
        let mut request = GenericImage::new(name, tag)
            .with_wait_for(WaitFor::message_on_stderr("worker ready"))
            .with_network(&self.clients)
            .with_label(TEST_LABEL, &self.name)
            .with_env_var("NATS_URL", self.inner_url(node))
            .with_env_var("WHARF_ROLE", "worker")
            .with_cmd(["worker"])
            .with_host_config_modifier(unpublished);
        for (key, value) in env {
            request = request.with_env_var(*key, *value);
        }
        let container = request.start().await.expect("a worker container starts");
        self.workers.push(container);
    }

    /// Waits until JetStream answers through every node (a meta leader is
    /// elected and every node knows it).
    pub async fn wait_for_jetstream(&self) {
        for i in 0..self.nodes.len() {
            let url = self.url(i);
            wharf::testing::eventually(
                &format!("JetStream to answer through {}", self.nodes[i].name),
                Duration::from_secs(60),
                || {
                    let url = url.clone();
                    async move {
                        let nats = async_nats::connect(&url).await.map_err(|e| e.to_string())?;
                        let js = async_nats::jetstream::new(nats);
                        js.query_account().await.map_err(|e| e.to_string())
                    }
                },
            )
            .await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Not left to testcontainers' own (asynchronous) clean-up: a test
        // that panics must not leave a cluster running.
        remove_labelled(&self.name);
    }
}

/// Reached on their networks only: no port on this host (and no
/// docker-proxy to tear down with them).
fn unpublished(config: &mut testcontainers::bollard::models::HostConfig) {
    config.publish_all_ports = Some(false);
    config.port_bindings = None;
}

/// Removes every container and network labelled `wharf.test=<name>`.
pub fn remove_labelled(name: &str) {
    crate::remove_containers(&format!("{TEST_LABEL}={name}"));
    let networks = docker(&[
        "network",
        "ls",
        "--quiet",
        "--filter",
        &format!("label={TEST_LABEL}={name}"),
    ]);
    for network in networks.split_whitespace() {
        let _ = crate::try_docker(&["network", "rm", network]);
    }
}

/// A node's configuration, written into `dir`.
fn node_config(
    dir: &Path,
    node: &str,
    index: usize,
    routes: &[String],
    profile: Profile,
) -> PathBuf {
    let sync = match profile {
        Profile::Default => "",
        Profile::Production => "  sync_interval: always\n",
    };
    let routes: Vec<String> = routes
        .iter()
        .map(|alias| format!("    nats-route://{alias}:6222"))
        .collect();
    // Clients learn the other nodes by name, which containers on
    // `clients` resolve (processes on this host are given every node's
    // address instead).
    let text = format!(
        "server_name: {node}\nlisten: 0.0.0.0:4222\nhttp: 0.0.0.0:8222\n\
         client_advertise: \"{node}:4222\"\n\
         server_tags: [\"node:{index}\"]\n\
         # Hung or cut-off peers and clients are noticed within seconds.\n\
         ping_interval: \"1s\"\nping_max: 2\n\
         jetstream {{\n  store_dir: \"/data\"\n{sync}}}\n\
         cluster {{\n  name: wharf\n  listen: 0.0.0.0:6222\n  routes: [\n{}\n  ]\n}}\n",
        routes.join("\n")
    );
    let path = dir.join(format!("{node}.conf"));
    std::fs::write(&path, text).expect("the test's directory is writable");
    path
}
