//! A backup of a server without any WAL archive restores. On every major 10-18, with
//! `archive_mode = off`: pgbench writes while the data directory is copied file by file in
//! backup mode (the snapshot); after the stop, while the session's slot still holds the WAL,
//! pg_wal is copied (the WAL snapshot) and the server lists the segments from the start to
//! the stop, as the operator proves them. `restore-prepare` takes those segments from the
//! copy, and the restore, with no restore command at all, holds every row committed before
//! the stop, balanced pgbench sums and silent amcheck.
//!
//! Negative controls: the WAL copy without its last segment is refused by restore-prepare
//! (`WalIncomplete`, naming it); with that check bypassed, PostgreSQL itself refuses to come
//! up, so the check is what stands between a user and a broken restore.

use std::fs;
use std::time::Duration;

use pgsnap::backup::phase::check_wal_kept;
use pgsnap::postgres::Session;
use pgsnap_e2e::pgharness::{
    Expect, Failure, Pg, TestDir, check_restore, fuzzy_copy, restore_target, write_marks,
};
use pgsnap_e2e::prepare::RestorePrepare;
use pgsnap_e2e::proof::committed_before;

async fn wal_kept_matrix(major: u32) {
    let dir = TestDir::new(&format!("walkept{major}"));
    let mut pg = Pg::init(
        major,
        &dir,
        "primary",
        &[
            ("archive_mode", "off"),
            // Checkpoints during the copy make the fuzzy copy fuzzier.
            ("checkpoint_timeout", "'30s'"),
        ],
    );
    pg.start(Duration::from_secs(60)).await.unwrap();
    pg.pgbench_init(1);
    let client = pg.client().await;
    let mut written = write_marks(&client, 1, 10).await;

    let load = pg.pgbench_load(2, 120);
    let mut s = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    let sysid = s.server().system_identifier;
    let segment_size = s.server().wal_segment_size;
    let started = s
        .start(&format!("wal kept {major}"), true, Duration::from_secs(300))
        .await
        .unwrap();
    assert!(started.wal_pinned);
    let copy = dir.0.join("copy");
    tokio::task::block_in_place(|| {
        fuzzy_copy(&pg.data, &copy.join("data"), Duration::from_millis(5))
    });
    // Committed after the snapshot, before the stop: only the kept WAL brings these back;
    // across segments, so the range is one to verify link by link.
    for round in 0..3 {
        written.extend(write_marks(&client, 1000 + round * 100, 50).await);
        client
            .batch_execute("select pg_switch_wal()")
            .await
            .unwrap();
    }
    let stopped = s.stop(false).await.unwrap();

    // The WAL snapshot, cut after the stop while pgbench still writes, and the proof.
    let wal = dir.0.join("wal-snapshot");
    tokio::task::block_in_place(|| fuzzy_copy(&pg.data.join("pg_wal"), &wal, Duration::ZERO));
    let (first, last) = (&stopped.label.start_wal_file, &stopped.stop_wal_file);
    let listed = s.list_wal(first, last).await.unwrap();
    check_wal_kept(first, last, segment_size, &listed).unwrap();
    s.release().await;
    load.finish();
    assert!(listed.len() >= 4, "{listed:?}");
    eprintln!(
        "PostgreSQL {major}: WAL kept from {first} to {last} ({} segments)",
        listed.len()
    );

    let expect = Expect {
        marks: committed_before(&written, stopped.stop_lsn),
        in_tablespace: Default::default(),
        pgbench: true,
    };
    let prepare = RestorePrepare::new(env!("CARGO_BIN_EXE_pgsnap"), &dir.0, &stopped, sysid);
    let wal_flags = |from: &std::path::Path| {
        vec![
            "--wal-from".to_string(),
            from.display().to_string(),
            "--wal-first".into(),
            first.clone(),
            "--wal-last".into(),
            last.clone(),
            "--wal-segment-size".into(),
            segment_size.to_string(),
        ]
    };
    let target = |name: &str| {
        let target = tokio::task::block_in_place(|| restore_target(major, &dir, &copy, name));
        target.join("data")
    };

    // The proof: no archive, no restore command.
    let data = target("restored");
    let run = prepare.prepare(&data, &wal_flags(&wal));
    assert!(
        run.stdout
            .contains(&format!("WAL segments {first}..{last}")),
        "{}",
        run.stdout
    );
    let mut good = Pg::existing(major, &data, dir.0.join("restored.log"));
    let report = check_restore(&mut good, &expect).await;
    assert!(
        report.is_ok(),
        "restore of PostgreSQL {major} from its kept WAL failed: {report:?}"
    );
    good.stop();

    // The WAL snapshot without its last segment: refused, naming it, nothing written.
    let short = dir.0.join("wal-short");
    tokio::task::block_in_place(|| fuzzy_copy(&wal, &short, Duration::ZERO));
    fs::remove_file(short.join(last)).unwrap();
    let data = target("short");
    let run = prepare.run(&data, &wal_flags(&short));
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "WalIncomplete: the backup's WAL lacks segment {last}"
        )),
        "{}",
        run.stderr
    );
    assert!(
        !data.join("backup_label").exists(),
        "a refusal wrote into the copy"
    );

    // The check bypassed: the same segments put into pg_wal by hand and the copy prepared
    // without them. PostgreSQL refuses to reach consistency.
    tokio::task::block_in_place(|| fuzzy_copy(&short, &data.join("pg_wal"), Duration::ZERO));
    prepare.prepare(&data, &[]);
    let mut bypassed = Pg::existing(major, &data, dir.0.join("short.log"));
    let report = check_restore(&mut bypassed, &expect).await;
    let Err(Failure::NotServing(log)) = report else {
        panic!("PostgreSQL {major} without the backup's last WAL segment: {report:?}");
    };
    // 13+ checks the recovery target first; before, the end of the backup.
    let refusal = match major {
        13.. => "FATAL:  recovery ended before configured recovery target was reached",
        _ => "FATAL:  WAL ends before end of online backup",
    };
    assert!(log.contains(refusal), "PostgreSQL {major}: {log}");
    bypassed.stop();
}

pgsnap_e2e::per_major! {
    wal_kept_matrix;
    wal_kept_pg10: 10, wal_kept_pg11: 11, wal_kept_pg12: 12, wal_kept_pg13: 13,
    wal_kept_pg14: 14, wal_kept_pg15: 15, wal_kept_pg16: 16, wal_kept_pg17: 17,
    wal_kept_pg18: 18,
}
