//! The Backup controller end to end: a real API server and CSI snapshot stack, PostgreSQL
//! pods, and the operator running with only the Helm chart's RBAC.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, DynamicObject, ListParams, PostParams};
use kube::{Api, ResourceExt};
use pgsnap::api::Backup;
use pgsnap::api::backup::{CutMethod, CutStatus, Phase, VolumeRole, WalSource};
use pgsnap::api::snapshot::VolumeSnapshot;
use pgsnap::postgres::SERVER_GRACE;
use pgsnap_e2e::backups::{
    apply, backup_spec, delete_snapshot_class, group_snapshot_classes, group_snapshots, on,
    snapshot_class, snapshot_classes, wait_phase, wait_terminal,
};
use pgsnap_e2e::operator::{Operator, operator_may};
use pgsnap_e2e::postgres::{POSTGRES_UID, REFLINK_CLASS, password_secret, secret};
use pgsnap_e2e::proof;
use pgsnap_e2e::tls::TestCa;
use pgsnap_e2e::verify::{self, Prepare, Writer};
use pgsnap_e2e::{Cluster, PostgresPod, postgres_pod};
use serde_json::json;

/// The status of each condition GitOps tools read (kstatus): Ready, Reconciling, Stalled.
fn conditions(backup: &Backup) -> [String; 3] {
    let status = backup.status.as_ref().expect("status");
    ["Ready", "Reconciling", "Stalled"].map(|t| {
        let c = status.conditions.iter().find(|c| c.type_ == t);
        c.map(|c| c.status.clone())
            .unwrap_or_else(|| panic!("no {t} condition"))
    })
}

fn assert_completed(backup: &Backup) {
    let status = backup.status.as_ref().expect("status");
    assert_eq!(
        status.phase,
        Some(Phase::Completed),
        "backup {} did not complete: {:?}",
        backup.name_any(),
        status.error
    );
    assert_eq!(conditions(backup), ["True", "False", "False"]);
    assert!(
        status
            .snapshots
            .iter()
            .all(|s| s.ready_to_use && s.cut_at.is_some()),
        "{:#?}",
        status.snapshots
    );
}

/// Each snapshot's role and claim, in order.
fn snapshot_roles(backup: &Backup) -> Vec<(VolumeRole, String)> {
    let status = backup.status.as_ref().expect("status");
    let mut roles: Vec<_> = status
        .snapshots
        .iter()
        .map(|s| (s.role, s.persistent_volume_claim.clone()))
        .collect();
    roles.sort();
    roles
}

/// The backup restores (through restore-prepare) with every row `written` committed by its
/// stop.
async fn assert_restores_every_row(
    cluster: &Cluster,
    db: &PostgresPod,
    backup: &Backup,
    written: &[(i64, pgsnap::postgres::Lsn)],
) {
    let stop = backup.status.as_ref().and_then(|s| s.stop_lsn.as_deref());
    let expected = proof::committed_before(written, verify::status_lsn(stop));
    let restored = verify::restore(cluster, db, backup, Prepare::Correct)
        .await
        .unwrap_or_else(|e| panic!("restore failed: {e}"));
    assert!(proof::missing(&expected, &restored).is_empty());
}

fn assert_failed(backup: &Backup, reason: &str) {
    let status = backup.status.as_ref().expect("status");
    assert_eq!(
        status.phase,
        Some(Phase::Failed),
        "backup {}: {status:#?}",
        backup.name_any()
    );
    let error = status.error.as_ref().expect("a failed backup says why");
    assert_eq!(error.reason, reason, "{error:#?}");
    assert_eq!(
        conditions(backup),
        ["False", "False", "True"],
        "Stalled: failed for good"
    );
}

