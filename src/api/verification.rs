//! The `Verification` resource: proof that a Backup restores. Its own resource rather than a
//! field of the Backup, because a verification is a process of its own: it can be repeated
//! (an old backup after an upgrade), has its own timeout, resources and outcome, and a
//! BackupSchedule makes them. Its result is also written onto the Backup it verified.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::Duration;

/// A Backup restored into temporary claims, PostgreSQL started on them with the backed-up
/// server's image, and checked as a DBA would: recovery reached the backup's end and
/// promoted, the system identifier and timeline are the backup's, amcheck finds every B-tree
/// index sound (and verify_heapam every table, 14+), and the user's SQL checks hold. Every
/// temporary object is deleted, whatever the outcome.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pgsnap.io",
    version = "v1alpha1",
    kind = "Verification",
    namespaced,
    status = "VerificationStatus",
    shortname = "pgverify",
    category = "pgsnap",
    doc = "Proof that a pgsnap Backup restores: restored, started and checked",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Backup", type_ = "string", json_path = ".spec.backupName"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.error.reason"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a Verification's spec is immutable: create a new Verification instead"))]
#[serde(rename_all = "camelCase")]
pub struct VerificationSpec {
    /// A Completed Backup in this namespace.
    #[schemars(length(min = 1, max = 253))]
    pub backup_name: String,
    /// What is checked, and with what.
    #[serde(flatten)]
    pub settings: VerificationSettings,
}

/// A Verification's settings but its Backup: what a BackupSchedule's Verifications share.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VerificationSettings {
    /// amcheck's heapallindexed: also check that every table row is in each of its indexes
    /// (reads every table; slower).
    #[serde(default)]
    pub heap_all_indexed: bool,
    /// SQL that must return true on the restored database, e.g. a table that must not be
    /// empty: `select count(*) > 0 from orders`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.all(c, self.exists_one(d, d.name == c.name))").message("each check name may be used once"))]
    pub checks: Vec<SqlCheck>,
    /// PostgreSQL's restore_command, for a backup whose WAL is in an archive
    /// (walSource Archive); a backup that kept its WAL needs none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    #[x_kube(validation = Rule::new("!self.contains('\\n') && !self.contains('\\r') && self.size() > 0").message("restoreCommand is one non-empty line"))]
    pub restore_command: Option<String>,
    /// The whole verification, restore included (Go duration, 1m–24h): past it, it fails
    /// `Timeout` and everything temporary is deleted.
    #[serde(default = "default_timeout")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') && duration(self) >= duration('1m') && duration(self) <= duration('24h')").message("timeout must be a duration between 1m and 24h, e.g. 30m"))]
    pub timeout: Duration,
    /// The temporary claims' StorageClass (default: the cluster's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Requests and limits of the temporary PostgreSQL container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The temporary server's image instead of the backed-up pod's (which is also what lets
    /// a backup whose pod is gone be verified).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
    /// PostgreSQL settings for the temporary server, after the backed-up server's own
    /// (`-c name=value`), e.g. a smaller `shared_buffers`. The verification's own
    /// (`listen_addresses`, `port`, `hba_file`, `archive_mode`) come last and win.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub parameters: std::collections::BTreeMap<String, String>,
}

impl Default for VerificationSettings {
    fn default() -> Self {
        VerificationSettings {
            heap_all_indexed: false,
            checks: Vec::new(),
            restore_command: None,
            timeout: default_timeout(),
            storage_class_name: None,
            resources: None,
            image: None,
            parameters: Default::default(),
        }
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}

/// SQL run on the restored database that must return one row with one true value.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SqlCheck {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    #[serde(default = "default_database")]
    #[schemars(length(min = 1, max = 63))]
    pub database: String,
    #[schemars(length(min = 1, max = 4096))]
    pub sql: String,
}

fn default_database() -> String {
    "postgres".into()
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum VerificationPhase {
    /// Waiting for its turn: one verification per namespace at a time.
    Pending,
    /// The Backup restored into temporary claims (a Restore owned by this Verification).
    Restoring,
    /// PostgreSQL recovering on them, then the checks.
    Checking,
    Passed,
    Failed,
}

impl VerificationPhase {
    pub fn is_terminal(self) -> bool {
        matches!(self, VerificationPhase::Passed | VerificationPhase::Failed)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerificationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VerificationPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The backed-up server's image, which the temporary server runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The Restore into temporary claims, and the pod of the temporary server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<VerificationTimings>,
    /// What was checked, once the checks ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked: Option<Checked>,
    /// The first failure: a stable reason and a message naming what failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VerificationError>,
}

/// Seconds per step.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerificationTimings {
    /// The Restore: claims from the snapshots and restore-prepare.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_seconds: Option<f64>,
    /// Server start to out of recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_seconds: Option<f64>,
    /// amcheck, verify_heapam and the SQL checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks_seconds: Option<f64>,
}

/// What the checks covered, so a pass says what it means.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Checked {
    /// The restored server's new timeline, after promotion.
    pub timeline: u32,
    pub system_identifier: String,
    pub databases: u32,
    /// B-tree indexes amcheck checked.
    pub indexes: u32,
    /// Tables verify_heapam checked (PostgreSQL 14+).
    pub tables: u32,
    pub sql_checks: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct VerificationError {
    pub reason: String,
    pub message: String,
}

/// A Verification's outcome as its Backup shows it (`status.verification`), written by the
/// Verification controller under a field manager of its own.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupVerification {
    /// Passed or Failed.
    pub result: String,
    /// The Verification that found it.
    pub verification: String,
    pub verified_at: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
