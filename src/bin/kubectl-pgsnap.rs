//! `kubectl pgsnap …`: pgsnap's command line (`pgsnap::plugin`), found by kubectl on the PATH.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match pgsnap::plugin::main(pgsnap::plugin::Cli::parse()).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        // What the command checked would fail: the table says why.
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
