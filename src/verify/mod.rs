//! The Verification reconciler: a Backup restored into temporary claims, PostgreSQL started
//! on them with the backed-up server's image, checked, and everything temporary deleted.
//!
//! Pending (its turn: one per namespace at a time; the Backup Completed; the source pod's
//! image and settings) → Restoring (a Restore it owns, with `claimDeletionPolicy: Delete`:
//! the Restore machinery, not a copy) → Checking (a pod of the server and `pgsnap
//! verify-server` beside it, whose report is its termination message) → Passed or Failed,
//! written onto the Backup too. A timeout covers the whole, counted from its turn.

pub mod plan;
pub mod server;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::backup::{Backup, Phase, VolumeRole, WalSource};
use crate::api::restore::{Restore, RestorePhase};
use crate::api::verification::{
    BackupVerification, Verification, VerificationError, VerificationPhase, VerificationStatus,
    VerificationTimings,
};
use crate::api::{VERIFICATION_CREATOR, VERIFICATION_UID_LABEL};
use crate::controller::{self, Failure, PhasedStatus, Progress, Reporter, now};
use crate::telemetry::{DatabaseLabels, Metrics};
use plan::PodOutcome;

/// The field manager of `status.verification` and the `Verified` condition on Backups: not
/// the Backup controller's.
const BACKUP_FIELD_MANAGER: &str = "pgsnap-verification";
/// The condition on a Backup that says whether its last verdict passed.
pub const VERIFIED_CONDITION: &str = "Verified";

use crate::controller::Stop;
pub use crate::controller::{Error, Settings};

impl PhasedStatus for VerificationStatus {
    type Phase = VerificationPhase;

    fn progress(phase: VerificationPhase) -> Progress {
        match phase {
            VerificationPhase::Passed => Progress::Succeeded,
            VerificationPhase::Failed => Progress::Failed,
            _ => Progress::InProgress,
        }
    }

    fn phase(&self) -> Option<VerificationPhase> {
        self.phase
    }

