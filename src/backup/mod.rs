//! The Backup reconciler. Pending backups are admitted here and handed to a session task
//! (see `task`), which holds the database session through Starting, Snapshotting and
//! Stopping; the reconciler takes over again for Finalizing (waiting for readyToUse).

pub mod phase;
pub mod task;
#[cfg(test)]
mod tests;
pub mod volumes;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::channel::mpsc;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tokio::sync::{oneshot, watch};
use tracing::{Instrument, info, info_span, warn};

use crate::api::backup::{Backup, BackupError, BackupStatus, DeletionPolicy, Phase};
use crate::api::snapshot::{SnapshotLike as _, VolumeSnapshot};
use crate::api::{BACKUP_CREATOR, BACKUP_UID_LABEL};
use crate::controller::{
    self, CLEANUP_PATIENCE, Failure, PhasedStatus, Progress, Reporter, delete_if_created_by, now,
    set_phase,
};
use crate::label_store;
use crate::snapshots::{self, Removal, SnapshotError};
use crate::telemetry::{DatabaseLabels, Metrics, Outcome, TimedStep};
use phase::{Admission, Next, Readiness, SnapshotObservation};

/// How often a Backup waiting for its Secret looks for it again.
const SECRET_RECHECK: Duration = Duration::from_secs(5);

/// How often a failed Backup looks again at what it defers that no watch wakes it for.
const RECHECK: Duration = Duration::from_secs(5);

/// Keeps a Backup until its snapshots are dealt with as its deletionPolicy says.
pub const FINALIZER: &str = "pgsnap.io/backup-protection";

#[derive(Clone, Debug)]
pub struct Settings {
    /// Backups holding a database session at once, across all databases.
    pub max_concurrent: usize,
    pub connect_timeout: Duration,
    /// Watch one namespace only; none watches all.
    pub namespace: Option<String>,
}

impl PhasedStatus for BackupStatus {
    type Phase = Phase;

    fn progress(phase: Phase) -> Progress {
        match phase {
            Phase::Completed => Progress::Succeeded,
            Phase::Failed => Progress::Failed,
            _ => Progress::InProgress,
        }
    }

    fn phase(&self) -> Option<Phase> {
        self.phase
    }

    fn set_phase_fields(&mut self, phase: Phase, generation: Option<i64>) {
        self.phase = Some(phase);
        self.observed_generation = generation;
    }

    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
}

/// Errors of one reconcile; permanent problems become a Failed status instead, so every
/// error here is worth a retry with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    #[error("snapshots still being cut, deleted once cut: {}", .0.join(", "))]
    BeingCut(Vec<String>),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApi",
            Error::Snapshot(e) => e.reason(),
            Error::Finalizer(_) => "Finalizer",
            Error::BeingCut(_) => "SnapshotsBeingCut",
        }
    }
}

/// A backup holding a session in this process.
struct Running {
    name: String,
    /// The database(s) it may run on (`task::database_keys`).
    databases: Vec<String>,
    /// Sending a failure ends the task: it closes the session, cleans up and reports it.
    abort: Option<oneshot::Sender<Failure>>,
    /// Becomes true when the task has finished, cleanup included.
    done: watch::Receiver<bool>,
}

pub struct Context {
    pub client: Client,
    pub reporter: Reporter,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    running: Mutex<HashMap<String, Running>>,
    /// The last phase this process wrote for each Backup (by key, with its uid), to tell a
    /// cached copy that lags behind our own write.
    written: Mutex<HashMap<String, (String, Phase)>>,
    /// A task ended: queued backups may now run.
    finished: mpsc::UnboundedSender<()>,
    /// Since when the deletion cleanup of each Backup (by uid) has failed.
    cleanup_failing: Mutex<HashMap<String, Instant>>,
}

fn key(backup: &Backup) -> String {
    format!(
        "{}/{}",
        backup.namespace().unwrap_or_default(),
        backup.name_any()
    )
}

