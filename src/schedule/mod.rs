//! The BackupSchedule controller: makes a Backup when a run comes due and prunes the
//! schedule's Backups by its retention. Level-based: each pass reads the schedule's Backups
//! and the Restores that read them, decides with [`plan`], and acts; the next pass is timed
//! for the next run.

pub mod plan;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::backup::{Backup, BackupStatus, Phase};
use crate::api::restore::Restore;
use crate::api::schedule::{
    BackupDeletionPolicy, BackupRef, BackupSchedule, BackupScheduleStatus, ConcurrencyPolicy,
    ScheduleVerification,
};
use crate::api::verification::{Verification, VerificationSpec};
use crate::api::{SCHEDULE_CREATOR, SCHEDULE_UID_LABEL};
use crate::controller::{self, Reporter, creator_labels, delete_exactly, now};
use crate::telemetry::{Metrics, ScheduleLabels};
use plan::{Candidate, Clock, Run, State};

const FINALIZER: &str = "pgsnap.io/schedule-protection";

/// A Backup annotated so is never pruned by its schedule.
pub const KEEP_ANNOTATION: &str = "pgsnap.io/keep";

fn marked_to_keep(backup: &Backup) -> bool {
    backup
        .annotations()
        .get(KEEP_ANNOTATION)
        .map(String::as_str)
        == Some("true")
}

/// The run a Backup was made for.
pub const SCHEDULED_AT_ANNOTATION: &str = "pgsnap.io/scheduled-at";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApi",
            Error::Finalizer(_) => "Finalizer",
        }
    }
}

pub struct Context {
    client: Client,
    reporter: Reporter,
    metrics: Arc<Metrics>,
}

/// Runs the BackupSchedule controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let schedules: Api<BackupSchedule> = controller::api(&client, namespace.as_deref());
    let backups: Api<Backup> = controller::api(&client, namespace.as_deref());
    let ctx = Arc::new(Context {
        reporter: Reporter::new(client.clone(), "BackupSchedule"),
        client,
        metrics,
    });
    let controller = Controller::new(schedules, watcher::Config::default());
    let store = controller.store();
    controller
        // A Backup of the schedule that ends, or goes, wakes it (retention, status).
        .watches(
            backups,
            watcher::Config::default().labels(SCHEDULE_UID_LABEL),
            move |backup: Backup| controller::creator_in(&store, &backup, SCHEDULE_UID_LABEL),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
    info!("schedule controller stopped");
}

async fn reconcile(schedule: Arc<BackupSchedule>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<BackupSchedule> = Api::namespaced(
        ctx.client.clone(),
        &schedule.namespace().unwrap_or_default(),
    );
    finalizer(&api, FINALIZER, schedule, |event| async {
        match event {
            finalizer::Event::Apply(s) => apply(s, &ctx).await,
            finalizer::Event::Cleanup(s) => cleanup(s, &ctx).await,
        }
    })
    .await
    .or_else(|e| match e {
        finalizer::Error::RemoveFinalizer(kube::Error::Api(s)) if s.code == 404 => {
            Ok(Action::await_change())
        }
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => Err(e),
        e => Err(Error::Finalizer(Box::new(e))),
    })
}

/// How often a schedule is looked at even when no run is due: Failed Backups and those a
/// Restore held expire by time, and Restores are not watched.
const RECHECK: Duration = Duration::from_secs(600);

