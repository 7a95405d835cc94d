//! `node-agent`: the pgsnap test cluster's stand-in for the kubelet and a container runtime.
//!
//! `node-agent --kubeconfig ... --root ...` runs the agent. Two internal subcommands run
//! inside a container's process: `sandbox SPEC` (namespaces, mounts, user, then exec) and
//! `entrypoint postgres ...` (the official postgres image's entrypoint).

use clap::Parser;
use pgsnap_e2e::agent::{self, entrypoint, sandbox};

fn main() -> std::process::ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    match argv.get(1).map(String::as_str) {
        // Both run before any thread exists: unshare(CLONE_NEWNS) needs a single thread.
        Some("sandbox") => {
            let err = sandbox::run(std::path::Path::new(argv.get(2).map_or("", String::as_str)));
            eprintln!("node-agent sandbox: {err}");
            // A container runtime's codes: 127 not found, 126 cannot run.
            let code = if matches!(err, sandbox::SandboxError::NotFound(_)) {
                127
            } else {
                126
            };
            std::process::ExitCode::from(code)
        }
        Some("entrypoint") => {
            let err = entrypoint::run(&argv[2..]);
            eprintln!("entrypoint: {err}");
            std::process::ExitCode::FAILURE
        }
        _ => run_agent(agent::Args::parse()),
    }
}

fn run_agent(args: agent::Args) -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("node-agent: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "node agent failed");
            std::process::ExitCode::FAILURE
        }
    }
}
