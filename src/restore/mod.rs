//! The Restore reconciler: a Backup's snapshots back into PVCs that PostgreSQL recovers from.
//!
//! Pending → Provisioning (PVCs created from the snapshots, watched until bound) → Preparing
//! (a Job runs `pgsnap restore-prepare` on the restored claims, watched until it ends) →
//! Completed, or Failed with a stable reason. Every step is level-based: a reconcile looks at
//! what exists and does the next missing thing, so a restart of the operator resumes. The
//! PVCs are the restored database: deleting the Restore leaves them, unless
//! `claimDeletionPolicy: Delete` made the Restore their owner.

pub mod plan;
pub mod prepare;

use crate::telemetry::{Metrics, Outcome};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::backup::{Backup, Phase};
use crate::api::restore::{
    ClaimDeletionPolicy, Restore, RestoreError, RestorePhase, RestoreSource, RestoreStatus,
    RestoreTimings,
};
use crate::api::snapshot::VolumeSnapshot;
use crate::backup::phase::set_condition;
use crate::backup::{Failure, now};
use plan::{JobOutcome, RESTORE_NAME_LABEL};

#[derive(Clone, Debug)]
pub struct Settings {
    /// Watch one namespace only; none watches all.
    pub namespace: Option<String>,
    /// The image of the prepare Job: this operator's own, which has `pgsnap restore-prepare`.
    pub image: String,
}

/// Errors of one reconcile, all worth a retry; permanent problems become a Failed status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        "KubernetesApi"
    }
}

/// How a step ends early: the Restore failed for good, or the API needs a retry.
enum Stop {
    Failed(Failure),
    Api(kube::Error),
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Self {
        Stop::Failed(f)
    }
}

impl From<kube::Error> for Stop {
    fn from(e: kube::Error) -> Self {
        Stop::Api(e)
    }
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
}

