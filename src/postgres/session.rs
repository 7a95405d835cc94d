//! One backup session: a single connection that pins WAL, starts a non-exclusive backup,
//! stays open while the volumes are snapshotted and stops the backup. Non-exclusive backups
//! live and die with their connection, so "abort" is "close the connection": dropping the
//! [`Session`] or passing the deadline does exactly that, and PostgreSQL cleans up itself.

use std::future::{Future, pending};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_postgres::error::{DbError, Severity};
use tokio_postgres::{AsyncMessage, CancelToken, Client, Connection, Row};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{info, warn};

use super::catalog::{ServerInfo, is_wal_directory, quote_ident};
use super::connect::ConnectOptions;
use super::error::{Error, Step};
use super::label::{BackupLabel, Lsn};

/// PostgreSQL's limit on the label (MAXPGPATH).
pub const MAX_LABEL_BYTES: usize = 1024;

/// How often [`Session::wait_archived`] asks the archiver.
const ARCHIVE_POLL: Duration = Duration::from_millis(100);

/// How long the cancel request sent on abort may take; the connection is closed anyway.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long after the deadline the server ends the backup by itself, when the operator did not
/// (it froze, or the network between them did). Later than the operator's own close, so a
/// live operator is always the one that reports the deadline.
pub const SERVER_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub start_lsn: Lsn,
    /// A temporary physical replication slot holds the WAL from before the start
    /// checkpoint until the session ends.
    pub wal_pinned: bool,
    pub slot_name: Option<String>,
    /// Why WAL is not pinned, when it is not.
    pub wal_not_pinned_reason: Option<String>,
    /// When start was called: the server is in backup mode from here on.
    pub called_at: SystemTime,
    /// Start called → returned: the checkpoint.
    pub took: Duration,
}

/// A standby's WAL receiver (`pg_stat_wal_receiver`). All but its pid is None for a role that
/// may not see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalReceiver {
    pub pid: i32,
    /// `streaming`, `starting`, `waiting`, ...
    pub status: Option<String>,
    /// Where it started streaming: the start of a segment, from which on it wrote every
    /// segment into pg_wal itself.
    pub start: Option<Lsn>,
    pub start_timeline: Option<u32>,
    /// Written and flushed to pg_wal up to here.
    pub flushed: Option<Lsn>,
    pub timeline: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    pub stop_lsn: Lsn,
    /// The backup's timeline: the start's (a primary's never changes while it runs).
    pub timeline: u32,
    /// The last WAL segment a restore of this backup needs.
    pub stop_wal_file: String,
    /// `backup_label`, byte for byte as the server returned it.
    pub labelfile: String,
    /// `tablespace_map`, byte for byte; empty without tablespaces.
    pub spcmapfile: String,
    pub label: BackupLabel,
    /// Stop called → returned: the end-of-backup record and, when asked, the archive wait.
    pub took: Duration,
    /// Start returned → stop returned.
    pub backup_window: Duration,
}

/// What the connection task is told to do besides driving the connection.
#[derive(Debug, Clone, Copy)]
enum Control {
    Idle,
    /// Close the connection at this instant unless told otherwise first.
    Deadline(Instant),
    Abort,
}

#[derive(Default)]
struct Shared {
    deadline_passed: AtomicBool,
    /// Why the connection ended, when it ended on the server's or network's side.
    lost: Mutex<Option<String>>,
}

#[derive(Debug)]
enum State {
    Idle,
    InBackup(InBackup),
    /// Out of backup mode, with the backup's limits and slot still held until
    /// [`Session::release`]: the WAL up to the stop cannot be recycled while it is captured.
    Holding(InBackup),
    /// The connection is gone or being closed; a new session is needed.
    Broken,
}

#[derive(Debug, Clone)]
struct InBackup {
    called_at: Instant,
    returned_at: Instant,
    deadline: Duration,
    slot_name: Option<String>,
    from_standby: bool,
    guard: Guard,
}

pub struct Session {
    client: Client,
    info: ServerInfo,
    control: watch::Sender<Control>,
    shared: Arc<Shared>,
    state: State,
    backend_pid: i32,
}

impl Session {
    /// Connects and reads the server's facts. Refuses servers older than 10.
    pub async fn connect(opts: &ConnectOptions) -> Result<Session, Error> {
        let (client, control, shared) = open(opts).await?;
        let info = ServerInfo::load(&client).await?;
        if info.major >= 14 {
            enable_client_connection_check(&client, &opts.user).await?;
        }
        let backend_pid = query_backend_pid(&client, &opts.user).await?;
        Ok(Session {
            client,
            info,
            control,
            shared,
            state: State::Idle,
            backend_pid,
        })
    }

    pub fn server(&self) -> &ServerInfo {
        &self.info
    }

