//! The Restore controller end to end: Backup under load → Restore (PVCs from the snapshots,
//! `pgsnap restore-prepare` in a Job) → a PostgreSQL pod on the restored claims → every row
//! committed before the backup's stop is there. Plus the refusals, a retained snapshot whose
//! Backup is gone, and a time target.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::wait::Condition;
use kube::{Api, ResourceExt};
use pgsnap::api::Backup;
use pgsnap::api::backup::{CutMethod, Phase, VolumeRole};
use pgsnap::api::restore::{Restore, RestorePhase};
use pgsnap::api::snapshot::{VolumeGroupSnapshotContent, VolumeSnapshot, VolumeSnapshotContent};
use pgsnap_e2e::backups::group_snapshots;
use pgsnap_e2e::operator::Operator;
use pgsnap_e2e::postgres::{ARCHIVE_MOUNT, POSTGRES_UID};
use pgsnap_e2e::proof;
use pgsnap_e2e::verify::{self, Writer};
use pgsnap_e2e::{Cluster, PostgresPod, postgres_pod};
use serde_json::json;

async fn backup(
    cluster: &Cluster,
    db: &PostgresPod,
    name: &str,
    extra: serde_json::Value,
) -> Backup {
    let secret = db.password_secret(cluster).await;
    let mut spec = json!({
        "target": {"podName": db.name},
        "connection": {"passwordSecretRef": {"name": secret, "key": "password"}},
        "checkpoint": "Fast",
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    let b: Backup = serde_json::from_value(json!({"apiVersion": "pgsnap.io/v1alpha1", "kind": "Backup", "metadata": {"name": name}, "spec": spec})).unwrap();
    cluster
        .api::<Backup>()
        .create(&PostParams::default(), &b)
        .await
        .unwrap_or_else(|e| panic!("backup {name}: {e}"));
    let done = |b: Option<&Backup>| {
        b.and_then(|b| b.status.as_ref())
            .and_then(|s| s.phase)
            .is_some_and(|p| p.is_terminal())
    };
    cluster
        .wait_for(
            cluster.api::<Backup>(),
            name,
            "Completed or Failed",
            Duration::from_secs(120),
            done,
        )
        .await
}

fn completed(b: &Backup) -> &pgsnap::api::BackupStatus {
    let status = b.status.as_ref().expect("status");
    assert_eq!(
        status.phase,
        Some(Phase::Completed),
        "backup {}: {:#?}",
        b.name_any(),
        status.error
    );
    status
}

/// One claim per snapshot of the backup that holds a volume of the database (not its WAL
/// snapshot, which the Restore reads itself), named `<claim>-<suffix>`.
fn claims_for(b: &Backup, suffix: &str) -> serde_json::Value {
    let snapshots = &b.status.as_ref().expect("status").snapshots;
    json!(snapshots
        .iter()
        .filter(|s| s.role != VolumeRole::BackupWal)
        .map(|s| {
            let mut c = json!({"role": s.role, "name": format!("{}-{suffix}", s.persistent_volume_claim)});
            if let Some(t) = &s.tablespace {
                c["tablespace"] = json!(t);
            }
            c
        })
        .collect::<Vec<_>>())
}

async fn restore(cluster: &Cluster, name: &str, spec: serde_json::Value) -> Restore {
    let r: Restore = serde_json::from_value(json!({"apiVersion": "pgsnap.io/v1alpha1", "kind": "Restore", "metadata": {"name": name}, "spec": spec})).unwrap();
    cluster
        .api::<Restore>()
        .create(&PostParams::default(), &r)
        .await
        .unwrap_or_else(|e| panic!("restore {name}: {e}"));
    cluster
        .wait_for(
            cluster.api::<Restore>(),
            name,
            "Completed or Failed",
            Duration::from_secs(180),
            restore_ended(),
        )
        .await
}

fn restore_ended() -> impl Condition<Restore> {
    |r: Option<&Restore>| {
        r.and_then(|r| r.status.as_ref())
            .and_then(|s| s.phase)
            .is_some_and(|p| p.is_terminal())
    }
}

fn failed_with(r: &Restore, reasons: &[&str]) {
    let status = r.status.as_ref().expect("status");
    assert_eq!(
        status.phase,
        Some(RestorePhase::Failed),
        "restore {}: {status:#?}",
        r.name_any()
    );
    let stalled = status.conditions.iter().find(|c| c.type_ == "Stalled");
    assert!(
        stalled.is_some_and(|c| c.status == "True"),
        "a failed restore reads as failed to GitOps tools: {stalled:?}"
    );
    let error = status.error.as_ref().expect("a failed restore says why");
    assert!(
        reasons.contains(&error.reason.as_str()),
        "restore {}: reason {} not in {reasons:?}: {}",
        r.name_any(),
        error.reason,
        error.message
    );
}

fn assert_restored(r: &Restore) -> &pgsnap::api::restore::RestoreStatus {
    let status = r.status.as_ref().expect("status");
    assert_eq!(
        status.phase,
        Some(RestorePhase::Completed),
        "restore {}: {status:#?}",
        r.name_any()
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(ready.status, "True");
    status
}

/// A PostgreSQL pod on the restored claims (each at its `mountPath`), with the source's
/// archive when the restore reads WAL from it; waits for recovery to end. Returns a client
/// and the recovery time.
async fn start_restored(
    cluster: &Cluster,
    source: &PostgresPod,
    r: &Restore,
    with_archive: bool,
) -> Result<(tokio_postgres::Client, Duration), String> {
    let status = r.status.as_ref().ok_or("no status")?;
    let name = pgsnap::controller::bounded_name(&r.name_any(), "pg", 63);
    let (mut mounts, mut volumes) = (Vec::new(), Vec::new());
    if with_archive {
        mounts.push(json!({"name": "archive", "mountPath": ARCHIVE_MOUNT}));
        volumes.push(
            json!({"name": "archive", "persistentVolumeClaim": {"claimName": source.claim("archive")}}),
        );
    }
    let mut pgdata = None;
    for (i, c) in status.claims.iter().enumerate() {
        mounts.push(json!({"name": format!("c{i}"), "mountPath": c.mount_path}));
        volumes
            .push(json!({"name": format!("c{i}"), "persistentVolumeClaim": {"claimName": c.name}}));
        if c.role == pgsnap::api::backup::VolumeRole::Data {
            pgdata = Some(format!(
                "{}/{}",
                c.mount_path.trim_end_matches('/'),
                c.path_in_volume
            ));
        }
    }
    let pgdata = pgdata.ok_or("no Data claim")?;
    let pod = verify::restored_pod(source, &name, &pgdata, mounts, volumes)?;
    verify::serve_restored(cluster, source, &pod).await
}

/// Backup under pgbench and a row writer of a server without a WAL archive; Restore (no
/// restore command: the WAL the backup kept); PostgreSQL on the claims; every row committed
/// before the stop is there, and the Restore's temporary claim of the WAL snapshot is gone.
/// `multi`: data + WAL + tablespace volumes.
async fn round_trip(major: u32, multi: bool, spec: serde_json::Value) {
    let cluster = Cluster::from_env().await;
    let operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(major)
        .no_archive()
        .wal_volume(multi)
        .tablespace_volume(multi)
        .create(&cluster)
        .await;
    if multi {
        db.sql("CREATE TABLE in_ts (v bigint) TABLESPACE ts1").await;
        db.sql("INSERT INTO in_ts SELECT generate_series(1, 1000)")
            .await;
    }
    db.pgbench_init(1);
    let writer = Writer::start(&db).await;
    let load = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || db.pgbench_run(8))
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spec_groups = spec["groupSnapshot"].as_str();
    let b = backup(&cluster, &db, &format!("b{major}"), spec.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written = writer.finish().await;
    load.await.expect("pgbench");
    let status = completed(&b);
    assert_eq!(status.snapshots.len(), if multi { 4 } else { 2 });
    let cut = status.cut.clone().expect("status.cut");
    let grouped = spec_groups == Some("Always");
    assert_eq!(
        cut.method == CutMethod::VolumeGroupSnapshot,
        grouped,
        "{cut:?}"
    );
    let group = cut.volume_group_snapshot.filter(|_| grouped);
    if let Some(group) = &group {
        assert_group_members(&cluster, &b, group).await;
    }
    let expected =
        proof::committed_before(&written, verify::status_lsn(status.stop_lsn.as_deref()));

    let t0 = Instant::now();
    let r = restore(
        &cluster,
        &format!("r{major}"),
        json!({"backupName": b.name_any(), "claims": claims_for(&b, "r")}),
    )
    .await;
    let restore_took = t0.elapsed();
    let rs = assert_restored(&r);
    assert_eq!(rs.claims.len(), status.snapshots.len() - 1);
    // The claim of the backup's WAL goes once the prepare Job has ended (its pod no longer
    // runs, so nothing holds it).
    let wal_claim = pgsnap::restore::plan::backup_wal_claim_name(&r.name_any());
    let pvcs = cluster.api::<PersistentVolumeClaim>();
    if let Some(left) = pvcs.get_opt(&wal_claim).await.unwrap() {
        let uid = left.uid().unwrap();
        cluster
            .wait_deleted(pvcs, &wal_claim, &uid, Duration::from_secs(30))
            .await;
    }
    operator
        .expect_metrics(&[r#"pgsnap_restores_total{result="Completed",reason="Completed"} 1"#])
        .await;
    let timings = rs.timings.clone().unwrap_or_default();
    let (client, recovery) = start_restored(&cluster, &db, &r, false)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {major} on the restored claims: {e}"));
    eprintln!(
        "PostgreSQL {major}{}: Restore took {:.1}s (provisioning {}s, prepare {}s); recovery {:.1}s",
        if multi { " (data+WAL+tablespace)" } else { "" },
        restore_took.as_secs_f64(),
        timings.provisioning_seconds.as_deref().unwrap_or("?"),
        timings.prepare_seconds.as_deref().unwrap_or("?"),
        recovery.as_secs_f64()
    );
    let restored = proof::restored_marks(&client).await.expect("marks");
    let missing = proof::missing(&expected, &restored);
    assert!(
        missing.is_empty(),
        "{} of {} rows committed before the stop are missing: {:?}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(20)]
    );
    if multi {
        let n: i64 = client
            .query_one("SELECT count(*) FROM in_ts", &[])
            .await
            .expect("in_ts")
            .get(0);
        assert_eq!(n, 1000, "rows in the restored tablespace");
    }
    // Deleting the Restore leaves the restored claims: they are the database.
    cluster
        .api::<Restore>()
        .delete(&r.name_any(), &DeleteParams::default())
        .await
        .expect("delete restore");
    cluster
        .wait_deleted(
            cluster.api::<Restore>(),
            &r.name_any(),
            &r.uid().unwrap(),
            Duration::from_secs(30),
        )
        .await;
    for c in &rs.claims {
        assert!(
            cluster
                .api::<PersistentVolumeClaim>()
                .get_opt(&c.name)
                .await
                .unwrap()
                .is_some(),
            "claim {} was deleted with the Restore",
            c.name
        );
    }
    if let Some(group) = group {
        // The group goes with its Backup (deletionPolicy Delete), and its members with it.
        let backups = cluster.api::<Backup>();
        backups
            .delete(&b.name_any(), &DeleteParams::default())
            .await
            .expect("delete backup");
        let uid = b.uid().unwrap();
        cluster
            .wait_deleted(backups, &b.name_any(), &uid, Duration::from_secs(60))
            .await;
        // The snapshot controller deletes the group, then its members, once their finalizers
        // are done.
        let patience = Duration::from_secs(60);
        let groups = group_snapshots(&cluster);
        let group_uid = groups.get(&group).await.ok().and_then(|g| g.metadata.uid);
        if let Some(uid) = group_uid {
            cluster.wait_deleted(groups, &group, &uid, patience).await;
        }
        let snapshots = cluster.api::<VolumeSnapshot>();
        for s in &status.snapshots {
            if let Some(left) = snapshots.get_opt(&s.name).await.unwrap() {
                let uid = left.uid().unwrap();
                cluster
                    .wait_deleted(snapshots.clone(), &s.name, &uid, patience)
                    .await;
            }
        }
        // And the storage's side: no content of this namespace's snapshots or group is left.
        let ns = cluster.namespace.clone();
        let mut left = Vec::new();
        for _ in 0..150 {
            let contents = Api::<VolumeSnapshotContent>::all(cluster.client.clone());
            let groups = Api::<VolumeGroupSnapshotContent>::all(cluster.client.clone());
            left = contents
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .filter(|c| c.spec.volume_snapshot_ref.namespace.as_deref() == Some(&ns))
                .map(|c| c.name_any())
                .collect::<Vec<_>>();
            left.extend(
                groups
                    .list(&ListParams::default())
                    .await
                    .unwrap()
                    .items
                    .into_iter()
                    .filter(|c| c.spec.volume_group_snapshot_ref.namespace.as_deref() == Some(&ns))
                    .map(|c| c.name_any()),
            );
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(left.is_empty(), "contents outlived the Backup: {left:?}");
    }
}

/// A backup cut as one group: its snapshots of the data, WAL and tablespace volumes are the
/// group's members (owned by it, cut at its instant), taken on with the backup's labels; the
/// WAL snapshot, cut after backup mode, is not one of them.
async fn assert_group_members(cluster: &Cluster, b: &Backup, group: &str) {
    let status = b.status.as_ref().unwrap();
    let g = group_snapshots(cluster)
        .get(group)
        .await
        .expect("the backup's group");
    assert_eq!(g.labels()["pgsnap.io/backup-uid"], b.uid().unwrap());
    let cut_at = g.data["status"]["creationTime"]
        .as_str()
        .expect("the group's cut")
        .to_string();
    let snapshots = cluster.api::<VolumeSnapshot>();
    for s in &status.snapshots {
        let v = snapshots.get(&s.name).await.expect("snapshot");
        let in_group = v
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == g.metadata.uid.as_ref());
        assert_eq!(
            in_group,
            s.role != VolumeRole::BackupWal,
            "{} in the group",
            s.name
        );
        assert_eq!(v.labels()["pgsnap.io/backup-uid"], b.uid().unwrap());
        if in_group {
            assert_eq!(
                s.cut_at.as_ref().map(|t| t.0.to_string()),
                Some(cut_at.clone()),
                "{} was cut at the group's instant",
                s.name
            );
        }
    }
    let claims = cluster.api::<PersistentVolumeClaim>();
    let labelled = claims
        .list(&ListParams::default().labels("pgsnap.io/group-snapshot"))
        .await
        .unwrap();
    assert!(
        labelled.items.is_empty(),
        "claims keep the group's label: {:?}",
        labelled
            .items
            .iter()
            .map(|c| c.name_any())
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn restore_recovers_every_committed_row_on_postgres_12() {
    round_trip(12, false, json!({})).await;
}

#[tokio::test]
async fn restore_of_data_wal_and_tablespace_volumes_on_postgres_15() {
    round_trip(15, true, json!({})).await;
}

#[tokio::test]
async fn restore_of_data_wal_and_tablespace_volumes_cut_as_one_group_on_postgres_17() {
    let group =
        json!({"groupSnapshot": "Always", "volumeGroupSnapshotClassName": "csi-hostpath-group"});
    round_trip(17, true, group).await;
}

#[tokio::test]
async fn restore_recovers_every_committed_row_on_postgres_18() {
    round_trip(18, false, json!({})).await;
}

/// Refusals end Failed with a reason and leave no prepared data volume; a retained snapshot
/// whose Backup is gone restores; a time target stops where asked.
#[tokio::test]
async fn refusals_retained_snapshots_and_a_time_target() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(16).archive_volume().create(&cluster).await;
    let archive = format!("cp {ARCHIVE_MOUNT}/%f %p");
    db.sql("CREATE TABLE marks (v bigint PRIMARY KEY)").await;
    db.sql("INSERT INTO marks SELECT generate_series(1, 100)")
        .await;
    let b = backup(&cluster, &db, "b1", json!({"deletionPolicy": "Retain"})).await;
    let status = completed(&b).clone();
    let data_snapshot = status.snapshots[0].name.clone();
    let cm_name = status.label_config_map.clone().unwrap();
    let cms = cluster.api::<ConfigMap>();
    let cm = cms.get(&cm_name).await.expect("label ConfigMap");

    // An unknown Backup; a Backup that did not complete; another namespace.
    let r = restore(
        &cluster,
        "unknown",
        json!({"backupName": "nope", "claims": [{"role": "Data", "name": "d-unknown"}]}),
    )
    .await;
    failed_with(&r, &["BackupNotFound"]);
    let bad = backup(
        &cluster,
        &db,
        "b-bad",
        json!({"target": {"podName": "no-such-pod"}}),
    )
    .await;
    assert_eq!(
        bad.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Failed)
    );
    let r = restore(
        &cluster,
        "not-completed",
        json!({"backupName": "b-bad", "claims": [{"role": "Data", "name": "d-nc"}]}),
    )
    .await;
    failed_with(&r, &["BackupNotCompleted"]);
    let r = restore(&cluster, "elsewhere", json!({"backupName": "b1", "sourceNamespace": "elsewhere", "claims": [{"role": "Data", "name": "d-x"}]})).await;
    failed_with(&r, &["CrossNamespaceUnsupported"]);

    // A tampered label ConfigMap: refused before any PVC exists.
    let mut tampered = ConfigMap {
        metadata: ObjectMeta {
            name: Some("b1-tampered".into()),
            annotations: Some(cm.annotations().clone()),
            ..Default::default()
        },
        data: cm.data.clone(),
        ..Default::default()
    };
    let label = tampered
        .data
        .as_mut()
        .unwrap()
        .get_mut("backup_label")
        .unwrap();
    *label = label.replacen("LABEL: ", "LABEL: tampered ", 1);
    cms.create(&PostParams::default(), &tampered)
        .await
        .expect("tampered ConfigMap");
    let r = restore(&cluster, "tampered", json!({"volumeSnapshotName": data_snapshot, "labelConfigMapName": "b1-tampered", "claims": [{"role": "Data", "name": "d-tampered"}], "recovery": {"restoreCommand": archive}})).await;
    failed_with(&r, &["LabelChecksumMismatch"]);
    assert!(
        cluster
            .api::<PersistentVolumeClaim>()
            .get_opt("d-tampered")
            .await
            .unwrap()
            .is_none()
    );

    // A label of another database (consistent in itself) on this database's snapshot:
    // restore-prepare finds another system identifier in pg_control and refuses.
    let other = postgres_pod(16)
        .name("other")
        .archive_volume()
        .create(&cluster)
        .await;
    let b2 = backup(&cluster, &other, "b2", json!({})).await;
    let cm2 = cms
        .get(completed(&b2).label_config_map.as_deref().unwrap())
        .await
        .expect("b2 label");
    let mut ann = cm2.annotations().clone();
    ann.insert(
        "pgsnap.io/volumes".into(),
        cm.annotations()["pgsnap.io/volumes"].clone(),
    );
    let foreign = ConfigMap {
        metadata: ObjectMeta {
            name: Some("b1-foreign".into()),
            annotations: Some(ann),
            ..Default::default()
        },
        data: cm2.data.clone(),
        ..Default::default()
    };
    cms.create(&PostParams::default(), &foreign)
        .await
        .expect("foreign ConfigMap");
    let r = restore(&cluster, "foreign", json!({"volumeSnapshotName": data_snapshot, "labelConfigMapName": "b1-foreign", "claims": [{"role": "Data", "name": "d-foreign"}], "recovery": {"restoreCommand": archive}})).await;
    // The reason travels in the container's termination message, which the node reports.
    failed_with(&r, &["SystemIdentifierMismatch"]);
    let error = r.status.as_ref().and_then(|s| s.error.clone()).unwrap();
    eprintln!(
        "label of another database: {}: {}",
        error.reason, error.message
    );
    let pgdata = cluster
        .pvc_host_dir("d-foreign")
        .await
        .join(&status.snapshots[0].path_in_volume);
    assert!(
        pgdata.join("PG_VERSION").exists(),
        "the restored volume holds the data directory"
    );
    for f in ["backup_label", "recovery.signal", "pgsnap-restore.done"] {
        assert!(
            !pgdata.join(f).exists(),
            "a refused restore left {f} in the data volume"
        );
    }

    // The retained snapshot after its Backup is gone, with a time target: rows committed
    // before the target are there, rows after it are not.
    let t: String = db
        .sql_value("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    db.sql("INSERT INTO marks SELECT generate_series(1001, 1010)")
        .await;
    // The commit after the target must reach the archive, or recovery never sees it.
    let segment = db
        .sql_value("SELECT pg_walfile_name(pg_switch_wal())")
        .await;
    let t0 = Instant::now();
    while db
        .sql_value("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
        .await
        < segment
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "segment {segment} not archived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster
        .api::<Backup>()
        .delete("b1", &DeleteParams::default())
        .await
        .expect("delete backup");
    cluster
        .wait_deleted(
            cluster.api::<Backup>(),
            "b1",
            &b.uid().unwrap(),
            Duration::from_secs(30),
        )
        .await;
    // A new Backup of the same name: the retained snapshots and label are not its own, so it
    // fails before backup mode, and deleting it (deletionPolicy Delete) takes none of them.
    let again = backup(&cluster, &db, "b1", json!({})).await;
    let error = again.status.as_ref().and_then(|s| s.error.clone());
    let error = error.expect("the new b1 fails and says why");
    assert_eq!(error.reason, "NameConflict", "{}", error.message);
    assert!(
        again.status.as_ref().is_some_and(|s| s.start_lsn.is_none()),
        "the new b1 never entered backup mode"
    );
    cluster
        .api::<Backup>()
        .delete("b1", &DeleteParams::default())
        .await
        .expect("delete the new b1");
    cluster
        .wait_deleted(
            cluster.api::<Backup>(),
            "b1",
            &again.uid().unwrap(),
            Duration::from_secs(30),
        )
        .await;
    for s in &status.snapshots {
        let snapshots = cluster.api::<pgsnap::api::snapshot::VolumeSnapshot>();
        assert!(
            snapshots.get_opt(&s.name).await.unwrap().is_some(),
            "the retained snapshot {} survived the new b1",
            s.name
        );
    }
    assert!(cms.get_opt(&cm_name).await.unwrap().is_some());

    let r = restore(
        &cluster,
        "retained",
        json!({"volumeSnapshotName": data_snapshot, "labelConfigMapName": cm_name, "claims": [{"role": "Data", "name": "d-retained"}],
               "recovery": {"restoreCommand": archive, "target": {"time": t}}}),
    )
    .await;
    assert_restored(&r);
    let (client, _) = start_restored(&cluster, &db, &r, true)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL on the retained snapshot: {e}"));
    let rows = proof::restored_marks(&client).await.expect("marks");
    assert_eq!(
        rows,
        (1..=100).collect::<BTreeSet<i64>>(),
        "a time target before rows 1001..1010"
    );
}

/// The documented initContainer form: the user restores a PVC from the snapshot and the pod
/// prepares its own data directory before PostgreSQL starts; on the next start of the pod
/// the marker makes restore-prepare change nothing, and the recovered database is intact.
#[tokio::test]
async fn restore_prepare_as_an_init_container() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(17).archive_volume().create(&cluster).await;
    db.sql("CREATE TABLE marks (v bigint PRIMARY KEY)").await;
    db.sql("INSERT INTO marks SELECT generate_series(1, 50)")
        .await;
    let b = backup(&cluster, &db, "b17", json!({})).await;
    let status = completed(&b).clone();
    let snap = &status.snapshots[0];
    let cm = cluster
        .api::<ConfigMap>()
        .get(status.label_config_map.as_deref().unwrap())
        .await
        .expect("label");
    let ann = cm.annotations();
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "data-init"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": snap.restore_size.clone().unwrap_or_else(|| "1Gi".into())}},
            "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": snap.name},
        }
    }))
    .unwrap();
    cluster
        .api::<PersistentVolumeClaim>()
        .create(&PostParams::default(), &pvc)
        .await
        .expect("pvc");
    let pod = || -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "init-restored"},
            "spec": {
                "securityContext": {"runAsUser": POSTGRES_UID, "runAsGroup": POSTGRES_UID, "fsGroup": POSTGRES_UID},
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 5,
                "initContainers": [{
                    "name": "restore-prepare",
                    "image": "pgsnap:dev",
                    "args": [
                        "restore-prepare",
                        "--data-dir=/var/lib/postgresql/data/pgdata",
                        "--label-dir=/pgsnap/label",
                        format!("--backup-label-sha256={}", ann["pgsnap.io/backup-label-sha256"]),
                        format!("--tablespace-map-sha256={}", ann["pgsnap.io/tablespace-map-sha256"]),
                        format!("--system-identifier={}", ann["pgsnap.io/system-identifier"]),
                        format!("--stop-lsn={}", ann["pgsnap.io/stop-lsn"]),
                        format!("--restore-command=cp {ARCHIVE_MOUNT}/%f %p"),
                    ],
                    "volumeMounts": [
                        {"name": "data", "mountPath": "/var/lib/postgresql/data"},
                        {"name": "label", "mountPath": "/pgsnap/label", "readOnly": true},
                    ],
                }],
                "containers": [{
                    "name": "postgres",
                    "image": "postgres:17",
                    "args": ["-c", "archive_mode=off"],
                    "env": [
                        {"name": "POSTGRES_PASSWORD", "value": db.password},
                        {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
                    ],
                    "volumeMounts": [
                        {"name": "data", "mountPath": "/var/lib/postgresql/data"},
                        {"name": "archive", "mountPath": ARCHIVE_MOUNT},
                    ],
                }],
                "volumes": [
                    {"name": "data", "persistentVolumeClaim": {"claimName": "data-init"}},
                    {"name": "label", "configMap": {"name": cm.name_any()}},
                    {"name": "archive", "persistentVolumeClaim": {"claimName": db.claim("archive")}},
                ],
            }
        }))
        .unwrap()
    };
    let (client, _) = verify::serve_restored(&cluster, &db, &pod())
        .await
        .unwrap_or_else(|e| panic!("first start: {e}"));
    assert_eq!(
        proof::restored_marks(&client).await.expect("marks"),
        (1..=50).collect::<BTreeSet<i64>>()
    );
    client
        .batch_execute("INSERT INTO marks SELECT generate_series(51, 60)")
        .await
        .expect("write to the restored database");
    let log = cluster
        .container_log("init-restored", "restore-prepare")
        .await;
    assert!(
        log.contains("prepared /var/lib/postgresql/data/pgdata for recovery"),
        "{log}"
    );
    drop(client);

    // The pod again: the label must not come back over the recovered, written-to database.
    let uid = cluster
        .api::<Pod>()
        .get("init-restored")
        .await
        .unwrap()
        .uid()
        .unwrap();
    cluster
        .api::<Pod>()
        .delete("init-restored", &DeleteParams::default())
        .await
        .expect("delete pod");
    cluster
        .wait_deleted(
            cluster.api::<Pod>(),
            "init-restored",
            &uid,
            Duration::from_secs(60),
        )
        .await;
    let (client, _) = verify::serve_restored(&cluster, &db, &pod())
        .await
        .unwrap_or_else(|e| panic!("second start: {e}"));
    assert_eq!(
        proof::restored_marks(&client).await.expect("marks"),
        (1..=60).collect::<BTreeSet<i64>>(),
        "rows written after the restore survive a restart"
    );
    let log = cluster
        .container_log("init-restored", "restore-prepare")
        .await;
    assert!(log.contains("nothing changed"), "{log}");
}

