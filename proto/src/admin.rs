//! Domain types of the admin and bootstrap APIs (`stewardctl`'s calls and
//! `BootstrapService.Join`): join tokens, joins and their answers, VIP moves
//! and removals and the VIP listing, the cluster status, the event stream's
//! query. Inbound messages are validated once here ([`TryFrom`] a `pb`
//! request, failing with a [`ProtoError`] that names the field); answers
//! are built as these types and turned into `pb` at the edge ([`From`]).
//!
//! **Architecture invariant:** no policy lives here that needs the cluster's
//! state (whether a node is known, a token still valid): only what a message
//! alone can tell.

use crate::convert::{
    bounded_list, bounded_str, node_health_from_pb, node_health_to_pb, role_from_pb, ProtoError,
};
use crate::domain::{Health, NodeHealth, NodeId, Role};
use crate::pb;
use crate::vip::VipSpec;
use std::str::FromStr;

/// Nodes per `ListNodes` page unless the caller asks for fewer.
pub const DEFAULT_NODES_PAGE: usize = 500;
/// Most nodes per `ListNodes` page (facts bounded to 16 KiB, converge
/// reports to 64 KiB: pages stay well under the clients' 4 MB... for
/// ordinary nodes; stewardctl asks for smaller pages with facts).
pub const MAX_NODES_PAGE: usize = 1000;

/// `ListNodes`' server-side filters: a node must match every one given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFilter {
    pub role: Option<Role>,
    /// `key=value`.
    pub label: Option<(String, String)>,
    pub health: Option<NodeHealth>,
    pub replica: Option<String>,
}

/// `ListNodes`: one page of the nodes that match `filter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeQuery {
    pub filter: NodeFilter,
    /// 1 ..= [`MAX_NODES_PAGE`].
    pub page_size: usize,
    /// Start after this node; `None`: from the first.
    pub after: Option<NodeId>,
    pub without_facts: bool,
}

impl TryFrom<pb::ListNodesRequest> for NodeQuery {
    type Error = ProtoError;
    fn try_from(r: pb::ListNodesRequest) -> Result<Self, ProtoError> {
        let role = match r.role {
            0 => None,
            v => Some(role_from_pb("role", v)?),
        };
        let health = match r.health {
            0 => None,
            v => Some(node_health_from_pb(v)?),
        };
        let label = match r.label.as_str() {
            "" => None,
            l => {
                let (k, v) = l
                    .split_once('=')
                    .ok_or_else(|| ProtoError::LabelFilter(l.to_owned()))?;
                Some((k.to_owned(), v.to_owned()))
            }
        };
        Ok(NodeQuery {
            filter: NodeFilter {
                role,
                label,
                health,
                replica: (!r.replica.is_empty())
                    .then(|| bounded_str("replica", r.replica))
                    .transpose()?,
            },
            page_size: match r.page_size {
                0 => DEFAULT_NODES_PAGE,
                n => (n as usize).min(MAX_NODES_PAGE),
            },
            after: optional_node(r.page_token)?,
            without_facts: r.without_facts,
        })
    }
}

/// Longest join-token description, in bytes.
pub const MAX_TOKEN_DESCRIPTION: usize = 256;

/// `CreateToken`: a join token's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// Validity in seconds; the coordinator bounds it.
    pub ttl_s: u64,
    /// Nodes that may join with it; 0: any number until it expires.
    pub uses: u32,
    /// The only node that may join with it.
    pub node: Option<NodeId>,
    pub description: String,
}

impl TryFrom<pb::CreateTokenRequest> for TokenRequest {
    type Error = ProtoError;
    fn try_from(r: pb::CreateTokenRequest) -> Result<Self, ProtoError> {
        if r.description.len() > MAX_TOKEN_DESCRIPTION {
            return Err(ProtoError::TooLong {
                field: "description",
                limit: MAX_TOKEN_DESCRIPTION,
            });
        }
        Ok(TokenRequest {
            ttl_s: r.ttl_s,
            uses: r.uses,
            node: optional_node(r.node_id)?,
            description: r.description,
        })
    }
}