    /// The server process serving this session (`pg_stat_activity.pid`).
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// Which of `candidates` is the directory `pg_wal` really is, when `pg_wal` may be a
    /// link to another volume: pass absolute directories, e.g. each volume mount of the pod
    /// and its `pg_wal` subdirectory. `None` when none is. PostgreSQL 11+ only; needs
    /// superuser, or `pg_read_server_files` with EXECUTE on
    /// `pg_ls_dir(text, boolean, boolean)` and `pg_stat_file(text, boolean)`.
    pub async fn locate_wal(&self, candidates: &[&str]) -> Result<Option<String>, Error> {
        if self.info.major < 11 {
            return Err(Error::Query {
                what: "locating pg_wal",
                detail: "PostgreSQL 10 lists no directory outside the data directory, not even for a superuser; take wal_directory by its path".into(),
                sqlstate: None,
            });
        }
        for candidate in candidates {
            match is_wal_directory(&self.client, candidate).await {
                Ok(true) => return Ok(Some(candidate.to_string())),
                Ok(false) => {}
                // A directory the server may not read is not its WAL directory.
                Err(e)
                    if e.as_db_error()
                        .is_some_and(|d| d.message().starts_with("could not")) => {}
                Err(e) => {
                    let role = quote_ident(&self.info.role.name);
                    return Err(Error::from_query(
                        "locating pg_wal",
                        Step::Connect,
                        &self.info.role.name,
                        move || {
                            format!(
                                "GRANT pg_read_server_files TO {role}; \
                             GRANT EXECUTE ON FUNCTION pg_ls_dir(text, boolean, boolean) TO {role}; \
                             GRANT EXECUTE ON FUNCTION pg_stat_file(text, boolean) TO {role}"
                            )
                        },
                        e,
                    ));
                }
            }
        }
        Ok(None)
    }

    /// Time since start was called, while the server is in backup mode for this session.
    pub fn time_in_backup_mode(&self) -> Option<Duration> {
        match self.state {
            State::InBackup(InBackup { called_at, .. }) => Some(called_at.elapsed()),
            State::Idle | State::Holding(_) | State::Broken => None,
        }
    }

    /// Pins WAL (when the role may) and starts a non-exclusive backup. From the moment this
    /// is called, the server is in backup mode for at most `deadline`: when it passes, the
    /// connection is closed by itself, whatever the caller is doing.
    pub async fn start(
        &mut self,
        label: &str,
        fast: bool,
        deadline: Duration,
    ) -> Result<Started, Error> {
        self.check_can_start()?;
        check_label(label)?;
        self.check_ready().await?;

        let called_at = SystemTime::now();
        let t0 = Instant::now();
        self.control.send_replace(Control::Deadline(t0 + deadline));
        // Until start returns, the server's backup state is unknown: if this future is
        // dropped midway (a cancelled task), the session must not look reusable.
        self.state = State::Broken;

        let (slot_name, wal_not_pinned_reason) = self.pin_wal().await;
        let guard = Guard::of(self.info.major, self.info.in_recovery);
        let sql = guard.before_start(self.info.major, deadline + SERVER_GRACE);
        self.batch(&sql, Step::Start, deadline).await?;
        let (start_lsn, took) = self.backup_start(label, fast, t0, deadline).await?;
        // The checkpoint took part of the deadline: the server's own limit counts from the
        // start call too.
        let rest = (deadline + SERVER_GRACE).saturating_sub(t0.elapsed());
        self.batch(&guard.limits(rest), Step::Start, deadline)
            .await?;
        info!(
            pid = self.backend_pid,
            %start_lsn,
            fast,
            took_ms = took.as_millis() as u64,
            slot = slot_name.as_deref().unwrap_or(""),
            "backup started"
        );
        self.state = State::InBackup(InBackup {
            called_at: t0,
            returned_at: Instant::now(),
            deadline,
            slot_name: slot_name.clone(),
            from_standby: self.info.in_recovery,
            guard,
        });
        Ok(Started {
            start_lsn,
            wal_pinned: slot_name.is_some(),
            slot_name,
            wal_not_pinned_reason,
            called_at,
            took,
        })
    }

    /// What `start` checks of the server before it calls into backup mode: `wal_level`, the
    /// role's privileges, and on a standby the primary's `full_page_writes`. Also what
    /// `kubectl pgsnap check` shows.
    pub async fn check_ready(&mut self) -> Result<(), Error> {
        if self.info.wal_level == "minimal" {
            return Err(Error::WalLevelTooLow {
                wal_level: self.info.wal_level.clone(),
            });
        }
        self.check_privileges().await?;
        self.check_role_and_full_page_writes().await
    }

