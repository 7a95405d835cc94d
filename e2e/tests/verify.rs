//! Verifications on the test cluster: a Backup restored into temporary claims, the backed-up
//! server's image started on them and checked (amcheck, verify_heapam, the user's SQL),
//! the outcome written onto the Backup, and nothing temporary left, whatever the outcome.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use pgsnap::api::Backup;
use pgsnap::api::backup::Phase;
use pgsnap::api::restore::Restore;
use pgsnap::api::schedule::BackupSchedule;
use pgsnap::api::verification::{Verification, VerificationPhase};
use pgsnap_e2e::backups::{completed_backup, on, schedule};
use pgsnap_e2e::operator::Operator;
use pgsnap_e2e::{Cluster, per_major, postgres_pod};
use serde_json::json;

async fn verify(cluster: &Cluster, name: &str, spec: serde_json::Value) {
    let v: Verification = serde_json::from_value(json!({
        "apiVersion": "pgsnap.io/v1alpha1", "kind": "Verification",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap();
    cluster
        .api::<Verification>()
        .create(&PostParams::default(), &v)
        .await
        .unwrap_or_else(|e| panic!("creating Verification {name}: {e}"));
}

async fn ended(cluster: &Cluster, name: &str, within: Duration) -> Verification {
    cluster
        .wait_for(
            cluster.api::<Verification>(),
            name,
            "Passed or Failed",
            within,
            |v: Option<&Verification>| {
                v.and_then(|v| v.status.as_ref())
                    .and_then(|s| s.phase)
                    .is_some_and(VerificationPhase::is_terminal)
            },
        )
        .await
}

/// Nothing the Verification made is left: its pod, its Restore and claims, its ConfigMap.
async fn assert_nothing_left(cluster: &Cluster, v: &Verification) {
    /// "<kind> <name>" of each object of kind K that `params` selects.
    async fn named<K>(cluster: &Cluster, params: &ListParams) -> Vec<String>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let items = cluster.api::<K>().list(params).await.unwrap().items;
        items
            .iter()
            .map(|o| format!("{} {}", K::kind(&()), o.name_any()))
            .collect()
    }
    let by =
        ListParams::default().labels(&format!("pgsnap.io/verification-uid={}", v.uid().unwrap()));
    // The Restore's claims carry its labels, not the Verification's.
    let restore = pgsnap::verify::plan::restore_name(&v.name_any());
    let claims = ListParams::default().labels(&format!("pgsnap.io/restore={restore}"));
    let mut left = Vec::new();
    for _ in 0..150 {
        left = named::<Pod>(cluster, &by).await;
        left.extend(named::<Restore>(cluster, &by).await);
        left.extend(named::<ConfigMap>(cluster, &by).await);
        left.extend(named::<PersistentVolumeClaim>(cluster, &claims).await);
        if left.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("left behind by Verification {}: {left:?}", v.name_any());
}

/// A backup of a server without an archive, verified: restored, recovered and promoted,
/// amcheck (with heapallindexed) over every B-tree index (a partitioned one's partitions,
/// which amcheck checks, not the partitioned index, which it refuses), verify_heapam on 14+,
/// a SQL check; Passed on the Backup; nothing temporary left.
async fn a_backup_is_verified(major: u32) {
    let cluster = Cluster::from_env().await;
    let operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(major).no_archive().create(&cluster).await;
    db.sql(
        "CREATE TABLE orders (id int PRIMARY KEY, note text); \
         INSERT INTO orders SELECT g, md5(g::text) FROM generate_series(1, 5000) g; \
         CREATE INDEX orders_note ON orders (note); \
         CREATE TABLE events (id int, at date) PARTITION BY RANGE (at); \
         CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01'); \
         CREATE INDEX events_id ON events (id); \
         INSERT INTO events SELECT g, '2026-06-01' FROM generate_series(1, 1000) g",
    )
    .await;
    let b = completed_backup(&cluster, &db, "b", json!({})).await;
    verify(
        &cluster,
        "v",
        json!({"backupName": "b", "heapAllIndexed": true,
               "checks": [{"name": "orders", "sql": "select count(*) = 5000 from orders"}]}),
    )
    .await;
    let v = ended(&cluster, "v", Duration::from_secs(240)).await;
    let status = v.status.clone().unwrap();
    assert_eq!(
        status.phase,
        Some(VerificationPhase::Passed),
        "{:?}\n{}",
        status.error,
        operator.log_tail()
    );
    let checked = status.checked.clone().unwrap();
    let pg = b.status.unwrap().postgres.unwrap();
    assert_eq!(
        Some(checked.system_identifier.clone()),
        pg.system_identifier
    );
    assert!(checked.timeline > pg.timeline.unwrap(), "{checked:?}");
    // Catalog indexes too, in postgres and template1.
    assert!(
        checked.indexes > 50 && checked.databases == 2,
        "{checked:?}"
    );
    assert_eq!(checked.tables > 0, major >= 14, "{checked:?}");
    assert_eq!(checked.sql_checks, 1);
    assert_eq!(
        status.image.as_deref(),
        Some(format!("postgres:{major}").as_str())
    );
    let timings = status.timings.clone().unwrap();
    eprintln!(
        "PostgreSQL {major}: verified in restore {:?} s, recovery {:?} s, checks {:?} s ({} indexes, {} tables)",
        timings.restore_seconds,
        timings.recovery_seconds,
        timings.checks_seconds,
        checked.indexes,
        checked.tables
    );
    let on_backup = cluster.api::<Backup>().get("b").await.unwrap();
    let backup_status = on_backup.status.unwrap();
    let recorded = backup_status.verification.unwrap();
    assert_eq!(
        (recorded.result.as_str(), recorded.verification.as_str()),
        ("Passed", "v")
    );
    // Beside the Backup controller's own conditions, each under its field manager.
    let types: Vec<(&str, &str)> = backup_status
        .conditions
        .iter()
        .map(|c| (c.type_.as_str(), c.status.as_str()))
        .collect();
    for expected in [("Ready", "True"), ("Verified", "True")] {
        assert!(types.contains(&expected), "{types:?}");
    }
    assert_nothing_left(&cluster, &v).await;
    operator
        .expect_metrics(&[r#"pgsnap_verifications_total{result="Passed",reason="Passed"} 1"#])
        .await;
}

per_major!(a_backup_is_verified;
    a_backup_of_postgres_12_is_verified: 12,
    a_backup_of_postgres_15_is_verified: 15,
    a_backup_of_postgres_18_is_verified: 18,
);

/// The leaf of a one-page B-tree index on an int: its first key made larger than the others,
/// which breaks the order amcheck checks (and nothing that merely reads the page notices).
fn corrupt_first_key(file: &std::path::Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    const PAGE: u64 = 8192;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut page = vec![0u8; PAGE as usize];
    // Block 0 is the metapage; the root, a leaf here, is block 1.
    f.seek(SeekFrom::Start(PAGE)).unwrap();
    f.read_exact(&mut page).unwrap();
    // The first line pointer after the 24-byte page header: 15 bits of offset.
    let lp = u32::from_le_bytes(page[24..28].try_into().unwrap());
    let offset = (lp & 0x7fff) as usize;
    // An index tuple: a 6-byte heap pointer, 2 bytes of info, then the int key.
    page[offset + 8..offset + 12].copy_from_slice(&1_000_000i32.to_le_bytes());
    f.seek(SeekFrom::Start(PAGE)).unwrap();
    f.write_all(&page).unwrap();
}

/// A corrupt index in the source (made on purpose) fails amcheck: the Verification and the
/// Backup read Failed, CorruptIndex, naming the index with amcheck's own message. A second
/// Verification of the namespace waits until the first has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_index_fails_verification_and_names_the_index() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    // 15: no data checksums by default, so the page reads and only amcheck objects.
    let db = postgres_pod(15).no_archive().create(&cluster).await;
    db.sql(
        "CREATE TABLE small (id int PRIMARY KEY); INSERT INTO small SELECT generate_series(1, 100); \
         CHECKPOINT",
    )
    .await;
    let file = db
        .sql_value("SELECT pg_relation_filepath('small_pkey')")
        .await;
    corrupt_first_key(&db.pgdata_host_dir().join(file));
    completed_backup(&cluster, &db, "b", json!({})).await;
    verify(&cluster, "first", json!({"backupName": "b"})).await;
    verify(&cluster, "second", json!({"backupName": "b"})).await;
    let first = ended(&cluster, "first", Duration::from_secs(240)).await;
    let status = first.status.clone().unwrap();
    assert_eq!(status.phase, Some(VerificationPhase::Failed));
    let error = status.error.unwrap();
    assert_eq!(
        (error.reason.as_str(), error.message.as_str()),
        (
            "CorruptIndex",
            "index small_pkey in database postgres: item order invariant violated for index \"small_pkey\""
        )
    );
    let backup_status = cluster
        .api::<Backup>()
        .get("b")
        .await
        .unwrap()
        .status
        .unwrap();
    let verified = backup_status
        .conditions
        .iter()
        .find(|c| c.type_ == "Verified")
        .map(|c| (c.status.as_str(), c.reason.as_str()));
    assert_eq!(verified, Some(("False", "CorruptIndex")));
    let recorded = backup_status.verification.unwrap();
    assert_eq!(
        (recorded.result.as_str(), recorded.reason.as_deref()),
        ("Failed", Some("CorruptIndex"))
    );
    assert_nothing_left(&cluster, &first).await;

    let second = ended(&cluster, "second", Duration::from_secs(240)).await;
    let (a, b) = (
        status.completed_at.unwrap(),
        second.status.unwrap().started_at.unwrap(),
    );
    assert!(
        b.0 >= a.0,
        "the second started at {b:?}, before the first ended at {a:?}"
    );
}

/// A label ConfigMap changed after the backup fails the Verification before any server
/// starts (the Restore refuses it); one whose SQL check outlives its timeout is reported
/// Timeout and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_label_and_a_timeout_fail_and_leave_nothing() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(16).no_archive().create(&cluster).await;
    let b = completed_backup(&cluster, &db, "b", json!({})).await;

    verify(
        &cluster,
        "slow",
        json!({"backupName": "b", "timeout": "1m",
               "checks": [{"name": "sleeps", "sql": "select pg_sleep(600) is not null"}]}),
    )
    .await;
    let slow = ended(&cluster, "slow", Duration::from_secs(180)).await;
    let status = slow.status.clone().unwrap();
    assert_eq!(status.phase, Some(VerificationPhase::Failed));
    assert_eq!(status.error.unwrap().reason, "Timeout");
    assert_nothing_left(&cluster, &slow).await;
    // A verification that could not finish is no verdict on the backup.
    let backup = cluster.api::<Backup>().get("b").await.unwrap();
    assert_eq!(backup.status.unwrap().verification, None);

    // The label ConfigMap is immutable: tampering means replacing it.
    let label = b.status.unwrap().label_config_map.unwrap();
    let cms = cluster.api::<ConfigMap>();
    let cm = cms.get(&label).await.unwrap();
    cms.delete(&label, &Default::default()).await.unwrap();
    let mut data = cm.data.clone().unwrap();
    let text = data.get_mut("backup_label").unwrap();
    *text = text.replacen("LABEL: ", "LABEL: tampered ", 1);
    let tampered = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: cm.metadata.name.clone(),
            labels: cm.metadata.labels.clone(),
            annotations: cm.metadata.annotations.clone(),
            owner_references: cm.metadata.owner_references.clone(),
            ..Default::default()
        },
        data: Some(data),
        immutable: cm.immutable,
        ..Default::default()
    };
    for _ in 0..50 {
        match cms.create(&PostParams::default(), &tampered).await {
            Ok(_) => break,
            // Until the deletion has gone through.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the tampered ConfigMap: {e}"),
        }
    }
    verify(&cluster, "tampered", json!({"backupName": "b"})).await;
    let tampered = ended(&cluster, "tampered", Duration::from_secs(120)).await;
    let status = tampered.status.clone().unwrap();
    let error = status.error.unwrap();
    assert!(
        error.reason == "RestoreFailed" && error.message.contains(": LabelChecksumMismatch: "),
        "{error:?}"
    );
    assert_eq!(status.pod, None, "no server was started");
    assert_nothing_left(&cluster, &tampered).await;
}

/// A BackupSchedule with `verification: {every: 2}`: its first Completed backup is verified,
/// then every second one; each Verification is owned by its Backup and passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_verifies_every_second_backup() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(17).no_archive().create(&cluster).await;
    let secret = db.password_secret(&cluster).await;
    let mut often = schedule(
        "often",
        "*/4 * * * * *",
        on(&db, &secret, json!({"checkpoint": "Fast"})),
    );
    often.spec.retention.keep_last = Some(20);
    often.spec.verification =
        Some(serde_json::from_value(json!({"every": 2, "template": {"timeout": "5m"}})).unwrap());
    let schedules = cluster.api::<BackupSchedule>();
    let made = schedules
        .create(&PostParams::default(), &often)
        .await
        .unwrap();
    let by_schedule =
        ListParams::default().labels(&format!("pgsnap.io/schedule-uid={}", made.uid().unwrap()));
    let since = std::time::Instant::now();
    let verifications = loop {
        let list = cluster
            .api::<Verification>()
            .list(&by_schedule)
            .await
            .unwrap()
            .items;
        if list.len() >= 2 {
            break list;
        }
        assert!(
            since.elapsed() < Duration::from_secs(120),
            "{} Verifications after 2 min",
            list.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    schedules
        .patch(
            "often",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await
        .unwrap();
    // Named by their scheduled times, the schedule's Backups sort in the order they ran.
    let mut completed: Vec<String> = cluster
        .api::<Backup>()
        .list(&by_schedule)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|b| b.status.as_ref().and_then(|s| s.phase) == Some(Phase::Completed))
        .map(|b| b.name_any())
        .collect();
    completed.sort();
    let mut verified: Vec<&str> = verifications
        .iter()
        .map(|v| v.spec.backup_name.as_str())
        .collect();
    verified.sort();
    let at = |name: &str| {
        completed
            .iter()
            .position(|c| c == name)
            .unwrap_or_else(|| panic!("{name} in {completed:?}"))
    };
    assert_eq!(
        at(verified[0]),
        0,
        "the first Completed backup is verified: {verified:?} of {completed:?}"
    );
    assert_eq!(
        at(verified[1]),
        2,
        "then every second: {verified:?} of {completed:?}"
    );
    for v in &verifications {
        assert_eq!(v.owner_references()[0].name, v.spec.backup_name);
        let ended = ended(&cluster, &v.name_any(), Duration::from_secs(180)).await;
        let status = ended.status.unwrap();
        assert_eq!(
            status.phase,
            Some(VerificationPhase::Passed),
            "{:?}",
            status.error
        );
    }
}
