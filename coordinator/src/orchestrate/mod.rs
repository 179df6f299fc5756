//! Cluster-wide steps that need one node picked for the whole cluster:
//! `kubeadm init` and joins ([`kubernetes`]), Gluster peers and volumes
//! ([`gluster`]). Pure functions from the cluster view and the leader's
//! records to each node's tasks; the leader keeps the records
//! (`cluster/kubernetes/…`, `cluster/gluster/…`), every replica computes
//! the same tasks from them. Secrets are sealed at rest ([`secrets`]).

pub mod gluster;
pub mod kubernetes;
pub mod leader;
pub mod progress;
pub mod secrets;
pub mod state;
