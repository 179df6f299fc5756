//! `stewardctl`: the operator's CLI over the admin API, plus `pki` commands
//! that make a development cluster's certificates without other tools.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use steward_proto::converge::{ConvergeReport, ResourceStatus};
use steward_proto::convert::{node_health_from_pb, roles_to_pb};
use steward_proto::domain::{CertRevocation, Event, NodeView, RevocableKind, Role};
use steward_proto::pb;
use steward_proto::pb::admin_service_client::AdminServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use steward_pki::{self as pki, IdentityKind};

/// Operate a Steward cluster.
///
/// Connection settings come from flags or the environment
/// (STEWARD_ENDPOINTS, STEWARD_CA, STEWARD_CERT, STEWARD_KEY); the
/// certificate must be an admin certificate from the cluster CA
/// (`stewardctl pki issue DIR NAME --kind admin`).
#[derive(Debug, Parser)]
#[command(name = "stewardctl", version, about, long_about)]
pub struct Cli {
    /// Coordinator URLs, comma-separated; tried in order.
    #[arg(long, env = "STEWARD_ENDPOINTS", value_delimiter = ',', global = true)]
    pub endpoints: Vec<String>,
    /// Cluster CA certificate (PEM).
    #[arg(long, env = "STEWARD_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Admin client certificate (PEM).
    #[arg(long, env = "STEWARD_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Admin client key (PEM).
    #[arg(long, env = "STEWARD_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Coordinator replicas, the leader, and whether etcd answers.
    ///
    /// AGENTS is the agent sessions each replica serves, as it says itself
    /// when the answering replica asks it; `?` (null with `-o json`): it did
    /// not answer within half a second.
    Status,
    /// All nodes: roles, health, address, converged, last seen, serving
    /// replica. Read page by page, filtered on the server.
    Nodes {
        /// Only nodes with this role.
        #[arg(long, value_parser = parse_role)]
        role: Option<Role>,
        /// Only nodes with this label (KEY=VALUE).
        #[arg(long)]
        label: Option<String>,
        /// Only nodes in this health class (healthy, degraded, unreachable,
        /// disconnected).
        #[arg(long, value_parser = parse_health)]
        health: Option<steward_proto::domain::NodeHealth>,
        /// Only nodes served by this coordinator replica.
        #[arg(long)]
        replica: Option<String>,
        /// Only nodes whose host needs a reboot (`/run/reboot-required`,
        /// `needs-restarting -r`; the REBOOT column).
        #[arg(long)]
        reboot_required: bool,
    },
    /// One node in detail.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Add or remove roles (lb, k8s-control-plane, k8s-worker, gluster-brick).
    Role {
        #[command(subcommand)]
        command: RoleCommand,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// The audit trail: role changes, nodes connecting, leader changes.
    Events {
        /// Keep streaming new events until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// How many past events to show first.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Floating IPs: define, list, move, remove.
    Vip {
        #[command(subcommand)]
        command: VipCommand,
    },
    /// Make the cluster match a spec file: VIPs, frontends, Kubernetes and
    /// Gluster settings, node roles and labels.
    ///
    /// The spec (TOML; packaging/cluster.example.toml documents every key)
    /// is authoritative for the VIPs when it has a `vip` key (VIPs it does
    /// not list are removed; without a `vip` key they are left alone), for
    /// the cluster settings (`[[frontend]]`, `[kubernetes]`, `[[gluster.volume]]`:
    /// a section left out is removed), and for the roles and labels of the
    /// nodes it lists (other nodes are left alone).
    ///
    /// Prints one line per change, then "applied". A spec with any problem
    /// is refused with every problem listed and nothing is written; a valid
    /// one is written all at once. Applying the same spec again changes
    /// nothing.
    ///
    /// A `kubernetes.version` change of a running cluster is an upgrade and
    /// needs --rollout: `kubeadm upgrade plan` and `apply` on the first
    /// control plane, `kubeadm upgrade node` on the others one at a time,
    /// then the workers drained and upgraded in batches of
    /// --max-unavailable, each node's kubeadm, kubelet and kubectl holds
    /// moving only when its turn comes. The Kubernetes version skew policy
    /// is checked first, by --dry-run too: one minor version at a time, no
    /// minor downgrade.
    ///
    ///   stewardctl apply -f cluster.toml --dry-run
    ///   stewardctl apply -f cluster.toml --rollout --max-unavailable 2 --wait
    Apply {
        /// The spec file; `-` reads it from standard input.
        #[arg(long, short = 'f', value_name = "FILE")]
        file: PathBuf,
        /// Only show what would change; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Roll a change of the cluster settings out node by node through
        /// the maintenance gates (drain, change, converge, health check,
        /// undrain), driven by the leader; prints the rollout id. With
        /// --wait, follows it like `rollout status --watch`.
        #[arg(long)]
        rollout: bool,
        /// Nodes of one role out of service at once (lb nodes: always 1).
        #[arg(long, requires = "rollout", default_value_t = 1)]
        max_unavailable: u32,
        /// Per-role limits that replace --max-unavailable for their role,
        /// e.g. `k8s-worker=3,gluster-brick=1`. lb nodes always go one at a
        /// time; control planes never more at once than etcd's quorum
        /// allows (1 of 3, 2 of 5), whatever is asked.
        #[arg(long, requires = "rollout", value_name = "ROLE=N,...",
              value_parser = parse_role_limits)]
        max_unavailable_per_role: Option<steward_proto::admin::RoleLimits>,
        /// Nodes in the first batches, before the rest.
        #[arg(long, requires = "rollout", default_value_t = 0)]
        canary: u32,
        /// Pause once the canary nodes are done (`rollout resume` goes on).
        #[arg(long, requires = "canary")]
        pause_after_canary: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Rollouts (`apply --rollout`, `rollout reboot`): list, status, pause,
    /// resume, abort.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Gluster volumes as Kubernetes sees them.
    Gluster {
        #[command(subcommand)]
        command: GlusterCommand,
    },
    /// Join tokens: a new node runs the printed `steward-agent join`
    /// command, which gets it a certificate and starts its agent.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Admin and coordinator certificates the cluster refuses.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Certificates for a development cluster.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// A node's journal for one unit Steward manages, read by the node's
    /// agent and streamed through its session.
    ///
    /// Units: steward-agent (default), haproxy, glusterd, kubelet,
    /// containerd; nothing else can be read and nothing but journalctl runs
    /// on the node. Lines longer than 4 KiB are cut. `--follow` prints new
    /// entries until interrupted (Ctrl-C ends the reading on the node too).
    /// stewardctl asks the replica that serves the node's session.
    Logs {
        /// The node's id.
        node: String,
        /// The unit: steward-agent, haproxy, glusterd, kubelet or containerd.
        #[arg(long, short, default_value = "steward-agent")]
        unit: String,
        /// Only entries this recent (90s, 30m, 2h, 1d).
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// Keep printing new entries until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// How many past entries at most (1 to 10000).
        #[arg(long, short = 'n', default_value_t = 200)]
        lines: u32,
    },
    /// Print a shell completion script.
    ///
    /// bash: `source <(stewardctl completion bash)` (or save it as
    /// /usr/share/bash-completion/completions/stewardctl); zsh: save as
    /// `_stewardctl` in a directory of your $fpath; fish: `stewardctl
    /// completion fish > ~/.config/fish/completions/stewardctl.fish`. The
    /// packages install all three. In bash and fish, node ids and VIP names
    /// are completed from the cluster (with the STEWARD_* settings of the
    /// shell).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `--wait` and its `--timeout`, for commands that change desired state.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct WaitArgs {
    /// Wait until every node the change reached has converged it, showing
    /// each node's progress (a bar on a terminal, a line per change
    /// otherwise, on stderr). Exits non-zero, naming the nodes and their
    /// first error, when a node fails to converge or the timeout passes.
    #[arg(long, global = true)]
    pub wait: bool,
    /// How long --wait waits (90s, 10m, 1h).
    #[arg(long, value_parser = parse_duration, default_value = "10m", requires = "wait", global = true)]
    pub timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Every rollout: phase, nodes done, who started it.
    List,
    /// One rollout: its phase, each node's step with the time each step
    /// took, and why it stopped, if it did.
    Status {
        id: String,
        /// Follow it until it is done (exit 0), failed or aborted (exit
        /// non-zero): a bar with an ETA on a terminal, a line per step
        /// otherwise.
        #[arg(long, short)]
        watch: bool,
    },
    /// No node starts its turn; nodes in flight finish.
    Pause { id: String },
    /// Go on after a pause (also the pause after the canary); for a failed
    /// rollout, try the failed node again from the step it failed at (its
    /// converge and health check if its change was written, else its
    /// drain), with that step's timeout started afresh.
    ///
    /// Example, after fixing what `rollout status r1733500000000` showed:
    ///   stewardctl rollout resume r1733500000000 && stewardctl rollout status r1733500000000 --watch
    Resume { id: String },
    /// Reboot nodes as a rollout: each is drained through the gates of its
    /// roles, rebooted by its agent (`systemctl reboot`), waited for until
    /// its agent is back with a new boot id and healthy, and undrained;
    /// then the next (lb nodes one at a time, others --max-unavailable per
    /// role). Prints the rollout id; `rollout status/pause/resume/abort`
    /// work on it. `stewardctl nodes --reboot-required` lists the nodes
    /// that need one.
    #[command(
        group(clap::ArgGroup::new("which").required(true).args(["nodes", "role", "all"])),
        after_help = "Examples:\n  \
            stewardctl rollout reboot --all --only-required --wait\n  \
            stewardctl rollout reboot --role k8s-worker --max-unavailable 2\n  \
            stewardctl rollout reboot --nodes lb-1,lb-2 -o json"
    )]
    Reboot {
        /// These nodes (comma-separated ids).
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Every node with this role.
        #[arg(long, value_parser = parse_role)]
        role: Option<Role>,
        /// Every node.
        #[arg(long)]
        all: bool,
        /// Only the selected nodes that report needing a reboot.
        #[arg(long)]
        only_required: bool,
        /// Nodes of one role rebooting at once (lb nodes: always 1).
        #[arg(long, default_value_t = 1)]
        max_unavailable: u32,
        /// Follow it like `rollout status --watch` until it is done (exit
        /// 0), failed or aborted (exit non-zero).
        #[arg(long)]
        wait: bool,
    },
    /// Stop: nodes not yet changed are undrained and left out, nodes
    /// changed finish their steps and keep the new settings; the others
    /// keep the old ones. No node stays drained by the rollout.
    Abort { id: String },
}

