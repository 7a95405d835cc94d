//! The label ConfigMap: `backup_label` and `tablespace_map` exactly as the server returned
//! them, kept beside the snapshots and owned by the data snapshot, so deleting the snapshot
//! deletes its label and a restore needs nothing else.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::api::backup::{Backup, VolumeRole};
use crate::api::snapshot::VolumeSnapshot;
use crate::api::{BACKUP_CREATOR, BACKUP_NAME_LABEL};
use crate::controller::{bounded_name, created_by, creator_labels};

pub const BACKUP_LABEL_KEY: &str = "backup_label";
pub const TABLESPACE_MAP_KEY: &str = "tablespace_map";

/// Annotation on each snapshot naming the backup's label ConfigMap.
pub const LABEL_CONFIGMAP_ANNOTATION: &str = "pgsnap.io/label-configmap";

pub mod annotations {
    pub const START_LSN: &str = "pgsnap.io/start-lsn";
    pub const STOP_LSN: &str = "pgsnap.io/stop-lsn";
    pub const TIMELINE: &str = "pgsnap.io/timeline";
    pub const SERVER_VERSION: &str = "pgsnap.io/server-version";
    pub const SYSTEM_IDENTIFIER: &str = "pgsnap.io/system-identifier";
    pub const BACKUP_LABEL_SHA256: &str = "pgsnap.io/backup-label-sha256";
    pub const TABLESPACE_MAP_SHA256: &str = "pgsnap.io/tablespace-map-sha256";
    /// JSON list of [`super::SnapshotLocation`]: where each directory is inside each snapshot.
    pub const VOLUMES: &str = "pgsnap.io/volumes";
    /// JSON [`super::WalRecord`]: the backup's WAL kept with it; absent when it is in the archive.
    pub const WAL: &str = "pgsnap.io/wal";
    /// The Backup's full name (its label value may be shortened).
    pub const BACKUP_NAME: &str = "pgsnap.io/backup-name";
}

/// `<backup>-backup-label`, shortened with a hash when that exceeds a name's 253 characters.
pub fn config_map_name(backup: &str) -> String {
    bounded_name(backup, "backup-label", 253)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Where one database directory lives: in which claim, at which path inside the volume.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Location {
    pub role: VolumeRole,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tablespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tablespace_oid: Option<u32>,
    /// The directory as the server sees it.
    pub server_path: String,
    pub persistent_volume_claim: String,
    /// The directory inside the volume ("" = the volume's root).
    pub path_in_volume: String,
}

/// A database directory inside a snapshot, as the label ConfigMap records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotLocation {
    pub volume_snapshot: String,
    #[serde(flatten)]
    pub location: Location,
}

/// The backup's WAL kept with it: which snapshot holds it, where in that volume, and the
/// segments a restore copies from there, proven present when the snapshot was cut.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WalRecord {
    /// The snapshot (role `BackupWal`) of the volume holding `pg_wal`, cut after the stop.
    pub volume_snapshot: String,
    pub persistent_volume_claim: String,
    /// `pg_wal`'s directory inside that volume ("" when it is the volume's root).
    pub path_in_volume: String,
    pub timeline: u32,
    /// The segment holding the start's checkpoint redo, and the one holding the stop.
    pub first_segment: String,
    pub last_segment: String,
    pub segment_size: u64,
    /// How the segments were proven to be in the snapshot: listed by the server
    /// (`pg_ls_waldir`) after the cut, while the backup's slot still held them; from a
    /// standby also written there by its WAL receiver (`pg_ls_waldir,pg_stat_wal_receiver`).
    pub checked_by: String,
}

/// What the label ConfigMap holds: written once by the backup, read by every restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelRecord {
    /// The Backup that took it (the ConfigMap's `pgsnap.io/backup-name` annotation); a copy
    /// made by hand for a retained snapshot may have none.
    pub backup: Option<String>,
    pub backup_label: String,
    pub tablespace_map: String,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub timeline: u32,
    pub server_version: String,
    pub system_identifier: String,
    pub volumes: Vec<SnapshotLocation>,
    /// None for a backup whose WAL is in the archive.
    pub wal: Option<WalRecord>,
}

impl LabelRecord {
    pub fn backup_label_sha256(&self) -> String {
        sha256_hex(self.backup_label.as_bytes())
    }

