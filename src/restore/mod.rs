//! The Restore reconciler: a Backup's snapshots back into PVCs that PostgreSQL recovers from.
//!
//! Pending → Provisioning (PVCs created from the snapshots, watched until bound) → Preparing
//! (a Job runs `pgsnap restore-prepare` on the restored claims, watched until it ends) →
//! Completed, or Failed with a stable reason. Every step is level-based: a reconcile looks at
//! what exists and does the next missing thing, so a restart of the operator resumes. The
//! PVCs are the restored database: deleting the Restore leaves them, unless
//! `claimDeletionPolicy: Delete` made the Restore their owner.

pub mod phase;
pub mod plan;
pub mod prepare;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::backup::Backup;
use crate::api::restore::{
    ClaimDeletionPolicy, Restore, RestoreError, RestorePhase, RestoreSource, RestoreStatus,
    RestoreTimings,
};
use crate::api::snapshot::VolumeSnapshot;
use crate::api::{RESTORE_CREATOR, RESTORE_UID_LABEL};
use crate::controller::{self, Failure, PhasedStatus, Progress, Reporter, now};
use crate::label_store::{self, LabelRecord};
use crate::telemetry::{Metrics, Outcome};
use phase::JobOutcome;
use plan::{PlannedClaim, SourceVolume};

use crate::controller::Stop;
pub use crate::controller::{Error, Settings};

impl PhasedStatus for RestoreStatus {
    type Phase = RestorePhase;

    fn progress(phase: RestorePhase) -> Progress {
        match phase {
            RestorePhase::Completed => Progress::Succeeded,
            RestorePhase::Failed => Progress::Failed,
            _ => Progress::InProgress,
        }
    }

    fn phase(&self) -> Option<RestorePhase> {
        self.phase
    }

    fn set_phase_fields(&mut self, phase: RestorePhase, generation: Option<i64>) {
        self.phase = Some(phase);
        self.observed_generation = generation;
    }

    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
}

pub struct Context {
    pub client: Client,
    pub reporter: Reporter,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
}

impl Context {
    fn new(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Self {
        Context {
            reporter: Reporter::new(client.clone(), "Restore"),
            client,
            settings,
            metrics,
        }
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
        let said = message.clone();
        if controller::enter(&self.reporter, restore, status, phase, reason, message).await? {
            info!(?phase, reason, message = %said, "restore");
            match phase {
                RestorePhase::Completed => self.metrics.restore_ended(Outcome::Completed, reason),
                RestorePhase::Failed => self.metrics.restore_ended(Outcome::Failed, reason),
                _ => {}
            }
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
            remove_backup_wal_claim(&restore, &ctx, &mut status).await?;
            ctx.fail(&restore, &mut status, failure).await?;
            Ok(Action::await_change())
        }
        Err(Stop::Api(e)) => Err(e.into()),
    }
}

/// One pass through the phases. Every phase is level-based: it looks at what exists and does
/// the next missing thing, so a restarted operator resumes where the last one stopped.
async fn step(
    restore: &Restore,
    ctx: &Context,
    status: &mut RestoreStatus,
) -> Result<Action, Stop> {
    if status.phase.is_none() {
        let message = "resolving the backup's snapshots and label".to_string();
        ctx.enter(restore, status, RestorePhase::Pending, "Resolving", message)
            .await?;
    }
    let source = resolve(restore, ctx).await?;
    status.source = Some(source.status());
    let claims = match provision(restore, ctx, &source, status).await? {
        Provisioned::Waiting(message) => {
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
        Provisioned::Bound(claims) => claims,
    };
    let timings = status.timings.get_or_insert_with(RestoreTimings::default);
    if timings.provisioning_seconds.is_none()
        && let Some(started) = &status.started_at
    {
        timings.provisioning_seconds = Some(seconds_between(started, &now()));
    }
    prepare(restore, ctx, &source, &claims, status).await
}

/// What the Restore restores: the label, checked, and the snapshots it names, ready.
struct Source {
    config_map: String,
    label: LabelRecord,
    volumes: Vec<SourceVolume>,
    /// restoreSize of each snapshot, by name, when the driver reports one.
    sizes: HashMap<String, Option<String>>,
}

impl Source {
    fn status(&self) -> RestoreSource {
        RestoreSource {
            backup: self.label.backup.clone(),
            label_config_map: self.config_map.clone(),
            system_identifier: self.label.system_identifier.clone(),
            stop_lsn: self.label.stop_lsn.clone(),
            server_version: self.label.server_version.clone(),
        }
    }
}

/// Pending: the label ConfigMap of the source, checked, and its snapshots, ready.
async fn resolve(restore: &Restore, ctx: &Context) -> Result<Source, Stop> {
    let ns = restore.namespace().unwrap_or_default();
    phase::check_namespace(&restore.spec, &ns)?;
    let config_map = label_config_map(restore, ctx, &ns).await?;
    let cm = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&config_map)
        .await?
        .ok_or_else(|| {
            Failure::new(
                "LabelConfigMapNotFound",
                format!("label ConfigMap {config_map} does not exist in namespace {ns}"),
            )
        })?;
    let label = label_store::read(&cm).map_err(Failure::from)?;
    phase::check_label(&restore.spec, &config_map, &label)?;
    let volumes = plan::source_volumes(&config_map, &label)?;
    let snapshots: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let mut sizes = HashMap::new();
    let wal_snapshot = label.wal.as_ref().map(|w| &w.volume_snapshot);
    for name in volumes.iter().map(|v| &v.snapshot).chain(wal_snapshot) {
        let snapshot = snapshots.get_opt(name).await?.ok_or_else(|| {
            Failure::new(
                "SnapshotNotFound",
                format!("VolumeSnapshot {name} of the backup does not exist"),
            )
        })?;
        sizes.insert(name.clone(), phase::usable_snapshot(name, &snapshot)?);
    }
    Ok(Source {
        config_map,
        label,
        volumes,
        sizes,
    })
}

/// The name of the label ConfigMap the spec points at: a Completed Backup's, or one named.
async fn label_config_map(restore: &Restore, ctx: &Context, ns: &str) -> Result<String, Stop> {
    let spec = &restore.spec;
    match (&spec.backup_name, &spec.label_config_map_name) {
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
            Ok(phase::completed_backup_label(name, backup.status)?)
        }
        (None, Some(cm)) => Ok(cm.clone()),
        (None, None) => Err(Failure::new(
            "NoSource",
            "spec names neither a backup nor a label ConfigMap",
        )
        .into()),
    }
}

