//! Benchmark: where a backup's time in backup mode goes, and what the operator costs.
//!
//!   e2e/cluster up && cargo bench -p pgsnap-e2e --bench backup_overhead
//!
//! Runs N backups (default 30, `PGSNAP_BENCH_BACKUPS`) of a PostgreSQL 17 pod one after the
//! other with a fast checkpoint, and prints per-step medians and p99s from each Backup's
//! `status.timings`: the checkpoint (start call), the cut (the CSI driver), the stop call, and
//! the operator's overhead (time in backup mode minus cut and stop). Then it measures the
//! operator's resident memory idle and with 500 Backup objects in its cache.
//!
//!   e2e/cluster up && cargo bench -p pgsnap-e2e --bench backup_overhead -- size
//!
//! Time in backup mode against database size instead: databases of 1 and 10 GB
//! (`PGSNAP_BENCH_SIZES_GB`), N backups each (default 5), cut copy-on-write (XFS reflink, the
//! way block storage cuts) and, for contrast on the smallest, by the driver's tar.
//!
//!   e2e/cluster up && cargo bench -p pgsnap-e2e --bench backup_overhead -- wal
//!
//! The backup's WAL kept in a snapshot (`walSource: Snapshot`) against the archive
//! (`walSource: Archive`, no archive wait): N backups each (default 10), alternating, cut
//! copy-on-write, under pgbench: time in backup mode (must be the same), the WAL snapshot's
//! step after it, and the backup's total time (created → Completed, as a client sees it).
//!
//!   e2e/cluster up && cargo bench -p pgsnap-e2e --bench backup_overhead -- group
//!
//! A database on three volumes (data, pg_wal, a tablespace) cut as one VolumeGroupSnapshot
//! (`groupSnapshot: Always`) against one snapshot per volume (`Never`): N backups each
//! (default 10), alternating, cut copy-on-write, under pgbench, from the primary and from a
//! streaming standby (which cuts one by one in two rounds, the data volume last).

use std::time::Duration;

use kube::ResourceExt;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::wait::Condition;
use pgsnap::api::Backup;
use pgsnap::api::backup::{BackupStatus, Phase};
use pgsnap_e2e::operator::Operator;
use pgsnap_e2e::percentile;
use pgsnap_e2e::postgres::REFLINK_CLASS;
use pgsnap_e2e::{Cluster, postgres_pod};
use serde_json::json;

fn terminal() -> impl Condition<Backup> {
    |b: Option<&Backup>| {
        b.and_then(|b| b.status.as_ref())
            .and_then(|s| s.phase)
            .is_some_and(Phase::is_terminal)
    }
}

/// A Backup of `pod` through `class` (default: the driver's default class), keeping its WAL
/// in a snapshot (the default) or taking it from the archive, with `more` of the spec.
fn backup(
    name: &str,
    pod: &str,
    secret: Option<&str>,
    class: Option<&str>,
    wal_source: &str,
    more: serde_json::Value,
) -> Backup {
    let connection = match secret {
        Some(s) => json!({"passwordSecretRef": {"name": s, "key": "password"}}),
        None => json!({}),
    };
    let mut spec = json!({"target": {"podName": pod}, "connection": connection, "checkpoint": "Fast",
                          "waitForArchive": false, "volumeSnapshotClassName": class,
                          "walSource": wal_source});
    if let (Some(spec), Some(more)) = (spec.as_object_mut(), more.as_object()) {
        spec.extend(more.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "pgsnap.io/v1alpha1", "kind": "Backup",
        "metadata": {"name": name}, "spec": spec,
    }))
    .expect("backup")
}

