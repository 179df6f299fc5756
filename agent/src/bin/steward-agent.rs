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

fn main() -> ExitCode {
    steward_proto::runtime::init_tracing();
    let args = Args::parse();
    if let Some(Command::ReleaseVips { state_dir }) = args.command {
        return release_vips(&args.config, state_dir);
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
        tokio::spawn(steward_proto::runtime::cancel_on_signal(shutdown.clone()));
        match steward_agent::run(settings, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("steward-agent: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
