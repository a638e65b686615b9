//! waypoint: the per-service L7 proxy of the ambient mesh. It terminates HBONE from ztunnels on
//! 15006 (`inbound_CONNECT_terminate`), serves the tunnelled bytes as HTTP, routes each request
//! and forwards it over HBONE to the chosen endpoint's node.

mod app;
mod authz;
mod body;
mod client_hello;
mod hop;
mod housekeeping;
mod inbound;
mod limits;
mod metrics;
mod outlier;
mod pipeline;
mod proxy;
mod rand;
mod route;
mod sniff;
mod tcp;
mod upstream;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = app::Args::parse();
    match app::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("waypoint: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
