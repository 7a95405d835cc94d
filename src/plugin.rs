//! `kubectl pgsnap`: the command line people use beside `kubectl apply`. `kubectl` runs any
//! `kubectl-pgsnap` on the PATH as `kubectl pgsnap …`; it reads the same kubeconfig.
//!
//! Output is for people by default (aligned columns, colour only on a terminal) and for
//! scripts with `-o json` (the objects themselves, as the API returns them).

use std::fmt::Write as _;
use std::io::IsTerminal;

use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};

use crate::api::backup::{Backup, Checkpoint, Phase, WalSource};
use crate::api::{SCHEDULE_NAME_LABEL, backup::BackupStatus};
use crate::backup::{SecretsRead, phase, read_secrets, task};
use crate::controller::Failure;

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
    /// `table` for people, `json` for scripts.
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
    /// schedule.
    List {
        /// In every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// One Backup: its steps with their durations, the label's LSNs, the snapshots, the
    /// Events.
    Describe { backup: String },
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
    /// The VolumeSnapshotClass a Backup would name (default: each driver's default class).
    #[arg(long)]
    pub snapshot_class: Option<String>,
    /// Where a restore finds the backup's WAL: `snapshot` (kept with the backup, no archive
    /// needed) or `archive` (the server's WAL archive).
    #[arg(long, value_enum, default_value_t = WalSourceArg::Snapshot)]
    pub wal_source: WalSourceArg,
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
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubeconfig: {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("watching the Backup: {0}")]
    Watch(#[from] kube::runtime::watcher::Error),
    #[error("the Backup {0} was deleted")]
    Deleted(String),
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
            let checks = check(&client, &namespace, args).await?;
            ok = checks
                .iter()
                .all(|c| !matches!(c.result, Checked::Failed(_)));
            match cli.output {
                Output::Json => serde_json::to_string_pretty(&checks)?,
                Output::Table => check_table(&checks, colour),
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
                    Output::Json => serde_json::to_string_pretty(&made)?,
                    Output::Table => format!("backup.pgsnap.io/{name} created"),
                }
            } else {
                println!("backup.pgsnap.io/{name} created");
                let ended = follow(&api, &name).await?;
                let status = ended.status.clone().unwrap_or_default();
                ok = status.phase == Some(Phase::Completed);
                match cli.output {
                    Output::Json => serde_json::to_string_pretty(&ended)?,
                    Output::Table => outcome(&status),
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
                Output::Json => serde_json::to_string_pretty(&backups)?,
                Output::Table => list_table(&backups, *all_namespaces, Timestamp::now(), colour),
            }
        }
        Command::Describe { backup } => {
            let backup = Api::<Backup>::namespaced(client.clone(), &namespace)
                .get(backup)
                .await?;
            let events = events_of(&client, &backup).await?;
            match cli.output {
                Output::Json => serde_json::to_string_pretty(&backup)?,
                Output::Table => describe(&backup, &events, colour),
            }
        }
    };
    println!("{}", text.trim_end());
    Ok(ok)
}

/// One line of `check`.
#[derive(serde::Serialize)]
struct Check {
    check: &'static str,
    #[serde(flatten)]
    result: Checked,
}

#[derive(serde::Serialize)]
#[serde(tag = "result", content = "detail", rename_all = "lowercase")]
enum Checked {
    Passed(String),
    /// The reason a Backup would fail with, and its message (which says the fix).
    Failed(Failure),
    /// Not checked: an earlier check it needs failed.
    Skipped(String),
}

impl From<Result<String, Failure>> for Checked {
    fn from(r: Result<String, Failure>) -> Self {
        match r {
            Ok(detail) => Checked::Passed(detail),
            Err(f) => Checked::Failed(f),
        }
    }
}

