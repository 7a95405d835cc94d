use clap::{Parser, Subcommand};

/// pgsnap: online, restorable CSI snapshot backups of PostgreSQL in Kubernetes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", pgsnap::api::crds_yaml()?),
    }
    Ok(())
}
