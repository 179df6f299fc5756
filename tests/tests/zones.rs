//! Zones place Gluster bricks (issue 15, zones): with brick nodes in zones
//! a, a, b and c, a replica-3 volume takes its three bricks from three
//! zones, so that losing any one zone leaves the replica set its quorum.
//!
//! Real etcd, a real replica (whose leader places the bricks) and four real
//! agents; the placement is read from etcd (`orchestration/gluster/<volume>`)
//! as the leader wrote it. Convergence is off on the agents: placement comes
//! before anything runs on a host (`tests/converge_gluster.rs` runs real
//! glusterd with the placement).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use steward_coordinator::orchestrate::gluster::VolumeRecord;
use steward_coordinator::store::{self, Keys};
use steward_tests::{eventually, Cluster};

/// The nodes by id order put the first two bricks in zone a.
const ZONES: [(&str, &str); 4] = [("g1", "a"), ("g2", "a"), ("g3", "b"), ("g4", "c")];

#[test]
fn a_replica_set_takes_its_bricks_from_distinct_zones() {
    let mut cluster = Cluster::new();
    cluster.start_coordinators(1);
    for (node, _) in ZONES {
        cluster.start_agent(node);
    }
    eventually(Duration::from_secs(20), "every agent connected", || {
        (cluster.nodes().len() == ZONES.len()).then_some(())
    });
    let mut spec = String::from("[[gluster.volume]]\nname = \"data\"\nreplica = 3\n\n");
    for (node, zone) in ZONES {
        spec.push_str(&format!(
            "[nodes.{node}]\nroles = [\"gluster-brick\"]\nlabels = {{ zone = \"{zone}\" }}\n\n"
        ));
    }
    let path = cluster.dir.path().join("zones.toml");
    std::fs::write(&path, &spec).expect("write spec");
    let path = path.display().to_string();
    let applied = cluster.ctl(&["apply", "-f", &path]);
    assert!(applied.ok(), "apply failed: {}", applied.stderr);

    let key = Keys::new(&cluster.name).gluster_volume("data");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let record: VolumeRecord = eventually(Duration::from_secs(20), "the brick placement", || {
        rt.block_on(async {
            let client = store::connect(&cluster.etcd.config(), true).await.ok()?;
            let resp = client.kv_client().get(key.as_str(), None).await.ok()?;
            serde_json::from_slice(resp.kvs().first()?.value()).ok()
        })
    });
    let zone_of: BTreeMap<&str, &str> = ZONES.into_iter().collect();
    let placed: Vec<(&str, &str)> = record
        .bricks
        .iter()
        .map(|b| (b.node.as_str(), zone_of[b.node.as_str()]))
        .collect();
    eprintln!("bricks (node, zone): {placed:?}");
    assert_eq!(placed.len(), 3, "one replica set of three: {placed:?}");
    let zones: BTreeSet<&str> = placed.iter().map(|(_, z)| *z).collect();
    assert_eq!(
        zones,
        BTreeSet::from(["a", "b", "c"]),
        "the replica set's bricks are not in three zones: {placed:?}"
    );
}
