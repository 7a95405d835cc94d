//! Backups from a streaming standby. The standby itself is made the pgsnap way: a fuzzy
//! copy of the primary taken inside a backup session, plus the returned backup_label. Then a
//! backup of the standby under pgbench load says BACKUP FROM: standby and restores, and a
//! promotion in the middle of a standby backup ends in StandbyPromoted.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use pgsnap::backup::phase::{check_wal_kept, standby_streams, streamed};
use pgsnap::postgres::{BackupFrom, Error, Lsn, Session, Step};
use pgsnap_e2e::pgharness::{
    Expect, Pg, TestDir, archive_command, check_restore, chown, fuzzy_copy, restore_target,
    write_marks,
};
use pgsnap_e2e::prepare::{RestorePrepare, kept_wal_flags};
use pgsnap_e2e::proof::committed_before;

/// A streaming standby of `primary` in `dir/standby`, seeded by a pgsnap backup.
async fn make_standby(primary: &Pg, dir: &TestDir, archive: &Path) -> Pg {
    let mut s = Session::connect(&primary.opts("postgres", None))
        .await
        .unwrap();
    s.start("seed standby", true, Duration::from_secs(120))
        .await
        .unwrap();
    let data = dir.0.join("standby/data");
    tokio::task::block_in_place(|| fuzzy_copy(&primary.data, &data, Duration::ZERO));
    let stopped = s.stop(true).await.unwrap();
    fs::write(data.join("backup_label"), &stopped.labelfile).unwrap();

    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres application_name=standby",
        primary.port
    );
    let restore = format!("cp {}/%f %p", archive.display());
    if primary.major >= 12 {
        fs::write(data.join("standby.signal"), "").unwrap();
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        writeln!(
            conf,
            "archive_mode = off\nprimary_conninfo = '{conninfo}'\nrestore_command = '{restore}'"
        )
        .unwrap();
    } else {
        fs::write(
            data.join("recovery.conf"),
            format!("standby_mode = 'on'\nprimary_conninfo = '{conninfo}'\nrestore_command = '{restore}'\n"),
        )
        .unwrap();
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        writeln!(conf, "archive_mode = off").unwrap();
    }
    let mut standby = Pg::existing(primary.major, &data, dir.0.join("standby.log"));
    chown(&data);
    standby.start(Duration::from_secs(90)).await.unwrap();
    standby
}