    fn set_phase_fields(&mut self, phase: VerificationPhase, generation: Option<i64>) {
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
    async fn enter(
        &self,
        v: &Verification,
        status: &mut VerificationStatus,
        phase: VerificationPhase,
        reason: &str,
        message: String,
    ) -> Result<bool, kube::Error> {
        let said = message.clone();
        let news = controller::enter(&self.reporter, v, status, phase, reason, message).await?;
        if news {
            info!(?phase, reason, message = %said, "verification");
        }
        Ok(news)
    }
}

async fn reconcile(cached: Arc<Verification>, ctx: Arc<Context>) -> Result<Action, Error> {
    // Read again, not from the cache: a deleted pod or Restore wakes this after the outcome
    // was written, and a cached copy from before it would take them for a failure.
    let api = Api::<Verification>::namespaced(
        ctx.client.clone(),
        &cached.namespace().unwrap_or_default(),
    );
    let Some(v) = api.get_opt(&cached.name_any()).await? else {
        return Ok(Action::await_change());
    };
    let mut status = v.status.clone().unwrap_or_default();
    if status.phase.is_some_and(VerificationPhase::is_terminal) {
        // Whatever the outcome, nothing temporary stays; a delete that failed is retried.
        clean_up(&v, &ctx).await?;
        return Ok(Action::await_change());
    }
    match step(&v, &ctx, &mut status).await {
        Ok(action) => Ok(action),
        Err(Stop::Failed(failure)) => {
            finish(&v, &ctx, &mut status, Err(failure)).await?;
            Ok(Action::await_change())
        }
        Err(Stop::Api(e)) => Err(e.into()),
    }
}

/// One pass through the phases; each looks at what exists and does the next missing thing.
async fn step(
    v: &Verification,
    ctx: &Context,
    status: &mut VerificationStatus,
) -> Result<Action, Stop> {
    let phase = status.phase.unwrap_or(VerificationPhase::Pending);
    let action = match phase {
        VerificationPhase::Pending => pending(v, ctx, status).await?,
        VerificationPhase::Restoring => restoring(v, ctx, status).await?,
        VerificationPhase::Checking => checking(v, ctx, status).await?,
        VerificationPhase::Passed | VerificationPhase::Failed => return Ok(Action::await_change()),
    };
    // Still waiting (a report that arrived in time is never a timeout).
    if action.is_none()
        && plan::timed_out(
            status.started_at.as_ref(),
            v.spec.settings.timeout.0,
            &now(),
        )
    {
        let during = match phase {
            VerificationPhase::Restoring => "restoring",
            _ => "recovering and checking",
        };
        return Err(Failure::new(
            "Timeout",
            format!(
                "not done within {:?}: still {during}",
                v.spec.settings.timeout.0
            ),
        )
        .into());
    }
    // The timeout wakes it even when nothing else does.
    let left = plan::time_left(
        status.started_at.as_ref(),
        v.spec.settings.timeout.0,
        &now(),
    );
    Ok(match (action, left) {
        (Some(action), _) => action,
        (None, Some(left)) => Action::requeue(left + Duration::from_secs(1)),
        (None, None) => Action::await_change(),
    })
}

fn labels(v: &Verification) -> std::collections::BTreeMap<String, String> {
    controller::creator_labels(&VERIFICATION_CREATOR, v)
}

/// Pending: its turn, a Completed Backup, the source's image and settings; then the Restore.
async fn pending(
    v: &Verification,
    ctx: &Context,
    status: &mut VerificationStatus,
) -> Result<Option<Action>, Stop> {
    let ns = v.namespace().unwrap_or_default();
    // A Verification that cannot run fails at once, without waiting its turn.
    let backup = completed_backup(v, ctx, &ns).await?;
    let all = Api::<Verification>::namespaced(ctx.client.clone(), &ns)
        .list(&Default::default())
        .await?
        .items;
    if let Some(first) = plan::first_in_line(v, &all) {
        let message = format!("waiting for Verification {first}: one at a time in a namespace");
        ctx.enter(v, status, VerificationPhase::Pending, "Queued", message)
            .await?;
        return Ok(Some(Action::await_change()));
    }
    let backup_status = backup.status.clone().unwrap_or_default();
    if backup_status.wal_source == Some(WalSource::Archive)
        && v.spec.settings.restore_command.is_none()
    {
        return Err(Failure::new(
            "NoWalSource",
            format!(
                "Backup {} keeps no WAL of its own (walSource Archive): set restoreCommand to read it from the archive",
                backup.name_any()
            ),
        )
        .into());
    }
    let source = source_server(v, &backup, ctx, &ns).await?;
    let owner = v
        .controller_owner_ref(&())
        .expect("a stored object has a uid");
    let hba = plan::hba(&v.name_any(), &ns, owner.clone(), labels(v));
    create_or_keep(&Api::namespaced(ctx.client.clone(), &ns), &hba, v).await?;
    let restore = plan::restore(v, &backup, owner, labels(v))
        .map_err(|e| Failure::new("InvalidSpec", e.to_string()))?;
    create_or_keep(&Api::namespaced(ctx.client.clone(), &ns), &restore, v).await?;
    status.image = Some(source.image);
    status.restore = Some(restore.name_any());
    status.started_at = Some(now());
    let message = format!(
        "restoring Backup {} into temporary claims (Restore {})",
        backup.name_any(),
        restore.name_any()
    );
    ctx.enter(
        v,
        status,
        VerificationPhase::Restoring,
        "Restoring",
        message,
    )
    .await?;
    Ok(None)
}

async fn completed_backup(v: &Verification, ctx: &Context, ns: &str) -> Result<Backup, Stop> {
    let name = &v.spec.backup_name;
    let backup = Api::<Backup>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await?
        .ok_or_else(|| Failure::new("BackupNotFound", format!("Backup {name} does not exist")))?;
    match backup.status.as_ref().and_then(|s| s.phase) {
        Some(Phase::Completed) => Ok(backup),
        phase => Err(Failure::new(
            "BackupNotCompleted",
            format!(
                "Backup {name} is {:?}: only a Completed backup is verified",
                phase.unwrap_or(Phase::Pending)
            ),
        )
        .into()),
    }
}

/// The backed-up server's container, which the temporary one copies, with the
/// Verification's own image and parameters over it.
async fn source_server(
    v: &Verification,
    backup: &Backup,
    ctx: &Context,
    ns: &str,
) -> Result<plan::SourceServer, Stop> {
    let status = backup.status.clone().unwrap_or_default();
    let pod_name = status.postgres.map(|p| p.pod).unwrap_or_default();
    let data_claim = status
        .snapshots
        .iter()
        .find(|s| s.role == VolumeRole::Data)
        .map(|s| s.persistent_volume_claim.clone())
        .unwrap_or_default();
    let pod = Api::<Pod>::namespaced(ctx.client.clone(), ns)
        .get_opt(&pod_name)
        .await?;
    Ok(plan::with_settings(
        pod.as_ref(),
        &data_claim,
        &v.spec.settings,
    )?)
}

/// Creates `object`; one of that name made by this Verification before is kept.
async fn create_or_keep<K>(api: &Api<K>, object: &K, v: &Verification) -> Result<(), Stop>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = api.get(&object.name_any()).await?;
            match controller::created_by(&existing, &VERIFICATION_CREATOR, v) {
                true => Ok(()),
                false => Err(Failure::new(
                    "NameConflict",
                    format!(
                        "{} {} exists and is not this Verification's: pgsnap never adopts or overwrites it",
                        K::kind(&()),
                        object.name_any()
                    ),
                )
                .into()),
            }
        }
        // Refused (a quota, an admission webhook, a rule of the CRD): it would be refused
        // again, and this Verification would hold the namespace's queue for ever.
        Err(kube::Error::Api(e)) if matches!(e.code, 400 | 403 | 422) => Err(Failure::new(
            "Refused",
            format!(
                "creating {} {}: {}",
                K::kind(&()),
                object.name_any(),
                e.message
            ),
        )
        .into()),
        Err(e) => Err(e.into()),
    }
}