/// After any backup: no session of pgsnap left on the server, no snapshot of a failed backup.
async fn assert_clean(cluster: &Cluster, db: &PostgresPod, backup: &str, expect_snapshots: bool) {
    // The server ends an aborted session, and the snapshot controller releases a deleted
    // snapshot's finalizer, a moment after the operator has acted; a snapshot still being cut
    // goes once the snapshot controllers report the cut, which under the whole suite's load
    // took up to half a minute after the driver's, csi-snapshotter throttling itself at
    // client-go's default 5 requests/s (it has no flag to raise it); then its deletion's turn.
    let (mut sessions, mut snapshots) = (String::new(), Vec::new());
    for _ in 0..600 {
        sessions = db
            .sql_value("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgsnap'")
            .await;
        snapshots = cluster
            .api::<VolumeSnapshot>()
            .list(&ListParams::default().labels(&format!("pgsnap.io/backup={backup}")))
            .await
            .expect("list")
            .items
            .iter()
            .map(|s| s.name_any())
            .collect();
        if sessions == "0" && snapshots.is_empty() != expect_snapshots {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        sessions, "0",
        "a pgsnap session is still open on {}",
        db.name
    );
    assert_eq!(
        !snapshots.is_empty(),
        expect_snapshots,
        "snapshots of {backup}: {snapshots:?}"
    );
}

/// Waits (10 s at most) until the object `name` has an Event of each reason: the operator
/// publishes it just after the status write a test waits on.
async fn expect_events(cluster: &Cluster, name: &str, reasons: &[&str]) {
    let events: Api<k8s_openapi::api::events::v1::Event> = cluster.api();
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen = events
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .filter_map(|e| e.reason)
            .collect::<Vec<_>>();
        if reasons.iter().all(|r| seen.iter().any(|s| s == r)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{name}: expected Events {reasons:?}, saw {seen:?}");
}

/// pgbench and a row writer run throughout; the backup completes; its snapshots restore to a
/// server holding every row committed before the stop. Without backup_label the same
/// restore loses rows: the check can fail.
async fn happy_path(major: u32, negative_control: bool) {
    let cluster = Cluster::from_env().await;
    let operator = Operator::for_test(&cluster).await;
    // The most common server in Kubernetes: no WAL archive. The backup keeps its own WAL.
    let db = postgres_pod(major).no_archive().create(&cluster).await;
    db.pgbench_init(1);
    let secret = db.password_secret(&cluster).await;
    let writer = Writer::start(&db).await;
    let load = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || db.pgbench_run(8))
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let name = apply(
        &cluster,
        backup_spec(
            &format!("b{major}"),
            on(
                &db,
                &secret,
                json!({
                    "checkpoint": "Fast",
                }),
            ),
        ),
    )
    .await;
    let backup = wait_terminal(&cluster, &name).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written = writer.finish().await;
    load.await.expect("pgbench");
    assert_completed(&backup);
    assert_clean(&cluster, &db, &name, true).await;

    let status = backup.status.clone().unwrap();
    assert_eq!(
        snapshot_roles(&backup),
        [
            (VolumeRole::Data, db.claim("data")),
            (VolumeRole::BackupWal, db.claim("data"))
        ]
    );
    assert_eq!(status.snapshots[0].path_in_volume, "pgdata");
    assert_eq!(status.snapshots[1].path_in_volume, "pgdata/pg_wal");
    assert_eq!(status.wal_source, Some(WalSource::Snapshot));
    let postgres = status.postgres.clone().unwrap();
    assert!(postgres.version.unwrap().starts_with(&major.to_string()));
    let cm = cluster
        .api::<ConfigMap>()
        .get(status.label_config_map.as_deref().unwrap())
        .await
        .expect("label ConfigMap");
    let label = &cm.data.as_ref().unwrap()["backup_label"];
    assert!(
        label.contains("START WAL LOCATION")
            && label.contains(&format!("LABEL: pgsnap {}/{name}", cluster.namespace)),
        "{label}"
    );
    assert_eq!(cm.owner_references()[0].name, status.snapshots[0].name);
    assert_eq!(
        cm.annotations()["pgsnap.io/backup-label-sha256"],
        pgsnap::label_store::sha256_hex(label.as_bytes())
    );
    let wal: pgsnap::label_store::WalRecord =
        serde_json::from_str(&cm.annotations()["pgsnap.io/wal"]).expect("the kept WAL");
    assert_eq!(
        (wal.volume_snapshot.as_str(), wal.first_segment.as_str()),
        (
            status.snapshots[1].name.as_str(),
            status.start_wal.as_deref().unwrap()
        )
    );
    assert_eq!(Some(wal.last_segment.as_str()), status.stop_wal.as_deref());
    assert_eq!(wal.checked_by, "pg_ls_waldir");
    expect_events(
        &cluster,
        &name,
        &["Starting", "BackupModeEnded", "Completed"],
    )
    .await;
    operator
        .expect_metrics(&[
            r#"pgsnap_backups_total{result="Completed",reason="Completed"} 1"#,
            r#"pgsnap_backup_step_seconds_count{step="Cut"} 1"#,
            r#"pgsnap_backup_step_seconds_count{step="WalSnapshot"} 1"#,
            "pgsnap_backup_mode_seconds_count 1",
            "pgsnap_backups_in_flight 0",
        ])
        .await;

    let stop_lsn = verify::status_lsn(status.stop_lsn.as_deref());
    let start_lsn = verify::status_lsn(status.start_lsn.as_deref());
    let expected = proof::committed_before(&written, stop_lsn);
    let during = written
        .iter()
        .filter(|(_, lsn)| *lsn > start_lsn && *lsn <= stop_lsn)
        .count();
    assert!(
        during > 0,
        "no row was committed in backup mode: the restore check would prove little"
    );
    let restored = verify::restore(&cluster, &db, &backup, Prepare::Correct)
        .await
        .unwrap_or_else(|e| panic!("restore failed: {e}"));
    let missing = proof::missing(&expected, &restored);
    assert!(
        missing.is_empty(),
        "{} of {} rows committed before the stop are missing from the restore: {:?}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(20)]
    );

    if negative_control {
        // PostgreSQL then recovers from pg_control's checkpoint instead of the label's: it
        // comes up without an error and without rows, or, when it reads the backup's WAL to
        // its end before it counts as consistent, never reaches its target.
        match verify::restore(&cluster, &db, &backup, Prepare::WithoutLabel).await {
            Ok(rows) => assert!(
                !proof::missing(&expected, &rows).is_empty(),
                "a restore without backup_label passed the check: the check cannot fail"
            ),
            Err(e) => assert!(
                e.contains("FATAL:  recovery ended before configured recovery target was reached"),
                "a restore without backup_label failed for another reason: {e}"
            ),
        }
    }
}

#[tokio::test]
async fn backup_restores_on_postgres_12() {
    happy_path(12, false).await;
}

#[tokio::test]
async fn backup_restores_on_postgres_15_and_the_check_catches_a_missing_label() {
    happy_path(15, true).await;
}

#[tokio::test]
async fn backup_restores_on_postgres_18() {
    happy_path(18, false).await;
}

/// A copy-on-write cut (XFS reflink), the way block storage cuts: the backup restores every row
/// committed by its stop (`cargo bench -p pgsnap-e2e --bench backup_overhead -- size` shows the
/// cut's time does not grow with the database).
#[tokio::test]
async fn a_copy_on_write_cut_restores_every_row() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(17)
        .storage(REFLINK_CLASS, "1Gi")
        .archive_volume()
        .create(&cluster)
        .await;
    db.pgbench_init(1);
    let secret = db.password_secret(&cluster).await;
    let writer = Writer::start(&db).await;
    let spec = json!({"checkpoint": "Fast", "volumeSnapshotClassName": REFLINK_CLASS});
    let name = apply(&cluster, backup_spec("reflink", on(&db, &secret, spec))).await;
    let backup = wait_terminal(&cluster, &name).await;
    let written = writer.finish().await;
    assert_completed(&backup);
    assert_restores_every_row(&cluster, &db, &backup, &written).await;
}

/// Data, a WAL volume and a tablespace volume: one snapshot each, and the WAL volume's again
/// after the stop; the restore needs all three and no archive.
#[tokio::test]
async fn every_volume_of_the_database_is_snapshotted() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(16)
        .no_archive()
        .wal_volume(true)
        .tablespace_volume(true)
        .create(&cluster)
        .await;
    db.sql("CREATE TABLE spaced (v int) TABLESPACE ts1; INSERT INTO spaced SELECT generate_series(1, 1000)").await;
    let secret = db.password_secret(&cluster).await;
    let writer = Writer::start(&db).await;
    let name = apply(
        &cluster,
        backup_spec(
            "multi",
            on(
                &db,
                &secret,
                json!({
                    "checkpoint": "Fast",
                }),
            ),
        ),
    )
    .await;
    let backup = wait_terminal(&cluster, &name).await;
    let written = writer.finish().await;
    assert_completed(&backup);
    let status = backup.status.clone().unwrap();
    // The test cluster marks no group class default: groupSnapshot Auto cuts one by one, and
    // says why.
    assert_eq!(
        status.cut,
        Some(CutStatus {
            method: CutMethod::VolumeSnapshots,
            reason: Some("no VolumeGroupSnapshotClass is marked default for CSI driver hostpath.csi.k8s.io: name one in spec.volumeGroupSnapshotClassName or annotate one with groupsnapshot.storage.kubernetes.io/is-default-class=\"true\"".into()),
            ..Default::default()
        })
    );
    expect_events(&cluster, &name, &["OneSnapshotPerVolume"]).await;
    assert_eq!(
        snapshot_roles(&backup),
        [
            (VolumeRole::Data, db.claim("data")),
            (VolumeRole::Wal, db.claim("wal")),
            (VolumeRole::Tablespace, db.claim("tablespace")),
            (VolumeRole::BackupWal, db.claim("wal"))
        ]
    );
    let cm = cluster
        .api::<ConfigMap>()
        .get(status.label_config_map.as_deref().unwrap())
        .await
        .unwrap();
    assert!(
        cm.data.as_ref().unwrap()["tablespace_map"].contains("/var/lib/postgresql/tablespace/data")
    );
    assert_restores_every_row(&cluster, &db, &backup, &written).await;
}

