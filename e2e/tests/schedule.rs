//! BackupSchedule on the test cluster: runs every few seconds make Completed Backups,
//! retention prunes them to `keepLast` (their snapshots go with them), a Backup made by hand
//! is never touched, suspend stops new runs, a pattern that cannot be parsed says so, and
//! deleting the schedule keeps its Backups; after an outage one catch-up run, and a Backup a
//! Restore uses outlives its retention.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use pgsnap::api::Backup;
use pgsnap::api::backup::Phase;
use pgsnap::api::restore::Restore;
use pgsnap::api::schedule::{BackupSchedule, ConcurrencyPolicy};
use pgsnap::api::snapshot::VolumeSnapshot;
use pgsnap::controller;
use pgsnap::schedule::SCHEDULED_AT_ANNOTATION;
use pgsnap_e2e::backups::schedule;
use pgsnap_e2e::operator::Operator;
use pgsnap_e2e::{Cluster, postgres_pod};
use serde_json::json;

fn phase(backup: &Backup) -> Option<Phase> {
    backup.status.as_ref().and_then(|s| s.phase)
}

/// The schedule's Backups now (by its uid label).
async fn scheduled(cluster: &Cluster, uid: &str) -> Vec<Backup> {
    cluster
        .api::<Backup>()
        .list(&ListParams::default().labels(&format!("pgsnap.io/schedule-uid={uid}")))
        .await
        .expect("list")
        .items
}