/// The CRD's own validation: `kubectl apply` refuses a bad Restore before any controller sees it.
#[tokio::test]
async fn invalid_restores_are_refused_by_the_api_server() {
    let cluster = Cluster::from_env().await;
    pgsnap_e2e::operator::install_chart_rbac();
    let data = json!([{"role": "Data", "name": "d"}]);
    let cases = [
        (json!({"claims": data}), "set exactly one source"),
        (
            json!({"backupName": "b", "volumeSnapshotName": "s", "labelConfigMapName": "c", "claims": data}),
            "set exactly one source",
        ),
        (
            json!({"volumeSnapshotName": "s", "claims": data}),
            "go together",
        ),
        (
            json!({"backupName": "b", "claims": [{"role": "Wal", "name": "w"}]}),
            "role Data is required",
        ),
        (
            json!({"backupName": "b", "claims": [{"role": "Data", "name": "d"}, {"role": "Data", "name": "e"}]}),
            "one claim per role",
        ),
        (
            json!({"backupName": "b", "claims": [{"role": "Tablespace", "name": "d"}, {"role": "Data", "name": "e"}]}),
            "tablespace names the tablespace",
        ),
        (
            json!({"backupName": "b", "claims": data, "recovery": {"target": {"time": "yesterday"}}}),
            "RFC 3339",
        ),
        (
            json!({"backupName": "b", "claims": data, "recovery": {"target": {"time": "2026-11-21T10:00:00Z", "lsn": "0/1"}}}),
            "at most one of time and lsn",
        ),
        (
            json!({"backupName": "b", "claims": data, "recovery": {"restoreCommand": "cp a b\nrecovery_target = 'x'"}}),
            "one non-empty line",
        ),
    ];
    for (i, (spec, message)) in cases.into_iter().enumerate() {
        let r: Restore = serde_json::from_value(json!({"apiVersion": "pgsnap.io/v1alpha1", "kind": "Restore", "metadata": {"name": format!("bad-{i}")}, "spec": spec})).unwrap();
        match cluster
            .api::<Restore>()
            .create(&PostParams::default(), &r)
            .await
        {
            Err(kube::Error::Api(s)) => assert!(
                s.code == 422 && s.message.contains(message),
                "case {i}: {}",
                s.message
            ),
            other => panic!("case {i} ({message}) was accepted: {other:?}"),
        }
    }
    // And the spec is immutable.
    let ok: Restore = serde_json::from_value(json!({"apiVersion": "pgsnap.io/v1alpha1", "kind": "Restore", "metadata": {"name": "good"}, "spec": {"backupName": "b", "claims": data}})).unwrap();
    let mut created = cluster
        .api::<Restore>()
        .create(&PostParams::default(), &ok)
        .await
        .expect("a valid Restore");
    created.spec.backup_name = Some("other".into());
    match cluster
        .api::<Restore>()
        .replace("good", &PostParams::default(), &created)
        .await
    {
        Err(kube::Error::Api(s)) => assert!(s.message.contains("immutable"), "{}", s.message),
        other => panic!("the spec changed: {other:?}"),
    }
}