/// A selector with role Standby picks the streaming replica and backs it up with
/// `walSource: Archive`; the label says so. A standby that cannot archive its WAL itself is
/// refused that. With `walSource: Snapshot` the standby keeps its own WAL, proven by its WAL
/// receiver as well as its listing.
#[tokio::test]
async fn a_standby_is_chosen_by_role_and_backed_up() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let primary = postgres_pod(16)
        .name("pg-a")
        .setting("wal_keep_size", "256MB")
        .create(&cluster)
        .await;
    let standby = postgres_pod(16)
        .name("pg-b")
        .standby_of(&primary)
        .create(&cluster)
        .await;
    // A standby archiving with `on` leaves its WAL to the primary, which the backup cannot
    // wait for.
    let leaves_it = postgres_pod(16)
        .name("pg-c")
        .standby_of(&primary)
        .setting("archive_mode", "on")
        .create(&cluster)
        .await;
    assert_eq!(standby.sql_value("SELECT pg_is_in_recovery()").await, "t");
    let secret = primary.password_secret(&cluster).await;
    let refused = apply(
        &cluster,
        backup_spec(
            "standby-on",
            json!({
                "target": {"podName": leaves_it.name},
                "connection": {"passwordSecretRef": {"name": secret, "key": "password"}},
                "walSource": "Archive",
            }),
        ),
    )
    .await;
    let name = apply(
        &cluster,
        backup_spec("from-standby", json!({
            "target": {"selector": {"matchLabels": {"app.kubernetes.io/name": "postgresql"}}, "role": "Standby"},
            "connection": {"passwordSecretRef": {"name": secret, "key": "password"}},
            "checkpoint": "Fast",
            "walSource": "Archive",
            "waitForArchive": false,
        })),
    )
    .await;
    // A standby keeps the WAL its receiver streamed: the backup starts at the restartpoint
    // of a checkpoint the standby streamed, not one it had before it streamed.
    let checkpoint = primary
        .sql_value("CHECKPOINT; SELECT pg_current_wal_lsn()")
        .await;
    let replayed = format!("SELECT pg_last_wal_replay_lsn() >= '{checkpoint}'");
    for _ in 0..300 {
        if standby.sql_value(&replayed).await == "t" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        standby.sql_value(&replayed).await,
        "t",
        "the standby never replayed the primary's checkpoint"
    );
    let kept = apply(
        &cluster,
        backup_spec(
            "standby-kept",
            json!({
                "target": {"podName": standby.name},
                "connection": {"passwordSecretRef": {"name": secret, "key": "password"}},
                "checkpoint": "Fast",
            }),
        ),
    )
    .await;
    let backup = wait_terminal(&cluster, &name).await;
    assert_completed(&backup);
    let status = backup.status.unwrap();
    assert_eq!(status.wal_source, Some(WalSource::Archive));
    let postgres = status.postgres.unwrap();
    assert_eq!(postgres.pod, "pg-b");
    assert_eq!(
        postgres.role,
        Some(pgsnap::api::backup::ServerRole::Standby)
    );
    let cm = cluster
        .api::<ConfigMap>()
        .get(status.label_config_map.as_deref().unwrap())
        .await
        .unwrap();
    assert!(cm.data.unwrap()["backup_label"].contains("BACKUP FROM: standby"));
    let kept = wait_terminal(&cluster, &kept).await;
    assert_completed(&kept);
    let status = kept.status.unwrap();
    assert_eq!(status.wal_source, Some(WalSource::Snapshot));
    let cm = cluster
        .api::<ConfigMap>()
        .get(status.label_config_map.as_deref().unwrap())
        .await
        .unwrap();
    let wal: pgsnap::label_store::WalRecord =
        serde_json::from_str(&cm.annotations()["pgsnap.io/wal"]).expect("the kept WAL");
    assert_eq!(wal.checked_by, "pg_ls_waldir,pg_stat_wal_receiver");
    let refused = wait_terminal(&cluster, &refused).await;
    assert_failed(&refused, "NoWalSource");
    let message = refused.status.unwrap().error.unwrap().message;
    assert!(
        message.contains("set archive_mode = always on the standby"),
        "{message}"
    );
}

/// A missing Secret keeps the Backup Pending, naming it; creating the Secret starts it.
#[tokio::test]
async fn a_missing_secret_waits_then_proceeds() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(17).create(&cluster).await;
    let name = apply(
        &cluster,
        backup_spec(
            "waits",
            on(
                &db,
                "late",
                json!({"checkpoint": "Fast", "waitForArchive": false}),
            ),
        ),
    )
    .await;
    let pending = cluster
        .wait_for(
            cluster.api::<Backup>(),
            &name,
            "Pending on its Secret",
            Duration::from_secs(30),
            |b: Option<&Backup>| {
                b.and_then(|b| b.status.as_ref())
                    .is_some_and(|s| s.conditions.iter().any(|c| c.reason == "SecretNotFound"))
            },
        )
        .await;
    let message = &pending.status.unwrap().conditions[0].message;
    assert!(
        message.contains("late") && message.contains("password"),
        "{message}"
    );
    password_secret(&cluster, "late", &db.password).await;
    assert_completed(&wait_terminal(&cluster, &name).await);
    // It found the Secret by name: the chart lets it read a named Secret, and no more.
    let ns = &cluster.namespace;
    assert!(operator_may(&cluster.client, "get", "secrets", ns).await);
    for verb in ["list", "watch"] {
        assert!(
            !operator_may(&cluster.client, verb, "secrets", ns).await,
            "the operator may {verb} every Secret"
        );
    }
}