impl Context {
    async fn publish(&self, restore: &Restore, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Restore".into(),
            secondary: None,
        };
        if let Err(e) = self
            .recorder
            .publish(&event, &restore.object_ref(&()))
            .await
        {
            warn!(error = %e, reason, "could not publish an Event");
        }
    }

    async fn patch_status(
        &self,
        restore: &Restore,
        status: &RestoreStatus,
    ) -> Result<(), kube::Error> {
        let api: Api<Restore> = Api::namespaced(
            self.client.clone(),
            &restore.namespace().unwrap_or_default(),
        );
        let patch = serde_json::json!({
            "apiVersion": Restore::api_version(&()),
            "kind": Restore::kind(&()),
            "status": status,
        });
        api.patch_status(
            &restore.name_any(),
            &PatchParams::apply(crate::FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        Ok(())
    }

    /// Moves to `phase` (status, `Ready` condition, an Event) when that is news.
    async fn enter(
        &self,
        restore: &Restore,
        status: &mut RestoreStatus,
        phase: RestorePhase,
        reason: &str,
        message: String,
    ) -> Result<(), kube::Error> {
        let news = status.phase != Some(phase)
            || !status
                .conditions
                .iter()
                .any(|c| c.reason == reason && c.message == message);
        set_phase(status, restore, phase, reason, &message);
        self.patch_status(restore, status).await?;
        if news {
            info!(?phase, reason, %message, "restore");
            match phase {
                RestorePhase::Completed => self.metrics.restore_ended(Outcome::Completed, reason),
                RestorePhase::Failed => self.metrics.restore_ended(Outcome::Failed, reason),
                _ => {}
            }
            let type_ = if phase == RestorePhase::Failed {
                EventType::Warning
            } else {
                EventType::Normal
            };
            self.publish(restore, type_, reason, message).await;
        }
        Ok(())
    }

    async fn fail(
        &self,
        restore: &Restore,
        status: &mut RestoreStatus,
        failure: Failure,
    ) -> Result<(), kube::Error> {
        warn!(reason = %failure.reason, message = %failure.message, "restore failed");
        status.error = Some(RestoreError {
            reason: failure.reason.clone(),
            message: failure.message.clone(),
        });
        self.enter(
            restore,
            status,
            RestorePhase::Failed,
            &failure.reason,
            failure.message,
        )
        .await
    }
}

/// Sets the phase and the `Ready` condition that mirrors it (True only when Completed).
fn set_phase(
    status: &mut RestoreStatus,
    restore: &Restore,
    phase: RestorePhase,
    reason: &str,
    message: &str,
) {
    status.phase = Some(phase);
    status.observed_generation = restore.metadata.generation;
    let condition = Condition {
        type_: "Ready".into(),
        status: if phase == RestorePhase::Completed {
            "True"
        } else {
            "False"
        }
        .into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: restore.metadata.generation,
        last_transition_time: now(),
    };
    set_condition(&mut status.conditions, condition);
}

fn seconds_between(from: &Time, to: &Time) -> String {
    format!("{:.1}", to.0.duration_since(from.0).as_secs_f64())
}

async fn reconcile(restore: Arc<Restore>, ctx: Arc<Context>) -> Result<Action, Error> {
    let mut status = restore.status.clone().unwrap_or_default();
    if status.phase.is_some_and(RestorePhase::is_terminal) {
        return Ok(Action::await_change());
    }
    match step(&restore, &ctx, &mut status).await {
        Ok(action) => Ok(action),
        Err(Stop::Failed(failure)) => {
            ctx.fail(&restore, &mut status, failure).await?;
            Ok(Action::await_change())
        }
        Err(Stop::Api(e)) => Err(e.into()),
    }
}

/// The label ConfigMap of the source, checked; for a Backup source, the Backup's own.
async fn resolve_label(restore: &Restore, ctx: &Context, ns: &str) -> Result<plan::Label, Stop> {
    let spec = &restore.spec;
    if let Some(source_ns) = spec.source_namespace.as_deref().filter(|s| *s != ns) {
        return Err(Failure::new(
            "CrossNamespaceUnsupported",
            format!(
                "the source is in namespace {source_ns}: a VolumeSnapshot restores only in its own namespace, and pgsnap does not pre-provision VolumeSnapshotContents yet; create the Restore in {source_ns}"
            ),
        )
        .into());
    }
    let cm_name = match (&spec.backup_name, &spec.label_config_map_name) {
        (Some(name), _) => {
            let backup = Api::<Backup>::namespaced(ctx.client.clone(), ns)
                .get_opt(name)
                .await?
                .ok_or_else(|| {
                    Failure::new(
                        "BackupNotFound",
                        format!("Backup {name} does not exist in namespace {ns}"),
                    )
                })?;
            let status = backup.status.unwrap_or_default();
            if status.phase != Some(Phase::Completed) {
                let phase = status
                    .phase
                    .map(|p| format!("{p:?}"))
                    .unwrap_or_else(|| "Pending".into());
                return Err(Failure::new(
                    "BackupNotCompleted",
                    format!("Backup {name} is {phase}; only a Completed backup can be restored"),
                )
                .into());
            }
            status
                .label_config_map
                .unwrap_or_else(|| crate::label_store::config_map_name(name))
        }
        (None, Some(cm)) => cm.clone(),
        (None, None) => {
            return Err(Failure::new(
                "NoSource",
                "spec names neither a backup nor a label ConfigMap",
            )
            .into());
        }
    };
    let cm = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
        .get_opt(&cm_name)
        .await?
        .ok_or_else(|| {
            Failure::new(
                "LabelConfigMapNotFound",
                format!("label ConfigMap {cm_name} does not exist in namespace {ns}"),
            )
        })?;
    let label = plan::read_label(&cm)?;
    if let (Some(backup), Some(of)) = (&spec.backup_name, &label.backup)
        && backup != of
    {
        return Err(Failure::new(
            "LabelConfigMapInvalid",
            format!("label ConfigMap {cm_name} belongs to backup {of}, not {backup}"),
        )
        .into());
    }
    if let Some(snapshot) = &spec.volume_snapshot_name
        && !label.volumes.iter().any(|v| {
            &v.volume_snapshot == snapshot
                && v.location.role == crate::api::backup::VolumeRole::Data
        })
    {
        return Err(Failure::new(
            "SnapshotMismatch",
            format!("label ConfigMap {cm_name} does not name {snapshot} as the snapshot of the data directory"),
        )
        .into());
    }
    Ok(label)
}

async fn step(
    restore: &Restore,
    ctx: &Context,
    status: &mut RestoreStatus,
) -> Result<Action, Stop> {
    let ns = restore.namespace().unwrap_or_default();
    let name = restore.name_any();
    if status.phase.is_none() {
        ctx.enter(
            restore,
            status,
            RestorePhase::Pending,
            "Resolving",
            "resolving the backup's snapshots and label".into(),
        )
        .await?;
    }
    let label = resolve_label(restore, ctx, &ns).await?;
    status.source = Some(RestoreSource {
        backup: label.backup.clone(),
        label_config_map: label.config_map.clone(),
        system_identifier: label.system_identifier.clone(),
        stop_lsn: label.stop_lsn.clone(),
        server_version: label.server_version.clone(),
    });
    let volumes = plan::source_volumes(&label)?;

    // The snapshots: present, ready, and how large a volume each needs.
    let snapshots: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let mut sizes = HashMap::new();
    for v in &volumes {
        let snap = snapshots.get_opt(&v.snapshot).await?.ok_or_else(|| {
            Failure::new(
                "SnapshotNotFound",
                format!("VolumeSnapshot {} of the backup does not exist", v.snapshot),
            )
        })?;
        if let Some(err) = snap.error_message() {
            return Err(Failure::new(
                "SnapshotFailed",
                format!("VolumeSnapshot {} failed: {err}", v.snapshot),
            )
            .into());
        }
        if !snap.is_ready() {
            return Err(Failure::new(
                "SnapshotNotReady",
                format!("VolumeSnapshot {} is not ready to use", v.snapshot),
            )
            .into());
        }
        sizes.insert(
            v.snapshot.clone(),
            snap.status.and_then(|s| s.restore_size).map(|q| q.0),
        );
    }
    let classes: Vec<StorageClass> = Api::<StorageClass>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let default_class = classes
        .iter()
        .find(|c| {
            c.annotations()
                .get("storageclass.kubernetes.io/is-default-class")
                .is_some_and(|v| v == "true")
        })
        .map(|c| c.name_any());
    let planned = plan::plan_claims(
        &restore.spec.claims,
        &volumes,
        &sizes,
        default_class.as_deref(),
    )?;

    // Provisioning: create what is missing; never touch a PVC some other object made.
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let owner = restore.controller_owner_ref(&());
    let mut claim_status = Vec::new();
    let mut waiting = Vec::new();
    for p in &planned {
        let pvc = match pvcs.get_opt(&p.name).await? {
            Some(pvc) => {
                if pvc.labels().get(RESTORE_NAME_LABEL) != Some(&name) {
                    return Err(Failure::new("ClaimExists", format!("PVC {} already exists and was not made by this Restore; choose another claim name", p.name)).into());
                }
                pvc
            }
            None => {
                let own = (restore.spec.claim_deletion_policy == ClaimDeletionPolicy::Delete)
                    .then(|| owner.clone())
                    .flatten();
                pvcs.create(&PostParams::default(), &plan::claim(p, &ns, &name, own))
                    .await?
            }
        };
        let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        // WaitForFirstConsumer binds only for a pod: the prepare Job is that pod.
        let late_binding = classes
            .iter()
            .find(|c| {
                Some(c.name_any()) == pvc.spec.as_ref().and_then(|s| s.storage_class_name.clone())
            })
            .and_then(|c| c.volume_binding_mode.as_deref())
            == Some("WaitForFirstConsumer");
        if !bound && !late_binding {
            waiting.push(p.name.clone());
        }
        claim_status.push(p.status(bound));
    }
    status.claims = claim_status;
    status.started_at.get_or_insert_with(now);
    if !waiting.is_empty() {
        let message = format!(
            "restoring {} volume(s) from snapshots; waiting for {} to be bound",
            planned.len(),
            waiting.join(", ")
        );
        ctx.enter(
            restore,
            status,
            RestorePhase::Provisioning,
            "Provisioning",
            message,
        )
        .await?;
        return Ok(Action::await_change());
    }
    let timings = status.timings.get_or_insert_with(RestoreTimings::default);
    if timings.provisioning_seconds.is_none()
        && let Some(started) = &status.started_at
    {
        timings.provisioning_seconds = Some(seconds_between(started, &now()));
    }

    // Preparing: the Job, created once, watched to its end.
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let job_name = plan::bounded_name(&name, "prepare", 63);
    let job = match jobs.get_opt(&job_name).await? {
        Some(job) if job.labels().get(RESTORE_NAME_LABEL) == Some(&name) => job,
        Some(_) => {
            return Err(Failure::new(
                "JobExists",
                format!("Job {job_name} exists and was not made by this Restore"),
            )
            .into());
        }
        None => {
            let owner =
                owner.ok_or_else(|| Failure::new("KubernetesApi", "the Restore has no uid yet"))?;
            let id = plan::JobIdentity {
                name: &job_name,
                namespace: &ns,
                restore: &name,
                owner,
                image: &ctx.settings.image,
            };
            let job = plan::prepare_job(id, &planned, &label, &restore.spec.recovery);
            jobs.create(&PostParams::default(), &job).await?
        }
    };
    status.prepare_job = Some(job_name.clone());
    match plan::job_outcome(&job) {
        JobOutcome::Running => {
            let message = format!(
                "Job {job_name} runs pgsnap restore-prepare on claim {}",
                planned
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            ctx.enter(
                restore,
                status,
                RestorePhase::Preparing,
                "Preparing",
                message,
            )
            .await?;
            Ok(Action::await_change())
        }
        JobOutcome::Succeeded => {
            let job_status = job.status.unwrap_or_default();
            if let (Some(start), Some(end)) = (&job_status.start_time, &job_status.completion_time)
                && let Some(t) = status.timings.as_mut()
            {
                t.prepare_seconds = Some(seconds_between(start, end));
            }
            status.completed_at = Some(now());
            let data = planned
                .iter()
                .find(|p| p.role == crate::api::backup::VolumeRole::Data);
            let hint = data
                .map(|d| {
                    format!(
                        "; mount {} at {} and start PostgreSQL with PGDATA {}/{}",
                        d.name,
                        d.mount_path,
                        d.mount_path.trim_end_matches('/'),
                        d.path_in_volume
                    )
                })
                .unwrap_or_default();
            let message = format!(
                "{} claim(s) restored and prepared for recovery{hint}",
                planned.len()
            );
            ctx.enter(
                restore,
                status,
                RestorePhase::Completed,
                "Completed",
                message,
            )
            .await?;
            Ok(Action::await_change())
        }
        JobOutcome::Failed { message } => {
            Err(job_failure(ctx, &ns, &job_name, message).await?.into())
        }
    }
}

/// Why the Job failed: restore-prepare's refusal from its termination message when there is
/// one, else what the Job controller says.
async fn job_failure(
    ctx: &Context,
    ns: &str,
    job: &str,
    job_message: String,
) -> Result<Failure, kube::Error> {
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
        .await?;
    let terminated: Vec<_> = pods
        .items
        .iter()
        .flat_map(|p| {
            p.status
                .iter()
                .flat_map(|s| s.container_statuses.iter().flatten())
        })
        .filter_map(|c| c.state.as_ref()?.terminated.clone())
        .collect();
    if let Some(refusal) = terminated
        .iter()
        .filter_map(|t| t.message.as_deref())
        .find_map(plan::refusal)
    {
        return Ok(refusal);
    }
    // A node that reports no termination message still reports the exit status.
    if terminated
        .iter()
        .any(|t| t.exit_code == prepare::EXIT_REFUSED)
    {
        return Ok(Failure::new(
            "PrepareRefused",
            format!(
                "restore-prepare refused to prepare the data volume; its reason is in `kubectl logs job/{job}`"
            ),
        ));
    }
    Ok(Failure::new(
        "PrepareFailed",
        format!("Job {job} failed: {job_message}"),
    ))
}

fn error_policy(restore: Arc<Restore>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(restore = %restore.name_any(), reason = error.reason(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

fn api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the Restore controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let restores: Api<Restore> = api(&client, &settings.namespace);
    let jobs: Api<Job> = api(&client, &settings.namespace);
    let pvcs: Api<PersistentVolumeClaim> = api(&client, &settings.namespace);
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), "pgsnap".into()),
        client,
        settings,
        metrics,
    });
    Controller::new(restores, watcher::Config::default())
        .owns(jobs, watcher::Config::default().labels(RESTORE_NAME_LABEL))
        // A restored claim wakes its Restore when it binds.
        .watches(
            pvcs,
            watcher::Config::default().labels(RESTORE_NAME_LABEL),
            |pvc: PersistentVolumeClaim| {
                let restore = pvc.labels().get(RESTORE_NAME_LABEL)?.clone();
                Some(ObjectRef::new(&restore).within(&pvc.namespace()?))
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
    info!("restore controller stopped");
}
