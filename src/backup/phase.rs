//! The Backup's state machine as pure decisions: what to do in each phase, given what was
//! observed. The reconciler and the session task do the I/O these decisions ask for.

use super::volumes::PlannedSnapshot;
use crate::api::Duration;
use crate::api::backup::{Phase, TargetRole, VolumeRole, WalSource};
use crate::controller::Failure;
use crate::label_store::Location;
use crate::postgres::{Lsn, WalReceiver};

/// What the reconciler does with a Backup in a given phase.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Pending: check the inputs and wait for a slot, then hand over to a session task.
    Admit,
    /// A task holds the session: it alone moves the Backup on.
    LeaveToTask,
    /// The phase says a session is open but no task of this process holds it: the operator
    /// restarted or lost leadership mid-backup. The server has aborted the backup itself.
    SessionLost,
    /// Out of backup mode: wait for every snapshot to be ready to use.
    AwaitReady,
    /// Failed while snapshots were being cut: delete each once it is cut.
    FinishRemoval,
    /// Completed or Failed: nothing left to do.
    Done,
}

pub fn next(phase: Option<Phase>, task_running: bool, snapshots_to_delete: bool) -> Next {
    match phase.unwrap_or(Phase::Pending) {
        Phase::Pending if task_running => Next::LeaveToTask,
        Phase::Pending => Next::Admit,
        p if p.holds_session() && task_running => Next::LeaveToTask,
        p if p.holds_session() => Next::SessionLost,
        Phase::Finalizing => Next::AwaitReady,
        Phase::Failed if snapshots_to_delete => Next::FinishRemoval,
        _ => Next::Done,
    }
}

/// Whether the cached Backup predates a status this process already wrote: the watch has
/// not delivered the write yet. Acting on such a stale copy could start a finished backup
/// again, or declare a session lost that ended cleanly; the write's own watch event will
/// bring the fresh copy.
pub fn is_stale(cached: Option<Phase>, written: Phase) -> bool {
    rank(cached.unwrap_or(Phase::Pending)) < rank(written)
}

fn rank(phase: Phase) -> u8 {
    match phase {
        Phase::Pending => 0,
        Phase::Starting => 1,
        Phase::Snapshotting => 2,
        Phase::Stopping => 3,
        Phase::Finalizing => 4,
        Phase::Completed | Phase::Failed => 5,
    }
}

/// Whether a Pending backup may open its session now.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Go,
    /// Another backup of the same database is running: backups of one database queue.
    DatabaseBusy {
        running: String,
    },
    /// The operator-wide limit of concurrent sessions is reached.
    LimitReached {
        limit: usize,
    },
}

/// `databases`: the keys of the database(s) this backup may run on; `running` holds the
/// keys and name of every backup holding a session.
pub fn admit(databases: &[String], running: &[(Vec<String>, String)], limit: usize) -> Admission {
    let shares = |keys: &Vec<String>| keys.iter().any(|k| databases.contains(k));
    if let Some((_, name)) = running.iter().find(|(keys, _)| shares(keys)) {
        return Admission::DatabaseBusy {
            running: name.clone(),
        };
    }
    if running.len() >= limit {
        return Admission::LimitReached { limit };
    }
    Admission::Go
}

/// One snapshot as the Finalizing phase sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotObservation {
    pub name: String,
    pub exists: bool,
    pub ready: bool,
    pub error: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Readiness {
    Complete,
    Wait,
    Fail {
        reason: &'static str,
        message: String,
    },
}

/// After the stop: done when every snapshot is ready; a lost or failed snapshot fails the
/// backup, since the label without its data restores nothing, and so does waiting past
/// `overdue` (the readyTimeout, once it has passed): Finalizing never lasts forever.
pub fn readiness(snapshots: &[SnapshotObservation], overdue: Option<Duration>) -> Readiness {
    if snapshots.is_empty() {
        return Readiness::Fail {
            reason: "SnapshotMissing",
            message: "the backup records no snapshots".into(),
        };
    }
    if let Some(s) = snapshots.iter().find(|s| !s.exists) {
        return Readiness::Fail {
            reason: "SnapshotMissing",
            message: format!("snapshot {} was deleted before it was ready", s.name),
        };
    }
    if let Some((name, err)) = snapshots
        .iter()
        .find_map(|s| Some((&s.name, s.error.as_ref()?)))
    {
        return Readiness::Fail {
            reason: "SnapshotFailed",
            message: format!("snapshot {name} failed: {err}"),
        };
    }
    let waiting: Vec<&str> = snapshots
        .iter()
        .filter(|s| !s.ready)
        .map(|s| s.name.as_str())
        .collect();
    match (waiting.is_empty(), overdue) {
        (true, _) => Readiness::Complete,
        (false, None) => Readiness::Wait,
        (false, Some(timeout)) => Readiness::Fail {
            reason: "SnapshotNotReady",
            message: format!(
                "snapshot(s) {} not ready to use {timeout} after the server left backup mode (spec.readyTimeout): the backup cannot be restored",
                waiting.join(", ")
            ),
        },
    }
}