impl Context {
    /// `finished` hears of every task that ends, so queued backups get their turn.
    fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        finished: mpsc::UnboundedSender<()>,
    ) -> Self {
        Context {
            reporter: Reporter::new(client.clone(), "Backup"),
            client,
            metrics,
            settings,
            running: Mutex::new(HashMap::new()),
            written: Mutex::new(HashMap::new()),
            finished,
            cleanup_failing: Mutex::new(HashMap::new()),
        }
    }

    /// How long the cleanup of `backup` has been failing, counting this failure.
    fn cleanup_failing_for(&self, backup: &Backup) -> Duration {
        let mut failing = self
            .cleanup_failing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let since = failing
            .entry(backup.uid().unwrap_or_default())
            .or_insert_with(Instant::now);
        since.elapsed()
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_running(&self, key: &str) -> bool {
        self.running().contains_key(key)
    }

    fn release(&self, key: &str) {
        let mut running = self.running();
        running.remove(key);
        self.metrics.in_flight.set(running.len() as i64);
        let _ = self.finished.unbounded_send(());
    }

    /// Ends the task of one backup (if any) with `why` and waits until it has cleaned up.
    async fn abort(&self, key: &str, why: Failure) {
        let mut done = {
            let mut running = self.running();
            let Some(entry) = running.get_mut(key) else {
                return;
            };
            if let Some(abort) = entry.abort.take() {
                let _ = abort.send(why);
            }
            entry.done.clone()
        };
        let _ = done.wait_for(|d| *d).await;
    }

    /// Ends every running backup (operator shutdown) and waits for their cleanup.
    pub async fn abort_all(&self, why: Failure) {
        let keys: Vec<String> = self.running().keys().cloned().collect();
        futures::future::join_all(keys.iter().map(|k| self.abort(k, why.clone()))).await;
    }

    pub async fn publish(&self, backup: &Backup, type_: EventType, reason: &str, note: String) {
        self.reporter.publish(backup, type_, reason, note).await;
    }

    /// Writes status, and remembers the phase written so a lagging cached copy is not acted on.
    pub async fn patch_status(
        &self,
        backup: &Backup,
        status: &BackupStatus,
    ) -> Result<(), kube::Error> {
        // status.verification and the Verified condition are the Verification controller's,
        // under its own field manager: this one never sends them, so it never takes them
        // over or writes back an old one.
        let mut status = BackupStatus {
            verification: None,
            ..status.clone()
        };
        status
            .conditions
            .retain(|c| c.type_ != crate::verify::VERIFIED_CONDITION);
        let status = &status;
        self.reporter.patch_status(backup, status).await?;
        if let (Some(phase), Some(uid)) = (status.phase, backup.uid()) {
            self.written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key(backup), (uid, phase));
        }
        Ok(())
    }

    /// Fails a backup: removes what it made (a label without its data restores nothing), then
    /// records the reason in status, an Event and the metrics. The session is already closed.
    pub async fn fail(
        &self,
        backup: &Backup,
        status: &mut BackupStatus,
        failure: Failure,
    ) -> Result<(), kube::Error> {
        let removed = self.remove_made(backup).await;
        let cleanup_note = match &removed {
            Ok(r) => removal_note(r),
            Err(e) => format!(
                " (deleting its snapshots failed: {e}; delete VolumeSnapshots labelled {BACKUP_UID_LABEL}={})",
                backup.uid().unwrap_or_default()
            ),
        };
        warn!(reason = %failure.reason, message = %failure.message, "backup failed");
        set_phase(
            status,
            backup,
            Phase::Failed,
            &failure.reason,
            &failure.message,
        );
        status.snapshots.clear();
        status.snapshots_to_delete = removed.map(|r| r.deferred).unwrap_or_default();
        status.label_config_map = None;
        status.error = Some(BackupError {
            reason: failure.reason.clone(),
            message: failure.message.clone(),
        });
        self.patch_status(backup, status).await?;
        let note = format!("{}{cleanup_note}", failure.message);
        self.publish(backup, EventType::Warning, &failure.reason, note)
            .await;
        self.metrics.ended(Outcome::Failed, &failure.reason);
        Ok(())
    }

    /// Deletes the snapshots (those still being cut later, see `snapshots::delete_all`) and the
    /// label ConfigMap this very Backup (by uid) made, and nothing else.
    async fn remove_made(&self, backup: &Backup) -> Result<Removal, SnapshotError> {
        let ns = backup.namespace().unwrap_or_default();
        let removed = snapshots::delete_all(&self.client, backup).await?;
        let cm: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
        let name = label_store::config_map_name(&backup.name_any());
        delete_if_created_by(&cm, &name, &BACKUP_CREATOR, backup).await?;
        Ok(removed)
    }

    /// Hands a backup to a session task when `phase::admit` lets it run now.
    fn start_task(
        self: &Arc<Self>,
        backup: Arc<Backup>,
        pods: Vec<Pod>,
        secrets: Secrets,
    ) -> Admission {
        let k = key(&backup);
        let databases = task::database_keys(&pods);
        let mut running = self.running();
        let busy: Vec<(Vec<String>, String)> = running
            .values()
            .map(|r| (r.databases.clone(), r.name.clone()))
            .collect();
        let admission = phase::admit(&databases, &busy, self.settings.max_concurrent);
        if admission != Admission::Go {
            return admission;
        }
        let (abort_tx, abort_rx) = oneshot::channel();
        let (done_tx, done_rx) = watch::channel(false);
        running.insert(
            k.clone(),
            Running {
                name: backup.name_any(),
                databases,
                abort: Some(abort_tx),
                done: done_rx,
            },
        );
        self.metrics.in_flight.set(running.len() as i64);
        let span = info_span!("backup", namespace = %backup.namespace().unwrap_or_default(), name = %backup.name_any());
        let work = task::Assignment {
            backup,
            connect_timeout: self.settings.connect_timeout,
            pods,
            password: secrets.password,
            ca_cert: secrets.ca_cert,
        };
        let ctx = self.clone();
        tokio::spawn(
            async move {
                task::run(&ctx, work, abort_rx).await;
                ctx.release(&k);
                let _ = done_tx.send(true);
            }
            .instrument(span),
        );
        admission
    }
}

