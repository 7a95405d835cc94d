//! `pgsnap restore-prepare` on real servers. A backup is taken with `pgsnap::postgres::Session`
//! while the data directory and a tablespace are copied file by file (a fuzzy copy, like the
//! hostpath CSI driver's tar); a CHECKPOINT lands between the copy of the data files and the
//! copy of `global/pg_control`, as it can under any non-atomic snapshot. The binary then
//! prepares the copy (label files from a directory laid out like the mounted ConfigMap) and a
//! server started on it must hold every row committed before the stop call.
//!
//! Negative controls: a tampered label, a label from another database and a missing label are
//! refused with their reasons; and the same copy started WITHOUT backup_label comes up without
//! any error yet misses committed rows (and only that), which shows the check above can fail.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

use pgsnap::postgres::Session;
use pgsnap_e2e::pgharness::{
    Expect, Pg, TestDir, archive_command, check_restore, fuzzy_copy, marks_lost, restore_target,
    write_marks,
};
use pgsnap_e2e::prepare::{RestorePrepare, label_dir};
use pgsnap_e2e::proof::committed_before;

/// Copies the entries of `src` accepted by `take` into `dst`: directories fuzzily, files and
/// links as they are. Two calls with complementary filters make one copy in two passes.
fn copy_entries(src: &Path, dst: &Path, take: impl Fn(&str) -> bool) {
    fs::create_dir_all(dst).unwrap();
    let mut entries: Vec<_> = fs::read_dir(src).unwrap().flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().to_string();
        if !take(&name) || name == "postmaster.pid" || name == "postmaster.opts" {
            continue;
        }
        let meta = fs::symlink_metadata(e.path()).unwrap();
        if meta.file_type().is_symlink() {
            symlink(fs::read_link(e.path()).unwrap(), dst.join(&name)).unwrap();
        } else if meta.is_dir() {
            fuzzy_copy(&e.path(), &dst.join(&name), Duration::from_millis(2));
        } else {
            fs::copy(e.path(), dst.join(&name)).unwrap();
        }
    }
}