    pub fn tablespace_map_sha256(&self) -> String {
        sha256_hex(self.tablespace_map.as_bytes())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LabelStoreError {
    #[error("could not encode the label ConfigMap: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("could not write label ConfigMap {name}: {source}")]
    Write { name: String, source: kube::Error },
    #[error(
        "label ConfigMap {0} has no {BACKUP_LABEL_KEY}; without it a restore silently corrupts the database"
    )]
    Missing(String),
    #[error(
        "{file} in ConfigMap {name} has sha256 {actual}, the backup recorded {expected}: the label was altered"
    )]
    ChecksumMismatch {
        file: &'static str,
        name: String,
        actual: String,
        expected: String,
    },
    #[error("label ConfigMap {name}: {what}")]
    Invalid { name: String, what: String },
    #[error(
        "ConfigMap {0} already exists and belongs to another backup (an earlier Backup of this name whose deletionPolicy retained it, or another object): pgsnap never adopts or overwrites it. Delete it if it is not needed, or give this Backup another name"
    )]
    NameConflict(String),
}

impl LabelStoreError {
    pub fn reason(&self) -> &'static str {
        match self {
            LabelStoreError::Encode(_) | LabelStoreError::Write { .. } => "LabelStoreFailed",
            LabelStoreError::Missing(_) => "LabelMissing",
            LabelStoreError::ChecksumMismatch { .. } => "LabelChecksumMismatch",
            LabelStoreError::Invalid { .. } => "LabelConfigMapInvalid",
            LabelStoreError::NameConflict(_) => "NameConflict",
        }
    }

    pub fn invalid(name: &str, what: impl Into<String>) -> Self {
        LabelStoreError::Invalid {
            name: name.to_string(),
            what: what.into(),
        }
    }
}

crate::controller::failure_from!(LabelStoreError);

/// Builds the ConfigMap `name`; `owner` is the data VolumeSnapshot, `labels` say which
/// Backup created it.
pub fn build(
    record: &LabelRecord,
    name: &str,
    namespace: &str,
    owner: &VolumeSnapshot,
    labels: BTreeMap<String, String>,
) -> Result<ConfigMap, LabelStoreError> {
    use annotations::*;
    let mut annotations = BTreeMap::from([
        (START_LSN.to_string(), record.start_lsn.clone()),
        (STOP_LSN.to_string(), record.stop_lsn.clone()),
        (TIMELINE.to_string(), record.timeline.to_string()),
        (SERVER_VERSION.to_string(), record.server_version.clone()),
        (
            SYSTEM_IDENTIFIER.to_string(),
            record.system_identifier.clone(),
        ),
        (
            BACKUP_LABEL_SHA256.to_string(),
            record.backup_label_sha256(),
        ),
        (
            TABLESPACE_MAP_SHA256.to_string(),
            record.tablespace_map_sha256(),
        ),
        (VOLUMES.to_string(), serde_json::to_string(&record.volumes)?),
    ]);
    if let Some(backup) = &record.backup {
        annotations.insert(BACKUP_NAME.to_string(), backup.clone());
    }
    if let Some(wal) = &record.wal {
        annotations.insert(WAL.to_string(), serde_json::to_string(wal)?);
    }
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: VolumeSnapshot::api_version(&()).into_owned(),
                kind: VolumeSnapshot::kind(&()).into_owned(),
                name: owner.name_any(),
                uid: owner.uid().unwrap_or_default(),
                controller: Some(false),
                block_owner_deletion: Some(false),
            }]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            (BACKUP_LABEL_KEY.to_string(), record.backup_label.clone()),
            (
                TABLESPACE_MAP_KEY.to_string(),
                record.tablespace_map.clone(),
            ),
        ])),
        immutable: Some(true),
        ..Default::default()
    })
}