enum Provisioned {
    /// Some claims are not bound yet (the message says which).
    Waiting(String),
    /// The restored claims, and the temporary one of the backup's WAL last, if the backup
    /// kept its WAL.
    Bound(Vec<PlannedClaim>),
}

/// Provisioning: create the claims that are missing, then wait until they are bound.
async fn provision(
    restore: &Restore,
    ctx: &Context,
    source: &Source,
    status: &mut RestoreStatus,
) -> Result<Provisioned, Stop> {
    let classes: Vec<StorageClass> = Api::<StorageClass>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let planned = plan::plan_claims(
        &restore.spec.claims,
        &source.volumes,
        &source.sizes,
        phase::default_class(&classes).as_deref(),
    )?;
    let mut waiting = Vec::new();
    status.claims.clear();
    let owner = (restore.spec.claim_deletion_policy == ClaimDeletionPolicy::Delete)
        .then(|| restore.controller_owner_ref(&()))
        .flatten();
    for p in &planned {
        let pvc = ensure_claim(restore, ctx, p, owner.clone()).await?;
        if phase::claim_waits(&pvc, &classes) {
            waiting.push(p.name.clone());
        }
        status.claims.push(p.status(phase::is_bound(&pvc)));
    }
    let temporary =
        plan::backup_wal_claim(&restore.name_any(), &source.label, &planned, &source.sizes)?;
    let mut all = planned;
    if let Some(claim) = temporary {
        // Temporary whatever the policy: it goes with the Restore at the latest.
        let pvc = ensure_claim(restore, ctx, &claim, restore.controller_owner_ref(&())).await?;
        if phase::claim_waits(&pvc, &classes) {
            waiting.push(claim.name.clone());
        }
        status.backup_wal_claim = Some(claim.name.clone());
        all.push(claim);
    }
    status.started_at.get_or_insert_with(now);
    Ok(match waiting.is_empty() {
        true => Provisioned::Bound(all),
        false => Provisioned::Waiting(phase::provisioning_message(all.len(), &waiting)),
    })
}

/// The claim, created from its snapshot unless this Restore made it already; a claim some
/// other object made is never touched.
async fn ensure_claim(
    restore: &Restore,
    ctx: &Context,
    claim: &PlannedClaim,
    owner: Option<OwnerReference>,
) -> Result<PersistentVolumeClaim, Stop> {
    let ns = restore.namespace().unwrap_or_default();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    match pvcs.get_opt(&claim.name).await? {
        Some(pvc) if phase::made_by(&pvc, restore) => Ok(pvc),
        Some(_) => Err(Failure::new(
            "ClaimExists",
            format!(
                "PVC {} already exists and was not made by this Restore; choose another claim name",
                claim.name
            ),
        )
        .into()),
        None => {
            let pvc = plan::claim(claim, &ns, restore_labels(restore), owner);
            Ok(pvcs.create(&PostParams::default(), &pvc).await?)
        }
    }
}