/// Each bad target ends Failed with the session module's reason, once, with an Event.
#[tokio::test]
async fn bad_targets_fail_with_a_reason() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(15).create(&cluster).await;
    // The most common database in Kubernetes: no WAL archive.
    let plain = postgres_pod(15)
        .name("plain")
        .no_archive()
        .create(&cluster)
        .await;
    db.sql("CREATE ROLE weak LOGIN PASSWORD 'weak'").await;
    // Everything a backup in backup mode needs, but not what proves its WAL was kept.
    db.sql(
        "CREATE ROLE nolist LOGIN REPLICATION PASSWORD 'nolist'; \
         GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO nolist; \
         GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO nolist; \
         GRANT pg_read_all_settings TO nolist",
    )
    .await;
    let secret = db.password_secret(&cluster).await;
    let plain_secret = plain.password_secret(&cluster).await;
    password_secret(&cluster, "weak", "weak").await;
    // A class of a driver these volumes are not on.
    let foreign = format!("foreign-{}", cluster.namespace);
    let class: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
        "metadata": {"name": foreign}, "driver": "other.csi.example.com", "deletionPolicy": "Delete",
    }))
    .unwrap();
    snapshot_classes(&cluster)
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    let foreign_group = format!("foreign-group-{}", cluster.namespace);
    let class: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "groupsnapshot.storage.k8s.io/v1", "kind": "VolumeGroupSnapshotClass",
        "metadata": {"name": foreign_group}, "driver": "other.csi.example.com", "deletionPolicy": "Delete",
    }))
    .unwrap();
    group_snapshot_classes(&cluster)
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    // A group the storage refuses to cut.
    let failing_group = format!("failing-group-{}", cluster.namespace);
    let class: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "groupsnapshot.storage.k8s.io/v1", "kind": "VolumeGroupSnapshotClass",
        "metadata": {"name": failing_group}, "driver": "hostpath.csi.k8s.io", "deletionPolicy": "Delete",
        "parameters": {"failWith": "the storage refused the group"},
    }))
    .unwrap();
    group_snapshot_classes(&cluster)
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    password_secret(&cluster, "nolist", "nolist").await;
    password_secret(&cluster, "wrong", "not-the-password").await;
    let cases = [
        (
            "no-pod",
            json!({"target": {"podName": "nobody"}}),
            "TargetPodNotFound",
        ),
        (
            "wrong-port",
            json!({"target": {"podName": db.name}, "connection": {"port": 1, "passwordSecretRef": {"name": secret, "key": "password"}}}),
            "Unreachable",
        ),
        (
            "wrong-password",
            json!({"target": {"podName": db.name}, "connection": {"passwordSecretRef": {"name": "wrong", "key": "password"}}}),
            "AuthenticationFailed",
        ),
        (
            "no-grants",
            json!({"target": {"podName": db.name}, "connection": {"user": "weak", "passwordSecretRef": {"name": "weak", "key": "password"}}}),
            "MissingPrivilege",
        ),
        (
            "no-archive",
            json!({"target": {"podName": plain.name}, "connection": {"passwordSecretRef": {"name": plain_secret, "key": "password"}}, "walSource": "Archive"}),
            "NoWalSource",
        ),
        (
            "foreign-class",
            json!({"target": {"podName": db.name}, "connection": {"passwordSecretRef": {"name": secret, "key": "password"}}, "volumeSnapshotClassName": foreign}),
            "NoSnapshotClass",
        ),
        (
            "always-group",
            json!({"target": {"podName": db.name}, "connection": {"passwordSecretRef": {"name": secret, "key": "password"}}, "groupSnapshot": "Always"}),
            "GroupSnapshotImpossible",
        ),
        (
            "foreign-group-class",
            json!({"target": {"podName": db.name}, "connection": {"passwordSecretRef": {"name": secret, "key": "password"}}, "volumeGroupSnapshotClassName": foreign_group}),
            "NoGroupSnapshotClass",
        ),
        (
            "group-fails",
            json!({"target": {"podName": db.name}, "connection": {"passwordSecretRef": {"name": secret, "key": "password"}}, "groupSnapshot": "Always", "volumeGroupSnapshotClassName": failing_group}),
            "SnapshotFailed",
        ),
        (
            "no-wal-listing",
            json!({"target": {"podName": db.name}, "connection": {"user": "nolist", "passwordSecretRef": {"name": "nolist", "key": "password"}}}),
            "MissingPrivilege",
        ),
    ];
    for (name, spec, _) in &cases {
        apply(&cluster, backup_spec(name, spec.clone())).await;
    }
    for (name, _, reason) in &cases {
        let backup = wait_terminal(&cluster, name).await;
        assert_failed(&backup, reason);
        let message = &backup
            .status
            .as_ref()
            .unwrap()
            .error
            .as_ref()
            .unwrap()
            .message;
        assert!(
            !message.contains("not-the-password") && !message.contains(&db.password),
            "a password leaked: {message}"
        );
        expect_events(&cluster, name, &[reason]).await;
        assert_clean(&cluster, &db, name, false).await;
    }
    // Refused before backup mode, saying what to do.
    let refused = cluster.api::<Backup>().get("no-archive").await.unwrap();
    let status = refused.status.unwrap();
    assert_eq!(status.start_lsn, None);
    let message = status.error.unwrap().message;
    assert!(
        message.starts_with(
            "walSource is Archive, but the server archives no WAL (archive_mode = off): turn on archiving"
        ),
        "{message}"
    );
    let refused = cluster.api::<Backup>().get("foreign-class").await.unwrap();
    let status = refused.status.unwrap();
    assert_eq!(status.start_lsn, None, "refused before backup mode");
    assert_eq!(
        status.error.unwrap().message,
        format!(
            "VolumeSnapshotClass {foreign} is for CSI driver other.csi.example.com, but PVC {} is a volume of hostpath.csi.k8s.io: name a class of hostpath.csi.k8s.io, or none for its default",
            db.claim("data")
        )
    );
    delete_snapshot_class(&cluster, &foreign).await;
    // No default group class in the test cluster: Always has nothing to cut with.
    let refused = cluster.api::<Backup>().get("always-group").await.unwrap();
    let status = refused.status.unwrap();
    assert_eq!(status.start_lsn, None, "refused before backup mode");
    assert_eq!(
        status.error.unwrap().message,
        "groupSnapshot Always, but no VolumeGroupSnapshotClass is marked default for CSI driver hostpath.csi.k8s.io: name one in spec.volumeGroupSnapshotClassName or annotate one with groupsnapshot.storage.kubernetes.io/is-default-class=\"true\""
    );
    let refused = cluster
        .api::<Backup>()
        .get("foreign-group-class")
        .await
        .unwrap();
    let status = refused.status.unwrap();
    assert_eq!(status.start_lsn, None, "refused before backup mode");
    assert_eq!(
        status.error.unwrap().message,
        format!(
            "VolumeGroupSnapshotClass {foreign_group} is for CSI driver other.csi.example.com, but the volumes are of hostpath.csi.k8s.io: name a group class of hostpath.csi.k8s.io, or none for its default"
        )
    );
    // A group the storage fails: the driver's message, the group deleted, the claims' label
    // removed.
    let failed = cluster.api::<Backup>().get("group-fails").await.unwrap();
    let message = failed.status.unwrap().error.unwrap().message;
    assert!(
        message.starts_with("group snapshot group-fails failed: ")
            && message.contains("the storage refused the group"),
        "{message}"
    );
    let groups = group_snapshots(&cluster);
    let left = groups.list(&ListParams::default()).await.unwrap().items;
    assert!(
        left.iter().all(|g| g.metadata.deletion_timestamp.is_some()),
        "a group not deleted: {left:?}"
    );
    let labelled = cluster
        .api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>()
        .list(&ListParams::default().labels("pgsnap.io/group-snapshot"))
        .await
        .unwrap();
    assert!(labelled.items.is_empty(), "a claim keeps the group's label");
    let refused = cluster.api::<Backup>().get("no-wal-listing").await.unwrap();
    let status = refused.status.unwrap();
    assert_eq!(status.start_lsn, None, "refused before backup mode");
    let message = status.error.unwrap().message;
    assert!(
        message.contains("may not execute pg_ls_waldir()")
            && message.contains("GRANT EXECUTE ON FUNCTION pg_ls_waldir() TO nolist"),
        "{message}"
    );
    // The snapshot controller, backing off from the failing group, lets it go some 40 s after
    // pgsnap deleted it; its class stays until then, or the group could never go.
    for _ in 0..600 {
        if groups
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left = groups.list(&ListParams::default()).await.unwrap().items;
    assert!(left.is_empty(), "a group outlived its Backup: {left:?}");
    for class in [&foreign_group, &failing_group] {
        let _ = group_snapshot_classes(&cluster)
            .delete(class, &DeleteParams::default())
            .await;
    }
}

