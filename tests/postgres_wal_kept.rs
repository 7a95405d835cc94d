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
//!
//! Two layouts on each major: everything in the data directory, and the layout of a pod with
//! three volumes, pg_wal on its own (`initdb --waldir`, the data directory's pg_wal a link to
//! it) and a tablespace, each copied on its own; the WAL snapshot is then of pg_wal's own
//! directory, and the restore re-points the link at the restored copy of it, as mounting the
//! restored WAL volume at the same path does.

use std::fs;
use std::time::Duration;

use pgsnap::backup::phase::check_wal_kept;
use pgsnap::postgres::Session;
use pgsnap_e2e::pgharness::{
    Expect, Failure, Pg, TestDir, check_restore, fuzzy_copy, restore_target, write_marks,
};
use pgsnap_e2e::prepare::{RestorePrepare, kept_wal_flags};
use pgsnap_e2e::proof::committed_before;

async fn wal_kept_data_only(major: u32) {
    wal_kept(major, false).await;
}

async fn wal_kept_split(major: u32) {
    wal_kept(major, true).await;
}

/// `split`: pg_wal and a tablespace on volumes of their own.
async fn wal_kept(major: u32, split: bool) {
    let layout = if split { "split" } else { "" };
    let dir = TestDir::new(&format!("walkept{layout}{major}"));
    let (wal_dir, tablespace) = (dir.owned("wal"), dir.owned("tablespace"));
    let waldir_arg = format!("--waldir={}", wal_dir.display());
    let initdb_args: &[&str] = if split { &[&waldir_arg] } else { &[] };
    let mut pg = Pg::init_with(
        major,
        &dir,
        "primary",
        &[
            ("archive_mode", "off"),
            // Checkpoints during the copy make the fuzzy copy fuzzier.
            ("checkpoint_timeout", "'30s'"),
        ],
        initdb_args,
    );
    pg.start(Duration::from_secs(60)).await.unwrap();
    if split {
        pg.tablespace_with_rows(&tablespace).await;
    }
    pg.pgbench_init(1);
    let client = pg.client().await;
    let mut written = write_marks(&client, 1, 10).await;

    let load = pg.pgbench_load(2, 120);
    let mut s = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    let sysid = s.server().system_identifier;
    let s_tablespace_oid = s.server().tablespaces.first().map(|t| t.oid);
    assert_eq!(s_tablespace_oid.is_some(), split);
    let segment_size = s.server().wal_segment_size;
    let started = s
        .start(&format!("wal kept {major}"), true, Duration::from_secs(300))
        .await
        .unwrap();
    assert!(started.wal_pinned);
    let copy = dir.0.join("copy");
    tokio::task::block_in_place(|| {
        fuzzy_copy(&pg.data, &copy.join("data"), Duration::from_millis(5));
        if split {
            fuzzy_copy(&wal_dir, &copy.join("wal"), Duration::from_millis(5));
            fuzzy_copy(
                &tablespace,
                &copy.join("tablespace"),
                Duration::from_millis(5),
            );
        }
    });
    if split {
        client
            .batch_execute(
                "insert into in_ts select g, md5(g::text) from generate_series(1001, 1100) g",
            )
            .await
            .unwrap();
    }
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
    let pg_wal = if split {
        wal_dir.clone()
    } else {
        pg.data.join("pg_wal")
    };
    tokio::task::block_in_place(|| fuzzy_copy(&pg_wal, &wal, Duration::ZERO));
    let (first, last) = (&stopped.label.start_wal_file, &stopped.stop_wal_file);
    let listed = s.list_wal(first, last).await.unwrap();
    check_wal_kept(first, last, segment_size, &listed).unwrap();
    s.release().await;
    load.finish();
    assert!(listed.len() >= 4, "{listed:?}");
    eprintln!(
        "PostgreSQL {major}{}: WAL kept from {first} to {last} ({} segments)",
        if split {
            " (pg_wal and a tablespace apart)"
        } else {
            ""
        },
        listed.len()
    );

    let expect = Expect {
        marks: committed_before(&written, stopped.stop_lsn),
        in_tablespace: if split {
            (1..=1100).collect()
        } else {
            Vec::new()
        },
        pgbench: true,
    };
    let prepare = RestorePrepare::new(env!("CARGO_BIN_EXE_pgsnap"), &dir.0, &stopped, sysid);
    let oid = s_tablespace_oid;
    let target = |name: &str| {
        let target = tokio::task::block_in_place(|| restore_target(major, &dir, &copy, name));
        if split {
            // The restored WAL volume, mounted where the link points on the pod.
            let link = target.join("data/pg_wal");
            fs::remove_file(&link).unwrap();
            std::os::unix::fs::symlink(target.join("wal"), &link).unwrap();
        }
        target
    };
    // Where the restored server finds the tablespace: its own restored copy.
    let tablespace_flags = |target: &std::path::Path| match oid {
        Some(oid) => vec![
            "--tablespace".to_string(),
            format!("{oid}={}", target.join("tablespace").display()),
        ],
        None => Vec::new(),
    };
    let flags = |from: &std::path::Path, target: &std::path::Path| {
        let mut flags = kept_wal_flags(from, &stopped, segment_size);
        flags.extend(tablespace_flags(target));
        flags
    };

    // The proof: no archive, no restore command.
    let restored = target("restored");
    let data = restored.join("data");
    let run = prepare.prepare(&data, &flags(&wal, &restored));
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
    let short_target = target("short");
    let data = short_target.join("data");
    let run = prepare.run(&data, &flags(&short, &short_target));
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
    // Into the directory itself, pg_wal being a link to it with the WAL apart.
    let pg_wal = fs::canonicalize(data.join("pg_wal")).unwrap();
    tokio::task::block_in_place(|| fuzzy_copy(&short, &pg_wal, Duration::ZERO));
    prepare.prepare(&data, &tablespace_flags(&short_target));
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
    wal_kept_data_only;
    wal_kept_pg10: 10, wal_kept_pg11: 11, wal_kept_pg12: 12, wal_kept_pg13: 13,
    wal_kept_pg14: 14, wal_kept_pg15: 15, wal_kept_pg16: 16, wal_kept_pg17: 17,
    wal_kept_pg18: 18,
}

pgsnap_e2e::per_major! {
    wal_kept_split;
    wal_kept_split_pg10: 10, wal_kept_split_pg11: 11, wal_kept_split_pg12: 12,
    wal_kept_split_pg13: 13, wal_kept_split_pg14: 14, wal_kept_split_pg15: 15,
    wal_kept_split_pg16: 16, wal_kept_split_pg17: 17, wal_kept_split_pg18: 18,
}
