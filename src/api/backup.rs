//! The `Backup` resource: one online backup of one PostgreSQL server into CSI snapshots.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{Duration, SecretKeyRef};
pub use crate::postgres::SslMode;

/// One online backup of one PostgreSQL server: a non-exclusive backup session held open
/// while CSI VolumeSnapshots of every volume the database lives on are cut.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pgsnap.io",
    version = "v1alpha1",
    kind = "Backup",
    namespaced,
    status = "BackupStatus",
    shortname = "pgbackup",
    category = "pgsnap",
    doc = "One online backup of one PostgreSQL server into CSI VolumeSnapshots and a backup_label ConfigMap",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Pod", type_ = "string", json_path = ".status.postgres.pod"),
    printcolumn(
        name = "Window",
        type_ = "string",
        description = "Seconds the server spent in backup mode",
        json_path = ".status.backupWindow.seconds"
    ),
    printcolumn(
        name = "Verified",
        type_ = "string",
        description = "The last Verification's result: Passed or Failed",
        json_path = ".status.verification.result"
    ),
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
    ),
    validation = Rule::new("self.spec == oldSelf.spec").message("a Backup's spec is immutable: create a new Backup instead")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.volumeGroupSnapshotClassName) || !has(self.groupSnapshot) || self.groupSnapshot != 'Never'").message("volumeGroupSnapshotClassName names the class of a group snapshot; groupSnapshot Never takes none"))]
pub struct BackupSpec {
    /// The pod whose PostgreSQL server is backed up.
    pub target: Target,
    /// How pgsnap reaches the server in that pod.
    #[serde(default)]
    pub connection: Connection,
    /// The VolumeSnapshotClass for every snapshot. Default: the default class of each
    /// PVC's CSI driver. The members of a group snapshot take the group's class instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
    /// Whether the volumes are cut as one CSI VolumeGroupSnapshot, at one instant: `Auto` when
    /// the database spans several PVCs of one driver with a VolumeGroupSnapshotClass, `Always`
    /// (refused before backup mode where impossible) or `Never` (one snapshot per volume).
    #[serde(default)]
    pub group_snapshot: GroupSnapshotPolicy,
    /// The VolumeGroupSnapshotClass of the group. Default: the default class of the PVCs'
    /// CSI driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_class_name: Option<String>,
    /// `Fast` requests an immediate checkpoint; `Spread` waits for a spread one (minutes
    /// with default settings, but no I/O burst).
    #[serde(default)]
    pub checkpoint: Checkpoint,
    /// Where a restore finds the WAL from the backup's start to its stop: `Snapshot` (kept
    /// with the backup, no archive needed) or `Archive` (the server's WAL archive).
    #[serde(default)]
    pub wal_source: WalSource,
    /// With `walSource: Archive`, whether the backup, once out of backup mode, waits until its
    /// last WAL segment is archived (so a restore finds every segment it needs there).
    #[serde(default = "default_true")]
    pub wait_for_archive: bool,
    /// Hard limit on the time the server spends in backup mode (Go duration, 10s–24h).
    #[serde(default = "default_deadline")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') && duration(self) >= duration('10s') && duration(self) <= duration('24h')").message("deadline must be a duration between 10s and 24h, e.g. 10m"))]
    pub deadline: Duration,
    /// How long the snapshots may take to become ready to use after the server left backup
    /// mode (the driver's upload), before the backup fails as SnapshotNotReady (Go duration,
    /// 1m–168h).
    #[serde(default = "default_ready_timeout")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') && duration(self) >= duration('1m') && duration(self) <= duration('168h')").message("readyTimeout must be a duration between 1m and 168h, e.g. 24h"))]
    pub ready_timeout: Duration,
    /// What deleting the Backup does to its snapshots and label ConfigMap.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Explicit volumes to snapshot instead of discovering them from the database. Every
    /// directory the database uses must still be on one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.all(v, self.exists_one(w, w.persistentVolumeClaim == v.persistentVolumeClaim))").message("each PVC may be listed once"))]
    pub volumes: Vec<VolumeOverride>,
}

fn default_true() -> bool {
    true
}

fn default_deadline() -> Duration {
    Duration::from_secs(600)
}

