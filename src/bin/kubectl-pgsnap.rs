//! `kubectl pgsnap …`: pgsnap's command line (`pgsnap::plugin`), found by kubectl on the PATH.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match pgsnap::plugin::main(pgsnap::plugin::Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
