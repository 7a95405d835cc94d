//! The backup session on a real server of every major 10-18: start/stop and the label,
//! concurrent backups, abort by dropping the session, the deadline (in backup mode and in
//! the archive wait), grants for a non-superuser, and connection failures.

use std::time::Duration;

use pgsnap::postgres::{BackupFrom, Error, Session, Step, grants};
use pgsnap_e2e::pgharness::{Pg, TestDir, archive_command};

const PASSWORD: &str = "s3cret-Pw-for-tests";

/// The WARNING a server logs when a session in backup mode ends without stopping.
fn abort_warning(major: u32) -> &'static str {
    if major >= 15 {
        "aborting backup due to backend exiting before pg_backup_stop was called"
    } else {
        "aborting backup due to backend exiting before pg_stop_backup was called"
    }
}

/// Waits up to 5 s for a backend to exit.
async fn backend_gone(client: &tokio_postgres::Client, pid: i32) -> bool {
    backend_gone_within(client, pid, Duration::from_secs(5)).await
}

async fn backend_gone_within(client: &tokio_postgres::Client, pid: i32, within: Duration) -> bool {
    for _ in 0..within.as_millis() / 100 {
        let n: i64 = client
            .query_one(
                "select count(*) from pg_stat_activity where pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if n == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn session_matrix(major: u32) {
    let dir = TestDir::new(&format!("session{major}"));
    let archive = dir.owned("archive");
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

    // Server facts.
    let mut s = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    let info = s.server().clone();
    assert_eq!(info.major, major);
    assert_eq!(info.version_num / 10000, major);
    assert!(!info.in_recovery);
    assert_ne!(info.system_identifier, 0);
    assert_eq!(info.timeline, 1);
    assert_eq!(info.data_directory, pg.data.display().to_string());
    assert_eq!(info.wal_directory, format!("{}/pg_wal", pg.data.display()));
    let plain_wal = info.wal_directory.clone();
    if major >= 11 {
        assert_eq!(
            s.locate_wal(&[&plain_wal]).await.unwrap(),
            Some(plain_wal.clone())
        );
    }
    assert_eq!(info.wal_level, "replica");
    assert_eq!(info.archive_mode, "on");
    assert!(info.full_page_writes);
    assert_eq!(info.wal_segment_size, 16 * 1024 * 1024);
    assert!(info.tablespaces.is_empty());
    assert!(info.role.superuser);

    // 1. start/stop and the label.
    let started = s
        .start("pgsnap test/one", true, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(
        started.wal_pinned,
        "superuser pins WAL: {:?}",
        started.wal_not_pinned_reason
    );
    let slot = started.slot_name.clone().unwrap();
    let slots: i64 = pg
        .client()
        .await
        .query_one(
            "select count(*) from pg_replication_slots where slot_name = $1 and temporary",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 1, "temporary slot exists during the backup");
    assert!(s.time_in_backup_mode().is_some());
    let stopped = s.stop(true).await.unwrap();
    assert!(s.time_in_backup_mode().is_none());
    let label = &stopped.label;
    assert_eq!(label.start_wal_location, started.start_lsn);
    assert!(label.checkpoint_location >= label.start_wal_location);
    assert!(stopped.stop_lsn > started.start_lsn);
    assert_eq!(label.backup_method, "streamed");
    assert_eq!(label.backup_from, BackupFrom::Primary);
    let from = if major >= 14 { "primary" } else { "master" };
    assert!(
        stopped
            .labelfile
            .contains(&format!("\nBACKUP FROM: {from}\n"))
    );
    assert_eq!(label.label, "pgsnap test/one");
    assert_eq!(
        label.start_timeline,
        if major >= 11 { Some(1) } else { None }
    );
    assert!(stopped.labelfile.contains("LABEL: pgsnap test/one\n"));
    assert_eq!(stopped.spcmapfile, "");
    assert!(stopped.backup_window <= started.took + stopped.took + Duration::from_secs(5));
    // wait_for_archive: everything up to the stop is archived when stop returns.
    assert!(
        archive.join(&stopped.stop_wal_file).exists(),
        "{} archived when stop returned",
        stopped.stop_wal_file
    );
    assert!(archive.join(&label.start_wal_file).exists());
    let slots = async || -> i64 {
        pg.client()
            .await
            .query_one(
                "select count(*) from pg_replication_slots where slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0)
    };
    assert_eq!(
        slots().await,
        1,
        "the slot still holds the WAL after the stop, for the WAL snapshot"
    );
    let listed = s
        .list_wal(&label.start_wal_file, &stopped.stop_wal_file)
        .await
        .unwrap();
    assert_eq!(listed.first().map(|l| &l.0), Some(&label.start_wal_file));
    assert_eq!(listed.last().map(|l| &l.0), Some(&stopped.stop_wal_file));
    assert!(
        listed.iter().all(|(_, size)| *size == 16 << 20),
        "{listed:?}"
    );
    s.release().await;
    assert_eq!(slots().await, 0, "slot dropped at release");
    // The same session can take another backup.
    s.start("again", true, Duration::from_secs(60))
        .await
        .unwrap();
    // A stop that does not wait, then the wait outside backup mode (inside the backup's
    // transaction on 10–13, whose statistics snapshot must not hide the archiver's progress).
    let again = s.stop(false).await.unwrap();
    let waited = tokio::time::timeout(
        Duration::from_secs(10),
        s.wait_archived(&again.stop_wal_file),
    )
    .await
    .expect("archived within 10 s")
    .unwrap();
    assert!(archive.join(&again.stop_wal_file).exists());
    eprintln!("PostgreSQL {major}: archived {waited:?} after the stop");

    // 3. Two concurrent backups.
    let mut a = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    let mut b = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    a.start("a", true, Duration::from_secs(60)).await.unwrap();
    b.start("b", true, Duration::from_secs(60)).await.unwrap();
    let sa = a.stop(true).await.unwrap();
    let sb = b.stop(true).await.unwrap();
    assert_eq!(sa.label.label, "a");
    assert_eq!(sb.label.label, "b");

    // 2. Dropping the session mid-backup aborts the backup on the server.
    let mut c = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    let pid = c.backend_pid();
    c.start("dropped", true, Duration::from_secs(60))
        .await
        .unwrap();
    drop(c);
    assert!(
        pg.wait_for_log(
            &[&format!("[{pid}]"), abort_warning(major)],
            Duration::from_secs(10)
        )
        .await,
        "abort warning of pid {pid} in the log:\n{}",
        pg.log_tail(20)
    );
    let mut d = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    d.start("right after", true, Duration::from_secs(60))
        .await
        .unwrap();
    d.stop(false).await.unwrap();

    // The deadline closes the session by itself while the caller is busy elsewhere.
    let mut e = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    let pid = e.backend_pid();
    e.start("too slow", true, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(
        pg.wait_for_log(
            &[&format!("[{pid}]"), abort_warning(major)],
            Duration::from_secs(10)
        )
        .await,
        "deadline aborted the backup of pid {pid}:\n{}",
        pg.log_tail(20)
    );
    let err = e.stop(true).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::DeadlineExceeded {
                step: Step::InBackup,
                ..
            }
        ),
        "{err:?}"
    );

    // ... and while stop waits for an archive that never comes.
    pg.exec("alter system set archive_command = 'false'").await;
    pg.exec("select pg_reload_conf()").await;
    let mut f = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    let pid = f.backend_pid();
    f.start("archive stuck", true, Duration::from_secs(3))
        .await
        .unwrap();
    let t = std::time::Instant::now();
    let err = f.stop(true).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::DeadlineExceeded {
                step: Step::Stop,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("archived"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    let client = pg.client().await;
    let gone = backend_gone(&client, pid).await;
    assert!(
        gone,
        "backend {pid} still waiting for the archive:\n{}",
        pg.log_tail(10)
    );
    // A stop whose future is dropped (a cancelled task) and then the session: same cleanup.
    let mut f2 = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    let pid = f2.backend_pid();
    f2.start("cancelled stop", true, Duration::from_secs(600))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), f2.stop(true))
            .await
            .is_err()
    );
    let err = f2.stop(true).await.unwrap_err();
    assert_eq!(err.reason(), "SessionLost", "{err:?}");
    drop(f2);
    let gone = backend_gone(&client, pid).await;
    assert!(
        gone,
        "backend {pid} of a cancelled stop still waiting for the archive"
    );

    // A client that dies without a word (the operator SIGKILLed in the archive wait): its
    // runtime goes away, the socket closes, no cancel is sent. 14+ notices within a second
    // (client_connection_check_interval); 10-13 keep waiting for the archive, already out
    // of backup mode, and end once archiving works again.
    let opts = pg.opts("postgres", None);
    let pid = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut s = Session::connect(&opts).await.unwrap();
            let pid = s.backend_pid();
            s.start("killed", true, Duration::from_secs(600))
                .await
                .unwrap();
            let _ = tokio::time::timeout(Duration::from_secs(1), s.stop(true)).await;
            // No Drop: nothing is told, as when the process is killed.
            std::mem::forget(s);
            pid
        })
    })
    .join()
    .unwrap();
    let gone = backend_gone(&client, pid).await;
    assert_eq!(
        gone,
        major >= 14,
        "backend {pid} of a dead client, PostgreSQL {major}"
    );
    pg.exec("alter system reset archive_command").await;
    pg.exec("select pg_reload_conf()").await;

    // A client that froze in backup mode (SIGSTOP, or a network that drops every packet): the
    // socket stays open and nothing is sent. The server ends the backup itself, and drops the
    // slot, at the deadline plus the grace.
    let opts = pg.opts("postgres", None);
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let frozen = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = rt.block_on(async {
            let mut s = Session::connect(&opts).await.unwrap();
            let started = s
                .start("frozen", true, Duration::from_secs(2))
                .await
                .unwrap();
            started_tx
                .send((s.backend_pid(), started.slot_name.clone()))
                .unwrap();
            s
        });
        // Nothing runs on this runtime now, not even the session's own deadline.
        std::thread::sleep(Duration::from_secs(12));
        drop(s);
    });
    let (pid, slot) = started_rx.recv().unwrap();
    let t = std::time::Instant::now();
    let gone = backend_gone_within(&client, pid, Duration::from_secs(10)).await;
    assert!(
        gone,
        "backend {pid} of a frozen client, PostgreSQL {major}:\n{}",
        pg.log_tail(10)
    );
    assert!(
        t.elapsed() >= Duration::from_secs(5),
        "ended after {:?}, before the deadline and grace",
        t.elapsed()
    );
    // 14+ ends an idle session; 10-13 run the backup in a transaction and end it idle there.
    let why = if major >= 14 {
        "terminating connection due to idle-session timeout"
    } else {
        "terminating connection due to idle-in-transaction timeout"
    };
    assert!(
        pg.wait_for_log(&[why], Duration::from_secs(2)).await,
        "{}",
        pg.log_tail(20)
    );
    let slots: i64 = client
        .query_one(
            "select count(*) from pg_replication_slots where slot_name = $1",
            &[&slot.unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "the frozen backup's slot still pins WAL");
    frozen.join().unwrap();

    // ... and while start waits for a spread checkpoint with lots to write.
    pg.exec("create table dirty as select g, md5(g::text) as v from generate_series(1, 100000) g")
        .await;
    pg.exec("alter system set checkpoint_completion_target = 0.9")
        .await;
    pg.exec("alter system set checkpoint_timeout = '1h'").await;
    pg.exec("select pg_reload_conf()").await;
    let mut h = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    let pid = h.backend_pid();
    let err = h
        .start("slow checkpoint", false, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::DeadlineExceeded {
                step: Step::Start,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("checkpoint"), "{err}");
    let gone = backend_gone(&client, pid).await;
    assert!(gone, "backend {pid} still waiting for the checkpoint");
    pg.exec("alter system reset checkpoint_completion_target")
        .await;
    pg.exec("alter system reset checkpoint_timeout").await;
    pg.exec("select pg_reload_conf()").await;

    // The server ends the session mid-backup (pg_terminate_backend, a restart): SessionLost.
    let mut k = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    k.start("terminated", true, Duration::from_secs(60))
        .await
        .unwrap();
    client
        .execute("select pg_terminate_backend($1)", &[&k.backend_pid()])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = k.stop(true).await.unwrap_err();
    assert_eq!(err.reason(), "SessionLost", "{err:?}");
    assert!(err.is_retryable());

    // Label too long: refused before the server is asked.
    let mut g = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    let err = g
        .start(&"x".repeat(1025), true, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "LabelTooLong");
    let err = g
        .start("two\nSTART TIMELINE: 9", true, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "LabelHasControlCharacters");
    g.start(&"x".repeat(1024), true, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(g.stop(false).await.unwrap().label.label.len(), 1024);

    // 8. A non-superuser with exactly the documented grants.
    let mut setup = format!("create role pgsnap login password '{PASSWORD}';");
    for grant in grants(major, "pgsnap") {
        setup.push_str(&grant);
        setup.push(';');
    }
    pg.exec(&setup).await;
    let mut ok = Session::connect(&pg.opts("pgsnap", Some(PASSWORD)))
        .await
        .unwrap();
    assert!(!ok.server().role.superuser);
    assert_eq!(ok.server().data_directory, pg.data.display().to_string());
    let st = ok
        .start("by pgsnap", false, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(st.wal_pinned, "{:?}", st.wal_not_pinned_reason);
    let sp = ok.stop(true).await.unwrap();
    assert_eq!(sp.label.label, "by pgsnap");

    // Without the REPLICATION attribute: the backup works, WAL is not pinned, and it says why.
    pg.exec("alter role pgsnap noreplication").await;
    let mut norepl = Session::connect(&pg.opts("pgsnap", Some(PASSWORD)))
        .await
        .unwrap();
    let st = norepl
        .start("unpinned", true, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(!st.wal_pinned);
    assert!(
        st.wal_not_pinned_reason
            .unwrap()
            .contains("ALTER ROLE pgsnap REPLICATION")
    );
    norepl.stop(false).await.unwrap();

    // Without the function grants: the error names the GRANT.
    pg.exec(&format!(
        "create role half login password '{PASSWORD}'; grant pg_read_all_settings to half;"
    ))
    .await;
    let mut half = Session::connect(&pg.opts("half", Some(PASSWORD)))
        .await
        .unwrap();
    let err = half
        .start("x", true, Duration::from_secs(60))
        .await
        .unwrap_err();
    let want = if major >= 15 {
        "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO half"
    } else {
        "GRANT EXECUTE ON FUNCTION pg_start_backup(text, boolean, boolean) TO half"
    };
    assert_eq!(err.reason(), "MissingPrivilege");
    assert!(err.to_string().contains(want), "{err}");
    // With start but not stop: refused before the backup starts, not after the snapshots.
    let start_fn = pgsnap::postgres::backup_functions(major)[0];
    pg.exec(&format!("grant execute on function {start_fn} to half"))
        .await;
    let err = half
        .start("x", true, Duration::from_secs(60))
        .await
        .unwrap_err();
    let stop_fn = pgsnap::postgres::backup_functions(major)[1];
    assert!(
        err.to_string()
            .contains(&format!("GRANT EXECUTE ON FUNCTION {stop_fn} TO half")),
        "{err}"
    );

    // Without pg_read_all_settings, connect says so.
    pg.exec(&format!("create role bare login password '{PASSWORD}'"))
        .await;
    let err = Session::connect(&pg.opts("bare", Some(PASSWORD)))
        .await
        .err()
        .unwrap();
    assert_eq!(err.reason(), "MissingPrivilege", "{err}");
    assert!(
        err.to_string()
            .contains("GRANT pg_read_all_settings TO bare"),
        "{err}"
    );

    // Wrong password: AuthenticationFailed, and the message never carries a password.
    let err = Session::connect(&pg.opts("pgsnap", Some("wrong-Pw-123")))
        .await
        .err()
        .unwrap();
    assert_eq!(err.reason(), "AuthenticationFailed", "{err}");
    assert!(!err.to_string().contains("wrong-Pw-123"));
    assert!(!err.is_retryable());

    pg.stop();
    let err = Session::connect(&pg.opts("postgres", None))
        .await
        .err()
        .unwrap();
    assert_eq!(err.reason(), "Unreachable", "{err}");
    assert!(err.is_retryable());
}

pgsnap_e2e::per_major! {
    session_matrix;
    session_pg10: 10, session_pg11: 11, session_pg12: 12, session_pg13: 13, session_pg14: 14,
    session_pg15: 15, session_pg16: 16, session_pg17: 17, session_pg18: 18,
}
