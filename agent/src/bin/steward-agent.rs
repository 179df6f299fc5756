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
}

fn main() -> ExitCode {
    steward_proto::runtime::init_tracing();
    let args = Args::parse();
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
    // One thread: the agent is mostly idle, and small is the goal.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("steward-agent: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
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
