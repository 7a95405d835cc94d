//! Benchmark: where a backup's time in backup mode goes, and what the operator costs.
//!
//!   e2e/cluster up && cargo bench -p pgsnap-e2e --bench backup_overhead
//!
//! Runs N backups (default 30, `PGSNAP_BENCH_BACKUPS`) of a PostgreSQL 17 pod one after the
//! other with a fast checkpoint, and prints per-step medians and p99s from each Backup's
//! `status.timings`: the checkpoint (start call), the cut (the CSI driver), the stop call, and
//! the operator's overhead (time in backup mode minus cut and stop). Then it measures the
//! operator's resident memory idle and with 500 Backup objects in its cache.

use std::time::Duration;

use kube::api::{DeleteParams, PostParams};
use kube::runtime::wait::Condition;
use pgsnap::api::Backup;
use pgsnap::api::backup::Phase;
use pgsnap_e2e::operator::Operator;
use pgsnap_e2e::{Cluster, postgres_pod};
use serde_json::json;

fn terminal() -> impl Condition<Backup> {
    |b: Option<&Backup>| {
        b.and_then(|b| b.status.as_ref())
            .and_then(|s| s.phase)
            .is_some_and(Phase::is_terminal)
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn backup(name: &str, pod: &str, secret: Option<&str>) -> Backup {
    let connection = match secret {
        Some(s) => json!({"passwordSecretRef": {"name": s, "key": "password"}}),
        None => json!({}),
    };
    serde_json::from_value(json!({
        "apiVersion": "pgsnap.io/v1alpha1", "kind": "Backup",
        "metadata": {"name": name},
        "spec": {"target": {"podName": pod}, "connection": connection, "checkpoint": "Fast", "waitForArchive": false},
    }))
    .expect("backup")
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::var("PGSNAP_BENCH_BACKUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let cluster = Cluster::from_env().await;
    let operator = Operator::start(
        &cluster.client,
        &[
            "--leader-election=false",
            &format!("--namespace={}", cluster.namespace),
        ],
    )
    .await;
    let idle = rss_mib(operator.pid());
    let db = postgres_pod(17).create(&cluster).await;
    db.pgbench_init(1);
    let secret = db.password_secret(&cluster).await;

    let api = cluster.api::<Backup>();
    let (mut window, mut checkpoint, mut cut, mut stop, mut overhead) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        let name = format!("bench-{i}");
        api.create(
            &PostParams::default(),
            &backup(&name, &db.name, Some(&secret)),
        )
        .await
        .expect("create");
        let done = cluster
            .wait_for(
                api.clone(),
                &name,
                "done",
                Duration::from_secs(120),
                terminal(),
            )
            .await;
        let status = done.status.expect("status");
        assert_eq!(status.phase, Some(Phase::Completed), "{:?}", status.error);
        let t = status.timings.expect("timings");
        window.push(
            status
                .backup_window
                .and_then(|w| w.seconds)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0),
        );
        checkpoint.push(t.checkpoint_seconds);
        cut.push(t.cut_seconds);
        stop.push(t.stop_seconds);
        overhead.push(t.overhead_seconds);
        // Keep the snapshot count flat: each backup's snapshots go with it.
        api.delete(&name, &DeleteParams::default())
            .await
            .expect("delete");
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
            &backup(&format!("mem-{i}"), "absent", None),
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
    let loaded = rss_mib(operator.pid());
    println!(
        "\n## Operator memory (RSS)\n\n| state | MiB |\n|---|---|\n| idle | {idle:.1} |\n| 500 Backup objects | {loaded:.1} |"
    );
}