/// Reads and checks a label ConfigMap. The files are checked against their recorded sha256
/// already here, so a tampered label fails a restore before any PVC is made; restore-prepare
/// checks again where the files are used.
pub fn read(cm: &ConfigMap) -> Result<LabelRecord, LabelStoreError> {
    use annotations::*;
    let name = cm.name_any();
    let ann = cm.annotations();
    let get = |key: &str| {
        ann.get(key).cloned().ok_or_else(|| {
            LabelStoreError::invalid(
                &name,
                format!("no annotation {key}; it was not written by pgsnap"),
            )
        })
    };
    let data = cm.data.clone().unwrap_or_default();
    let backup_label = data
        .get(BACKUP_LABEL_KEY)
        .filter(|l| !l.is_empty())
        .cloned()
        .ok_or_else(|| LabelStoreError::Missing(name.clone()))?;
    let tablespace_map = data.get(TABLESPACE_MAP_KEY).cloned().unwrap_or_default();
    for (file, bytes, key) in [
        (BACKUP_LABEL_KEY, &backup_label, BACKUP_LABEL_SHA256),
        (TABLESPACE_MAP_KEY, &tablespace_map, TABLESPACE_MAP_SHA256),
    ] {
        let (actual, expected) = (sha256_hex(bytes.as_bytes()), get(key)?);
        if actual != expected {
            return Err(LabelStoreError::ChecksumMismatch {
                file,
                name,
                actual,
                expected,
            });
        }
    }
    let system_identifier = get(SYSTEM_IDENTIFIER)?;
    if system_identifier.parse::<u64>().is_err() {
        let what = format!("system identifier {system_identifier:?} is not a number");
        return Err(LabelStoreError::invalid(&name, what));
    }
    for key in [START_LSN, STOP_LSN] {
        let lsn = get(key)?;
        if lsn.parse::<crate::postgres::Lsn>().is_err() {
            return Err(LabelStoreError::invalid(
                &name,
                format!("{key} {lsn:?} is not an LSN"),
            ));
        }
    }
    let timeline = get(TIMELINE)?;
    let timeline = timeline.parse().map_err(|_| {
        LabelStoreError::invalid(&name, format!("timeline {timeline:?} is not a number"))
    })?;
    let volumes: Vec<SnapshotLocation> = serde_json::from_str(&get(VOLUMES)?)
        .map_err(|e| LabelStoreError::invalid(&name, format!("annotation {VOLUMES}: {e}")))?;
    if !volumes.iter().any(|v| v.location.role == VolumeRole::Data) {
        return Err(LabelStoreError::invalid(
            &name,
            "no volume holds the data directory",
        ));
    }
    Ok(LabelRecord {
        backup: ann
            .get(BACKUP_NAME)
            .or_else(|| cm.labels().get(BACKUP_NAME_LABEL))
            .cloned(),
        backup_label,
        tablespace_map,
        start_lsn: get(START_LSN)?,
        stop_lsn: get(STOP_LSN)?,
        timeline,
        server_version: get(SERVER_VERSION)?,
        system_identifier,
        volumes,
        wal: ann
            .get(WAL)
            .map(|w| serde_json::from_str(w))
            .transpose()
            .map_err(|e| LabelStoreError::invalid(&name, format!("annotation {WAL}: {e}")))?,
    })
}