/// One pass: the due run, retention, status; then wait for the next run.
async fn apply(schedule: Arc<BackupSchedule>, ctx: &Context) -> Result<Action, Error> {
    let spec = &schedule.spec;
    let mut status = schedule.status.clone().unwrap_or_default();
    let clock = match Clock::parse(&spec.schedule, spec.time_zone.as_deref()) {
        Ok(clock) => clock,
        Err(why) => {
            // Said once, not on every wake-up by one of its Backups.
            if !controller::ready_says(&status.conditions, "InvalidSchedule", &why) {
                set_ready(&mut status, &schedule, false, "InvalidSchedule", &why);
                status.next_schedule_time = None;
                ctx.reporter.patch_status(&*schedule, &status).await?;
                ctx.reporter
                    .publish(&*schedule, EventType::Warning, "InvalidSchedule", why)
                    .await;
            }
            return Ok(Action::await_change());
        }
    };
    let now = jiff::Timestamp::now();
    let mut backups = own_backups(ctx, &schedule).await?;

    // A changed pattern or zone starts counting now: an edit never makes a run at once.
    let pattern = format!(
        "{} {}",
        spec.schedule,
        spec.time_zone.as_deref().unwrap_or("UTC")
    );
    if status
        .schedule
        .as_ref()
        .is_some_and(|acted| *acted != pattern)
    {
        status.last_schedule_time = Some(Time(now));
    }
    status.schedule = Some(pattern);
    let acted_on = status
        .last_schedule_time
        .as_ref()
        .or(schedule.metadata.creation_timestamp.as_ref())
        .map(|t| t.0)
        .unwrap_or(now);
    let mut blocked = None;
    match plan::due(&clock, acted_on, now, spec.starting_deadline.0) {
        Run::None => {}
        Run::Due(at) if !spec.suspend => {
            match start_run(ctx, &schedule, &backups, at).await? {
                RunStart::Made(made) => backups.push(*made),
                RunStart::AlreadyMade => {}
                RunStart::Blocked(why) => blocked = Some(why),
            }
            status.last_schedule_time = Some(Time(at));
        }
        Run::Due(at) | Run::Missed(at) => {
            let why = match spec.suspend {
                true => format!("the run due at {at} was skipped: the schedule is suspended"),
                false => format!(
                    "the run due at {at} was missed by more than the startingDeadline ({})",
                    spec.starting_deadline
                ),
            };
            ctx.reporter
                .publish(&*schedule, EventType::Normal, "RunSkipped", why)
                .await;
            status.last_schedule_time = Some(Time(at));
        }
    }

    prune(ctx, &schedule, &backups, &clock, now, &mut status).await?;
    status.next_schedule_time = clock.next_after(now).map(Time);
    if let (Some(policy), Some(newest)) = (&spec.verification, newest_completed(&backups)) {
        let (verify, since) = plan::to_verify(
            policy,
            &newest,
            status.last_successful_backup.as_ref(),
            status.last_verified_backup.as_ref(),
            status.completed_since_verified.unwrap_or(0),
            clock.time_zone(),
        );
        status.completed_since_verified = Some(since);
        if let (true, Some(backup)) = (verify, backups.iter().find(|b| b.name_any() == newest.name))
        {
            verify_backup(ctx, &schedule, backup, policy).await?;
            status.last_verified_backup = Some(newest);
        }
    }
    // Never backwards: a pruned or deleted newest Backup does not make the last success older.
    status.last_successful_backup = match (
        newest_completed(&backups),
        status.last_successful_backup.take(),
    ) {
        (Some(new), Some(old)) if old.time > new.time => Some(old),
        (new, old) => new.or(old),
    };
    match (blocked, &status.next_schedule_time, spec.suspend) {
        (Some(why), _, _) => set_ready(&mut status, &schedule, false, "RunBlocked", &why),
        (None, _, true) => set_ready(&mut status, &schedule, true, "Scheduled", "suspended"),
        (None, Some(next), false) => {
            let message = format!("next run at {}", next.0);
            set_ready(&mut status, &schedule, true, "Scheduled", &message)
        }
        (None, None, false) => {
            let message = "the schedule has no further run";
            set_ready(&mut status, &schedule, true, "Scheduled", message)
        }
    }
    record_metrics(
        ctx,
        &schedule,
        &clock,
        &status,
        newest_failure(&backups),
        now,
    );
    if schedule.status.as_ref() != Some(&status) {
        ctx.reporter.patch_status(&*schedule, &status).await?;
    }
    let until_next = status
        .next_schedule_time
        .as_ref()
        .map(|next| now.duration_until(next.0).unsigned_abs())
        .unwrap_or(RECHECK);
    Ok(Action::requeue(
        until_next.clamp(Duration::from_millis(100), RECHECK),
    ))
}