/// Runs one backup to Completed, deletes it, and returns its status.
async fn completed(cluster: &Cluster, backup: Backup) -> BackupStatus {
    let api = cluster.api::<Backup>();
    let name = backup.name_any();
    api.create(&PostParams::default(), &backup)
        .await
        .expect("create");
    let done = cluster
        .wait_for(
            api.clone(),
            &name,
            "done",
            Duration::from_secs(900),
            terminal(),
        )
        .await;
    let status = done.status.expect("status");
    assert_eq!(status.phase, Some(Phase::Completed), "{:?}", status.error);
    // Keep the snapshot count flat: each backup's snapshots go with it.
    api.delete(&name, &DeleteParams::default())
        .await
        .expect("delete");
    status
}

fn window_seconds(status: &BackupStatus) -> f64 {
    status
        .backup_window
        .as_ref()
        .and_then(|w| w.seconds.as_deref())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

fn runs(default: usize) -> usize {
    std::env::var("PGSNAP_BENCH_BACKUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    // cargo passes --bench to a harness-less bench; what follows `--` comes after it.
    if std::env::args().any(|a| a == "size") {
        return by_size().await;
    }
    if std::env::args().any(|a| a == "wal") {
        return wal_kept_or_archived().await;
    }
    if std::env::args().any(|a| a == "group") {
        return group_or_one_by_one().await;
    }
    let runs = runs(30);
    let cluster = Cluster::from_env().await;
    let operator = Operator::for_test(&cluster).await;
    let idle = operator.rss_mib();
    let db = postgres_pod(17).create(&cluster).await;
    db.pgbench_init(1);
    let secret = db.password_secret(&cluster).await;

    let api = cluster.api::<Backup>();
    let (mut window, mut checkpoint, mut cut, mut stop, mut overhead, mut wal) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        let status = completed(
            &cluster,
            backup(
                &format!("bench-{i}"),
                &db.name,
                Some(&secret),
                None,
                "Snapshot",
                json!({}),
            ),
        )
        .await;
        let t = status.timings.clone().expect("timings");
        window.push(window_seconds(&status));
        checkpoint.push(t.checkpoint_seconds);
        cut.push(t.cut_seconds);
        stop.push(t.stop_seconds);
        overhead.push(t.overhead_seconds);
        wal.push(t.wal_snapshot_seconds.unwrap_or_default());
    }
    println!(
        "## Backup timings ({runs} backups, PostgreSQL 17, fast checkpoint, idle server, CSI hostpath)\n"
    );
    println!("| step | median ms | p99 ms |\n|---|---|---|");
    for (label, values) in [
        ("checkpoint (start call)", &mut checkpoint),
        ("cut wait (driver)", &mut cut),
        ("stop call", &mut stop),
        ("time in backup mode", &mut window),
        ("operator overhead", &mut overhead),
        ("WAL snapshot, after backup mode", &mut wal),
    ] {
        values.sort_by(f64::total_cmp);
        println!(
            "| {label} | {:.1} | {:.1} |",
            percentile(values, 0.5) * 1000.0,
            percentile(values, 0.99) * 1000.0
        );
    }

    // 500 Backups of a pod that does not exist: they fail at once and stay in the cache.
    for i in 0..500 {
        api.create(
            &PostParams::default(),
            &backup(
                &format!("mem-{i}"),
                "absent",
                None,
                None,
                "Snapshot",
                json!({}),
            ),
        )
        .await
        .expect("create");
    }
    for i in 0..500 {
        cluster
            .wait_for(
                api.clone(),
                &format!("mem-{i}"),
                "done",
                Duration::from_secs(300),
                terminal(),
            )
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = operator.rss_mib();
    println!(
        "\n## Operator memory (RSS)\n\n| state | MiB |\n|---|---|\n| idle | {idle:.1} |\n| 500 Backup objects | {loaded:.1} |"
    );
}

/// Time in backup mode against database size: a copy-on-write cut takes the same time for 1
/// and 10 GB; the driver's tar grows with the data.
async fn by_size() {
    let sizes: Vec<u64> = std::env::var("PGSNAP_BENCH_SIZES_GB")
        .unwrap_or_else(|_| "1,10".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let runs = runs(5);
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    println!(
        "## Time in backup mode by database size ({runs} backups each, PostgreSQL 17, fast checkpoint)\n"
    );
    println!(
        "| database | cut | median cut ms | median time in backup mode ms |\n|---|---|---|---|"
    );
    for (n, &gb) in sizes.iter().enumerate() {
        // The WAL of the fill is thrown away (archive_command = 'true'): nothing is restored
        // here, and archiving 10 GB would only slow the fill.
        let db = postgres_pod(17)
            .name(&format!("size{gb}"))
            .storage(REFLINK_CLASS, "64Gi")
            .setting("archive_command", "true")
            .setting("max_wal_size", "4GB")
            .create(&cluster)
            .await;
        db.sql("CREATE TABLE fill (g bigint, pad text)").await;
        for _ in 0..gb {
            // About 1.1 GB a statement: 1000-byte rows, too short to be compressed.
            db.sql(
                "INSERT INTO fill SELECT g, repeat('x', 1000) FROM generate_series(1, 1000000) g",
            )
            .await;
        }
        db.sql("CHECKPOINT").await;
        let size = db
            .sql_value("SELECT pg_size_pretty(pg_database_size('postgres'))")
            .await;
        let secret = db.password_secret(&cluster).await;
        let mut classes = vec![(REFLINK_CLASS, "copy-on-write")];
        if n == 0 {
            classes.push(("csi-hostpath-snapclass", "tar"));
        }
        for (class, how) in classes {
            let (mut cut, mut window) = (vec![], vec![]);
            for i in 0..runs {
                let name = format!("size{gb}-{how}-{i}");
                let status = completed(
                    &cluster,
                    backup(
                        &name,
                        &db.name,
                        Some(&secret),
                        Some(class),
                        "Snapshot",
                        json!({}),
                    ),
                )
                .await;
                cut.push(status.timings.as_ref().map_or(0.0, |t| t.cut_seconds));
                window.push(window_seconds(&status));
            }
            cut.sort_by(f64::total_cmp);
            window.sort_by(f64::total_cmp);
            println!(
                "| {size} | {how} | {:.1} | {:.1} |",
                percentile(&cut, 0.5) * 1000.0,
                percentile(&window, 0.5) * 1000.0
            );
        }
    }
}

/// The WAL kept in a snapshot against the archive, under load: time in backup mode is the
/// same (the WAL snapshot is cut after the stop); the total grows by that snapshot's cut.
async fn wal_kept_or_archived() {
    let runs = runs(10);
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(17)
        .storage(REFLINK_CLASS, "2Gi")
        .create(&cluster)
        .await;
    db.pgbench_init(10);
    let secret = db.password_secret(&cluster).await;
    let load = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || db.pgbench_run(runs as u32 * 8))
    };
    #[derive(Default)]
    struct Samples {
        window: Vec<f64>,
        cut: Vec<f64>,
        wal: Vec<f64>,
        total: Vec<f64>,
    }
    let mut by_source = [
        ("Snapshot", Samples::default()),
        ("Archive", Samples::default()),
    ];
    for i in 0..runs * 2 {
        let (source, samples) = &mut by_source[i % 2];
        let name = format!("wal-{}-{i}", source.to_lowercase());
        let b = backup(
            &name,
            &db.name,
            Some(&secret),
            Some(REFLINK_CLASS),
            source,
            json!({}),
        );
        let t0 = std::time::Instant::now();
        let status = completed(&cluster, b).await;
        samples.total.push(t0.elapsed().as_secs_f64());
        samples.window.push(window_seconds(&status));
        let t = status.timings.expect("timings");
        samples.cut.push(t.cut_seconds);
        samples.wal.push(t.wal_snapshot_seconds.unwrap_or(0.0));
    }
    load.await.expect("pgbench");
    println!(
        "## The backup's WAL: kept in a snapshot or in the archive ({runs} backups each, PostgreSQL 17 under pgbench, copy-on-write cut)\n"
    );
    println!(
        "| walSource | median time in backup mode ms | p99 ms | median cut in it ms | median WAL snapshot ms | median created → Completed ms |\n|---|---|---|---|---|---|"
    );
    for (source, s) in &mut by_source {
        for v in [&mut s.window, &mut s.cut, &mut s.wal, &mut s.total] {
            v.sort_by(f64::total_cmp);
        }
        println!(
            "| {source} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            percentile(&s.window, 0.5) * 1000.0,
            percentile(&s.window, 0.99) * 1000.0,
            percentile(&s.cut, 0.5) * 1000.0,
            percentile(&s.wal, 0.5) * 1000.0,
            percentile(&s.total, 0.5) * 1000.0
        );
    }
}

/// Three volumes cut as one group against one snapshot each, from a primary and a standby.
async fn group_or_one_by_one() {
    let runs = runs(10);
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let primary = postgres_pod(17)
        .name("pg-a")
        .storage(REFLINK_CLASS, "2Gi")
        .wal_volume(true)
        .tablespace_volume(true)
        .setting("wal_keep_size", "512MB")
        .create(&cluster)
        .await;
    primary.pgbench_init(10);
    let standby = postgres_pod(17)
        .name("pg-b")
        .storage(REFLINK_CLASS, "2Gi")
        .wal_volume(true)
        .tablespace_volume(true)
        .standby_of(&primary)
        .create(&cluster)
        .await;
    primary
        .sql("CREATE TABLE spaced (v bigint) TABLESPACE ts1; INSERT INTO spaced SELECT generate_series(1, 100000)")
        .await;
    let secret = primary.password_secret(&cluster).await;
    let load = {
        let db = primary.clone();
        tokio::task::spawn_blocking(move || db.pgbench_run(runs as u32 * 16))
    };
    let ways = [
        (
            "group",
            json!({"groupSnapshot": "Always", "volumeGroupSnapshotClassName": "csi-hostpath-group-reflink"}),
        ),
        ("one by one", json!({"groupSnapshot": "Never"})),
    ];
    println!(
        "## Three volumes (data, pg_wal, tablespace): one group or one snapshot each ({runs} backups each, PostgreSQL 17 under pgbench, copy-on-write cut)\n"
    );
    println!(
        "| server | cut | median time in backup mode ms | p99 ms | median cut in it ms | median created → Completed ms |\n|---|---|---|---|---|---|"
    );
    for (server, pod, source) in [
        ("primary", &primary, "Snapshot"),
        ("standby", &standby, "Archive"),
    ] {
        let mut samples: Vec<[Vec<f64>; 3]> = vec![Default::default(), Default::default()];
        for i in 0..runs * 2 {
            let (_, spec) = &ways[i % 2];
            let name = format!(
                "{server}-{}-{i}",
                if i % 2 == 0 { "group" } else { "single" }
            );
            // A standby's own WAL is not kept in a snapshot (issue 12): its archive is the
            // primary's, left unchecked here (waitForArchive is off).
            let b = backup(
                &name,
                &pod.name,
                Some(&secret),
                Some(REFLINK_CLASS),
                source,
                spec.clone(),
            );
            let t0 = std::time::Instant::now();
            let status = completed(&cluster, b).await;
            let s = &mut samples[i % 2];
            s[2].push(t0.elapsed().as_secs_f64());
            s[0].push(window_seconds(&status));
            s[1].push(status.timings.expect("timings").cut_seconds);
        }
        for ((way, _), s) in ways.iter().zip(&mut samples) {
            for v in s.iter_mut() {
                v.sort_by(f64::total_cmp);
            }
            println!(
                "| {server} | {way} | {:.0} | {:.0} | {:.0} | {:.0} |",
                percentile(&s[0], 0.5) * 1000.0,
                percentile(&s[0], 0.99) * 1000.0,
                percentile(&s[1], 0.5) * 1000.0,
                percentile(&s[2], 0.5) * 1000.0
            );
        }
    }
    load.await.expect("pgbench");
}