/// The operator dies mid-backup (the session dies with it): on restart the Backup ends
/// Failed, the server is out of backup mode and no snapshot remains.
#[tokio::test]
async fn an_operator_killed_mid_backup_leaves_nothing_behind() {
    let cluster = Cluster::from_env().await;
    let mut first = Operator::for_test(&cluster).await;
    // An archive that never succeeds keeps the stop call waiting: the backup sits in Stopping.
    let db = postgres_pod(16)
        .setting("archive_mode", "on")
        .setting("archive_command", "false")
        .create(&cluster)
        .await;
    let secret = db.password_secret(&cluster).await;
    let name = apply(
        &cluster,
        backup_spec(
            "killed",
            on(
                &db,
                &secret,
                json!({
                    "checkpoint": "Fast",
                    "walSource": "Archive",
                }),
            ),
        ),
    )
    .await;
    wait_phase(&cluster, &name, &[Phase::Stopping], Duration::from_secs(30)).await;
    first.kill();
    let _second = Operator::for_test(&cluster).await;
    let backup = wait_phase(&cluster, &name, &[Phase::Failed], Duration::from_secs(20)).await;
    assert_failed(&backup, "SessionLost");
    // The server aborts the backup once it notices the dead connection.
    for _ in 0..50 {
        if db
            .sql_value("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgsnap'")
            .await
            == "0"
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_clean(&cluster, &db, &name, false).await;
    // And a new backup starts at once: the server is not stuck in backup mode (the archive
    // still fails; this one keeps its WAL instead).
    let again = apply(
        &cluster,
        backup_spec(
            "after-kill",
            on(&db, &secret, json!({"checkpoint": "Fast"})),
        ),
    )
    .await;
    assert_completed(&wait_terminal(&cluster, &again).await);
}

/// SIGTERM aborts a running backup cleanly, marks it, and exits 0; so does the deadline.
#[tokio::test]
async fn sigterm_and_the_deadline_abort_cleanly() {
    let cluster = Cluster::from_env().await;
    let mut op = Operator::for_test(&cluster).await;
    // An archive that never succeeds: the stop call waits until the deadline or the signal.
    let db = postgres_pod(14)
        .setting("archive_mode", "on")
        .setting("archive_command", "false")
        .create(&cluster)
        .await;
    let secret = db.password_secret(&cluster).await;
    let spec = |deadline: &str| {
        on(
            &db,
            &secret,
            json!({
                "checkpoint": "Fast",
                "deadline": deadline,
                "walSource": "Archive",
            }),
        )
    };
    // Long enough for the cut on a loaded machine, so the deadline falls in the archive wait.
    let name = apply(&cluster, backup_spec("deadline", spec("20s"))).await;
    let backup = wait_phase(&cluster, &name, &[Phase::Failed], Duration::from_secs(60)).await;
    assert_failed(&backup, "DeadlineExceeded");
    let message = &backup
        .status
        .as_ref()
        .unwrap()
        .error
        .as_ref()
        .unwrap()
        .message;
    assert!(
        message.contains("archiv"),
        "the deadline names the step it hit: {message}"
    );
    assert_clean(&cluster, &db, &name, false).await;

    let name = apply(&cluster, backup_spec("terminated", spec("10m"))).await;
    wait_phase(&cluster, &name, &[Phase::Stopping], Duration::from_secs(30)).await;
    assert!(
        op.terminate(Duration::from_secs(20)),
        "the operator did not exit 0 on SIGTERM"
    );
    let backup = cluster.api::<Backup>().get(&name).await.unwrap();
    assert_failed(&backup, "OperatorShutdown");
    assert_clean(&cluster, &db, &name, false).await;
    // Only a running operator takes its finalizers off the Backups, when the test ends.
    let _cleanup = Operator::for_test(&cluster).await;
}

/// How a backup's peer vanishes without closing its connection.
#[derive(Clone, Copy, Debug)]
enum Vanish {
    /// The server's pod is cut off the network: everything is dropped, nothing closed.
    Network,
    /// The operator process is frozen (SIGSTOP), every socket open.
    Operator,
}

/// The server ends backup mode by itself, and drops the slot, when the operator cannot: at
/// the deadline plus `SERVER_GRACE`, whatever the operator or the network does. PostgreSQL 13
/// has no `idle_session_timeout`; the backup's transaction bounds it there too.
async fn the_server_ends_backup_mode_when(vanish: Vanish) {
    let cluster = Cluster::from_env().await;
    let operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(13).create(&cluster).await;
    let secret = db.password_secret(&cluster).await;
    // The storage takes longer to cut than the deadline: the server idles in backup mode.
    let class = snapshot_class(&cluster, "slow-cut", "Delete", json!({"cutSeconds": "20"})).await;
    let name = format!("vanished-{vanish:?}").to_lowercase();
    let deadline = Duration::from_secs(10);
    apply(
        &cluster,
        backup_spec(
            &name,
            json!({
                "target": {"podName": db.name},
                "connection": {"passwordSecretRef": {"name": secret, "key": "password"}},
                "checkpoint": "Fast", "waitForArchive": false, "deadline": "10s",
                "volumeSnapshotClassName": class,
            }),
        ),
    )
    .await;
    wait_phase(
        &cluster,
        &name,
        &[Phase::Snapshotting],
        Duration::from_secs(30),
    )
    .await;
    let pid = db
        .sql_value("SELECT pid FROM pg_stat_activity WHERE application_name = 'pgsnap'")
        .await;
    let slot = format!("pgsnap_{pid}");
    let since = std::time::Instant::now();
    let cut = match vanish {
        Vanish::Network => Some(cluster.cut(&db.name).await),
        Vanish::Operator => {
            operator.suspend();
            None
        }
    };
    let in_backup = format!(
        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}) \
         + (SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}')"
    );
    // Bounded by the deadline and the grace from the start call, which was before `since`.
    let bound = deadline + SERVER_GRACE + Duration::from_secs(5);
    // Asked from inside the pod: a cut pod is out of the test's reach too.
    while db.sql_in_pod(&cluster, &in_backup).await != "0" {
        assert!(
            since.elapsed() < bound,
            "backend {pid} or slot {slot} still there {:?} after the peer vanished",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "{vanish:?}: the server left backup mode {:?} after the peer vanished",
        since.elapsed()
    );
    drop(cut);
    operator.resume();
    let backup = wait_terminal(&cluster, &name).await;
    let reason = &backup
        .status
        .as_ref()
        .unwrap()
        .error
        .as_ref()
        .unwrap()
        .reason;
    // A thawed operator finds its deadline passed, or the session the server ended.
    assert!(
        ["DeadlineExceeded", "SessionLost"].contains(&reason.as_str()),
        "{reason}"
    );
    assert_clean(&cluster, &db, &name, false).await;
    delete_snapshot_class(&cluster, &class).await;
}

#[tokio::test]
async fn a_partition_cannot_keep_the_server_in_backup_mode() {
    the_server_ends_backup_mode_when(Vanish::Network).await;
}

#[tokio::test]
async fn a_frozen_operator_cannot_keep_the_server_in_backup_mode() {
    the_server_ends_backup_mode_when(Vanish::Operator).await;
}