impl From<TokenRequest> for pb::CreateTokenRequest {
    fn from(r: TokenRequest) -> Self {
        pb::CreateTokenRequest {
            ttl_s: r.ttl_s,
            uses: r.uses,
            node_id: r.node.map(String::from).unwrap_or_default(),
            description: r.description,
        }
    }
}

/// A join token as `token list` shows it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
    /// 0: unlimited.
    pub uses: u32,
    pub used_by: Vec<NodeId>,
    pub node: Option<NodeId>,
    pub description: String,
    pub created_by: String,
}

impl From<TokenInfo> for pb::TokenInfo {
    fn from(t: TokenInfo) -> Self {
        pb::TokenInfo {
            id: t.id,
            created_unix_ms: t.created_unix_ms,
            expires_unix_ms: t.expires_unix_ms,
            uses: t.uses,
            used_by: t.used_by.into_iter().map(String::from).collect(),
            node_id: t.node.map(String::from).unwrap_or_default(),
            description: t.description,
            created_by: t.created_by,
        }
    }
}

/// `CreateToken`'s answer: the token, shown once, and how to join with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedToken {
    /// `<id>.<secret>`.
    pub token: String,
    pub info: TokenInfo,
    /// `sha256:<hex>` of the cluster CA's SubjectPublicKeyInfo.
    pub ca_hash: String,
    /// Every replica's bootstrap URL.
    pub join_urls: Vec<String>,
}

impl From<CreatedToken> for pb::CreateTokenResponse {
    fn from(c: CreatedToken) -> Self {
        pb::CreateTokenResponse {
            token: c.token,
            info: Some(c.info.into()),
            ca_hash: c.ca_hash,
            join_urls: c.join_urls,
        }
    }
}

/// `Join`: a node asking for its first certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    /// `<id>.<secret>` as given; the coordinator parses and checks it (a
    /// malformed token is a refusal like any other, with the same delay).
    pub token: String,
    pub node: NodeId,
    /// PKCS#10, PEM.
    pub csr_pem: String,
}

/// Longest CSR accepted, in bytes (a P-256 or RSA-4096 request is far less).
pub const MAX_CSR_LEN: usize = 16 * 1024;

impl TryFrom<pb::JoinRequest> for JoinRequest {
    type Error = ProtoError;
    fn try_from(r: pb::JoinRequest) -> Result<Self, ProtoError> {
        if r.csr_pem.len() > MAX_CSR_LEN {
            return Err(ProtoError::TooLong {
                field: "csr_pem",
                limit: MAX_CSR_LEN,
            });
        }
        Ok(JoinRequest {
            token: bounded_str("token", r.token)?,
            node: NodeId::new(r.node_id)?,
            csr_pem: r.csr_pem,
        })
    }
}

/// A certificate the cluster CA issued (join, renewal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    pub certificate_pem: String,
    /// The cluster CA, PEM.
    pub ca_pem: String,
    pub not_after_unix_ms: u64,
}

impl From<IssuedCertificate> for pb::IssuedCertificate {
    fn from(i: IssuedCertificate) -> Self {
        pb::IssuedCertificate {
            certificate_pem: i.certificate_pem,
            ca_pem: i.ca_pem,
            not_after_unix_ms: i.not_after_unix_ms,
        }
    }
}

/// `Join`'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinAnswer {
    pub certificate: IssuedCertificate,
    /// Every replica's agent URL.
    pub coordinators: Vec<String>,
    /// Coordinator replicas in the cluster (the agent's `[vip] replicas`).
    pub replicas: u32,
}

impl From<JoinAnswer> for pb::JoinResponse {
    fn from(a: JoinAnswer) -> Self {
        pb::JoinResponse {
            certificate: Some(a.certificate.into()),
            coordinators: a.coordinators,
            replicas: a.replicas,
        }
    }
}

/// `MoveVip`: ask the holder of `name` to let go, optionally naming the
/// candidate to take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipMove {
    pub name: String,
    pub to: Option<NodeId>,
}

