//! The Backup reconciler. Pending backups are admitted here and handed to a session task
//! (see `task`), which holds the database session through Starting, Snapshotting and
//! Stopping; the reconciler takes over again for Finalizing (waiting for readyToUse).

pub mod phase;
pub mod task;
pub mod volumes;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::{oneshot, watch};
use tracing::{Instrument, info, info_span, warn};

use crate::api::backup::{Backup, BackupError, BackupStatus, DeletionPolicy, Phase};
use crate::api::snapshot::VolumeSnapshot;
use crate::label_store::{self, BACKUP_NAME_LABEL};
use crate::snapshots::{self, SnapshotError};
use crate::telemetry::{Metrics, Outcome, Step};
use phase::{Admission, Readiness, SnapshotObservation};

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

/// Why a backup failed: a stable reason (status, Events, metric labels) and a message a
/// user can act on. Every module's error converts into one.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub reason: String,
    pub message: String,
}

impl Failure {
    pub fn new(reason: &str, message: impl Into<String>) -> Self {
        Failure {
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

macro_rules! failure_from {
    ($($error:ty),*) => {$(
        impl From<$error> for Failure {
            fn from(e: $error) -> Self {
                Failure::new(e.reason(), e.to_string())
            }
        }
    )*};
}
failure_from!(
    crate::postgres::Error,
    volumes::PlanError,
    SnapshotError,
    label_store::LabelStoreError
);

impl From<kube::Error> for Failure {
    fn from(e: kube::Error) -> Self {
        Failure::new("KubernetesApi", e.to_string())
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
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApi",
            Error::Snapshot(e) => e.reason(),
            Error::Finalizer(_) => "Finalizer",
        }
    }
}

/// A backup holding a session in this process.
struct Running {
    name: String,
    database: String,
    /// Sending a failure ends the task: it closes the session, cleans up and reports it.
    abort: Option<oneshot::Sender<Failure>>,
    /// Becomes true when the task has finished, cleanup included.
    done: watch::Receiver<bool>,
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    running: Mutex<HashMap<String, Running>>,
    /// The last phase this process wrote for each Backup (by key, with its uid), to tell a
    /// cached copy that lags behind our own write.
    written: Mutex<HashMap<String, (String, Phase)>>,
    /// A task ended: queued backups may now run.
    finished: mpsc::UnboundedSender<()>,
}

fn key(backup: &Backup) -> String {
    format!(
        "{}/{}",
        backup.namespace().unwrap_or_default(),
        backup.name_any()
    )
}

pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

impl Context {
    fn is_running(&self, key: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
    }

    fn release(&self, key: &str) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        self.metrics
            .in_flight
            .set(self.running.lock().unwrap_or_else(|e| e.into_inner()).len() as i64);
        let _ = self.finished.unbounded_send(());
    }

    /// Ends the task of one backup (if any) with `why` and waits until it has cleaned up.
    async fn abort(&self, key: &str, why: Failure) {
        let done = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = running.get_mut(key) else {
                return;
            };
            if let Some(abort) = entry.abort.take() {
                let _ = abort.send(why);
            }
            entry.done.clone()
        };
        let mut done = done;
        let _ = done.wait_for(|d| *d).await;
    }

    /// Ends every running backup (operator shutdown) and waits for their cleanup.
    pub async fn abort_all(&self, why: Failure) {
        let keys: Vec<String> = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        futures::future::join_all(keys.iter().map(|k| self.abort(k, why.clone()))).await;
    }

