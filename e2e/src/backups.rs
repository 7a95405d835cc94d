//! Backups from a test's point of view: specs (and schedules of them), creation, waits on
//! their phase, and classes of the test CSI driver with its failure behaviours.

use std::time::Duration;

use kube::api::{DeleteParams, DynamicObject, PostParams};
use kube::runtime::wait::Condition;
use kube::{Api, ResourceExt};
use pgsnap::api::Backup;
use pgsnap::api::backup::Phase;
use pgsnap::api::schedule::BackupSchedule;
use serde_json::json;

use crate::{Cluster, PostgresPod};

/// A Backup spec targeting `db` by pod name with the password Secret `secret`, plus `rest`.
pub fn on(db: &PostgresPod, secret: &str, rest: serde_json::Value) -> serde_json::Value {
    let mut spec = json!({
        "target": {"podName": db.name},
        "connection": {"passwordSecretRef": {"name": secret, "key": "password"}},
    });
    spec.as_object_mut()
        .unwrap()
        .extend(rest.as_object().cloned().unwrap_or_default());
    spec
}

/// A BackupSchedule of `template` (a Backup spec) on `pattern`, keeping the last two.
pub fn schedule(name: &str, pattern: &str, template: serde_json::Value) -> BackupSchedule {
    serde_json::from_value(json!({
        "apiVersion": "pgsnap.io/v1alpha1", "kind": "BackupSchedule",
        "metadata": {"name": name},
        "spec": {"schedule": pattern, "retention": {"keepLast": 2}, "backupTemplate": template},
    }))
    .expect("a BackupSchedule")
}

pub fn backup_spec(name: &str, spec: serde_json::Value) -> Backup {
    serde_json::from_value(json!({
        "apiVersion": "pgsnap.io/v1alpha1",
        "kind": "Backup",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a Backup")
}

/// A Backup of `db` named `name` (a fast checkpoint, `rest` on top of it) once it ended;
/// panics unless it Completed.
pub async fn completed_backup(
    cluster: &Cluster,
    db: &PostgresPod,
    name: &str,
    rest: serde_json::Value,
) -> Backup {
    let secret = db.password_secret(cluster).await;
    let mut spec = json!({"checkpoint": "Fast"});
    spec.as_object_mut()
        .unwrap()
        .extend(rest.as_object().cloned().unwrap_or_default());
    apply(cluster, backup_spec(name, on(db, &secret, spec))).await;
    let backup = wait_terminal(cluster, name).await;
    let status = backup.status.clone().unwrap_or_default();
    assert_eq!(
        status.phase,
        Some(Phase::Completed),
        "{name}: {:?}",
        status.error
    );
    backup
}

pub async fn apply(cluster: &Cluster, backup: Backup) -> String {
    let name = backup.name_any();
    cluster
        .api::<Backup>()
        .create(&PostParams::default(), &backup)
        .await
        .unwrap_or_else(|e| panic!("creating backup {name}: {e}"));
    name
}

fn phase_is(phases: &'static [Phase]) -> impl Condition<Backup> {
    move |b: Option<&Backup>| {
        b.and_then(|b| b.status.as_ref())
            .and_then(|s| s.phase)
            .is_some_and(|p| phases.contains(&p))
    }
}

/// Waits (at most `within`) until the Backup is in one of `phases`.
pub async fn wait_phase(
    cluster: &Cluster,
    name: &str,
    phases: &'static [Phase],
    within: Duration,
) -> Backup {
    let what = format!("{phases:?}");
    cluster
        .wait_for(
            cluster.api::<Backup>(),
            name,
            &what,
            within,
            phase_is(phases),
        )
        .await
}

pub async fn wait_terminal(cluster: &Cluster, name: &str) -> Backup {
    wait_phase(
        cluster,
        name,
        &[Phase::Completed, Phase::Failed],
        Duration::from_secs(120),
    )
    .await
}

/// The cluster-scoped VolumeSnapshotClasses.
pub fn snapshot_classes(cluster: &Cluster) -> Api<DynamicObject> {
    cluster_scoped(cluster, "snapshot.storage.k8s.io", "VolumeSnapshotClass")
}

/// The cluster-scoped VolumeGroupSnapshotClasses.
pub fn group_snapshot_classes(cluster: &Cluster) -> Api<DynamicObject> {
    cluster_scoped(
        cluster,
        "groupsnapshot.storage.k8s.io",
        "VolumeGroupSnapshotClass",
    )
}

/// The test namespace's VolumeGroupSnapshots.
pub fn group_snapshots(cluster: &Cluster) -> Api<DynamicObject> {
    let gvk = kube::api::GroupVersionKind::gvk(
        "groupsnapshot.storage.k8s.io",
        "v1",
        "VolumeGroupSnapshot",
    );
    Api::namespaced_with(
        cluster.client.clone(),
        &cluster.namespace,
        &kube::api::ApiResource::from_gvk(&gvk),
    )
}

fn cluster_scoped(cluster: &Cluster, group: &str, kind: &str) -> Api<DynamicObject> {
    let gvk = kube::api::GroupVersionKind::gvk(group, "v1", kind);
    Api::all_with(
        cluster.client.clone(),
        &kube::api::ApiResource::from_gvk(&gvk),
    )
}

/// A VolumeSnapshotClass of the test driver for this test's namespace, with `parameters` on
/// top of the default class's (the driver's behaviours: e2e/go/hostpath/main.go).
pub async fn snapshot_class(
    cluster: &Cluster,
    kind: &str,
    deletion_policy: &str,
    parameters: serde_json::Value,
) -> String {
    let name = format!("{kind}-{}", cluster.namespace);
    let mut params = json!({"ignoreFailedRead": "true"});
    params
        .as_object_mut()
        .unwrap()
        .extend(parameters.as_object().cloned().unwrap_or_default());
    let class: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
        "metadata": {"name": name}, "driver": "hostpath.csi.k8s.io",
        "deletionPolicy": deletion_policy, "parameters": params,
    }))
    .unwrap();
    snapshot_classes(cluster)
        .create(&PostParams::default(), &class)
        .await
        .unwrap_or_else(|e| panic!("VolumeSnapshotClass {name}: {e}"));
    name
}

pub async fn delete_snapshot_class(cluster: &Cluster, name: &str) {
    let _ = snapshot_classes(cluster)
        .delete(name, &DeleteParams::default())
        .await;
}