async fn reconcile(backup: Arc<Backup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<Backup> =
        Api::namespaced(ctx.client.clone(), &backup.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, backup, |event| async {
        match event {
            finalizer::Event::Apply(b) => apply(b, ctx.clone()).await,
            finalizer::Event::Cleanup(b) => cleanup(b, ctx.clone()).await,
        }
    })
    .await
    .or_else(|e| match e {
        // The Backup (or its whole namespace) is already gone: nothing is left to clean up.
        finalizer::Error::RemoveFinalizer(kube::Error::Api(s)) if s.code == 404 => {
            Ok(Action::await_change())
        }
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => Err(e),
        e => Err(Error::Finalizer(Box::new(e))),
    })
}

/// Whether the cached copy lags behind a status this process wrote (then wait for the
/// watch to bring the write); a caught-up copy, or a new object of the same name, clears it.
fn lags_behind_own_write(ctx: &Context, backup: &Backup, cached: Option<Phase>) -> bool {
    let mut written = ctx.written.lock().unwrap_or_else(|e| e.into_inner());
    match written.get(&key(backup)) {
        Some((uid, phase))
            if Some(uid) == backup.uid().as_ref() && phase::is_stale(cached, *phase) =>
        {
            true
        }
        Some(_) => {
            written.remove(&key(backup));
            false
        }
        None => false,
    }
}

async fn apply(backup: Arc<Backup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let status = backup.status.clone().unwrap_or_default();
    if lags_behind_own_write(&ctx, &backup, status.phase) {
        return Ok(Action::await_change());
    }
    record_freshness(&ctx, &backup, &status);
    let to_delete = !status.snapshots_to_delete.is_empty();
    match phase::next(status.phase, ctx.is_running(&key(&backup)), to_delete) {
        Next::Admit => admit(backup, ctx).await,
        Next::LeaveToTask | Next::Done => Ok(Action::await_change()),
        Next::SessionLost => {
            let failure = Failure::new(
                "SessionLost",
                "the operator lost the database session mid-backup (restart or leadership change); PostgreSQL aborted the backup by itself. Create a new Backup",
            );
            ctx.fail(&backup, &mut status.clone(), failure).await?;
            Ok(Action::await_change())
        }
        Next::AwaitReady => await_ready(backup, ctx, status).await,
        Next::FinishRemoval => finish_removal(backup, ctx, status).await,
    }
}