    pub async fn publish(&self, backup: &Backup, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Backup".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &backup.object_ref(&())).await {
            warn!(error = %e, reason, "could not publish an Event");
        }
    }

    pub async fn patch_status(
        &self,
        backup: &Backup,
        status: &BackupStatus,
    ) -> Result<(), kube::Error> {
        let api: Api<Backup> =
            Api::namespaced(self.client.clone(), &backup.namespace().unwrap_or_default());
        let patch = serde_json::json!({
            "apiVersion": Backup::api_version(&()),
            "kind": Backup::kind(&()),
            "status": status,
        });
        api.patch_status(
            &backup.name_any(),
            &PatchParams::apply(crate::FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
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
        let ns = backup.namespace().unwrap_or_default();
        let name = backup.name_any();
        let removed =
            snapshots::delete_all(&Api::namespaced(self.client.clone(), &ns), &name).await;
        let cm: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
        match cm
            .delete(
                &label_store::config_map_name(&name),
                &DeleteParams::background(),
            )
            .await
        {
            Ok(_) | Err(kube::Error::Api(_)) => {}
            Err(e) => warn!(error = %e, "could not delete the label ConfigMap"),
        }
        let cleanup_note = match removed {
            Ok(0) => String::new(),
            Ok(n) => format!(" ({n} partial snapshot(s) deleted)"),
            Err(e) => format!(
                " (deleting its snapshots failed: {e}; delete VolumeSnapshots labelled {BACKUP_NAME_LABEL}={name})"
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
        status.label_config_map = None;
        status.error = Some(BackupError {
            reason: failure.reason.clone(),
            message: failure.message.clone(),
        });
        self.patch_status(backup, status).await?;
        self.publish(
            backup,
            EventType::Warning,
            &failure.reason,
            format!("{}{cleanup_note}", failure.message),
        )
        .await;
        self.metrics.ended(Outcome::Failed, &failure.reason);
        Ok(())
    }
}

/// Sets the phase and the `Ready` condition that mirrors it.
pub fn set_phase(
    status: &mut BackupStatus,
    backup: &Backup,
    phase: Phase,
    reason: &str,
    message: &str,
) {
    status.phase = Some(phase);
    status.observed_generation = backup.metadata.generation;
    phase::set_condition(
        &mut status.conditions,
        phase::ready_condition(phase, reason, message, backup.metadata.generation, now()),
    );
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
        e => Err(Error::Finalizer(Box::new(e))),
    })
}

async fn apply(backup: Arc<Backup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let status = backup.status.clone().unwrap_or_default();
    {
        let mut written = ctx.written.lock().unwrap_or_else(|e| e.into_inner());
        match written.get(&key(&backup)) {
            Some((uid, phase))
                if Some(uid) == backup.uid().as_ref() && phase::is_stale(status.phase, *phase) =>
            {
                return Ok(Action::await_change());
            }
            // Caught up (or a new object of the same name): forget the write.
            Some(_) => {
                written.remove(&key(&backup));
            }
            None => {}
        }
    }
    match phase::step(status.phase, ctx.is_running(&key(&backup))) {
        phase::Step::Admit => admit(backup, ctx).await,
        phase::Step::LeaveToTask | phase::Step::Done => Ok(Action::await_change()),
        phase::Step::SessionLost => {
            let failure = Failure::new(
                "SessionLost",
                "the operator lost the database session mid-backup (restart or leadership change); PostgreSQL aborted the backup by itself. Create a new Backup",
            );
            ctx.fail(&backup, &mut status.clone(), failure).await?;
            Ok(Action::await_change())
        }
        phase::Step::AwaitReady => await_ready(backup, ctx, status).await,
    }
}

/// Pending: resolve the Secret and the pod, wait for a slot, then start the session task.
async fn admit(backup: Arc<Backup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = backup.namespace().unwrap_or_default();
    let mut status = backup.status.clone().unwrap_or_default();
    let conn = &backup.spec.connection;

    let mut secrets = Vec::new();
    for (what, reference) in [
        ("password", &conn.password_secret_ref),
        ("CA certificate", &conn.ca_secret_ref),
    ] {
        let Some(reference) = reference else {
            secrets.push(None);
            continue;
        };
        let secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&reference.name)
            .await?;
        let value = secret
            .and_then(|s| s.data)
            .and_then(|mut d| d.remove(&reference.key));
        match value {
            Some(bytes) => secrets.push(Some(bytes.0)),
            None => {
                let message = format!(
                    "waiting for the {what} in Secret {}/{} key {:?}; the backup starts once it exists",
                    ns, reference.name, reference.key
                );
                return wait_pending(&ctx, &backup, &mut status, "SecretNotFound", message).await;
            }
        }
    }
    let password = match secrets[0].take() {
        Some(bytes) => match String::from_utf8(bytes) {
            Ok(p) => Some(p),
            Err(_) => {
                let failure = Failure::new(
                    "InvalidSecret",
                    "the password in the Secret is not valid UTF-8",
                );
                ctx.fail(&backup, &mut status, failure).await?;
                return Ok(Action::await_change());
            }
        },
        None => None,
    };

    let pods = match task::target_pods(&ctx.client, &backup).await {
        Ok(pods) => pods,
        Err(failure) => {
            ctx.fail(&backup, &mut status, failure).await?;
            return Ok(Action::await_change());
        }
    };
    let database = task::database_key(&backup);

    let k = key(&backup);
    let admission = {
        let mut running = ctx.running.lock().unwrap_or_else(|e| e.into_inner());
        let busy: Vec<(String, String)> = running
            .values()
            .map(|r| (r.database.clone(), r.name.clone()))
            .collect();
        let admission = phase::admit(&database, &busy, ctx.settings.max_concurrent);
        if admission == Admission::Go {
            let (abort_tx, abort_rx) = oneshot::channel();
            let (done_tx, done_rx) = watch::channel(false);
            running.insert(
                k.clone(),
                Running {
                    name: backup.name_any(),
                    database,
                    abort: Some(abort_tx),
                    done: done_rx,
                },
            );
            ctx.metrics.in_flight.set(running.len() as i64);
            let job = task::Job {
                backup: backup.clone(),
                connect_timeout: ctx.settings.connect_timeout,
                pods,
                password,
                ca_cert: secrets[1].take(),
            };
            let span = info_span!("backup", namespace = %ns, name = %backup.name_any());
            let ctx = ctx.clone();
            tokio::spawn(
                async move {
                    task::run(&ctx, job, abort_rx).await;
                    ctx.release(&k);
                    let _ = done_tx.send(true);
                }
                .instrument(span),
            );
        }
        admission
    };
    match admission {
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
    let unchanged = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.reason == reason && c.message == message);
    if !unchanged {
        info!(reason, %message, "backup pending");
        set_phase(status, backup, Phase::Pending, reason, &message);
        ctx.patch_status(backup, status).await?;
        ctx.publish(backup, EventType::Normal, reason, message)
            .await;
    }
    Ok(Action::await_change())
}