/// `claimDeletionPolicy: Delete` (restore drills): the claims go with the Restore.
#[tokio::test]
async fn claims_owned_by_the_restore_go_with_it() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(16).archive_volume().create(&cluster).await;
    let b = backup(&cluster, &db, "b16", json!({})).await;
    completed(&b);
    let r = restore(
        &cluster,
        "drill",
        json!({"backupName": "b16", "claims": claims_for(&b, "drill"), "claimDeletionPolicy": "Delete",
               "recovery": {"restoreCommand": format!("cp {ARCHIVE_MOUNT}/%f %p")}}),
    )
    .await;
    let claims = assert_restored(&r).claims.clone();
    let mut owned = Vec::new();
    for c in &claims {
        let pvc = cluster
            .api::<PersistentVolumeClaim>()
            .get(&c.name)
            .await
            .expect("claim");
        assert_eq!(pvc.owner_references()[0].uid, r.uid().unwrap());
        owned.push((c.name.clone(), pvc.uid().unwrap()));
    }
    cluster
        .api::<Restore>()
        .delete("drill", &DeleteParams::default())
        .await
        .expect("delete restore");
    for (name, uid) in owned {
        cluster
            .wait_deleted(
                cluster.api::<PersistentVolumeClaim>(),
                &name,
                &uid,
                Duration::from_secs(60),
            )
            .await;
    }
}

