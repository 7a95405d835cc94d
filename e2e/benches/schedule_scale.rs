//! Benchmark: BackupSchedules at scale, with a release build of the operator.
//!
//!   cargo build --release -p pgsnap && e2e/cluster up &&
//!   PGSNAP_PROFILE=release cargo bench -p pgsnap-e2e --bench schedule_scale
//!
//! 1. N databases (default 50, `PGSNAP_BENCH_DATABASES`), PostgreSQL 17 pods, one schedule
//!    each, all due at the same instants (every 30 s, `PGSNAP_BENCH_ROUNDS` rounds, default
//!    2): every run's result (the goal is no failure), and the time from its due time (the
//!    run's `pgsnap.io/scheduled-at`) to its server being in backup mode (the operator's
//!    "in backup mode" log line, when `pg_backup_start` has returned), min/p50/p99. The
//!    operator runs with its default of 4 backup sessions at once (`PGSNAP_BENCH_SESSIONS`
//!    sets `--max-concurrent-backups`), so with many databases most of that time is the
//!    queue; the minimum is the operator's own reaction.
//! 2. The operator's resident memory idle, then with 100 BackupSchedules and 1,000 Backups in
//!    its cache (Backups of a pod that does not exist: each fails at once and stays).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use pgsnap::api::Backup;
use pgsnap::api::backup::Phase;
use pgsnap::api::schedule::BackupSchedule;
use pgsnap::schedule::SCHEDULED_AT_ANNOTATION;
use pgsnap_e2e::backups::schedule;
use pgsnap_e2e::operator::Operator;
use pgsnap_e2e::percentile;
use pgsnap_e2e::{Cluster, PostgresPod, postgres_pod};
use serde_json::json;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A schedule of `template` on `pattern`, keeping ten.
fn schedule_of(
    name: &str,
    pattern: &str,
    suspend: bool,
    template: serde_json::Value,
) -> BackupSchedule {
    let mut s = schedule(name, pattern, template);
    s.spec.suspend = suspend;
    s.spec.retention.keep_last = Some(10);
    s
}

/// When each Backup's server was in backup mode, from the operator's log (text format:
/// `<time> INFO ...backup{namespace=.. name=<backup>}: ...: in backup mode ...`).
fn in_backup_mode(log: &str) -> BTreeMap<String, Timestamp> {
    let mut at = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("in backup mode")) {
        // Without the terminal colours.
        let mut plain = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                chars.by_ref().find(|c| *c == 'm');
            } else {
                plain.push(c);
            }
        }
        let time = plain.split_whitespace().next().and_then(|t| t.parse().ok());
        let name = plain
            .split_once("backup{namespace=")
            .and_then(|(_, rest)| rest.split_once(" name="))
            .and_then(|(_, rest)| rest.split_once('}'))
            .map(|(name, _)| name.to_string());
        if let (Some(time), Some(name)) = (time, name) {
            at.insert(name, time);
        }
    }
    at
}

async fn databases(cluster: &Cluster, n: usize) -> Vec<(PostgresPod, String)> {
    let mut made = Vec::new();
    // Ten at a time: initdb is CPU-bound and the machine has two cores.
    for batch in (0..n).collect::<Vec<_>>().chunks(10) {
        let pods = batch.iter().map(|i| {
            postgres_pod(17)
                .name(&format!("db{i:02}"))
                .setting("shared_buffers", "16MB")
                .create(cluster)
        });
        for db in futures::future::join_all(pods).await {
            let secret = db.password_secret(cluster).await;
            made.push((db, secret));
        }
    }
    made
}

async fn scheduled_runs(cluster: &Cluster) -> Vec<Backup> {
    cluster
        .api::<Backup>()
        .list(&ListParams::default().labels("pgsnap.io/schedule"))
        .await
        .expect("list")
        .items
}