/// Finalizing: the server left backup mode; wait (on snapshot watch events) for readyToUse.
async fn await_ready(
    backup: Arc<Backup>,
    ctx: Arc<Context>,
    mut status: BackupStatus,
) -> Result<Action, Error> {
    let api: Api<VolumeSnapshot> =
        Api::namespaced(ctx.client.clone(), &backup.namespace().unwrap_or_default());
    let existing = api
        .list(&ListParams::default().labels(&format!("{BACKUP_NAME_LABEL}={}", backup.name_any())))
        .await?;
    let by_name: HashMap<String, &VolumeSnapshot> =
        existing.items.iter().map(|s| (s.name_any(), s)).collect();
    let observations: Vec<SnapshotObservation> = status
        .snapshots
        .iter()
        .map(|s| {
            let found = by_name.get(&s.name);
            SnapshotObservation {
                name: s.name.clone(),
                exists: found.is_some(),
                ready: found.is_some_and(|v| v.is_ready()),
                error: found.and_then(|v| v.error_message()),
            }
        })
        .collect();
    let before = status.clone();
    for s in status.snapshots.iter_mut() {
        if let Some(v) = by_name.get(&s.name) {
            s.ready_to_use = v.is_ready();
            s.restore_size = v
                .status
                .as_ref()
                .and_then(|st| st.restore_size.as_ref())
                .map(|q| q.0.clone());
        }
    }
    match phase::readiness(&observations) {
        Readiness::Wait => {
            if status != before {
                ctx.patch_status(&backup, &status).await?;
            }
        }
        Readiness::Fail { reason, message } => {
            ctx.fail(&backup, &mut status, Failure::new(reason, message))
                .await?
        }
        Readiness::Complete => {
            let window = status
                .backup_window
                .as_ref()
                .and_then(|w| w.seconds.clone())
                .unwrap_or_default();
            let message = format!(
                "{} snapshot(s) ready to use; the server spent {window}s in backup mode",
                status.snapshots.len()
            );
            set_phase(
                &mut status,
                &backup,
                Phase::Completed,
                "Completed",
                &message,
            );
            status.completed_at = Some(now());
            ctx.patch_status(&backup, &status).await?;
            if let Some(stopped) = status
                .backup_window
                .as_ref()
                .and_then(|w| w.stopped_at.as_ref())
            {
                let waited = k8s_openapi::jiff::Timestamp::now().duration_since(stopped.0);
                ctx.metrics.observe(Step::Ready, waited.as_secs_f64());
            }
            ctx.publish(&backup, EventType::Normal, "Completed", message)
                .await;
            ctx.metrics.ended(Outcome::Completed, "Completed");
        }
    }
    Ok(Action::await_change())
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
    let name = backup.name_any();
    let ns = backup.namespace().unwrap_or_default();
    match backup.spec.deletion_policy {
        DeletionPolicy::Delete => {
            let removed =
                snapshots::delete_all(&Api::namespaced(ctx.client.clone(), &ns), &name).await?;
            match Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
                .delete(
                    &label_store::config_map_name(&name),
                    &DeleteParams::background(),
                )
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            info!(
                snapshots = removed,
                "deleted the backup's snapshots and label"
            );
        }
        DeletionPolicy::Retain => {
            info!("deletionPolicy Retain: keeping the backup's snapshots and label ConfigMap")
        }
    }
    Ok(Action::await_change())
}