#[derive(Debug, Subcommand)]
pub enum GlusterCommand {
    /// Print the PersistentVolume of a Gluster volume, as the coordinator
    /// applies it once Kubernetes is up: `local` on the volume's FUSE mount
    /// (/mnt/steward/gluster/VOLUME), ReadWriteMany, pinned to the nodes
    /// that mount it. Pipe it to `kubectl apply -f -` to apply it yourself.
    Pv {
        /// The volume's name, as in `[[gluster.volume]]`.
        volume: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token and print the join command for new nodes.
    ///
    /// The token is shown once (the cluster keeps only its hash). It expires
    /// after --ttl and admits one node unless --uses or --reusable says
    /// otherwise. Nodes the cluster already knows join only with a token
    /// made for them (--node).
    Create {
        /// How long it stays valid: e.g. 90s, 30m, 1h, 2d (1 min .. 30 d).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// How many nodes may join with it (at least 1; --reusable for any number).
        #[arg(
            long,
            default_value_t = 1,
            conflicts_with = "reusable",
            value_parser = clap::value_parser!(u32).range(1..)
        )]
        uses: u32,
        /// Any number of nodes may join with it until it expires.
        #[arg(long)]
        reusable: bool,
        /// Only this node id may join with it (required to re-join a known node).
        #[arg(long)]
        node: Option<String>,
        /// A note shown by `token list`.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Tokens that have not been deleted or long expired.
    List,
    /// Delete a token at once (by its id, the part before the dot).
    Rm { id: String },
}

/// `90s`, `30m`, `1h`, `2d`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit (s, m, h, d), e.g. 1h"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use s, m, h or d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(unit)))
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Show one node: facts, health, roles, revisions, address, and how its
    /// last converge run went, resource by resource.
    Show { id: String },
    /// Revoke every certificate the node holds now, e.g. when its key may
    /// have leaked or the machine is retired.
    ///
    /// Its sessions and lease streams end at once (a VIP it holds moves when
    /// the lease runs out), and its certificates can neither reconnect nor
    /// renew. Roles and state are kept. To let the node back in, make a
    /// token for it (`stewardctl token create --node ID`) and run the
    /// printed join command on the node with `--force`.
    Revoke { id: String },
    /// Take a node out of service, through the gates of its roles.
    ///
    /// lb: it stops being a VIP candidate and a VIP it holds moves to
    /// another healthy candidate by planned handover (refused if there is
    /// none). k8s-control-plane: refused if the control planes left in
    /// service would lose etcd quorum. Kubernetes nodes: a control plane
    /// runs `kubectl cordon` and `kubectl drain`. gluster-brick: refused if
    /// a replica set would fall below its quorum. A refusal names the gate
    /// and the numbers. Waits until the node is drained (progress on
    /// stderr) unless --no-wait.
    Drain {
        id: String,
        /// Why, for the audit trail and `stewardctl nodes`.
        #[arg(long, default_value = "")]
        reason: String,
        /// Drain even though a gate refuses (recorded in the event, logged).
        #[arg(long)]
        force: bool,
        /// How long to wait for the node to be drained.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
        /// Return once the drain is recorded; do not wait for it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Put a drained node back into service (VIP candidate again,
    /// `kubectl uncordon`).
    Undrain { id: String },
}

#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    /// Give a node roles, e.g. `stewardctl role add node-1 lb k8s-worker`.
    Add {
        id: String,
        #[arg(required = true, value_parser = parse_role)]
        roles: Vec<Role>,
    },
    /// Take roles from a node.
    Rm {
        id: String,
        #[arg(required = true, value_parser = parse_role)]
        roles: Vec<Role>,
    },
}

#[derive(Debug, Subcommand)]
pub enum VipCommand {
    /// Define a VIP, or change one, e.g.
    /// `stewardctl vip set front --address 198.18.0.100/24`.
    ///
    /// The VIP goes to one healthy candidate (by default every node with the
    /// lb role); the others take over when it fails. Changing a VIP keeps
    /// its holder.
    Set {
        name: String,
        /// ADDRESS/PREFIX, IPv4 or IPv6 (e.g. 198.18.0.100/24).
        #[arg(long)]
        address: String,
        /// Interface to bind on; default: the one with an address in the
        /// VIP's subnet, on each node.
        #[arg(long)]
        interface: Option<String>,
        /// Local health check: haproxy (default: HAProxy answers on its admin
        /// socket), tcp:HOST:PORT, http://HOST:PORT/PATH, or none.
        #[arg(long, default_value = "haproxy")]
        check: String,
        /// Candidate node (repeat); default: every node with the lb role.
        #[arg(long = "candidate")]
        candidates: Vec<String>,
        /// NODE=PRIORITY (repeat); higher wins, default 0.
        #[arg(long = "priority", value_parser = parse_priority)]
        priorities: Vec<(String, u32)>,
        /// Move the VIP to a healthy higher-priority candidate when one
        /// appears (off by default: no flapping back).
        #[arg(long)]
        preempt: bool,
    },
    /// Every VIP: address, holder, epoch and each replica's ack state.
    List,
    /// Move a VIP: its holder lets go and another healthy candidate (or
    /// --to NODE) takes it.
    Move {
        name: String,
        #[arg(long)]
        to: Option<String>,
    },
    /// Remove a VIP; its holder drops the address within a lease.
    Rm { name: String },
}