/// Prints each phase the Backup takes, from its watch, until it ends.
async fn follow(api: &Api<Backup>, name: &str) -> Result<Backup, Error> {
    use futures::TryStreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let t0 = std::time::Instant::now();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut objects = std::pin::pin!(watcher(api.clone(), config).applied_objects());
    let mut last = None;
    while let Some(backup) = objects.try_next().await? {
        let status = backup.status.clone().unwrap_or_default();
        let phase = status.phase.unwrap_or(Phase::Pending);
        if last != Some(phase) {
            let said = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map_or(String::new(), |c| c.message.clone());
            println!(
                "{:>7.1}s  {:<13}{said}",
                t0.elapsed().as_secs_f64(),
                format!("{phase:?}")
            );
            last = Some(phase);
        }
        if phase.is_terminal() {
            return Ok(backup);
        }
    }
    Err(Error::Deleted(name.into()))
}

/// The last line of `backup --wait`.
fn outcome(status: &BackupStatus) -> String {
    if let Some(e) = &status.error {
        return format!("Failed: {}: {}", e.reason, e.message);
    }
    let window = status
        .backup_window
        .as_ref()
        .and_then(|w| w.seconds.clone())
        .unwrap_or_default();
    match &status.timings {
        Some(t) => format!(
            "Completed: {window}s in backup mode (checkpoint {:.0} ms, snapshots cut {:.0} ms, stop {:.0} ms, pgsnap {:.0} ms)",
            t.checkpoint_seconds * 1000.0,
            t.cut_seconds * 1000.0,
            t.stop_seconds * 1000.0,
            t.overhead_seconds * 1000.0
        ),
        None => format!("Completed: {window}s in backup mode"),
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
    serde_json::from_value(serde_json::json!({
        "apiVersion": "pgsnap.io/v1alpha1", "kind": "Backup",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }))
}

/// The operator's own steps before backup mode, in its order, each reported; a step whose
/// input an earlier one could not give is skipped.
async fn check(client: &Client, namespace: &str, args: &BackupArgs) -> Result<Vec<Check>, Error> {
    // Never applied: the operator's steps run on it here.
    let backup = std::sync::Arc::new(backup_of(namespace, "kubectl-pgsnap-check", args)?);
    let mut checks = Vec::new();
    let mut push = |check, result: Checked| checks.push(Check { check, result });
    let skipped = |what: &str| Checked::Skipped(format!("needs {what}"));

    let pods = match task::target_pods(client, &backup).await {
        Ok(pods) => {
            push(
                "target pod",
                Checked::Passed(format!("{} is running", args.pod)),
            );
            pods
        }
        Err(f) => {
            push("target pod", Checked::Failed(f));
            for c in [
                "credentials",
                "connection",
                "server",
                "WAL source",
                "volumes",
                "snapshot classes",
            ] {
                push(c, skipped("the target pod"));
            }
            return Ok(checks);
        }
    };
    let secrets = match read_secrets(client, &backup).await? {
        SecretsRead::Found(s) => {
            let what = match &args.secret {
                Some(s) => format!("Secret {s}"),
                None => "no password (trust or a client certificate)".into(),
            };
            push("credentials", Checked::Passed(what));
            s
        }
        SecretsRead::Missing(message) => {
            push(
                "credentials",
                Checked::Failed(Failure::new("SecretNotFound", message)),
            );
            return Ok(checks);
        }
        SecretsRead::Invalid(f) => {
            push("credentials", Checked::Failed(f));
            return Ok(checks);
        }
    };
    let work = task::Assignment {
        backup: backup.clone(),
        connect_timeout: std::time::Duration::from_secs(10),
        pods,
        password: secrets.password,
        ca_cert: secrets.ca_cert,
    };
    let (mut session, pod) = match task::connect(&work).await {
        Ok(connected) => connected,
        Err(f) => {
            push("connection", Checked::Failed(f));
            for c in ["server", "WAL source", "volumes", "snapshot classes"] {
                push(c, skipped("a connection"));
            }
            return Ok(checks);
        }
    };
    let server = session.server().clone();
    push(
        "connection",
        Checked::Passed(format!(
            "PostgreSQL {} as {}, {}",
            server.version,
            server.role.name,
            if server.in_recovery {
                "standby"
            } else {
                "primary"
            }
        )),
    );
    let ready = session.check_ready().await.map_err(Failure::from);
    let standby = match server.in_recovery {
        true => "; the primary writes full-page images",
        false => "",
    };
    let detail = format!(
        "wal_level {}; {} may call the backup functions{standby}",
        server.wal_level, server.role.name
    );
    push("server", ready.map(|()| detail).into());
    let source = phase::wal_source(
        backup.spec.wal_source,
        server.in_recovery,
        &server.archive_mode,
        &server.archiver,
    );
    let planned = task::plan_snapshots(&mut session, &pod, &backup.spec).await;
    let wal = match (source, &planned) {
        (Ok(WalSource::Snapshot), Ok((plan, location))) => {
            let listing = session.check_wal_listing().await.map_err(Failure::from);
            listing
                .and_then(|()| phase::wal_volume(plan, location.unconfirmed()))
                .map(|(p, _)| {
                    format!(
                        "Snapshot: kept with the backup, in a snapshot of {} cut after the stop",
                        p.persistent_volume_claim
                    )
                })
                .into()
        }
        (Ok(WalSource::Snapshot), Err(_)) => skipped("the volumes"),
        (Ok(WalSource::Archive), _) => Checked::Passed(format!("Archive ({})", server.archiver)),
        (Err(f), _) => Checked::Failed(f),
    };
    push("WAL source", wal);
    match planned {
        Ok((plan, location)) => {
            let claims: Vec<String> = plan
                .iter()
                .map(|p| format!("{:?}: {}", p.role, p.persistent_volume_claim))
                .collect();
            let mut detail = claims.join(", ");
            if let Some(note) = location.unconfirmed() {
                detail.push_str(&format!(" ({note})"));
            }
            push("volumes", Checked::Passed(detail));
            let classes = task::snapshot_classes(client, &backup, &plan).await;
            push("snapshot classes", classes.map(|c| c.join(", ")).into());
        }
        Err(f) => {
            push("volumes", Checked::Failed(f));
            push("snapshot classes", skipped("the volumes"));
        }
    }
    Ok(checks)
}

fn check_table(checks: &[Check], colour: bool) -> String {
    let paint = |code: &str, text: &str| match colour {
        true => format!("\u{1b}[{code}m{text}\u{1b}[0m"),
        false => text.to_string(),
    };
    let mut rows = vec![["CHECK", "", "DETAIL"].map(String::from).to_vec()];
    for c in checks {
        let (mark, detail) = match &c.result {
            Checked::Passed(d) => (paint("32", "✓"), d.clone()),
            Checked::Failed(f) => (paint("31", "✗"), format!("{}: {}", f.reason, f.message)),
            Checked::Skipped(d) => ("-".to_string(), d.clone()),
        };
        rows.push(vec![c.check.to_string(), mark, detail]);
    }
    table(&rows)
}

async fn events_of(client: &Client, backup: &Backup) -> Result<Vec<Event>, kube::Error> {
    let api: Api<Event> = Api::namespaced(client.clone(), &backup.namespace().unwrap_or_default());
    let selector = format!(
        "regarding.kind=Backup,regarding.name={},regarding.uid={}",
        backup.name_any(),
        backup.uid().unwrap_or_default()
    );
    let mut events = api
        .list(&ListParams::default().fields(&selector))
        .await?
        .items;
    events.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    Ok(events)
}

/// Columns padded to their widest cell; the last one is not padded.
fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|i| rows.iter().map(|r| visible_len(&r[i])).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let last = row.len() - 1;
        for (i, cell) in row.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                out.push_str(&" ".repeat(widths[i] - visible_len(cell) + 3));
            }
        }
        out.push('\n');
    }
    out
}

