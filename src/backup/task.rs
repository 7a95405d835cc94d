//! The session task: one per running backup. It holds the database session from the start
//! call to the stop call, with the snapshots cut in between, and never longer than the
//! Backup's deadline. Dropping it (abort, deadline, operator exit) closes the session, and
//! PostgreSQL then aborts the backup by itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::ListParams;
use kube::runtime::events::EventType;
use kube::{Api, Client, ResourceExt};
use tokio::sync::oneshot;
use tokio::time::timeout_at;
use tracing::{info, warn};

use super::volumes::{self, DatabaseDir, PlannedSnapshot};
use super::{Context, phase};
use crate::api::BACKUP_CREATOR;
use crate::api::backup::{
    Backup, BackupSpec, BackupStatus, BackupTimings, BackupWindow, Checkpoint, CutMethod,
    CutStatus, GroupSnapshotPolicy, Phase, PostgresStatus, ServerRole, SnapshotStatus, TargetRole,
    VolumeRole, WalSource,
};
use crate::api::snapshot::{SnapshotLike as _, VolumeGroupSnapshot, VolumeSnapshot};
use crate::controller::{Failure, created_by, now, set_phase};
use crate::label_store::{
    self, LABEL_CONFIGMAP_ANNOTATION, LabelRecord, Location, SnapshotLocation, WalRecord,
};
use crate::postgres::{self, ConnectOptions, Session, Started, Step, Stopped, WalReceiver};
use crate::snapshots::{self, group, group::CutPlan};
use crate::telemetry::TimedStep;

/// What the reconciler resolved for a backup before admitting it.
pub struct Assignment {
    pub backup: Arc<Backup>,
    pub connect_timeout: std::time::Duration,
    /// The candidate pods, Running, in name order.
    pub pods: Vec<Pod>,
    pub password: Option<String>,
    pub ca_cert: Option<Vec<u8>>,
}

/// The pods that may hold the server: the named one, or the selected ones that run.
pub async fn target_pods(client: &Client, backup: &Backup) -> Result<Vec<Pod>, Failure> {
    let ns = backup.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let target = &backup.spec.target;
    if let Some(name) = &target.pod_name {
        let pod = api.get_opt(name).await?.ok_or_else(|| {
            Failure::new(
                "TargetPodNotFound",
                format!("pod {ns}/{name} does not exist"),
            )
        })?;
        if !is_running(&pod) {
            return Err(Failure::new(
                "TargetPodNotRunning",
                format!("pod {ns}/{name} is not running (phase {})", pod_phase(&pod)),
            ));
        }
        return Ok(vec![pod]);
    }
    let selector = target.selector.clone().unwrap_or_default();
    let selector_text = selector_string(&selector);
    let mut pods: Vec<Pod> = api
        .list(&ListParams::default().labels(&selector_text))
        .await?
        .items
        .into_iter()
        .filter(is_running)
        .collect();
    if pods.is_empty() {
        return Err(Failure::new(
            "NoTargetPod",
            format!("no running pod in {ns} matches the selector {selector_text:?}"),
        ));
    }
    pods.sort_by_key(|p| p.name_any());
    Ok(pods)
}

fn is_running(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && pod_phase(pod) == "Running"
}

fn pod_phase(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".into())
}

fn selector_string(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
) -> String {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for expr in selector.match_expressions.iter().flatten() {
        let values = expr.values.clone().unwrap_or_default().join(",");
        parts.push(match expr.operator.as_str() {
            "In" => format!("{} in ({values})", expr.key),
            "NotIn" => format!("{} notin ({values})", expr.key),
            "Exists" => expr.key.clone(),
            _ => format!("!{}", expr.key),
        });
    }
    parts.join(",")
}

/// Backups of one database queue behind each other. A database is its pod, by uid, so a pod
/// named by one Backup and selected by another is one database; a selector's backup may land
/// on any pod it selects, so it holds them all.
pub fn database_keys(pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .map(|p| {
            p.uid().unwrap_or_else(|| {
                format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
            })
        })
        .collect()
}

/// The port: the spec's, else the container port named `postgresql`, else 5432.
pub fn port_of(pod: &Pod, requested: Option<i32>) -> u16 {
    let named = || {
        pod.spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some("postgresql"))
            .map(|p| p.container_port)
    };
    requested
        .or_else(named)
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(5432)
}

fn connect_options(work: &Assignment, pod: &Pod) -> Result<ConnectOptions, Failure> {
    let conn = &work.backup.spec.connection;
    let host = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .ok_or_else(|| {
            Failure::new(
                "TargetPodNotRunning",
                format!("pod {} has no IP address yet", pod.name_any()),
            )
        })?;
    Ok(ConnectOptions {
        host,
        port: port_of(pod, conn.port),
        user: conn.user.clone(),
        password: work.password.clone(),
        database: conn.database.clone(),
        ssl_mode: conn.ssl_mode,
        ca_cert_pem: work.ca_cert.clone(),
        server_name: conn.server_name.clone(),
        application_name: "pgsnap".into(),
        connect_timeout: work.connect_timeout,
    })
}