/// Where a restore will find this backup's WAL, or why there is no such place. Decided before
/// backup mode: a backup whose WAL goes nowhere is unrestorable by construction.
pub fn wal_source(
    requested: WalSource,
    in_recovery: bool,
    archive_mode: &str,
    archiver: &str,
) -> Result<WalSource, Failure> {
    if requested == WalSource::Snapshot {
        // A standby's WAL is proven by its receiver too (`standby_streams`, `streamed`).
        return Ok(WalSource::Snapshot);
    }
    let refuse = |why: String| {
        Err(Failure::new(
            "NoWalSource",
            format!(
                "walSource is Archive, but {why}; the snapshots are cut in backup mode and lack the WAL up to the backup's end, so this backup could not be restored (walSource: Snapshot keeps that WAL with the backup)"
            ),
        ))
    };
    match archive_mode {
        "off" => refuse("the server archives no WAL (archive_mode = off): turn on archiving (archive_mode = on and an archive_command)".into()),
        "on" if in_recovery => refuse("a standby with archive_mode = on leaves archiving to its primary, and its backup cannot wait for that archive: set archive_mode = always on the standby".into()),
        _ if archiver.trim().is_empty() => refuse(format!("archive_mode is {archive_mode} but neither archive_command nor archive_library is set, so no WAL reaches an archive")),
        _ => Ok(WalSource::Archive),
    }
}

/// Before backup mode, on a standby keeping its WAL: what is proven in a standby's pg_wal is
/// what its WAL receiver streamed there; the directory may also hold segments restored from
/// an archive and recycled files under future names. So it must stream, and the role must see
/// the receiver (`pg_stat_wal_receiver` shows others only its pid; `pg_read_all_stats`).
pub fn standby_streams(receiver: Option<&WalReceiver>, role: &str) -> Result<(), Failure> {
    match receiver {
        Some(r) if r.status.is_none() => Err(Failure::new(
            "MissingPrivilege",
            format!(
                "role {role} may not see where the standby's WAL receiver started streaming (pg_stat_wal_receiver), which proves the backup's WAL is in pg_wal: GRANT pg_read_all_stats TO {}",
                crate::postgres::quote_ident(role)
            ),
        )),
        Some(r) if r.status.as_deref() == Some("streaming") => Ok(()),
        _ => Err(Failure::new(
            "WalSourceUnsupported",
            "walSource: Snapshot on a standby needs it to stream from its primary, and it has no streaming WAL receiver now: only what a receiver streamed into pg_wal is proven there (pg_wal may also hold archive-restored or recycled files). Back it up with walSource: Archive (archive_mode = always on the standby), or once it streams",
        )),
    }
}