fn error_policy(backup: Arc<Backup>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(backup = %key(&backup), reason = error.reason(), %error, "reconcile failed; retrying");
    match error {
        // The API server or the snapshot API is briefly unavailable: retry soon.
        Error::Kube(_) | Error::Snapshot(_) => Action::requeue(Duration::from_secs(5)),
        Error::Finalizer(_) => Action::requeue(Duration::from_secs(15)),
    }
}

/// Runs the Backup controller until `shutdown` resolves, then aborts running backups cleanly.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    ready: impl FnOnce(),
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (finished_tx, finished_rx) = mpsc::unbounded();
    let backups: Api<Backup> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let snapshots: Api<VolumeSnapshot> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let secrets: Api<PartialObjectMeta<Secret>> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), "pgsnap".into()),
        client,
        metrics,
        settings,
        running: Mutex::new(HashMap::new()),
        written: Mutex::new(HashMap::new()),
        finished: finished_tx,
    });
    let controller = Controller::new(backups, watcher::Config::default());
    let store = controller.store();
    ready();
    controller
        // Snapshots of a backup wake it when they are cut, ready or failed.
        .watches(
            snapshots,
            watcher::Config::default().labels(BACKUP_NAME_LABEL),
            |s: VolumeSnapshot| {
                let backup = s.labels().get(BACKUP_NAME_LABEL)?.clone();
                Some(ObjectRef::new(&backup).within(&s.namespace()?))
            },
        )
        // A Pending backup waits for its password Secret. Metadata only: the operator never
        // holds Secret values it does not need.
        .watches(
            secrets,
            watcher::Config::default(),
            move |s: PartialObjectMeta<Secret>| {
                let ns = s.namespace();
                let name = s.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|b| {
                        b.namespace() == ns
                            && b.status
                                .as_ref()
                                .and_then(|st| st.phase)
                                .is_none_or(|p| p == Phase::Pending)
                    })
                    .filter(|b| {
                        let c = &b.spec.connection;
                        [&c.password_secret_ref, &c.ca_secret_ref]
                            .into_iter()
                            .flatten()
                            .any(|r| r.name == name)
                    })
                    .map(|b| ObjectRef::from_obj(&*b))
                    .collect::<Vec<_>>()
            },
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