/// A Verification of `backup`, owned by it (so it goes with the Backup when retention prunes
/// it); one made by an earlier pass is fine.
async fn verify_backup(
    ctx: &Context,
    schedule: &BackupSchedule,
    backup: &Backup,
    policy: &ScheduleVerification,
) -> Result<(), Error> {
    let ns = schedule.namespace().unwrap_or_default();
    let name = controller::bounded_name(&backup.name_any(), "verify", 253);
    let verification = Verification {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(creator_labels(&SCHEDULE_CREATOR, schedule)),
            owner_references: backup.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: VerificationSpec {
            backup_name: backup.name_any(),
            settings: policy.template.clone(),
        },
        status: None,
    };
    match Api::<Verification>::namespaced(ctx.client.clone(), &ns)
        .create(&PostParams::default(), &verification)
        .await
    {
        Ok(_) => {
            let note = format!("Verification {name} of Backup {}", backup.name_any());
            ctx.reporter
                .publish(schedule, EventType::Normal, "VerificationCreated", note)
                .await;
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What starting a run did.
enum RunStart {
    Made(Box<Backup>),
    /// An earlier pass made this run's Backup already (its status write had not arrived).
    AlreadyMade,
    /// The previous run's Backup still runs and the policy is Forbid: why, for status.
    Blocked(String),
}

/// Makes the Backup of the run due at `at`, unless it exists or the concurrency policy says
/// to skip it.
async fn start_run(
    ctx: &Context,
    schedule: &BackupSchedule,
    backups: &[Backup],
    at: jiff::Timestamp,
) -> Result<RunStart, Error> {
    let run = at.to_string();
    let of_this_run = |b: &&Backup| b.annotations().get(SCHEDULED_AT_ANNOTATION) == Some(&run);
    if backups.iter().any(|b| of_this_run(&b)) {
        return Ok(RunStart::AlreadyMade);
    }
    let ns = schedule.namespace().unwrap_or_default();
    let api: Api<Backup> = Api::namespaced(ctx.client.clone(), &ns);
    let running: Vec<&Backup> = backups
        .iter()
        .filter(|b| {
            !b.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(Phase::is_terminal)
        })
        .collect();
    if let Some(first) = running.first() {
        match schedule.spec.concurrency_policy {
            ConcurrencyPolicy::Forbid => {
                let why = format!(
                    "the run due at {at} was skipped: {} still runs (concurrencyPolicy Forbid)",
                    first.name_any()
                );
                ctx.reporter
                    .publish(schedule, EventType::Warning, "RunBlocked", why.clone())
                    .await;
                return Ok(RunStart::Blocked(why));
            }
            ConcurrencyPolicy::Replace => {
                for backup in running {
                    delete_exactly(&api, backup).await?;
                }
            }
        }
    }
    let name = plan::backup_name(&schedule.name_any(), at);
    let backup = Backup {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns),
            labels: Some(creator_labels(&SCHEDULE_CREATOR, schedule)),
            annotations: Some(BTreeMap::from([(SCHEDULED_AT_ANNOTATION.to_string(), run)])),
            ..Default::default()
        },
        spec: schedule.spec.backup_template.clone(),
        status: None,
    };
    match api.create(&PostParams::default(), &backup).await {
        Ok(made) => {
            info!(backup = %name, due = %at, "scheduled backup created");
            ctx.reporter
                .publish(
                    schedule,
                    EventType::Normal,
                    "BackupCreated",
                    format!("Backup {name} for the run due at {at}"),
                )
                .await;
            Ok(RunStart::Made(Box::new(made)))
        }
        // The name is taken by something this schedule did not make for this run.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let why = format!(
                "the run due at {at} was skipped: a Backup named {name} exists and is not this schedule's"
            );
            ctx.reporter
                .publish(schedule, EventType::Warning, "NameConflict", why.clone())
                .await;
            Ok(RunStart::Blocked(why))
        }
        Err(e) => Err(e.into()),
    }
}

