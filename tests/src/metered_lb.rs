//! One lb host holding a VIP for three coordinator replicas, every daemon
//! with its metrics endpoint on: what the metrics and alert tests scrape.
//!
//! ```text
//!   root namespace (the gateway .1): etcd, coord-1..3 (metrics on .1)
//!   lb1 (netns .10): steward-agent with the lb role, metrics on .10,
//!                    holding the VIP .200 (check "none": no HAProxy)
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::netns::{Host, TestNet};
use crate::{eventually, free_port, metrics_listen, Cluster};

pub const VIP_NAME: &str = "front";

pub struct MeteredLb {
    // Drop order: the processes first, the network last.
    pub cluster: Cluster,
    pub lb: Host,
    pub vip: Ipv4Addr,
    /// Each replica's metrics endpoint, in `cluster.coordinators` order.
    pub replicas: Vec<SocketAddr>,
    /// The agent's, on its host's address (reached over the bridge).
    pub agent_metrics: SocketAddr,
    pub net: TestNet,
}

impl MeteredLb {
    /// Starts everything and waits until `lb1` holds the VIP.
    pub fn start(tag: &str) -> MeteredLb {
        let mut net = TestNet::new(tag);
        let lb = net.add_host("lb1");
        let vip = net.addr(200);
        let mut cluster = Cluster::new();
        cluster.coordinator_host = net.gateway().to_string();
        cluster.coordinator_metrics = true;
        cluster.start_coordinators(3);
        let replicas: Vec<SocketAddr> = cluster
            .coordinators
            .iter()
            .map(|c| metrics_listen(&c.config).expect("coordinator has metrics_listen"))
            .collect();

        let agent_metrics: SocketAddr = (lb.ip(), free_port()).into();
        let extra = [(
            "metrics_listen",
            toml::Value::from(agent_metrics.to_string()),
        )];
        cluster.start_agent_in(lb.ns(), lb.name(), &extra);
        eventually(Duration::from_secs(20), "lb agent to connect", || {
            cluster.node(lb.name()).is_some().then_some(())
        });
        let out = cluster.ctl(&["role", "add", lb.name(), "lb"]);
        assert!(out.ok(), "{}", out.stderr);
        let address = format!("{vip}/{}", net.prefix_len());
        let out = cluster.ctl(&[
            "vip",
            "set",
            VIP_NAME,
            "--address",
            &address,
            "--check",
            "none",
        ]);
        assert!(out.ok(), "{}", out.stderr);
        eventually(Duration::from_secs(30), "lb1 to hold the VIP", || {
            lb.has_address(vip).then_some(())
        });
        MeteredLb {
            cluster,
            lb,
            vip,
            replicas,
            agent_metrics,
            net,
        }
    }
}
