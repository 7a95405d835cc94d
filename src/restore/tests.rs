//! Each phase of the Restore reconciler against a scripted API server: what it reads, what
//! it creates, and the status and Event it ends a pass with.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::{Context, Settings, reconcile};
use crate::api::backup::{BackupStatus, Phase, VolumeRole};
use crate::api::restore::{Restore, RestorePhase};
use crate::api::{BACKUP_NAME_LABEL, RESTORE_NAME_LABEL, RESTORE_UID_LABEL};
use crate::fixtures::{
    self, BACKUP, BACKUP_PATH, CONFIG_MAPS_PATH, Call, LABEL_CONFIG_MAP, NS, SNAPSHOTS_PATH,
    assert_failed, assert_phase, ready_message, snapshot,
};
use crate::label_store::{self, LabelRecord, Location, SnapshotLocation, WalRecord};
use crate::telemetry::Metrics;

const RESTORE_PATH: &str = "/apis/pgsnap.io/v1alpha1/namespaces/shop/restores/r1";
const CLAIMS_PATH: &str = "/api/v1/namespaces/shop/persistentvolumeclaims";
const JOBS_PATH: &str = "/apis/batch/v1/namespaces/shop/jobs";
const JOB: &str = "r1-prepare";
const DATA_SNAPSHOT: &str = "orders-1-data";

/// Reconciles `restore` once against `script`.
async fn reconcile_with(restore: Restore, script: Vec<Call>) -> Action {
    fixtures::run(script, |client| {
        let settings = Settings {
            namespace: Some(NS.into()),
            image: "pgsnap:test".into(),
        };
        let ctx = Context::new(client, settings, Arc::new(Metrics::default()));
        reconcile(Arc::new(restore), Arc::new(ctx))
    })
    .await
    .expect("the reconcile succeeds")
}

/// The label of a backup of one data volume, mounted at /var/lib/postgresql/data.
fn label_config_map() -> ConfigMap {
    label_config_map_with(None)
}

/// The WAL snapshot of a backup that kept its WAL, and its record in the label.
const WAL_SNAPSHOT: &str = "orders-1-data-db-0-wal";

fn kept_wal() -> WalRecord {
    WalRecord {
        volume_snapshot: WAL_SNAPSHOT.into(),
        persistent_volume_claim: "data-db-0".into(),
        path_in_volume: "pgdata/pg_wal".into(),
        timeline: 1,
        first_segment: "000000010000000000000002".into(),
        last_segment: "000000010000000000000003".into(),
        segment_size: 16 << 20,
        checked_by: "pg_ls_waldir".into(),
    }
}

fn label_config_map_with(wal: Option<WalRecord>) -> ConfigMap {
    let record = LabelRecord {
        backup: Some(BACKUP.into()),
        backup_label: "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n".into(),
        tablespace_map: String::new(),
        start_lsn: "0/2000028".into(),
        stop_lsn: "0/2000100".into(),
        timeline: 1,
        server_version: "17.10".into(),
        system_identifier: "7312345678901234567".into(),
        volumes: vec![SnapshotLocation {
            volume_snapshot: DATA_SNAPSHOT.into(),
            location: Location {
                role: VolumeRole::Data,
                tablespace: None,
                tablespace_oid: None,
                server_path: "/var/lib/postgresql/data/pgdata".into(),
                persistent_volume_claim: "data-db-0".into(),
                path_in_volume: "pgdata".into(),
            },
        }],
        wal,
    };
    let owner = snapshot(DATA_SNAPSHOT, true, None);
    let labels = [(BACKUP_NAME_LABEL.to_string(), BACKUP.to_string())].into();
    label_store::build(&record, LABEL_CONFIG_MAP, NS, &owner, labels).expect("a label ConfigMap")
}

fn backup_in(phase: Phase) -> crate::api::backup::Backup {
    crate::api::backup::Backup::test().with_status(BackupStatus {
        phase: Some(phase),
        label_config_map: Some(LABEL_CONFIG_MAP.into()),
        ..Default::default()
    })
}