/// Restoring: the Restore ends; then the temporary server and its checker.
async fn restoring(
    v: &Verification,
    ctx: &Context,
    status: &mut VerificationStatus,
) -> Result<Option<Action>, Stop> {
    let ns = v.namespace().unwrap_or_default();
    let name = plan::restore_name(&v.name_any());
    let restore = Api::<Restore>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&name)
        .await?
        .ok_or_else(|| Failure::new("RestoreFailed", format!("Restore {name} was deleted")))?;
    let rs = restore.status.clone().unwrap_or_default();
    match rs.phase {
        Some(RestorePhase::Completed) => {}
        Some(RestorePhase::Failed) => {
            let e = rs.error.unwrap_or(crate::api::restore::RestoreError {
                reason: "Failed".into(),
                message: String::new(),
            });
            return Err(Failure::new(
                "RestoreFailed",
                format!("Restore {name}: {}: {}", e.reason, e.message),
            )
            .into());
        }
        // Woken by the Restore's changes, and by the timeout.
        _ => return Ok(None),
    }
    let backup = completed_backup(v, ctx, &ns).await?;
    let mut source = source_server(v, &backup, ctx, &ns).await?;
    // The image read when its turn came, even if the pod changed since.
    if let Some(image) = &status.image {
        source.image = image.clone();
    }
    let timings = status
        .timings
        .get_or_insert_with(VerificationTimings::default);
    if let (Some(started), Some(done)) = (&status.started_at, &rs.completed_at) {
        timings.restore_seconds = Some(done.0.duration_since(started.0).as_secs_f64());
    }
    let left = plan::time_left(
        status.started_at.as_ref(),
        v.spec.settings.timeout.0,
        &now(),
    )
    .unwrap_or(v.spec.settings.timeout.0);
    let pod = plan::server_pod(plan::ServerPod {
        name: &v.name_any(),
        namespace: &ns,
        owner: v
            .controller_owner_ref(&())
            .expect("a stored object has a uid"),
        labels: labels(v),
        source: &source,
        claims: &rs.claims,
        checker_image: &ctx.settings.image,
        checker_args: checker_args(v, &backup, left)?,
        resources: v.spec.settings.resources.clone(),
    })?;
    create_or_keep(&Api::namespaced(ctx.client.clone(), &ns), &pod, v).await?;
    status.pod = pod.metadata.name.clone();
    let message = format!(
        "PostgreSQL ({}) recovering on the restored claims in pod {}, then the checks",
        source.image,
        pod.name_any()
    );
    ctx.enter(v, status, VerificationPhase::Checking, "Checking", message)
        .await?;
    Ok(None)
}