#[tokio::main]
async fn main() {
    let release = std::env::var("PGSNAP_PROFILE").as_deref() == Ok("release");
    let cluster = Cluster::from_env().await;
    let sessions = env_or("PGSNAP_BENCH_SESSIONS", 4);
    let operator = Operator::start(
        &cluster.client,
        &[
            "--leader-election=false",
            &format!("--namespace={}", cluster.namespace),
            &format!("--max-concurrent-backups={sessions}"),
        ],
    )
    .await;
    let n = env_or("PGSNAP_BENCH_DATABASES", 50);
    let rounds = env_or("PGSNAP_BENCH_ROUNDS", 2);
    println!(
        "{} build; {n} databases, {rounds} rounds, {sessions} sessions at once",
        if release { "release" } else { "debug" }
    );

    let t0 = Instant::now();
    let dbs = databases(&cluster, n).await;
    println!("{n} PostgreSQL pods ready in {:.0?}", t0.elapsed());

    let schedules = cluster.api::<BackupSchedule>();
    for (db, secret) in &dbs {
        let template = json!({
            "target": {"podName": db.name},
            "connection": {"passwordSecretRef": {"name": secret, "key": "password"}},
            "checkpoint": "Fast", "waitForArchive": false,
        });
        schedules
            .create(
                &PostParams::default(),
                &schedule_of(&db.name, "*/30 * * * * *", false, template),
            )
            .await
            .expect("schedule");
    }
    let t0 = Instant::now();
    let runs = loop {
        let runs = scheduled_runs(&cluster).await;
        let ended = runs
            .iter()
            .filter(|b| {
                b.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(Phase::is_terminal)
            })
            .count();
        if ended >= n * rounds {
            break runs;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60 * (rounds as u64 + 4)),
            "{ended} of {} runs ended",
            n * rounds
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    for (db, _) in &dbs {
        schedules
            .patch(
                &db.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"suspend": true}})),
            )
            .await
            .expect("suspend");
    }
    let entered = in_backup_mode(&std::fs::read_to_string(operator.log_path()).unwrap_or_default());
    let (mut latency, mut window, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for b in runs.iter().filter(|b| {
        b.status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(Phase::is_terminal)
    }) {
        let status = b.status.as_ref().unwrap();
        if status.phase == Some(Phase::Failed) {
            failed.push((b.name_any(), status.error.clone()));
            continue;
        }
        let due: Timestamp = b.annotations()[SCHEDULED_AT_ANNOTATION].parse().unwrap();
        if let Some(at) = entered.get(&b.name_any()) {
            latency.push(at.duration_since(due).as_secs_f64());
        }
        if let Some(s) = status
            .backup_window
            .as_ref()
            .and_then(|w| w.seconds.clone())
        {
            window.push(s.parse::<f64>().unwrap_or_default());
        }
    }
    latency.sort_by(f64::total_cmp);
    window.sort_by(f64::total_cmp);
    println!(
        "runs ended: {}, Failed: {} {failed:?}",
        latency.len() + failed.len(),
        failed.len()
    );
    println!(
        "due time -> in backup mode: min {:.2} s, p50 {:.2} s, p99 {:.2} s, max {:.2} s ({} runs)",
        latency.first().copied().unwrap_or_default(),
        percentile(&latency, 0.5),
        percentile(&latency, 0.99),
        latency.last().copied().unwrap_or_default(),
        latency.len()
    );
    println!(
        "time in backup mode: p50 {:.2} s, p99 {:.2} s",
        percentile(&window, 0.5),
        percentile(&window, 0.99)
    );

    // Memory: idle (the databases' schedules suspended), then with 100 more schedules and
    // 1,000 Backups in the cache.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = operator.rss_mib();
    let template = json!({"target": {"podName": "no-such-pod"}, "connection": {}});
    for i in 0..100 {
        schedules
            .create(
                &PostParams::default(),
                &schedule_of(&format!("idle-{i:03}"), "0 3 * * *", true, template.clone()),
            )
            .await
            .expect("schedule");
    }
    let backups = cluster.api::<Backup>();
    for i in 0..1000 {
        let b: Backup = serde_json::from_value(json!({
            "apiVersion": "pgsnap.io/v1alpha1", "kind": "Backup",
            "metadata": {"name": format!("cache-{i:04}")}, "spec": template,
        }))
        .unwrap();
        backups
            .create(&PostParams::default(), &b)
            .await
            .expect("backup");
    }
    let t0 = Instant::now();
    loop {
        let failed = backups
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .iter()
            .filter(|b| b.name_any().starts_with("cache-"))
            .filter(|b| b.status.as_ref().and_then(|s| s.phase) == Some(Phase::Failed))
            .count();
        if failed == 1000 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "{failed} of 1000 ended"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!(
        "1,000 Backups failed (TargetPodNotFound) in {:.0?}",
        t0.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let loaded = operator.rss_mib();
    let total = backups
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .len();
    let schedules_now = schedules
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .len();
    println!(
        "operator RSS: {idle:.1} MiB idle ({n} schedules); {loaded:.1} MiB with {schedules_now} schedules and {total} Backups"
    );

    // Leave nothing for the namespace's deletion to wait on: the operator, still running,
    // takes the finalizers off.
    backups
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .expect("delete the Backups");
    schedules
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .expect("delete the schedules");
    let t0 = Instant::now();
    while !backups
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .is_empty()
    {
        assert!(t0.elapsed() < Duration::from_secs(600), "Backups remain");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
