//! The YAML users copy from `examples/`, applied unchanged: PostgreSQL with its grants, a
//! Backup, a Restore and PostgreSQL on the restored claim, a Verification, a schedule.

use std::time::Duration;

use pgsnap::api::Backup;
use pgsnap::api::backup::Phase;
use pgsnap::api::restore::{Restore, RestorePhase};
use pgsnap::api::schedule::BackupSchedule;
use pgsnap::api::verification::{Verification, VerificationPhase};
use pgsnap_e2e::Cluster;
use pgsnap_e2e::operator::{Operator, cluster_shell};
use tokio_postgres::NoTls;

/// The single bigint `sql` returns, once the server answers it with a value.
async fn query_when_ready(conninfo: &str, sql: &str) -> Result<i64, String> {
    let mut last = String::new();
    for _ in 0..240 {
        match tokio_postgres::connect(conninfo, NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                // NULL: not ready yet (the query says so, e.g. while in recovery).
                match client.query_one(sql, &[]).await {
                    Ok(row) => match row.get::<_, Option<i64>>(0) {
                        Some(v) => return Ok(v),
                        None => last = "not ready".into(),
                    },
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(last)
}

#[tokio::test]
async fn the_examples_back_up_and_restore() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let ns = &cluster.namespace;
    cluster_shell(&format!(
        "kubectl -n {ns} apply -f examples/postgres.yaml >/dev/null"
    ));
    // TCP opens once the image's init scripts (the grants) have run.
    let source = format!(
        "host={} port=5432 user=postgres password=change-me-superuser dbname=postgres",
        cluster.pod_ip("orders-db-0").await
    );
    let created = query_when_ready(&source, "SELECT count(*) FROM (SELECT 1) AS ready").await;
    assert_eq!(
        created,
        Ok(1),
        "examples/postgres.yaml: the server does not answer:\n{}",
        cluster.pod_logs("orders-db-0").await
    );
    let (client, conn) = tokio_postgres::connect(&source, NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute("CREATE TABLE orders AS SELECT generate_series(1, 5000)::bigint AS id")
        .await
        .expect("orders");

    cluster_shell(&format!(
        "kubectl -n {ns} apply -f examples/backup.yaml >/dev/null"
    ));
    let terminal = |b: Option<&Backup>| {
        b.and_then(|b| b.status.as_ref())
            .and_then(|s| s.phase)
            .is_some_and(Phase::is_terminal)
    };
    let backup = cluster
        .wait_for(
            cluster.api::<Backup>(),
            "orders-1",
            "done",
            Duration::from_secs(120),
            terminal,
        )
        .await;
    let status = backup.status.unwrap();
    assert_eq!(
        status.phase,
        Some(Phase::Completed),
        "examples/backup.yaml: {:?}",
        status.error
    );

    cluster_shell(&format!(
        "kubectl -n {ns} apply -f examples/restore.yaml >/dev/null"
    ));
    let restored = |r: Option<&Restore>| {
        r.and_then(|r| r.status.as_ref())
            .and_then(|s| s.phase)
            .is_some_and(RestorePhase::is_terminal)
    };
    let restore = cluster
        .wait_for(
            cluster.api::<Restore>(),
            "orders-1-restore",
            "done",
            Duration::from_secs(120),
            restored,
        )
        .await;
    let status = restore.status.unwrap();
    assert_eq!(
        status.phase,
        Some(RestorePhase::Completed),
        "examples/restore.yaml: {:?}",
        status.error
    );
    let target = format!(
        "host={} port=5432 user=postgres password=change-me-superuser dbname=postgres",
        cluster.pod_ip("orders-restored").await
    );
    let rows = query_when_ready(
        &target,
        "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE (SELECT count(*) FROM orders) END",
    )
    .await;
    assert_eq!(
        rows,
        Ok(5000),
        "the restored server of examples/restore.yaml:\n{}",
        cluster.pod_logs("orders-restored").await
    );

    cluster_shell(&format!(
        "kubectl -n {ns} apply -f examples/verification.yaml >/dev/null"
    ));
    let verified = cluster
        .wait_for(
            cluster.api::<Verification>(),
            "orders-1-verify",
            "done",
            Duration::from_secs(180),
            |v: Option<&Verification>| {
                v.and_then(|v| v.status.as_ref())
                    .and_then(|s| s.phase)
                    .is_some_and(VerificationPhase::is_terminal)
            },
        )
        .await;
    let status = verified.status.unwrap();
    assert_eq!(
        status.phase,
        Some(VerificationPhase::Passed),
        "examples/verification.yaml: {:?}",
        status.error
    );

    // The schedule is accepted and planned (its first run is tonight).
    cluster_shell(&format!(
        "kubectl -n {ns} apply -f examples/schedule.yaml >/dev/null"
    ));
    let scheduled = cluster
        .wait_for(
            cluster.api::<BackupSchedule>(),
            "orders-nightly",
            "scheduled",
            Duration::from_secs(30),
            |s: Option<&BackupSchedule>| {
                s.and_then(|s| s.status.as_ref())
                    .is_some_and(|s| s.next_schedule_time.is_some())
            },
        )
        .await;
    let next = scheduled.status.unwrap().next_schedule_time.unwrap().0;
    let berlin = next.to_zoned(k8s_openapi::jiff::tz::TimeZone::get("Europe/Berlin").unwrap());
    assert_eq!((berlin.hour(), berlin.minute()), (3, 0), "{berlin}");
}