/// `pgsnap verify-server`'s arguments: what the restored server must be.
fn checker_args(v: &Verification, backup: &Backup, left: Duration) -> Result<Vec<String>, Failure> {
    let status = backup.status.clone().unwrap_or_default();
    let pg = status.postgres.clone().unwrap_or_default();
    let missing = |what: &str| {
        Failure::new(
            "BackupIncomplete",
            format!("Backup {} records no {what}", backup.name_any()),
        )
    };
    let mut args = vec![
        "verify-server".to_string(),
        format!("--user={}", backup.spec.connection.user),
        format!("--database={}", backup.spec.connection.database),
        format!(
            "--system-identifier={}",
            pg.system_identifier
                .ok_or_else(|| missing("system identifier"))?
        ),
        format!(
            "--timeline={}",
            pg.timeline.ok_or_else(|| missing("timeline"))?
        ),
        format!(
            "--stop-lsn={}",
            status.stop_lsn.ok_or_else(|| missing("stop LSN"))?
        ),
        format!("--recovery-timeout={}s", left.as_secs().max(1)),
        format!(
            "--checks={}",
            serde_json::to_string(&v.spec.settings.checks).unwrap_or_else(|_| "[]".into())
        ),
    ];
    if v.spec.settings.heap_all_indexed {
        args.push("--heap-all-indexed".into());
    }
    Ok(args)
}

/// Checking: the checker reports, or the server stops first.
async fn checking(
    v: &Verification,
    ctx: &Context,
    status: &mut VerificationStatus,
) -> Result<Option<Action>, Stop> {
    let ns = v.namespace().unwrap_or_default();
    let name = plan::pod_name(&v.name_any());
    let pod = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&name)
        .await?
        .ok_or_else(|| Failure::new("ServerFailed", format!("pod {name} was deleted")))?;
    match plan::pod_outcome(&pod) {
        PodOutcome::Running => Ok(None),
        PodOutcome::Reported(report) => {
            let timings = status
                .timings
                .get_or_insert_with(VerificationTimings::default);
            timings.recovery_seconds = report.recovery_seconds;
            timings.checks_seconds = report.checks_seconds;
            status.checked = report.checked;
            let outcome = match report.failure {
                None => Ok(()),
                Some(f) => Err(Failure::new(&f.reason, f.message)),
            };
            finish(v, ctx, status, outcome).await?;
            Ok(Some(Action::await_change()))
        }
        PodOutcome::ServerStopped(message) => Err(Failure::new("ServerFailed", message).into()),
        PodOutcome::CheckerFailed(message) => Err(Failure::new("CheckError", message).into()),
    }
}