    fn check_can_start(&mut self) -> Result<(), Error> {
        match self.state {
            State::Idle => Ok(()),
            State::InBackup(_) | State::Holding(_) => Err(Error::InvalidState {
                step: Step::Start,
                detail: "this session is already in backup mode",
            }),
            State::Broken => {
                self.close_on_failure();
                Err(self.lost(Step::Start))
            }
        }
    }

    /// The start LSN, and how long the server took to return it: the checkpoint.
    async fn backup_start(
        &mut self,
        label: &str,
        fast: bool,
        t0: Instant,
        deadline: Duration,
    ) -> Result<(Lsn, Duration), Error> {
        let sql = if self.info.major >= 15 {
            "select pg_backup_start($1, $2)::text"
        } else {
            "select pg_start_backup($1, $2, false)::text"
        };
        let result = bounded(
            &self.shared,
            t0 + deadline,
            self.client.query_one(sql, &[&label, &fast]),
        )
        .await;
        let row = match result {
            Ok(row) => row,
            Err(e) => {
                let err = self.step_error(Step::Start, deadline, e);
                self.close_on_failure();
                return Err(err);
            }
        };
        let took = t0.elapsed();
        match row.get::<_, String>(0).parse() {
            Ok(start_lsn) => Ok((start_lsn, took)),
            Err(e) => {
                self.close_on_failure();
                Err(Error::LabelInvalid(e))
            }
        }
    }

    /// Stops the backup in this session and returns the files a restore needs. The session
    /// then still holds the backup's slot and limits (the deadline still closes it) until
    /// [`Session::release`], so the WAL up to the stop can be captured first.
    pub async fn stop(&mut self, wait_for_archive: bool) -> Result<Stopped, Error> {
        let backup = self.check_can_stop()?;
        // statement_timeout counts per statement: a stop stuck in the archive wait gets only
        // what is left since the start call.
        let rest = (backup.deadline + SERVER_GRACE).saturating_sub(backup.called_at.elapsed());
        let sql = format!("SET statement_timeout = {}", rest.as_millis().max(1));
        self.batch(&sql, Step::Stop, backup.deadline).await?;
        let t0 = Instant::now();
        let row = self.backup_stop(&backup, wait_for_archive).await?;
        let took = t0.elapsed();
        let backup_window = backup.returned_at.elapsed();
        self.state = State::Holding(backup.clone());

        let stop_lsn: Lsn = row
            .get::<_, String>(0)
            .parse()
            .map_err(Error::LabelInvalid)?;
        let labelfile: String = row.get(1);
        let spcmapfile: Option<String> = row.get(2);
        let label: BackupLabel = labelfile.parse()?;

        let timeline = label.start_timeline.unwrap_or(self.info.timeline);
        if backup.from_standby {
            self.check_still_standby().await?;
        }

        let stop_wal_file =
            Lsn(stop_lsn.0.saturating_sub(1)).wal_file_name(timeline, self.info.wal_segment_size);
        info!(
            pid = self.backend_pid,
            %stop_lsn,
            took_ms = took.as_millis() as u64,
            window_ms = backup_window.as_millis() as u64,
            "backup stopped"
        );
        Ok(Stopped {
            stop_lsn,
            timeline,
            stop_wal_file,
            labelfile,
            spcmapfile: spcmapfile.unwrap_or_default(),
            label,
            took,
            backup_window,
        })
    }

    /// The backup to stop, unless the session can no longer stop it.
    fn check_can_stop(&mut self) -> Result<InBackup, Error> {
        let backup = match &self.state {
            State::InBackup(backup) => backup.clone(),
            State::Idle | State::Holding(_) => {
                return Err(Error::InvalidState {
                    step: Step::Stop,
                    detail: "this session has no backup in progress",
                });
            }
            State::Broken => {
                self.close_on_failure();
                return Err(self.lost(Step::Stop));
            }
        };
        if self.shared.deadline_passed.load(Ordering::SeqCst) {
            self.state = State::Broken;
            return Err(Error::DeadlineExceeded {
                step: Step::InBackup,
                deadline: backup.deadline,
            });
        }
        if self.client.is_closed() {
            self.state = State::Broken;
            return Err(self.lost(Step::InBackup));
        }
        Ok(backup)
    }