/// Two replicas with leader election: exactly one acts. The leader frozen mid-backup (SIGSTOP)
/// is replaced once the lease runs out by the standby's own clock; the new leader ends the
/// backup `SessionLost` and runs the next one, and the thawed old leader writes nothing (its
/// client is fenced) and exits. A leader killed mid-backup, likewise.
#[tokio::test]
async fn two_replicas_one_leader() {
    let cluster = Cluster::from_env().await;
    let args = [
        "--leader-election=true".to_string(),
        format!("--lease-name=lease-{}", cluster.namespace),
        format!("--namespace={}", cluster.namespace),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let lease = Duration::from_secs(15);
    let mut first = Operator::start(&cluster.client, &args).await;
    first.wait_leading(Duration::from_secs(20)).await;
    // Ready means serving: the standby replica is ready without leading.
    let mut second = Operator::start(&cluster.client, &args).await;
    assert!(!second.leading().await, "two leaders");

    let db = postgres_pod(16).create(&cluster).await;
    let secret = db.password_secret(&cluster).await;
    let class = snapshot_class(&cluster, "slow-cut", "Delete", json!({"cutSeconds": "20"})).await;
    let slow = json!({"checkpoint": "Fast", "waitForArchive": false, "deadline": "15s", "volumeSnapshotClassName": class});
    let lost_mid_backup = async |name: &str| {
        apply(&cluster, backup_spec(name, on(&db, &secret, slow.clone()))).await;
        wait_phase(
            &cluster,
            name,
            &[Phase::Snapshotting],
            Duration::from_secs(30),
        )
        .await;
    };

    lost_mid_backup("frozen-leader").await;
    first.suspend();
    let took = second.wait_leading(lease * 3).await;
    eprintln!("the standby led {took:?} after the leader froze");
    assert!(
        took >= lease - Duration::from_secs(5),
        "took over after {took:?}, before the lease ran out"
    );
    let failed = wait_terminal(&cluster, "frozen-leader").await;
    assert_failed(&failed, "SessionLost");
    first.resume();
    let exit = first.wait_exit(Duration::from_secs(30));
    assert!(
        exit.is_some(),
        "the thawed leader did not stop:\n{}",
        first.log_tail()
    );
    // It tried to record the backup's end, and the fence refused it.
    let log = first.log_tail();
    assert!(
        log.contains("this replica no longer holds the leader lease"),
        "{log}"
    );
    let after = cluster.api::<Backup>().get("frozen-leader").await.unwrap();
    assert_eq!(
        after.status.as_ref().and_then(|s| s.error.clone()),
        failed.status.and_then(|s| s.error)
    );
    assert_clean(&cluster, &db, "frozen-leader", false).await;

    apply(
        &cluster,
        backup_spec(
            "under-new-leader",
            on(
                &db,
                &secret,
                json!({"checkpoint": "Fast", "waitForArchive": false}),
            ),
        ),
    )
    .await;
    assert_completed(&wait_terminal(&cluster, "under-new-leader").await);

    lost_mid_backup("killed-leader").await;
    second.kill();
    let third = Operator::start(&cluster.client, &args).await;
    third.wait_leading(lease * 3).await;
    assert_failed(
        &wait_terminal(&cluster, "killed-leader").await,
        "SessionLost",
    );
    assert_clean(&cluster, &db, "killed-leader", false).await;
    delete_snapshot_class(&cluster, &class).await;
}

/// `VerifyFull` checks the certificate against the name the Backup gives (a Service's DNS
/// name) while connecting to the pod's IP. The right CA and name complete; no name (so the
/// pod's IP, which the certificate does not carry), a wrong name, or another CA fail
/// `TlsFailed` saying which; a name without `VerifyFull` is refused at apply time.
#[tokio::test]
async fn verify_full_checks_the_ca_and_the_server_name() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let dir = cluster.dir.join("tls").join(&cluster.namespace);
    let ca = TestCa::new(&dir, "pgsnap-test-ca");
    let other = TestCa::new(&dir, "another-ca");
    let service = "orders-db.shop.svc";
    let server = ca.issue(service, POSTGRES_UID);
    let db = postgres_pod(17)
        .setting("ssl", "on")
        .setting("ssl_cert_file", &server.cert.display().to_string())
        .setting("ssl_key_file", &server.key.display().to_string())
        .create(&cluster)
        .await;
    let password = db.password_secret(&cluster).await;
    let right = secret(&cluster, "right-ca", "ca.crt", &ca.pem()).await;
    let wrong = secret(&cluster, "other-ca", "ca.crt", &other.pem()).await;
    let spec = |ca: &str, server_name: Option<&str>, ssl_mode: &str| {
        let mut connection = json!({
            "passwordSecretRef": {"name": password, "key": "password"},
            "sslMode": ssl_mode,
            "caSecretRef": {"name": ca, "key": "ca.crt"},
        });
        if let Some(name) = server_name {
            connection["serverName"] = json!(name);
        }
        json!({"target": {"podName": db.name}, "connection": connection, "checkpoint": "Fast", "waitForArchive": false})
    };
    let cases = [
        ("verified", spec(&right, Some(service), "VerifyFull")),
        ("pod-ip", spec(&right, None, "VerifyFull")),
        (
            "wrong-name",
            spec(&right, Some("other.shop.svc"), "VerifyFull"),
        ),
        ("wrong-ca", spec(&wrong, Some(service), "VerifyFull")),
    ];
    for (name, spec) in &cases {
        apply(&cluster, backup_spec(name, spec.clone())).await;
    }
    assert_completed(&wait_terminal(&cluster, "verified").await);
    let pod_ip = format!("certificate not valid for name \"{}\"", db.host);
    for (name, why) in [
        ("pod-ip", pod_ip.as_str()),
        (
            "wrong-name",
            "certificate not valid for name \"other.shop.svc\"",
        ),
        ("wrong-ca", "UnknownIssuer"),
    ] {
        let backup = wait_terminal(&cluster, name).await;
        assert_failed(&backup, "TlsFailed");
        let message = backup.status.unwrap().error.unwrap().message;
        assert!(message.contains(why), "{name}: {message}");
    }
    let refused = cluster
        .api::<Backup>()
        .create(
            &PostParams::default(),
            &backup_spec("name-unverified", spec(&right, Some(service), "Require")),
        )
        .await
        .expect_err("serverName without VerifyFull");
    assert!(
        refused.to_string().contains("serverName is the name VerifyFull checks the certificate against; it needs sslMode VerifyFull"),
        "{refused}"
    );
}

/// PostgreSQL 10 cannot show where a linked pg_wal is, so a backup there cannot keep its WAL
/// in a snapshot: with or without `spec.volumes` such a backup is refused `WalNotLocated`
/// before backup mode (with the list the volume is known, but not where pg_wal's files are
/// on it). With `walSource: Archive`, `spec.volumes` naming the claims has pg_wal's volume
/// snapshotted; without it the backup holds the data volume alone, says why in an Event, and
/// still restores every row (restore-prepare recreates pg_wal; the WAL is in the archive).
#[tokio::test]
async fn postgres_10_with_pg_wal_on_its_own_volume() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(10)
        .archive_volume()
        .wal_volume(true)
        .create(&cluster)
        .await;
    let secret = db.password_secret(&cluster).await;
    let (data, wal) = (db.claim("data"), db.claim("wal"));
    let listed = json!([{"persistentVolumeClaim": data}, {"persistentVolumeClaim": wal}]);
    let spec = |extra: serde_json::Value| {
        let mut spec = json!({"checkpoint": "Fast"});
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        on(&db, &secret, spec)
    };
    let refusals = [
        (
            "unlocated",
            json!({}),
            "pg_wal may link to another of the pod's volumes",
        ),
        (
            "located-volume",
            json!({"volumes": listed}),
            "pg_wal's files are somewhere on the volume mounted at /var/lib/postgresql/wal",
        ),
    ];
    for (name, extra, _) in &refusals {
        apply(&cluster, backup_spec(name, spec(extra.clone()))).await;
    }
    for (name, extra, roles) in [
        (
            "listed",
            json!({"volumes": listed, "walSource": "Archive"}),
            vec![
                (VolumeRole::Data, data.clone()),
                (VolumeRole::Wal, wal.clone()),
            ],
        ),
        (
            "unlisted",
            json!({"walSource": "Archive"}),
            vec![(VolumeRole::Data, data.clone())],
        ),
    ] {
        let writer = Writer::start(&db).await;
        let backup = wait_terminal(
            &cluster,
            &apply(&cluster, backup_spec(name, spec(extra))).await,
        )
        .await;
        let written = writer.finish().await;
        assert_completed(&backup);
        assert_eq!(snapshot_roles(&backup), roles, "{name}");
        assert_restores_every_row(&cluster, &db, &backup, &written).await;
    }
    expect_events(&cluster, "unlisted", &["WalNotLocated"]).await;
    for (name, _, why) in refusals {
        let refused = wait_terminal(&cluster, name).await;
        assert_failed(&refused, "WalNotLocated");
        let message = refused.status.unwrap().error.unwrap().message;
        assert!(
            message.starts_with(&format!("walSource is Snapshot, but {why}")),
            "{name}: {message}"
        );
    }
}