/// Connects to the server the target names; with a selector, to each pod until the role fits.
pub(crate) async fn connect(work: &Assignment) -> Result<(Session, Pod), Failure> {
    let target = &work.backup.spec.target;
    if target.pod_name.is_some() {
        let pod = work.pods[0].clone();
        return Ok((Session::connect(&connect_options(work, &pod)?).await?, pod));
    }
    let role = target.role.unwrap_or(TargetRole::Primary);
    let mut sessions = Vec::new();
    for pod in &work.pods {
        let session = Session::connect(&connect_options(work, pod)?).await?;
        sessions.push((pod.clone(), session));
    }
    let candidates: Vec<(String, bool)> = sessions
        .iter()
        .map(|(p, s)| (p.name_any(), s.server().in_recovery))
        .collect();
    let chosen = phase::choose_server(role, &candidates).ok_or_else(|| {
        Failure::new(
            "NoServerWithRole",
            format!(
                "none of the selected pods {:?} runs a server with role {role:?}",
                candidates.iter().map(|c| &c.0).collect::<Vec<_>>()
            ),
        )
    })?;
    let (pod, session) = sessions
        .into_iter()
        .find(|(p, _)| p.name_any() == chosen)
        .expect("the chosen pod is a candidate");
    Ok((session, pod))
}

fn database_dirs(server: &postgres::ServerInfo) -> Vec<DatabaseDir> {
    let mut dirs = vec![
        DatabaseDir {
            role: VolumeRole::Data,
            tablespace: None,
            tablespace_oid: None,
            path: server.data_directory.clone(),
        },
        DatabaseDir {
            role: VolumeRole::Wal,
            tablespace: None,
            tablespace_oid: None,
            path: server.wal_directory.clone(),
        },
    ];
    dirs.extend(server.tablespaces.iter().map(|t| DatabaseDir {
        role: VolumeRole::Tablespace,
        tablespace: Some(t.name.clone()),
        tablespace_oid: Some(t.oid),
        path: t.location.clone(),
    }));
    dirs
}

/// Runs one backup to Finalizing, or to Failed with everything it made removed.
pub async fn run(ctx: &Context, work: Assignment, abort: oneshot::Receiver<Failure>) {
    let mut status = work.backup.status.clone().unwrap_or_default();
    let result = tokio::select! {
        result = execute(ctx, &work, &mut status) => result,
        why = abort => Err(why.unwrap_or_else(|_| Failure::new("OperatorShutdown", "the operator stopped mid-backup"))),
    };
    // The select dropped `execute` and with it the session: the server is out of backup mode.
    if let Err(failure) = result
        && let Err(e) = ctx.fail(&work.backup, &mut status, failure).await
    {
        tracing::error!(error = %e, "could not record the failure; the next reconcile will find the session lost");
    }
}

/// The steps of one backup, in order. Backup mode lasts from `start_backup` to `stop_backup`.
async fn execute(
    ctx: &Context,
    work: &Assignment,
    status: &mut BackupStatus,
) -> Result<(), Failure> {
    let backup = &*work.backup;
    let (mut session, pod) = connect(work).await?;
    let server = session.server().clone();
    status.postgres = Some(postgres_status(&pod, &server));
    let source = phase::wal_source(
        backup.spec.wal_source,
        server.in_recovery,
        &server.archive_mode,
        &server.archiver,
    )?;
    status.wal_source = Some(source);
    let (plan, location) = plan_snapshots(&mut session, &pod, &backup.spec).await?;
    let wal_volume = match source {
        WalSource::Snapshot => {
            session.check_wal_listing().await?;
            let receiver = match server.in_recovery {
                true => {
                    let receiver = session.wal_receiver(Step::Connect).await?;
                    phase::standby_streams(receiver.as_ref(), &server.role.name)?;
                    receiver
                }
                false => None,
            };
            let (planned, location) = phase::wal_volume(&plan, location.unconfirmed())?;
            Some(WalVolume {
                planned: planned.clone(),
                location: location.clone(),
                receiver,
            })
        }
        WalSource::Archive => {
            if let WalLocation::Unknown(why) = location {
                let message = format!(
                    "{why}: the backup holds the data directory without that volume; a restore takes the backup's WAL from the archive, and restore-prepare recreates pg_wal if its volume is not restored"
                );
                info!(%message, "pg_wal not located");
                ctx.publish(backup, EventType::Normal, "WalNotLocated", message)
                    .await;
            }
            None
        }
    };
    let classes = snapshot_classes(&ctx.client, backup, &plan).await?;
    let cut_plan = cut_plan(&ctx.client, backup, &classes).await?;
    check_names_free(ctx, backup, &plan, wal_volume.as_ref(), &cut_plan).await?;
    record_cut(ctx, backup, status, &cut_plan).await;
    announce_start(ctx, backup, status, &pod, &server).await?;
    if let CutPlan::Group { .. } = cut_plan {
        let ns = backup.namespace().unwrap_or_default();
        let uid = backup.uid().unwrap_or_default();
        group::label_claims(&ctx.client, &ns, &claims_of(&plan), &uid).await?;
    }

    // Backup mode begins here: from now on every step races the deadline.
    let deadline = Instant::now() + backup.spec.deadline.0;
    let started = start_backup(ctx, backup, &mut session, status).await?;
    let window_start = Instant::now();
    let mut cut = match &cut_plan {
        // From a standby too: a cut at one instant holds pg_control as of that instant, and
        // minRecoveryPoint in it is raised before any page it covers is written, which is
        // what cutting the data volume last achieves one by one.
        CutPlan::Group { class } => {
            cut_group(ctx, backup, status, plan.len(), class, deadline).await?
        }
        CutPlan::Volumes { .. } => {
            let standby = server.in_recovery;
            cut_snapshots(ctx, backup, status, &plan, &classes, standby, deadline).await?
        }
    };
    let stopped = stop_backup(ctx, backup, &mut session, status, &cut.snapshots, deadline).await?;
    let window = window_start.elapsed();
    if let Some(g) = &cut.group {
        cut.snapshots = take_members(ctx, backup, &plan, g, deadline).await?;
        status.snapshots = cut
            .snapshots
            .iter()
            .map(|(p, v)| snapshot_status(p, v))
            .collect();
    }
    let archive_wait = match source == WalSource::Archive && backup.spec.wait_for_archive {
        true => Some(wait_archived(ctx, backup, &session, status, &stopped, deadline).await?),
        false => None,
    };
    let kept = match &wal_volume {
        Some(volume) => {
            let class = &classes[plan.iter().position(|p| *p == volume.planned).unwrap_or(0)].name;
            let kept = keep_wal(
                ctx, backup, &session, status, volume, class, &stopped, deadline,
            );
            Some(kept.await?)
        }
        None => None,
    };
    session.release().await;
    drop(session);
    let after = AfterBackupMode {
        archive_wait,
        kept: kept.as_ref().map(|k| k.took),
    };
    record_timings(ctx, status, &started, cut.took, &stopped, window, after);

    let mut record = label_record(backup, &server, &started, &stopped, &cut.snapshots);
    record.wal = kept.map(|k| k.record);
    store_label(ctx, backup, &record, &cut.snapshots).await?;
    finalize(ctx, backup, status, &stopped, window).await
}

