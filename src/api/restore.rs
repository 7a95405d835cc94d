//! The `Restore` resource: a Backup's snapshots back into PVCs that PostgreSQL recovers from.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::backup::VolumeRole;

/// A Backup (or its retained snapshots and label ConfigMap) restored into new PVCs, with
/// `backup_label`, `tablespace_map` and the recovery settings written into the data volume
/// by `pgsnap restore-prepare`, so a PostgreSQL started on them recovers correctly.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pgsnap.io",
    version = "v1alpha1",
    kind = "Restore",
    namespaced,
    status = "RestoreStatus",
    shortname = "pgrestore",
    category = "pgsnap",
    doc = "A pgsnap Backup restored into PVCs that PostgreSQL recovers from",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Backup", type_ = "string", json_path = ".spec.backupName"),
    printcolumn(name = "Claims", type_ = "string", json_path = ".spec.claims[*].name"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.error.reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a Restore's spec is immutable: create a new Restore instead"))]
#[x_kube(validation = Rule::new("has(self.backupName) != has(self.volumeSnapshotName)").message("set exactly one source: backupName, or volumeSnapshotName with labelConfigMapName"))]
#[x_kube(validation = Rule::new("has(self.volumeSnapshotName) == has(self.labelConfigMapName)").message("volumeSnapshotName and labelConfigMapName go together"))]
#[serde(rename_all = "camelCase")]
pub struct RestoreSpec {
    /// A Completed Backup in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub backup_name: Option<String>,
    /// For retained snapshots whose Backup is gone: the data directory's VolumeSnapshot...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub volume_snapshot_name: Option<String>,
    /// ...and its label ConfigMap (`<backup>-backup-label`), which names the other snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub label_config_map_name: Option<String>,
    /// The namespace of the source; only the Restore's own is supported (a snapshot can only
    /// be restored in its namespace without a pre-provisioned VolumeSnapshotContent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
    /// The PVCs to create, one per snapshot of the backup (by role, and tablespace name).
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("self.all(c, self.exists_one(d, d.name == c.name))").message("each claim name may be used once"))]
    #[x_kube(validation = Rule::new("self.all(c, self.exists_one(d, d.role == c.role && (has(d.tablespace) ? d.tablespace : '') == (has(c.tablespace) ? c.tablespace : '')))").message("one claim per role (and per tablespace)"))]
    #[x_kube(validation = Rule::new("self.exists(c, c.role == 'Data')").message("a claim with role Data is required"))]
    pub claims: Vec<RestoreClaim>,
    #[serde(default)]
    pub recovery: RecoverySpec,
    /// What deleting the Restore does to the PVCs it created.
    #[serde(default)]
    pub claim_deletion_policy: ClaimDeletionPolicy,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.tablespace) == (self.role == 'Tablespace')").message("tablespace names the tablespace of a claim with role Tablespace, and only then"))]
#[x_kube(validation = Rule::new("self.role != 'BackupWal'").message("the backup's WAL is no volume of the restored server: the Restore reads it itself"))]
#[serde(rename_all = "camelCase")]
pub struct RestoreClaim {
    pub role: VolumeRole,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub tablespace: Option<String>,
    /// The PVC's name; it must not exist yet.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Default: the cluster's default StorageClass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Default and minimum: the snapshot's restoreSize.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecoverySpec {
    /// PostgreSQL's restore_command (`%f`, `%p`), for WAL from an archive. Without it WAL is
    /// read from pg_wal only, which must then hold the WAL up to the backup's stop LSN (and
    /// a pg_wal whose volume the backup does not hold is refused, WalMissing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    #[x_kube(validation = Rule::new("!self.contains('\\n') && !self.contains('\\r') && self.size() > 0").message("restoreCommand is one non-empty line"))]
    pub restore_command: Option<String>,
    /// Where recovery stops; omitted, `{}`: Immediate, as soon as the data is consistent.
    #[serde(default)]
    pub target: RecoveryTarget,
    /// Promote at the target (a new timeline, read-write), or pause there.
    #[serde(default = "default_true")]
    pub promote: bool,
}

impl Default for RecoverySpec {
    fn default() -> Self {
        RecoverySpec {
            restore_command: None,
            target: RecoveryTarget::default(),
            promote: true,
        }
    }
}

fn default_true() -> bool {
    true
}

/// Immediate (no field), a time, or a WAL location.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("!(has(self.time) && has(self.lsn))").message("set at most one of time and lsn (neither: Immediate)"))]
pub struct RecoveryTarget {
    /// RFC 3339, e.g. 2026-11-21T10:00:00Z.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\\\.[0-9]+)?(Z|[+-][0-9]{2}(:?[0-9]{2})?)$')").message("time must be RFC 3339 with a zone, e.g. 2026-11-21T10:00:00Z"))]
    pub time: Option<String>,
    /// A WAL location, e.g. 0/3000060.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 17))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$')").message("lsn must look like 0/3000060"))]
    pub lsn: Option<String>,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum ClaimDeletionPolicy {
    /// The restored PVCs outlive the Restore: they are the restored database.
    #[default]
    Retain,
    /// The PVCs are owned by the Restore and deleted with it (restore drills).
    Delete,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum RestorePhase {
    Pending,
    Provisioning,
    Preparing,
    Completed,
    Failed,
}

impl RestorePhase {
    pub fn is_terminal(self) -> bool {
        matches!(self, RestorePhase::Completed | RestorePhase::Failed)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestorePhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// What was restored, from the label ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<RestoreSource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<RestoredClaim>,
    /// The temporary claim made of the backup's WAL snapshot, which the prepare Job copies
    /// the backup's WAL from; deleted once the Job has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_wal_claim: Option<String>,
    /// The Job running `pgsnap restore-prepare`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare_job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<RestoreTimings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RestoreError>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    pub label_config_map: String,
    pub system_identifier: String,
    #[serde(rename = "stopLSN")]
    pub stop_lsn: String,
    pub server_version: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoredClaim {
    pub name: String,
    pub role: VolumeRole,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tablespace: Option<String>,
    pub volume_snapshot: String,
    /// Where the restored volume must be mounted in the PostgreSQL pod: the mount path of
    /// the backed-up server, which `pg_wal` and `pg_tblspc` links point into.
    pub mount_path: String,
    /// The directory inside the volume ("" = its root): PGDATA for role Data.
    pub path_in_volume: String,
    #[serde(default)]
    pub bound: bool,
}

/// Seconds per step, decimal strings like the Backup's window.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTimings {
    /// Claims created → all bound (the storage system copying the snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_seconds: Option<String>,
    /// Job created → succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare_seconds: Option<String>,
}

/// Why a Restore failed, with a stable reason a user (or an alert) can act on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct RestoreError {
    pub reason: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_is_a_restore() {
        let text = include_str!("../../examples/restore.yaml");
        let first = text.split("\n---\n").next().unwrap_or_default();
        let restore: Restore = serde_yaml::from_str(first).unwrap();
        assert_eq!(restore.spec.backup_name.as_deref(), Some("orders-1"));
        assert_eq!(restore.spec.claims[0].role, VolumeRole::Data);
        assert_eq!(restore.spec.recovery.target, RecoveryTarget::default());
        assert!(restore.spec.recovery.promote);
        assert_eq!(
            restore.spec.claim_deletion_policy,
            ClaimDeletionPolicy::Retain
        );
    }
}