impl TryFrom<pb::MoveVipRequest> for VipMove {
    type Error = ProtoError;
    fn try_from(r: pb::MoveVipRequest) -> Result<Self, ProtoError> {
        Ok(VipMove {
            name: bounded_str("name", r.name)?,
            to: optional_node(r.to)?,
        })
    }
}

/// One replica's side of one VIP's lease (for `vip list`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VipReplicaState {
    pub replica: String,
    pub vip: String,
    pub epoch: u64,
    pub acking: bool,
    /// Since this replica last acked the current epoch; `None`: never.
    pub last_ack_ms_ago: Option<u64>,
    /// `expired` or `released`: the mark this replica wrote for the epoch.
    pub mark: Option<String>,
    /// The replica could not be asked.
    pub unreachable: bool,
}

impl VipReplicaState {
    /// What is shown for a replica that could not be asked.
    pub fn unreachable(replica: &str, vip: &str) -> Self {
        VipReplicaState {
            replica: replica.to_owned(),
            vip: vip.to_owned(),
            unreachable: true,
            ..Default::default()
        }
    }
}

impl From<VipReplicaState> for pb::VipReplicaState {
    fn from(s: VipReplicaState) -> Self {
        pb::VipReplicaState {
            replica_id: s.replica,
            vip: s.vip,
            epoch: s.epoch,
            acking: s.acking,
            last_ack_ms_ago: s.last_ack_ms_ago.unwrap_or(0),
            mark: s.mark.unwrap_or_default(),
            unreachable: s.unreachable,
        }
    }
}

impl TryFrom<pb::VipReplicaState> for VipReplicaState {
    type Error = ProtoError;
    fn try_from(s: pb::VipReplicaState) -> Result<Self, ProtoError> {
        Ok(VipReplicaState {
            replica: bounded_str("replica_id", s.replica_id)?,
            vip: bounded_str("vip", s.vip)?,
            epoch: s.epoch,
            acking: s.acking,
            last_ack_ms_ago: (s.last_ack_ms_ago != 0).then_some(s.last_ack_ms_ago),
            mark: (!s.mark.is_empty())
                .then(|| bounded_str("mark", s.mark))
                .transpose()?,
            unreachable: s.unreachable,
        })
    }
}

/// A replica's lease state for every VIP it acks (`PeerService.LeaseStates`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseStates {
    pub replica: String,
    pub vips: Vec<VipReplicaState>,
}