    /// Waits until the server's archiver has archived `segment`, asking every 100 ms: after a
    /// stop that did not wait, so the wait is outside backup mode and finer than the stop's
    /// own one-second poll. The archiver takes the oldest ready segment first, so one archived
    /// at or past `segment` means every segment up to it is. Bounded by the caller (the
    /// session's deadline still closes it).
    pub async fn wait_archived(&self, segment: &str) -> Result<Duration, Error> {
        let t0 = Instant::now();
        loop {
            // A transaction reads the statistics once (10–14), and on 10–13 primaries the
            // backup's session is one transaction until it is released.
            self.client
                .batch_execute("select pg_stat_clear_snapshot()")
                .await
                .map_err(|e| self.query_error("pg_stat_clear_snapshot()", Step::Stop, e))?;
            let row = self
                .client
                .query_one(
                    "select coalesce(left(last_archived_wal, 24) >= $1, false) from pg_stat_archiver",
                    &[&segment],
                )
                .await
                .map_err(|e| self.query_error("pg_stat_archiver", Step::Stop, e))?;
            if row.get::<_, bool>(0) {
                return Ok(t0.elapsed());
            }
            tokio::time::sleep(ARCHIVE_POLL).await;
        }
    }

    /// A standby's WAL receiver as `pg_stat_wal_receiver` shows it; None when it has none.
    /// Its positions are shown to superusers and members of `pg_read_all_stats` only.
    pub async fn wal_receiver(&self, step: Step) -> Result<Option<WalReceiver>, Error> {
        // 10–12 call the flushed position received_lsn.
        let flushed = match self.info.major {
            ..=12 => "received_lsn",
            _ => "flushed_lsn",
        };
        let sql = format!(
            "select pid, status, receive_start_lsn::text, receive_start_tli, {flushed}::text, received_tli from pg_stat_wal_receiver"
        );
        let row = self
            .client
            .query_opt(&sql, &[])
            .await
            .map_err(|e| self.query_error("pg_stat_wal_receiver", step, e))?;
        let lsn = |s: Option<String>| s.and_then(|s| s.parse::<Lsn>().ok());
        Ok(row.map(|r| WalReceiver {
            pid: r.get(0),
            status: r.get(1),
            start: lsn(r.get(2)),
            start_timeline: r
                .get::<_, Option<i32>>(3)
                .and_then(|t| u32::try_from(t).ok()),
            flushed: lsn(r.get(4)),
            timeline: r
                .get::<_, Option<i32>>(5)
                .and_then(|t| u32::try_from(t).ok()),
        }))
    }