/// A finished backup of a known database moves that database's freshness gauges; every
/// reconcile does, so the gauges are whole again after a restart.
fn record_freshness(ctx: &Context, backup: &Backup, status: &BackupStatus) {
    let (Some(phase), Some(at)) = (status.phase, status.ended_at()) else {
        return;
    };
    let Some(database) = status
        .postgres
        .as_ref()
        .and_then(|p| p.system_identifier.clone())
    else {
        return;
    };
    let result = match phase {
        Phase::Completed => Outcome::Completed,
        _ => Outcome::Failed,
    };
    let labels = DatabaseLabels {
        namespace: backup.namespace().unwrap_or_default(),
        database,
    };
    ctx.metrics
        .database_backup_ended(labels, result, at.0.as_second());
}

/// A failed backup's snapshots that were being cut: each is deleted once cut (a snapshot's
/// change wakes its Backup).
async fn finish_removal(
    backup: Arc<Backup>,
    ctx: Arc<Context>,
    mut status: BackupStatus,
) -> Result<Action, Error> {
    let removal = ctx.remove_made(&backup).await?;
    let waiting = !removal.deferred.is_empty();
    if removal.deferred != status.snapshots_to_delete {
        info!(
            deleted = removal.deleted,
            still_being_cut = removal.deferred.len(),
            "deleting the failed backup's snapshots once cut"
        );
        status.snapshots_to_delete = removal.deferred.clone();
        ctx.patch_status(&backup, &status).await?;
    }
    // A snapshot's cut wakes the Backup; a group's, or a content the sidecar finishes, does
    // not. One that never changes is deleted after the patience.
    Ok(match (waiting, removal.recheck) {
        (true, true) => Action::requeue(RECHECK),
        (true, false) => Action::requeue(CLEANUP_PATIENCE),
        (false, _) => Action::await_change(),
    })
}

fn removal_note(removal: &Removal) -> String {
    let mut notes = Vec::new();
    if removal.deleted > 0 {
        notes.push(format!("{} partial snapshot(s) deleted", removal.deleted));
    }
    if !removal.deferred.is_empty() {
        notes.push(format!(
            "{} snapshot(s) still being cut, deleted once cut: {}",
            removal.deferred.len(),
            removal.deferred.join(", ")
        ));
    }
    match notes.is_empty() {
        true => String::new(),
        false => format!(" ({})", notes.join("; ")),
    }
}

/// The password and CA certificate a Backup names.
pub(crate) struct Secrets {
    pub(crate) password: Option<String>,
    pub(crate) ca_cert: Option<Vec<u8>>,
}

/// What reading a Backup's Secrets found.
pub(crate) enum SecretsRead {
    Found(Secrets),
    /// A Secret or key is missing: the backup waits for it (why, for status).
    Missing(String),
    Invalid(Failure),
}

pub(crate) async fn read_secrets(
    client: &Client,
    backup: &Backup,
) -> Result<SecretsRead, kube::Error> {
    let ns = backup.namespace().unwrap_or_default();
    let conn = &backup.spec.connection;
    let mut values = [None, None];
    let refs = [
        ("password", &conn.password_secret_ref),
        ("CA certificate", &conn.ca_secret_ref),
    ];
    for (value, (what, reference)) in values.iter_mut().zip(refs) {
        let Some(reference) = reference else {
            continue;
        };
        let secret = Api::<Secret>::namespaced(client.clone(), &ns)
            .get_opt(&reference.name)
            .await?;
        match secret
            .and_then(|s| s.data)
            .and_then(|mut d| d.remove(&reference.key))
        {
            Some(bytes) => *value = Some(bytes.0),
            None => {
                return Ok(SecretsRead::Missing(format!(
                    "waiting for the {what} in Secret {}/{} key {:?}; the backup starts once it exists",
                    ns, reference.name, reference.key
                )));
            }
        }
    }
    let [password, ca_cert] = values;
    let Ok(password) = password.map(String::from_utf8).transpose() else {
        let failure = Failure::new(
            "InvalidSecret",
            "the password in the Secret is not valid UTF-8",
        );
        return Ok(SecretsRead::Invalid(failure));
    };
    Ok(SecretsRead::Found(Secrets { password, ca_cert }))
}

