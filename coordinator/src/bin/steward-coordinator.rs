//! `steward-coordinator --config FILE`: one replica of the coordinator.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use steward_coordinator::config::CoordinatorConfig;
use tokio_util::sync::CancellationToken;

/// Steward coordinator replica: keeps cluster state in etcd, serves agents
/// and stewardctl over mutual TLS. Run three against one etcd cluster; one is
/// elected leader.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// TOML config file (see packaging/coordinator.example.toml).
    #[arg(
        long,
        short,
        env = "STEWARD_COORDINATOR_CONFIG",
        default_value = "/etc/steward/coordinator.toml"
    )]
    config: PathBuf,
    /// Check the config and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    steward_runtime::init_tracing();
    let args = Args::parse();
    let config = match CoordinatorConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("steward-coordinator: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("{}: ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("steward-coordinator: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(steward_runtime::cancel_on_signal(shutdown.clone()));
        match steward_coordinator::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("steward-coordinator: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