fn parse_priority(s: &str) -> Result<(String, u32), String> {
    let (node, p) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NODE=PRIORITY, e.g. lb-1=100"))?;
    let p = p
        .parse()
        .map_err(|_| format!("{s:?}: the priority must be a whole number 0..4294967295"))?;
    Ok((node.to_owned(), p))
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Revoke every admin or coordinator certificate issued for NAME so far,
    /// e.g. when its key may have leaked or its holder left.
    ///
    /// NAME is the name the certificate was issued for (`stewardctl pki
    /// issue DIR NAME --kind KIND`; its common name). Every replica refuses
    /// the certificates at once: an admin one on every admin call (its open
    /// --follow streams end too), a coordinator one on the peer API, calling
    /// or answering, and by the agents (told in their desired states: they
    /// drop a replica serving with one). stewardctl itself cannot check
    /// coordinator revocations: after a coordinator key leaks, replace the
    /// CA. Certificates whose notBefore
    /// is up to the second of the revocation are covered, whoever holds
    /// them; the answer (and the event log) prints that second. A
    /// certificate for NAME issued after it is accepted: `stewardctl pki
    /// issue DIR NAME --kind KIND --revoked-at SECOND` issues one. Agent
    /// certificates are revoked per node (`stewardctl node revoke ID`).
    ///
    /// Revoking the admin certificate this command runs with, or the
    /// coordinator certificate of the replica that answers, needs --force.
    ///
    /// Example: stewardctl cert revoke --kind admin alice
    Revoke {
        /// admin or coordinator.
        #[arg(long, value_parser = parse_revocable_kind)]
        kind: RevocableKind,
        /// The certificate's name (its common name).
        name: String,
        /// Revoke it even if it is the certificate of this command or of
        /// the replica that answers.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a cluster CA (DIR/ca.crt, DIR/ca.key) and the key that seals
    /// cluster secrets in etcd (DIR/secrets.key).
    Init {
        dir: PathBuf,
        /// Cluster name, written into the CA's subject.
        #[arg(long, default_value = "default")]
        cluster: String,
    },
    /// Issue DIR/NAME.crt and DIR/NAME.key signed by the CA in DIR.
    ///
    /// An agent's NAME is its node id. Coordinator certificates also serve
    /// TLS: they are valid for NAME, localhost, 127.0.0.1, ::1 and every --san.
    Issue {
        dir: PathBuf,
        name: String,
        #[arg(long, value_parser = parse_kind)]
        kind: IdentityKind,
        /// Extra host name or IP address (coordinator certificates).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// The second `stewardctl cert revoke` printed for NAME: the new
        /// certificate starts after it, so the revocation does not cover it
        /// (otherwise certificates are backdated an hour for clock skew).
        #[arg(long, value_name = "SECOND")]
        revoked_at: Option<i64>,
    },
}

/// Largest admin response stewardctl takes (a page of nodes).
const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

fn parse_health(s: &str) -> Result<steward_proto::domain::NodeHealth, String> {
    use steward_proto::domain::NodeHealth;
    [
        NodeHealth::Healthy,
        NodeHealth::Degraded,
        NodeHealth::Unreachable,
        NodeHealth::Disconnected,
    ]
    .into_iter()
    .find(|h| h.as_str() == s)
    .ok_or_else(|| format!("{s:?}: one of healthy, degraded, unreachable, disconnected"))
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
        .map_err(|e: steward_proto::domain::UnknownRole| e.to_string())
}

fn parse_revocable_kind(s: &str) -> Result<RevocableKind, String> {
    s.parse()
}

fn parse_kind(s: &str) -> Result<IdentityKind, String> {
    s.parse().map_err(|e: pki::PkiError| e.to_string())
}

/// A failure, printed as one line on stderr.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach any coordinator ({0})")]
    Connect(String),
    #[error("{0}")]
    Rpc(String),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("invalid answer from the coordinator: {0}")]
    Invalid(#[from] steward_proto::ProtoError),
    /// `--wait` ended without every node converged.
    #[error("{0}")]
    Wait(String),
}

impl From<tonic::Status> for CtlError {
    fn from(s: tonic::Status) -> Self {
        let hint = match s.code() {
            // A revoked certificate is an admin one; the message says so.
            tonic::Code::PermissionDenied if !s.message().contains("revoked") => {
                " (is this an admin certificate?)"
            }
            _ => "",
        };
        CtlError::Rpc(format!("{}{hint}", s.message()))
    }
}

fn read_pem(what: &str, path: &Option<PathBuf>, env: &str) -> Result<Vec<u8>, CtlError> {
    let path = path
        .as_ref()
        .ok_or_else(|| CtlError::Usage(format!("--{what} (or {env}) is required")))?;
    std::fs::read(path).map_err(|e| CtlError::Usage(format!("--{what} {}: {e}", path.display())))
}

async fn connect(cli: &Cli) -> Result<AdminServiceClient<Channel>, CtlError> {
    connect_to(cli, &cli.endpoints).await
}

/// The first of `urls` that answers, with the CLI's credentials.
pub(crate) async fn connect_to(
    cli: &Cli,
    urls: &[String],
) -> Result<AdminServiceClient<Channel>, CtlError> {
    if urls.is_empty() {
        return Err(CtlError::Usage(
            "--endpoints (or STEWARD_ENDPOINTS) is required, e.g. https://127.0.0.1:7443".into(),
        ));
    }
    let ca = Certificate::from_pem(read_pem("ca", &cli.ca, "STEWARD_CA")?);
    let identity = Identity::from_pem(
        read_pem("cert", &cli.cert, "STEWARD_CERT")?,
        read_pem("key", &cli.key, "STEWARD_KEY")?,
    );
    let mut failures = Vec::new();
    for url in urls {
        match dial_mtls(url, ca.clone(), identity.clone(), Duration::from_secs(2)).await {
            Ok(channel) => {
                // Node pages carry converge reports (64 KiB each at most).
                return Ok(
                    AdminServiceClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES)
                );
            }
            Err(e) => failures.push(format!("{url}: {e}")),
        }
    }
    Err(CtlError::Connect(failures.join("; ")))
}

