//! The parts of the CSI snapshot API (`snapshot.storage.k8s.io/v1`) that pgsnap uses. The
//! CRDs themselves ship with the external-snapshotter; these types only read and write them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A request for a snapshot of one PVC.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshot",
    namespaced,
    status = "VolumeSnapshotStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSpec {
    pub source: VolumeSnapshotSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_content_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_volume_snapshot_content_name: Option<String>,
    /// When the storage system cut the snapshot: the point in time it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct VolumeSnapshotError {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// The storage side of a snapshot, cluster-scoped: pgsnap reads and patches the content
/// bound to one of its own snapshots, never creates one.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshotContent"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentSpec {
    /// `Delete` or `Retain`: whether deleting the content deletes the storage snapshot.
    #[serde(default)]
    pub deletion_policy: String,
    #[serde(default)]
    pub volume_snapshot_ref: k8s_openapi::api::core::v1::ObjectReference,
}

impl VolumeSnapshot {
    /// Cut: the storage system has taken the point-in-time copy, so the database may leave
    /// backup mode even though the copy may still be uploading.
    pub fn is_cut(&self) -> bool {
        self.status.as_ref().is_some_and(|s| {
            s.bound_volume_snapshot_content_name.is_some() && s.creation_time.is_some()
        })
    }

    /// Requested, and the storage has reported neither a cut nor an error: it may be cutting
    /// right now.
    pub fn is_being_cut(&self) -> bool {
        let cut_at = self.status.as_ref().and_then(|s| s.creation_time.as_ref());
        cut_at.is_none() && self.error_message().is_none()
    }

    pub fn is_ready(&self) -> bool {
        self.status
            .as_ref()
            .and_then(|s| s.ready_to_use)
            .unwrap_or(false)
    }

    pub fn error_message(&self) -> Option<String> {
        let err = self.status.as_ref()?.error.as_ref()?;
        Some(
            err.message
                .clone()
                .unwrap_or_else(|| "the snapshot failed without a message".into()),
        )
    }
}

/// A class of snapshots of one CSI driver (cluster-scoped).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotClass {
    pub metadata: kube::api::ObjectMeta,
    pub driver: String,
    #[serde(default)]
    pub deletion_policy: String,
    #[serde(default)]
    pub parameters: std::collections::BTreeMap<String, String>,
}

impl kube::Resource for VolumeSnapshotClass {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "VolumeSnapshotClass".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "snapshot.storage.k8s.io".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "volumesnapshotclasses".into()
    }
    fn meta(&self) -> &kube::api::ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut kube::api::ObjectMeta {
        &mut self.metadata
    }
}

/// The annotation that marks a VolumeSnapshotClass as its driver's default.
pub const DEFAULT_CLASS_ANNOTATION: &str = "snapshot.storage.kubernetes.io/is-default-class";
