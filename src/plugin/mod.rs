//! `kubectl pgsnap`: the command line people use beside `kubectl apply`. `kubectl` runs any
//! `kubectl-pgsnap` on the PATH as `kubectl pgsnap …`; it reads the same kubeconfig.
//!
//! Output is for people by default (aligned columns, colour only on a terminal) and for
//! scripts with `-o json` or `-o yaml` (the objects themselves, as the API returns them).

mod check;
mod restore;
mod show;

use std::io::{IsTerminal, Write};

use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};

use crate::api::backup::{Backup, Checkpoint, Phase};
use crate::api::restore::{Restore, RestorePhase};

#[derive(clap::Parser)]
#[command(
    name = "kubectl-pgsnap",
    bin_name = "kubectl pgsnap",
    about = "pgsnap's Backups from the command line",
    version
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// The namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    pub namespace: Option<String>,
    /// `table` for people, `json` or `yaml` for scripts (`restore`: see there).
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Whether a database can be backed up, before its first backup: connects as a Backup
    /// would and runs the checks the operator runs before backup mode, each with the fix.
    /// Exits 1 when a backup would fail.
    Check(BackupArgs),
    /// Creates a Backup of the pod (the same flags as `check`); with `--wait` follows it to
    /// its end, showing each phase, and exits 1 when it fails.
    Backup {
        #[command(flatten)]
        of: BackupArgs,
        /// The Backup's name (default: the pod's name and the time).
        #[arg(long)]
        name: Option<String>,
        /// `fast` checkpoints at once (more I/O now), `spread` as the server's checkpoints do.
        #[arg(long, value_enum)]
        checkpoint: Option<CheckpointArg>,
        /// Follow it to its end.
        #[arg(long)]
        wait: bool,
    },
    /// The Backups, newest first: database, age, time in backup mode, size, WAL source,
    /// the last Verification's result, schedule.
    List {
        /// In every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// One Backup: its steps with their durations, the label's LSNs, the snapshots, the
    /// Events.
    Describe { backup: String },
    /// Restores a Backup into new claims named as a StatefulSet NAME names its own
    /// (`<volume>-NAME-0`, the volume as the backed-up pod calls it), through a Restore NAME.
    /// With `-o yaml` it waits for the Restore and prints that StatefulSet, the backed-up
    /// pod's spec on the restored claims, ready for `kubectl apply -f -`.
    Restore(restore::RestoreArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum CheckpointArg {
    Fast,
    Spread,
}

/// A Backup's target and connection, as flags.
#[derive(clap::Args)]
pub struct BackupArgs {
    /// The pod running the server.
    pub pod: String,
    /// The password's Secret and key, `NAME/KEY` (as a Backup's passwordSecretRef).
    #[arg(long)]
    pub secret: Option<String>,
    /// The role to connect as (default: the Backup's default, postgres).
    #[arg(long)]
    pub user: Option<String>,
    /// The database to connect to.
    #[arg(long)]
    pub database: Option<String>,
    /// The port (default: the pod's container port named postgresql, else 5432).
    #[arg(long)]
    pub port: Option<u16>,
    /// The operator's leader Lease, `NAMESPACE/NAME`, which says whether one runs.
    #[arg(long, default_value = "pgsnap-system/pgsnap-leader")]
    pub operator_lease: String,
    /// The VolumeSnapshotClass a Backup would name (default: each driver's default class).
    #[arg(long)]
    pub snapshot_class: Option<String>,
    /// Where a restore finds the backup's WAL: `snapshot` (kept with the backup, no archive
    /// needed) or `archive` (the server's WAL archive).
    #[arg(long, value_enum, default_value_t = WalSourceArg::Snapshot)]
    pub wal_source: WalSourceArg,
    /// Whether the volumes are cut as one VolumeGroupSnapshot: `auto`, `always` or `never`.
    #[arg(long, value_enum, default_value_t = GroupSnapshotArg::Auto)]
    pub group_snapshot: GroupSnapshotArg,
    /// The VolumeGroupSnapshotClass a Backup would name (default: the driver's default).
    #[arg(long)]
    pub group_snapshot_class: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum GroupSnapshotArg {
    Auto,
    Always,
    Never,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum WalSourceArg {
    Snapshot,
    Archive,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubeconfig: {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("encoding YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("{0} was deleted")]
    Deleted(String),
    #[error("{0}")]
    Refused(String),
}

/// Runs the command and prints what it found; false when it found a backup would fail.
pub async fn main(cli: Cli) -> Result<bool, Error> {
    let config = kube::Config::infer().await?;
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config)?;
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut ok = true;
    let text = match &cli.command {
        Command::Check(args) => {
            let checks = check::run(&client, &namespace, args).await?;
            ok = check::passed(&checks);
            match cli.output {
                Output::Table => check::table(&checks, colour),
                _ => encode(cli.output, &checks)?,
            }
        }
        Command::Backup {
            of,
            name,
            checkpoint,
            wait,
        } => {
            let name = name.clone().unwrap_or_else(|| {
                format!("{}-{}", of.pod, Timestamp::now().strftime("%Y%m%d-%H%M%S"))
            });
            let mut backup = backup_of(&namespace, &name, of)?;
            if let Some(c) = checkpoint {
                backup.spec.checkpoint = match c {
                    CheckpointArg::Fast => Checkpoint::Fast,
                    CheckpointArg::Spread => Checkpoint::Spread,
                };
            }
            let api = Api::<Backup>::namespaced(client, &namespace);
            let made = api.create(&PostParams::default(), &backup).await?;
            if !wait {
                match cli.output {
                    Output::Table => format!("backup.pgsnap.io/{name} created"),
                    _ => encode(cli.output, &made)?,
                }
            } else {
                // Progress for people; on stderr when stdout is for scripts.
                let mut progress: Box<dyn Write> = match cli.output {
                    Output::Table => Box::new(std::io::stdout()),
                    _ => Box::new(std::io::stderr()),
                };
                let _ = writeln!(progress, "backup.pgsnap.io/{name} created");
                let ended = follow(&api, &name, &mut progress).await?;
                let status = ended.status.clone().unwrap_or_default();
                ok = status.phase == Some(Phase::Completed);
                match cli.output {
                    Output::Table => show::outcome(&status),
                    _ => encode(cli.output, &ended)?,
                }
            }
        }
        Command::List { all_namespaces } => {
            let api: Api<Backup> = match all_namespaces {
                true => Api::all(client),
                false => Api::namespaced(client, &namespace),
            };
            let mut backups = api.list(&ListParams::default()).await?.items;
            backups.sort_by_key(|b| std::cmp::Reverse(b.creation_timestamp().map(|t| t.0)));
            match cli.output {
                Output::Table => {
                    show::list_table(&backups, *all_namespaces, Timestamp::now(), colour)
                }
                _ => encode(cli.output, &backups)?,
            }
        }
        Command::Describe { backup } => {
            let backup = Api::<Backup>::namespaced(client.clone(), &namespace)
                .get(backup)
                .await?;
            let events = show::events_of(&client, &backup).await?;
            match cli.output {
                Output::Table => show::describe(&backup, &events, colour),
                _ => encode(cli.output, &backup)?,
            }
        }
        Command::Restore(args) => {
            let (restored, text) = restore::run(&client, &namespace, args, cli.output).await?;
            ok = restored;
            text
        }
    };
    println!("{}", text.trim_end());
    Ok(ok)
}

/// The objects as a script reads them.
fn encode(output: Output, value: &impl serde::Serialize) -> Result<String, Error> {
    Ok(match output {
        Output::Yaml => serde_yaml::to_string(value)?,
        _ => serde_json::to_string_pretty(value)?,
    })
}

/// An object that moves through phases to an end, as `--wait` follows it.
trait Phased:
    Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static
{
    /// Its phase, whether that is an end, and what its Ready condition says.
    fn progress(&self) -> (String, bool, String);
}

fn ready_message(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> String {
    conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map_or(String::new(), |c| c.message.clone())
}

impl Phased for Backup {
    fn progress(&self) -> (String, bool, String) {
        let status = self.status.clone().unwrap_or_default();
        let phase = status.phase.unwrap_or(Phase::Pending);
        (
            format!("{phase:?}"),
            phase.is_terminal(),
            ready_message(&status.conditions),
        )
    }
}

impl Phased for Restore {
    fn progress(&self) -> (String, bool, String) {
        let status = self.status.clone().unwrap_or_default();
        let phase = status.phase.unwrap_or(RestorePhase::Pending);
        (
            format!("{phase:?}"),
            phase.is_terminal(),
            ready_message(&status.conditions),
        )
    }
}

/// Writes each phase the object takes, from its watch, until it ends; says so when nothing
/// moves it out of Pending (no operator acting on it).
async fn follow<K: Phased>(api: &Api<K>, name: &str, to: &mut impl Write) -> Result<K, Error> {
    use futures::StreamExt;
    use kube::runtime::watcher::{self, Event};
    use kube::runtime::{WatchStreamExt, watcher as watch};
    const QUIET: std::time::Duration = std::time::Duration::from_secs(30);
    let t0 = std::time::Instant::now();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watch(api.clone(), config).default_backoff());
    let mut last: Option<String> = None;
    // The terminal is where these lines go; one it cannot be written to changes nothing.
    loop {
        let event = match tokio::time::timeout(QUIET, events.next()).await {
            Ok(Some(event)) => event,
            Ok(None) => return Err(Error::Deleted(format!("{} {name}", K::kind(&())))),
            Err(_) => {
                if last.as_deref().is_none_or(|p| p == "Pending") {
                    let _ = writeln!(
                        to,
                        "{:>7.1}s  still Pending: is a pgsnap operator running for this namespace? (kubectl pgsnap check says)",
                        t0.elapsed().as_secs_f64()
                    );
                }
                continue;
            }
        };
        let object = match event {
            Ok(Event::Apply(object) | Event::InitApply(object)) => object,
            Ok(Event::Delete(_)) => {
                return Err(Error::Deleted(format!("{} {name}", K::kind(&()))));
            }
            Ok(Event::Init | Event::InitDone) => continue,
            Err(e) => {
                let _ = writeln!(to, "watching {name}: {e}; retrying");
                continue;
            }
        };
        let (phase, ended, said) = object.progress();
        if last.as_ref() != Some(&phase) {
            let _ = writeln!(
                to,
                "{:>7.1}s  {phase:<13}{said}",
                t0.elapsed().as_secs_f64()
            );
            last = Some(phase);
        }
        if ended {
            return Ok(object);
        }
    }
}

/// The Backup these flags describe, as the operator reads it.
fn backup_of(namespace: &str, name: &str, args: &BackupArgs) -> Result<Backup, serde_json::Error> {
    let mut connection = serde_json::Map::new();
    if let Some((name, key)) = args.secret.as_deref().and_then(|s| s.split_once('/')) {
        connection.insert(
            "passwordSecretRef".into(),
            serde_json::json!({"name": name, "key": key}),
        );
    }
    for (field, value) in [("user", &args.user), ("database", &args.database)] {
        if let Some(v) = value {
            connection.insert(field.into(), v.clone().into());
        }
    }
    if let Some(port) = args.port {
        connection.insert("port".into(), port.into());
    }
    let mut spec = serde_json::json!({"target": {"podName": args.pod}, "connection": connection});
    spec["walSource"] = match args.wal_source {
        WalSourceArg::Snapshot => "Snapshot",
        WalSourceArg::Archive => "Archive",
    }
    .into();
    if let Some(class) = &args.snapshot_class {
        spec["volumeSnapshotClassName"] = class.clone().into();
    }
    spec["groupSnapshot"] = match args.group_snapshot {
        GroupSnapshotArg::Auto => "Auto",
        GroupSnapshotArg::Always => "Always",
        GroupSnapshotArg::Never => "Never",
    }
    .into();
    if let Some(class) = &args.group_snapshot_class {
        spec["volumeGroupSnapshotClassName"] = class.clone().into();
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "pgsnap.io/v1alpha1", "kind": "Backup",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }))
}