pub async fn run(cli: Cli) -> Result<(), CtlError> {
    match &cli.command {
        Command::Pki { command } => pki_command(command),
        Command::Completion { shell } => crate::completion::print_script(*shell)
            .map_err(|e| CtlError::Usage(format!("cannot write the script: {e}"))),
        Command::Logs {
            node,
            unit,
            since,
            follow,
            lines,
        } => {
            let since_s = since.map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
            let query = steward_proto::domain::LogQuery::new(unit, since_s, *follow, *lines)
                .map_err(CtlError::Usage)?;
            crate::logs::print_logs(&cli, node, query).await
        }

        Command::Status => {
            let status = connect(&cli)
                .await?
                .status(pb::StatusRequest {})
                .await?
                .into_inner();
            print_status(cli.output, &status);
            Ok(())
        }
        Command::Nodes {
            role,
            label,
            health,
            replica,
            reboot_required,
        } => {
            let filter = pb::ListNodesRequest {
                role: role.map_or(0, |r| steward_proto::convert::role_to_pb(r) as i32),
                label: label.clone().unwrap_or_default(),
                health: health.map_or(0, |h| steward_proto::convert::node_health_to_pb(h) as i32),
                replica: replica.clone().unwrap_or_default(),
                // The table shows no facts; JSON has everything.
                without_facts: cli.output != Output::Json,
                ..Default::default()
            };
            let mut nodes = crate::wait::list_nodes(&mut connect(&cli).await?, filter).await?;
            if *reboot_required {
                nodes.retain(|n| n.facts.reboot_required.is_some());
            }
            print_nodes(cli.output, &nodes);
            Ok(())
        }
        Command::Node {
            command: NodeCommand::Show { id },
        } => {
            let node = connect(&cli)
                .await?
                .get_node(pb::GetNodeRequest {
                    node_id: id.clone(),
                })
                .await?
                .into_inner();
            print_node(cli.output, &NodeView::try_from(node)?);
            Ok(())
        }
        Command::Node {
            command:
                NodeCommand::Drain {
                    id,
                    reason,
                    force,
                    timeout,
                    no_wait,
                },
        } => {
            let mut client = connect(&cli).await?;
            let node = client
                .drain_node(pb::DrainNodeRequest {
                    node_id: id.clone(),
                    reason: reason.clone(),
                    force: *force,
                })
                .await?
                .into_inner();
            let mut node = NodeView::try_from(node)?;
            let started = std::time::Instant::now();
            let mut said = Vec::new();
            while !*no_wait && node.maintenance.as_ref().is_some_and(|m| !m.drained) {
                let pending = node
                    .maintenance
                    .as_ref()
                    .map(|m| m.pending.clone())
                    .unwrap_or_default();
                if pending != said {
                    for line in &pending {
                        eprintln!(
                            "[{:>5.1}s] {id}: waiting: {}",
                            started.elapsed().as_secs_f64(),
                            crate::logs::harmless(line)
                        );
                    }
                    said = pending;
                }
                if started.elapsed() > *timeout {
                    return Err(CtlError::Wait(format!(
                        "{id} still draining after {timeout:?} (it stays out of service; \
                         stewardctl node show {id}): {}",
                        said.join("; ")
                    )));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                let fresh = client
                    .get_node(pb::GetNodeRequest {
                        node_id: id.clone(),
                    })
                    .await?
                    .into_inner();
                node = NodeView::try_from(fresh)?;
            }
            if cli.output == Output::Json {
                println!("{}", node_json(&node));
            } else {
                let m = node.maintenance.as_ref();
                let state = m.map_or("in service", |m| m.state());
                let forced = if m.is_some_and(|m| m.forced) {
                    " (FORCED past its gates)"
                } else {
                    ""
                };
                println!("node {id}: {state}{forced}");
            }
            Ok(())
        }
        Command::Node {
            command: NodeCommand::Undrain { id },
        } => {
            let node = connect(&cli)
                .await?
                .undrain_node(pb::UndrainNodeRequest {
                    node_id: id.clone(),
                })
                .await?
                .into_inner();
            let node = NodeView::try_from(node)?;
            if cli.output == Output::Json {
                println!("{}", node_json(&node));
            } else {
                println!("node {id}: back in service");
            }
            Ok(())
        }
        Command::Node {
            command: NodeCommand::Revoke { id },
        } => {
            let node = connect(&cli)
                .await?
                .revoke_node(pb::RevokeNodeRequest {
                    node_id: id.clone(),
                })
                .await?
                .into_inner();
            let node = NodeView::try_from(node)?;
            if cli.output == Output::Json {
                println!("{}", node_json(&node));
            } else {
                println!(
                    "revoked every certificate of node {id} issued up to {}: its sessions end \
                     now and it cannot reconnect or renew.\n\
                     To let it back in: stewardctl token create --node {id}, then run the \
                     printed join command on the node with --force.",
                    node.revoked_unix_ms.map(format_unix_ms).unwrap_or_default()
                );
            }
            Ok(())
        }
        Command::Cert {
            command: CertCommand::Revoke { kind, name, force },
        } => {
            let revocation = connect(&cli)
                .await?
                .revoke_certificate(pb::RevokeCertificateRequest {
                    kind: steward_proto::convert::revocable_kind_to_pb(*kind) as i32,
                    name: name.clone(),
                    force: *force,
                })
                .await?
                .into_inner();
            let r = CertRevocation::try_from(revocation)?;
            if cli.output == Output::Json {
                println!(
                    "{}",
                    serde_json::json!({
                        "kind": r.kind.as_str(),
                        "name": r.name.as_str(),
                        "revoked_unix_s": r.revoked_unix_s,
                        "at_unix_ms": r.at_unix_ms,
                        "by": r.by,
                    })
                );
            } else {
                println!(
                    "revoked every {kind} certificate of {name:?} issued up to {} (second {}): \
                     every replica refuses them now.\n\
                     A new one: stewardctl pki issue DIR {name} --kind {kind} --revoked-at {}",
                    format_unix_ms(r.at_unix_ms),
                    r.revoked_unix_s,
                    r.revoked_unix_s,
                );
            }
            Ok(())
        }
        Command::Role { command, wait } => {
            let mut client = connect(&cli).await?;
            let baseline = match wait.wait {
                true => Some(crate::wait::baseline(&mut client).await?),
                false => None,
            };
            let node = match command {
                RoleCommand::Add { id, roles } => client.add_roles(change(id, roles)).await?,
                RoleCommand::Rm { id, roles } => client.remove_roles(change(id, roles)).await?,
            }
            .into_inner();
            let node = NodeView::try_from(node)?;
            match cli.output {
                Output::Json => println!("{}", node_json(&node)),
                Output::Table => println!(
                    "{}: roles now [{}] (revision {})",
                    node.id,
                    steward_proto::convert::roles_display(&node.roles),
                    node.desired_revision
                ),
            }
            if let Some(baseline) = baseline {
                let done = crate::wait::wait(&mut client, &baseline, true, wait.timeout).await?;
                eprintln!("{done}");
            }
            Ok(())
        }
        Command::Vip { command } => vip_command(&cli, command).await,
        Command::Token { command } => token_command(&cli, command).await,
        Command::Gluster {
            command: GlusterCommand::Pv { volume },
        } => {
            let pv = connect(&cli)
                .await?
                .gluster_pv(pb::GlusterPvRequest {
                    volume: volume.clone(),
                })
                .await?
                .into_inner();
            if cli.output == Output::Json {
                println!(
                    "{}",
                    serde_json::json!({
                        "volume": volume,
                        "nodes": pv.nodes,
                        "manifest": pv.manifest,
                    })
                );
            } else {
                // Made by the coordinator from node ids and volume names,
                // which are DNS labels; printed as it is so it can be piped.
                print!("{}", pv.manifest);
            }
            Ok(())
        }
        Command::Apply {
            file,
            dry_run,
            rollout,
            max_unavailable,
            max_unavailable_per_role,
            canary,
            pause_after_canary,
            wait,
        } => {
            let spec_toml = read_spec(file)?;
            let mut client = connect(&cli).await?;
            let baseline = match wait.wait && !*dry_run && !*rollout {
                true => Some(crate::wait::baseline(&mut client).await?),
                false => None,
            };
            let outcome = client
                .apply(pb::ApplyRequest {
                    spec_toml,
                    dry_run: *dry_run,
                    rollout: rollout.then(|| {
                        steward_proto::admin::RolloutOptions {
                            max_unavailable: *max_unavailable,
                            canary: *canary,
                            pause_after_canary: *pause_after_canary,
                            per_role: max_unavailable_per_role.unwrap_or_default(),
                        }
                        .into()
                    }),
                })
                .await?
                .into_inner();
            print!("{}", apply_output(cli.output, &outcome, *dry_run));
            if !outcome.rollout_id.is_empty() && wait.wait {
                return crate::rollout::watch(&mut client, cli.output, &outcome.rollout_id).await;
            }
            if let Some(baseline) = baseline {
                let wrote = outcome.applied && !outcome.changes.is_empty();
                let done = crate::wait::wait(&mut client, &baseline, wrote, wait.timeout).await?;
                eprintln!("{done}");
            }
            Ok(())
        }
        Command::Rollout { command } => rollout_command(&cli, command).await,
        Command::Events { follow, limit } => {
            let mut stream = connect(&cli)
                .await?
                .events(pb::EventsRequest {
                    follow: *follow,
                    limit: *limit,
                })
                .await?
                .into_inner();
            while let Some(event) = stream.message().await? {
                let event = Event::try_from(event)?;
                match cli.output {
                    Output::Json => println!("{}", event_json(&event)),
                    Output::Table => println!(
                        "{}  {:<18} {:<12} {}",
                        format_unix_ms(event.at_unix_ms),
                        event.kind.as_str(),
                        event.node.as_ref().map(|n| n.as_str()).unwrap_or("-"),
                        crate::logs::harmless(&event.message)
                    ),
                }
            }
            Ok(())
        }
    }
}

/// Node ids or VIP names, for the completion scripts
/// ([`crate::ctl_complete`]).
pub async fn complete_names(
    cli: &Cli,
    names: crate::completion::Names,
) -> Result<Vec<String>, CtlError> {
    let mut client = connect(cli).await?;
    Ok(match names {
        crate::completion::Names::Nodes => {
            let filter = pb::ListNodesRequest {
                without_facts: true,
                ..Default::default()
            };
            crate::wait::list_nodes(&mut client, filter)
                .await?
                .into_iter()
                .map(|n| n.id.as_str().to_owned())
                .collect()
        }
        crate::completion::Names::Vips => client
            .list_vips(pb::ListVipsRequest {})
            .await?
            .into_inner()
            .vips
            .into_iter()
            .filter_map(|v| v.spec.map(|s| s.name))
            .collect(),
    })
}

fn token_json(t: &pb::TokenInfo) -> serde_json::Value {
    json!({
        "id": t.id,
        "created_unix_ms": t.created_unix_ms,
        "expires_unix_ms": t.expires_unix_ms,
        "uses": t.uses,
        "used_by": t.used_by,
        "node": t.node_id,
        "description": t.description,
        "created_by": t.created_by,
    })
}

/// The command a new node runs, one `--coordinator` per replica that
/// serves joins.
pub fn join_command(created: &pb::CreateTokenResponse) -> String {
    let mut cmd = format!("steward-agent join --token {}", created.token);
    for url in &created.join_urls {
        cmd.push_str(&format!(" --coordinator {url}"));
    }
    cmd.push_str(&format!(" --ca-hash {}", created.ca_hash));
    cmd
}

async fn token_command(cli: &Cli, command: &TokenCommand) -> Result<(), CtlError> {
    let mut client = connect(cli).await?;
    match command {
        TokenCommand::Create {
            ttl,
            uses,
            reusable,
            node,
            description,
        } => {
            let created = client
                .create_token(pb::CreateTokenRequest {
                    ttl_s: ttl.as_secs(),
                    uses: if *reusable { 0 } else { *uses },
                    node_id: node.clone().unwrap_or_default(),
                    description: description.clone(),
                })
                .await?
                .into_inner();
            let info = created.info.clone().unwrap_or_default();
            match cli.output {
                Output::Json => println!(
                    "{}",
                    json!({
                        "token": created.token,
                        "ca_hash": created.ca_hash,
                        "join_urls": created.join_urls,
                        "join_command": join_command(&created),
                        "info": token_json(&info),
                    })
                ),
                Output::Table => {
                    let uses = match info.uses {
                        0 => "any number of nodes".to_owned(),
                        1 => "one node".to_owned(),
                        n => format!("{n} nodes"),
                    };
                    println!(
                        "token {} admits {uses}{} until {}. On each new node, as root:\n\n  {}\n",
                        info.id,
                        if info.node_id.is_empty() {
                            String::new()
                        } else {
                            format!(" (only {})", info.node_id)
                        },
                        format_unix_ms(info.expires_unix_ms),
                        join_command(&created)
                    );
                }
            }
        }
        TokenCommand::List => {
            let tokens = client
                .list_tokens(pb::ListTokensRequest {})
                .await?
                .into_inner()
                .tokens;
            match cli.output {
                Output::Json => println!(
                    "{}",
                    serde_json::Value::Array(tokens.iter().map(token_json).collect())
                ),
                Output::Table => {
                    println!(
                        "{:<8} {:<24} {:<7} {:<20} {:<14} DESCRIPTION",
                        "ID", "EXPIRES", "USES", "USED BY", "NODE"
                    );
                    let now = unix_ms();
                    for t in &tokens {
                        let expires = if t.expires_unix_ms <= now {
                            format!("expired {}", format_unix_ms(t.expires_unix_ms))
                        } else {
                            format_unix_ms(t.expires_unix_ms)
                        };
                        let uses = match t.uses {
                            0 => format!("{}/-", t.used_by.len()),
                            n => format!("{}/{n}", t.used_by.len()),
                        };
                        let used_by = if t.used_by.is_empty() {
                            "-".to_owned()
                        } else {
                            t.used_by.join(",")
                        };
                        let node = if t.node_id.is_empty() {
                            "-"
                        } else {
                            &t.node_id
                        };
                        println!(
                            "{:<8} {:<24} {:<7} {:<20} {:<14} {}",
                            t.id, expires, uses, used_by, node, t.description
                        );
                    }
                }
            }
        }
        TokenCommand::Rm { id } => {
            client
                .delete_token(pb::DeleteTokenRequest { id: id.clone() })
                .await?;
            match cli.output {
                Output::Json => println!("{}", json!({"deleted": id})),
                Output::Table => println!("token {id} deleted"),
            }
        }
    }
    Ok(())
}

async fn vip_command(cli: &Cli, command: &VipCommand) -> Result<(), CtlError> {
    let mut client = connect(cli).await?;
    match command {
        VipCommand::Set {
            name,
            address,
            interface,
            check,
            candidates,
            priorities,
            preempt,
        } => {
            let vip = client
                .set_vip(pb::VipSpec {
                    name: name.clone(),
                    address: address.clone(),
                    interface: interface.clone().unwrap_or_default(),
                    check: check.clone(),
                    candidates: candidates.clone(),
                    priority: priorities.iter().cloned().collect(),
                    preempt: *preempt,
                })
                .await?
                .into_inner();
            print_vips(cli.output, &[vip]);
        }
        VipCommand::List => {
            let vips = client.list_vips(pb::ListVipsRequest {}).await?.into_inner();
            print_vips(cli.output, &vips.vips);
        }
        VipCommand::Move { name, to } => {
            let vip = client
                .move_vip(pb::MoveVipRequest {
                    name: name.clone(),
                    to: to.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            match cli.output {
                Output::Json => println!("{}", vip_json(&vip)),
                Output::Table => println!(
                    "VIP {name}: {} asked to let go of epoch {}; `stewardctl vip list` shows the new holder",
                    vip.owner, vip.epoch
                ),
            }
        }
        VipCommand::Rm { name } => {
            client
                .remove_vip(pb::RemoveVipRequest { name: name.clone() })
                .await?;
            if cli.output == Output::Table {
                println!("VIP {name} removed");
            } else {
                println!("{}", json!({"removed": name}));
            }
        }
    }
    Ok(())
}

/// The spec at `path`, or standard input for `-`.
fn read_spec(path: &Path) -> Result<String, CtlError> {
    use std::io::Read;
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| CtlError::Usage(format!("standard input: {e}")))?;
        return Ok(text);
    }
    std::fs::read_to_string(path).map_err(|e| CtlError::Usage(format!("{}: {e}", path.display())))
}

async fn rollout_command(cli: &Cli, command: &RolloutCommand) -> Result<(), CtlError> {
    use pb::control_rollout_request::Action;
    let mut client = connect(cli).await?;
    let (id, action) = match command {
        RolloutCommand::List => {
            let list = client
                .list_rollouts(pb::ListRolloutsRequest {})
                .await?
                .into_inner();
            crate::rollout::print_list(cli.output, &list);
            return Ok(());
        }
        RolloutCommand::Status { id, watch: true } => {
            return crate::rollout::watch(&mut client, cli.output, id).await;
        }
        RolloutCommand::Status { id, watch: false } => {
            let r = client
                .get_rollout(pb::GetRolloutRequest { id: id.clone() })
                .await?
                .into_inner();
            crate::rollout::print(cli.output, &r);
            return Ok(());
        }
        RolloutCommand::Reboot {
            nodes,
            role,
            all,
            only_required,
            max_unavailable,
            wait,
        } => {
            if *max_unavailable == 0 {
                return Err(CtlError::Usage(
                    "--max-unavailable 0: at least one node must be able to reboot".into(),
                ));
            }
            let r = client
                .reboot_rollout(pb::RebootRolloutRequest {
                    node_ids: nodes.clone(),
                    role: role.map_or(0, |r| steward_proto::convert::role_to_pb(r) as i32),
                    all: *all,
                    only_required: *only_required,
                    options: Some(pb::RolloutOptions {
                        max_unavailable: *max_unavailable,
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner();
            if cli.output == Output::Table {
                println!(
                    "rollout {} created: {} node(s) in {} batches: {} \
                     (stewardctl rollout status {} --watch)",
                    r.id,
                    r.nodes_total,
                    r.batches,
                    r.changes.join("; "),
                    r.id
                );
            }
            if *wait {
                return crate::rollout::watch(&mut client, cli.output, &r.id).await;
            }
            if cli.output == Output::Json {
                crate::rollout::print(cli.output, &r);
            }
            return Ok(());
        }
        RolloutCommand::Pause { id } => (id, Action::Pause),
        RolloutCommand::Resume { id } => (id, Action::Resume),
        RolloutCommand::Abort { id } => (id, Action::Abort),
    };
    let r = client
        .control_rollout(pb::ControlRolloutRequest {
            id: id.clone(),
            action: action as i32,
        })
        .await?
        .into_inner();
    crate::rollout::print(cli.output, &r);
    Ok(())
}

/// What `stewardctl apply` prints: the changes, then whether they were
/// written (or the rollout that will write them).
fn apply_output(output: Output, outcome: &pb::ApplyResponse, dry_run: bool) -> String {
    if output == Output::Json {
        let mut out = json!({"changes": outcome.changes, "applied": outcome.applied, "dry_run": dry_run, "warnings": outcome.warnings});
        // Only when one was created: plain applies answer as they did.
        if !outcome.rollout_id.is_empty() {
            out["rollout"] = outcome.rollout_id.clone().into();
        }
        return format!("{out}\n");
    }
    if !outcome.rollout_id.is_empty() {
        let mut text = String::new();
        for change in &outcome.changes {
            text.push_str(change);
            text.push('\n');
        }
        let id = &outcome.rollout_id;
        text.push_str(&format!(
            "rollout {id} created: the leader applies it node by node \
             (stewardctl rollout status {id} --watch)\n"
        ));
        return text;
    }
    // Warnings go to stderr: stdout stays the list of changes.
    for warning in &outcome.warnings {
        eprintln!("warning: {warning}");
    }
    let mut text = String::new();
    if outcome.changes.is_empty() {
        text.push_str("no changes\n");
    }
    for change in &outcome.changes {
        text.push_str(change);
        text.push('\n');
    }
    text.push_str(if outcome.applied {
        "applied\n"
    } else {
        "dry run: nothing written\n"
    });
    text
}

fn vip_json(v: &pb::Vip) -> serde_json::Value {
    let spec = v.spec.clone().unwrap_or_default();
    json!({
        "name": spec.name,
        "address": spec.address,
        "interface": (!spec.interface.is_empty()).then_some(&spec.interface),
        "check": spec.check,
        "candidates": spec.candidates,
        "priority": spec.priority,
        "preempt": spec.preempt,
        "owner": (!v.owner.is_empty()).then_some(&v.owner),
        "epoch": v.epoch,
        "move_requested": v.move_requested,
        "replicas": v.replicas.iter().map(|r| json!({
            "replica": r.replica_id,
            "reachable": !r.unreachable,
            "acking": r.acking,
            "last_ack_ms_ago": (r.last_ack_ms_ago > 0).then_some(r.last_ack_ms_ago),
            "mark": (!r.mark.is_empty()).then_some(&r.mark),
        })).collect::<Vec<_>>(),
    })
}

fn print_vips(output: Output, vips: &[pb::Vip]) {
    if output == Output::Json {
        let all: Vec<_> = vips.iter().map(vip_json).collect();
        println!("{}", serde_json::Value::Array(all));
        return;
    }
    let rows: Vec<Vec<String>> = vips
        .iter()
        .map(|v| {
            let spec = v.spec.clone().unwrap_or_default();
            let acks = v
                .replicas
                .iter()
                .map(|r| {
                    let state = if r.unreachable {
                        "unreachable".to_owned()
                    } else if !r.mark.is_empty() {
                        r.mark.clone()
                    } else if r.acking && r.last_ack_ms_ago > 0 {
                        format!("ack {}ms ago", r.last_ack_ms_ago)
                    } else if r.acking {
                        "waiting".to_owned()
                    } else {
                        "not acking".to_owned()
                    };
                    format!("{}: {state}", r.replica_id)
                })
                .collect::<Vec<_>>()
                .join(", ");
            vec![
                spec.name,
                spec.address,
                if v.owner.is_empty() {
                    "-".into()
                } else if v.move_requested {
                    format!("{} (moving)", v.owner)
                } else {
                    v.owner.clone()
                },
                v.epoch.to_string(),
                spec.check,
                acks,
            ]
        })
        .collect();
    print_table(
        &["NAME", "ADDRESS", "HOLDER", "EPOCH", "CHECK", "REPLICAS"],
        &rows,
    );
}

fn change(id: &str, roles: &[Role]) -> pb::ChangeRolesRequest {
    pb::ChangeRolesRequest {
        node_id: id.to_owned(),
        roles: roles_to_pb(&roles.iter().copied().collect()),
    }
}

/// Waits until second `revoked_at` has passed, so a certificate starting
/// after it is valid at once; refuses a second more than a minute ahead
/// (not one a revocation printed).
fn wait_past_second(revoked_at: i64) -> Result<(), CtlError> {
    let now_ms = i64::try_from(unix_ms()).unwrap_or(i64::MAX);
    let start_ms = revoked_at.saturating_add(1).saturating_mul(1000);
    if start_ms - now_ms > 60_000 {
        return Err(CtlError::Usage(format!(
            "--revoked-at {revoked_at} is in the future ({}); give the second \
             `stewardctl cert revoke` printed",
            format_unix_ms(u64::try_from(revoked_at.saturating_mul(1000)).unwrap_or(0))
        )));
    }
    if start_ms > now_ms {
        std::thread::sleep(Duration::from_millis(
            u64::try_from(start_ms - now_ms).unwrap_or(0),
        ));
    }
    Ok(())
}

fn pki_command(command: &PkiCommand) -> Result<(), CtlError> {
    match command {
        PkiCommand::Init { dir, cluster } => {
            let (crt, key) = pki::init_ca(dir, cluster)?;
            println!("wrote {} and {}", crt.display(), key.display());
            let secrets = pki::init_secrets_key(dir)?;
            println!(
                "wrote {} (give every coordinator this file as [secrets] key_file)",
                secrets.display()
            );
        }
        PkiCommand::Issue {
            dir,
            name,
            kind,
            sans,
            revoked_at,
        } => {
            if let Some(revoked_at) = revoked_at {
                wait_past_second(*revoked_at)?;
            }
            let (crt, key) = pki::issue_after(dir, name, *kind, sans, *revoked_at)?;
            println!(
                "wrote {} and {} ({kind} {name:?})",
                crt.display(),
                key.display()
            );
        }
    }
    Ok(())
}

pub use steward_proto::domain::format_unix_ms;

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Connects to `url` over mutual TLS: the server must have a certificate
/// from `ca` valid for the URL's host; we present `identity`. (The
/// daemons' dial is `steward-runtime`'s, which stewardctl does not link.)
async fn dial_mtls(
    url: &str,
    ca: Certificate,
    identity: Identity,
    connect_timeout: Duration,
) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| e.to_string())?;
    let host = endpoint
        .uri()
        .host()
        .ok_or("URL has no host")?
        .trim_matches(['[', ']'])
        .to_owned();
    let tls = ClientTlsConfig::new()
        .ca_certificate(ca)
        .identity(identity)
        .domain_name(host);
    let mut message = String::new();
    match endpoint.tls_config(tls) {
        Ok(endpoint) => match endpoint
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .connect()
            .await
        {
            Ok(channel) => return Ok(channel),
            Err(e) => {
                // Every cause, in one line.
                let mut cause: Option<&dyn std::error::Error> = Some(&e);
                while let Some(c) = cause {
                    if !message.is_empty() {
                        message.push_str(": ");
                    }
                    message.push_str(&c.to_string());
                    cause = c.source();
                }
            }
        },
        Err(e) => message = e.to_string(),
    }
    Err(message)
}

/// `--max-unavailable-per-role`: every problem named.
fn parse_role_limits(text: &str) -> Result<steward_proto::admin::RoleLimits, String> {
    text.parse()
}

/// One volume of a node's gluster report: bricks online, pending heals.
fn gluster_line(v: &steward_proto::domain::GlusterVolumeReport) -> String {
    if let Some(error) = &v.error {
        if v.bricks.is_empty() {
            return format!("unreadable: {error}");
        }
    }
    let online = v.bricks.iter().filter(|b| b.online).count();
    let heals = match v.pending_heals() {
        Some(n) => format!("{n} entries pending heal"),
        None => "pending heals unknown".into(),
    };
    format!("{online} of {} bricks online, {heals}", v.bricks.len())
}

fn ago(ms: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let secs = unix_ms().saturating_sub(ms) as f64 / 1000.0;
    if secs < 120.0 {
        format!("{secs:.1}s ago")
    } else if secs < 7200.0 {
        format!("{:.0}m ago", secs / 60.0)
    } else {
        format!("{:.1}h ago", secs / 3600.0)
    }
}

fn roles_json(node: &NodeView) -> Vec<&'static str> {
    node.roles.iter().map(|r| r.as_str()).collect()
}

fn node_json(node: &NodeView) -> serde_json::Value {
    json!({
        "id": node.id.as_str(),
        "roles": roles_json(node),
        "health": node.health.as_str(),
        "last_seen": if node.last_seen_unix_ms == 0 { serde_json::Value::Null } else { node.last_seen_unix_ms.into() },
        "replica": node.replica,
        "address": node.address.map(|a| a.to_string()),
        "desired_revision": node.desired_revision,
        "applied_revision": node.applied_revision,
        "converge": node.converge.as_ref().map(converge_json),
        "facts": node.facts,
        "reboot_required": node.facts.reboot_required,
        "boot_id": node.facts.boot_id,
        "last_health": node.last_health,
        "revoked": node.revoked_unix_ms,
        "maintenance": node.maintenance.as_ref().map(|m| json!({
            "state": m.state(),
            "reason": m.reason,
            "by": m.by,
            "since": m.since_unix_ms,
            "forced": m.forced,
            "pending": m.pending,
        })),
        "gluster": node.gluster.as_ref().map(|g| g.volumes.iter().map(|v| json!({
            "volume": v.volume,
            "pending_heals": v.pending_heals(),
            "bricks": v.bricks,
            "error": v.error,
        })).collect::<Vec<_>>()),
    })
}

/// How many resources of a report ended in each status.
#[derive(Debug, Default, PartialEq, Eq)]
struct ConvergeCounts {
    ok: usize,
    changed: usize,
    failed: usize,
    not_applicable: usize,
    skipped: usize,
}

impl ConvergeCounts {
    fn of(report: &ConvergeReport) -> Self {
        let mut c = Self::default();
        for r in &report.resources {
            match r.status {
                ResourceStatus::Ok => c.ok += 1,
                ResourceStatus::Changed => c.changed += 1,
                ResourceStatus::Failed => c.failed += 1,
                ResourceStatus::NotApplicable => c.not_applicable += 1,
                ResourceStatus::Skipped => c.skipped += 1,
            }
        }
        c
    }
}

fn converge_json(report: &ConvergeReport) -> serde_json::Value {
    let c = ConvergeCounts::of(report);
    json!({
        "revision": report.revision,
        "finished": report.finished_unix_ms,
        "duration_ms": report.duration_ms,
        "converged": report.converged(),
        "counts": {
            "ok": c.ok,
            "changed": c.changed,
            "failed": c.failed,
            "not_applicable": c.not_applicable,
            "skipped": c.skipped,
        },
        "resources": report.resources.iter().map(|r| json!({
            "id": r.id,
            "status": r.status.as_str(),
            "detail": r.detail,
            "since": r.since_unix_ms,
        })).collect::<Vec<_>>(),
    })
}

/// The CONVERGED column: `yes`, `3 failed`, `-` without a report; a
/// report for an older revision than the desired one says which.
fn converged_cell(node: &NodeView) -> String {
    let Some(report) = &node.converge else {
        return "-".into();
    };
    let c = ConvergeCounts::of(report);
    let state = if c.failed > 0 {
        format!("{} failed", c.failed)
    } else if report.converged() {
        "yes".into()
    } else {
        format!("{} skipped", c.skipped)
    };
    if report.revision < node.desired_revision {
        format!("{state} (revision {})", report.revision)
    } else {
        state
    }
}

/// `converged revision 12 in 840 ms: 10 ok, 1 changed, 1 failed, 0 not applicable`.
fn converge_summary(report: &ConvergeReport) -> String {
    let c = ConvergeCounts::of(report);
    let mut line = format!(
        "converged revision {} in {} ms: {} ok, {} changed, {} failed, {} not applicable",
        report.revision, report.duration_ms, c.ok, c.changed, c.failed, c.not_applicable
    );
    if c.skipped > 0 {
        line.push_str(&format!(", {} skipped", c.skipped));
    }
    line
}

/// One line per resource; details on one line.
fn converge_rows(report: &ConvergeReport) -> Vec<Vec<String>> {
    report
        .resources
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.status.to_string(),
                ago(r.since_unix_ms),
                r.detail.split_whitespace().collect::<Vec<_>>().join(" "),
            ]
        })
        .collect()
}