/// The README's grants and no file access (15+): on the common layout (one data volume,
/// pg_wal inside the data directory) the backup keeps its WAL without
/// `pg_read_server_files` and restores every row with no archive. With pg_wal on a volume of
/// its own the role cannot tell where it is: such a backup is refused `WalNotLocated` before
/// backup mode; with `walSource: Archive` pg_wal's volume is left out, an Event says so, and
/// the backup restores from the archive.
#[tokio::test]
async fn the_minimal_role_backs_up_every_layout() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let (plain, split) = tokio::join!(
        postgres_pod(17).name("plain").no_archive().create(&cluster),
        postgres_pod(17)
            .name("split")
            .archive_volume()
            .wal_volume(true)
            .create(&cluster),
    );
    for (db, source) in [(&plain, "Snapshot"), (&split, "Archive")] {
        db.sql(
            "CREATE ROLE pgsnap LOGIN REPLICATION PASSWORD 'minimal'; \
             GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO pgsnap; \
             GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO pgsnap; \
             GRANT EXECUTE ON FUNCTION pg_ls_waldir() TO pgsnap; \
             GRANT pg_read_all_settings TO pgsnap",
        )
        .await;
        let secret = password_secret(&cluster, &format!("{}-minimal", db.name), "minimal").await;
        let spec = |source: &str| {
            json!({
                "target": {"podName": db.name},
                "connection": {"user": "pgsnap", "passwordSecretRef": {"name": secret, "key": "password"}},
                "checkpoint": "Fast",
                "walSource": source,
            })
        };
        let writer = Writer::start(db).await;
        let backup = wait_terminal(
            &cluster,
            &apply(&cluster, backup_spec(&db.name, spec(source))).await,
        )
        .await;
        let written = writer.finish().await;
        assert_completed(&backup);
        let data = (VolumeRole::Data, db.claim("data"));
        let roles = match source {
            "Snapshot" => vec![data, (VolumeRole::BackupWal, db.claim("data"))],
            _ => vec![data],
        };
        assert_eq!(snapshot_roles(&backup), roles, "{}", db.name);
        assert_restores_every_row(&cluster, db, &backup, &written).await;
        if db.name == split.name {
            expect_events(&cluster, &db.name, &["WalNotLocated"]).await;
            let name = apply(&cluster, backup_spec("split-kept", spec("Snapshot"))).await;
            assert_failed(&wait_terminal(&cluster, &name).await, "WalNotLocated");
        }
    }
}

/// A pod named by one Backup and selected by another is one database: the second queues
/// behind the first instead of opening a second backup session beside it.
#[tokio::test]
async fn one_pod_by_name_and_by_selector_is_one_database() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    // An archive that never succeeds keeps the first backup in its stop call.
    let db = postgres_pod(16)
        .setting("archive_mode", "on")
        .setting("archive_command", "false")
        .create(&cluster)
        .await;
    let secret = db.password_secret(&cluster).await;
    let by_name = on(
        &db,
        &secret,
        json!({"checkpoint": "Fast", "deadline": "60s", "walSource": "Archive"}),
    );
    let first = apply(&cluster, backup_spec("by-name", by_name)).await;
    wait_phase(
        &cluster,
        &first,
        &[Phase::Stopping],
        Duration::from_secs(40),
    )
    .await;
    let by_selector = on(
        &db,
        &secret,
        json!({"target": {"selector": {"matchLabels": {"app": db.name}}}, "checkpoint": "Fast"}),
    );
    let second = apply(&cluster, backup_spec("by-selector", by_selector)).await;
    let queued = cluster
        .wait_for(
            cluster.api::<Backup>(),
            &second,
            "Pending/DatabaseBusy",
            Duration::from_secs(20),
            |b: Option<&Backup>| {
                b.and_then(|b| b.status.as_ref()).is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.reason == "DatabaseBusy")
                })
            },
        )
        .await;
    let status = queued.status.as_ref().unwrap();
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
    assert!(
        ready.is_some_and(|c| c.message.contains("backup by-name of the same database")),
        "{ready:?}"
    );
    assert_eq!(status.phase, Some(Phase::Pending));
    let sessions: String = db
        .sql_value("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgsnap'")
        .await;
    assert_eq!(sessions, "1", "one backup session on the database");
}

/// A PostgreSQL 16 pod, and a Backup `name` of it through a class of the test driver with
/// `parameters` (`extra` on top of a fast checkpoint without the archive wait). Returns the
/// pod and the class.
async fn backup_through_class(
    cluster: &Cluster,
    name: &str,
    deletion_policy: &str,
    parameters: serde_json::Value,
    extra: serde_json::Value,
) -> (PostgresPod, String) {
    let db = postgres_pod(16).create(cluster).await;
    let secret = db.password_secret(cluster).await;
    let class = snapshot_class(cluster, name, deletion_policy, parameters).await;
    let mut rest =
        json!({"checkpoint": "Fast", "waitForArchive": false, "volumeSnapshotClassName": class});
    rest.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    apply(cluster, backup_spec(name, on(&db, &secret, rest))).await;
    (db, class)
}

/// Cut and ready apart, as on cloud block storage: the server leaves backup mode at the cut,
/// and the Backup is Completed only once the upload is done.
#[tokio::test]
async fn the_server_leaves_backup_mode_at_the_cut_and_completes_at_ready() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let name = "uploaded";
    let params = json!({"uploadSeconds": "8"});
    let (db, class) = backup_through_class(&cluster, name, "Delete", params, json!({})).await;
    let finalizing = wait_phase(
        &cluster,
        name,
        &[Phase::Finalizing, Phase::Completed, Phase::Failed],
        Duration::from_secs(60),
    )
    .await;
    let status = finalizing.status.clone().unwrap();
    assert_eq!(status.phase, Some(Phase::Finalizing), "{:#?}", status.error);
    assert!(
        status.snapshots.iter().all(|s| !s.ready_to_use),
        "the upload is not done yet"
    );
    let sessions = db
        .sql_value("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgsnap'")
        .await;
    assert_eq!(
        sessions, "0",
        "out of backup mode while the snapshot uploads"
    );
    let backup = wait_terminal(&cluster, name).await;
    assert_completed(&backup);
    let status = backup.status.unwrap();
    let stopped = status.backup_window.unwrap().stopped_at.unwrap();
    let waited = status.completed_at.unwrap().0.duration_since(stopped.0);
    assert!(
        waited.as_secs_f64() >= 5.0,
        "Completed {waited:?} after the stop, before the upload's 8 s"
    );
    delete_snapshot_class(&cluster, &class).await;
}