/// After the stop, before the WAL snapshot of a standby: every segment of the backup was
/// written into pg_wal by one WAL receiver, the one that streamed when the backup started
/// (same process, same start), which started at or before the backup's first segment (it
/// starts at a segment's beginning, and writes each segment whole from there), on the
/// backup's timeline, and has flushed past the stop.
pub fn streamed(
    before: &WalReceiver,
    after: Option<&WalReceiver>,
    start: Lsn,
    stop: Lsn,
    timeline: u32,
) -> Result<(), Failure> {
    let incomplete = |why: String| {
        Err(Failure::new(
            "WalIncomplete",
            format!("{why}: the backup could not be restored without an archive"),
        ))
    };
    let streaming = |r: &&WalReceiver| r.status.as_deref() == Some("streaming");
    let Some(after) = after
        .filter(streaming)
        .filter(|a| a.pid == before.pid && a.start == before.start)
    else {
        let now = match after {
            Some(a) => format!(
                "pid {}, {}, streaming from {:?}",
                a.pid,
                a.status.as_deref().unwrap_or("?"),
                a.start
            ),
            None => "none".into(),
        };
        return incomplete(format!(
            "the standby's WAL receiver (pid {}) stopped or restarted during the backup (now: {now}), so the backup's WAL may have come from elsewhere",
            before.pid
        ));
    };
    match (before.start, after.flushed) {
        (Some(from), _) if from > start => incomplete(format!(
            "the standby's WAL receiver started streaming at {from}, after the backup's start {start}; the WAL before that was replayed from elsewhere and need not be in pg_wal (a backup that starts later is kept)"
        )),
        (_, Some(flushed)) if flushed < stop => incomplete(format!(
            "the standby's WAL receiver had flushed WAL only to {flushed}, before the backup's stop {stop}"
        )),
        (Some(_), Some(_))
            if before.start_timeline != Some(timeline) || after.timeline != Some(timeline) =>
        {
            incomplete(format!(
                "the standby's WAL receiver streams timeline {:?} (from {:?}), the backup is on {timeline}",
                after.timeline, before.start_timeline
            ))
        }
        (Some(_), Some(_)) => Ok(()),
        _ => incomplete("the standby's WAL receiver positions could not be read".into()),
    }
}

/// The planned snapshot whose volume holds `pg_wal`, and where: the volume the WAL snapshot
/// is cut of. `unconfirmed` says why nobody could tell exactly where pg_wal's files are; then
/// the backup's WAL could not be kept, and the backup is refused before backup mode.
pub fn wal_volume<'a>(
    plan: &'a [PlannedSnapshot],
    unconfirmed: Option<&str>,
) -> Result<(&'a PlannedSnapshot, &'a Location), Failure> {
    let not_located = |why: &str| {
        Failure::new(
            "WalNotLocated",
            format!(
                "walSource is Snapshot, but {why}; or set walSource: Archive on a server that archives"
            ),
        )
    };
    if let Some(why) = unconfirmed {
        return Err(not_located(why));
    }
    plan.iter()
        .find_map(|p| Some((p, p.locations.iter().find(|l| l.role == VolumeRole::Wal)?)))
        .ok_or_else(|| not_located("no planned volume holds pg_wal"))
}