fn event_json(e: &Event) -> serde_json::Value {
    json!({
        "revision": e.revision,
        "at": e.at_unix_ms,
        "kind": e.kind.as_str(),
        "node": e.node.as_ref().map(|n| n.as_str()),
        "replica": e.replica,
        "message": e.message,
    })
}

/// Prints rows with columns padded to their widest cell.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        // Cells may carry a node's text: no control characters reach the
        // terminal.
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{:<w$}", crate::logs::harmless(c)))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn print_status(output: Output, s: &pb::StatusResponse) {
    if output == Output::Json {
        let replicas: Vec<_> = s
            .replicas
            .iter()
            .map(|r| {
                json!({"id": r.id, "address": r.address, "version": r.version,
                       "leader": r.leader,
                       "connected_agents": (!r.agents_unknown).then_some(r.connected_agents)})
            })
            .collect();
        println!(
            "{}",
            json!({"cluster": s.cluster, "leader": (!s.leader_id.is_empty()).then_some(&s.leader_id),
                   "etcd_reachable": s.etcd_reachable, "served_by": s.served_by, "replicas": replicas})
        );
        return;
    }
    println!("cluster:  {}", s.cluster);
    println!(
        "leader:   {}",
        if s.leader_id.is_empty() {
            "none"
        } else {
            &s.leader_id
        }
    );
    println!(
        "etcd:     {}",
        if s.etcd_reachable {
            "reachable"
        } else {
            "UNREACHABLE"
        }
    );
    println!("answered: {}", s.served_by);
    println!();
    let rows: Vec<Vec<String>> = s
        .replicas
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                if r.leader {
                    "leader".into()
                } else {
                    "follower".into()
                },
                r.address.clone(),
                if r.agents_unknown {
                    // The replica did not answer the one that did.
                    "?".into()
                } else {
                    r.connected_agents.to_string()
                },
                r.version.clone(),
            ]
        })
        .collect();
    print_table(&["REPLICA", "ROLE", "ADDRESS", "AGENTS", "VERSION"], &rows);
    if s.replicas.iter().any(|r| r.agents_unknown) {
        println!();
        println!("?: the replica did not answer {} in time", s.served_by);
    }
}

