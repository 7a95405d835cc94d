//! What the commands print for people: aligned tables, colour only on a terminal.

use std::fmt::Write as _;

use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use crate::api::SCHEDULE_NAME_LABEL;
use crate::api::backup::{Backup, BackupStatus, CutMethod, Phase};
use crate::restore::plan::quantity_bytes;

/// The last line of `backup --wait`.
pub fn outcome(status: &BackupStatus) -> String {
    if let Some(e) = &status.error {
        return format!("Failed: {}: {}", e.reason, e.message);
    }
    let window = status
        .backup_window
        .as_ref()
        .and_then(|w| w.seconds.clone())
        .unwrap_or_default();
    match &status.timings {
        Some(t) => format!(
            "Completed: {window}s in backup mode (checkpoint {:.0} ms, {} {:.0} ms, stop {:.0} ms, pgsnap {:.0} ms)",
            t.checkpoint_seconds * 1000.0,
            cut_step(status),
            t.cut_seconds * 1000.0,
            t.stop_seconds * 1000.0,
            t.overhead_seconds * 1000.0
        ),
        None => format!("Completed: {window}s in backup mode"),
    }
}

pub async fn events_of(client: &Client, backup: &Backup) -> Result<Vec<Event>, kube::Error> {
    let api: Api<Event> = Api::namespaced(client.clone(), &backup.namespace().unwrap_or_default());
    let selector = format!(
        "regarding.kind=Backup,regarding.name={},regarding.uid={}",
        backup.name_any(),
        backup.uid().unwrap_or_default()
    );
    let mut events = api
        .list(&ListParams::default().fields(&selector))
        .await?
        .items;
    events.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    Ok(events)
}

/// Columns padded to their widest cell; the last one is not padded.
pub fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|i| rows.iter().map(|r| visible_len(&r[i])).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let last = row.len() - 1;
        for (i, cell) in row.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                out.push_str(&" ".repeat(widths[i] - visible_len(cell) + 3));
            }
        }
        out.push('\n');
    }
    out
}

/// Length without terminal colour codes.
fn visible_len(s: &str) -> usize {
    let mut n = 0;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            n += 1;
        }
    }
    n
}

/// Green for done, red for failed, yellow for a warning, as kubectl plugins people know do.
pub const GREEN: &str = "32";
pub const RED: &str = "31";
pub const YELLOW: &str = "33";

/// `text` in a terminal colour, when colour is on.
pub fn paint(colour: bool, code: &str, text: &str) -> String {
    match colour {
        true => format!("\u{1b}[{code}m{text}\u{1b}[0m"),
        false => text.to_string(),
    }
}

fn phase_cell(status: Option<&BackupStatus>, colour: bool) -> String {
    let phase = status.and_then(|s| s.phase);
    let text = phase.map_or("Pending".to_string(), |p| format!("{p:?}"));
    match phase {
        Some(Phase::Completed) => paint(colour, GREEN, &text),
        Some(Phase::Failed) => paint(colour, RED, &text),
        _ => text,
    }
}