async fn prove(major: u32) {
    let dir = TestDir::new(&format!("prepare{major}"));
    let archive = dir.owned("archive");
    let tablespace = dir.owned("tablespace");
    let mut pg = Pg::init(
        major,
        &dir,
        "primary",
        &[
            ("archive_mode", "on"),
            ("archive_command", &archive_command(&archive)),
        ],
    );
    pg.start(Duration::from_secs(60)).await.unwrap();
    pg.tablespace_with_rows(&tablespace).await;
    pg.pgbench_init(1);
    let client = pg.client().await;
    let mut written = write_marks(&client, 1, 10).await;

    let load = pg.pgbench_load(2, 120);
    let mut s = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    let sysid = s.server().system_identifier;
    let oid = s.server().tablespaces[0].oid;
    s.start(
        &format!("restore-prepare proof {major}"),
        true,
        Duration::from_secs(300),
    )
    .await
    .unwrap();

    // The "snapshot", in two passes: the data files, then (after rows and a checkpoint that
    // only WAL from the label's redo point brings back) pg_control and the rest.
    let copy = dir.0.join("copy");
    tokio::task::block_in_place(|| copy_entries(&pg.data, &copy.join("data"), |n| n == "base"));
    let after_data_files = write_marks(&client, 1000, 50).await;
    written.extend(&after_data_files);
    client.batch_execute("checkpoint").await.unwrap();
    tokio::task::block_in_place(|| {
        copy_entries(&pg.data, &copy.join("data"), |n| n != "base");
        fuzzy_copy(
            &tablespace,
            &copy.join("tablespace"),
            Duration::from_millis(2),
        );
    });
    // After the copy, before the stop: only archived WAL brings these back.
    let after_copy = write_marks(&client, 2000, 20).await;
    written.extend(&after_copy);
    let stopped = s.stop(true).await.unwrap();
    load.finish();
    let marks = committed_before(&written, stopped.stop_lsn);
    assert_eq!(
        marks.len(),
        written.len(),
        "the stop LSN is past every commit"
    );
    let expect = Expect {
        marks,
        in_tablespace: (1..=1000).collect(),
        pgbench: true,
    };

    let prepare = RestorePrepare::new(env!("CARGO_BIN_EXE_pgsnap"), &dir.0, &stopped, sysid);
    let restore_command = format!("cp {}/%f %p", archive.display());
    let fresh =
        |name: &str| tokio::task::block_in_place(|| restore_target(major, &dir, &copy, name));
    let args = |target: &Path| {
        vec![
            "--restore-command".to_string(),
            restore_command.clone(),
            "--tablespace".to_string(),
            format!("{oid}={}", target.join("tablespace").display()),
        ]
    };

    // 1. Refusals: nothing may be written into the data directory.
    let target = fresh("restored");
    let data = target.join("data");
    let tampered = label_dir(
        &dir.0,
        "tampered",
        &stopped.labelfile.replacen("LABEL: ", "LABEL: x", 1),
        &stopped.spcmapfile,
    );
    let run = prepare.run_with_labels(&data, &tampered, &args(&target));
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(
        run.stderr.contains("LabelChecksumMismatch"),
        "{}",
        run.stderr
    );
    let empty = label_dir(&dir.0, "empty", "", "");
    let run = prepare.run_with_labels(&data, &empty, &args(&target));
    assert!(
        run.code == 3 && run.stderr.contains("LabelMissing"),
        "{}",
        run.stderr
    );
    let other = Pg::init(major, &dir, "other", &[]);
    let run = prepare.run(&other.data, &args(&target));
    assert!(
        run.code == 3 && run.stderr.contains("SystemIdentifierMismatch"),
        "{}",
        run.stderr
    );
    assert!(!data.join("backup_label").exists() && !other.data.join("backup_label").exists());
    assert!(!data.join("recovery.signal").exists() && !data.join("recovery.conf").exists());

    // The live database itself (an initContainer pointed at production by mistake): running
    // and checkpointed past the stop, then shut down cleanly. Refused both times, nothing
    // written, and it starts again as it was.
    client.batch_execute("CHECKPOINT").await.unwrap();
    let live = prepare.run(&pg.data, &args(&target));
    assert!(
        live.code == 3
            && live.stderr.contains("NotARestoredCopy")
            && live.stderr.contains("after the backup's stop"),
        "{}",
        live.stderr
    );
    pg.stop();
    let stopped_cleanly = prepare.run(&pg.data, &args(&target));
    assert!(
        stopped_cleanly.code == 3
            && stopped_cleanly.stderr.contains("NotARestoredCopy")
            && stopped_cleanly.stderr.contains("shut down cleanly"),
        "{}",
        stopped_cleanly.stderr
    );
    for f in [
        "backup_label",
        "recovery.signal",
        "recovery.conf",
        "pgsnap-restore.done",
    ] {
        assert!(
            !pg.data.join(f).exists(),
            "a refusal wrote {f} into the live database"
        );
    }
    pg.start(Duration::from_secs(60)).await.unwrap();
    let in_recovery: bool = pg
        .client()
        .await
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !in_recovery,
        "the live database starts as the primary it was"
    );

    // 2. The restore: prepare, prepare again (a no-op), start, check.
    let run = prepare.run(&data, &args(&target));
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    eprintln!(
        "PostgreSQL {major}: restore-prepare took {:?}:\n{}",
        run.took, run.stdout
    );
    let again = prepare.run(&data, &args(&target));
    assert!(
        again.code == 0 && again.stdout.contains("nothing changed"),
        "{}",
        again.stdout
    );
    assert_eq!(
        fs::read(data.join("backup_label")).unwrap(),
        stopped.labelfile.as_bytes()
    );
    let mut restored = Pg::existing(major, &data, dir.0.join("restored.log"));
    let t0 = Instant::now();
    let report = check_restore(&mut restored, &expect).await;
    assert!(
        report.is_ok(),
        "restore of PostgreSQL {major} failed: {report:?}\n{}",
        restored.log_tail(30)
    );
    eprintln!(
        "PostgreSQL {major}: recovery and checks took {:?}",
        t0.elapsed()
    );
    assert_eq!(
        fs::read_link(data.join(format!("pg_tblspc/{oid}"))).unwrap(),
        target.join("tablespace")
    );
    restored.stop();
    // After recovery the label is backup_label.old; a rerun (an initContainer on the next pod
    // start) must not put it back.
    let rerun = prepare.run(&data, &args(&target));
    assert!(
        rerun.code == 0 && rerun.stdout.contains("nothing changed"),
        "{}",
        rerun.stdout
    );
    assert!(!data.join("backup_label").exists());

    // 3. The failure this all prevents: the same copy, prepared, then its label lost.
    let target = fresh("no-label");
    let data = target.join("data");
    let run = prepare.run(&data, &args(&target));
    assert_eq!(run.code, 0, "{}", run.stderr);
    fs::remove_file(data.join("backup_label")).unwrap();
    let mut unlabelled = Pg::existing(major, &data, dir.0.join("no-label.log"));
    // Exactly the rows committed after the data files were copied are lost: pg_control's
    // checkpoint is past the first of them, and only WAL has the others.
    let lost = marks_lost(major, check_restore(&mut unlabelled, &expect).await);
    assert_eq!(
        lost,
        after_data_files.len() + after_copy.len(),
        "PostgreSQL {major} without backup_label"
    );
}

pgsnap_e2e::per_major! {
    prove;
    prepare_pg10: 10, prepare_pg11: 11, prepare_pg12: 12, prepare_pg13: 13, prepare_pg14: 14,
    prepare_pg15: 15, prepare_pg16: 16, prepare_pg17: 17, prepare_pg18: 18,
}
