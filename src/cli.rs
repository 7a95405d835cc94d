//! The command line of the `pgsnap` binary. It lives in the library so tests parse exactly
//! what the operator writes into a Job's arguments with the parser that will read them.

use std::net::SocketAddr;

use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;

/// pgsnap: online, restorable CSI snapshot backups of PostgreSQL in Kubernetes.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the operator (in-cluster configuration, or KUBECONFIG).
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Prepare a restored data directory for recovery from a pgsnap backup.
    RestorePrepare(crate::restore::prepare::Args),
    /// Check a restored server beside it in a Verification's pod (run by the operator).
    VerifyServer(crate::verify::server::Args),
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Backups holding a database session at once, across all databases.
    #[arg(long, env = "PGSNAP_MAX_CONCURRENT_BACKUPS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent_backups: u16,
    /// Watch Backups in this namespace only (default: all namespaces).
    #[arg(long, env = "PGSNAP_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// How long connecting to a database may take before the backup fails as Unreachable.
    #[arg(long, env = "PGSNAP_CONNECT_TIMEOUT", default_value = "10s")]
    pub connect_timeout: crate::api::Duration,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "PGSNAP_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    #[arg(long, env = "PGSNAP_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    #[arg(long, env = "PGSNAP_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Run the controller only while holding a Lease, so replicas never run one backup twice.
    #[arg(long, env = "PGSNAP_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    #[arg(long, env = "PGSNAP_LEASE_NAME", default_value = "pgsnap-leader")]
    pub lease_name: String,
    /// Namespace of the Lease (default: the operator's own, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's name in the Lease (default: POD_NAME, else the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// The image of what pgsnap runs in the cluster itself, a Restore's prepare Job and a
    /// Verification's checker: this operator's own (restore-prepare, verify-server).
    #[arg(long, env = "PGSNAP_IMAGE", default_value = "pgsnap:dev")]
    pub restore_image: String,
}