impl From<LeaseStates> for pb::LeaseStatesResponse {
    fn from(s: LeaseStates) -> Self {
        pb::LeaseStatesResponse {
            replica_id: s.replica,
            vips: s.vips.into_iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<pb::LeaseStatesResponse> for LeaseStates {
    type Error = ProtoError;
    fn try_from(s: pb::LeaseStatesResponse) -> Result<Self, ProtoError> {
        Ok(LeaseStates {
            replica: bounded_str("replica_id", s.replica_id)?,
            vips: bounded_list("vips", s.vips)?
                .into_iter()
                .map(VipReplicaState::try_from)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// A node's live session on the replica that serves it
/// (`PeerService.LiveSessions`): fresher than the status etcd holds.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveSession {
    pub node: NodeId,
    pub last_seen_unix_ms: u64,
    pub health: NodeHealth,
    pub last_health: Health,
    pub applied_revision: u64,
}

impl From<LiveSession> for pb::LiveSession {
    fn from(s: LiveSession) -> Self {
        pb::LiveSession {
            node_id: s.node.into(),
            last_seen_unix_ms: s.last_seen_unix_ms,
            health: node_health_to_pb(s.health) as i32,
            last_health: Some(s.last_health.into()),
            applied_revision: s.applied_revision,
        }
    }
}

impl TryFrom<pb::LiveSession> for LiveSession {
    type Error = ProtoError;
    fn try_from(s: pb::LiveSession) -> Result<Self, ProtoError> {
        Ok(LiveSession {
            node: NodeId::new(s.node_id)?,
            last_seen_unix_ms: s.last_seen_unix_ms,
            health: node_health_from_pb(s.health)?,
            last_health: s
                .last_health
                .ok_or(ProtoError::MissingField("last_health"))?
                .try_into()?,
            applied_revision: s.applied_revision,
        })
    }
}

/// A VIP as `vip list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipStatus {
    pub spec: VipSpec,
    pub epoch: u64,
    pub owner: Option<NodeId>,
    pub move_requested: bool,
    /// Per replica, sorted by replica id.
    pub replicas: Vec<VipReplicaState>,
}

impl From<VipStatus> for pb::Vip {
    fn from(v: VipStatus) -> Self {
        pb::Vip {
            spec: Some(v.spec.into()),
            epoch: v.epoch,
            owner: v.owner.map(String::from).unwrap_or_default(),
            move_requested: v.move_requested,
            replicas: v.replicas.into_iter().map(Into::into).collect(),
        }
    }
}

/// One coordinator replica in the status answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub id: String,
    pub address: String,
    pub version: String,
    pub leader: bool,
    /// The agent sessions the replica serves; `None`: it did not answer.
    pub connected_agents: Option<u32>,
}

impl From<ReplicaStatus> for pb::Replica {
    fn from(r: ReplicaStatus) -> Self {
        pb::Replica {
            id: r.id,
            address: r.address,
            version: r.version,
            leader: r.leader,
            connected_agents: r.connected_agents.unwrap_or(0),
            agents_unknown: r.connected_agents.is_none(),
        }
    }
}

/// `Status`: the replicas, the leader, whether etcd answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    pub replicas: Vec<ReplicaStatus>,
    pub leader: Option<String>,
    pub etcd_reachable: bool,
    /// The replica that answered.
    pub served_by: String,
    pub cluster: String,
}

impl From<ClusterStatus> for pb::StatusResponse {
    fn from(s: ClusterStatus) -> Self {
        pb::StatusResponse {
            replicas: s.replicas.into_iter().map(Into::into).collect(),
            leader_id: s.leader.unwrap_or_default(),
            etcd_reachable: s.etcd_reachable,
            served_by: s.served_by,
            cluster: s.cluster,
        }
    }
}

/// Past events sent by default before following.
pub const DEFAULT_EVENTS: u32 = 100;
/// Most past events one request may ask for.
pub const MAX_EVENTS: u32 = 10_000;

/// `Events`: how many past events, and whether to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsQuery {
    /// 1 ..= [`MAX_EVENTS`].
    pub limit: u32,
    pub follow: bool,
}

impl From<pb::EventsRequest> for EventsQuery {
    fn from(r: pb::EventsRequest) -> Self {
        EventsQuery {
            limit: match r.limit {
                0 => DEFAULT_EVENTS,
                n => n.min(MAX_EVENTS),
            },
            follow: r.follow,
        }
    }
}

/// An optional node id: empty means none.
fn optional_node(id: String) -> Result<Option<NodeId>, ProtoError> {
    match id.as_str() {
        "" => Ok(None),
        _ => Ok(Some(NodeId::new(id)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_requests_are_validated_at_the_edge() {
        let request = |node: &str, description: String| pb::CreateTokenRequest {
            ttl_s: 600,
            uses: 1,
            node_id: node.into(),
            description,
        };
        let ok = TokenRequest::try_from(request("", "x".into())).expect("valid");
        assert_eq!(ok.node, None);
        let bound = TokenRequest::try_from(request("n1", String::new())).expect("valid");
        assert_eq!(bound.node.as_ref().map(NodeId::as_str), Some("n1"));
        let error = TokenRequest::try_from(request("N1!", String::new())).expect_err("bad id");
        assert!(
            error.to_string().contains("invalid node id \"N1!\""),
            "{error}"
        );
        let error = TokenRequest::try_from(request("", "x".repeat(257))).expect_err("long");
        assert_eq!(
            error,
            ProtoError::TooLong {
                field: "description",
                limit: 256
            }
        );
        let back = pb::CreateTokenRequest::from(bound);
        assert_eq!(back.node_id, "n1");
    }

    #[test]
    fn joins_need_a_valid_node_id_and_a_bounded_csr() {
        let join = |node: &str, csr: String| pb::JoinRequest {
            token: "abcdef.0123456789abcdef".into(),
            node_id: node.into(),
            csr_pem: csr,
        };
        assert!(JoinRequest::try_from(join("n1", "csr".into())).is_ok());
        assert!(matches!(
            JoinRequest::try_from(join("", "csr".into())),
            Err(ProtoError::InvalidNodeId(_))
        ));
        assert!(matches!(
            JoinRequest::try_from(join("n1", "x".repeat(MAX_CSR_LEN + 1))),
            Err(ProtoError::TooLong {
                field: "csr_pem",
                ..
            })
        ));
    }

    #[test]
    fn vip_moves_and_replica_states_round_trip() {
        let moved = VipMove::try_from(pb::MoveVipRequest {
            name: "front".into(),
            to: String::new(),
        })
        .expect("valid");
        assert_eq!(moved.to, None);
        assert!(VipMove::try_from(pb::MoveVipRequest {
            name: "front".into(),
            to: "Bad Node".into(),
        })
        .is_err());
        let state = VipReplicaState {
            replica: "c-1".into(),
            vip: "front".into(),
            epoch: 3,
            acking: true,
            last_ack_ms_ago: Some(12),
            mark: None,
            unreachable: false,
        };
        let wire = pb::VipReplicaState::from(state.clone());
        assert_eq!((wire.last_ack_ms_ago, wire.mark.as_str()), (12, ""));
        assert_eq!(VipReplicaState::try_from(wire), Ok(state));
        let never = VipReplicaState::unreachable("c-2", "front");
        assert_eq!(
            VipReplicaState::try_from(pb::VipReplicaState::from(never.clone())),
            Ok(never)
        );
    }

    #[test]
    fn node_queries_parse_filters_and_bound_pages() {
        let query = NodeQuery::try_from(pb::ListNodesRequest {
            page_size: 5000,
            page_token: "n1".into(),
            role: pb::Role::Lb as i32,
            label: "rack=a=b".into(),
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(query.page_size, MAX_NODES_PAGE);
        assert_eq!(query.after, NodeId::new("n1").ok());
        assert_eq!(query.filter.role, Some(Role::Lb));
        assert_eq!(query.filter.label, Some(("rack".into(), "a=b".into())));
        let defaults = NodeQuery::try_from(pb::ListNodesRequest::default()).expect("valid");
        assert_eq!(
            (defaults.page_size, defaults.filter),
            (DEFAULT_NODES_PAGE, NodeFilter::default())
        );
        let error = NodeQuery::try_from(pb::ListNodesRequest {
            label: "rack".into(),
            ..Default::default()
        })
        .expect_err("no =");
        assert_eq!(error.to_string(), "label filter \"rack\": use key=value");
        assert!(NodeQuery::try_from(pb::ListNodesRequest {
            health: 99,
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn live_sessions_round_trip_and_need_their_health() {
        let session = LiveSession {
            node: NodeId::new("n1").expect("node id"),
            last_seen_unix_ms: 7,
            health: NodeHealth::Healthy,
            last_health: Health::default(),
            applied_revision: 3,
        };
        let wire = pb::LiveSession::from(session.clone());
        assert_eq!(LiveSession::try_from(wire.clone()), Ok(session));
        let without = pb::LiveSession {
            last_health: None,
            ..wire
        };
        assert_eq!(
            LiveSession::try_from(without),
            Err(ProtoError::MissingField("last_health"))
        );
    }

    #[test]
    fn events_queries_are_bounded() {
        let q = |limit| {
            EventsQuery::from(pb::EventsRequest {
                follow: false,
                limit,
            })
        };
        assert_eq!(q(0).limit, DEFAULT_EVENTS);
        assert_eq!(q(7).limit, 7);
        assert_eq!(q(u32::MAX).limit, MAX_EVENTS);
    }

    #[test]
    fn per_role_limits_parse_and_every_problem_is_named() {
        let limits: RoleLimits = "k8s-worker=3, gluster-brick=2,lb=1".parse().unwrap();
        assert_eq!(
            limits,
            RoleLimits {
                k8s_control_plane: 0,
                k8s_worker: 3,
                gluster_brick: 2,
            }
        );
        let options = RolloutOptions {
            max_unavailable: 2,
            per_role: limits,
            ..Default::default()
        };
        assert_eq!(options.max_unavailable_for(Role::K8sWorker), 3);
        assert_eq!(options.max_unavailable_for(Role::K8sControlPlane), 2);
        assert_eq!(options.max_unavailable_for(Role::Lb), 1);
        let wire: pb::RolloutOptions = options.into();
        assert_eq!(RolloutOptions::from(wire), options);
        let err = "lb=2,k8s-worker=0,nope=1,k8s-worker,gluster-brick=1,gluster-brick=2"
            .parse::<RoleLimits>()
            .unwrap_err();
        assert_eq!(
            err,
            "\"lb=2\": lb nodes go one at a time (the VIP pair), always 1; \
             \"k8s-worker=0\": N must be a whole number of at least 1; \
             \"nope=1\": unknown role \"nope\" (k8s-control-plane, k8s-worker, gluster-brick); \
             \"k8s-worker\": use ROLE=N; \"gluster-brick=2\": gluster-brick given twice"
        );
        assert_eq!("".parse::<RoleLimits>().unwrap_err(), "no ROLE=N given");
        // Old records without the field still read.
        let old: RolloutOptions =
            serde_json::from_str(r#"{"max_unavailable":2,"canary":0,"pause_after_canary":false}"#)
                .unwrap();
        assert_eq!(old.per_role, RoleLimits::default());
    }
}

/// `--max-unavailable`, `--max-unavailable-per-role`, `--canary`,
/// `--pause-after-canary` of `stewardctl apply --rollout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutOptions {
    /// Nodes of one role out of service at once (lb: always 1).
    pub max_unavailable: u32,
    /// Nodes in the first batches, before the rest (0: no canary).
    pub canary: u32,
    /// Pause once the canary nodes are done (`rollout resume` goes on).
    pub pause_after_canary: bool,
    /// Per-role limits that replace `max_unavailable` for their role.
    #[serde(default)]
    pub per_role: RoleLimits,
}

impl Default for RolloutOptions {
    fn default() -> Self {
        Self {
            max_unavailable: 1,
            canary: 0,
            pause_after_canary: false,
            per_role: RoleLimits::default(),
        }
    }
}

impl RolloutOptions {
    /// Nodes with `role` out of service at once, before the control plane
    /// quorum cap the planner adds: lb 1, else the role's own limit or
    /// `max_unavailable`.
    pub fn max_unavailable_for(&self, role: Role) -> u32 {
        let own = match role {
            Role::Lb => return 1,
            Role::K8sControlPlane => self.per_role.k8s_control_plane,
            Role::K8sWorker => self.per_role.k8s_worker,
            Role::GlusterBrick => self.per_role.gluster_brick,
        };
        match own {
            0 => self.max_unavailable.max(1),
            n => n,
        }
    }
}

/// `--max-unavailable-per-role ROLE=N,...` (0: the role has no limit of
/// its own). lb is not here: it is always 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleLimits {
    pub k8s_control_plane: u32,
    pub k8s_worker: u32,
    pub gluster_brick: u32,
}

impl RoleLimits {
    /// The limits that differ from none, as `ROLE=N` in role order.
    pub fn entries(&self) -> Vec<(Role, u32)> {
        [
            (Role::K8sControlPlane, self.k8s_control_plane),
            (Role::K8sWorker, self.k8s_worker),
            (Role::GlusterBrick, self.gluster_brick),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }
}

impl FromStr for RoleLimits {
    type Err = String;
    /// `k8s-worker=3,gluster-brick=1`: every problem named.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut limits = RoleLimits::default();
        let mut problems = Vec::new();
        let mut seen = Vec::new();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((role, n)) = item.split_once('=') else {
                problems.push(format!("{item:?}: use ROLE=N"));
                continue;
            };
            let role = match role.trim().parse::<Role>() {
                Ok(r) => r,
                Err(_) => {
                    problems.push(format!(
                        "{item:?}: unknown role {:?} (k8s-control-plane, k8s-worker, \
                         gluster-brick)",
                        role.trim()
                    ));
                    continue;
                }
            };
            let n = match n.trim().parse::<u32>() {
                Ok(n) if n >= 1 => n,
                _ => {
                    problems.push(format!("{item:?}: N must be a whole number of at least 1"));
                    continue;
                }
            };
            if seen.contains(&role) {
                problems.push(format!("{item:?}: {role} given twice"));
                continue;
            }
            seen.push(role);
            match role {
                Role::Lb if n == 1 => {}
                Role::Lb => problems.push(format!(
                    "{item:?}: lb nodes go one at a time (the VIP pair), always 1"
                )),
                Role::K8sControlPlane => limits.k8s_control_plane = n,
                Role::K8sWorker => limits.k8s_worker = n,
                Role::GlusterBrick => limits.gluster_brick = n,
            }
        }
        if seen.is_empty() && problems.is_empty() {
            problems.push("no ROLE=N given".into());
        }
        match problems.is_empty() {
            true => Ok(limits),
            false => Err(problems.join("; ")),
        }
    }
}

impl From<pb::RolloutOptions> for RolloutOptions {
    fn from(o: pb::RolloutOptions) -> Self {
        Self {
            max_unavailable: o.max_unavailable.max(1),
            canary: o.canary,
            pause_after_canary: o.pause_after_canary,
            per_role: RoleLimits {
                k8s_control_plane: o.max_unavailable_k8s_control_plane,
                k8s_worker: o.max_unavailable_k8s_worker,
                gluster_brick: o.max_unavailable_gluster_brick,
            },
        }
    }
}

impl From<RolloutOptions> for pb::RolloutOptions {
    fn from(o: RolloutOptions) -> Self {
        Self {
            max_unavailable: o.max_unavailable,
            canary: o.canary,
            pause_after_canary: o.pause_after_canary,
            max_unavailable_k8s_control_plane: o.per_role.k8s_control_plane,
            max_unavailable_k8s_worker: o.per_role.k8s_worker,
            max_unavailable_gluster_brick: o.per_role.gluster_brick,
        }
    }
}

/// Which nodes `stewardctl rollout reboot` reboots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootSelector {
    /// `--nodes ID,...` (each once, in the order given).
    Nodes(Vec<NodeId>),
    /// `--role R`: every node with the role.
    Role(Role),
    /// `--all`: every node with a spec or a status.
    All,
}

/// `RebootRollout`: the nodes, whether only those that need it, and the
/// limits of any rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebootRollout {
    pub selector: RebootSelector,
    pub only_required: bool,
    pub options: RolloutOptions,
}

impl TryFrom<pb::RebootRolloutRequest> for RebootRollout {
    type Error = ProtoError;
    fn try_from(r: pb::RebootRolloutRequest) -> Result<Self, ProtoError> {
        let role = match r.role {
            0 => None,
            v => Some(role_from_pb("role", v)?),
        };
        let nodes = bounded_list("node_ids", r.node_ids)?;
        let selector = match (nodes.is_empty(), role, r.all) {
            (false, None, false) => {
                let mut seen = std::collections::BTreeSet::new();
                let mut ids = Vec::new();
                for n in nodes {
                    let id = NodeId::new(n)?;
                    if seen.insert(id.clone()) {
                        ids.push(id);
                    }
                }
                RebootSelector::Nodes(ids)
            }
            (true, Some(role), false) => RebootSelector::Role(role),
            (true, None, true) => RebootSelector::All,
            _ => {
                return Err(ProtoError::Invalid {
                    field: "node_ids, role, all (give exactly one)",
                })
            }
        };
        Ok(Self {
            selector,
            only_required: r.only_required,
            options: r.options.map(Into::into).unwrap_or_default(),
        })
    }
}

impl From<RebootRollout> for pb::RebootRolloutRequest {
    fn from(r: RebootRollout) -> Self {
        let mut out = pb::RebootRolloutRequest {
            only_required: r.only_required,
            options: Some(r.options.into()),
            ..Default::default()
        };
        match r.selector {
            RebootSelector::Nodes(ids) => {
                out.node_ids = ids.into_iter().map(String::from).collect()
            }
            RebootSelector::Role(role) => out.role = crate::convert::role_to_pb(role) as i32,
            RebootSelector::All => out.all = true,
        }
        out
    }
}

/// `rollout pause`, `resume`, `abort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    Pause,
    Resume,
    Abort,
}

/// `ControlRollout`: what to do with which rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutControl {
    pub id: String,
    pub action: RolloutAction,
}

impl TryFrom<pb::ControlRolloutRequest> for RolloutControl {
    type Error = ProtoError;
    fn try_from(r: pb::ControlRolloutRequest) -> Result<Self, ProtoError> {
        use pb::control_rollout_request::Action as A;
        let action = match r.action() {
            A::Pause => RolloutAction::Pause,
            A::Resume => RolloutAction::Resume,
            A::Abort => RolloutAction::Abort,
            A::Unspecified => return Err(ProtoError::MissingField("action")),
        };
        Ok(Self {
            id: bounded_str("id", r.id)?,
            action,
        })
    }
}

/// A rollout as `rollout status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RolloutView {
    pub id: String,
    /// running, paused, failed, aborting, done, aborted (creating).
    pub phase: String,
    pub reason: String,
    pub created_by: String,
    pub created_at_unix_ms: u64,
    pub changes: Vec<String>,
    pub options: RolloutOptions,
    pub canary_batches: u32,
    pub batches: u32,
    pub nodes_total: u32,
    pub nodes_done: u32,
    /// Empty in listings.
    pub nodes: Vec<RolloutNodeView>,
}

/// One node of a rollout: its batch, its step and when it reached each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutNodeView {
    pub node: NodeId,
    pub batch: u32,
    pub step: String,
    pub reason: String,
    pub started_unix_ms: u64,
    pub drained_unix_ms: u64,
    pub changed_unix_ms: u64,
    pub converged_unix_ms: u64,
    pub healthy_unix_ms: u64,
    pub finished_unix_ms: u64,
    pub changed_revision: u64,
    /// Reboot rollouts: the boot it ran when its reboot was asked, and the
    /// one it came back with.
    pub boot_id_before: String,
    pub boot_id_after: String,
}

impl From<RolloutNodeView> for pb::RolloutNode {
    fn from(n: RolloutNodeView) -> Self {
        Self {
            node_id: n.node.to_string(),
            batch: n.batch,
            step: n.step,
            reason: n.reason,
            started_unix_ms: n.started_unix_ms,
            drained_unix_ms: n.drained_unix_ms,
            changed_unix_ms: n.changed_unix_ms,
            converged_unix_ms: n.converged_unix_ms,
            healthy_unix_ms: n.healthy_unix_ms,
            finished_unix_ms: n.finished_unix_ms,
            changed_revision: n.changed_revision,
            boot_id_before: n.boot_id_before,
            boot_id_after: n.boot_id_after,
        }
    }
}

impl From<RolloutView> for pb::Rollout {
    fn from(r: RolloutView) -> Self {
        Self {
            id: r.id,
            phase: r.phase,
            reason: r.reason,
            created_by: r.created_by,
            created_at_unix_ms: r.created_at_unix_ms,
            changes: r.changes,
            options: Some(r.options.into()),
            canary_batches: r.canary_batches,
            batches: r.batches,
            nodes_total: r.nodes_total,
            nodes_done: r.nodes_done,
            nodes: r.nodes.into_iter().map(Into::into).collect(),
        }
    }
}