/// The reconciler is level-based: an operator killed mid-restore leaves nothing a new one
/// cannot finish, and nothing is made twice.
#[tokio::test]
async fn a_restore_resumes_after_the_operator_dies() {
    let cluster = Cluster::from_env().await;
    let mut first = Operator::for_test(&cluster).await;
    let db = postgres_pod(14).archive_volume().create(&cluster).await;
    db.sql("CREATE TABLE marks (v bigint PRIMARY KEY)").await;
    db.sql("INSERT INTO marks SELECT generate_series(1, 30)")
        .await;
    // The archive's WAL: the prepare Job then stays (with the backup's own WAL it goes with
    // the temporary claim), and can be counted.
    let b = backup(&cluster, &db, "b14", json!({"walSource": "Archive"})).await;
    completed(&b);
    let r: Restore = serde_json::from_value(json!({"apiVersion": "pgsnap.io/v1alpha1", "kind": "Restore", "metadata": {"name": "resumed"},
        "spec": {"backupName": "b14", "claims": claims_for(&b, "resumed"), "recovery": {"restoreCommand": format!("cp {ARCHIVE_MOUNT}/%f %p")}}}))
    .unwrap();
    cluster
        .api::<Restore>()
        .create(&PostParams::default(), &r)
        .await
        .expect("restore");
    let midway = |r: Option<&Restore>| {
        r.and_then(|r| r.status.as_ref())
            .and_then(|s| s.phase)
            .is_some_and(|p| matches!(p, RestorePhase::Provisioning | RestorePhase::Preparing))
    };
    cluster
        .wait_for(
            cluster.api::<Restore>(),
            "resumed",
            "Provisioning or Preparing",
            Duration::from_secs(60),
            midway,
        )
        .await;
    first.kill();
    let _second = Operator::for_test(&cluster).await;
    let r = cluster
        .wait_for(
            cluster.api::<Restore>(),
            "resumed",
            "Completed or Failed",
            Duration::from_secs(120),
            restore_ended(),
        )
        .await;
    assert_restored(&r);
    let jobs = cluster
        .api::<k8s_openapi::api::batch::v1::Job>()
        .list(&kube::api::ListParams::default().labels("pgsnap.io/restore=resumed"))
        .await
        .expect("jobs");
    assert_eq!(jobs.items.len(), 1, "one prepare Job");
    let (client, _) = start_restored(&cluster, &db, &r, true)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL on the resumed restore: {e}"));
    assert_eq!(
        proof::restored_marks(&client).await.expect("marks"),
        (1..=30).collect::<BTreeSet<i64>>()
    );
}

