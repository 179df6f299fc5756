//! `stewardctl`: see the `stewardctl` library.

use std::process::ExitCode;

use clap::Parser;
use stewardctl::{self as ctl, Cli};

fn main() -> ExitCode {
    // The completion scripts' helper, before clap: see ctl_complete.
    let args: Vec<String> = std::env::args().collect();
    let completing = args.get(1).is_some_and(|a| a == "__complete");
    let cli = if completing { None } else { Some(Cli::parse()) };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stewardctl: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(cli) = cli else {
        runtime.block_on(stewardctl::completion::complete_main(&args[2..]));
        return ExitCode::SUCCESS;
    };
    match runtime.block_on(ctl::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stewardctl: {e}");
            ExitCode::FAILURE
        }
    }
}