/// kubectl's age: the two largest units.
fn age(since: Timestamp, now: Timestamp) -> String {
    let s = now.duration_since(since).as_secs().max(0);
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m{}s", s / 60, s % 60),
        7200..172800 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// The sum of the snapshots' restore sizes, as the storage reports them.
fn size(status: &BackupStatus) -> String {
    let bytes: Option<u128> = status
        .snapshots
        .iter()
        .map(|s| s.restore_size.as_deref().and_then(quantity_bytes))
        .sum();
    match bytes {
        // Nothing was cut: no size, rather than a size of nothing.
        _ if status.snapshots.is_empty() => "-".into(),
        Some(b) if b >= 1 << 30 => format!("{:.1}Gi", b as f64 / (1u128 << 30) as f64),
        Some(b) => format!("{}Mi", b.div_ceil(1 << 20)),
        None => "-".into(),
    }
}

pub fn list_table(
    backups: &[Backup],
    all_namespaces: bool,
    now: Timestamp,
    colour: bool,
) -> String {
    let mut rows = vec![Vec::new()];
    if all_namespaces {
        rows[0].push("NAMESPACE".to_string());
    }
    rows[0].extend(
        [
            "NAME",
            "PHASE",
            "DATABASE",
            "AGE",
            "BACKUP MODE",
            "SIZE",
            "WAL",
            "VERIFIED",
            "SCHEDULE",
        ]
        .map(String::from),
    );
    for b in backups {
        let status = b.status.as_ref();
        let mut row = Vec::new();
        if all_namespaces {
            row.push(b.namespace().unwrap_or_default());
        }
        let database = status
            .and_then(|s| s.postgres.as_ref())
            .map(|p| p.pod.clone())
            .unwrap_or_else(|| "-".into());
        let window = status
            .and_then(|s| s.backup_window.as_ref())
            .and_then(|w| w.seconds.clone())
            .map_or("-".into(), |s| format!("{s}s"));
        row.extend([
            b.name_any(),
            phase_cell(status, colour),
            database,
            b.creation_timestamp().map_or("-".into(), |t| age(t.0, now)),
            window,
            status.map_or("-".into(), size),
            status
                .and_then(|s| s.wal_source)
                .map_or("-".into(), |w| format!("{w:?}")),
            status
                .and_then(|s| s.verification.as_ref())
                .map_or("-".into(), |v| v.result.clone()),
            b.labels()
                .get(SCHEDULE_NAME_LABEL)
                .cloned()
                .unwrap_or_else(|| "-".into()),
        ]);
        rows.push(row);
    }
    table(&rows)
}

fn cut_step(status: &BackupStatus) -> &'static str {
    match status.cut.as_ref().map(|c| c.method) {
        Some(CutMethod::VolumeGroupSnapshot) => "group snapshot cut",
        _ => "snapshots cut",
    }
}

