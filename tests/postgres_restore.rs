//! A backup is only as good as its restore. On every major 10-18: pgbench writes while the
//! data directory and a tablespace are copied file by file in backup mode (a fuzzy,
//! non-atomic copy, like the hostpath CSI driver's tar); then the copy, prepared by
//! `pgsnap restore-prepare` with the WAL archive, must recover to a server holding every row
//! committed before the stop call, with balanced pgbench sums and silent amcheck. The same
//! restore without backup_label, and without the archived WAL, must be caught by that check.

use std::fs;
use std::path::Path;
use std::time::Duration;

use pgsnap::postgres::{BackupFrom, Session};
use pgsnap_e2e::pgharness::{
    Expect, Failure, Pg, TestDir, archive_command, check_restore, fuzzy_copy, marks_lost,
    restore_target, write_marks,
};
use pgsnap_e2e::prepare::RestorePrepare;
use pgsnap_e2e::proof::committed_before;

async fn restore_matrix(major: u32) {
    let dir = TestDir::new(&format!("restore{major}"));
    let archive = dir.owned("archive");
    let empty_archive = dir.owned("no-archive");
    let tablespace = dir.owned("tablespace");
    let mut pg = Pg::init(
        major,
        &dir,
        "primary",
        &[
            ("archive_mode", "on"),
            ("archive_command", &archive_command(&archive)),
            // Checkpoints during the copy make the fuzzy copy fuzzier.
            ("checkpoint_timeout", "'30s'"),
        ],
    );
    pg.start(Duration::from_secs(60)).await.unwrap();
    pg.tablespace_with_rows(&tablespace).await;
    pg.pgbench_init(1);
    let client = pg.client().await;
    let mut written = write_marks(&client, 1, 10).await;

    let load = pg.pgbench_load(2, 120);
    let mut s = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    assert_eq!(s.server().tablespaces.len(), 1);
    assert_eq!(
        s.server().tablespaces[0].location,
        tablespace.display().to_string()
    );
    let oid = s.server().tablespaces[0].oid;
    let sysid = s.server().system_identifier;
    let started = s
        .start(
            &format!("restore proof {major}"),
            true,
            Duration::from_secs(300),
        )
        .await
        .unwrap();
    assert!(started.wal_pinned);

    // The "snapshots": data directory and tablespace, each copied while pgbench writes.
    let copy = dir.0.join("copy");
    tokio::task::block_in_place(|| {
        fuzzy_copy(&pg.data, &copy.join("data"), Duration::from_millis(5));
        fuzzy_copy(
            &tablespace,
            &copy.join("tablespace"),
            Duration::from_millis(5),
        );
    });
    // Committed after the copy, before the stop: only WAL can bring these back.
    let after_copy = write_marks(&client, 1000, 50).await;
    written.extend(&after_copy);
    client
        .batch_execute(
            "insert into in_ts select g, md5(g::text) from generate_series(1001, 1100) g",
        )
        .await
        .unwrap();
    let stopped = s.stop(true).await.unwrap();
    load.finish();
    let transactions: i64 = client
        .query_one("select count(*) from pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert!(transactions > 0, "pgbench wrote during the backup");
    eprintln!("PostgreSQL {major}: {transactions} pgbench transactions during the backup");

    assert_eq!(stopped.label.backup_from, BackupFrom::Primary);
    // 7. tablespace_map: "<oid> <location>\n".
    assert_eq!(
        stopped.spcmapfile,
        format!("{oid} {}\n", tablespace.display())
    );

    let marks = committed_before(&written, stopped.stop_lsn);
    assert_eq!(
        marks.len(),
        written.len(),
        "the stop LSN is past every commit"
    );
    let expect = Expect {
        marks,
        in_tablespace: (1..=1100).collect(),
        pgbench: true,
    };
    let prepare = RestorePrepare::new(env!("CARGO_BIN_EXE_pgsnap"), &dir.0, &stopped, sysid);
    let restore = |name: &str, wal: &Path| {
        let target = tokio::task::block_in_place(|| restore_target(major, &dir, &copy, name));
        prepare.prepare(
            &target.join("data"),
            &[
                "--restore-command".to_string(),
                format!("cp {}/%f %p", wal.display()),
                "--tablespace".to_string(),
                format!("{oid}={}", target.join("tablespace").display()),
            ],
        );
        Pg::existing(
            major,
            &target.join("data"),
            dir.0.join(format!("{name}.log")),
        )
    };

    // 4. The restore proof.
    let mut good = restore("restored", &archive);
    let report = check_restore(&mut good, &expect).await;
    assert!(
        report.is_ok(),
        "restore of PostgreSQL {major} failed: {report:?}"
    );
    // The server recreated the link from tablespace_map: the map has the relocated copy.
    let link = std::fs::read_link(good.data.join(format!("pg_tblspc/{oid}"))).unwrap();
    assert_eq!(link, dir.0.join("restored/tablespace"));
    good.stop();

    // 5. Negative controls: the same check must fail, for the reason each one is about.
    // The label lost after preparing.
    let mut no_label = restore("no-label", &archive);
    fs::remove_file(no_label.data.join("backup_label")).unwrap();
    // Exactly the rows committed after the copy are lost: only WAL from the label's redo
    // point has them.
    let lost = marks_lost(major, check_restore(&mut no_label, &expect).await);
    assert_eq!(
        lost,
        after_copy.len(),
        "PostgreSQL {major} without backup_label"
    );
    no_label.stop();

    let mut no_wal = restore("no-wal", &empty_archive);
    // Without the archive: the server refuses to start, saying why.
    let report = check_restore(&mut no_wal, &expect).await;
    let Err(Failure::NotServing(log)) = report else {
        panic!("PostgreSQL {major} without the archived WAL: {report:?}");
    };
    assert!(
        [
            "WAL ends before end of online backup",
            "WAL ends before consistent recovery point",
            // 13+ with recovery_target = 'immediate'
            "recovery ended before configured recovery target was reached",
        ]
        .iter()
        .any(|m| log.contains(m)),
        "PostgreSQL {major} without WAL: {log}"
    );
    eprintln!(
        "PostgreSQL {major} without WAL: {}",
        log.lines().rfind(|l| l.contains("FATAL")).unwrap_or("")
    );
    no_wal.stop();
}

pgsnap_e2e::per_major! {
    restore_matrix;
    restore_pg10: 10, restore_pg11: 11, restore_pg12: 12, restore_pg13: 13, restore_pg14: 14,
    restore_pg15: 15, restore_pg16: 16, restore_pg17: 17, restore_pg18: 18,
}