/// Pending: resolve the Secret and the pod, wait for a slot, then start the session task.
async fn admit(backup: Arc<Backup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let mut status = backup.status.clone().unwrap_or_default();
    let secrets = match read_secrets(&ctx.client, &backup).await? {
        SecretsRead::Found(secrets) => secrets,
        // Secrets are read by name only (no watch): check again on a timer.
        SecretsRead::Missing(message) => {
            wait_pending(&ctx, &backup, &mut status, "SecretNotFound", message).await?;
            return Ok(Action::requeue(SECRET_RECHECK));
        }
        SecretsRead::Invalid(failure) => {
            ctx.fail(&backup, &mut status, failure).await?;
            return Ok(Action::await_change());
        }
    };
    let pods = match task::target_pods(&ctx.client, &backup).await {
        Ok(pods) => pods,
        Err(failure) => {
            ctx.fail(&backup, &mut status, failure).await?;
            return Ok(Action::await_change());
        }
    };
    match ctx.start_task(backup.clone(), pods, secrets) {
        Admission::Go => Ok(Action::await_change()),
        Admission::DatabaseBusy { running } => {
            let message = format!(
                "queued: backup {running} of the same database is running; one backup per database at a time"
            );
            wait_pending(&ctx, &backup, &mut status, "DatabaseBusy", message).await
        }
        Admission::LimitReached { limit } => {
            let message = format!(
                "queued: {limit} backups are running, the operator's limit (--max-concurrent-backups)"
            );
            wait_pending(&ctx, &backup, &mut status, "WaitingForSlot", message).await
        }
    }
}

async fn wait_pending(
    ctx: &Context,
    backup: &Backup,
    status: &mut BackupStatus,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    if !controller::ready_says(&status.conditions, reason, &message) {
        info!(reason, %message, "backup pending");
        set_phase(status, backup, Phase::Pending, reason, &message);
        ctx.patch_status(backup, status).await?;
        ctx.publish(backup, EventType::Normal, reason, message)
            .await;
    }
    Ok(Action::await_change())
}

/// Each recorded snapshot as it is now; updates readyToUse and restoreSize in `status`.
fn observe_snapshots(
    status: &mut BackupStatus,
    existing: &[VolumeSnapshot],
) -> Vec<SnapshotObservation> {
    let by_name: HashMap<String, &VolumeSnapshot> =
        existing.iter().map(|s| (s.name_any(), s)).collect();
    status
        .snapshots
        .iter_mut()
        .map(|s| {
            let found = by_name.get(&s.name);
            if let Some(v) = found {
                s.ready_to_use = v.is_ready();
                s.restore_size = v
                    .status
                    .as_ref()
                    .and_then(|st| st.restore_size.as_ref())
                    .map(|q| q.0.clone());
            }
            SnapshotObservation {
                name: s.name.clone(),
                exists: found.is_some(),
                ready: found.is_some_and(|v| v.is_ready()),
                error: found.and_then(|v| v.error_message()),
            }
        })
        .collect()
}

/// Finalizing: the server left backup mode; wait (on snapshot watch events) for readyToUse.
async fn await_ready(
    backup: Arc<Backup>,
    ctx: Arc<Context>,
    mut status: BackupStatus,
) -> Result<Action, Error> {
    let api: Api<VolumeSnapshot> =
        Api::namespaced(ctx.client.clone(), &backup.namespace().unwrap_or_default());
    let existing = snapshots::list_own(&api, &backup).await?;
    let before = status.clone();
    // The readyTimeout runs from the stop; a timer, not a snapshot event, ends a wait past it.
    let waited = status
        .backup_window
        .as_ref()
        .and_then(|w| w.stopped_at.as_ref())
        .map(|t| k8s_openapi::jiff::Timestamp::now().duration_since(t.0))
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or_default();
    let timeout = backup.spec.ready_timeout;
    let overdue = (waited >= timeout.0).then_some(timeout);
    match phase::readiness(&observe_snapshots(&mut status, &existing), overdue) {
        Readiness::Wait => {
            if status != before {
                ctx.patch_status(&backup, &status).await?;
            }
            return Ok(Action::requeue(timeout.0.saturating_sub(waited)));
        }
        Readiness::Fail { reason, message } => {
            ctx.fail(&backup, &mut status, Failure::new(reason, message))
                .await?
        }
        Readiness::Complete => complete(&backup, &ctx, &mut status).await?,
    }
    Ok(Action::await_change())
}