    /// The WAL segments in `pg_wal` from `first` to `last` (file names on one timeline), with
    /// their sizes, as the server lists them. Needs superuser or EXECUTE on `pg_ls_waldir()`.
    pub async fn list_wal(&self, first: &str, last: &str) -> Result<Vec<(String, i64)>, Error> {
        let rows = self
            .client
            .query(
                "select name, size from pg_ls_waldir() where length(name) = 24 and name between $1 and $2 order by name",
                &[&first, &last],
            )
            .await
            .map_err(|e| {
                let grant = wal_listing_grant(&self.info.role.name);
                Error::from_query("listing pg_wal", Step::Stop, &self.info.role.name, move || grant, e)
            })?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Whether the role may list `pg_wal`, which proving the backup's WAL takes: checked
    /// before backup mode, so a backup that could not prove it never starts.
    pub async fn check_wal_listing(&self) -> Result<(), Error> {
        if self.info.role.superuser {
            return Ok(());
        }
        if self.may_execute("pg_ls_waldir()").await? {
            return Ok(());
        }
        Err(Error::MissingPrivilege {
            user: self.info.role.name.clone(),
            missing: "may not execute pg_ls_waldir(), which proves the backup's WAL is in its WAL snapshot".into(),
            grant: wal_listing_grant(&self.info.role.name),
        })
    }

    /// Ends what the stop left held: the backup's transaction and limits, and its slot. If
    /// they cannot end, the connection goes, which ends them too.
    pub async fn release(&mut self) {
        let State::Holding(backup) = &self.state else {
            return;
        };
        let backup = backup.clone();
        self.control.send_replace(Control::Idle);
        self.state = State::Idle;
        if let Err(e) = self.client.batch_execute(&backup.guard.lift()).await {
            warn!(error = %e, "could not end the backup's transaction; closing the session");
            self.close_on_failure();
            return;
        }
        if let Some(slot) = &backup.slot_name {
            self.drop_slot(slot).await;
        }
    }

    /// The stop function's row: the stop LSN, `backup_label` and `tablespace_map`.
    async fn backup_stop(
        &mut self,
        backup: &InBackup,
        wait_for_archive: bool,
    ) -> Result<Row, Error> {
        // As in start: a stop dropped midway leaves the session unusable, not "in backup".
        self.state = State::Broken;
        let sql = if self.info.major >= 15 {
            "select lsn::text, labelfile, spcmapfile from pg_backup_stop($1)"
        } else {
            "select lsn::text, labelfile, spcmapfile from pg_stop_backup(false, $1)"
        };
        let result = bounded(
            &self.shared,
            backup.called_at + backup.deadline,
            self.client.query_one(sql, &[&wait_for_archive]),
        )
        .await;
        result.map_err(|e| {
            let err = self.step_error(Step::Stop, backup.deadline, e);
            self.close_on_failure();
            err
        })
    }

    /// The server refuses the stop itself after a promotion; this also covers a promotion
    /// that lands between its check and our reply.
    async fn check_still_standby(&mut self) -> Result<(), Error> {
        let still_standby: bool = self
            .client
            .query_one("select pg_is_in_recovery()", &[])
            .await
            .map_err(|e| self.query_error("pg_is_in_recovery()", Step::Stop, e))?
            .get(0);
        if !still_standby {
            self.close_on_failure();
            return Err(Error::StandbyPromoted {
                detail: "the server left recovery before the backup was stopped".into(),
            });
        }
        Ok(())
    }

    /// Statements without results around start and stop; a failure leaves the session's
    /// backup state unknown, so the session is closed.
    async fn batch(&mut self, sql: &str, step: Step, deadline: Duration) -> Result<(), Error> {
        if let Err(e) = self.client.batch_execute(sql).await {
            let err = match self.shared.deadline_passed.load(Ordering::SeqCst) {
                true => Error::DeadlineExceeded { step, deadline },
                false => self.query_error("setting the session's limits", step, e),
            };
            self.close_on_failure();
            return Err(err);
        }
        Ok(())
    }

    /// Temporary slots vanish with the session anyway; dropping it now releases WAL while
    /// the caller still holds the session for the snapshots' readyToUse.
    async fn drop_slot(&self, slot: &str) {
        if let Err(e) = self
            .client
            .execute("select pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            warn!(slot, error = %e, "could not drop the temporary replication slot");
        }
    }

    /// Whether the role may call the function of this signature.
    async fn may_execute(&self, signature: &str) -> Result<bool, Error> {
        Ok(self
            .client
            .query_one(
                "select has_function_privilege($1, 'EXECUTE')",
                &[&signature],
            )
            .await
            .map_err(|e| self.query_error("has_function_privilege()", Step::Start, e))?
            .get(0))
    }

    /// Fails before the backup starts rather than after the snapshots are cut.
    async fn check_privileges(&self) -> Result<(), Error> {
        if self.info.role.superuser {
            return Ok(());
        }
        for signature in backup_functions(self.info.major) {
            if !self.may_execute(signature).await? {
                return Err(Error::MissingPrivilege {
                    user: self.info.role.name.clone(),
                    missing: format!("may not execute {signature}"),
                    grant: format!(
                        "GRANT EXECUTE ON FUNCTION {signature} TO {}",
                        quote_ident(&self.info.role.name)
                    ),
                });
            }
        }
        Ok(())
    }

    /// The role may have changed since connect (failover). On a standby, a backup is only
    /// sound when the primary writes full-page images.
    async fn check_role_and_full_page_writes(&mut self) -> Result<(), Error> {
        let in_recovery: bool = self
            .client
            .query_one("select pg_is_in_recovery()", &[])
            .await
            .map_err(|e| self.query_error("pg_is_in_recovery()", Step::Start, e))?
            .get(0);
        self.info.in_recovery = in_recovery;
        if !in_recovery {
            return Ok(());
        }
        // The last restartpoint records the primary's setting; when it may not be read,
        // the server's own check at start and stop still applies.
        if let Ok(row) = self
            .client
            .query_one("select full_page_writes from pg_control_checkpoint()", &[])
            .await
            && !row.get::<_, bool>(0)
        {
            return Err(Error::FullPageWritesOff {
                detail: "the standby's last restartpoint was written with full_page_writes = off"
                    .into(),
            });
        }
        Ok(())
    }

    /// Why this role cannot pin WAL with a slot, with the fix; None when it can.
    pub fn unpinnable(&self) -> Option<String> {
        let role = &self.info.role;
        (!role.superuser && !role.replication).then(|| {
            format!(
                "role \"{}\" has no REPLICATION attribute (ALTER ROLE {} REPLICATION)",
                role.name,
                quote_ident(&role.name)
            )
        })
    }

    /// Creates a temporary slot that reserves WAL now, before the start checkpoint. Never
    /// fails the backup: without a slot it proceeds and says why WAL is not pinned.
    async fn pin_wal(&self) -> (Option<String>, Option<String>) {
        if let Some(why) = self.unpinnable() {
            return (None, Some(why));
        }
        // Unique among live backends; a temporary slot dies with its backend.
        let name = format!("pgsnap_{}", self.backend_pid);
        match self
            .client
            .execute(
                "select pg_create_physical_replication_slot($1, true, true)",
                &[&name],
            )
            .await
        {
            Ok(_) => (Some(name), None),
            Err(e) => {
                let why = e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| e.to_string());
                warn!(
                    slot = name,
                    error = why,
                    "WAL is not pinned for this backup"
                );
                (
                    None,
                    Some(format!(
                        "creating a temporary replication slot failed: {why}"
                    )),
                )
            }
        }
    }