/// The longest names the API server accepts: every name and label pgsnap derives from them
/// stays valid, the backup completes and restores, and both objects delete without hanging.
#[tokio::test]
async fn the_longest_names_back_up_restore_and_delete() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(16).archive_volume().create(&cluster).await;
    db.sql("CREATE TABLE marks (v bigint PRIMARY KEY)").await;
    db.sql("INSERT INTO marks SELECT generate_series(1, 50)")
        .await;
    let backup_name = format!("b{}", "x".repeat(252));
    let b = backup(&cluster, &db, &backup_name, json!({})).await;
    let status = completed(&b).clone();
    assert!(
        status
            .label_config_map
            .as_ref()
            .is_some_and(|n| n.len() <= 253)
    );
    let restore_name = format!("r{}", "y".repeat(252));
    let r = restore(
        &cluster,
        &restore_name,
        json!({"backupName": backup_name, "claims": claims_for(&b, "long"),
               "recovery": {"restoreCommand": format!("cp {ARCHIVE_MOUNT}/%f %p")}}),
    )
    .await;
    assert_restored(&r);
    let (client, _) = start_restored(&cluster, &db, &r, true)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL on the restored claims: {e}"));
    assert_eq!(
        proof::restored_marks(&client).await.expect("marks"),
        (1..=50).collect::<BTreeSet<i64>>()
    );

    cluster
        .api::<Restore>()
        .delete(&restore_name, &DeleteParams::default())
        .await
        .expect("delete the restore");
    cluster
        .wait_deleted(
            cluster.api::<Restore>(),
            &restore_name,
            &r.uid().unwrap(),
            Duration::from_secs(30),
        )
        .await;
    cluster
        .api::<Backup>()
        .delete(&backup_name, &DeleteParams::default())
        .await
        .expect("delete the backup");
    cluster
        .wait_deleted(
            cluster.api::<Backup>(),
            &backup_name,
            &b.uid().unwrap(),
            Duration::from_secs(30),
        )
        .await;
    // The snapshot controller releases a deleted snapshot a moment after the operator acts.
    let snapshots = cluster.api::<pgsnap::api::snapshot::VolumeSnapshot>();
    for s in &status.snapshots {
        let t0 = Instant::now();
        while snapshots.get_opt(&s.name).await.unwrap().is_some() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "snapshot {} outlived its Backup (deletionPolicy Delete)",
                s.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