fn print_nodes(output: Output, nodes: &[NodeView]) {
    if output == Output::Json {
        let all: Vec<_> = nodes.iter().map(node_json).collect();
        println!("{}", serde_json::Value::Array(all));
        return;
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.id.to_string(),
                if n.roles.is_empty() {
                    "-".into()
                } else {
                    steward_proto::convert::roles_display(&n.roles)
                },
                match &n.maintenance {
                    Some(m) => format!("{}, {}", n.health, m.state()),
                    None => n.health.to_string(),
                },
                n.address
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "-".into()),
                converged_cell(n),
                ago(n.last_seen_unix_ms),
                n.replica.clone().unwrap_or_else(|| "-".into()),
                match &n.facts.reboot_required {
                    Some(_) => "needed".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    print_table(
        &[
            "NODE",
            "ROLES",
            "HEALTH",
            "ADDRESS",
            "CONVERGED",
            "LAST SEEN",
            "REPLICA",
            "REBOOT",
        ],
        &rows,
    );
}

/// `n` with every string its agent supplied made safe for a terminal
/// (facts, converge details): a node's text must not be able to clear the
/// screen, retitle the window or write the clipboard. JSON output stays
/// exact.
fn harmless_view(n: &NodeView) -> NodeView {
    use crate::logs::harmless;
    let mut n = n.clone();
    let facts = &mut n.facts;
    for text in [&mut facts.hostname, &mut facts.os, &mut facts.kernel] {
        *text = harmless(text);
    }
    for d in &mut facts.disks {
        d.mount_point = harmless(&d.mount_point);
    }
    for i in &mut facts.interfaces {
        i.name = harmless(&i.name);
        i.mac = harmless(&i.mac);
        for a in &mut i.addresses {
            *a = harmless(a);
        }
    }
    facts.boot_id = harmless(&facts.boot_id);
    if let Some(r) = &mut facts.reboot_required {
        r.source = harmless(&r.source);
        for p in &mut r.packages {
            *p = harmless(p);
        }
    }
    if let Some(report) = &mut n.converge {
        for r in &mut report.resources {
            r.id = harmless(&r.id);
            r.detail = harmless(&r.detail);
        }
    }
    n.replica = n.replica.as_deref().map(harmless);
    if let Some(m) = &mut n.maintenance {
        m.reason = harmless(&m.reason);
        m.by = harmless(&m.by);
    }
    for v in n.gluster.iter_mut().flat_map(|g| &mut g.volumes) {
        v.volume = harmless(&v.volume);
        v.error = v.error.as_deref().map(harmless);
        for b in &mut v.bricks {
            b.brick = harmless(&b.brick);
        }
    }
    n
}

fn print_node(output: Output, n: &NodeView) {
    if output == Output::Json {
        println!("{}", node_json(n));
        return;
    }
    let n = &harmless_view(n);
    let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
    println!("node:      {}", n.id);
    println!(
        "roles:     {}",
        if n.roles.is_empty() {
            "-".into()
        } else {
            steward_proto::convert::roles_display(&n.roles)
        }
    );
    println!("health:    {}", n.health);
    println!(
        "address:   {}",
        n.address
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "last seen: {} ({})",
        format_unix_ms(n.last_seen_unix_ms),
        ago(n.last_seen_unix_ms)
    );
    println!("replica:   {}", n.replica.as_deref().unwrap_or("-"));
    if let Some(at) = n.revoked_unix_ms {
        println!(
            "revoked:   {} (certificates issued up to then are refused)",
            format_unix_ms(at)
        );
    }
    if let Some(m) = &n.maintenance {
        println!(
            "service:   {} since {} by {}{}{}",
            m.state(),
            format_unix_ms(m.since_unix_ms),
            m.by,
            if m.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", m.reason)
            },
            if m.forced {
                " (FORCED past its gates)"
            } else {
                ""
            }
        );
        for p in &m.pending {
            println!("           waiting: {p}");
        }
    }
    for v in n.gluster.iter().flat_map(|g| &g.volumes) {
        println!("gluster:   volume {}: {}", v.volume, gluster_line(v));
    }
    if let Some(r) = &n.facts.reboot_required {
        println!(
            "reboot:    needed since {} ({}){}",
            format_unix_ms(r.since_unix_ms),
            r.source,
            if r.packages.is_empty() {
                String::new()
            } else {
                format!(": {}", r.packages.join(", "))
            }
        );
    }
    if !n.facts.boot_id.is_empty() {
        println!("boot:      {}", n.facts.boot_id);
    }
    println!(
        "revision:  desired {} / applied {}",
        n.desired_revision, n.applied_revision
    );
    println!(
        "host:      {} ({}, kernel {})",
        n.facts.hostname, n.facts.os, n.facts.kernel
    );
    println!(
        "cpus:      {}  memory: {}",
        n.facts.cpus,
        gib(n.facts.memory_bytes)
    );
    println!(
        "load:      {:.2}  memory used: {}  fullest disk: {:.0}%",
        n.last_health.load1,
        gib(n.last_health.memory_used_bytes),
        n.last_health.max_disk_used_fraction * 100.0
    );
    for d in &n.facts.disks {
        println!(
            "disk:      {} {} free of {}",
            d.mount_point,
            gib(d.available_bytes),
            gib(d.total_bytes)
        );
    }
    for i in &n.facts.interfaces {
        println!("interface: {} {} {}", i.name, i.mac, i.addresses.join(" "));
    }
    println!();
    match &n.converge {
        None => println!("converge:  no report yet"),
        Some(report) => {
            println!(
                "converge:  {} ({})",
                converge_summary(report),
                ago(report.finished_unix_ms)
            );
            if !report.resources.is_empty() {
                println!();
                print_table(
                    &["RESOURCE", "STATUS", "SINCE", "DETAIL"],
                    &converge_rows(report),
                );
            }
        }
    }
}