/// Waits until the standby has replayed row `id` of the proof.
async fn wait_replayed(standby: &Pg, id: i64) {
    let client = standby.client().await;
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = client
            .query_one("select count(*) from marks where v = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            return;
        }
        assert!(
            Instant::now() < until,
            "standby did not replay row {id}:\n{}",
            standby.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Changes full_page_writes on the primary and lets the standby replay it and make a
/// restartpoint, which is where a standby records the primary's setting.
async fn set_full_page_writes(primary: &Pg, standby: &Pg, on: bool) {
    primary
        .exec(&format!("alter system set full_page_writes = {on}"))
        .await;
    primary.exec("select pg_reload_conf()").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    primary.exec("checkpoint").await;
    let target: String = primary
        .client()
        .await
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let sclient = standby.client().await;
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let caught_up: bool = sclient
            .query_one(
                "select pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                &[&target],
            )
            .await
            .unwrap()
            .get(0);
        if caught_up {
            break;
        }
        assert!(
            Instant::now() < until,
            "standby did not replay up to {target}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sclient.batch_execute("checkpoint").await.unwrap();
}

async fn wait_archived(archive: &Path, file: &str) {
    let until = Instant::now() + Duration::from_secs(60);
    while !archive.join(file).exists() {
        assert!(Instant::now() < until, "{file} never archived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn standby_matrix(major: u32) {
    let dir = TestDir::new(&format!("standby{major}"));
    let archive = dir.owned("archive");
    let mut primary = Pg::init(
        major,
        &dir,
        "primary",
        &[
            ("archive_mode", "on"),
            ("archive_command", &archive_command(&archive)),
        ],
    );
    primary.start(Duration::from_secs(60)).await.unwrap();
    primary.pgbench_init(1);
    let pclient = primary.client().await;
    let mut written = write_marks(&pclient, 1, 10).await;

    let mut standby = make_standby(&primary, &dir, &archive).await;
    wait_replayed(&standby, 10).await;

    // 6. A backup of the standby, under load on the primary.
    let load = primary.pgbench_load(2, 120);
    let mut s = Session::connect(&standby.opts("postgres", None))
        .await
        .unwrap();
    assert!(s.server().in_recovery);
    assert_eq!(s.server().timeline, 1);
    let started = s
        .start("from the standby", true, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(
        started.wal_pinned,
        "a temporary slot on a standby: {:?}",
        started.wal_not_pinned_reason
    );
    let copy = dir.0.join("copy/data");
    tokio::task::block_in_place(|| fuzzy_copy(&standby.data, &copy, Duration::from_millis(5)));
    written.extend(write_marks(&pclient, 1000, 30).await);
    wait_replayed(&standby, 1029).await;
    let stopped = s.stop(true).await.unwrap();
    load.finish();
    assert_eq!(stopped.label.backup_from, BackupFrom::Standby);
    assert!(stopped.labelfile.contains("BACKUP FROM: standby"));
    assert!(stopped.stop_lsn >= started.start_lsn);

    // A standby backup is consistent at the standby's minimum recovery point, which may be
    // behind rows it replayed: recover to a target past them (and past that point),
    // which the primary's archive must reach.
    let target: Lsn = pclient
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get::<_, &str>(0)
        .parse()
        .unwrap();
    let last: String = pclient
        .query_one("select pg_walfile_name(pg_switch_wal())", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        last >= stopped.stop_wal_file,
        "{last} < {}",
        stopped.stop_wal_file
    );
    wait_archived(&archive, &last).await;

    let sysid = s.server().system_identifier;
    RestorePrepare::new(env!("CARGO_BIN_EXE_pgsnap"), &dir.0, &stopped, sysid).prepare(
        &copy,
        &[
            "--restore-command".to_string(),
            format!("cp {}/%f %p", archive.display()),
            "--target-lsn".to_string(),
            target.to_string(),
            // The copy is a standby's: without this it would stay one.
            "--remove-standby-signal".to_string(),
        ],
    );
    let mut restored = Pg::existing(major, &copy, dir.0.join("restored.log"));
    let report = check_restore(
        &mut restored,
        &Expect {
            marks: committed_before(&written, target),
            in_tablespace: vec![],
            pgbench: true,
        },
    )
    .await;
    assert!(
        report.is_ok(),
        "restore of a PostgreSQL {major} standby backup: {report:?}"
    );
    restored.stop();

    // full_page_writes = off on the primary makes standby backups unsafe: refused, typed.
    set_full_page_writes(&primary, &standby, false).await;
    let mut f = Session::connect(&standby.opts("postgres", None))
        .await
        .unwrap();
    let err = f
        .start("torn pages", true, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(
        err.reason(),
        "FullPageWritesOff",
        "PostgreSQL {major}: {err}"
    );
    eprintln!("PostgreSQL {major} standby, full_page_writes off: {err}");
    drop(f);
    set_full_page_writes(&primary, &standby, true).await;

    // Promotion during a standby backup.
    let mut p = Session::connect(&standby.opts("postgres", None))
        .await
        .unwrap();
    p.start("interrupted by promotion", true, Duration::from_secs(120))
        .await
        .unwrap();
    tokio::task::block_in_place(|| standby.pg_ctl(&["promote", "-w", "-t", "60"]));
    let err = p.stop(true).await.unwrap_err();
    assert!(
        matches!(err, Error::StandbyPromoted { .. }),
        "PostgreSQL {major}: {err:?}"
    );
    eprintln!("PostgreSQL {major} promoted mid-backup: {err}");
    standby.stop();
    primary.stop();
}

pgsnap_e2e::per_major! {
    standby_matrix;
    standby_pg10: 10, standby_pg11: 11, standby_pg12: 12, standby_pg13: 13, standby_pg14: 14,
    standby_pg15: 15, standby_pg16: 16, standby_pg17: 17, standby_pg18: 18,
}

/// A standby's backup keeps its own WAL, with no archive: the standby streams, the backup's
/// session holds a slot on it, and after the stop its WAL receiver is shown to have written
/// every segment of the backup into pg_wal (one receiver, streaming from before the backup's
/// start, flushed past its stop), pg_wal is copied (the WAL snapshot) and listed. The restore
/// takes those segments and recovers with no restore command to the standby's consistent
/// point, holding every row the standby had replayed before the backup started.
async fn standby_wal_kept(major: u32) {
    let dir = TestDir::new(&format!("standbykept{major}"));
    let archive = dir.owned("archive");
    // The standby has no slot on the primary: kept WAL, or the primary's checkpoint during the
    // backup may remove segments it has not streamed yet, and its receiver restarts from the
    // archive (pgsnap then refuses, rightly, as WalIncomplete).
    let keep = match major {
        ..=12 => ("wal_keep_segments", "64"),
        _ => ("wal_keep_size", "'1GB'"),
    };
    let mut primary = Pg::init(
        major,
        &dir,
        "primary",
        &[
            ("archive_mode", "on"),
            ("archive_command", &archive_command(&archive)),
            keep,
        ],
    );
    primary.start(Duration::from_secs(60)).await.unwrap();
    primary.pgbench_init(1);
    let pclient = primary.client().await;
    let mut replayed = write_marks(&pclient, 1, 10).await;
    let mut standby = make_standby(&primary, &dir, &archive).await;
    // A restartpoint on WAL the standby streamed: the backup starts there.
    replayed.extend(write_marks(&pclient, 100, 30).await);
    pclient.batch_execute("checkpoint").await.unwrap();
    replayed.extend(write_marks(&pclient, 200, 1).await);
    wait_replayed(&standby, 200).await;

    let load = primary.pgbench_load(2, 120);
    let mut s = Session::connect(&standby.opts("postgres", None))
        .await
        .unwrap();
    let before = s
        .wal_receiver(Step::Connect)
        .await
        .unwrap()
        .expect("a WAL receiver");
    standby_streams(Some(&before), "postgres").unwrap();
    let segment_size = s.server().wal_segment_size;
    let sysid = s.server().system_identifier;
    let started = s
        .start("standby keeps its WAL", true, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(started.wal_pinned, "{:?}", started.wal_not_pinned_reason);
    let copy = dir.0.join("copy");
    tokio::task::block_in_place(|| {
        fuzzy_copy(&standby.data, &copy.join("data"), Duration::from_millis(5))
    });
    // Across segments. A standby's stop is its minimum recovery point, which lags what it
    // replayed until pages are flushed.
    for round in 0..3 {
        write_marks(&pclient, 1000 + round * 100, 30).await;
        pclient
            .batch_execute("select pg_switch_wal()")
            .await
            .unwrap();
    }
    // A checkpoint the standby replays, then its restartpoint there: its minimum recovery
    // point moves on, so the range spans the switched segments, and the restartpoint would
    // recycle the range's first ones but for the backup's slot.
    pclient.batch_execute("checkpoint").await.unwrap();
    write_marks(&pclient, 2000, 1).await;
    wait_replayed(&standby, 2000).await;
    let sclient = standby.client().await;
    sclient.batch_execute("checkpoint").await.unwrap();
    let redo: Lsn = sclient
        .query_one("select redo_lsn::text from pg_control_checkpoint()", &[])
        .await
        .unwrap()
        .get::<_, &str>(0)
        .parse()
        .unwrap();
    assert!(
        redo.0 / segment_size > started.start_lsn.0 / segment_size,
        "the restartpoint's redo {redo} is past the backup's first segment"
    );
    let stopped = s.stop(false).await.unwrap();
    assert_eq!(stopped.label.backup_from, BackupFrom::Standby);
    let after = s.wal_receiver(Step::Stop).await.unwrap();
    streamed(
        &before,
        after.as_ref(),
        stopped.label.start_wal_location,
        stopped.stop_lsn,
        stopped.timeline,
    )
    .unwrap();
    let (first, last) = (&stopped.label.start_wal_file, &stopped.stop_wal_file);
    let wal = dir.0.join("wal-snapshot");
    tokio::task::block_in_place(|| fuzzy_copy(&standby.data.join("pg_wal"), &wal, Duration::ZERO));
    let listed = s.list_wal(first, last).await.unwrap();
    check_wal_kept(first, last, segment_size, &listed).unwrap();
    assert!(listed.len() >= 3, "{listed:?}");
    s.release().await;
    load.finish();
    eprintln!(
        "PostgreSQL {major} standby: WAL kept from {first} to {last} ({} segments), streamed from {:?}",
        listed.len(),
        before.start
    );

    let target = tokio::task::block_in_place(|| restore_target(major, &dir, &copy, "restored"));
    let data = target.join("data");
    let mut flags = kept_wal_flags(&wal, &stopped, segment_size);
    flags.push("--remove-standby-signal".into());
    let run = RestorePrepare::new(env!("CARGO_BIN_EXE_pgsnap"), &dir.0, &stopped, sysid)
        .prepare(&data, &flags);
    assert!(
        run.stdout
            .contains(&format!("WAL segments {first}..{last}")),
        "{}",
        run.stdout
    );
    let mut restored = Pg::existing(major, &data, dir.0.join("restored.log"));
    let report = check_restore(
        &mut restored,
        &Expect {
            marks: replayed.iter().map(|(id, _)| *id).collect(),
            in_tablespace: vec![],
            pgbench: true,
        },
    )
    .await;
    assert!(
        report.is_ok(),
        "restore of a PostgreSQL {major} standby backup from its kept WAL: {report:?}"
    );
    restored.stop();
    standby.stop();
    primary.stop();
}

pgsnap_e2e::per_major! {
    standby_wal_kept;
    standby_wal_kept_pg10: 10, standby_wal_kept_pg11: 11, standby_wal_kept_pg12: 12,
    standby_wal_kept_pg13: 13, standby_wal_kept_pg14: 14, standby_wal_kept_pg15: 15,
    standby_wal_kept_pg16: 16, standby_wal_kept_pg17: 17, standby_wal_kept_pg18: 18,
}