/// Pending, done: the Completed backup, its label and its ready snapshot; then the
/// StorageClasses that provisioning plans the claim with.
fn resolved() -> Vec<Call> {
    let default_class = json!({
        "metadata": {
            "name": "standard",
            "annotations": { "storageclass.kubernetes.io/is-default-class": "true" },
        },
        "provisioner": "hostpath.csi.k8s.io",
        "volumeBindingMode": "Immediate",
    });
    vec![
        Call::get(BACKUP_PATH).returns(backup_in(Phase::Completed)),
        Call::get(format!("{CONFIG_MAPS_PATH}/{LABEL_CONFIG_MAP}")).returns(label_config_map()),
        Call::get(format!("{SNAPSHOTS_PATH}/{DATA_SNAPSHOT}")).returns(snapshot(
            DATA_SNAPSHOT,
            true,
            None,
        )),
        Call::get("/apis/storage.k8s.io/v1/storageclasses").returns_list([default_class]),
    ]
}

/// The restored claim as the API server has it, made by this Restore.
fn claim(phase: &str) -> Value {
    json!({
        "metadata": {
            "name": "restored-data", "namespace": NS,
            "labels": { RESTORE_NAME_LABEL: "r1", RESTORE_UID_LABEL: "restore-uid" },
        },
        "spec": { "storageClassName": "standard" },
        "status": { "phase": phase },
    })
}

/// The prepare Job this Restore made, with the conditions its controller set.
fn job(conditions: Value) -> Value {
    json!({
        "metadata": { "name": JOB, "namespace": NS, "labels": { RESTORE_NAME_LABEL: "r1", RESTORE_UID_LABEL: "restore-uid" } },
        "status": {
            "startTime": "2026-01-01T10:00:00Z",
            "completionTime": "2026-01-01T10:00:04Z",
            "conditions": conditions,
        },
    })
}

/// Up to the bound claim: what every reconcile of a Restore past provisioning reads.
fn provisioned() -> Vec<Call> {
    let mut script = resolved();
    script.push(Call::get(format!("{CLAIMS_PATH}/restored-data")).returns(claim("Bound")));
    script
}

/// A failure: status Failed with the reason (and `error`), Ready False, a Warning Event.
fn failed(restore: &Restore, reason: &'static str, message: &'static str) -> Vec<Call> {
    vec![
        Call::apply_status(RESTORE_PATH, restore).body(move |body| {
            let status = &body["status"];
            assert_failed(status, reason, message);
        }),
        Call::event("Warning", reason).body(move |e| assert_eq!(e["note"], message)),
    ]
}

#[tokio::test]
async fn a_restore_of_a_missing_backup_fails_with_backup_not_found() {
    let restore = Restore::test();
    let mut script = vec![
        Call::apply_status(RESTORE_PATH, &restore)
            .body(|b| assert_phase(&b["status"], "Pending", "False", "Resolving")),
        Call::event("Normal", "Resolving"),
        Call::get(BACKUP_PATH).not_found(),
    ];
    script.extend(failed(
        &restore,
        "BackupNotFound",
        "Backup orders-1 does not exist in namespace shop",
    ));
    assert_eq!(
        reconcile_with(restore, script).await,
        Action::await_change()
    );
}

#[tokio::test]
async fn a_backup_that_is_not_completed_is_not_restored() {
    let restore = Restore::test().in_phase(RestorePhase::Pending);
    let mut script = vec![Call::get(BACKUP_PATH).returns(backup_in(Phase::Finalizing))];
    script.extend(failed(
        &restore,
        "BackupNotCompleted",
        "Backup orders-1 is Finalizing; only a Completed backup can be restored",
    ));
    reconcile_with(restore, script).await;
}

#[tokio::test]
async fn the_claim_is_created_from_the_snapshot_and_provisioning_waits_until_it_is_bound() {
    let restore = Restore::test().in_phase(RestorePhase::Pending);
    let mut script = resolved();
    script.extend([
        Call::get(format!("{CLAIMS_PATH}/restored-data")).not_found(),
        Call::create(CLAIMS_PATH).body(|pvc| {
            assert_eq!(pvc["metadata"]["name"], "restored-data");
            assert_eq!(pvc["metadata"]["labels"][RESTORE_NAME_LABEL], "r1");
            assert_eq!(pvc["metadata"]["labels"][RESTORE_UID_LABEL], "restore-uid");
            // claimDeletionPolicy Retain: the claims outlive the Restore.
            assert_eq!(pvc["metadata"].get("ownerReferences"), None);
            let spec = &pvc["spec"];
            assert_eq!(
                spec["dataSource"],
                json!({
                    "apiGroup": "snapshot.storage.k8s.io",
                    "kind": "VolumeSnapshot",
                    "name": DATA_SNAPSHOT,
                })
            );
            assert_eq!(spec["storageClassName"], "standard");
            assert_eq!(spec["resources"]["requests"]["storage"], "10Gi");
        }),
        Call::apply_status(RESTORE_PATH, &restore).body(|body| {
            let status = &body["status"];
            assert_phase(status, "Provisioning", "False", "Provisioning");
            assert_eq!(
                ready_message(status),
                "restoring 1 volume(s) from snapshots; waiting for restored-data to be bound"
            );
            assert_eq!(status["claims"][0]["bound"], false);
            assert_eq!(status["source"]["labelConfigMap"], LABEL_CONFIG_MAP);
            assert_eq!(status["source"]["backup"], BACKUP);
        }),
        Call::event("Normal", "Provisioning"),
    ]);
    assert_eq!(
        reconcile_with(restore, script).await,
        Action::await_change()
    );
}

