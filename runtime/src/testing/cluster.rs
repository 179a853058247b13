//! A JetStream cluster of nats-server processes on this host, for tests and
//! benchmarks that need several nodes but no containers.

use super::NatsServer;
use crate::{Error, ErrorKind};

/// Nodes of one cluster, each a [`NatsServer`] with routes to the others.
#[derive(Debug)]
pub struct NatsCluster {
    /// The nodes, in order.
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` nodes with `extra` configuration each, for example
    /// `jetstream { sync_interval: always }` (the helper sets each node's
    /// address, ports and JetStream store).
    pub fn start(size: usize, extra: &str) -> Result<NatsCluster, Error> {
        let ports = free_ports(size)?;
        let routes: Vec<String> = ports
            .iter()
            .map(|port| format!("nats-route://127.0.0.1:{port}"))
            .collect();
        let name = format!("wharf-test-{}", nuid::next().as_str());
        let mut nodes = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let config = format!(
                "server_name: {name}-n{}\n{extra}\ncluster {{\n  name: {name}\n  listen: 127.0.0.1:{port}\n  routes: [{}]\n}}\n",
                i + 1,
                routes.join(", ")
            );
            nodes.push(NatsServer::start_with_config(&config)?);
        }
        Ok(NatsCluster { nodes })
    }

    /// Every node's URL, comma-separated, starting with node `first`.
    pub fn urls_from(&self, first: usize) -> String {
        (0..self.nodes.len())
            .map(|k| self.nodes[(first + k) % self.nodes.len()].url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node listening on client port `port`, if any.
    pub fn node_on(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port() == port)
    }
}

/// `count` ports free on 127.0.0.1 right now.
fn free_ports(count: usize) -> Result<Vec<u16>, Error> {
    // Held together, so the same port is not handed out twice.
    let listeners: Vec<std::net::TcpListener> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| Error::new(ErrorKind::Process, format!("no free port: {e}")).with_source(e))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| Error::new(ErrorKind::Process, format!("no free port: {e}")).with_source(e))
}