/// A day: long enough for a first full upload of a large volume on cloud block storage.
fn default_ready_timeout() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// Which pod holds the server: a name, or a label selector plus a role.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("has(self.podName) != has(self.selector)").message("set exactly one of podName and selector"))]
#[x_kube(validation = Rule::new("!has(self.role) || has(self.selector)").message("role chooses among the pods of a selector; it needs selector"))]
#[serde(rename_all = "camelCase")]
pub struct Target {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Which of the selected servers to back up, decided by `pg_is_in_recovery()`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<TargetRole>,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum TargetRole {
    #[default]
    Primary,
    Standby,
    PreferStandby,
    Any,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.serverName) || self.sslMode == 'VerifyFull'").message("serverName is the name VerifyFull checks the certificate against; it needs sslMode VerifyFull"))]
pub struct Connection {
    /// Default: the pod's container port named `postgresql`, else 5432.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("port must be 1-65535"))]
    pub port: Option<i32>,
    #[serde(default = "default_database")]
    pub database: String,
    #[serde(default = "default_user")]
    pub user: String,
    /// The Secret key holding the password; none means password-less (trust, cert) auth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    #[serde(default)]
    pub ssl_mode: SslMode,
    /// The CA certificate (PEM) that signs the server's certificate, for `VerifyFull`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// The host name `VerifyFull` checks the server's certificate against, e.g. the Service's
    /// DNS name (`orders-db.shop.svc`); the connection still goes to the pod's IP. Default:
    /// the pod's IP, which certificates rarely name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub server_name: Option<String>,
}

impl Default for Connection {
    fn default() -> Self {
        Connection {
            port: None,
            database: default_database(),
            user: default_user(),
            password_secret_ref: None,
            ssl_mode: SslMode::default(),
            ca_secret_ref: None,
            server_name: None,
        }
    }
}

fn default_database() -> String {
    "postgres".into()
}

fn default_user() -> String {
    "postgres".into()
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum Checkpoint {
    #[default]
    Spread,
    Fast,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum DeletionPolicy {
    /// Deleting the Backup deletes its snapshots and label ConfigMap.
    #[default]
    Delete,
    /// Snapshots and label ConfigMap outlive the Backup; a Restore can still use them.
    Retain,
}

/// Where a restore of the backup finds the WAL from its start to its stop: the snapshots are
/// cut in backup mode and never hold all of it themselves.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum WalSource {
    /// Kept with the backup: after the stop, one more snapshot of the volume holding
    /// `pg_wal` (role `BackupWal`), cut while a replication slot still holds the WAL, and
    /// proven to hold every segment from the start to the stop. A restore needs no archive.
    #[default]
    Snapshot,
    /// The server's WAL archive (`archive_command` or `archive_library`); a restore names
    /// `restoreCommand`. Refused when the server does not archive.
    Archive,
}

/// Whether a backup's volumes are cut as one VolumeGroupSnapshot.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum GroupSnapshotPolicy {
    /// A group when the database spans several PVCs and a group is possible; else one
    /// snapshot per volume, and `status.cut` says why.
    #[default]
    Auto,
    /// A group, even of one PVC; a backup where a group is impossible is refused before
    /// backup mode.
    Always,
    /// One snapshot per volume.
    Never,
}

/// A PVC to snapshot, named explicitly.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeOverride {
    #[schemars(length(min = 1, max = 253))]
    pub persistent_volume_claim: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Phase {
    Pending,
    Starting,
    Snapshotting,
    Stopping,
    Finalizing,
    Completed,
    Failed,
}

impl Phase {
    /// Phases in which the server is (or may be) in backup mode, so only the task that holds
    /// the session may move the Backup on.
    pub fn holds_session(self) -> bool {
        matches!(
            self,
            Phase::Starting | Phase::Snapshotting | Phase::Stopping
        )
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    // A map by type, so the Verification controller's `Verified` is its own under
    // server-side apply, beside the Backup controller's `Ready`, `Reconciling` and `Stalled`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresStatus>,
    #[serde(rename = "startLSN", default, skip_serializing_if = "Option::is_none")]
    pub start_lsn: Option<String>,
    #[serde(rename = "stopLSN", default, skip_serializing_if = "Option::is_none")]
    pub stop_lsn: Option<String>,
    #[serde(rename = "startWAL", default, skip_serializing_if = "Option::is_none")]
    pub start_wal: Option<String>,
    #[serde(rename = "stopWAL", default, skip_serializing_if = "Option::is_none")]
    pub stop_wal: Option<String>,
    /// Whether a temporary replication slot kept the backup's WAL from being recycled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_pinned: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_source: Option<WalSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_window: Option<BackupWindow>,
    /// Where the backup window went: what the server and the storage took, and what pgsnap added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<BackupTimings>,
    /// How the volumes were cut in backup mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<CutStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotStatus>,
    /// A failed backup's snapshots that were still being cut when it failed: each is deleted
    /// once cut (deleting one mid-cut can leave it behind with external-snapshotter).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots_to_delete: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_config_map: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<BackupError>,
    /// The last Verification of this backup (written by the Verification controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<super::verification::BackupVerification>,
}

impl BackupStatus {
    /// When a finished backup ended: a Completed one at the moment its data is from (its
    /// server left backup mode), a Failed one when it failed (when `Stalled` turned True;
    /// `Ready` was False long before).
    pub fn ended_at(&self) -> Option<Time> {
        match self.phase? {
            Phase::Completed => self.backup_window.as_ref()?.stopped_at.clone(),
            Phase::Failed => self
                .conditions
                .iter()
                .find(|c| c.type_ == "Stalled" && c.status == "True")
                .map(|c| c.last_transition_time.clone()),
            _ => None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresStatus {
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_identifier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<ServerRole>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum ServerRole {
    Primary,
    Standby,
}

/// Time the server spent in backup mode: from the start call's return to the stop call's.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupWindow {
    pub started_at: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<Time>,
    /// Decimal seconds as a string, so the printer column stays readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<String>,
}

/// Seconds spent in each step of the backup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupTimings {
    /// The start call: the checkpoint (before backup mode counts).
    pub checkpoint_seconds: f64,
    /// Snapshots requested → all cut: the storage driver.
    pub cut_seconds: f64,
    /// The stop call: the end-of-backup record (it never waits for the archive).
    pub stop_seconds: f64,
    /// Backup window − cut − stop: what pgsnap itself added to backup mode.
    pub overhead_seconds: f64,
    /// After backup mode: the WAL snapshot requested → cut and its segments listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_snapshot_seconds: Option<f64>,
    /// After backup mode, with `walSource: Archive` and `waitForArchive`: until the backup's
    /// last segment was archived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_wait_seconds: Option<f64>,
}

#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    schemars::JsonSchema,
)]
pub enum VolumeRole {
    Data,
    Wal,
    Tablespace,
    /// The backup's WAL kept with it: the volume holding `pg_wal`, cut after the stop. A
    /// restore reads its segments; it never becomes a claim of the restored server.
    BackupWal,
}

/// How a backup's volumes were cut.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CutStatus {
    pub method: CutMethod,
    /// The group, with `method: VolumeGroupSnapshot`; its members are `snapshots`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_class: Option<String>,
    /// Why `groupSnapshot: Auto` cut one snapshot per volume although the database spans
    /// several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum CutMethod {
    /// One VolumeSnapshot per volume (from a standby, the data volume last).
    #[default]
    VolumeSnapshots,
    /// One VolumeGroupSnapshot of every volume, at one instant (from a standby too: an
    /// instant's copy holds pg_control no older than any page, as cutting it last does).
    VolumeGroupSnapshot,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    /// The VolumeSnapshot's name.
    pub name: String,
    pub persistent_volume_claim: String,
    pub role: VolumeRole,
    /// The tablespace's name, for role Tablespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tablespace: Option<String>,
    /// The directory of the role's files inside the volume ("" = the volume's root).
    pub path_in_volume: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_at: Option<Time>,
    #[serde(default)]
    pub ready_to_use: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<String>,
}

/// Why a Backup failed, with a stable reason a user (or an alert) can act on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct BackupError {
    pub reason: String,
    pub message: String,
}