    fn step_error(&self, step: Step, deadline: Duration, failure: Failure) -> Error {
        let e = match failure {
            Failure::Pg(e) if !self.shared.deadline_passed.load(Ordering::SeqCst) => e,
            Failure::Pg(_) | Failure::Deadline => {
                return Error::DeadlineExceeded { step, deadline };
            }
        };
        if e.as_db_error().is_none() {
            return self.lost(step);
        }
        self.query_error(
            if step == Step::Start {
                "start backup"
            } else {
                "stop backup"
            },
            step,
            e,
        )
    }

    fn query_error(&self, what: &'static str, step: Step, e: tokio_postgres::Error) -> Error {
        let major = self.info.major;
        let user = self.info.role.name.clone();
        Error::from_query(
            what,
            step,
            &self.info.role.name,
            move || grants(major, &user).join("; "),
            e,
        )
    }

    fn lost(&self, step: Step) -> Error {
        let detail = self
            .shared
            .lost
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or_else(|| "the connection was closed".to_string());
        Error::SessionLost { step, detail }
    }

    /// After a failed start or stop the server's backup state is unknown: close the
    /// connection, so whatever is left of the backup is aborted by the server.
    fn close_on_failure(&mut self) {
        self.state = State::Broken;
        self.control.send_replace(Control::Abort);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The connection task cancels a running statement and closes the connection:
        // PostgreSQL aborts the backup. Also after a start or stop that was dropped midway.
        if !matches!(self.state, State::Idle) {
            self.control.send_replace(Control::Abort);
        }
    }
}

/// Connects and hands the connection to its task ([`drive`]).
async fn open(
    opts: &ConnectOptions,
) -> Result<(Client, watch::Sender<Control>, Arc<Shared>), Error> {
    let target = opts.target();
    let tls = opts.tls()?;
    // tokio-postgres' own timeout covers the TCP connect only, not TLS or auth.
    let (client, connection) = timeout(opts.connect_timeout, opts.config().connect(tls.clone()))
        .await
        .map_err(|_| Error::Unreachable {
            target: target.clone(),
            detail: format!("no answer within {:?}", opts.connect_timeout),
        })?
        .map_err(|e| Error::from_connect(&target, &opts.user, e))?;

    let shared = Arc::new(Shared::default());
    let (control, control_rx) = watch::channel(Control::Idle);
    tokio::spawn(drive(
        connection,
        control_rx,
        shared.clone(),
        client.cancel_token(),
        tls,
    ));
    Ok((client, control, shared))
}

/// A backend busy in pg_backup_stop (waiting for the archive) reads nothing from its
/// client, so it would not notice a client that died without a cancel (an operator killed
/// mid-backup) and stay in backup mode. This makes it look (14+).
async fn enable_client_connection_check(client: &Client, user: &str) -> Result<(), Error> {
    client
        .batch_execute("SET client_connection_check_interval = '1s'")
        .await
        .map_err(|e| {
            Error::from_query(
                "client_connection_check_interval",
                Step::Connect,
                user,
                String::new,
                e,
            )
        })
}

async fn query_backend_pid(client: &Client, user: &str) -> Result<i32, Error> {
    Ok(client
        .query_one("select pg_backend_pid()", &[])
        .await
        .map_err(|e| Error::from_query("pg_backend_pid()", Step::Connect, user, String::new, e))?
        .get(0))
}

fn check_label(label: &str) -> Result<(), Error> {
    if label.len() > MAX_LABEL_BYTES {
        return Err(Error::LabelTooLong {
            len: label.len(),
            max: MAX_LABEL_BYTES,
        });
    }
    // backup_label is line-based: a line break in the label would add lines a restore
    // reads as fields (START TIMELINE follows LABEL).
    if label.chars().any(char::is_control) {
        return Err(Error::LabelHasControlCharacters {
            label: label.to_string(),
        });
    }
    Ok(())
}

/// The function signatures a non-superuser needs EXECUTE on, per major.
pub fn backup_functions(major: u32) -> [&'static str; 2] {
    if major >= 15 {
        ["pg_backup_start(text, boolean)", "pg_backup_stop(boolean)"]
    } else {
        [
            "pg_start_backup(text, boolean, boolean)",
            "pg_stop_backup(boolean, boolean)",
        ]
    }
}

/// Every statement a superuser runs so that `role` can take backups on this major.
pub fn grants(major: u32, role: &str) -> Vec<String> {
    let quoted = quote_ident(role);
    let mut out = vec![
        format!("ALTER ROLE {quoted} REPLICATION"),
        format!("GRANT pg_read_all_settings TO {quoted}"),
    ];
    out.extend(
        backup_functions(major)
            .iter()
            .map(|f| format!("GRANT EXECUTE ON FUNCTION {f} TO {quoted}")),
    );
    out.push(wal_listing_grant(role));
    out
}