/// Retention: deletes what it does not keep (each Backup's deletionPolicy decides its
/// snapshots), and records what it keeps and why.
async fn prune(
    ctx: &Context,
    schedule: &BackupSchedule,
    backups: &[Backup],
    clock: &Clock,
    now: jiff::Timestamp,
    status: &mut BackupScheduleStatus,
) -> Result<(), Error> {
    let ns = schedule.namespace().unwrap_or_default();
    let restoring = restoring_backups(ctx, &ns).await?;
    let candidates: Vec<Candidate> = backups
        .iter()
        .map(|b| Candidate {
            name: b.name_any(),
            state: state_of(b),
            restoring: restoring.contains(&b.name_any()),
            annotated: marked_to_keep(b),
        })
        .collect();
    let decision = plan::retain(
        &candidates,
        &schedule.spec.retention,
        clock.time_zone(),
        now,
    );
    let api: Api<Backup> = Api::namespaced(ctx.client.clone(), &ns);
    for name in &decision.prune {
        if let Some(backup) = backups.iter().find(|b| &b.name_any() == name) {
            delete_exactly(&api, backup).await?;
            info!(backup = %name, "pruned by retention");
            ctx.reporter
                .publish(
                    schedule,
                    EventType::Normal,
                    "Pruned",
                    format!("Backup {name} is kept by no retention rule"),
                )
                .await;
        }
    }
    status.kept = decision.kept;
    Ok(())
}

/// The schedule's own Backups (by its uid), never one made by hand.
async fn own_backups(ctx: &Context, schedule: &BackupSchedule) -> Result<Vec<Backup>, Error> {
    let api: Api<Backup> = Api::namespaced(
        ctx.client.clone(),
        &schedule.namespace().unwrap_or_default(),
    );
    let selector = format!(
        "{SCHEDULE_UID_LABEL}={}",
        schedule.uid().unwrap_or_default()
    );
    Ok(api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .filter(|b| b.metadata.deletion_timestamp.is_none())
        .collect())
}

/// Names of the Backups a Restore in progress reads.
async fn restoring_backups(ctx: &Context, ns: &str) -> Result<Vec<String>, Error> {
    let api: Api<Restore> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|r| {
            !r.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(|p| p.is_terminal())
        })
        .filter_map(|r| r.spec.backup_name)
        .collect())
}

fn state_of(backup: &Backup) -> State {
    let status = backup.status.as_ref();
    let created = backup
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or_else(jiff::Timestamp::now);
    // A Failed one since it failed, so keepFailedFor is all inspection time.
    let ended = status
        .and_then(BackupStatus::ended_at)
        .map_or(created, |t| t.0);
    match status.and_then(|s| s.phase) {
        Some(Phase::Completed) => State::Completed(ended),
        Some(Phase::Failed) => State::Failed(ended),
        _ => State::Running,
    }
}

fn newest_completed(backups: &[Backup]) -> Option<BackupRef> {
    backups
        .iter()
        .filter_map(|b| match state_of(b) {
            State::Completed(at) => Some((at, b)),
            _ => None,
        })
        .max_by_key(|(at, _)| *at)
        .map(|(at, b)| BackupRef {
            name: b.name_any(),
            time: Some(Time(at)),
        })
}

fn newest_failure(backups: &[Backup]) -> Option<jiff::Timestamp> {
    backups
        .iter()
        .filter_map(|b| match state_of(b) {
            State::Failed(at) => Some(at),
            _ => None,
        })
        .max()
}

