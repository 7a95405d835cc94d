//! The Restore's phase machine as pure decisions: whether its source may be restored, what
//! each snapshot, claim and Job it observes means, and the messages of each phase. The
//! reconciler (`super`) does the API calls; unit tests call these directly.
//!
//! Pending (resolve the label and the snapshots) → Provisioning (claims from the snapshots,
//! until bound) → Preparing (the restore-prepare Job, until it ends) → Completed | Failed.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::{Resource, ResourceExt};

use crate::api::RESTORE_CREATOR;
use crate::api::backup::{BackupStatus, Phase, VolumeRole};
use crate::api::restore::{Restore, RestoreSpec};
use crate::api::snapshot::{SnapshotLike as _, VolumeSnapshot};
use crate::controller::{Failure, created_by};
use crate::label_store::{self, LabelRecord};
use crate::restore::plan::PlannedClaim;
use crate::restore::prepare::EXIT_REFUSED;

/// A VolumeSnapshot restores only in its own namespace.
pub fn check_namespace(spec: &RestoreSpec, namespace: &str) -> Result<(), Failure> {
    match spec.source_namespace.as_deref().filter(|s| *s != namespace) {
        Some(source_ns) => Err(Failure::new(
            "CrossNamespaceUnsupported",
            format!(
                "the source is in namespace {source_ns}: a VolumeSnapshot restores only in its own namespace, and pgsnap does not pre-provision VolumeSnapshotContents yet; create the Restore in {source_ns}"
            ),
        )),
        None => Ok(()),
    }
}

/// The label ConfigMap of a Backup that may be restored: only a Completed one.
pub fn completed_backup_label(name: &str, status: Option<BackupStatus>) -> Result<String, Failure> {
    let status = status.unwrap_or_default();
    if status.phase != Some(Phase::Completed) {
        let phase = status
            .phase
            .map(|p| format!("{p:?}"))
            .unwrap_or_else(|| "Pending".into());
        return Err(Failure::new(
            "BackupNotCompleted",
            format!("Backup {name} is {phase}; only a Completed backup can be restored"),
        ));
    }
    Ok(status
        .label_config_map
        .unwrap_or_else(|| label_store::config_map_name(name)))
}

/// The label read must be the one the spec asks for: the named backup's, naming the named
/// snapshot as the data directory's.
pub fn check_label(
    spec: &RestoreSpec,
    config_map: &str,
    label: &LabelRecord,
) -> Result<(), Failure> {
    if let (Some(backup), Some(of)) = (&spec.backup_name, &label.backup)
        && backup != of
    {
        return Err(Failure::new(
            "LabelConfigMapInvalid",
            format!("label ConfigMap {config_map} belongs to backup {of}, not {backup}"),
        ));
    }
    if let Some(snapshot) = &spec.volume_snapshot_name
        && !label
            .volumes
            .iter()
            .any(|v| &v.volume_snapshot == snapshot && v.location.role == VolumeRole::Data)
    {
        return Err(Failure::new(
            "SnapshotMismatch",
            format!(
                "label ConfigMap {config_map} does not name {snapshot} as the snapshot of the data directory"
            ),
        ));
    }
    Ok(())
}

/// A snapshot to restore from must be ready; its restoreSize, when the driver reports one.
pub fn usable_snapshot(name: &str, snapshot: &VolumeSnapshot) -> Result<Option<String>, Failure> {
    if let Some(err) = snapshot.error_message() {
        return Err(Failure::new(
            "SnapshotFailed",
            format!("VolumeSnapshot {name} failed: {err}"),
        ));
    }
    if !snapshot.is_ready() {
        return Err(Failure::new(
            "SnapshotNotReady",
            format!("VolumeSnapshot {name} is not ready to use"),
        ));
    }
    Ok(snapshot
        .status
        .as_ref()
        .and_then(|s| s.restore_size.as_ref())
        .map(|q| q.0.clone()))
}

pub fn default_class(classes: &[StorageClass]) -> Option<String> {
    classes
        .iter()
        .find(|c| {
            c.annotations()
                .get("storageclass.kubernetes.io/is-default-class")
                .is_some_and(|v| v == "true")
        })
        .map(|c| c.name_any())
}

/// Whether this very Restore (by uid) made `object`: only such objects are its own.
pub fn made_by(object: &impl Resource, restore: &Restore) -> bool {
    created_by(object, &RESTORE_CREATOR, restore)
}

pub fn is_bound(pvc: &PersistentVolumeClaim) -> bool {
    pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
}

/// Whether provisioning waits for this claim. WaitForFirstConsumer binds only for a pod:
/// the prepare Job is that pod, so such a claim does not hold the Job back.
pub fn claim_waits(pvc: &PersistentVolumeClaim, classes: &[StorageClass]) -> bool {
    let class = pvc.spec.as_ref().and_then(|s| s.storage_class_name.clone());
    let late_binding = classes
        .iter()
        .find(|c| Some(c.name_any()) == class)
        .and_then(|c| c.volume_binding_mode.as_deref())
        == Some("WaitForFirstConsumer");
    !is_bound(pvc) && !late_binding
}

pub fn provisioning_message(claims: usize, waiting: &[String]) -> String {
    format!(
        "restoring {claims} volume(s) from snapshots; waiting for {} to be bound",
        waiting.join(", ")
    )
}

pub fn preparing_message(job: &str, claims: &[PlannedClaim]) -> String {
    let names: Vec<&str> = claims.iter().map(|p| p.name.as_str()).collect();
    format!(
        "Job {job} runs pgsnap restore-prepare on claim {}",
        names.join(", ")
    )
}