#[tokio::test]
async fn a_bound_claim_gets_the_prepare_job() {
    let restore = Restore::test().in_phase(RestorePhase::Provisioning);
    let mut script = provisioned();
    script.extend([
        Call::get(format!("{JOBS_PATH}/{JOB}")).not_found(),
        Call::create(JOBS_PATH).body(|job| {
            assert_eq!(job["metadata"]["name"], JOB);
            assert_eq!(job["metadata"]["labels"][RESTORE_NAME_LABEL], "r1");
            assert_eq!(job["metadata"]["labels"][RESTORE_UID_LABEL], "restore-uid");
            assert_eq!(job["metadata"]["ownerReferences"][0]["uid"], "restore-uid");
            let pod = &job["spec"]["template"]["spec"];
            let container = &pod["containers"][0];
            assert_eq!(container["image"], "pgsnap:test");
            let args: Vec<&str> = container["args"]
                .as_array()
                .expect("args")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert_eq!(
                args[..5],
                [
                    "restore-prepare",
                    "--data-dir",
                    "/var/lib/postgresql/data/pgdata",
                    "--label-dir",
                    "/pgsnap/label"
                ]
            );
            let system_identifier = args.iter().position(|a| *a == "--system-identifier");
            assert_eq!(
                system_identifier.map(|i| args[i + 1]),
                Some("7312345678901234567")
            );
            assert_eq!(
                container["volumeMounts"][1]["mountPath"],
                "/var/lib/postgresql/data"
            );
            assert_eq!(pod["volumes"][0]["configMap"]["name"], LABEL_CONFIG_MAP);
            assert_eq!(
                pod["volumes"][1]["persistentVolumeClaim"]["claimName"],
                "restored-data"
            );
        }),
        Call::apply_status(RESTORE_PATH, &restore).body(|body| {
            let status = &body["status"];
            assert_phase(status, "Preparing", "False", "Preparing");
            assert_eq!(
                ready_message(status),
                "Job r1-prepare runs pgsnap restore-prepare on claim restored-data"
            );
            assert_eq!(status["prepareJob"], JOB);
            assert_eq!(status["claims"][0]["bound"], true);
        }),
        Call::event("Normal", "Preparing"),
    ]);
    reconcile_with(restore, script).await;
}

#[tokio::test]
async fn a_succeeded_job_completes_the_restore_with_where_to_start_postgres() {
    let restore = Restore::test().in_phase(RestorePhase::Preparing);
    let hint = "1 claim(s) restored and prepared for recovery; mount restored-data at \
                /var/lib/postgresql/data and start PostgreSQL with PGDATA \
                /var/lib/postgresql/data/pgdata";
    let mut script = provisioned();
    script.extend([
        Call::get(format!("{JOBS_PATH}/{JOB}"))
            .returns(job(json!([{ "type": "Complete", "status": "True" }]))),
        Call::apply_status(RESTORE_PATH, &restore).body(move |body| {
            let status = &body["status"];
            assert_phase(status, "Completed", "True", "Completed");
            assert_eq!(ready_message(status), hint);
            assert!(status["completedAt"].is_string(), "{status}");
            assert_eq!(status["timings"]["prepareSeconds"], "4.0");
        }),
        Call::event("Normal", "Completed").body(move |e| assert_eq!(e["note"], hint)),
    ]);
    reconcile_with(restore, script).await;
}

