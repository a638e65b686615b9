//! ztunnel: the per-node agent of the ambient mesh. This file is the command line; `app` wires
//! the running agent together.

mod admin;
mod app;
mod capture;
mod capture_follow;
mod cli;
mod dns_proxy;
mod metrics;
mod proxy;
mod socket;
mod state;
mod time_wait;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztunnel: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
