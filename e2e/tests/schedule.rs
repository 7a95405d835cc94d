//! BackupSchedule on the test cluster: runs every few seconds make Completed Backups,
//! retention prunes them to `keepLast` (their snapshots go with them), a Backup made by hand
//! is never touched, suspend stops new runs, a pattern that cannot be parsed says so, and
//! deleting the schedule keeps its Backups.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use pgsnap::api::Backup;
use pgsnap::api::backup::Phase;
use pgsnap::api::schedule::BackupSchedule;
use pgsnap::api::snapshot::VolumeSnapshot;
use pgsnap::controller;
use pgsnap_e2e::operator::Operator;
use pgsnap_e2e::{Cluster, postgres_pod};
use serde_json::json;

fn schedule(name: &str, pattern: &str, template: serde_json::Value) -> BackupSchedule {
    serde_json::from_value(json!({
        "apiVersion": "pgsnap.io/v1alpha1", "kind": "BackupSchedule",
        "metadata": {"name": name},
        "spec": {"schedule": pattern, "retention": {"keepLast": 2}, "backupTemplate": template},
    }))
    .expect("a BackupSchedule")
}

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