/// The end: the outcome on the Backup and the Verification, an Event on both, the metrics,
/// and nothing temporary left. Each step may be retried: the Backup's record first, so a
/// Verification never reads ended without it; the clean-up last, which a terminal
/// Verification repeats until it is done.
async fn finish(
    v: &Verification,
    ctx: &Context,
    status: &mut VerificationStatus,
    outcome: Result<(), Failure>,
) -> Result<(), kube::Error> {
    let done = now();
    status.completed_at = Some(done.clone());
    let (phase, result, reason, message) = match &outcome {
        Ok(()) => {
            let c = status.checked.clone().unwrap_or_default();
            let message = format!(
                "restored, recovered and promoted onto timeline {}; amcheck: {} B-tree indexes in {} databases sound; verify_heapam: {} tables; {} SQL checks held",
                c.timeline, c.indexes, c.databases, c.tables, c.sql_checks
            );
            (
                VerificationPhase::Passed,
                "Passed",
                "Passed".to_string(),
                message,
            )
        }
        Err(f) => {
            warn!(reason = %f.reason, message = %f.message, "verification failed");
            status.error = Some(VerificationError {
                reason: f.reason.clone(),
                message: f.message.clone(),
            });
            (
                VerificationPhase::Failed,
                "Failed",
                f.reason.clone(),
                f.message.clone(),
            )
        }
    };
    let ns = v.namespace().unwrap_or_default();
    let record = BackupVerification {
        result: result.into(),
        verification: v.name_any(),
        verified_at: done.clone(),
        reason: outcome.as_ref().err().map(|f| f.reason.clone()),
        message: outcome.as_ref().err().map(|f| f.message.clone()),
    };
    let condition = Condition {
        type_: VERIFIED_CONDITION.into(),
        status: if outcome.is_ok() { "True" } else { "False" }.into(),
        reason: reason.clone(),
        message: format!("Verification {}: {message}", v.name_any()),
        observed_generation: None,
        last_transition_time: done.clone(),
    };
    let patch = serde_json::json!({
        "apiVersion": "pgsnap.io/v1alpha1", "kind": "Backup",
        "status": {"verification": record, "conditions": [condition]},
    });
    let backups = Api::<Backup>::namespaced(ctx.client.clone(), &ns);
    // Only a verdict on the backup goes onto it: a verification that could not run (its
    // turn timed out, its pod was refused) says nothing about it, and never replaces a
    // verdict; nor does one of a Backup not Completed.
    let verdict = outcome
        .as_ref()
        .err()
        .is_none_or(|f| plan::is_verdict(&f.reason));
    let backup = match backups.get_opt(&v.spec.backup_name).await? {
        Some(b) if verdict && b.status.as_ref().and_then(|s| s.phase) == Some(Phase::Completed) => {
            let written = backups
                .patch_status(
                    &v.spec.backup_name,
                    &PatchParams::apply(BACKUP_FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await;
            match written {
                Ok(backup) => Some(backup),
                // The Backup went meanwhile: the Verification keeps the outcome.
                Err(kube::Error::Api(e)) if e.code == 404 => None,
                Err(e) => return Err(e),
            }
        }
        _ => None,
    };
    if ctx
        .enter(v, status, phase, &reason, message.clone())
        .await?
    {
        let database = status
            .checked
            .as_ref()
            .map(|c| c.system_identifier.clone())
            .filter(|id| !id.is_empty())
            .unwrap_or_default();
        let seconds = status
            .started_at
            .as_ref()
            .map(|s| done.0.duration_since(s.0).as_secs_f64());
        let labels = DatabaseLabels {
            namespace: ns,
            database,
        };
        ctx.metrics
            .verification_ended(outcome.is_ok(), &reason, labels, &done, seconds);
        if let Some(backup) = &backup {
            let type_ = match outcome.is_ok() {
                true => EventType::Normal,
                false => EventType::Warning,
            };
            let note = format!("Verification {}: {message}", v.name_any());
            ctx.reporter
                .publish(backup, type_, &format!("Verification{result}"), note)
                .await;
        }
    }
    clean_up(v, ctx).await
}

/// Deletes the pod, the Restore (its claims go with it) and the ConfigMap this Verification
/// made, and only those.
async fn clean_up(v: &Verification, ctx: &Context) -> Result<(), kube::Error> {
    let ns = v.namespace().unwrap_or_default();
    let name = v.name_any();
    let client = &ctx.client;
    controller::delete_if_created_by(
        &Api::<Pod>::namespaced(client.clone(), &ns),
        &plan::pod_name(&name),
        &VERIFICATION_CREATOR,
        v,
    )
    .await?;
    controller::delete_if_created_by(
        &Api::<Restore>::namespaced(client.clone(), &ns),
        &plan::restore_name(&name),
        &VERIFICATION_CREATOR,
        v,
    )
    .await?;
    controller::delete_if_created_by(
        &Api::<ConfigMap>::namespaced(client.clone(), &ns),
        &plan::hba_name(&name),
        &VERIFICATION_CREATOR,
        v,
    )
    .await?;
    Ok(())
}

fn error_policy(v: Arc<Verification>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(verification = %v.name_any(), reason = error.reason(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the Verification controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let ns = settings.namespace.clone();
    let verifications: Api<Verification> = controller::api(&client, ns.as_deref());
    let restores: Api<Restore> = controller::api(&client, ns.as_deref());
    let pods: Api<Pod> = controller::api(&client, ns.as_deref());
    let ctx = Arc::new(Context {
        reporter: Reporter::new(client.clone(), "Verification"),
        client,
        settings,
        metrics,
    });
    let controller = Controller::new(verifications.clone(), watcher::Config::default());
    let store = controller.store();
    let owned = || watcher::Config::default().labels(VERIFICATION_UID_LABEL);
    controller
        .owns(restores, owned())
        .owns(pods, owned())
        // One that ends lets the next of its namespace start.
        .watches(
            verifications,
            watcher::Config::default(),
            move |ended: Verification| {
                let waiting: Vec<ObjectRef<Verification>> = store
                    .state()
                    .iter()
                    .filter(|w| {
                        w.namespace() == ended.namespace()
                            && w.status
                                .as_ref()
                                .and_then(|s| s.phase)
                                .is_none_or(|p| p == VerificationPhase::Pending)
                    })
                    .map(|w| ObjectRef::from_obj(w.as_ref()))
                    .collect();
                waiting
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
    info!("verification controller stopped");
}
