//! `steward-agent --config FILE`: the node agent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use steward_agent::config::AgentConfig;
use tokio_util::sync::CancellationToken;

/// Steward node agent: reports this host's facts and health to a coordinator
/// over mutual TLS and keeps the roles it is given in force.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// TOML config file (see packaging/agent.example.toml).
    #[arg(
        long,
        short,
        env = "STEWARD_AGENT_CONFIG",
        default_value = "/etc/steward/agent.toml"
    )]
    config: PathBuf,
    /// Check the config and exit.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Join a cluster: get this node's certificate with a join token, write
    /// the config (--config) and start the agent's systemd unit.
    ///
    /// Run the command `stewardctl token create` prints, as root. The key is
    /// made here and never leaves the host; the coordinator is trusted only
    /// if it presents the CA with the given hash. A wrong, expired or used
    /// token is refused with the reason, and nothing is written.
    Join {
        /// The join token (<id>.<secret>).
        #[arg(long, env = "STEWARD_JOIN_TOKEN")]
        token: String,
        /// A coordinator's join URL (https://host:7444); repeat for several.
        #[arg(long = "coordinator", required = true)]
        coordinators: Vec<String>,
        /// sha256:<hex> of the cluster CA's public key.
        #[arg(long)]
        ca_hash: String,
        /// This node's id (default: the host name, lowercased).
        #[arg(long)]
        node_id: Option<String>,
        /// Where ca.crt, node.crt and node.key are written.
        #[arg(long, default_value = "/etc/steward/pki")]
        pki_dir: PathBuf,
        /// Replace this host's existing certificate (re-joining).
        #[arg(long)]
        force: bool,
        /// Write everything but do not start the agent.
        #[arg(long)]
        no_start: bool,
    },
    /// Remove every VIP this agent recorded as bound, then exit. The systemd
    /// unit runs it as ExecStopPost=, so a VIP never outlives its agent.
    ReleaseVips {
        /// State directory (default: the config's state_dir, else
        /// /var/lib/steward-agent).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

/// A single-threaded runtime: the agent is mostly idle, and small is the
/// goal. `None` (said on stderr) if it cannot be had.
fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| eprintln!("steward-agent: cannot start runtime: {e}"))
        .ok()
}

fn release_vips(config: &std::path::Path, state_dir: Option<PathBuf>) -> ExitCode {
    // Works even with a broken config: leaving a VIP behind is worse.
    let state_dir = state_dir
        .or_else(|| AgentConfig::load(config).ok().map(|s| s.state_dir))
        .unwrap_or_else(|| "/var/lib/steward-agent".into());
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(steward_agent::vip::release_recorded(&state_dir)) {
        Ok(n) => {
            println!(
                "released {n} VIP address(es) recorded in {}",
                state_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("steward-agent release-vips: {e}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn join(
    config: PathBuf,
    token: String,
    coordinators: Vec<String>,
    ca_hash: &str,
    node_id: Option<String>,
    pki_dir: PathBuf,
    force: bool,
    no_start: bool,
) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("steward-agent join: {e}");
        ExitCode::FAILURE
    };
    let ca_hash = match ca_hash.parse() {
        Ok(h) => h,
        Err(e) => return fail(&e),
    };
    let raw_id = node_id.unwrap_or_else(steward_agent::config::default_node_id);
    let node_id = match steward_proto::domain::NodeId::new(&raw_id) {
        Ok(id) => id,
        Err(e) => return fail(&format!("node id {raw_id:?}: {e} (set one with --node-id)")),
    };
    let options = steward_agent::join::JoinOptions {
        token,
        coordinators,
        ca_hash,
        node_id,
        config: config.clone(),
        pki_dir,
        force,
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    println!("joining as {} ...", options.node_id);
    let joined = match runtime.block_on(steward_agent::join::join(&options)) {
        Ok(j) => j,
        Err(e) => return fail(&e),
    };
    println!(
        "joined: certificate {} valid until {} UTC (renewed automatically); config {}; coordinators {}",
        joined.cert.display(),
        steward_runtime::format_unix_ms(joined.not_after_unix_ms),
        config.display(),
        joined.coordinators.join(", ")
    );
    if no_start {
        println!("not started (--no-start); start it with: systemctl enable --now steward-agent");
        return ExitCode::SUCCESS;
    }
    match steward_agent::join::start_unit("steward-agent.service") {
        Ok(true) => {
            println!("steward-agent.service enabled and started");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!(
                "no systemd here; start the agent with: steward-agent --config {}",
                config.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("joined, but the agent did not start: {e}")),
    }
}

fn main() -> ExitCode {
    steward_runtime::init_tracing();
    let args = Args::parse();
    match args.command {
        Some(Command::ReleaseVips { state_dir }) => {
            return release_vips(&args.config, state_dir);
        }
        Some(Command::Join {
            token,
            coordinators,
            ca_hash,
            node_id,
            pki_dir,
            force,
            no_start,
        }) => {
            return join(
                args.config,
                token,
                coordinators,
                &ca_hash,
                node_id,
                pki_dir,
                force,
                no_start,
            );
        }
        None => {}
    }
    let settings = match AgentConfig::load(&args.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("steward-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("{}: ok (node {})", args.config.display(), settings.node_id);
        return ExitCode::SUCCESS;
    }
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(steward_runtime::cancel_on_signal(shutdown.clone()));
        match steward_agent::run(settings, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("steward-agent: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