fn wal_listing_grant(role: &str) -> String {
    format!(
        "GRANT EXECUTE ON FUNCTION pg_ls_waldir() TO {}",
        quote_ident(role)
    )
}

/// How the server itself ends a backup whose client froze or vanished behind a network that
/// drops everything: the backend idle between start and stop is ended by an idle timeout, and
/// its exit aborts the backup and drops the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// 14+: `idle_session_timeout`.
    IdleSession,
    /// 10-13 primaries: start and stop in one read-committed transaction, whose
    /// `idle_in_transaction_session_timeout` does the same (`idle_session_timeout` does not
    /// exist there).
    Transaction,
    /// 10-13 standbys: a transaction there is ended by recovery conflicts while the primary
    /// works (measured on 10 and 11), so only `statement_timeout` and keepalives guard them.
    KeepalivesOnly,
}

impl Guard {
    pub fn of(major: u32, in_recovery: bool) -> Guard {
        match (major >= 14, in_recovery) {
            (true, _) => Guard::IdleSession,
            (false, false) => Guard::Transaction,
            (false, true) => Guard::KeepalivesOnly,
        }
    }

    fn idle_setting(self) -> Option<&'static str> {
        match self {
            Guard::IdleSession => Some("idle_session_timeout"),
            Guard::Transaction => Some("idle_in_transaction_session_timeout"),
            Guard::KeepalivesOnly => None,
        }
    }

    /// Set before the start call: the limits at the deadline plus the grace, keepalives (and
    /// `tcp_user_timeout`, 12+) that notice a peer gone within about 30 s, and
    /// `statement_timeout` for a start or stop the server itself is stuck in (a spread
    /// checkpoint, the archive wait) when nobody is left to cancel it. Every role may set all
    /// of these for its own session.
    pub fn before_start(self, major: u32, limit: Duration) -> String {
        let mut sql = self.limits(limit);
        sql.push_str(
            "; SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3",
        );
        if major >= 12 {
            sql.push_str("; SET tcp_user_timeout = 30000");
        }
        if self == Guard::Transaction {
            // Read committed whatever the role's default: between statements it holds no
            // snapshot, so a backup holds back no vacuum.
            sql.push_str("; BEGIN ISOLATION LEVEL READ COMMITTED");
        }
        sql
    }

    /// The limits at `limit` from now: after the start returned, what is left since the start
    /// call.
    pub fn limits(self, limit: Duration) -> String {
        let ms = limit.as_millis().max(1);
        let mut sql = format!("SET statement_timeout = {ms}");
        if let Some(idle) = self.idle_setting() {
            sql.push_str(&format!("; SET {idle} = {ms}"));
        }
        sql
    }

    /// After the stop: out of backup mode, the session is an ordinary one again.
    pub fn lift(self) -> String {
        let mut sql = String::new();
        if self == Guard::Transaction {
            sql.push_str("COMMIT; ");
        }
        sql.push_str("RESET statement_timeout");
        if let Some(idle) = self.idle_setting() {
            sql.push_str(&format!("; RESET {idle}"));
        }
        sql
    }
}

/// Why a statement of the backup did not return a row.
enum Failure {
    Deadline,
    Pg(tokio_postgres::Error),
}

/// Runs a statement of the backup, bounded by the backup's deadline. The connection task
/// closes the connection at the deadline, which ends the statement; the timeout here only
/// guards against a cancel request or a close that hangs.
async fn bounded<T>(
    shared: &Shared,
    deadline: Instant,
    fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Failure> {
    match tokio::time::timeout_at(deadline + CANCEL_TIMEOUT * 2, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::Pg(e)),
        Err(_) => {
            shared.deadline_passed.store(true, Ordering::SeqCst);
            Err(Failure::Deadline)
        }
    }
}