/// Length without terminal colour codes.
fn visible_len(s: &str) -> usize {
    let mut n = 0;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            n += 1;
        }
    }
    n
}

fn phase_cell(status: Option<&BackupStatus>, colour: bool) -> String {
    let phase = status.and_then(|s| s.phase);
    let text = phase.map_or("Pending".to_string(), |p| format!("{p:?}"));
    // Green for done, red for failed, as kubectl plugins people know do.
    let code = match phase {
        Some(Phase::Completed) => "32",
        Some(Phase::Failed) => "31",
        _ => return text,
    };
    match colour {
        true => format!("\u{1b}[{code}m{text}\u{1b}[0m"),
        false => text,
    }
}

/// kubectl's age: the two largest units.
fn age(since: Timestamp, now: Timestamp) -> String {
    let s = now.duration_since(since).as_secs().max(0);
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m{}s", s / 60, s % 60),
        7200..172800 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// The sum of the snapshots' restore sizes, as the storage reports them.
fn size(status: &BackupStatus) -> String {
    let bytes: Option<u64> = status
        .snapshots
        .iter()
        .map(|s| s.restore_size.as_deref().and_then(quantity_bytes))
        .sum();
    match bytes {
        Some(b) if b >= 1 << 30 => format!("{:.1}Gi", b as f64 / (1u64 << 30) as f64),
        Some(b) => format!("{}Mi", b.div_ceil(1 << 20)),
        None => "-".into(),
    }
}

/// Bytes of a Kubernetes quantity in the forms storage reports (`1Gi`, `1073741824`, `1G`).
fn quantity_bytes(q: &str) -> Option<u64> {
    let digits = q.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let number: u64 = digits.parse().ok()?;
    let factor: u64 = match &q[digits.len()..] {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return None,
    };
    number.checked_mul(factor)
}

fn list_table(backups: &[Backup], all_namespaces: bool, now: Timestamp, colour: bool) -> String {
    let mut rows = vec![Vec::new()];
    if all_namespaces {
        rows[0].push("NAMESPACE".to_string());
    }
    rows[0].extend(
        [
            "NAME",
            "PHASE",
            "DATABASE",
            "AGE",
            "BACKUP MODE",
            "SIZE",
            "WAL",
            "SCHEDULE",
        ]
        .map(String::from),
    );
    for b in backups {
        let status = b.status.as_ref();
        let mut row = Vec::new();
        if all_namespaces {
            row.push(b.namespace().unwrap_or_default());
        }
        let database = status
            .and_then(|s| s.postgres.as_ref())
            .map(|p| p.pod.clone())
            .unwrap_or_else(|| "-".into());
        let window = status
            .and_then(|s| s.backup_window.as_ref())
            .and_then(|w| w.seconds.clone())
            .map_or("-".into(), |s| format!("{s}s"));
        row.extend([
            b.name_any(),
            phase_cell(status, colour),
            database,
            b.creation_timestamp().map_or("-".into(), |t| age(t.0, now)),
            window,
            status.map_or("-".into(), size),
            status
                .and_then(|s| s.wal_source)
                .map_or("-".into(), |w| format!("{w:?}")),
            b.labels()
                .get(SCHEDULE_NAME_LABEL)
                .cloned()
                .unwrap_or_else(|| "-".into()),
        ]);
        rows.push(row);
    }
    table(&rows)
}

fn describe(backup: &Backup, events: &[Event], colour: bool) -> String {
    let status = backup.status.clone().unwrap_or_default();
    let mut out = String::new();
    let field = |out: &mut String, k: &str, v: &str| {
        let _ = writeln!(out, "{:<16}{v}", format!("{k}:"));
    };
    field(&mut out, "Name", &backup.name_any());
    field(
        &mut out,
        "Namespace",
        &backup.namespace().unwrap_or_default(),
    );
    field(&mut out, "Phase", &phase_cell(Some(&status), colour));
    if let Some(error) = &status.error {
        field(&mut out, "Reason", &error.reason);
        field(&mut out, "Message", &error.message);
    }
    if let Some(pg) = &status.postgres {
        let role = pg.role.map_or(String::new(), |r| format!(", {r:?}"));
        let version = pg.version.clone().unwrap_or_default();
        field(
            &mut out,
            "Database",
            &format!("{} (PostgreSQL {version}{role})", pg.pod),
        );
        if let Some(id) = &pg.system_identifier {
            field(&mut out, "System id", id);
        }
    }
    if let Some(w) = status.wal_source {
        field(&mut out, "WAL source", &format!("{w:?}"));
    }
    if let (Some(start), Some(stop)) = (&status.start_lsn, &status.stop_lsn) {
        let wal = |w: &Option<String>| w.clone().unwrap_or_default();
        field(
            &mut out,
            "Start LSN",
            &format!("{start} ({})", wal(&status.start_wal)),
        );
        field(
            &mut out,
            "Stop LSN",
            &format!("{stop} ({})", wal(&status.stop_wal)),
        );
    }
    if let Some(cm) = &status.label_config_map {
        field(&mut out, "Label", cm);
    }
    if let Some(t) = &status.timings {
        let window = status
            .backup_window
            .as_ref()
            .and_then(|w| w.seconds.clone())
            .unwrap_or_default();
        out.push_str("\nSteps (time in backup mode ");
        let _ = writeln!(out, "{window}s):");
        let ms = |s: f64| format!("{:.0} ms", s * 1000.0);
        let mut steps = vec![
            vec!["checkpoint (start)".into(), ms(t.checkpoint_seconds)],
            vec!["snapshots cut".into(), ms(t.cut_seconds)],
            vec!["stop".into(), ms(t.stop_seconds)],
            vec!["pgsnap's overhead".into(), ms(t.overhead_seconds)],
        ];
        if let Some(kept) = t.wal_snapshot_seconds {
            steps.push(vec!["WAL snapshot (after)".into(), ms(kept)]);
        }
        if let Some(wait) = t.archive_wait_seconds {
            steps.push(vec!["archive wait (after)".into(), ms(wait)]);
        }
        out.push_str(&indent(&table(&steps)));
    }
    if !status.snapshots.is_empty() {
        out.push_str("\nSnapshots:\n");
        let mut rows = vec![
            ["NAME", "ROLE", "CLAIM", "READY", "SIZE"]
                .map(String::from)
                .to_vec(),
        ];
        for s in &status.snapshots {
            let role = match &s.tablespace {
                Some(t) => format!("{:?} {t}", s.role),
                None => format!("{:?}", s.role),
            };
            rows.push(vec![
                s.name.clone(),
                role,
                s.persistent_volume_claim.clone(),
                s.ready_to_use.to_string(),
                s.restore_size.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        out.push_str(&indent(&table(&rows)));
    }
    out.push_str("\nEvents:\n");
    if events.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let mut rows = vec![["TYPE", "REASON", "MESSAGE"].map(String::from).to_vec()];
        for e in events {
            rows.push(vec![
                e.type_.clone().unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
                e.note.clone().unwrap_or_default(),
            ]);
        }
        out.push_str(&indent(&table(&rows)));
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_ages_and_columns() {
        assert_eq!(quantity_bytes("1Gi"), Some(1 << 30));
        assert_eq!(quantity_bytes("1073741824"), Some(1 << 30));
        assert_eq!(quantity_bytes("5M"), Some(5_000_000));
        assert_eq!(quantity_bytes("5Q"), None);
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        let now = t("2026-12-03T12:00:00Z");
        assert_eq!(age(t("2026-12-03T11:59:15Z"), now), "45s");
        assert_eq!(age(t("2026-12-03T11:50:00Z"), now), "10m0s");
        assert_eq!(age(t("2026-12-01T09:00:00Z"), now), "2d3h");
        let coloured = "\u{1b}[32mCompleted\u{1b}[0m";
        assert_eq!(visible_len(coloured), 9);
        assert_eq!(
            table(&[
                vec!["A".into(), "B".into()],
                vec![coloured.into(), "x".into()]
            ]),
            format!("A           B\n{coloured}   x\n")
        );
    }
}