/// A backup's WAL counts as kept only when every segment from its first to its last was
/// listed whole by the server after the WAL snapshot was cut: a segment present then was
/// present at the cut (names only grow, and one is never recreated), and was complete,
/// since the stop had flushed it.
pub fn check_wal_kept(
    first: &str,
    last: &str,
    segment_size: u64,
    listed: &[(String, i64)],
) -> Result<(), Failure> {
    let incomplete = |message: String| Failure::new("WalIncomplete", message);
    let needed = crate::postgres::wal_segments(first, last, segment_size)
        .ok_or_else(|| incomplete(format!("{first}..{last} is not a range of WAL segments")))?;
    let range = format!("needed from {first} to {last}");
    for name in &needed {
        match listed.iter().find(|(n, _)| n == name) {
            None => {
                return Err(incomplete(format!(
                    "segment {name} ({range}) was no longer in pg_wal after the WAL snapshot was cut (recycled by a checkpoint: give the role the REPLICATION attribute, so a slot holds the WAL): the backup could not be restored without an archive"
                )));
            }
            Some((_, size)) if u64::try_from(*size).ok() != Some(segment_size) => {
                return Err(incomplete(format!(
                    "segment {name} ({range}) is {size} bytes in pg_wal, a segment is {segment_size}"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Picks the server to back up among the selected pods (name, in recovery), by role. Pods are
/// considered in name order, so the choice is stable.
pub fn choose_server(role: TargetRole, candidates: &[(String, bool)]) -> Option<String> {
    let mut sorted: Vec<_> = candidates.to_vec();
    sorted.sort();
    let first = |standby: bool| {
        sorted
            .iter()
            .find(|(_, r)| *r == standby)
            .map(|(n, _)| n.clone())
    };
    match role {
        TargetRole::Primary => first(false),
        TargetRole::Standby => first(true),
        TargetRole::PreferStandby => first(true).or_else(|| first(false)),
        TargetRole::Any => sorted.first().map(|(n, _)| n.clone()),
    }
}

/// The time pgsnap itself adds to backup mode: the window minus the parts it waits on.
pub fn overhead(window: f64, cut_wait: f64, stop_call: f64) -> f64 {
    (window - cut_wait - stop_call).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wal_comes_from_the_wal_snapshot_or_an_archiving_server() {
        use WalSource::{Archive, Snapshot};
        let reason = |r: Result<WalSource, Failure>| r.map_err(|f| f.reason);
        // Kept with the backup, whatever the server archives.
        assert_eq!(reason(wal_source(Snapshot, false, "off", "")), Ok(Snapshot));
        assert_eq!(reason(wal_source(Snapshot, true, "off", "")), Ok(Snapshot));
        assert_eq!(
            reason(wal_source(Archive, false, "on", "cp %p /a/%f")),
            Ok(Archive)
        );
        assert_eq!(
            reason(wal_source(Archive, true, "always", "cp %p /a/%f")),
            Ok(Archive)
        );
        assert_eq!(
            reason(wal_source(Archive, false, "always", "basic_archive")),
            Ok(Archive)
        );
        let no_source = Err("NoWalSource".to_string());
        let archive =
            |standby, mode, archiver| reason(wal_source(Archive, standby, mode, archiver));
        assert_eq!(archive(false, "off", "cp %p /a/%f"), no_source);
        assert_eq!(archive(false, "on", ""), no_source);
        assert_eq!(archive(true, "on", "cp %p /a/%f"), no_source);
        let message = wal_source(Archive, true, "on", "cp").unwrap_err().message;
        assert!(
            message.contains("set archive_mode = always on the standby"),
            "{message}"
        );
    }

    #[test]
    fn a_standbys_wal_is_kept_only_when_one_receiver_streamed_all_of_it() {
        let lsn = |s: &str| s.parse::<Lsn>().unwrap();
        let receiver = WalReceiver {
            pid: 42,
            status: Some("streaming".into()),
            start: Some(lsn("0/3000000")),
            start_timeline: Some(1),
            flushed: Some(lsn("0/7000100")),
            timeline: Some(1),
        };
        assert_eq!(standby_streams(Some(&receiver), "pgsnap"), Ok(()));
        // What PostgreSQL shows a role without pg_read_all_stats: the pid alone.
        let hidden = WalReceiver {
            pid: 42,
            status: None,
            start: None,
            start_timeline: None,
            flushed: None,
            timeline: None,
        };
        let refused = standby_streams(Some(&hidden), "pgsnap").unwrap_err();
        assert_eq!(refused.reason, "MissingPrivilege");
        assert!(
            refused
                .message
                .ends_with("GRANT pg_read_all_stats TO pgsnap"),
            "{}",
            refused.message
        );
        assert_eq!(
            standby_streams(None, "pgsnap").unwrap_err().reason,
            "WalSourceUnsupported"
        );
        let idle = WalReceiver {
            status: Some("waiting".into()),
            ..receiver.clone()
        };
        assert_eq!(
            standby_streams(Some(&idle), "pgsnap").unwrap_err().reason,
            "WalSourceUnsupported"
        );

        let (start, stop) = (lsn("0/4000028"), lsn("0/6000100"));
        assert_eq!(streamed(&receiver, Some(&receiver), start, stop, 1), Ok(()));
        let message = |after: Option<&WalReceiver>, timeline| {
            let failure = streamed(&receiver, after, start, stop, timeline).unwrap_err();
            assert_eq!(failure.reason, "WalIncomplete");
            failure.message
        };
        let restarted = WalReceiver {
            pid: 43,
            ..receiver.clone()
        };
        assert!(message(Some(&restarted), 1).starts_with(
            "the standby's WAL receiver (pid 42) stopped or restarted during the backup"
        ));
        assert!(message(None, 1).contains("stopped or restarted"));
        let late = WalReceiver {
            start: Some(lsn("0/5000000")),
            ..receiver.clone()
        };
        let failure = streamed(&late, Some(&late), start, stop, 1).unwrap_err();
        assert!(failure.message.starts_with("the standby's WAL receiver started streaming at 0/5000000, after the backup's start 0/4000028"), "{}", failure.message);
        let behind = WalReceiver {
            flushed: Some(lsn("0/6000000")),
            ..receiver.clone()
        };
        assert!(message(Some(&behind), 1).starts_with("the standby's WAL receiver had flushed WAL only to 0/6000000, before the backup's stop 0/6000100"));
        assert!(
            message(Some(&receiver), 2)
                .starts_with("the standby's WAL receiver streams timeline Some(1)")
        );
    }

    #[test]
    fn the_wal_snapshot_is_of_the_volume_holding_pg_wal_once_located() {
        use crate::label_store::Location;
        let location = |role, claim: &str| Location {
            role,
            tablespace: None,
            tablespace_oid: None,
            server_path: format!("/{claim}"),
            persistent_volume_claim: claim.into(),
            path_in_volume: String::new(),
        };
        let planned = |role, locations| PlannedSnapshot {
            persistent_volume_claim: "c".into(),
            role,
            locations,
        };
        let inside = [planned(
            VolumeRole::Data,
            vec![
                location(VolumeRole::Data, "data"),
                location(VolumeRole::Wal, "data"),
            ],
        )];
        let (p, l) = wal_volume(&inside, None).unwrap();
        assert_eq!((p.role, l.role), (VolumeRole::Data, VolumeRole::Wal));
        let apart = [
            planned(VolumeRole::Data, vec![location(VolumeRole::Data, "data")]),
            planned(VolumeRole::Wal, vec![location(VolumeRole::Wal, "wal")]),
        ];
        assert_eq!(wal_volume(&apart, None).unwrap().1.server_path, "/wal");
        let unlocated = wal_volume(&apart, Some("pg_wal may link to another volume")).unwrap_err();
        assert_eq!(unlocated.reason, "WalNotLocated");
        assert!(
            unlocated.message.contains("pg_wal may link"),
            "{}",
            unlocated.message
        );
    }

    #[test]
    fn the_wal_is_kept_only_when_every_segment_was_listed_whole_after_the_cut() {
        const MB16: u64 = 16 << 20;
        let whole = |names: &[&str]| -> Vec<(String, i64)> {
            names.iter().map(|n| (n.to_string(), MB16 as i64)).collect()
        };
        let (first, last) = ("0000000100000000000000FE", "000000010000000100000001");
        let all = [
            "0000000100000000000000FE",
            "0000000100000000000000FF",
            "000000010000000100000000",
            "000000010000000100000001",
        ];
        assert_eq!(
            check_wal_kept(first, last, MB16, &whole(&all)).map_err(|f| f.reason),
            Ok(())
        );
        let recycled = check_wal_kept(first, last, MB16, &whole(&all[1..])).unwrap_err();
        assert_eq!(recycled.reason, "WalIncomplete");
        assert!(
            recycled
                .message
                .contains("segment 0000000100000000000000FE ("),
            "{}",
            recycled.message
        );
        let mut short = whole(&all);
        short[3].1 = 8192;
        let short = check_wal_kept(first, last, MB16, &short).unwrap_err();
        assert!(short.message.contains("000000010000000100000001 (needed from 0000000100000000000000FE to 000000010000000100000001) is 8192 bytes"), "{}", short.message);
    }

    #[test]
    fn each_phase_has_one_step() {
        assert_eq!(next(None, false, false), Next::Admit);
        assert_eq!(next(Some(Phase::Pending), false, false), Next::Admit);
        assert_eq!(next(Some(Phase::Pending), true, false), Next::LeaveToTask);
        for p in [Phase::Starting, Phase::Snapshotting, Phase::Stopping] {
            assert_eq!(next(Some(p), true, false), Next::LeaveToTask);
            assert_eq!(
                next(Some(p), false, false),
                Next::SessionLost,
                "{p:?} without a task"
            );
        }
        assert_eq!(
            next(Some(Phase::Finalizing), false, false),
            Next::AwaitReady
        );
        assert_eq!(next(Some(Phase::Completed), false, false), Next::Done);
        assert_eq!(next(Some(Phase::Failed), true, false), Next::Done);
        assert_eq!(next(Some(Phase::Failed), false, true), Next::FinishRemoval);
        assert_eq!(next(Some(Phase::Completed), false, true), Next::Done);
    }

    #[test]
    fn a_cached_copy_behind_our_own_write_is_stale() {
        assert!(is_stale(None, Phase::Starting));
        assert!(is_stale(Some(Phase::Pending), Phase::Finalizing));
        assert!(is_stale(Some(Phase::Snapshotting), Phase::Failed));
        assert!(!is_stale(Some(Phase::Finalizing), Phase::Finalizing));
        assert!(!is_stale(Some(Phase::Completed), Phase::Finalizing));
        // A queued backup rewrites Pending; that is not ahead of a Pending copy.
        assert!(!is_stale(Some(Phase::Pending), Phase::Pending));
    }

    #[test]
    fn one_backup_per_database_and_a_global_limit() {
        let keys = |k: &[&str]| k.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        // b1 by podName (uid-0); b2 by a selector of uid-1 and uid-2.
        let running = vec![
            (keys(&["uid-0"]), "b1".to_string()),
            (keys(&["uid-1", "uid-2"]), "b2".to_string()),
        ];
        assert_eq!(
            admit(&keys(&["uid-0"]), &running, 10),
            Admission::DatabaseBusy {
                running: "b1".into()
            }
        );
        // The same pod by another route is the same database.
        assert_eq!(
            admit(&keys(&["uid-2"]), &running, 10),
            Admission::DatabaseBusy {
                running: "b2".into()
            }
        );
        assert_eq!(
            admit(&keys(&["uid-3", "uid-0"]), &running, 10),
            Admission::DatabaseBusy {
                running: "b1".into()
            }
        );
        assert_eq!(
            admit(&keys(&["uid-3"]), &running, 2),
            Admission::LimitReached { limit: 2 }
        );
        assert_eq!(admit(&keys(&["uid-3"]), &running, 3), Admission::Go);
    }

    fn obs(name: &str, exists: bool, ready: bool, error: Option<&str>) -> SnapshotObservation {
        SnapshotObservation {
            name: name.into(),
            exists,
            ready,
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn readiness_waits_for_all_and_fails_on_any_loss() {
        assert_eq!(
            readiness(
                &[obs("a", true, true, None), obs("b", true, false, None)],
                None
            ),
            Readiness::Wait
        );
        assert_eq!(
            readiness(
                &[obs("a", true, true, None), obs("b", true, true, None)],
                None
            ),
            Readiness::Complete
        );
        assert!(matches!(
            readiness(
                &[obs("a", true, true, None), obs("b", false, false, None)],
                None
            ),
            Readiness::Fail {
                reason: "SnapshotMissing",
                ..
            }
        ));
        assert!(matches!(
            readiness(&[obs("a", true, false, Some("disk full"))], None),
            Readiness::Fail {
                reason: "SnapshotFailed",
                ..
            }
        ));
        assert!(matches!(readiness(&[], None), Readiness::Fail { .. }));
        let day = Some(Duration::from_secs(86400));
        assert_eq!(
            readiness(&[obs("a", true, true, None), obs("b", true, false, None)], day),
            Readiness::Fail {
                reason: "SnapshotNotReady",
                message: "snapshot(s) b not ready to use 24h after the server left backup mode (spec.readyTimeout): the backup cannot be restored".into()
            }
        );
        assert_eq!(
            readiness(&[obs("a", true, true, None)], day),
            Readiness::Complete
        );
    }

    #[test]
    fn servers_are_chosen_by_role() {
        let pods = [
            ("db-1".to_string(), true),
            ("db-0".to_string(), false),
            ("db-2".to_string(), true),
        ];
        assert_eq!(
            choose_server(TargetRole::Primary, &pods).as_deref(),
            Some("db-0")
        );
        assert_eq!(
            choose_server(TargetRole::Standby, &pods).as_deref(),
            Some("db-1")
        );
        assert_eq!(
            choose_server(TargetRole::PreferStandby, &pods).as_deref(),
            Some("db-1")
        );
        assert_eq!(
            choose_server(TargetRole::PreferStandby, &pods[1..2]).as_deref(),
            Some("db-0")
        );
        assert_eq!(choose_server(TargetRole::Standby, &pods[1..2]), None);
        assert_eq!(
            choose_server(TargetRole::Any, &pods).as_deref(),
            Some("db-0")
        );
    }

    #[test]
    fn overhead_is_what_remains_of_the_window() {
        assert!((overhead(1.30, 1.0, 0.25) - 0.05).abs() < 1e-9);
        assert_eq!(overhead(0.1, 0.2, 0.0), 0.0);
    }
}
