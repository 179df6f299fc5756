//! `stewardctl`: see the `stewardctl` library.

use std::process::ExitCode;

use clap::Parser;
use stewardctl::{self as ctl, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match runtime.block_on(ctl::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stewardctl: {e}");
            ExitCode::FAILURE
        }
    }
}