fn labels_of(schedule: &BackupSchedule) -> ScheduleLabels {
    ScheduleLabels {
        namespace: schedule.namespace().unwrap_or_default(),
        schedule: schedule.name_any(),
    }
}

fn record_metrics(
    ctx: &Context,
    schedule: &BackupSchedule,
    clock: &Clock,
    status: &BackupScheduleStatus,
    last_failure: Option<jiff::Timestamp>,
    now: jiff::Timestamp,
) {
    let labels = labels_of(schedule);
    let metrics = &ctx.metrics;
    if let Some(at) = last_failure {
        metrics
            .schedule_last_failure
            .get_or_create(&labels)
            .set(at.as_second());
    }
    if let Some(time) = status
        .last_successful_backup
        .as_ref()
        .and_then(|b| b.time.as_ref())
    {
        metrics
            .schedule_last_success
            .get_or_create(&labels)
            .set(time.0.as_second());
    }
    if let Some(interval) = clock.interval_after(now) {
        metrics
            .schedule_interval
            .get_or_create(&labels)
            .set(interval.as_secs() as i64);
    }
    metrics
        .schedule_kept
        .get_or_create(&labels)
        .set(status.kept.len() as i64);
}

fn set_ready(
    status: &mut BackupScheduleStatus,
    schedule: &BackupSchedule,
    ready: bool,
    reason: &str,
    message: &str,
) {
    let generation = schedule.metadata.generation;
    status.observed_generation = generation;
    controller::set_condition(
        &mut status.conditions,
        Condition {
            type_: "Ready".into(),
            status: if ready { "True" } else { "False" }.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: generation,
            last_transition_time: now(),
        },
    );
}

/// Deletion: the schedule's Backups stay (no longer scheduled) or go, as its policy says;
/// one a Restore reads or annotated to keep always stays. A cleanup that cannot succeed lets
/// go after the patience, with a Warning.
async fn cleanup(schedule: Arc<BackupSchedule>, ctx: &Context) -> Result<Action, Error> {
    let labels = labels_of(&schedule);
    ctx.metrics.schedule_last_success.remove(&labels);
    ctx.metrics.schedule_last_failure.remove(&labels);
    ctx.metrics.schedule_interval.remove(&labels);
    ctx.metrics.schedule_kept.remove(&labels);
    if schedule.spec.backup_deletion_policy == BackupDeletionPolicy::Keep {
        return Ok(Action::await_change());
    }
    match delete_backups(ctx, &schedule).await {
        Ok(()) => Ok(Action::await_change()),
        Err(e) => {
            let since = schedule.metadata.deletion_timestamp.as_ref();
            let failing_for = since
                .map(|t| jiff::Timestamp::now().duration_since(t.0).unsigned_abs())
                .unwrap_or_default();
            let refusal = match &e {
                Error::Kube(e) => Some(e),
                Error::Finalizer(_) => None,
            };
            if !controller::cleanup_gives_up(refusal, failing_for) {
                return Err(e);
            }
            let message =
                format!("could not delete the schedule's Backups ({e}); letting the schedule go");
            warn!("{message}");
            ctx.reporter
                .publish(&*schedule, EventType::Warning, "CleanupAbandoned", message)
                .await;
            Ok(Action::await_change())
        }
    }
}

async fn delete_backups(ctx: &Context, schedule: &BackupSchedule) -> Result<(), Error> {
    let ns = schedule.namespace().unwrap_or_default();
    let api: Api<Backup> = Api::namespaced(ctx.client.clone(), &ns);
    let restoring = restoring_backups(ctx, &ns).await?;
    for backup in own_backups(ctx, schedule).await? {
        if !marked_to_keep(&backup) && !restoring.contains(&backup.name_any()) {
            delete_exactly(&api, &backup).await?;
        }
    }
    Ok(())
}

fn error_policy(schedule: Arc<BackupSchedule>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(schedule = %schedule.name_any(), reason = error.reason(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}