/// Creates the ConfigMap for `creator`. One of that name that this Backup made already (a
/// retry) is fine; anyone else's is a `NameConflict` and never touched.
pub async fn store(
    client: &Client,
    record: &LabelRecord,
    name: &str,
    creator: &Backup,
    owner: &VolumeSnapshot,
) -> Result<ConfigMap, LabelStoreError> {
    let namespace = creator.namespace().unwrap_or_default();
    let api = Api::<ConfigMap>::namespaced(client.clone(), &namespace);
    let write = |source| LabelStoreError::Write {
        name: name.to_string(),
        source,
    };
    let labels = creator_labels(&BACKUP_CREATOR, creator);
    let cm = build(record, name, &namespace, owner, labels)?;
    match api.create(&PostParams::default(), &cm).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let existing = api.get(name).await.map_err(write)?;
            match created_by(&existing, &BACKUP_CREATOR, creator) {
                true => Ok(existing),
                false => Err(LabelStoreError::NameConflict(name.to_string())),
            }
        }
        Err(e) => Err(write(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::snapshot::{VolumeSnapshotSource, VolumeSnapshotSpec};

    fn data_snapshot() -> VolumeSnapshot {
        let mut owner = VolumeSnapshot::new(
            "orders-1-data",
            VolumeSnapshotSpec {
                source: VolumeSnapshotSource::default(),
                volume_snapshot_class_name: None,
            },
        );
        owner.metadata.uid = Some("uid-1".into());
        owner
    }

    fn location(snapshot: &str, role: VolumeRole, server: &str, inner: &str) -> SnapshotLocation {
        SnapshotLocation {
            volume_snapshot: snapshot.into(),
            location: Location {
                role,
                tablespace: (role == VolumeRole::Tablespace).then(|| "fast".into()),
                tablespace_oid: (role == VolumeRole::Tablespace).then_some(16400),
                server_path: server.into(),
                persistent_volume_claim: format!("pvc-{snapshot}"),
                path_in_volume: inner.into(),
            },
        }
    }

    fn record() -> LabelRecord {
        LabelRecord {
            backup: Some("orders-1".into()),
            backup_label:
                "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\r\nLABEL: x\n".into(),
            tablespace_map: "16400 /ts\n".into(),
            start_lsn: "0/2000028".into(),
            stop_lsn: "0/2000100".into(),
            timeline: 1,
            server_version: "17.10".into(),
            system_identifier: "7312345678901234567".into(),
            volumes: vec![
                location(
                    "orders-1-data",
                    VolumeRole::Data,
                    "/var/lib/postgresql/data/pgdata",
                    "pgdata",
                ),
                location("orders-1-wal", VolumeRole::Wal, "/wal/pg_wal", "pg_wal"),
                location("orders-1-ts", VolumeRole::Tablespace, "/ts", ""),
            ],
            wal: Some(WalRecord {
                volume_snapshot: "orders-1-wal-wal".into(),
                persistent_volume_claim: "pvc-orders-1-wal".into(),
                path_in_volume: "pg_wal".into(),
                timeline: 1,
                first_segment: "000000010000000000000002".into(),
                last_segment: "000000010000000000000002".into(),
                segment_size: 16 << 20,
                checked_by: "pg_ls_waldir".into(),
            }),
        }
    }

    fn config_map(record: &LabelRecord) -> ConfigMap {
        let labels = record
            .backup
            .iter()
            .map(|b| {
                (
                    BACKUP_NAME_LABEL.to_string(),
                    crate::controller::label_value(b),
                )
            })
            .collect();
        let name = config_map_name("orders-1");
        build(record, &name, "shop", &data_snapshot(), labels).unwrap()
    }

    #[test]
    fn the_config_map_keeps_the_files_byte_for_byte_and_belongs_to_the_data_snapshot() {
        let record = LabelRecord {
            tablespace_map: String::new(),
            ..record()
        };
        let cm = config_map(&record);
        assert_eq!(cm.name_any(), "orders-1-backup-label");
        assert_eq!(
            cm.data.as_ref().unwrap()[BACKUP_LABEL_KEY],
            record.backup_label
        );
        let ann = cm.annotations();
        assert_eq!(
            ann[annotations::BACKUP_LABEL_SHA256],
            sha256_hex(record.backup_label.as_bytes())
        );
        // The sha256 of nothing: a restore can tell "no tablespaces" from "map lost".
        assert_eq!(
            ann[annotations::TABLESPACE_MAP_SHA256],
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let owner_ref = &cm.owner_references()[0];
        assert_eq!(
            (
                owner_ref.kind.as_str(),
                owner_ref.name.as_str(),
                owner_ref.uid.as_str()
            ),
            ("VolumeSnapshot", "orders-1-data", "uid-1")
        );
    }

    #[test]
    fn what_a_backup_writes_a_restore_reads_back_unchanged() {
        let record = record();
        assert_eq!(read(&config_map(&record)).unwrap(), record);
        let by_hand = LabelRecord {
            backup: None,
            ..record.clone()
        };
        assert_eq!(read(&config_map(&by_hand)).unwrap(), by_hand);
        // A backup whose WAL is in the archive records none.
        let archived = LabelRecord {
            wal: None,
            ..record.clone()
        };
        assert_eq!(read(&config_map(&archived)).unwrap(), archived);
        // A name longer than a label value comes back whole.
        let long = LabelRecord {
            backup: Some("b".repeat(253)),
            ..record.clone()
        };
        assert_eq!(read(&config_map(&long)).unwrap(), long);
        assert_eq!(config_map_name(&"b".repeat(253)).len(), 253);
    }

    #[test]
    fn a_label_config_map_is_checked_before_it_is_used() {
        let cm = config_map(&record());
        let reason = |cm: &ConfigMap| read(cm).unwrap_err().reason();

        let mut tampered = cm.clone();
        tampered
            .data
            .as_mut()
            .unwrap()
            .insert(BACKUP_LABEL_KEY.into(), "START WAL LOCATION: y\n".into());
        assert_eq!(reason(&tampered), "LabelChecksumMismatch");
        let mut map_lost = cm.clone();
        map_lost.data.as_mut().unwrap().remove(TABLESPACE_MAP_KEY);
        assert_eq!(reason(&map_lost), "LabelChecksumMismatch");
        let mut no_label = cm.clone();
        no_label.data.as_mut().unwrap().remove(BACKUP_LABEL_KEY);
        assert_eq!(reason(&no_label), "LabelMissing");
        let mut foreign = cm.clone();
        foreign.annotations_mut().remove(annotations::VOLUMES);
        assert_eq!(reason(&foreign), "LabelConfigMapInvalid");
        let mut no_data = cm.clone();
        no_data.annotations_mut().insert(
            annotations::VOLUMES.into(),
            serde_json::to_string(&record().volumes[1..]).unwrap(),
        );
        assert_eq!(
            read(&no_data).unwrap_err().to_string(),
            "label ConfigMap orders-1-backup-label: no volume holds the data directory"
        );
    }
}