/// A backup that kept its WAL: the Job reads it from a temporary claim of the WAL snapshot,
/// which goes, after the Job and its pod (which would hold it), once the Job has ended.
#[tokio::test]
async fn the_backups_wal_is_read_from_a_temporary_claim_that_goes_when_the_job_ends() {
    let restore = Restore::test().in_phase(RestorePhase::Preparing);
    let temporary = "r1-backup-wal";
    let mut wal_claim = claim("Bound");
    wal_claim["metadata"]["name"] = json!(temporary);
    let mut script = vec![
        Call::get(BACKUP_PATH).returns(backup_in(Phase::Completed)),
        Call::get(format!("{CONFIG_MAPS_PATH}/{LABEL_CONFIG_MAP}"))
            .returns(label_config_map_with(Some(kept_wal()))),
    ];
    script.extend(provisioned().into_iter().skip(2).take(1));
    script.extend([
        Call::get(format!("{SNAPSHOTS_PATH}/{WAL_SNAPSHOT}")).returns(snapshot(
            WAL_SNAPSHOT,
            true,
            None,
        )),
    ]);
    script.extend(provisioned().into_iter().skip(3));
    script.extend([
        Call::get(format!("{CLAIMS_PATH}/{temporary}")).returns(wal_claim.clone()),
        Call::get(format!("{JOBS_PATH}/{JOB}"))
            .returns(job(json!([{ "type": "Complete", "status": "True" }]))),
        Call::get(format!("{JOBS_PATH}/{JOB}"))
            .returns(job(json!([{ "type": "Complete", "status": "True" }]))),
        Call::delete(format!("{JOBS_PATH}/{JOB}"))
            .body(|b| assert_eq!(b["propagationPolicy"], "Background")),
        Call::get(format!("{CLAIMS_PATH}/{temporary}")).returns(wal_claim),
        Call::delete(format!("{CLAIMS_PATH}/{temporary}")),
        Call::apply_status(RESTORE_PATH, &restore).body(|body| {
            let status = &body["status"];
            assert_phase(status, "Completed", "True", "Completed");
            assert_eq!(status.get("backupWalClaim"), None, "{status}");
        }),
        Call::event("Normal", "Completed"),
    ]);
    reconcile_with(restore, script).await;
}

#[tokio::test]
async fn a_refusal_in_the_jobs_termination_message_is_the_reason_the_restore_failed() {
    let restore = Restore::test().in_phase(RestorePhase::Preparing);
    let pod = json!({
        "metadata": { "name": "r1-prepare-x7k2p", "namespace": NS },
        "status": { "containerStatuses": [{
            "name": "restore-prepare", "image": "pgsnap:test", "imageID": "",
            "ready": false, "restartCount": 0,
            "state": { "terminated": {
                "exitCode": 3,
                "message": "SystemIdentifierMismatch: pg_control says 1, the backup 7312345678901234567\n",
            } },
        }] },
    });
    let mut script = provisioned();
    script.extend([
        Call::get(format!("{JOBS_PATH}/{JOB}")).returns(job(json!([{
            "type": "Failed", "status": "True",
            "reason": "PodFailurePolicy", "message": "Container restore-prepare exited with 3",
        }]))),
        Call::list(
            "/api/v1/namespaces/shop/pods",
            "batch.kubernetes.io/job-name=r1-prepare",
        )
        .returns_list([pod]),
    ]);
    script.extend(failed(
        &restore,
        "SystemIdentifierMismatch",
        "pg_control says 1, the backup 7312345678901234567",
    ));
    reconcile_with(restore, script).await;
}

#[tokio::test]
async fn a_claim_some_other_object_made_is_never_touched() {
    let restore = Restore::test().in_phase(RestorePhase::Pending);
    let mut foreign = claim("Bound");
    foreign["metadata"]["labels"] = json!({ BACKUP_NAME_LABEL: "something-else" });
    let mut script = resolved();
    script.push(Call::get(format!("{CLAIMS_PATH}/restored-data")).returns(foreign));
    // Nothing is created: the script ends with the failure.
    script.extend(failed(
        &restore,
        "ClaimExists",
        "PVC restored-data already exists and was not made by this Restore; choose another claim name",
    ));
    reconcile_with(restore, script).await;
}

/// A claim an earlier Restore of the same name made (another uid) is not this one's either.
#[tokio::test]
async fn a_claim_of_an_earlier_restore_of_the_same_name_is_never_adopted() {
    let restore = Restore::test().in_phase(RestorePhase::Pending);
    let mut earlier = claim("Bound");
    earlier["metadata"]["labels"] = json!({ RESTORE_NAME_LABEL: "r1", RESTORE_UID_LABEL: "old" });
    let mut script = resolved();
    script.push(Call::get(format!("{CLAIMS_PATH}/restored-data")).returns(earlier));
    script.extend(failed(
        &restore,
        "ClaimExists",
        "PVC restored-data already exists and was not made by this Restore; choose another claim name",
    ));
    reconcile_with(restore, script).await;
}