/// A snapshot the driver fails: Failed with the driver's message, out of backup mode,
/// nothing left behind.
#[tokio::test]
async fn a_snapshot_the_driver_fails_fails_the_backup_with_its_message() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let name = "failing";
    let params = json!({"failWith": "disk on fire"});
    let (db, class) = backup_through_class(&cluster, name, "Delete", params, json!({})).await;
    let backup = wait_terminal(&cluster, name).await;
    assert_failed(&backup, "SnapshotFailed");
    let message = &backup
        .status
        .as_ref()
        .unwrap()
        .error
        .as_ref()
        .unwrap()
        .message;
    assert!(message.contains("disk on fire"), "{message}");
    assert_clean(&cluster, &db, name, false).await;
    delete_snapshot_class(&cluster, &class).await;
}

/// A snapshot that never becomes ready: Finalizing ends at `readyTimeout` as
/// SnapshotNotReady, and the snapshots go.
#[tokio::test]
async fn a_snapshot_never_ready_fails_at_the_ready_timeout() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let name = "never-ready";
    let params = json!({"neverReady": "true"});
    let extra = json!({"readyTimeout": "1m"});
    let (db, class) = backup_through_class(&cluster, name, "Delete", params, extra).await;
    let backup = wait_phase(
        &cluster,
        name,
        &[Phase::Completed, Phase::Failed],
        Duration::from_secs(150),
    )
    .await;
    assert_failed(&backup, "SnapshotNotReady");
    assert_clean(&cluster, &db, name, false).await;
    delete_snapshot_class(&cluster, &class).await;
}

/// With a VolumeSnapshotClass that retains, deleting a snapshot leaves its content and the
/// storage snapshot behind: pgsnap switches its own contents to Delete first, so a Backup
/// deleted with deletionPolicy Delete leaves no orphan.
#[tokio::test]
async fn a_retain_snapshot_class_leaves_no_orphan_content() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let name = "retained-class";
    let (_db, class) = backup_through_class(&cluster, name, "Retain", json!({}), json!({})).await;
    let backup = wait_terminal(&cluster, name).await;
    assert_completed(&backup);
    let contents: Vec<String> = cluster
        .api::<VolumeSnapshot>()
        .list(&ListParams::default().labels(&format!("pgsnap.io/backup={name}")))
        .await
        .expect("list")
        .items
        .iter()
        .filter_map(|s| {
            s.status
                .as_ref()?
                .bound_volume_snapshot_content_name
                .clone()
        })
        .collect();
    assert!(!contents.is_empty(), "the snapshots are bound to contents");
    cluster
        .api::<Backup>()
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete");
    let content_api: Api<pgsnap::api::snapshot::VolumeSnapshotContent> =
        Api::all(cluster.client.clone());
    let t0 = std::time::Instant::now();
    for content in &contents {
        while content_api.get_opt(content).await.unwrap().is_some() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "VolumeSnapshotContent {content} outlived its Backup under a Retain class"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    delete_snapshot_class(&cluster, &class).await;
}

/// Delete removes snapshots and label; Retain keeps both.
#[tokio::test]
async fn deletion_honours_the_deletion_policy() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(17).create(&cluster).await;
    let secret = db.password_secret(&cluster).await;
    for policy in ["Delete", "Retain"] {
        let name = apply(
            &cluster,
            backup_spec(
                &policy.to_lowercase(),
                on(
                    &db,
                    &secret,
                    json!({
                        "checkpoint": "Fast",
                        "waitForArchive": false,
                        "deletionPolicy": policy,
                    }),
                ),
            ),
        )
        .await;
        assert_completed(&wait_terminal(&cluster, &name).await);
        let uid = cluster
            .api::<Backup>()
            .get(&name)
            .await
            .unwrap()
            .uid()
            .unwrap();
        cluster
            .api::<Backup>()
            .delete(&name, &DeleteParams::default())
            .await
            .unwrap();
        let deleted = kube::runtime::wait::await_condition(
            cluster.api::<Backup>(),
            &name,
            kube::runtime::wait::conditions::is_deleted(&uid),
        );
        tokio::time::timeout(Duration::from_secs(30), deleted)
            .await
            .expect("the Backup is deleted within 30s")
            .unwrap();
        let snapshots = cluster
            .api::<VolumeSnapshot>()
            .list(&ListParams::default().labels(&format!("pgsnap.io/backup={name}")))
            .await
            .unwrap();
        let cm = cluster
            .api::<ConfigMap>()
            .get_opt(&format!("{name}-backup-label"))
            .await
            .unwrap();
        match policy {
            "Delete" => assert!(
                snapshots
                    .items
                    .iter()
                    .all(|s| s.metadata.deletion_timestamp.is_some())
                    && cm.is_none_or(|c| c.metadata.deletion_timestamp.is_some())
            ),
            _ => assert!(
                snapshots.items.len() == 2 && cm.is_some(),
                "Retain lost the snapshot, the WAL snapshot or the label"
            ),
        }
    }
}

/// Twenty Backups of five databases at once: all complete, never two of one database at a time.
#[tokio::test]
async fn twenty_backups_of_five_databases() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let mut dbs = Vec::new();
    for i in 0..5 {
        let db = postgres_pod(17)
            .name(&format!("db{i}"))
            .create(&cluster)
            .await;
        let secret = db.password_secret(&cluster).await;
        dbs.push((db, secret));
    }
    let mut names = Vec::new();
    for round in 0..4 {
        for (db, secret) in &dbs {
            names.push(
                apply(
                    &cluster,
                    backup_spec(
                        &format!("{}-{round}", db.name),
                        on(
                            db,
                            secret,
                            json!({
                                "checkpoint": "Fast",
                                // Queueing is the point: no WAL snapshots to add
                                // to the snapshot controllers' load.
                                "walSource": "Archive",
                                "waitForArchive": false,
                            }),
                        ),
                    ),
                )
                .await,
            );
        }
    }
    let mut windows: BTreeMap<
        String,
        Vec<(k8s_openapi::jiff::Timestamp, k8s_openapi::jiff::Timestamp)>,
    > = BTreeMap::new();
    for name in &names {
        let backup = wait_phase(
            &cluster,
            name,
            &[Phase::Completed, Phase::Failed],
            Duration::from_secs(240),
        )
        .await;
        assert_completed(&backup);
        let status = backup.status.unwrap();
        let w = status.backup_window.unwrap();
        windows
            .entry(status.postgres.unwrap().pod)
            .or_default()
            .push((w.started_at.0, w.stopped_at.unwrap().0));
    }
    for (db, mut spans) in windows {
        spans.sort();
        for pair in spans.windows(2) {
            assert!(
                pair[0].1 <= pair[1].0,
                "two backups of {db} overlapped in backup mode: {pair:?}"
            );
        }
    }
}