/// Reads the health enum of a raw node (for tests that use the wire types).
pub fn health_name(value: i32) -> Option<&'static str> {
    node_health_from_pb(value).ok().map(|h| h.as_str())
}

/// True when `path` holds a CA created by `pki init`.
pub fn has_ca(dir: &Path) -> bool {
    let (crt, key) = pki::ca_paths(dir);
    crt.exists() && key.exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(statuses: &[ResourceStatus]) -> ConvergeReport {
        ConvergeReport {
            revision: 12,
            finished_unix_ms: 1,
            duration_ms: 840,
            resources: statuses
                .iter()
                .enumerate()
                .map(|(i, s)| steward_proto::converge::ResourceState {
                    id: format!("file:/etc/r{i}"),
                    status: *s,
                    detail: "line one\n  line two".into(),
                    since_unix_ms: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn converge_reports_read_at_a_glance() {
        use ResourceStatus::*;
        let r = report(&[Ok, Ok, Changed, Failed, NotApplicable]);
        assert_eq!(
            converge_summary(&r),
            "converged revision 12 in 840 ms: 2 ok, 1 changed, 1 failed, 1 not applicable"
        );
        assert_eq!(converge_rows(&r)[3][3], "line one line two");
        let mut node = NodeView {
            id: steward_proto::domain::NodeId::new("n1").unwrap(),
            roles: Default::default(),
            health: steward_proto::domain::NodeHealth::Healthy,
            last_seen_unix_ms: 0,
            replica: None,
            facts: Default::default(),
            last_health: Default::default(),
            desired_revision: 12,
            applied_revision: 12,
            address: None,
            converge: None,
            revoked_unix_ms: None,
            maintenance: None,
            gluster: None,
        };
        assert_eq!(converged_cell(&node), "-");
        node.converge = Some(r);
        assert_eq!(converged_cell(&node), "1 failed");
        node.converge = Some(report(&[Ok, Changed, NotApplicable]));
        assert_eq!(converged_cell(&node), "yes");
        node.desired_revision = 13;
        assert_eq!(converged_cell(&node), "yes (revision 12)");
        let json = node_json(&node);
        assert_eq!(json["converge"]["counts"]["changed"], 1);
        assert_eq!(json["converge"]["converged"], true);
        assert!(json["address"].is_null());
    }

    #[test]
    fn apply_prints_changes_then_the_outcome() {
        let outcome = pb::ApplyResponse {
            changes: vec!["vip front: add 198.18.0.200/24".into()],
            applied: true,
            warnings: vec![],
            rollout_id: String::new(),
        };
        assert_eq!(
            apply_output(Output::Table, &outcome, false),
            "vip front: add 198.18.0.200/24\napplied\n"
        );
        let dry = pb::ApplyResponse {
            changes: vec![],
            applied: false,
            warnings: vec![],
            rollout_id: String::new(),
        };
        assert_eq!(
            apply_output(Output::Table, &dry, true),
            "no changes\ndry run: nothing written\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&apply_output(Output::Json, &outcome, false)).unwrap();
        assert_eq!(json["changes"][0], "vip front: add 198.18.0.200/24");
        assert_eq!(json["applied"], true);
        assert_eq!(json["dry_run"], false);
        let cli = Cli::try_parse_from(["stewardctl", "apply", "-f", "-", "--dry-run"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Apply { ref file, dry_run: true, .. } if file == Path::new("-")
        ));
    }

    #[test]
    fn wait_flags_parse_where_desired_state_changes() {
        let cli = Cli::try_parse_from([
            "stewardctl",
            "role",
            "add",
            "n1",
            "lb",
            "--wait",
            "--timeout",
            "30s",
        ])
        .unwrap();
        match cli.command {
            Command::Role { wait, .. } => {
                assert!(wait.wait);
                assert_eq!(wait.timeout, Duration::from_secs(30));
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["stewardctl", "apply", "-f", "c.toml", "--wait"]).unwrap();
        match cli.command {
            Command::Apply { wait, .. } => assert_eq!(wait.timeout, Duration::from_secs(600)),
            other => panic!("{other:?}"),
        }
        let err = Cli::try_parse_from(["stewardctl", "role", "rm", "n1", "lb", "--timeout", "1m"])
            .unwrap_err();
        assert!(err.to_string().contains("--wait"), "{err}");
    }

    #[test]
    fn cli_rejects_unknown_roles_before_any_connection() {
        let err = Cli::try_parse_from(["stewardctl", "role", "add", "n1", "database"]).unwrap_err();
        assert!(err.to_string().contains("unknown role"), "{err}");
        let ok = Cli::try_parse_from(["stewardctl", "role", "add", "n1", "lb", "k8s-worker"]);
        assert!(ok.is_ok());
    }

    #[test]
    fn token_uses_is_at_least_one_and_never_means_unlimited() {
        let err =
            Cli::try_parse_from(["stewardctl", "token", "create", "--uses", "0"]).unwrap_err();
        assert!(err.to_string().contains("not in 1.."), "{err}");
        let err =
            Cli::try_parse_from(["stewardctl", "token", "create", "--uses", "2", "--reusable"])
                .unwrap_err();
        assert!(err.to_string().contains("cannot be used with"), "{err}");
        assert!(Cli::try_parse_from(["stewardctl", "token", "create", "--uses", "3"]).is_ok());
    }
}
