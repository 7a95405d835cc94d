//! The label ConfigMap: `backup_label` and `tablespace_map` exactly as the server returned
//! them, kept beside the snapshots and owned by the data snapshot, so deleting the snapshot
//! deletes its label and a restore needs nothing else.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::api::snapshot::VolumeSnapshot;
use crate::backup::volumes::Location;

pub const BACKUP_LABEL_KEY: &str = "backup_label";
pub const TABLESPACE_MAP_KEY: &str = "tablespace_map";

/// Label on every object of one backup: its snapshots and its label ConfigMap.
pub const BACKUP_NAME_LABEL: &str = "pgsnap.io/backup";
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
}

pub fn config_map_name(backup: &str) -> String {
    format!("{backup}-backup-label")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A database directory inside a snapshot, as the label ConfigMap records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotLocation {
    pub volume_snapshot: String,
    #[serde(flatten)]
    pub location: Location,
}

/// What the label ConfigMap holds, independent of the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupLabel {
    pub backup: String,
    pub backup_label: String,
    pub tablespace_map: String,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub timeline: u32,
    pub server_version: String,
    pub system_identifier: String,
    pub volumes: Vec<SnapshotLocation>,
}

/// Builds the ConfigMap; `owner` is the data VolumeSnapshot.
pub fn build(
    label: &BackupLabel,
    namespace: &str,
    owner: &VolumeSnapshot,
) -> Result<ConfigMap, serde_json::Error> {
    use annotations::*;
    let annotations = BTreeMap::from([
        (START_LSN.to_string(), label.start_lsn.clone()),
        (STOP_LSN.to_string(), label.stop_lsn.clone()),
        (TIMELINE.to_string(), label.timeline.to_string()),
        (SERVER_VERSION.to_string(), label.server_version.clone()),
        (
            SYSTEM_IDENTIFIER.to_string(),
            label.system_identifier.clone(),
        ),
        (
            BACKUP_LABEL_SHA256.to_string(),
            sha256_hex(label.backup_label.as_bytes()),
        ),
        (
            TABLESPACE_MAP_SHA256.to_string(),
            sha256_hex(label.tablespace_map.as_bytes()),
        ),
        (VOLUMES.to_string(), serde_json::to_string(&label.volumes)?),
    ]);
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(config_map_name(&label.backup)),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                BACKUP_NAME_LABEL.to_string(),
                label.backup.clone(),
            )])),
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
            (BACKUP_LABEL_KEY.to_string(), label.backup_label.clone()),
            (TABLESPACE_MAP_KEY.to_string(), label.tablespace_map.clone()),
        ])),
        immutable: Some(true),
        ..Default::default()
    })
}

#[derive(Debug, thiserror::Error)]
pub enum LabelStoreError {
    #[error("could not encode the label ConfigMap: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("could not write label ConfigMap {name}: {source}")]
    Write { name: String, source: kube::Error },
}

impl LabelStoreError {
    pub fn reason(&self) -> &'static str {
        "LabelStoreFailed"
    }
}

/// Writes the ConfigMap (server-side apply, so a retry after a crash is harmless).
pub async fn store(
    client: &Client,
    label: &BackupLabel,
    namespace: &str,
    owner: &VolumeSnapshot,
) -> Result<ConfigMap, LabelStoreError> {
    let cm = build(label, namespace, owner)?;
    let name = cm.name_any();
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(crate::FIELD_MANAGER).force(),
            &Patch::Apply(&cm),
        )
        .await
        .map_err(|source| LabelStoreError::Write { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::backup::VolumeRole;
    use crate::api::snapshot::{VolumeSnapshotSource, VolumeSnapshotSpec};

    #[test]
    fn the_config_map_keeps_the_files_byte_for_byte_and_belongs_to_the_data_snapshot() {
        let mut owner = VolumeSnapshot::new(
            "orders-1-data",
            VolumeSnapshotSpec {
                source: VolumeSnapshotSource::default(),
                volume_snapshot_class_name: None,
            },
        );
        owner.metadata.uid = Some("uid-1".into());
        let label = BackupLabel {
            backup: "orders-1".into(),
            backup_label:
                "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\r\nLABEL: x\n".into(),
            tablespace_map: String::new(),
            start_lsn: "0/2000028".into(),
            stop_lsn: "0/2000100".into(),
            timeline: 1,
            server_version: "17.10".into(),
            system_identifier: "7312345678901234567".into(),
            volumes: vec![SnapshotLocation {
                volume_snapshot: "orders-1-data".into(),
                location: Location {
                    role: VolumeRole::Data,
                    tablespace: None,
                    tablespace_oid: None,
                    server_path: "/var/lib/postgresql/data/pgdata".into(),
                    persistent_volume_claim: "data-orders-db-0".into(),
                    path_in_volume: "pgdata".into(),
                },
            }],
        };
        let cm = build(&label, "shop", &owner).unwrap();
        assert_eq!(cm.name_any(), "orders-1-backup-label");
        assert_eq!(
            cm.data.as_ref().unwrap()[BACKUP_LABEL_KEY],
            label.backup_label
        );
        let ann = cm.annotations();
        assert_eq!(
            ann[annotations::BACKUP_LABEL_SHA256],
            sha256_hex(label.backup_label.as_bytes())
        );
        // The sha256 of nothing: a restore can tell "no tablespaces" from "map lost".
        assert_eq!(
            ann[annotations::TABLESPACE_MAP_SHA256],
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let volumes: Vec<SnapshotLocation> =
            serde_json::from_str(&ann[annotations::VOLUMES]).unwrap();
        assert_eq!(volumes, label.volumes);
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
}
