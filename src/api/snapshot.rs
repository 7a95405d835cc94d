//! The parts of the CSI snapshot APIs (`snapshot.storage.k8s.io/v1` and
//! `groupsnapshot.storage.k8s.io/v1`) that pgsnap uses. The CRDs themselves ship with the
//! external-snapshotter; these types only read and write them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
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
    /// Set on a member of a VolumeGroupSnapshot: the group's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_name: Option<String>,
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

/// What a snapshot and a group snapshot report alike: their cut, readiness and error.
pub trait SnapshotLike {
    /// What it is, in messages: "snapshot" or "group snapshot".
    const WHAT: &'static str;
    /// The content (storage side) it is bound to.
    type Content: Content;

    fn content_name(&self) -> Option<&str>;
    fn creation_time(&self) -> Option<&Time>;
    fn ready_to_use(&self) -> Option<bool>;
    fn error(&self) -> Option<&VolumeSnapshotError>;

    /// SnapshotLike: the storage system has taken the point-in-time copy, so the database may leave
    /// backup mode even though the copy may still be uploading.
    fn is_cut(&self) -> bool {
        self.content_name().is_some() && self.creation_time().is_some()
    }

    /// Requested, and the storage has reported neither a cut nor an error: it may be cutting
    /// right now.
    fn is_being_cut(&self) -> bool {
        self.creation_time().is_none() && self.error().is_none()
    }

    fn is_ready(&self) -> bool {
        self.ready_to_use().unwrap_or(false)
    }

    fn error_message(&self) -> Option<String> {
        Some(
            self.error()?
                .message
                .clone()
                .unwrap_or_else(|| "the snapshot failed without a message".into()),
        )
    }
}

impl SnapshotLike for VolumeSnapshot {
    const WHAT: &'static str = "snapshot";
    type Content = VolumeSnapshotContent;

    fn content_name(&self) -> Option<&str> {
        self.status
            .as_ref()?
            .bound_volume_snapshot_content_name
            .as_deref()
    }
    fn creation_time(&self) -> Option<&Time> {
        self.status.as_ref()?.creation_time.as_ref()
    }
    fn ready_to_use(&self) -> Option<bool> {
        self.status.as_ref()?.ready_to_use
    }
    fn error(&self) -> Option<&VolumeSnapshotError> {
        self.status.as_ref()?.error.as_ref()
    }
}

/// A request to cut several PVCs, chosen by a label selector, at one instant.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "groupsnapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeGroupSnapshot",
    namespaced,
    status = "VolumeGroupSnapshotStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotSpec {
    pub source: VolumeGroupSnapshotSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_class_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_content_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_volume_group_snapshot_content_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
}

impl SnapshotLike for VolumeGroupSnapshot {
    const WHAT: &'static str = "group snapshot";
    type Content = VolumeGroupSnapshotContent;

    fn content_name(&self) -> Option<&str> {
        self.status
            .as_ref()?
            .bound_volume_group_snapshot_content_name
            .as_deref()
    }
    fn creation_time(&self) -> Option<&Time> {
        self.status.as_ref()?.creation_time.as_ref()
    }
    fn ready_to_use(&self) -> Option<bool> {
        self.status.as_ref()?.ready_to_use
    }
    fn error(&self) -> Option<&VolumeSnapshotError> {
        self.status.as_ref()?.error.as_ref()
    }
}

/// The storage side of a group snapshot, cluster-scoped: pgsnap watches the one bound to its
/// own group for the cut, and switches it to deletionPolicy Delete.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "groupsnapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeGroupSnapshotContent",
    status = "VolumeGroupSnapshotContentStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotContentSpec {
    #[serde(default)]
    pub deletion_policy: String,
    #[serde(default)]
    pub volume_group_snapshot_ref: k8s_openapi::api::core::v1::ObjectReference,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupSnapshotContentStatus {
    /// Set by the CSI sidecar as soon as the driver has cut the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
}

/// The storage side of a snapshot or a group: which object it was made for, and whether
/// deleting it deletes the storage's copy.
pub trait Content:
    kube::Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
{
    /// The annotation the CSI sidecar keeps on it while it creates the storage's copy.
    const BEING_CREATED: &'static str;

    /// The uid of the snapshot or group it is bound to.
    fn bound_to(&self) -> Option<&str>;
    fn deletion_policy(&self) -> &str;

    /// The sidecar is still creating it, or finishing (it removes the annotation last): a
    /// deletion now races it (kubernetes-csi/external-snapshotter#880).
    fn being_created(&self) -> bool {
        self.meta()
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(Self::BEING_CREATED))
    }
}

impl Content for VolumeSnapshotContent {
    const BEING_CREATED: &'static str =
        "snapshot.storage.kubernetes.io/volumesnapshot-being-created";

    fn bound_to(&self) -> Option<&str> {
        self.spec.volume_snapshot_ref.uid.as_deref()
    }
    fn deletion_policy(&self) -> &str {
        &self.spec.deletion_policy
    }
}

impl Content for VolumeGroupSnapshotContent {
    const BEING_CREATED: &'static str =
        "groupsnapshot.storage.kubernetes.io/volumegroupsnapshot-being-created";

    fn bound_to(&self) -> Option<&str> {
        self.spec.volume_group_snapshot_ref.uid.as_deref()
    }
    fn deletion_policy(&self) -> &str {
        &self.spec.deletion_policy
    }
}

/// A class of snapshots (or of group snapshots) of one CSI driver, cluster-scoped: both
/// kinds have the same fields, and no spec.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotClass<K> {
    pub metadata: kube::api::ObjectMeta,
    pub driver: String,
    #[serde(default)]
    pub deletion_policy: String,
    #[serde(default)]
    pub parameters: std::collections::BTreeMap<String, String>,
    #[serde(skip)]
    pub kind: std::marker::PhantomData<K>,
}

/// Which class kind a `SnapshotClass` is.
pub trait ClassKind {
    const KIND: &'static str;
    const GROUP: &'static str;
    const PLURAL: &'static str;
    /// The annotation that marks a class as its driver's default.
    const DEFAULT_ANNOTATION: &'static str;
}

#[derive(Clone, Debug, PartialEq)]
pub enum Single {}
#[derive(Clone, Debug, PartialEq)]
pub enum Grouped {}

impl ClassKind for Single {
    const KIND: &'static str = "VolumeSnapshotClass";
    const GROUP: &'static str = "snapshot.storage.k8s.io";
    const PLURAL: &'static str = "volumesnapshotclasses";
    const DEFAULT_ANNOTATION: &'static str = DEFAULT_CLASS_ANNOTATION;
}

impl ClassKind for Grouped {
    const KIND: &'static str = "VolumeGroupSnapshotClass";
    const GROUP: &'static str = "groupsnapshot.storage.k8s.io";
    const PLURAL: &'static str = "volumegroupsnapshotclasses";
    const DEFAULT_ANNOTATION: &'static str = "groupsnapshot.storage.kubernetes.io/is-default-class";
}

pub type VolumeSnapshotClass = SnapshotClass<Single>;
pub type VolumeGroupSnapshotClass = SnapshotClass<Grouped>;

impl<K: ClassKind> kube::Resource for SnapshotClass<K> {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        K::KIND.into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        K::GROUP.into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        K::PLURAL.into()
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