/// What a backup waited for after backup mode: the archive, or its WAL snapshot.
struct AfterBackupMode {
    archive_wait: Option<Duration>,
    kept: Option<Duration>,
}

/// The volume holding `pg_wal`, as planned: the WAL snapshot is cut of it.
struct WalVolume {
    planned: PlannedSnapshot,
    location: Location,
    /// A standby's WAL receiver before backup mode, which must have streamed all of its WAL.
    receiver: Option<WalReceiver>,
}

/// The backup's WAL, kept and proven.
struct KeptWal {
    record: WalRecord,
    /// WAL snapshot requested → cut and listed.
    took: Duration,
}

/// After backup mode (the window does not grow): one more snapshot of pg_wal's volume, cut
/// while the session's slot still holds the WAL from the start, then proven to hold every
/// segment from the start to the stop by the server's own listing.
#[allow(clippy::too_many_arguments)]
async fn keep_wal(
    ctx: &Context,
    backup: &Backup,
    session: &Session,
    status: &mut BackupStatus,
    volume: &WalVolume,
    class: &str,
    stopped: &Stopped,
    deadline: Instant,
) -> Result<KeptWal, Failure> {
    let begin = Instant::now();
    let uid = backup.uid().unwrap_or_default();
    let api: Api<VolumeSnapshot> =
        Api::namespaced(ctx.client.clone(), &backup.namespace().unwrap_or_default());
    let claim = &volume.planned.persistent_volume_claim;
    let name = snapshots::wal_snapshot_name(&backup.name_any(), claim);
    let annotations = label_annotations(backup);
    let message = "out of backup mode; cutting the WAL snapshot that keeps the backup's WAL";
    set_phase(status, backup, Phase::Stopping, "KeepingWal", message);
    let segment_size = session.server().wal_segment_size;
    let (first, last) = (&stopped.label.start_wal_file, &stopped.stop_wal_file);
    if let Some(before) = &volume.receiver {
        let after = session.wal_receiver(Step::Stop).await?;
        let start = stopped.label.start_wal_location;
        phase::streamed(
            before,
            after.as_ref(),
            start,
            stopped.stop_lsn,
            stopped.timeline,
        )?;
    }
    // Listed before the cut as well as after: present in both, a segment was there at it.
    let listed = session.list_wal(first, last).await?;
    phase::check_wal_kept(first, last, segment_size, &listed)?;
    snapshots::create(&api, backup, &name, claim, class, annotations).await?;
    let wait = timeout_at(
        deadline.into(),
        snapshots::wait_until(
            &api,
            &uid,
            std::slice::from_ref(&name),
            VolumeSnapshot::is_cut,
        ),
    );
    let (cut, written) = tokio::join!(wait, ctx.patch_status(backup, status));
    written?;
    let snapshot = cut
        .map_err(|_| {
            deadline_exceeded(
                backup.spec.deadline,
                "waiting for the WAL snapshot to be cut",
            )
        })??
        .remove(0);

    let listed = session.list_wal(first, last).await?;
    phase::check_wal_kept(first, last, segment_size, &listed)?;
    let took = begin.elapsed();
    ctx.metrics
        .observe(TimedStep::WalSnapshot, took.as_secs_f64());
    info!(snapshot = %name, %first, %last, seconds = took.as_secs_f64(), "the backup's WAL is kept");
    status.snapshots.push(SnapshotStatus {
        role: VolumeRole::BackupWal,
        tablespace: None,
        path_in_volume: volume.location.path_in_volume.clone(),
        ..snapshot_status(&volume.planned, &snapshot)
    });
    Ok(KeptWal {
        record: WalRecord {
            volume_snapshot: name,
            persistent_volume_claim: claim.clone(),
            path_in_volume: volume.location.path_in_volume.clone(),
            timeline: stopped.timeline,
            first_segment: first.clone(),
            last_segment: last.clone(),
            segment_size,
            checked_by: match volume.receiver {
                Some(_) => "pg_ls_waldir,pg_stat_wal_receiver".into(),
                None => "pg_ls_waldir".into(),
            },
        },
        took,
    })
}