/// The connection task: drives the connection, and closes it on Abort, at the deadline or
/// when the Session is dropped mid-backup. Before closing, a cancel request ends a statement
/// the server may be blocked in (the checkpoint wait, the archive wait): a backend notices a
/// closed client only when it next talks to it. Server notices (e.g. "still waiting for all
/// required WAL segments to be archived") go to the log, where an operator looks.
async fn drive<S, T>(
    mut connection: Connection<S, T>,
    mut control: watch::Receiver<Control>,
    shared: Arc<Shared>,
    cancel: CancelToken,
    tls: MakeRustlsConnect,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    loop {
        let current = *control.borrow_and_update();
        let deadline = async move {
            match current {
                Control::Deadline(at) => sleep_until(at).await,
                Control::Abort => {}
                Control::Idle => pending::<()>().await,
            }
        };
        tokio::select! {
            message = messages.next() => {
                let why = match message {
                    Some(Ok(AsyncMessage::Notice(notice))) => {
                        log_notice(&notice);
                        continue;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => e.to_string(),
                    None => "the server closed the connection".to_string(),
                };
                if let Ok(mut lost) = shared.lost.lock() {
                    *lost = Some(why);
                }
                return;
            }
            changed = control.changed() => {
                if changed.is_err() {
                    // The Session is gone: close, cancelling first if it was in backup mode.
                    if !matches!(*control.borrow(), Control::Idle) {
                        let _ = timeout(CANCEL_TIMEOUT, cancel.cancel_query(tls.clone())).await;
                    }
                    return;
                }
            }
            () = deadline => {
                if matches!(current, Control::Deadline(_)) {
                    shared.deadline_passed.store(true, Ordering::SeqCst);
                    warn!("backup deadline passed: closing the session so PostgreSQL aborts the backup");
                }
                let _ = timeout(CANCEL_TIMEOUT, cancel.cancel_query(tls.clone())).await;
                return;
            }
        }
    }
}

fn log_notice(notice: &DbError) {
    if matches!(notice.parsed_severity(), Some(Severity::Warning)) {
        warn!(notice = notice.message(), "PostgreSQL warning");
    } else {
        info!(notice = notice.message(), "PostgreSQL notice");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The controller runs sessions inside spawned tasks.
    #[test]
    fn session_and_its_futures_are_send() {
        fn send<T: Send>(_: &T) {}
        fn check(s: &mut Session, o: &ConnectOptions) {
            send(&Session::connect(o));
            send(&s.start("", true, Duration::ZERO));
        }
        fn check_stop(s: &mut Session) {
            send(&s.stop(true));
        }
        let _ = (check, check_stop);
        fn send_type<T: Send + Sync>() {}
        send_type::<Session>();
    }

    #[test]
    fn labels_fit_on_one_backup_label_line() {
        assert!(check_label(&"x".repeat(MAX_LABEL_BYTES)).is_ok());
        let too_long = check_label(&"x".repeat(MAX_LABEL_BYTES + 1)).unwrap_err();
        assert_eq!(too_long.reason(), "LabelTooLong");
        let two_lines = check_label("a\nSTART TIMELINE: 9").unwrap_err();
        assert_eq!(two_lines.reason(), "LabelHasControlCharacters");
    }

    #[test]
    fn the_server_bounds_backup_mode_itself_on_every_major() {
        let limit = Duration::from_secs(65);
        assert_eq!(Guard::of(14, true), Guard::IdleSession);
        assert_eq!(Guard::of(13, false), Guard::Transaction);
        assert_eq!(Guard::of(10, true), Guard::KeepalivesOnly);
        let on_11 = Guard::Transaction.before_start(11, limit);
        assert!(
            on_11.starts_with(
                "SET statement_timeout = 65000; SET idle_in_transaction_session_timeout = 65000;"
            ),
            "{on_11}"
        );
        assert!(
            on_11.ends_with("; BEGIN ISOLATION LEVEL READ COMMITTED"),
            "the backup runs in a read-committed transaction: {on_11}"
        );
        assert!(
            !on_11.contains("tcp_user_timeout"),
            "no such setting before 12"
        );
        let on_17 = Guard::IdleSession.before_start(17, limit);
        assert!(
            on_17.contains("SET idle_session_timeout = 65000;"),
            "{on_17}"
        );
        assert!(on_17.contains("SET tcp_user_timeout = 30000") && !on_17.contains("BEGIN"));
        let standby_12 = Guard::KeepalivesOnly.before_start(12, limit);
        assert!(
            !standby_12.contains("session_timeout") && !standby_12.contains("BEGIN"),
            "{standby_12}"
        );
        assert_eq!(
            Guard::Transaction.lift(),
            "COMMIT; RESET statement_timeout; RESET idle_in_transaction_session_timeout"
        );
        assert_eq!(Guard::KeepalivesOnly.lift(), "RESET statement_timeout");
    }

    #[test]
    fn grants_per_major() {
        assert_eq!(
            grants(15, "pgsnap"),
            [
                "ALTER ROLE pgsnap REPLICATION",
                "GRANT pg_read_all_settings TO pgsnap",
                "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO pgsnap",
                "GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO pgsnap",
                "GRANT EXECUTE ON FUNCTION pg_ls_waldir() TO pgsnap",
            ]
        );
        assert_eq!(
            grants(14, "Backup")[2],
            "GRANT EXECUTE ON FUNCTION pg_start_backup(text, boolean, boolean) TO \"Backup\""
        );
        assert_eq!(backup_functions(10)[1], "pg_stop_backup(boolean, boolean)");
    }
}