async fn complete(
    backup: &Backup,
    ctx: &Context,
    status: &mut BackupStatus,
) -> Result<(), kube::Error> {
    let window = status
        .backup_window
        .as_ref()
        .and_then(|w| w.seconds.clone())
        .unwrap_or_default();
    let message = format!(
        "{} snapshot(s) ready to use; the server spent {window}s in backup mode",
        status.snapshots.len()
    );
    set_phase(status, backup, Phase::Completed, "Completed", &message);
    status.completed_at = Some(now());
    ctx.patch_status(backup, status).await?;
    if let Some(stopped) = status
        .backup_window
        .as_ref()
        .and_then(|w| w.stopped_at.as_ref())
    {
        let waited = k8s_openapi::jiff::Timestamp::now().duration_since(stopped.0);
        ctx.metrics.observe(TimedStep::Ready, waited.as_secs_f64());
    }
    ctx.publish(backup, EventType::Normal, "Completed", message)
        .await;
    ctx.metrics.ended(Outcome::Completed, "Completed");
    Ok(())
}

/// Deletion: end a running session, then honour the deletionPolicy.
async fn cleanup(backup: Arc<Backup>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.abort(
        &key(&backup),
        Failure::new(
            "Deleted",
            "the Backup was deleted while it ran; PostgreSQL aborted the backup",
        ),
    )
    .await;
    // Retain keeps a backup; one that never got out of backup mode left only partial
    // snapshots, which go whatever the policy.
    let out_of_backup_mode = matches!(
        backup.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Finalizing | Phase::Completed)
    );
    if backup.spec.deletion_policy == DeletionPolicy::Retain && out_of_backup_mode {
        info!("deletionPolicy Retain: keeping the backup's snapshots and label ConfigMap");
        return Ok(Action::await_change());
    }
    match ctx.remove_made(&backup).await {
        Ok(removal) if !removal.deferred.is_empty() => Err(Error::BeingCut(removal.deferred)),
        Ok(removal) => {
            info!(
                snapshots = removal.deleted,
                "deleted the backup's snapshots and label"
            );
            Ok(Action::await_change())
        }
        Err(e) if controller::cleanup_gives_up(e.api_error(), ctx.cleanup_failing_for(&backup)) => {
            let message = format!(
                "could not delete the backup's snapshots and label ConfigMap ({e}); letting the Backup go: delete what carries the label {BACKUP_UID_LABEL}={} by hand",
                backup.uid().unwrap_or_default()
            );
            warn!(reason = e.reason(), "{message}");
            ctx.publish(&backup, EventType::Warning, "CleanupAbandoned", message)
                .await;
            Ok(Action::await_change())
        }
        Err(e) => Err(e.into()),
    }
}

fn error_policy(backup: Arc<Backup>, error: &Error, _ctx: Arc<Context>) -> Action {
    match error {
        // Waiting, not failing: a snapshot's cut also wakes the Backup.
        Error::BeingCut(_) => info!(backup = %key(&backup), %error, "deletion waits"),
        _ => {
            warn!(backup = %key(&backup), reason = error.reason(), %error, "reconcile failed; retrying")
        }
    }
    match error {
        // The API server or the snapshot API is briefly unavailable: retry soon.
        Error::Kube(_) | Error::Snapshot(_) | Error::BeingCut(_) => {
            Action::requeue(Duration::from_secs(5))
        }
        Error::Finalizer(_) => Action::requeue(Duration::from_secs(15)),
    }
}

/// Runs the Backup controller until `shutdown` resolves, then aborts running backups cleanly.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (finished_tx, finished_rx) = mpsc::unbounded();
    let ns = settings.namespace.clone();
    let backups: Api<Backup> = controller::api(&client, ns.as_deref());
    let snapshots: Api<VolumeSnapshot> = controller::api(&client, ns.as_deref());
    let ctx = Arc::new(Context::new(client, settings, metrics, finished_tx));
    let controller = Controller::new(backups, watcher::Config::default());
    let store = controller.store();
    controller
        // Snapshots of a backup wake it when they are cut, ready or failed.
        .watches(
            snapshots,
            watcher::Config::default().labels(BACKUP_UID_LABEL),
            move |s: VolumeSnapshot| controller::creator_in(&store, &s, BACKUP_UID_LABEL),
        )
        .reconcile_all_on(finished_rx)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()))
        .await;
    info!("controller stopped; aborting running backups");
    ctx.abort_all(Failure::new(
        "OperatorShutdown",
        "the operator shut down mid-backup; PostgreSQL aborted the backup. Create a new Backup",
    ))
    .await;
}