fn postgres_status(pod: &Pod, server: &postgres::ServerInfo) -> PostgresStatus {
    PostgresStatus {
        pod: pod.name_any(),
        version: Some(server.version.clone()),
        system_identifier: Some(server.system_identifier.to_string()),
        timeline: Some(server.timeline),
        role: Some(if server.in_recovery {
            ServerRole::Standby
        } else {
            ServerRole::Primary
        }),
    }
}

/// How well the plan knows where `pg_wal`'s files are.
pub(crate) enum WalLocation {
    /// The server said (or no other volume could hold them): the plan's WAL location is
    /// exact.
    Known,
    /// Its volume is one of the listed claims, but not where on it: enough to snapshot the
    /// volume, not to name the directory a restore takes the backup's WAL from. Why.
    VolumeOnly(String),
    /// It may link to another volume that no one can name, which the plan leaves out. Why.
    Unknown(String),
}

impl WalLocation {
    /// Why the backup's WAL could not be kept in a snapshot, if it could not.
    pub(crate) fn unconfirmed(&self) -> Option<&str> {
        match self {
            WalLocation::Known => None,
            WalLocation::VolumeOnly(why) | WalLocation::Unknown(why) => Some(why),
        }
    }
}

/// Which claims to snapshot: the directories the server reports, through the pod's mounts,
/// and how well that knows where pg_wal is.
pub(crate) async fn plan_snapshots(
    session: &mut Session,
    pod: &Pod,
    spec: &BackupSpec,
) -> Result<(Vec<PlannedSnapshot>, WalLocation), Failure> {
    let server = session.server().clone();
    let overrides: Vec<String> = spec
        .volumes
        .iter()
        .map(|v| v.persistent_volume_claim.clone())
        .collect();
    let pod_spec = pod.spec.clone().unwrap_or_default();
    let mut dirs = database_dirs(&server);
    let mut location = WalLocation::Known;
    // pg_wal may be a link to another volume, which SQL cannot read; ask the server which of
    // the pod's other writable mounts is its WAL directory. Only when there are any: the
    // common single-volume pod needs no file-reading privilege.
    let candidates = volumes::wal_candidates(&pod_spec, &server.data_directory);
    if !candidates.is_empty() {
        let candidates: Vec<&str> = candidates.iter().map(String::as_str).collect();
        match session.locate_wal(&candidates).await {
            Ok(Some(wal)) => dirs[1].path = wal,
            Ok(None) => {}
            // PostgreSQL 10 cannot say, nor can a role without file access: pg_wal is then
            // on the one listed claim no other directory uses (where on it, nobody knows),
            // inside the data directory when the listed claims leave no other (the user's list
            // is the database's claims), or unknown.
            Err(e)
                if server.major < 11 || matches!(e, postgres::Error::MissingPrivilege { .. }) =>
            {
                location = match volumes::wal_on_listed_claim(&pod_spec, &dirs, &overrides) {
                    Some(wal) => {
                        let why = format!(
                            "pg_wal's files are somewhere on the volume mounted at {wal}, and {}",
                            cannot_say(&e)
                        );
                        dirs[1].path = wal;
                        WalLocation::VolumeOnly(why)
                    }
                    None if overrides.is_empty() => WalLocation::Unknown(format!(
                        "pg_wal may link to another of the pod's volumes ({}), and {} (or list the database's claims in spec.volumes: the data claim alone when pg_wal is inside the data directory)",
                        candidates.join(", "),
                        cannot_say(&e)
                    )),
                    None => WalLocation::Known,
                };
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok((volumes::plan(&pod_spec, &dirs, &overrides)?, location))
}

/// Why the server could not say where pg_wal is, and how to have it say.
fn cannot_say(e: &postgres::Error) -> String {
    match e {
        postgres::Error::MissingPrivilege { grant, .. } => {
            format!(
                "the role may not read files outside the data directory to tell exactly ({grant})"
            )
        }
        _ => "PostgreSQL 10 shows no directory outside the data directory to tell exactly".into(),
    }
}

/// The VolumeSnapshotClass of each planned snapshot, resolved before backup mode begins.
pub(crate) async fn snapshot_classes(
    client: &Client,
    backup: &Backup,
    plan: &[PlannedSnapshot],
) -> Result<Vec<snapshots::ResolvedClass>, Failure> {
    let ns = backup.namespace().unwrap_or_default();
    let requested = backup.spec.volume_snapshot_class_name.as_deref();
    let mut classes = Vec::with_capacity(plan.len());
    for s in plan {
        let class = snapshots::resolve_class(client, &ns, &s.persistent_volume_claim, requested);
        classes.push(class.await?);
    }
    Ok(classes)
}

/// Before backup mode: the names this backup will create must be free, or its own. A
/// retained backup of an earlier Backup with this name is never adopted or overwritten.
async fn check_names_free(
    ctx: &Context,
    backup: &Backup,
    plan: &[PlannedSnapshot],
    wal: Option<&WalVolume>,
    cut: &CutPlan,
) -> Result<(), Failure> {
    let ns = backup.namespace().unwrap_or_default();
    let snapshot_api: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let backup_name = backup.name_any();
    let mut names: Vec<String> = match cut {
        CutPlan::Volumes { .. } => plan
            .iter()
            .map(|p| snapshots::snapshot_name(&backup_name, &p.persistent_volume_claim))
            .collect(),
        // The snapshot controller names a group's members, uniquely.
        CutPlan::Group { .. } => Vec::new(),
    };
    if let Some(w) = wal {
        let name = snapshots::wal_snapshot_name(&backup_name, &w.planned.persistent_volume_claim);
        if names.contains(&name) {
            return Err(Failure::new(
                "NameConflict",
                format!(
                    "the WAL snapshot of claim {} would be named {name}, like the snapshot of another of the pod's claims; walSource: Archive avoids it",
                    w.planned.persistent_volume_claim
                ),
            ));
        }
        names.push(name);
    }
    for name in names {
        if let Some(existing) = snapshot_api.get_opt(&name).await?
            && !created_by(&existing, &BACKUP_CREATOR, backup)
        {
            let kind = "VolumeSnapshot";
            return Err(snapshots::SnapshotError::NameConflict { kind, name }.into());
        }
    }
    if let CutPlan::Group { .. } = cut {
        let groups: Api<VolumeGroupSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
        let name = group::name(backup);
        if let Some(existing) = groups.get_opt(&name).await?
            && !created_by(&existing, &BACKUP_CREATOR, backup)
        {
            let kind = "VolumeGroupSnapshot";
            return Err(snapshots::SnapshotError::NameConflict { kind, name }.into());
        }
    }
    let name = label_store::config_map_name(&backup.name_any());
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(existing) = config_maps.get_opt(&name).await?
        && !created_by(&existing, &BACKUP_CREATOR, backup)
    {
        return Err(label_store::LabelStoreError::NameConflict(name).into());
    }
    Ok(())
}

async fn announce_start(
    ctx: &Context,
    backup: &Backup,
    status: &mut BackupStatus,
    pod: &Pod,
    server: &postgres::ServerInfo,
) -> Result<(), Failure> {
    let message = format!(
        "starting the backup on {} (PostgreSQL {}, {})",
        pod.name_any(),
        server.version,
        if server.in_recovery {
            "standby"
        } else {
            "primary"
        }
    );
    set_phase(status, backup, Phase::Starting, "Starting", &message);
    ctx.patch_status(backup, status).await?;
    ctx.publish(backup, EventType::Normal, "Starting", message)
        .await;
    Ok(())
}

async fn start_backup(
    ctx: &Context,
    backup: &Backup,
    session: &mut Session,
    status: &mut BackupStatus,
) -> Result<Started, Failure> {
    let label = format!(
        "pgsnap {}/{}",
        backup.namespace().unwrap_or_default(),
        backup.name_any()
    );
    let spec = &backup.spec;
    let started = session
        .start(&label, spec.checkpoint == Checkpoint::Fast, spec.deadline.0)
        .await?;
    ctx.metrics
        .observe(TimedStep::Start, started.took.as_secs_f64());
    status.start_lsn = Some(started.start_lsn.to_string());
    status.wal_pinned = Some(started.wal_pinned);
    status.backup_window = Some(BackupWindow {
        started_at: now(),
        stopped_at: None,
        seconds: None,
    });
    info!(start_lsn = %started.start_lsn, checkpoint_seconds = started.took.as_secs_f64(), wal_pinned = started.wal_pinned, "in backup mode");
    Ok(started)
}

/// The snapshots, cut, each with the plan entry it was made for.
struct Cut {
    /// Of a group: empty until its members are taken on, after backup mode.
    snapshots: Vec<(PlannedSnapshot, VolumeSnapshot)>,
    /// Snapshots requested → all cut: the storage driver's share of backup mode.
    took: Duration,
    group: Option<VolumeGroupSnapshot>,
}

/// Whether the volumes are cut as one group (`group::plan`), from the claims' drivers (one
/// class per claim) and the cluster's group classes.
pub(crate) async fn cut_plan(
    client: &Client,
    backup: &Backup,
    classes: &[snapshots::ResolvedClass],
) -> Result<CutPlan, Failure> {
    let drivers: Vec<&str> = classes.iter().map(|c| c.driver.as_str()).collect();
    let spec = &backup.spec;
    let group_classes = match spec.group_snapshot {
        GroupSnapshotPolicy::Never => None,
        _ => group::classes(client).await?,
    };
    let requested = spec.volume_group_snapshot_class_name.as_deref();
    Ok(group::plan(
        spec.group_snapshot,
        requested,
        &drivers,
        group_classes.as_deref(),
    )?)
}

/// How the volumes are cut, recorded in status before backup mode; a fallback of
/// `groupSnapshot: Auto` is said in an Event too.
async fn record_cut(ctx: &Context, backup: &Backup, status: &mut BackupStatus, plan: &CutPlan) {
    status.cut = Some(match plan {
        CutPlan::Group { class } => CutStatus {
            method: CutMethod::VolumeGroupSnapshot,
            volume_group_snapshot: Some(group::name(backup)),
            volume_group_snapshot_class: Some(class.clone()),
            reason: None,
        },
        CutPlan::Volumes { why_not_group } => CutStatus {
            reason: why_not_group.clone(),
            ..Default::default()
        },
    });
    if let CutPlan::Volumes {
        why_not_group: Some(why),
    } = plan
    {
        let message = format!("cutting one snapshot per volume, not a group: {why}");
        info!(%message, "no group snapshot");
        ctx.publish(backup, EventType::Normal, "OneSnapshotPerVolume", message)
            .await;
    }
}

fn claims_of(plan: &[PlannedSnapshot]) -> Vec<String> {
    plan.iter()
        .map(|p| p.persistent_volume_claim.clone())
        .collect()
}

/// Every snapshot of a backup names its label ConfigMap.
fn label_annotations(backup: &Backup) -> BTreeMap<String, String> {
    BTreeMap::from([(
        LABEL_CONFIGMAP_ANNOTATION.to_string(),
        label_store::config_map_name(&backup.name_any()),
    )])
}

/// Snapshotting, as one group: request the VolumeGroupSnapshot of the labelled claims and
/// wait (by watch) until it is cut. Its members are taken on after backup mode.
async fn cut_group(
    ctx: &Context,
    backup: &Backup,
    status: &mut BackupStatus,
    volumes: usize,
    class: &str,
    deadline: Instant,
) -> Result<Cut, Failure> {
    let uid = backup.uid().unwrap_or_default();
    let api: Api<VolumeGroupSnapshot> =
        Api::namespaced(ctx.client.clone(), &backup.namespace().unwrap_or_default());
    let begin = Instant::now();
    let message = format!("cutting {volumes} volume(s) as one VolumeGroupSnapshot in backup mode");
    set_phase(
        status,
        backup,
        Phase::Snapshotting,
        "Snapshotting",
        &message,
    );
    let name = group::create(&api, backup, class).await?.name_any();
    let bound = |g: &VolumeGroupSnapshot| g.content_name().is_some();
    let wait = timeout_at(
        deadline.into(),
        snapshots::wait_until(&api, &uid, std::slice::from_ref(&name), bound),
    );
    let (done, written) = tokio::join!(wait, ctx.patch_status(backup, status));
    written?;
    // A snapshot controller without its CSIVolumeGroupSnapshot feature gate never takes the
    // group up: the message says so.
    let group = done
        .map_err(|_| {
            deadline_exceeded(
                backup.spec.deadline,
                "waiting for the snapshot controller to take up the group snapshot (it never made its VolumeGroupSnapshotContent: does it run with --feature-gates=CSIVolumeGroupSnapshot=true?)",
            )
        })??
        .remove(0);
    timeout_at(
        deadline.into(),
        group::wait_content_cut(&ctx.client, &group),
    )
    .await
    .map_err(|_| {
        deadline_exceeded(
            backup.spec.deadline,
            "waiting for the group snapshot to be cut",
        )
    })??;
    let took = begin.elapsed();
    ctx.metrics.observe(TimedStep::GroupCut, took.as_secs_f64());
    Ok(Cut {
        snapshots: Vec::new(),
        took,
        group: Some(group),
    })
}

/// After backup mode: the claims lose the group's label, and the group's members (made by
/// the snapshot controller) become the backup's snapshots, one per planned volume.
async fn take_members(
    ctx: &Context,
    backup: &Backup,
    plan: &[PlannedSnapshot],
    group: &VolumeGroupSnapshot,
    deadline: Instant,
) -> Result<Vec<(PlannedSnapshot, VolumeSnapshot)>, Failure> {
    let ns = backup.namespace().unwrap_or_default();
    let uid = backup.uid().unwrap_or_default();
    // Only the label's tidiness is at stake: the group chose its claims when it was created.
    if let Err(e) = group::unlabel_claims(&ctx.client, &ns, &uid).await {
        warn!(error = %e, "could not remove the group label from the claims; it is removed with the Backup");
    }
    let api: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let (claims, annotations) = (claims_of(plan), label_annotations(backup));
    let adopt = group::adopt_members(&api, backup, group, &claims, &annotations);
    let mut members = timeout_at(deadline.into(), adopt).await.map_err(|_| {
        Failure::new(
            "DeadlineExceeded",
            format!(
                "the backup exceeded its deadline of {} while waiting for the members of group snapshot {} (the server had left backup mode)",
                backup.spec.deadline,
                group.name_any()
            ),
        )
    })??;
    Ok(plan
        .iter()
        .filter_map(|p| Some((p.clone(), members.remove(&p.persistent_volume_claim)?)))
        .collect())
}

/// Snapshotting: request each batch of snapshots and wait (by watch) until all are cut.
async fn cut_snapshots(
    ctx: &Context,
    backup: &Backup,
    status: &mut BackupStatus,
    plan: &[PlannedSnapshot],
    classes: &[snapshots::ResolvedClass],
    standby: bool,
    deadline: Instant,
) -> Result<Cut, Failure> {
    let uid = backup.uid().unwrap_or_default();
    let api: Api<VolumeSnapshot> =
        Api::namespaced(ctx.client.clone(), &backup.namespace().unwrap_or_default());
    let annotations = label_annotations(backup);
    let begin = Instant::now();
    let message = format!("cutting {} snapshot(s) in backup mode", plan.len());
    set_phase(
        status,
        backup,
        Phase::Snapshotting,
        "Snapshotting",
        &message,
    );
    let mut cut = Vec::new();
    let mut status_written = false;
    for batch in volumes::batches(plan, standby) {
        let mut names = Vec::new();
        for planned in &batch {
            let class = &classes[plan.iter().position(|p| p == *planned).unwrap_or(0)].name;
            let claim = &planned.persistent_volume_claim;
            let name = snapshots::snapshot_name(&backup.name_any(), claim);
            let created =
                snapshots::create(&api, backup, &name, claim, class, annotations.clone()).await?;
            names.push(created.name_any());
        }
        let wait = timeout_at(
            deadline.into(),
            snapshots::wait_until(&api, &uid, &names, VolumeSnapshot::is_cut),
        );
        // The status write overlaps the driver's cut instead of lengthening backup mode.
        let done = if status_written {
            wait.await
        } else {
            status_written = true;
            let (done, written) = tokio::join!(wait, ctx.patch_status(backup, status));
            written?;
            done
        };
        let snapshots = done.map_err(|_| {
            deadline_exceeded(backup.spec.deadline, "waiting for the snapshots to be cut")
        })??;
        cut.extend(batch.iter().map(|p| (*p).clone()).zip(snapshots));
    }
    let took = begin.elapsed();
    ctx.metrics.observe(TimedStep::Cut, took.as_secs_f64());
    Ok(Cut {
        snapshots: cut,
        took,
        group: None,
    })
}

/// Stopping: the stop call in the same session, raced against the deadline; the session is
/// closed as soon as it returns.
async fn stop_backup(
    ctx: &Context,
    backup: &Backup,
    session: &mut Session,
    status: &mut BackupStatus,
    cut: &[(PlannedSnapshot, VolumeSnapshot)],
    deadline: Instant,
) -> Result<Stopped, Failure> {
    let message = "all snapshots cut; stopping the backup";
    set_phase(status, backup, Phase::Stopping, "Stopping", message);
    status.snapshots = cut.iter().map(|(p, v)| snapshot_status(p, v)).collect();
    // The stop never waits for the archive itself: that wait, when asked for, comes after it,
    // outside backup mode (`wait_archived`).
    let stop = timeout_at(deadline.into(), session.stop(false));
    let (stopped, written) = tokio::join!(stop, ctx.patch_status(backup, status));
    let stopped =
        stopped.map_err(|_| deadline_exceeded(backup.spec.deadline, "stopping the backup"))??;
    written?;
    Ok(stopped)
}

/// After backup mode, with `walSource: Archive` and `waitForArchive`: until the backup's last
/// segment is archived, so a restore finds every segment it needs there. Its time.
async fn wait_archived(
    ctx: &Context,
    backup: &Backup,
    session: &Session,
    status: &mut BackupStatus,
    stopped: &Stopped,
    deadline: Instant,
) -> Result<Duration, Failure> {
    let segment = &stopped.stop_wal_file;
    let message = format!("out of backup mode; waiting until {segment} is archived");
    set_phase(
        status,
        backup,
        Phase::Stopping,
        "WaitingForArchive",
        &message,
    );
    let wait = timeout_at(deadline.into(), session.wait_archived(segment));
    let (archived, written) = tokio::join!(wait, ctx.patch_status(backup, status));
    let took = archived.map_err(|_| {
        Failure::new(
            "DeadlineExceeded",
            format!(
                "the backup exceeded its deadline of {} while waiting until {segment} was archived (the server had left backup mode): the archive lacks the backup's WAL, so the backup could not be restored",
                backup.spec.deadline
            ),
        )
    })??;
    written?;
    ctx.metrics
        .observe(TimedStep::ArchiveWait, took.as_secs_f64());
    Ok(took)
}

fn record_timings(
    ctx: &Context,
    status: &mut BackupStatus,
    started: &Started,
    cut_wait: Duration,
    stopped: &Stopped,
    window: Duration,
    after: AfterBackupMode,
) {
    ctx.metrics
        .observe(TimedStep::Stop, stopped.took.as_secs_f64());
    ctx.metrics
        .backup_mode_seconds
        .observe(window.as_secs_f64());
    let overhead = phase::overhead(
        window.as_secs_f64(),
        cut_wait.as_secs_f64(),
        stopped.took.as_secs_f64(),
    );
    ctx.metrics.observe(TimedStep::Overhead, overhead);
    status.timings = Some(BackupTimings {
        checkpoint_seconds: started.took.as_secs_f64(),
        cut_seconds: cut_wait.as_secs_f64(),
        stop_seconds: stopped.took.as_secs_f64(),
        overhead_seconds: overhead,
        wal_snapshot_seconds: after.kept.map(|d| d.as_secs_f64()),
        archive_wait_seconds: after.archive_wait.map(|d| d.as_secs_f64()),
    });
    info!(
        stop_lsn = %stopped.stop_lsn,
        window_seconds = window.as_secs_f64(),
        cut_seconds = cut_wait.as_secs_f64(),
        stop_seconds = stopped.took.as_secs_f64(),
        "out of backup mode"
    );
}

fn label_record(
    backup: &Backup,
    server: &postgres::ServerInfo,
    started: &Started,
    stopped: &Stopped,
    cut: &[(PlannedSnapshot, VolumeSnapshot)],
) -> LabelRecord {
    LabelRecord {
        backup: Some(backup.name_any()),
        backup_label: stopped.labelfile.clone(),
        tablespace_map: stopped.spcmapfile.clone(),
        start_lsn: started.start_lsn.to_string(),
        stop_lsn: stopped.stop_lsn.to_string(),
        timeline: stopped.timeline,
        server_version: server.version.clone(),
        system_identifier: server.system_identifier.to_string(),
        volumes: cut
            .iter()
            .flat_map(|(p, v)| {
                p.locations.iter().map(|l| SnapshotLocation {
                    volume_snapshot: v.name_any(),
                    location: l.clone(),
                })
            })
            .collect(),
        wal: None,
    }
}

/// The label ConfigMap, owned by the data directory's snapshot.
async fn store_label(
    ctx: &Context,
    backup: &Backup,
    record: &LabelRecord,
    cut: &[(PlannedSnapshot, VolumeSnapshot)],
) -> Result<(), Failure> {
    let data = cut
        .iter()
        .find(|(p, _)| p.role == VolumeRole::Data)
        .map(|(_, v)| v)
        .ok_or_else(|| Failure::new("PathNotOnClaim", "no snapshot holds the data directory"))?;
    let name = label_store::config_map_name(&backup.name_any());
    label_store::store(&ctx.client, record, &name, backup, data).await?;
    Ok(())
}

/// Out of backup mode: record the stop and hand the Backup to the reconciler (Finalizing).
async fn finalize(
    ctx: &Context,
    backup: &Backup,
    status: &mut BackupStatus,
    stopped: &Stopped,
    window: Duration,
) -> Result<(), Failure> {
    let seconds = format!("{:.3}", window.as_secs_f64());
    status.stop_lsn = Some(stopped.stop_lsn.to_string());
    status.start_wal = Some(stopped.label.start_wal_file.clone());
    status.stop_wal = Some(stopped.stop_wal_file.clone());
    status.label_config_map = Some(label_store::config_map_name(&backup.name_any()));
    if let Some(w) = status.backup_window.as_mut() {
        w.stopped_at = Some(now());
        w.seconds = Some(seconds.clone());
    }
    let message = format!(
        "out of backup mode after {seconds}s; waiting for the snapshots to be ready to use"
    );
    set_phase(
        status,
        backup,
        Phase::Finalizing,
        "WaitingForReady",
        &message,
    );
    ctx.patch_status(backup, status).await?;
    ctx.publish(backup, EventType::Normal, "BackupModeEnded", message)
        .await;
    Ok(())
}

fn deadline_exceeded(deadline: crate::api::Duration, step: &str) -> Failure {
    Failure::new(
        "DeadlineExceeded",
        format!(
            "the backup exceeded its deadline of {deadline} while {step}; the session was closed, so PostgreSQL aborted the backup"
        ),
    )
}

fn snapshot_status(planned: &PlannedSnapshot, snapshot: &VolumeSnapshot) -> SnapshotStatus {
    let main = planned.main_location();
    SnapshotStatus {
        name: snapshot.name_any(),
        persistent_volume_claim: planned.persistent_volume_claim.clone(),
        role: planned.role,
        tablespace: main.tablespace.clone(),
        path_in_volume: main.path_in_volume.clone(),
        cut_at: snapshot
            .status
            .as_ref()
            .and_then(|s| s.creation_time.clone()),
        ready_to_use: snapshot.is_ready(),
        restore_size: snapshot
            .status
            .as_ref()
            .and_then(|s| s.restore_size.as_ref())
            .map(|q| q.0.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec};

    #[test]
    fn the_port_comes_from_the_spec_then_the_named_container_port() {
        let pod = Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "db".into(),
                    ports: Some(vec![
                        ContainerPort {
                            name: Some("metrics".into()),
                            container_port: 9187,
                            ..Default::default()
                        },
                        ContainerPort {
                            name: Some("postgresql".into()),
                            container_port: 5433,
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(port_of(&pod, Some(6000)), 6000);
        assert_eq!(port_of(&pod, None), 5433);
        assert_eq!(port_of(&Pod::default(), None), 5432);
    }
}