pub fn describe(backup: &Backup, events: &[Event], colour: bool) -> String {
    let status = backup.status.clone().unwrap_or_default();
    let mut out = String::new();
    let field = |out: &mut String, k: &str, v: &str| {
        let _ = writeln!(out, "{:<16}{v}", format!("{k}:"));
    };
    field(&mut out, "Name", &backup.name_any());
    field(
        &mut out,
        "Namespace",
        &backup.namespace().unwrap_or_default(),
    );
    field(&mut out, "Phase", &phase_cell(Some(&status), colour));
    if let Some(error) = &status.error {
        field(&mut out, "Reason", &error.reason);
        field(&mut out, "Message", &error.message);
    }
    if let Some(pg) = &status.postgres {
        // Known once connected: a Backup that failed before has only the pod.
        let server = match (&pg.version, pg.role) {
            (Some(v), Some(r)) => format!(" (PostgreSQL {v}, {r:?})"),
            (Some(v), None) => format!(" (PostgreSQL {v})"),
            _ => String::new(),
        };
        field(&mut out, "Database", &format!("{}{server}", pg.pod));
        if let Some(id) = &pg.system_identifier {
            field(&mut out, "System id", id);
        }
    }
    if let Some(w) = status.wal_source {
        field(&mut out, "WAL source", &format!("{w:?}"));
    }
    if let (Some(start), Some(stop)) = (&status.start_lsn, &status.stop_lsn) {
        let wal = |w: &Option<String>| w.clone().unwrap_or_default();
        field(
            &mut out,
            "Start LSN",
            &format!("{start} ({})", wal(&status.start_wal)),
        );
        field(
            &mut out,
            "Stop LSN",
            &format!("{stop} ({})", wal(&status.stop_wal)),
        );
    }
    if let Some(cut) = &status.cut {
        let how = match (
            &cut.volume_group_snapshot,
            &cut.volume_group_snapshot_class,
            &cut.reason,
        ) {
            (Some(group), Some(class), _) => {
                format!("one VolumeGroupSnapshot, {group} (class {class})")
            }
            (_, _, Some(why)) => format!("one snapshot per volume: {why}"),
            _ => "one snapshot per volume".into(),
        };
        field(&mut out, "Cut", &how);
    }
    if let Some(cm) = &status.label_config_map {
        field(&mut out, "Label", cm);
    }
    if let Some(v) = &status.verification {
        let why = match (&v.reason, &v.message) {
            (Some(reason), Some(message)) => format!(": {reason}: {message}"),
            _ => String::new(),
        };
        field(
            &mut out,
            "Verified",
            &format!(
                "{} (Verification {}, {}){why}",
                v.result, v.verification, v.verified_at.0
            ),
        );
    }
    if let Some(t) = &status.timings {
        let window = status
            .backup_window
            .as_ref()
            .and_then(|w| w.seconds.clone())
            .unwrap_or_default();
        out.push_str("\nSteps (time in backup mode ");
        let _ = writeln!(out, "{window}s):");
        let ms = |s: f64| format!("{:.0} ms", s * 1000.0);
        let mut steps = vec![
            vec!["checkpoint (start)".into(), ms(t.checkpoint_seconds)],
            vec![cut_step(&status).into(), ms(t.cut_seconds)],
            vec!["stop".into(), ms(t.stop_seconds)],
            vec!["pgsnap's overhead".into(), ms(t.overhead_seconds)],
        ];
        if let Some(kept) = t.wal_snapshot_seconds {
            steps.push(vec!["WAL snapshot (after)".into(), ms(kept)]);
        }
        if let Some(wait) = t.archive_wait_seconds {
            steps.push(vec!["archive wait (after)".into(), ms(wait)]);
        }
        out.push_str(&indent(&table(&steps)));
    }
    if !status.snapshots.is_empty() {
        out.push_str("\nSnapshots:\n");
        let mut rows = vec![
            ["NAME", "ROLE", "CLAIM", "READY", "SIZE"]
                .map(String::from)
                .to_vec(),
        ];
        for s in &status.snapshots {
            let role = match &s.tablespace {
                Some(t) => format!("{:?} {t}", s.role),
                None => format!("{:?}", s.role),
            };
            rows.push(vec![
                s.name.clone(),
                role,
                s.persistent_volume_claim.clone(),
                s.ready_to_use.to_string(),
                s.restore_size.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        out.push_str(&indent(&table(&rows)));
    }
    out.push_str("\nEvents:\n");
    if events.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let mut rows = vec![["TYPE", "REASON", "MESSAGE"].map(String::from).to_vec()];
        for e in events {
            rows.push(vec![
                e.type_.clone().unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
                e.note.clone().unwrap_or_default(),
            ]);
        }
        out.push_str(&indent(&table(&rows)));
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::golden;

    fn backups() -> Vec<Backup> {
        serde_yaml::from_str(include_str!("../../tests/golden/plugin-backups.yaml")).unwrap()
    }

    #[test]
    fn list_and_describe_read_as_the_golden_files() {
        let now = "2026-12-03T12:00:00Z".parse().unwrap();
        golden("plugin-list.txt", &list_table(&backups(), true, now, false));
        let event: Event = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "orders-1.1"},
            "eventTime": "2026-12-03T11:58:03.000000Z",
            "reason": "BackupModeEnded", "type": "Normal", "action": "Stop",
            "reportingController": "pgsnap.io/operator", "reportingInstance": "pgsnap-0",
            "note": "backup mode ended after 1.94 s at 0/8000100",
        }))
        .unwrap();
        golden(
            "plugin-describe.txt",
            &describe(&backups()[0], &[event], false),
        );
        golden(
            "plugin-describe-failed.txt",
            &describe(&backups()[1], &[], false),
        );
        assert_eq!(
            outcome(backups()[0].status.as_ref().unwrap()),
            "Completed: 1.94s in backup mode (checkpoint 412 ms, group snapshot cut 1318 ms, stop 31 ms, pgsnap 179 ms)"
        );
    }

    #[test]
    fn ages_and_columns() {
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        let now = t("2026-12-03T12:00:00Z");
        assert_eq!(age(t("2026-12-03T11:59:15Z"), now), "45s");
        assert_eq!(age(t("2026-12-03T11:50:00Z"), now), "10m0s");
        assert_eq!(age(t("2026-12-01T09:00:00Z"), now), "2d3h");
        let coloured = "\u{1b}[32mCompleted\u{1b}[0m";
        assert_eq!(visible_len(coloured), 9);
        assert_eq!(
            table(&[
                vec!["A".into(), "B".into()],
                vec![coloured.into(), "x".into()]
            ]),
            format!("A           B\n{coloured}   x\n")
        );
    }
}