#[tokio::test]
async fn a_schedule_backs_up_and_prunes_to_its_retention() {
    let cluster = Cluster::from_env().await;
    let operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(17).create(&cluster).await;
    let secret = db.password_secret(&cluster).await;
    let template = json!({
        "target": {"podName": db.name},
        "connection": {"passwordSecretRef": {"name": secret, "key": "password"}},
        "checkpoint": "Fast", "waitForArchive": false,
    });
    let backups = cluster.api::<Backup>();
    let by_hand: Backup = serde_json::from_value(json!({
        "apiVersion": "pgsnap.io/v1alpha1", "kind": "Backup",
        "metadata": {"name": "by-hand"}, "spec": template,
    }))
    .unwrap();
    backups
        .create(&PostParams::default(), &by_hand)
        .await
        .unwrap();

    let schedules = cluster.api::<BackupSchedule>();
    let made = schedules
        .create(
            &PostParams::default(),
            &schedule("nightly", "*/5 * * * * *", template.clone()),
        )
        .await
        .unwrap();
    let uid = made.uid().unwrap();
    // Runs every 5 s until five Backups were made; at most keepLast Completed ones stay.
    let mut seen = BTreeSet::new();
    let since = Instant::now();
    while seen.len() < 5 {
        assert!(
            since.elapsed() < Duration::from_secs(120),
            "only {seen:?} made"
        );
        for b in scheduled(&cluster, &uid).await {
            assert_ne!(phase(&b), Some(Phase::Failed), "{:#?}", b.status);
            seen.insert(b.name_any());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Suspended: no new run; once the last one has ended, retention leaves keepLast.
    schedules
        .patch(
            "nightly",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await
        .unwrap();
    // Once the schedule has said so, no pass acts on the old spec any more.
    let suspended = |s: Option<&BackupSchedule>| {
        s.is_some_and(|s| {
            let status = s.status.as_ref();
            status.and_then(|st| st.observed_generation) == s.metadata.generation
                && status.is_some_and(|st| {
                    controller::ready_says(&st.conditions, "Scheduled", "suspended")
                })
        })
    };
    cluster
        .wait_for(
            schedules.clone(),
            "nightly",
            "suspended",
            Duration::from_secs(30),
            suspended,
        )
        .await;
    let settled = |backups: &[Backup]| {
        let running = backups
            .iter()
            .any(|b| !phase(b).is_some_and(Phase::is_terminal));
        let completed = backups
            .iter()
            .filter(|b| phase(b) == Some(Phase::Completed))
            .count();
        !running && completed <= 2
    };
    let since = Instant::now();
    let mut now = scheduled(&cluster, &uid).await;
    while !settled(&now) {
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "retention keeps the last 2: {:?}",
            now.iter()
                .map(|b| (b.name_any(), phase(b)))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        now = scheduled(&cluster, &uid).await;
    }
    let before: BTreeSet<String> = now.iter().map(|b| b.name_any()).collect();
    assert!(seen.iter().all(|n| n.starts_with("nightly-")), "{seen:?}");
    // A pruned Backup's snapshots go with it.
    let pruned: Vec<&String> = seen.iter().filter(|n| !before.contains(*n)).collect();
    assert!(!pruned.is_empty(), "nothing pruned of {seen:?}");
    let since = Instant::now();
    loop {
        let snapshots: Vec<String> = cluster
            .api::<VolumeSnapshot>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(|s| s.name_any())
            .collect();
        let left: Vec<&String> = snapshots
            .iter()
            .filter(|s| pruned.iter().any(|p| s.starts_with(&format!("{p}-"))))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "pruned Backups' snapshots remain: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The Backup made by hand is never the schedule's to prune.
    assert!(backups.get_opt("by-hand").await.unwrap().is_some());

    let status = schedules.get("nightly").await.unwrap().status.unwrap();
    assert!(status.next_schedule_time.is_some() && status.last_schedule_time.is_some());
    let last = status
        .last_successful_backup
        .expect("a last successful backup");
    assert!(
        before.contains(&last.name),
        "{} is not among {before:?}",
        last.name
    );
    assert!(
        status
            .kept
            .iter()
            .any(|k| k.reasons.contains(&"newest".to_string())),
        "{:?}",
        status.kept
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (
            ready.status.as_str(),
            ready.reason.as_str(),
            ready.message.as_str()
        ),
        ("True", "Scheduled", "suspended")
    );
    // What alerts read: the last success and the expected interval, per schedule.
    let metrics = operator.metrics().await;
    let series = format!(
        "{{namespace=\"{}\",schedule=\"nightly\"}}",
        cluster.namespace
    );
    assert!(
        metrics.contains(&format!("pgsnap_schedule_interval_seconds{series} 5")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "pgsnap_schedule_last_success_timestamp_seconds{series} "
        )),
        "{metrics}"
    );
    // And per database, by its system identifier.
    let sysid = db
        .sql_value("SELECT system_identifier FROM pg_control_system()")
        .await;
    assert!(
        metrics.contains(&format!(
            "pgsnap_database_last_success_timestamp_seconds{{namespace=\"{}\",database=\"{sysid}\"}} ",
            cluster.namespace
        )),
        "{metrics}"
    );
    // Two more runs come due while suspended.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let after: BTreeSet<String> = scheduled(&cluster, &uid)
        .await
        .iter()
        .map(|b| b.name_any())
        .collect();
    assert_eq!(after, before, "a suspended schedule made Backups");

    // A pattern that cannot be parsed: Ready False, the parser's reason.
    schedules
        .create(
            &PostParams::default(),
            &schedule("broken", "61 * * * *", template),
        )
        .await
        .unwrap();
    let broken = cluster
        .wait_for(
            schedules.clone(),
            "broken",
            "InvalidSchedule",
            Duration::from_secs(30),
            |s: Option<&BackupSchedule>| {
                s.and_then(|s| s.status.as_ref())
                    .is_some_and(|st| st.conditions.iter().any(|c| c.reason == "InvalidSchedule"))
            },
        )
        .await;
    let condition = &broken.status.unwrap().conditions[0];
    assert_eq!(condition.status, "False");
    assert!(
        condition.message.starts_with("schedule \"61 * * * *\""),
        "{}",
        condition.message
    );

    // Deleting the schedule (backupDeletionPolicy Keep) keeps its Backups.
    schedules
        .delete("nightly", &DeleteParams::default())
        .await
        .unwrap();
    let since = Instant::now();
    while schedules.get_opt("nightly").await.unwrap().is_some() {
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "the schedule is not gone"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let kept = scheduled(&cluster, &uid).await;
    assert_eq!(
        kept.iter().map(|b| b.name_any()).collect::<BTreeSet<_>>(),
        after,
        "the schedule's Backups stay"
    );
}

/// After an outage the schedule makes at most one catch-up run for the missed ones, never a
/// burst (`Replace`: it replaces whatever run the outage interrupted; which run is the
/// catch-up is `plan::due`'s unit tests'); a
/// Backup that a Restore in progress uses is kept past its retention; the restarted operator
/// rebuilds the freshness metrics from the Backups it finds.
#[tokio::test]
async fn after_an_outage_one_catch_up_run_and_a_restore_holds_its_backup() {
    let cluster = Cluster::from_env().await;
    let mut operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(17).archive_volume().create(&cluster).await;
    let secret = db.password_secret(&cluster).await;
    let template = json!({
        "target": {"podName": db.name},
        "connection": {"passwordSecretRef": {"name": secret, "key": "password"}},
        "checkpoint": "Fast", "waitForArchive": false,
        // A run every 4 s with Replace: no WAL snapshot, so a run ends before the next.
        "walSource": "Archive",
    });
    let mut often = schedule("often", "*/4 * * * * *", template);
    often.spec.retention.keep_last = Some(1);
    often.spec.starting_deadline = pgsnap::api::Duration(Duration::from_secs(60));
    // Replace: a run the killed operator left behind never blocks the catch-up (Forbid would
    // skip it, as a CronJob does).
    often.spec.concurrency_policy = ConcurrencyPolicy::Replace;
    let uid = cluster
        .api::<BackupSchedule>()
        .create(&PostParams::default(), &often)
        .await
        .unwrap()
        .uid()
        .unwrap();
    let since = Instant::now();
    let held = loop {
        let done = scheduled(&cluster, &uid).await;
        if let Some(b) = done.iter().find(|b| phase(b) == Some(Phase::Completed)) {
            break b.name_any();
        }
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "no Completed run"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // A Restore that stays in progress: its claim's StorageClass does not exist.
    let restore: Restore = serde_json::from_value(json!({
        "apiVersion": "pgsnap.io/v1alpha1", "kind": "Restore",
        "metadata": {"name": "holds"},
        "spec": {
            "backupName": held,
            "claims": [{"role": "Data", "name": "held-data", "storageClassName": "never-binds"}],
            "recovery": {"restoreCommand": "cp /archive/%f %p"},
        },
    }))
    .unwrap();
    cluster
        .api::<Restore>()
        .create(&PostParams::default(), &restore)
        .await
        .unwrap();

    // The operator is away for four runs.
    operator.kill();
    tokio::time::sleep(Duration::from_secs(16)).await;
    let before: BTreeSet<String> = scheduled(&cluster, &uid)
        .await
        .iter()
        .map(|b| b.name_any())
        .collect();
    operator = Operator::for_test(&cluster).await;
    // Every run due before the operator is back is a missed one; its first pass makes one
    // run for them all, for the latest (which may be due after this instant, when its start
    // took long enough: then that run is the catch-up).
    let back = k8s_openapi::jiff::Timestamp::now();
    let scheduled_at = |b: &Backup| -> k8s_openapi::jiff::Timestamp {
        b.annotations()[SCHEDULED_AT_ANNOTATION].parse().unwrap()
    };
    // Until a regular run after the restart has come: the catch-up had its chance.
    let since = Instant::now();
    let runs = loop {
        let runs = scheduled(&cluster, &uid).await;
        if runs.iter().any(|b| scheduled_at(b) > back) {
            break runs;
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "no run after the restart"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Counted from the schedule's Events, not the Backups: Replace and retention would
    // delete the Backups of a burst.
    let events: Vec<String> = cluster
        .api::<Event>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("BackupCreated"))
        .filter_map(|e| e.note)
        .collect();
    // "Backup <name> for the run due at <time>"
    let missed: Vec<&String> = events
        .iter()
        .filter(|note| {
            let name = note.split_whitespace().nth(1).unwrap_or_default();
            let due = note.rsplit("due at ").next().and_then(|t| t.parse().ok());
            !before.contains(name)
                && due.is_some_and(|due: k8s_openapi::jiff::Timestamp| due <= back)
        })
        .collect();
    let all: Vec<_> = runs.iter().map(|b| (b.name_any(), phase(b))).collect();
    assert!(
        missed.len() <= 1,
        "at most one catch-up run for four missed, never a burst: {missed:?} {all:?}"
    );

    // Retention keeps one, and the Backup the Restore uses besides; the schedule says why.
    let since = Instant::now();
    loop {
        let status = cluster
            .api::<BackupSchedule>()
            .get("often")
            .await
            .unwrap()
            .status;
        let kept = status.map(|s| s.kept).unwrap_or_default();
        if let Some(k) = kept.iter().find(|k| k.name == held) {
            assert!(k.reasons.contains(&"restoring".to_string()), "{kept:?}");
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "{held} not kept: {kept:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        cluster
            .api::<Backup>()
            .get_opt(&held)
            .await
            .unwrap()
            .is_some()
    );
    let sysid = db
        .sql_value("SELECT system_identifier FROM pg_control_system()")
        .await;
    let freshness = format!(
        "pgsnap_database_last_success_timestamp_seconds{{namespace=\"{}\",database=\"{sysid}\"}} ",
        cluster.namespace
    );
    assert!(
        operator.metrics().await.contains(&freshness),
        "no {freshness}"
    );

    cluster
        .api::<Restore>()
        .delete("holds", &DeleteParams::default())
        .await
        .unwrap();
    cluster
        .api::<BackupSchedule>()
        .delete("often", &DeleteParams::default())
        .await
        .unwrap();
}