/// Preparing: the Job, created once, watched to its end; then Completed.
async fn prepare(
    restore: &Restore,
    ctx: &Context,
    source: &Source,
    claims: &[PlannedClaim],
    status: &mut RestoreStatus,
) -> Result<Action, Stop> {
    let ns = restore.namespace().unwrap_or_default();
    let job = ensure_job(restore, ctx, source, claims).await?;
    let job_name = job.name_any();
    status.prepare_job = Some(job_name.clone());
    match phase::job_outcome(&job) {
        JobOutcome::Running => {
            let message = phase::preparing_message(&job_name, claims);
            ctx.enter(
                restore,
                status,
                RestorePhase::Preparing,
                "Preparing",
                message,
            )
            .await?;
        }
        JobOutcome::Succeeded => {
            remove_backup_wal_claim(restore, ctx, status).await?;
            let job_status = job.status.unwrap_or_default();
            if let (Some(start), Some(end)) = (&job_status.start_time, &job_status.completion_time)
                && let Some(t) = status.timings.as_mut()
            {
                t.prepare_seconds = Some(seconds_between(start, end));
            }
            status.completed_at = Some(now());
            let message = phase::completed_message(claims);
            ctx.enter(
                restore,
                status,
                RestorePhase::Completed,
                "Completed",
                message,
            )
            .await?;
        }
        JobOutcome::Failed { message } => {
            let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
                .list(
                    &ListParams::default()
                        .labels(&format!("batch.kubernetes.io/job-name={job_name}")),
                )
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
            return Err(phase::job_failure(&job_name, message, &terminated).into());
        }
    }
    Ok(Action::await_change())
}

/// The claim of the backup's WAL is read by the prepare Job only: it goes when the Job has
/// ended, whatever the outcome. A finished pod still holds a claim it mounts (the claim stays
/// Terminating while the pod exists), so the Job goes first, its pods with it; its outcome
/// stays in the Restore's status and Events.
async fn remove_backup_wal_claim(
    restore: &Restore,
    ctx: &Context,
    status: &mut RestoreStatus,
) -> Result<(), kube::Error> {
    let Some(name) = status.backup_wal_claim.clone() else {
        return Ok(());
    };
    let ns = restore.namespace().unwrap_or_default();
    let background = DeleteParams::background();
    if let Some(job_name) = &status.prepare_job {
        let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
        if let Some(job) = jobs.get_opt(job_name).await?
            && phase::made_by(&job, restore)
        {
            jobs.delete(job_name, &background).await?;
        }
    }
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(pvc) = pvcs.get_opt(&name).await?
        && phase::made_by(&pvc, restore)
        && pvc.metadata.deletion_timestamp.is_none()
    {
        pvcs.delete(&name, &DeleteParams::default()).await?;
    }
    status.backup_wal_claim = None;
    Ok(())
}

/// The prepare Job, created unless this Restore made it already.
async fn ensure_job(
    restore: &Restore,
    ctx: &Context,
    source: &Source,
    claims: &[PlannedClaim],
) -> Result<Job, Stop> {
    let ns = restore.namespace().unwrap_or_default();
    let name = restore.name_any();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let job_name = controller::bounded_name(&name, "prepare", 63);
    match jobs.get_opt(&job_name).await? {
        Some(job) if phase::made_by(&job, restore) => Ok(job),
        Some(_) => Err(Failure::new(
            "JobExists",
            format!("Job {job_name} exists and was not made by this Restore"),
        )
        .into()),
        None => {
            let owner = restore
                .controller_owner_ref(&())
                .ok_or_else(|| Failure::new("KubernetesApi", "the Restore has no uid yet"))?;
            let id = plan::JobIdentity {
                name: &job_name,
                namespace: &ns,
                labels: restore_labels(restore),
                owner,
                image: &ctx.settings.image,
                label_config_map: &source.config_map,
            };
            let job = plan::prepare_job(id, claims, &source.label, &restore.spec.recovery);
            Ok(jobs.create(&PostParams::default(), &job).await?)
        }
    }
}

/// The labels on every object a Restore creates.
fn restore_labels(restore: &Restore) -> std::collections::BTreeMap<String, String> {
    controller::creator_labels(&RESTORE_CREATOR, restore)
}

fn error_policy(restore: Arc<Restore>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(restore = %restore.name_any(), reason = error.reason(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the Restore controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let ns = settings.namespace.clone();
    let restores: Api<Restore> = controller::api(&client, ns.as_deref());
    let jobs: Api<Job> = controller::api(&client, ns.as_deref());
    let pvcs: Api<PersistentVolumeClaim> = controller::api(&client, ns.as_deref());
    let ctx = Arc::new(Context::new(client, settings, metrics));
    let controller = Controller::new(restores, watcher::Config::default());
    let store = controller.store();
    controller
        .owns(jobs, watcher::Config::default().labels(RESTORE_UID_LABEL))
        // A restored claim wakes its Restore when it binds.
        .watches(
            pvcs,
            watcher::Config::default().labels(RESTORE_UID_LABEL),
            move |pvc: PersistentVolumeClaim| {
                controller::creator_in(&store, &pvc, RESTORE_UID_LABEL)
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
    info!("restore controller stopped");
}