/// What the user does next: where to mount the data claim and which PGDATA to start with.
pub fn completed_message(claims: &[PlannedClaim]) -> String {
    let hint = claims
        .iter()
        .find(|p| p.role == VolumeRole::Data)
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
    format!(
        "{} claim(s) restored and prepared for recovery{hint}",
        claims.len()
    )
}

#[derive(Debug, PartialEq, Eq)]
pub enum JobOutcome {
    Running,
    Succeeded,
    Failed { message: String },
}

pub fn job_outcome(job: &Job) -> JobOutcome {
    let Some(status) = &job.status else {
        return JobOutcome::Running;
    };
    let condition = |t: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t && c.status == "True")
    };
    if let Some(failed) = condition("Failed") {
        return JobOutcome::Failed {
            message: failed
                .message
                .clone()
                .unwrap_or_else(|| failed.reason.clone().unwrap_or_default()),
        };
    }
    if condition("Complete").is_some() || status.succeeded.unwrap_or(0) > 0 {
        return JobOutcome::Succeeded;
    }
    JobOutcome::Running
}

/// The refusal restore-prepare wrote to its termination message: `Reason: message`, the
/// reason CamelCase as every condition reason must be (a log line such as clap's
/// `error: ...` is not one).
pub fn refusal(termination_message: &str) -> Option<Failure> {
    let line = termination_message.trim();
    let (reason, message) = line.split_once(": ")?;
    let camel = reason.starts_with(|c: char| c.is_ascii_uppercase())
        && reason.chars().all(|c| c.is_ascii_alphanumeric());
    camel.then(|| Failure::new(reason, message))
}

/// Why the Job failed: restore-prepare's refusal from a termination message when there is
/// one, else its exit status, else what the Job controller says.
pub fn job_failure(
    job: &str,
    job_message: String,
    terminated: &[ContainerStateTerminated],
) -> Failure {
    // Only a refusal (its exit status) says why in its termination message.
    if let Some(refusal) = terminated
        .iter()
        .filter(|t| t.exit_code == EXIT_REFUSED)
        .filter_map(|t| t.message.as_deref())
        .find_map(refusal)
    {
        return refusal;
    }
    // A node that reports no termination message still reports the exit status.
    if terminated.iter().any(|t| t.exit_code == EXIT_REFUSED) {
        return Failure::new(
            "PrepareRefused",
            format!(
                "restore-prepare refused to prepare the data volume; its reason is in `kubectl logs job/{job}`"
            ),
        );
    }
    Failure::new("PrepareFailed", format!("Job {job} failed: {job_message}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};

    #[test]
    fn refusals_come_back_with_their_reason() {
        let f = refusal("LabelChecksumMismatch: backup_label does not match\n").unwrap();
        assert_eq!(
            (f.reason.as_str(), f.message.as_str()),
            ("LabelChecksumMismatch", "backup_label does not match")
        );
        assert_eq!(refusal("thread 'main' panicked at x: y"), None);
        assert_eq!(refusal("error: invalid value '0/x' for '--stop-lsn'"), None);
        assert_eq!(refusal(""), None);
    }

    #[test]
    fn a_failed_job_names_the_most_specific_reason_it_has() {
        let ended = |code: i32, message: Option<&str>| ContainerStateTerminated {
            exit_code: code,
            message: message.map(Into::into),
            ..Default::default()
        };
        let f = job_failure(
            "r-prepare",
            "BackoffLimitExceeded".into(),
            &[ended(
                3,
                Some("SystemIdentifierMismatch: pg_control says 1, the backup 2"),
            )],
        );
        assert_eq!(f.reason, "SystemIdentifierMismatch");
        let f = job_failure("r-prepare", "x".into(), &[ended(EXIT_REFUSED, None)]);
        assert_eq!(f.reason, "PrepareRefused");
        let f = job_failure(
            "r-prepare",
            "BackoffLimitExceeded".into(),
            &[ended(1, None)],
        );
        assert_eq!(
            (f.reason.as_str(), f.message.as_str()),
            (
                "PrepareFailed",
                "Job r-prepare failed: BackoffLimitExceeded"
            )
        );
    }

    #[test]
    fn a_job_is_running_until_a_condition_says_otherwise() {
        let job = |type_: &str, succeeded: Option<i32>| Job {
            status: Some(JobStatus {
                conditions: Some(vec![JobCondition {
                    type_: type_.into(),
                    status: "True".into(),
                    message: Some("why".into()),
                    ..Default::default()
                }]),
                succeeded,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(job_outcome(&Job::default()), JobOutcome::Running);
        assert_eq!(job_outcome(&job("Suspended", None)), JobOutcome::Running);
        assert_eq!(job_outcome(&job("Complete", None)), JobOutcome::Succeeded);
        assert_eq!(
            job_outcome(&job("Suspended", Some(1))),
            JobOutcome::Succeeded
        );
        assert_eq!(
            job_outcome(&job("Failed", None)),
            JobOutcome::Failed {
                message: "why".into()
            }
        );
    }

    #[test]
    fn only_a_completed_backup_is_restored() {
        let status = |phase| {
            Some(BackupStatus {
                phase: Some(phase),
                ..Default::default()
            })
        };
        assert_eq!(
            completed_backup_label("b1", status(Phase::Completed)).unwrap(),
            "b1-backup-label"
        );
        let f = completed_backup_label("b1", status(Phase::Finalizing)).unwrap_err();
        assert_eq!(
            (f.reason.as_str(), f.message.as_str()),
            (
                "BackupNotCompleted",
                "Backup b1 is Finalizing; only a Completed backup can be restored"
            )
        );
        let f = completed_backup_label("b1", None).unwrap_err();
        assert!(f.message.contains("is Pending;"), "{}", f.message);
    }
}
