//! The `BackupSchedule` resource: Backups on a cron schedule, and which of them to keep.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::Duration;
use super::backup::BackupSpec;
use super::verification::VerificationSettings;

/// Backups of one database on a cron schedule, with grandfather-father-son retention.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pgsnap.io",
    version = "v1alpha1",
    kind = "BackupSchedule",
    namespaced,
    status = "BackupScheduleStatus",
    shortname = "pgschedule",
    category = "pgsnap",
    doc = "Backups of one PostgreSQL server on a cron schedule, pruned by a retention policy",
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(name = "Suspend", type_ = "boolean", json_path = ".spec.suspend"),
    printcolumn(name = "Last", type_ = "date", json_path = ".status.lastScheduleTime"),
    printcolumn(
        name = "Last Completed",
        type_ = "string",
        json_path = ".status.lastSuccessfulBackup.name"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BackupScheduleSpec {
    /// When to back up, in cron syntax: five fields (minute hour day-of-month month
    /// day-of-week), or six with seconds first; `@daily` and the like too. Checked by the
    /// operator: a pattern it cannot parse sets the condition Ready False, reason
    /// `InvalidSchedule`.
    #[schemars(length(min = 1, max = 128))]
    pub schedule: String,
    /// The IANA time zone the schedule and the retention's days, weeks, months and years are
    /// counted in, e.g. `Europe/Berlin`. Default: UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
    /// No new Backups while true; retention still prunes.
    #[serde(default)]
    pub suspend: bool,
    /// A run missed by more than this (the operator was down) is skipped; of several missed
    /// runs only the latest is made up, never a burst. Default 1h.
    #[serde(default = "default_starting_deadline")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') && duration(self) >= duration('1s')").message("startingDeadline must be a duration, e.g. 1h"))]
    pub starting_deadline: Duration,
    /// What a due run does while the schedule's previous Backup still runs.
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,
    /// The spec of each Backup the schedule creates.
    pub backup_template: BackupSpec,
    #[serde(default)]
    pub retention: Retention,
    /// What deleting the schedule does to the Backups it made (each Backup's own
    /// `deletionPolicy` then decides its snapshots).
    #[serde(default)]
    pub backup_deletion_policy: BackupDeletionPolicy,
    /// Proof that the schedule's backups restore: a Verification of the chosen ones, owned
    /// by its Backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<ScheduleVerification>,
}

/// Which of a schedule's Completed backups are verified, and how.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.every) != self.daily").message("set every (each Nth backup) or daily: true (the first of each day), one of them"))]
#[serde(rename_all = "camelCase")]
pub struct ScheduleVerification {
    /// Each Nth Completed backup (1: every one), counting from the first the schedule made
    /// since verification was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub every: Option<u32>,
    /// The first Completed backup of each day, in the schedule's time zone.
    #[serde(default)]
    pub daily: bool,
    /// The Verifications' settings (each one's backupName is its Backup).
    #[serde(default)]
    pub template: VerificationSettings,
}

fn default_starting_deadline() -> Duration {
    Duration::from_secs(3600)
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum ConcurrencyPolicy {
    /// Skip the run.
    #[default]
    Forbid,
    /// Delete the running Backup (PostgreSQL aborts it) and start the new one.
    Replace,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum BackupDeletionPolicy {
    /// The Backups stay, no longer owned by a schedule.
    #[default]
    Keep,
    /// The Backups are deleted with the schedule.
    Delete,
}

/// Which Completed Backups of the schedule are kept: the newest `keepLast`, and the newest of
/// each of the last `hourly` hours, `daily` days, `weekly` ISO weeks, `monthly` months and
/// `yearly` years that have one. The newest Completed Backup, one a Restore in progress reads,
/// and one annotated `pgsnap.io/keep: "true"` are always kept; Backups made by hand are never
/// touched.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub keep_last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub hourly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub monthly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub yearly: Option<u32>,
    /// How long Failed Backups stay for inspection. Default 24h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_failed_for: Option<Duration>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupScheduleStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The due time of the last run the schedule acted on (made a Backup, or skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// The pattern and time zone `lastScheduleTime` counts in: a changed one counts from the
    /// change, so an edit never makes a run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_backup: Option<BackupRef>,
    /// The last Backup a Verification was made for, and how many Completed backups came
    /// since (for `verification.every`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified_backup: Option<BackupRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_since_verified: Option<u32>,
    /// The Backups retention keeps, newest first, each with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<KeptBackup>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupRef {
    pub name: String,
    /// When it completed (its backup mode ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeptBackup {
    pub name: String,
    /// `newest`, `last`, `hourly`, `daily`, `weekly`, `monthly`, `yearly`, `noRetention` (no
    /// rule is set), `running`, `restoring`, `annotated` or `failedRecently`.
    pub reasons: Vec<String>,
}
