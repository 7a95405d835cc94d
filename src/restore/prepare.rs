//! `pgsnap restore-prepare`: turns a restored data directory (a volume made from a backup's
//! snapshot) into one PostgreSQL recovers from correctly, or refuses with a stable reason.
//!
//! The order of the writes is the safety argument. `backup_label` goes in first: from then
//! on any start of PostgreSQL replays from the backup's checkpoint and, lacking WAL, fails
//! loudly ("WAL ends before end of online backup") instead of doing plain crash recovery
//! from `pg_control`, which silently corrupts a fuzzy copy. The recovery signal comes after
//! the label, and the `pgsnap-restore.done` marker last: a run cut short is simply run again.
//! The marker also keeps a second run (an initContainer on every pod start) from putting the
//! label back after PostgreSQL has recovered and moved on, which would rewind the database.
//! The backup's WAL, when kept with it, is copied into `pg_wal` after the label: a start
//! in between fails loudly for lack of it, and every segment was checked before the label.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};

use crate::label_store::{BACKUP_LABEL_KEY, TABLESPACE_MAP_KEY, sha256_hex};
use crate::postgres::{Lsn, wal_segments};

/// Written last, holding the sha256 of the `backup_label` it prepared the directory with.
pub const DONE_MARKER: &str = "pgsnap-restore.done";
/// Delimits the settings pgsnap appends to `postgresql.auto.conf`, so a run replaces them.
const BLOCK_BEGIN: &str = "# pgsnap restore-prepare: begin";
const BLOCK_END: &str = "# pgsnap restore-prepare: end";
/// Exit status of a refusal; 1 stays what it is for any Rust program (a crash).
pub const EXIT_REFUSED: i32 = 3;

/// Where recovery stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecoveryStop {
    /// As soon as the restored data is consistent: the end of the backup.
    Immediate,
    /// A timestamp as PostgreSQL reads it, e.g. `2026-11-21 10:00:00+00`.
    Time(String),
    /// A WAL location, e.g. `0/3000060`.
    Lsn(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Fetches archived WAL (`%f`, `%p`). None: WAL is read from `pg_wal` only.
    pub restore_command: Option<String>,
    pub target: RecoveryStop,
    /// Promote at the target (a new timeline, read-write); otherwise pause there.
    pub promote: bool,
}

/// Everything restore-prepare needs; the CLI flags map one to one.
#[derive(Clone, Debug)]
pub struct Inputs {
    /// The restored data directory (PGDATA) as this process sees it.
    pub data_dir: PathBuf,
    /// A directory holding `backup_label` and `tablespace_map` (the mounted label ConfigMap).
    pub label_dir: PathBuf,
    /// The sha256 the backup recorded for `backup_label` (annotation `pgsnap.io/backup-label-sha256`).
    pub backup_label_sha256: String,
    /// The sha256 recorded for `tablespace_map`; None skips the check.
    pub tablespace_map_sha256: Option<String>,
    /// The backed-up server's system identifier (annotation `pgsnap.io/system-identifier`).
    pub system_identifier: u64,
    /// The backup's stop LSN (annotation `pgsnap.io/stop-lsn`): a restored copy has not
    /// checkpointed past it.
    pub stop_lsn: Lsn,
    /// New location of the WAL directory, when `pg_wal` is a link and the WAL volume is
    /// mounted elsewhere than on the backed-up server.
    pub wal_dir: Option<PathBuf>,
    /// New locations of tablespaces (OID, path as the server will see it).
    pub tablespaces: Vec<(u32, PathBuf)>,
    pub recovery: Recovery,
    /// Remove `standby.signal` (12+), which would otherwise win over `recovery.signal`.
    pub remove_standby_signal: bool,
    /// The WAL from the backup's start to its stop, copied into `pg_wal` so recovery reaches
    /// the end of the backup without an archive.
    pub backup_wal: Option<BackupWal>,
}

/// The backup's WAL kept with it: a directory holding the segments `first..=last`, i.e. the
/// `pg_wal` of a volume made from the backup's WAL snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupWal {
    pub dir: PathBuf,
    /// The segment holding the backup's start (the label's START WAL LOCATION file).
    pub first: String,
    /// The segment holding the backup's stop.
    pub last: String,
    /// The server's `wal_segment_size` in bytes.
    pub segment_size: u64,
}

/// Why restore-prepare refuses. `reason()` is stable: Job status, Events and scripts use it.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(
        "no backup_label in {0}: without it PostgreSQL would do plain crash recovery of a fuzzy copy (silent corruption); mount the backup's label ConfigMap there"
    )]
    LabelMissing(PathBuf),
    #[error(
        "{file} does not match the backup: sha256 {actual}, the backup recorded {expected}; the label ConfigMap was altered"
    )]
    LabelTampered {
        file: &'static str,
        expected: String,
        actual: String,
    },
    #[error("backup_label is not a PostgreSQL backup label: {0}")]
    LabelInvalid(#[from] crate::postgres::LabelError),
    #[error(
        "the data directory belongs to database system {found}, the label to {expected}: the label is from another database"
    )]
    SystemIdentifierMismatch { expected: u64, found: u64 },
    #[error("{path} is not a PostgreSQL data directory: {detail}")]
    NotADataDirectory { path: PathBuf, detail: String },
    #[error(
        "the data directory is not a restored copy of the backup: {0}. It looks like a live database; restore-prepare writes nothing into it (restore the snapshot into a new volume)"
    )]
    NotARestoredCopy(String),
    #[error("PostgreSQL {0} is not supported; restore-prepare knows 10 and later")]
    UnsupportedMajor(String),
    #[error(
        "the data directory was already prepared from another backup_label (sha256 {found}); restore the snapshot again into a fresh volume"
    )]
    PreparedFromAnotherLabel { found: String },
    #[error("invalid recovery setting {name}: {detail}")]
    InvalidSetting { name: &'static str, detail: String },
    #[error("cannot relocate: {0}")]
    Relocation(String),
    #[error(
        "pg_wal links to {0}, which is not there (its volume is not part of this restore), and no restore command names the archive the backup's WAL is in: pass --restore-command (Restore: spec.recovery.restoreCommand), or mount pg_wal's restored volume there"
    )]
    WalMissing(PathBuf),
    #[error(
        "the backup's WAL lacks segment {segment} (needed from {first} to {last}): {detail}; without it PostgreSQL cannot reach the end of the backup"
    )]
    WalIncomplete {
        segment: String,
        first: String,
        last: String,
        detail: String,
    },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl PrepareError {
    pub fn reason(&self) -> &'static str {
        match self {
            PrepareError::LabelMissing(_) => "LabelMissing",
            PrepareError::LabelTampered { .. } => "LabelChecksumMismatch",
            PrepareError::LabelInvalid(_) => "LabelInvalid",
            PrepareError::SystemIdentifierMismatch { .. } => "SystemIdentifierMismatch",
            PrepareError::NotADataDirectory { .. } => "NotADataDirectory",
            PrepareError::NotARestoredCopy(_) => "NotARestoredCopy",
            PrepareError::UnsupportedMajor(_) => "UnsupportedMajor",
            PrepareError::PreparedFromAnotherLabel { .. } => "PreparedFromAnotherBackup",
            PrepareError::InvalidSetting { .. } => "InvalidRecoverySetting",
            PrepareError::Relocation(_) => "RelocationFailed",
            PrepareError::WalMissing(_) => "WalMissing",
            PrepareError::WalIncomplete { .. } => "WalIncomplete",
            PrepareError::Io { .. } => "FilesystemError",
        }
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PrepareError + 'a {
    move |source| PrepareError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum PrepareOutcome {
    /// The directory was prepared; each entry says what was done.
    Prepared { major: u32, actions: Vec<String> },
    /// A previous run prepared it from the same label: nothing was changed.
    AlreadyPrepared,
}

/// What `global/pg_control` says of a data directory: whose it is, and enough to tell a
/// restored copy from a live database. The fields read sit at the same offsets on 10–18
/// (`ControlFileData`: system_identifier at 0, state at 16, checkPoint at 32), native-endian,
/// which is little-endian on the x86-64 and arm64 servers pgsnap restores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlFile {
    pub system_identifier: u64,
    /// `DBState`: 1 shut down, 2 shut down in recovery, 5 in archive recovery, 6 in production.
    pub state: u32,
    /// The latest checkpoint's location.
    pub checkpoint: Lsn,
}

/// A cleanly stopped server's states: a snapshot cut in backup mode is of a running one.
const SHUT_DOWN_STATES: [u32; 2] = [1, 2];

pub fn read_control_file(data_dir: &Path) -> Result<ControlFile, PrepareError> {
    let path = data_dir.join("global/pg_control");
    let bytes = fs::read(&path).map_err(|e| PrepareError::NotADataDirectory {
        path: data_dir.to_path_buf(),
        detail: format!("cannot read global/pg_control: {e}"),
    })?;
    let field = |at: usize, len: usize| {
        bytes
            .get(at..at + len)
            .ok_or_else(|| PrepareError::NotADataDirectory {
                path: data_dir.to_path_buf(),
                detail: format!("global/pg_control is {} bytes long", bytes.len()),
            })
    };
    let u64_at = |at| field(at, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    Ok(ControlFile {
        system_identifier: u64_at(0)?,
        state: field(16, 4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))?,
        checkpoint: Lsn(u64_at(32)?),
    })
}

/// A snapshot cut in backup mode holds a running server whose latest checkpoint is at or
/// before the backup's stop. A directory that was shut down cleanly, or has checkpointed past
/// the stop, is a live database (or one that ran on): preparing it would rewind it.
pub fn check_restored_copy(control: &ControlFile, stop_lsn: Lsn) -> Result<(), PrepareError> {
    if SHUT_DOWN_STATES.contains(&control.state) {
        return Err(PrepareError::NotARestoredCopy(
            "pg_control says its server was shut down cleanly, and a snapshot taken in backup mode is of a running server".into(),
        ));
    }
    if control.checkpoint > stop_lsn {
        return Err(PrepareError::NotARestoredCopy(format!(
            "its latest checkpoint {} is after the backup's stop {stop_lsn}, so a server has run on it since the backup",
            control.checkpoint
        )));
    }
    Ok(())
}

/// The major version in `PG_VERSION` ("12", or "9.6" for old servers).
pub fn major_version(data_dir: &Path) -> Result<u32, PrepareError> {
    let text = fs::read_to_string(data_dir.join("PG_VERSION")).map_err(|e| {
        PrepareError::NotADataDirectory {
            path: data_dir.to_path_buf(),
            detail: format!("cannot read PG_VERSION: {e}"),
        }
    })?;
    let text = text.trim();
    match text.parse::<u32>() {
        Ok(major) if major >= crate::postgres::MIN_MAJOR => Ok(major),
        _ => Err(PrepareError::UnsupportedMajor(text.to_string())),
    }
}

/// A value quoted for postgresql.conf / recovery.conf: `'` doubled and `\` escaped, since
/// the server reads backslash escapes inside quotes. Line breaks cannot be written at all.
pub fn quote_setting(name: &'static str, value: &str) -> Result<String, PrepareError> {
    if value.contains(['\n', '\r', '\0']) {
        return Err(PrepareError::InvalidSetting {
            name,
            detail: "contains a line break or NUL".into(),
        });
    }
    Ok(format!(
        "'{}'",
        value.replace('\\', "\\\\").replace('\'', "''")
    ))
}

/// The recovery settings for a major, one `name = 'value'` per line.
pub fn recovery_settings(major: u32, recovery: &Recovery) -> Result<Vec<String>, PrepareError> {
    // Without an archive, a command that always fails: PostgreSQL then reads pg_wal, yet
    // archive recovery (targets, promotion) still works; it refuses to run with none at all.
    let command = recovery.restore_command.as_deref().unwrap_or("false");
    if command.trim().is_empty() {
        return Err(PrepareError::InvalidSetting {
            name: "restore_command",
            detail: "is empty".into(),
        });
    }
    let mut lines = Vec::new();
    if major < 12 {
        lines.push("standby_mode = 'off'".to_string());
    }
    lines.push(format!(
        "restore_command = {}",
        quote_setting("restore_command", command)?
    ));
    match &recovery.target {
        RecoveryStop::Immediate => lines.push("recovery_target = 'immediate'".into()),
        RecoveryStop::Time(t) => lines.push(format!(
            "recovery_target_time = {}",
            quote_setting("recovery_target_time", &server_time(t))?
        )),
        RecoveryStop::Lsn(l) => {
            l.parse::<crate::postgres::Lsn>()
                .map_err(|_| PrepareError::InvalidSetting {
                    name: "recovery_target_lsn",
                    detail: format!("{l:?} is not an LSN like 0/3000060"),
                })?;
            lines.push(format!("recovery_target_lsn = '{l}'"));
        }
    }
    // 12+ defaults to 'latest', which would follow a later timeline found in a shared
    // archive (an earlier restore that promoted); stay on the backup's own. 10 and 11
    // default to the current timeline and do not know the word.
    if major >= 12 {
        lines.push("recovery_target_timeline = 'current'".into());
    }
    lines.push(format!(
        "recovery_target_action = '{}'",
        if recovery.promote { "promote" } else { "pause" }
    ));
    Ok(lines)
}

/// A time as the server reads it at startup. RFC 3339's `Z` is a time zone abbreviation to
/// PostgreSQL, and abbreviations are not loaded yet when the postmaster checks
/// recovery_target_time: it refuses to start ("invalid value"). `+00` means the same.
pub fn server_time(t: &str) -> String {
    match t.strip_suffix(['Z', 'z']) {
        Some(rest) => format!("{rest}+00"),
        None => t.to_string(),
    }
}

/// `postgresql.auto.conf` with pgsnap's block replaced by `settings` (appended if absent).
pub fn with_settings_block(auto_conf: &str, header: &str, settings: &[String]) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in auto_conf.lines() {
        if line.starts_with(BLOCK_BEGIN) {
            inside = true;
        } else if line == BLOCK_END {
            inside = false;
        } else if !inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(&format!("{BLOCK_BEGIN} ({header})\n"));
    for s in settings {
        out.push_str(s);
        out.push('\n');
    }
    out.push_str(BLOCK_END);
    out.push('\n');
    out
}

/// One `tablespace_map` entry: `<oid> <path>`, the path backslash-escaped by 14+.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub oid: u32,
    pub path: String,
}

pub fn parse_tablespace_map(map: &str) -> Result<Vec<MapEntry>, PrepareError> {
    let bad = |detail: String| PrepareError::Relocation(format!("tablespace_map: {detail}"));
    let mut entries = Vec::new();
    let mut chars = map.chars().peekable();
    while chars.peek().is_some() {
        let oid: String = chars.by_ref().take_while(|c| *c != ' ').collect();
        let mut path = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => path.extend(chars.next()),
                '\n' => break,
                c => path.push(c),
            }
        }
        let oid = oid
            .parse()
            .map_err(|_| bad(format!("{oid:?} is not a tablespace OID")))?;
        entries.push(MapEntry {
            oid,
            path: path.trim_end_matches('\r').to_string(),
        });
    }
    Ok(entries)
}

pub fn render_tablespace_map(entries: &[MapEntry]) -> String {
    let mut out = String::new();
    for e in entries {
        let mut escaped = String::new();
        for c in e.path.chars() {
            if matches!(c, '\n' | '\r' | '\\') {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        out.push_str(&format!("{} {escaped}\n", e.oid));
    }
    out
}

/// The map to write: byte for byte when nothing moves. A relocated tablespace gets its new
/// path, because PostgreSQL recreates every `pg_tblspc/<oid>` link from this file at
/// startup: fixing only the link would be undone.
pub fn relocated_map(original: &str, moves: &[(u32, PathBuf)]) -> Result<String, PrepareError> {
    if moves.is_empty() {
        return Ok(original.to_string());
    }
    let mut entries = parse_tablespace_map(original)?;
    for (oid, path) in moves {
        let entry = entries.iter_mut().find(|e| e.oid == *oid).ok_or_else(|| {
            PrepareError::Relocation(format!(
                "tablespace {oid} is not in the backup's tablespace_map"
            ))
        })?;
        entry.path = path
            .to_str()
            .ok_or_else(|| PrepareError::Relocation(format!("{path:?} is not UTF-8")))?
            .to_string();
    }
    Ok(render_tablespace_map(&entries))
}

fn write_file(data_dir: &Path, name: &str, contents: &[u8]) -> Result<(), PrepareError> {
    write_file_from(data_dir, data_dir, name, &mut &*contents)
}

/// Writes `dir/name` atomically (temporary file, fsync, rename, fsync of `dir`) with mode
/// 0600, owned like the data directory: a Job running as root must not leave files the
/// server cannot read.
fn write_file_from(
    data_dir: &Path,
    dir: &Path,
    name: &str,
    contents: &mut impl io::Read,
) -> Result<(), PrepareError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.pgsnap-tmp"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    io::copy(contents, &mut file).map_err(io_err("write", &tmp))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    own_like_data_dir(data_dir, &tmp)?;
    fs::rename(&tmp, &path).map_err(io_err("rename into", &path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

fn own_like_data_dir(data_dir: &Path, path: &Path) -> Result<(), PrepareError> {
    let meta = fs::metadata(data_dir).map_err(io_err("stat", data_dir))?;
    match std::os::unix::fs::lchown(path, Some(meta.uid()), Some(meta.gid())) {
        // Not root: the file is ours, and ours is what the directory's owner can read when
        // we run as that owner, the only way a non-root prepare can work at all.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        other => other.map_err(io_err("chown", path)),
    }
}

fn remove_file(path: &Path, actions: &mut Vec<String>, why: &str) -> Result<(), PrepareError> {
    match fs::remove_file(path) {
        Ok(()) => {
            actions.push(format!("removed {} ({why})", path.display()));
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PrepareError::Io {
            action: "remove",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Empties a directory (keeping it): stale slots, temporary files.
fn empty_dir(dir: &Path, actions: &mut Vec<String>, why: &str) -> Result<(), PrepareError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(PrepareError::Io {
                action: "list",
                path: dir.to_path_buf(),
                source: e,
            });
        }
    };
    for entry in entries {
        let path = entry.map_err(io_err("list", dir))?.path();
        let removed = if fs::symlink_metadata(&path)
            .map_err(io_err("stat", &path))?
            .is_dir()
        {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(io_err("remove", &path))?;
        actions.push(format!("removed {} ({why})", path.display()));
    }
    Ok(())
}

/// Replaces the symbolic link `link` by one to `target`; refuses to touch a real directory.
fn relink(link: &Path, target: &Path, actions: &mut Vec<String>) -> Result<(), PrepareError> {
    match fs::symlink_metadata(link) {
        Ok(m) if m.file_type().is_symlink() => {
            if fs::read_link(link).map_err(io_err("read link", link))? == target {
                return Ok(());
            }
            fs::remove_file(link).map_err(io_err("remove", link))?;
        }
        Ok(_) => {
            return Err(PrepareError::Relocation(format!(
                "{} is a directory, not a link; its files are in the data volume",
                link.display()
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(PrepareError::Io {
                action: "stat",
                path: link.to_path_buf(),
                source: e,
            });
        }
    }
    symlink(target, link).map_err(io_err("link", link))?;
    actions.push(format!("linked {} -> {}", link.display(), target.display()));
    Ok(())
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, PrepareError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PrepareError::Io {
            action: "read",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Checks everything, then prepares the data directory (see the module's comment for the
/// order). Nothing is written before every check has passed.
pub fn prepare(inputs: &Inputs) -> Result<PrepareOutcome, PrepareError> {
    let data = &inputs.data_dir;
    let files = read_label_files(inputs)?;
    let (major, control) = check_data_dir(data, inputs.system_identifier)?;
    // A prepared copy may have recovered and run since; the marker says it was ours.
    if let Some(done) = read_optional(&data.join(DONE_MARKER))? {
        return rerun_outcome(&done, &files.label_sha);
    }
    check_restored_copy(&control, inputs.stop_lsn)?;
    let map_out = relocated_map(&files.map, &inputs.tablespaces)?;
    let settings = recovery_settings(major, &inputs.recovery)?;
    let wal = wal_dir(data, inputs)?;
    let backup_wal = inputs
        .backup_wal
        .as_ref()
        .map(|w| check_backup_wal(w, inputs.system_identifier))
        .transpose()?;

    // The label first, the marker last.
    let mut actions = Vec::new();
    write_label_files(data, &files, &map_out, &mut actions)?;
    relink_volumes(data, inputs, &wal, &mut actions)?;
    if let Some(backup_wal) = &backup_wal {
        copy_backup_wal(data, backup_wal, &mut actions)?;
    }
    remove_server_leftovers(data, inputs.remove_standby_signal, &mut actions)?;
    write_recovery_settings(data, major, &files.label_sha, &settings, &mut actions)?;
    write_file(
        data,
        DONE_MARKER,
        format!("{}\n", files.label_sha).as_bytes(),
    )?;
    actions.push(format!("wrote {DONE_MARKER}"));
    Ok(PrepareOutcome::Prepared { major, actions })
}

/// The backup's `backup_label` and `tablespace_map`, checked against what the backup recorded.
struct LabelFiles {
    label: Vec<u8>,
    label_sha: String,
    map: String,
}

fn read_label_files(inputs: &Inputs) -> Result<LabelFiles, PrepareError> {
    let label = read_optional(&inputs.label_dir.join(BACKUP_LABEL_KEY))?
        .filter(|l| !l.is_empty())
        .ok_or_else(|| PrepareError::LabelMissing(inputs.label_dir.clone()))?;
    let label_sha = sha256_hex(&label);
    check_sha256(BACKUP_LABEL_KEY, &inputs.backup_label_sha256, &label_sha)?;
    let map = read_optional(&inputs.label_dir.join(TABLESPACE_MAP_KEY))?.unwrap_or_default();
    if let Some(expected) = &inputs.tablespace_map_sha256 {
        check_sha256(TABLESPACE_MAP_KEY, expected, &sha256_hex(&map))?;
    }
    String::from_utf8_lossy(&label).parse::<crate::postgres::BackupLabel>()?;
    let map = String::from_utf8(map)
        .map_err(|_| PrepareError::Relocation("tablespace_map is not UTF-8".into()))?;
    Ok(LabelFiles {
        label,
        label_sha,
        map,
    })
}

fn check_sha256(file: &'static str, expected: &str, actual: &str) -> Result<(), PrepareError> {
    if actual.eq_ignore_ascii_case(expected.trim()) {
        return Ok(());
    }
    Err(PrepareError::LabelTampered {
        file,
        expected: expected.to_string(),
        actual: actual.to_string(),
    })
}

/// A PostgreSQL data directory of the backed-up database system; returns its major and
/// what its pg_control says.
fn check_data_dir(data: &Path, expected: u64) -> Result<(u32, ControlFile), PrepareError> {
    let major = major_version(data)?;
    let control = read_control_file(data)?;
    if control.system_identifier != expected {
        let found = control.system_identifier;
        return Err(PrepareError::SystemIdentifierMismatch { expected, found });
    }
    Ok((major, control))
}

/// A directory holding the done marker was prepared before: from this label, nothing is
/// left to do; from another, preparing again would mix two backups.
fn rerun_outcome(done: &[u8], label_sha: &str) -> Result<PrepareOutcome, PrepareError> {
    let done = String::from_utf8_lossy(done).trim().to_string();
    if done == label_sha {
        Ok(PrepareOutcome::AlreadyPrepared)
    } else {
        Err(PrepareError::PreparedFromAnotherLabel { found: done })
    }
}

fn write_label_files(
    data: &Path,
    files: &LabelFiles,
    map_out: &str,
    actions: &mut Vec<String>,
) -> Result<(), PrepareError> {
    write_file(data, "backup_label", &files.label)?;
    actions.push(format!(
        "wrote backup_label ({} bytes, sha256 {})",
        files.label.len(),
        files.label_sha
    ));
    if map_out.is_empty() {
        // No tablespaces; a stale map would make PostgreSQL recreate links that are not there.
        return remove_file(
            &data.join("tablespace_map"),
            actions,
            "the backup has no tablespaces",
        );
    }
    write_file(data, "tablespace_map", map_out.as_bytes())?;
    let how = if map_out == files.map {
        "byte for byte"
    } else {
        "with relocated paths"
    };
    actions.push(format!("wrote tablespace_map ({how})"));
    Ok(())
}

/// What becomes of `pg_wal`.
#[derive(Debug, PartialEq)]
enum WalDir {
    /// A directory, or a link that leads to one: as it is.
    Keep,
    /// The WAL volume is mounted elsewhere now: the link follows it.
    Relink(PathBuf),
    /// A link to a volume this restore does not have (a backup that could not locate it, or
    /// a restore that left it out): an empty directory in its place. Nothing is lost, the
    /// backup's WAL is copied in from its own snapshot, or comes from the archive.
    Recreate,
}

fn wal_dir(data: &Path, inputs: &Inputs) -> Result<WalDir, PrepareError> {
    if let Some(dir) = &inputs.wal_dir {
        // The backup's WAL is copied through the new link: finding out only after the label
        // is written that it leads nowhere here would break "check everything first".
        if inputs.backup_wal.is_some() && !dir.is_dir() {
            return Err(PrepareError::Relocation(format!(
                "{} is not a directory here, and the backup's WAL is to be copied into it",
                dir.display()
            )));
        }
        return Ok(WalDir::Relink(dir.clone()));
    }
    let pg_wal = data.join("pg_wal");
    let not_found = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
    let missing = match fs::symlink_metadata(&pg_wal) {
        Ok(m) if !m.file_type().is_symlink() => return Ok(WalDir::Keep),
        Ok(_) => match fs::metadata(&pg_wal) {
            Ok(m) if m.is_dir() => return Ok(WalDir::Keep),
            Ok(_) => {
                return Err(PrepareError::Relocation(format!(
                    "{} leads to something that is not a directory",
                    pg_wal.display()
                )));
            }
            Err(e) if not_found(&e) => {
                fs::read_link(&pg_wal).map_err(io_err("read link", &pg_wal))?
            }
            Err(e) => return Err(io_err("stat", &pg_wal)(e)),
        },
        // A run cut short between removing the link and making the directory.
        Err(e) if not_found(&e) => pg_wal.clone(),
        Err(e) => return Err(io_err("stat", &pg_wal)(e)),
    };
    if inputs.recovery.restore_command.is_none() && inputs.backup_wal.is_none() {
        return Err(PrepareError::WalMissing(missing));
    }
    Ok(WalDir::Recreate)
}

/// The backup's WAL, checked: what `copy_backup_wal` copies.
struct CheckedWal<'a> {
    wal: &'a BackupWal,
    segments: Vec<String>,
    /// Timeline history files of the segments' timeline and earlier ones.
    histories: Vec<String>,
}

/// Every segment from the backup's start to its stop, whole: recovery needs each one to
/// reach the end of the backup, and a gap found only by PostgreSQL is a failed start after
/// the label was written.
fn check_backup_wal(
    wal: &BackupWal,
    system_identifier: u64,
) -> Result<CheckedWal<'_>, PrepareError> {
    let segments = wal_segments(&wal.first, &wal.last, wal.segment_size).ok_or_else(|| {
        PrepareError::InvalidSetting {
            name: "wal range",
            detail: format!(
                "{}..{} with {}-byte segments is not a range of WAL segments on one timeline (a segment is a power of two from 1 MiB to 1 GiB)",
                wal.first, wal.last, wal.segment_size
            ),
        }
    })?;
    // A pg_wal that was a link in the backed-up volume leads, in this pod, wherever its
    // target path is here (the restored data volume, say): not to the WAL snapshot's files.
    if fs::symlink_metadata(&wal.dir).is_ok_and(|m| m.file_type().is_symlink()) {
        let target = fs::read_link(&wal.dir).unwrap_or_default();
        return Err(PrepareError::WalIncomplete {
            segment: wal.first.clone(),
            first: wal.first.clone(),
            last: wal.last.clone(),
            detail: format!(
                "{} is a link (to {}), not the WAL snapshot's pg_wal",
                wal.dir.display(),
                target.display()
            ),
        });
    }
    for segment in &segments {
        let incomplete = |detail: String| PrepareError::WalIncomplete {
            segment: segment.clone(),
            first: wal.first.clone(),
            last: wal.last.clone(),
            detail,
        };
        let path = wal.dir.join(segment);
        match fs::metadata(&path) {
            Ok(m) if !m.is_file() => return Err(incomplete("it is not a regular file".into())),
            Ok(m) if m.len() != wal.segment_size => {
                return Err(incomplete(format!(
                    "it is {} bytes, a segment is {}",
                    m.len(),
                    wal.segment_size
                )));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(incomplete(format!("it is not in {}", wal.dir.display())));
            }
            Err(e) => return Err(io_err("stat", &path)(e)),
        }
        check_segment_header(&path, segment, wal.segment_size, system_identifier)
            .map_err(incomplete)?;
    }
    // The segment names were checked: the first 8 characters are the timeline.
    let timeline = &wal.first[..8];
    let mut histories = Vec::new();
    for entry in fs::read_dir(&wal.dir).map_err(io_err("list", &wal.dir))? {
        let entry = entry.map_err(io_err("list", &wal.dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_history_up_to(&name, timeline) && entry.path().is_file() {
            histories.push(name);
        }
    }
    histories.sort();
    Ok(CheckedWal {
        wal,
        segments,
        histories,
    })
}

/// The first page of a segment says whose WAL it holds and where (`XLogLongPageHeaderData`,
/// the same on 10–18, little-endian): a recycled file keeps an older segment's header, a
/// file of another database another system identifier. Err: why the file is not the
/// segment. Called on files of the right size.
fn check_segment_header(
    path: &Path,
    name: &str,
    segment_size: u64,
    system_identifier: u64,
) -> Result<(), String> {
    const XLP_LONG_HEADER: u16 = 0x0002;
    let mut header = [0u8; 40];
    fs::File::open(path)
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut header))
        .map_err(|e| format!("its header cannot be read: {e}"))?;
    let u16_at = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap_or_default());
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or_default());
    let hex = |at: usize| u64::from_str_radix(&name[at..at + 8], 16).unwrap_or_default();
    let expected = (hex(8) << 32) + hex(16) * segment_size;
    if u16_at(2) & XLP_LONG_HEADER == 0 {
        return Err("its first page has no segment header: it holds no WAL".into());
    }
    if u64_at(8) != expected {
        return Err(format!(
            "its first page is WAL at {}, not {}: a recycled file, not this segment",
            Lsn(u64_at(8)),
            Lsn(expected)
        ));
    }
    if u64_at(24) != system_identifier {
        return Err(format!(
            "it is WAL of database system {}, not {system_identifier}",
            u64_at(24)
        ));
    }
    if u64::from(u32_at(32)) != segment_size {
        return Err(format!("its header says segments are {} bytes", u32_at(32)));
    }
    Ok(())
}

/// `TTTTTTTT.history` of `timeline` or an earlier one. A later timeline forked after the
/// backup (a restore that promoted); its history in pg_wal could lead recovery onto it.
/// Both are 8 upper-case hex digits, so they compare as the numbers do.
fn is_history_up_to(name: &str, timeline: &str) -> bool {
    name.strip_suffix(".history").is_some_and(|t| {
        t.len() == 8 && t.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')) && t <= timeline
    })
}

/// Replaces any file of the same name: a snapshot cut in backup mode may hold the last
/// segments half written.
fn copy_backup_wal(
    data: &Path,
    checked: &CheckedWal,
    actions: &mut Vec<String>,
) -> Result<(), PrepareError> {
    let pg_wal = data.join("pg_wal");
    for name in checked.segments.iter().chain(&checked.histories) {
        let from = checked.wal.dir.join(name);
        let mut source = fs::File::open(&from).map_err(io_err("open", &from))?;
        write_file_from(data, &pg_wal, name, &mut source)?;
    }
    actions.push(format!(
        "copied {} WAL segments {}..{} (and {} timeline history files) from {} into pg_wal",
        checked.segments.len(),
        checked.wal.first,
        checked.wal.last,
        checked.histories.len(),
        checked.wal.dir.display()
    ));
    Ok(())
}

fn relink_volumes(
    data: &Path,
    inputs: &Inputs,
    wal: &WalDir,
    actions: &mut Vec<String>,
) -> Result<(), PrepareError> {
    for (oid, path) in &inputs.tablespaces {
        relink(&data.join("pg_tblspc").join(oid.to_string()), path, actions)?;
    }
    let pg_wal = data.join("pg_wal");
    match wal {
        WalDir::Keep => {}
        WalDir::Relink(dir) => relink(&pg_wal, dir, actions)?,
        WalDir::Recreate => {
            let was = match fs::read_link(&pg_wal) {
                Ok(target) => {
                    fs::remove_file(&pg_wal).map_err(io_err("remove", &pg_wal))?;
                    format!(
                        "a link to {}, which this restore does not have",
                        target.display()
                    )
                }
                Err(_) => "missing".into(),
            };
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&pg_wal)
                .map_err(io_err("create", &pg_wal))?;
            own_like_data_dir(data, &pg_wal)?;
            let source = match &inputs.backup_wal {
                Some(_) => "the backup's WAL is copied into it",
                None => "WAL comes from the archive",
            };
            actions.push(format!(
                "replaced pg_wal ({was}) by an empty directory: {source}"
            ));
        }
    }
    Ok(())
}

/// What the backed-up server left behind and the restored one must not find.
fn remove_server_leftovers(
    data: &Path,
    remove_standby_signal: bool,
    actions: &mut Vec<String>,
) -> Result<(), PrepareError> {
    remove_file(
        &data.join("postmaster.pid"),
        actions,
        "the backed-up server's lock file",
    )?;
    remove_file(
        &data.join("postmaster.opts"),
        actions,
        "the backed-up server's command line",
    )?;
    empty_dir(
        &data.join("pg_replslot"),
        actions,
        "a replication slot of the backed-up server",
    )?;
    empty_temp_dirs(data, actions)?;
    if remove_standby_signal {
        remove_file(
            &data.join("standby.signal"),
            actions,
            "asked to; it would make the server a standby",
        )?;
    }
    Ok(())
}

fn empty_temp_dirs(data: &Path, actions: &mut Vec<String>) -> Result<(), PrepareError> {
    empty_dir(&data.join("base/pgsql_tmp"), actions, "a temporary file")?;
    if let Ok(links) = fs::read_dir(data.join("pg_tblspc")) {
        for link in links.flatten() {
            // pg_tblspc/<oid>/PG_<major>_<catversion>/pgsql_tmp; an unreachable tablespace
            // is the server's problem to report, not ours to guess about.
            for version_dir in fs::read_dir(link.path()).into_iter().flatten().flatten() {
                empty_dir(
                    &version_dir.path().join("pgsql_tmp"),
                    actions,
                    "a temporary file",
                )?;
            }
        }
    }
    Ok(())
}

fn write_recovery_settings(
    data: &Path,
    major: u32,
    label_sha: &str,
    settings: &[String],
    actions: &mut Vec<String>,
) -> Result<(), PrepareError> {
    let header = format!("backup_label sha256 {label_sha}");
    if major >= 12 {
        // 12+ refuses to start with a recovery.conf.
        remove_file(
            &data.join("recovery.conf"),
            actions,
            "12+ refuses to start with one",
        )?;
        let auto = data.join("postgresql.auto.conf");
        let current = read_optional(&auto)?
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        write_file(
            data,
            "postgresql.auto.conf",
            with_settings_block(&current, &header, settings).as_bytes(),
        )?;
        actions.push(format!(
            "set in postgresql.auto.conf: {}",
            settings.join("; ")
        ));
        write_file(data, "recovery.signal", b"")?;
        actions.push("wrote recovery.signal".into());
    } else {
        let conf = format!(
            "# written by pgsnap restore-prepare ({header})\n{}\n",
            settings.join("\n")
        );
        write_file(data, "recovery.conf", conf.as_bytes())?;
        actions.push(format!("wrote recovery.conf: {}", settings.join("; ")));
    }
    Ok(())
}

/// `pgsnap restore-prepare`: prepare a restored PostgreSQL data directory for recovery from
/// a pgsnap backup, or refuse (exit status 3) with a stable reason.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The restored data directory (PGDATA).
    #[arg(long, env = "PGDATA")]
    pub data_dir: PathBuf,
    /// The directory holding backup_label and tablespace_map: the mounted label ConfigMap.
    #[arg(long)]
    pub label_dir: PathBuf,
    /// sha256 of backup_label, from the ConfigMap's annotation pgsnap.io/backup-label-sha256.
    #[arg(long)]
    pub backup_label_sha256: String,
    /// sha256 of tablespace_map, from pgsnap.io/tablespace-map-sha256.
    #[arg(long)]
    pub tablespace_map_sha256: Option<String>,
    /// The backed-up server's system identifier, from pgsnap.io/system-identifier.
    #[arg(long)]
    pub system_identifier: u64,
    /// The backup's stop LSN, from pgsnap.io/stop-lsn: a data directory that has run past it
    /// is a live database, not a restored copy, and is refused.
    #[arg(long)]
    pub stop_lsn: Lsn,
    /// Point the pg_wal link here (the WAL volume's new location).
    #[arg(long)]
    pub wal_dir: Option<PathBuf>,
    /// A tablespace's new location, OID=PATH as the server will see it; repeatable.
    #[arg(long = "tablespace", value_parser = parse_tablespace_move)]
    pub tablespaces: Vec<(u32, PathBuf)>,
    /// Fetches archived WAL; %f and %p as in PostgreSQL. Without it, WAL comes from pg_wal.
    #[arg(long)]
    pub restore_command: Option<String>,
    /// Stop recovery at this time instead of as soon as the data is consistent.
    #[arg(long, conflicts_with = "target_lsn")]
    pub target_time: Option<String>,
    /// Stop recovery at this WAL location instead of as soon as the data is consistent.
    #[arg(long)]
    pub target_lsn: Option<String>,
    /// Promote at the target (true) or pause there (false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub promote: bool,
    #[arg(long)]
    pub remove_standby_signal: bool,
    /// A directory holding the backup's WAL segments (the pg_wal of a volume made from the
    /// backup's WAL snapshot): they are checked, then copied into pg_wal, so recovery reaches
    /// the end of the backup without an archive.
    #[arg(long, requires_all = ["wal_first", "wal_last", "wal_segment_size"])]
    pub wal_from: Option<PathBuf>,
    /// The first segment to copy from --wal-from: the backup's start segment, e.g.
    /// 000000010000000000000002.
    #[arg(long, requires = "wal_from")]
    pub wal_first: Option<String>,
    /// The last segment to copy from --wal-from: the backup's stop segment.
    #[arg(long, requires = "wal_from")]
    pub wal_last: Option<String>,
    /// The backed-up server's wal_segment_size in bytes, e.g. 16777216.
    #[arg(long, requires = "wal_from")]
    pub wal_segment_size: Option<u64>,
    /// Also write "<Reason>: <message>" on refusal into this existing file (Kubernetes:
    /// /dev/termination-log).
    #[arg(long, env = "PGSNAP_TERMINATION_MESSAGE_PATH")]
    pub termination_message_path: Option<PathBuf>,
}

fn parse_tablespace_move(s: &str) -> Result<(u32, PathBuf), String> {
    let (oid, path) = s.split_once('=').ok_or("expected OID=PATH")?;
    let oid = oid
        .parse()
        .map_err(|_| format!("{oid:?} is not a tablespace OID"))?;
    if !path.starts_with('/') {
        return Err(format!("{path:?} is not an absolute path"));
    }
    Ok((oid, PathBuf::from(path)))
}

impl Args {
    pub fn inputs(&self) -> Inputs {
        let target = match (&self.target_time, &self.target_lsn) {
            (Some(t), _) => RecoveryStop::Time(t.clone()),
            (None, Some(l)) => RecoveryStop::Lsn(l.clone()),
            (None, None) => RecoveryStop::Immediate,
        };
        Inputs {
            data_dir: self.data_dir.clone(),
            label_dir: self.label_dir.clone(),
            backup_label_sha256: self.backup_label_sha256.clone(),
            tablespace_map_sha256: self.tablespace_map_sha256.clone(),
            system_identifier: self.system_identifier,
            stop_lsn: self.stop_lsn,
            wal_dir: self.wal_dir.clone(),
            tablespaces: self.tablespaces.clone(),
            recovery: Recovery {
                restore_command: self.restore_command.clone(),
                target,
                promote: self.promote,
            },
            remove_standby_signal: self.remove_standby_signal,
            backup_wal: match (
                &self.wal_from,
                &self.wal_first,
                &self.wal_last,
                self.wal_segment_size,
            ) {
                (Some(dir), Some(first), Some(last), Some(segment_size)) => Some(BackupWal {
                    dir: dir.clone(),
                    first: first.clone(),
                    last: last.clone(),
                    segment_size,
                }),
                _ => None,
            },
        }
    }
}

/// Runs the subcommand; returns the process exit status.
pub fn main(args: Args) -> i32 {
    let data_dir = args.data_dir.display().to_string();
    match prepare(&args.inputs()) {
        Ok(PrepareOutcome::Prepared { major, actions }) => {
            for a in &actions {
                println!("restore-prepare: {a}");
            }
            println!("restore-prepare: prepared {data_dir} for recovery (PostgreSQL {major})");
            0
        }
        Ok(PrepareOutcome::AlreadyPrepared) => {
            println!(
                "restore-prepare: {data_dir} is already prepared from this backup_label; nothing changed"
            );
            0
        }
        Err(e) => {
            let line = format!("{}: {e}", e.reason());
            eprintln!("restore-prepare refused: {line}");
            if let Some(path) = &args.termination_message_path {
                // Only into a file that exists (the one kubelet mounts): never a stray file
                // in a /dev that is not a container's. Best effort: the exit status and
                // stderr carry the refusal too.
                let _ = fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(path)
                    .and_then(|mut f| f.write_all(line.as_bytes()));
            }
            EXIT_REFUSED
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const LABEL: &str = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-11-21 10:00:00 UTC\nLABEL: t\nSTART TIMELINE: 1\n";
    const SYSID: u64 = 7_312_345_678_901_234_567;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A pg_control of [`SYSID`] in `state`, its latest checkpoint at `checkpoint`.
    fn write_control(data: &Path, state: u32, checkpoint: u64) {
        let mut control = vec![0u8; 8192];
        control[..8].copy_from_slice(&SYSID.to_le_bytes());
        control[16..20].copy_from_slice(&state.to_le_bytes());
        control[32..40].copy_from_slice(&checkpoint.to_le_bytes());
        fs::write(data.join("global/pg_control"), control).unwrap();
    }

    #[test]
    fn a_live_database_is_refused_and_left_untouched() {
        for (state, checkpoint, why) in [
            (1, 0x3000028, "shut down cleanly"),
            (2, 0x3000028, "shut down cleanly"),
            (6, 0x4000028, "after the backup's stop 0/3000100"),
        ] {
            let (_dir, inputs) = scratch("16");
            write_control(&inputs.data_dir, state, checkpoint);
            let before = walk(&inputs.data_dir);
            let err = prepare(&inputs).unwrap_err();
            assert_eq!(err.reason(), "NotARestoredCopy");
            assert!(err.to_string().contains(why), "{err}");
            assert_eq!(
                walk(&inputs.data_dir),
                before,
                "a refusal wrote into the volume"
            );
        }
        // A copy of a standby, cut in archive recovery, is a restored copy.
        let (_dir, inputs) = scratch("16");
        write_control(&inputs.data_dir, 5, 0x3000100);
        assert!(matches!(
            prepare(&inputs),
            Ok(PrepareOutcome::Prepared { .. })
        ));
    }

    fn scratch(major: &str) -> (Dir, Inputs) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let root =
            std::env::temp_dir().join(format!("pgsnap-prepare-unit-{}-{n}", std::process::id()));
        let (data, labels) = (root.join("data"), root.join("label"));
        fs::create_dir_all(data.join("global")).unwrap();
        fs::create_dir_all(data.join("pg_replslot/old_slot")).unwrap();
        fs::create_dir_all(data.join("base/pgsql_tmp")).unwrap();
        fs::create_dir_all(data.join("pg_wal")).unwrap();
        fs::create_dir_all(&labels).unwrap();
        fs::write(data.join("PG_VERSION"), format!("{major}\n")).unwrap();
        write_control(&data, 6, 0x3000028);
        fs::write(data.join("postmaster.pid"), "42\n").unwrap();
        fs::write(data.join("pg_replslot/old_slot/state"), "x").unwrap();
        fs::write(data.join("base/pgsql_tmp/pgsql_tmp42.0"), "x").unwrap();
        fs::write(
            data.join("postgresql.auto.conf"),
            "# Do not edit this file manually!\nwork_mem = '8MB'\n",
        )
        .unwrap();
        fs::write(labels.join("backup_label"), LABEL).unwrap();
        fs::write(labels.join("tablespace_map"), "").unwrap();
        let inputs = Inputs {
            data_dir: data,
            label_dir: labels,
            backup_label_sha256: sha256_hex(LABEL.as_bytes()),
            tablespace_map_sha256: Some(sha256_hex(b"")),
            system_identifier: SYSID,
            stop_lsn: Lsn(0x3000100),
            wal_dir: None,
            tablespaces: vec![],
            recovery: Recovery {
                restore_command: Some("cp '/archive/%f' %p".into()),
                target: RecoveryStop::Immediate,
                promote: true,
            },
            remove_standby_signal: false,
            backup_wal: None,
        };
        (Dir(root), inputs)
    }

    #[test]
    fn prepares_a_12_plus_directory_once_and_then_changes_nothing() {
        let (_dir, inputs) = scratch("16");
        let data = &inputs.data_dir;
        let PrepareOutcome::Prepared { major, .. } = prepare(&inputs).unwrap() else {
            panic!("not prepared")
        };
        assert_eq!(major, 16);
        assert_eq!(
            fs::read_to_string(data.join("backup_label")).unwrap(),
            LABEL
        );
        assert!(data.join("recovery.signal").exists());
        assert!(
            !data.join("tablespace_map").exists(),
            "an empty map is no map"
        );
        assert!(!data.join("postmaster.pid").exists());
        assert_eq!(fs::read_dir(data.join("pg_replslot")).unwrap().count(), 0);
        assert_eq!(
            fs::read_dir(data.join("base/pgsql_tmp")).unwrap().count(),
            0
        );
        let auto = fs::read_to_string(data.join("postgresql.auto.conf")).unwrap();
        assert!(
            auto.starts_with("# Do not edit this file manually!\nwork_mem = '8MB'\n"),
            "{auto}"
        );
        assert!(
            auto.contains(
                "restore_command = 'cp ''/archive/%f'' %p'\nrecovery_target = 'immediate'\n"
            ),
            "{auto}"
        );
        assert!(auto.contains("recovery_target_action = 'promote'"));
        assert_eq!(
            fs::metadata(data.join("backup_label"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );

        let before: Vec<_> = walk(data);
        assert_eq!(prepare(&inputs).unwrap(), PrepareOutcome::AlreadyPrepared);
        assert_eq!(walk(data), before, "a second run changed the directory");

        // After recovery PostgreSQL renames the label; a rerun must not put it back.
        fs::rename(data.join("backup_label"), data.join("backup_label.old")).unwrap();
        assert_eq!(prepare(&inputs).unwrap(), PrepareOutcome::AlreadyPrepared);
        assert!(!data.join("backup_label").exists());
    }

    const MIB: u64 = 1 << 20;

    fn segment(timeline: u32, n: u8) -> String {
        format!("{timeline:08X}00000000000000{n:02X}")
    }

    /// Segment `n` of 1 MiB as PostgreSQL writes it: its long page header (WAL at `n` MiB of
    /// database system [`SYSID`]), then bytes of its number.
    fn segment_bytes(n: u8) -> Vec<u8> {
        let mut bytes = vec![n; MIB as usize];
        bytes[2..4].copy_from_slice(&2u16.to_le_bytes());
        bytes[8..16].copy_from_slice(&(u64::from(n) * MIB).to_le_bytes());
        bytes[24..32].copy_from_slice(&SYSID.to_le_bytes());
        bytes[32..36].copy_from_slice(&(MIB as u32).to_le_bytes());
        bytes
    }

    /// The backup's WAL in `<root>/backup-wal`: segments 2 to 5 of `timeline`, 1 MiB each,
    /// each one filled with its number.
    fn with_backup_wal(dir: &Dir, inputs: &mut Inputs, timeline: u32) -> PathBuf {
        let wal = dir.0.join("backup-wal");
        fs::create_dir_all(&wal).unwrap();
        for n in 2..=5 {
            fs::write(wal.join(segment(timeline, n)), segment_bytes(n)).unwrap();
        }
        inputs.backup_wal = Some(BackupWal {
            dir: wal.clone(),
            first: segment(timeline, 2),
            last: segment(timeline, 5),
            segment_size: MIB,
        });
        wal
    }

    #[test]
    fn the_backups_wal_replaces_what_the_snapshot_holds_in_pg_wal() {
        let (dir, mut inputs) = scratch("16");
        let wal = with_backup_wal(&dir, &mut inputs, 1);
        let pg_wal = inputs.data_dir.join("pg_wal");
        fs::write(pg_wal.join(segment(1, 5)), b"half written").unwrap();
        fs::write(pg_wal.join(segment(1, 1)), b"older").unwrap();
        let Ok(PrepareOutcome::Prepared { actions, .. }) = prepare(&inputs) else {
            panic!("not prepared")
        };
        let data = fs::metadata(&inputs.data_dir).unwrap();
        for n in 2..=5 {
            let path = pg_wal.join(segment(1, n));
            assert_eq!(fs::read(&path).unwrap(), segment_bytes(n), "{n}");
            let meta = fs::metadata(&path).unwrap();
            assert_eq!(meta.mode() & 0o777, 0o600);
            assert_eq!((meta.uid(), meta.gid()), (data.uid(), data.gid()));
        }
        assert_eq!(fs::read(pg_wal.join(segment(1, 1))).unwrap(), b"older");
        assert_eq!(
            fs::read_dir(&pg_wal).unwrap().count(),
            5,
            "no temporary file left"
        );
        let line = format!(
            "copied 4 WAL segments 000000010000000000000002..000000010000000000000005 (and 0 timeline history files) from {} into pg_wal",
            wal.display()
        );
        assert!(actions.contains(&line), "{actions:?}");
        assert_eq!(prepare(&inputs).unwrap(), PrepareOutcome::AlreadyPrepared);
    }

    #[test]
    fn an_incomplete_backup_wal_is_refused_before_anything_is_written() {
        let (dir, mut inputs) = scratch("16");
        let wal = with_backup_wal(&dir, &mut inputs, 1);
        let before = walk(&inputs.data_dir);
        let refused = |inputs: &Inputs| {
            let e = prepare(inputs).unwrap_err();
            assert_eq!(walk(&inputs.data_dir), before, "a refusal wrote: {e}");
            e
        };

        fs::remove_file(wal.join(segment(1, 5))).unwrap();
        let e = refused(&inputs);
        assert_eq!(e.reason(), "WalIncomplete");
        assert_eq!(
            e.to_string(),
            format!(
                "the backup's WAL lacks segment 000000010000000000000005 (needed from 000000010000000000000002 to 000000010000000000000005): it is not in {}; without it PostgreSQL cannot reach the end of the backup",
                wal.display()
            )
        );

        fs::write(wal.join(segment(1, 5)), segment_bytes(5)).unwrap();
        fs::write(wal.join(segment(1, 3)), vec![3; 123]).unwrap();
        let e = refused(&inputs);
        assert_eq!(e.reason(), "WalIncomplete");
        assert!(
            e.to_string()
                .contains("segment 000000010000000000000003 (needed from ")
                && e.to_string()
                    .contains("it is 123 bytes, a segment is 1048576;"),
            "{e}"
        );

        fs::remove_file(wal.join(segment(1, 3))).unwrap();
        fs::create_dir(wal.join(segment(1, 3))).unwrap();
        let e = refused(&inputs);
        assert!(e.to_string().contains("it is not a regular file"), "{e}");
        fs::remove_dir(wal.join(segment(1, 3))).unwrap();
        fs::write(wal.join(segment(1, 3)), segment_bytes(3)).unwrap();

        // A recycled file: an older segment's WAL under this segment's name.
        fs::write(wal.join(segment(1, 4)), segment_bytes(2)).unwrap();
        let e = refused(&inputs);
        assert!(
            e.to_string().contains(
                "segment 000000010000000000000004 (needed from 000000010000000000000002 to 000000010000000000000005): its first page is WAL at 0/200000, not 0/400000: a recycled file"
            ),
            "{e}"
        );
        let mut foreign = segment_bytes(4);
        foreign[24..32].copy_from_slice(&1u64.to_le_bytes());
        fs::write(wal.join(segment(1, 4)), foreign).unwrap();
        let e = refused(&inputs);
        assert!(
            e.to_string()
                .contains("it is WAL of database system 1, not "),
            "{e}"
        );
        fs::write(wal.join(segment(1, 4)), segment_bytes(4)).unwrap();

        // pg_wal was a link in the backed-up volume: here it leads elsewhere.
        let linked = dir.0.join("linked-wal");
        symlink(&wal, &linked).unwrap();
        let real = std::mem::replace(&mut inputs.backup_wal.as_mut().unwrap().dir, linked);
        let e = refused(&inputs);
        assert!(
            e.to_string().contains("linked-wal is a link (to ") && e.reason() == "WalIncomplete",
            "{e}"
        );
        inputs.backup_wal.as_mut().unwrap().dir = real;

        let backwards = inputs.backup_wal.as_mut().unwrap();
        (backwards.first, backwards.last) = (segment(1, 5), segment(1, 2));
        let e = refused(&inputs);
        assert_eq!(e.reason(), "InvalidRecoverySetting");
        assert!(
            e.to_string()
                .starts_with("invalid recovery setting wal range: "),
            "{e}"
        );

        let (dir, mut inputs) = scratch("16");
        with_backup_wal(&dir, &mut inputs, 1);
        fs::remove_dir(inputs.data_dir.join("pg_wal")).unwrap();
        let old_wal = dir.0.join("old-wal");
        fs::create_dir(&old_wal).unwrap();
        symlink(&old_wal, inputs.data_dir.join("pg_wal")).unwrap();
        inputs.wal_dir = Some("/nonexistent/wal".into());
        let before = walk(&inputs.data_dir);
        assert_eq!(prepare(&inputs).unwrap_err().reason(), "RelocationFailed");
        assert_eq!(walk(&inputs.data_dir), before);
    }

    #[test]
    fn a_pg_wal_link_to_nowhere_is_recreated_and_filled_from_the_backups_wal() {
        let (dir, mut inputs) = scratch("15");
        with_backup_wal(&dir, &mut inputs, 1);
        let pg_wal = inputs.data_dir.join("pg_wal");
        fs::remove_dir(&pg_wal).unwrap();
        symlink("/nonexistent/wal/pg_wal", &pg_wal).unwrap();
        inputs.recovery.restore_command = None;
        let Ok(PrepareOutcome::Prepared { actions, .. }) = prepare(&inputs) else {
            panic!("not prepared")
        };
        assert!(fs::symlink_metadata(&pg_wal).unwrap().is_dir());
        for n in 2..=5 {
            assert_eq!(
                fs::read(pg_wal.join(segment(1, n))).unwrap(),
                segment_bytes(n)
            );
        }
        assert!(
            actions.iter().any(|a| a.starts_with("replaced pg_wal")
                && a.ends_with("the backup's WAL is copied into it")),
            "{actions:?}"
        );
        let auto = fs::read_to_string(inputs.data_dir.join("postgresql.auto.conf")).unwrap();
        assert!(auto.contains("restore_command = 'false'"), "{auto}");
    }

    #[test]
    fn history_files_of_later_timelines_are_left_behind() {
        let (dir, mut inputs) = scratch("16");
        let wal = with_backup_wal(&dir, &mut inputs, 2);
        for name in [
            "00000001.history",
            "00000002.history",
            "00000003.history",
            "0000000a.history",
            "00000001.history.backup",
        ] {
            fs::write(wal.join(name), name).unwrap();
        }
        let Ok(PrepareOutcome::Prepared { actions, .. }) = prepare(&inputs) else {
            panic!("not prepared")
        };
        let mut copied: Vec<_> = fs::read_dir(inputs.data_dir.join("pg_wal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".history"))
            .collect();
        copied.sort();
        assert_eq!(copied, ["00000001.history", "00000002.history"]);
        assert!(
            actions
                .iter()
                .any(|a| a.contains("(and 2 timeline history files)")),
            "{actions:?}"
        );
    }

    #[test]
    fn the_wal_flags_come_all_together() {
        use clap::Parser;
        let parse = |extra: &[&str]| {
            let base = [
                "pgsnap",
                "restore-prepare",
                "--data-dir=/d",
                "--label-dir=/l",
                "--backup-label-sha256=abc",
                "--system-identifier=1",
                "--stop-lsn=0/3000100",
            ];
            crate::cli::Cli::try_parse_from(base.iter().chain(extra)).map(|cli| {
                let crate::cli::Command::RestorePrepare(args) = cli.command else {
                    panic!("not restore-prepare")
                };
                args.inputs().backup_wal
            })
        };
        assert_eq!(parse(&[]).unwrap(), None);
        let all = [
            "--wal-from=/wal/pg_wal",
            "--wal-first=000000010000000000000002",
            "--wal-last=000000010000000000000005",
            "--wal-segment-size=16777216",
        ];
        assert_eq!(
            parse(&all).unwrap(),
            Some(BackupWal {
                dir: "/wal/pg_wal".into(),
                first: "000000010000000000000002".into(),
                last: "000000010000000000000005".into(),
                segment_size: 16 << 20,
            })
        );
        for left_out in 0..all.len() {
            let some: Vec<_> = (0..all.len())
                .filter(|i| *i != left_out)
                .map(|i| all[i])
                .collect();
            assert!(parse(&some).is_err(), "without {}", all[left_out]);
        }
    }

    fn walk(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = vec![];
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push((p.clone(), fs::read(&p).unwrap()));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn writes_recovery_conf_on_10_and_11() {
        let (_dir, inputs) = scratch("11");
        prepare(&inputs).unwrap();
        let conf = fs::read_to_string(inputs.data_dir.join("recovery.conf")).unwrap();
        assert!(
            conf.contains("standby_mode = 'off'\nrestore_command = "),
            "{conf}"
        );
        assert!(
            !conf.contains("recovery_target_timeline"),
            "11 does not know 'current'"
        );
        assert!(!inputs.data_dir.join("recovery.signal").exists());
        assert!(
            !fs::read_to_string(inputs.data_dir.join("postgresql.auto.conf"))
                .unwrap()
                .contains("restore_command")
        );
    }

    #[test]
    fn refuses_a_missing_tampered_or_foreign_label_and_writes_nothing() {
        let (_dir, inputs) = scratch("15");
        fs::remove_file(inputs.label_dir.join("backup_label")).unwrap();
        assert_eq!(prepare(&inputs).unwrap_err().reason(), "LabelMissing");

        fs::write(
            inputs.label_dir.join("backup_label"),
            LABEL.replace("0/2000060", "0/3000060"),
        )
        .unwrap();
        assert_eq!(
            prepare(&inputs).unwrap_err().reason(),
            "LabelChecksumMismatch"
        );

        fs::write(inputs.label_dir.join("backup_label"), LABEL).unwrap();
        fs::write(
            inputs.label_dir.join("tablespace_map"),
            "16400 /elsewhere\n",
        )
        .unwrap();
        assert_eq!(
            prepare(&inputs).unwrap_err().reason(),
            "LabelChecksumMismatch"
        );

        fs::write(inputs.label_dir.join("tablespace_map"), "").unwrap();
        let foreign = Inputs {
            system_identifier: SYSID + 1,
            ..inputs.clone()
        };
        assert_eq!(
            prepare(&foreign).unwrap_err().reason(),
            "SystemIdentifierMismatch"
        );

        assert!(!inputs.data_dir.join("backup_label").exists());
        assert!(
            inputs.data_dir.join("postmaster.pid").exists(),
            "a refusal touched the directory"
        );
        assert!(prepare(&inputs).is_ok());

        let other = Inputs {
            backup_label_sha256: sha256_hex(b"other"),
            ..inputs.clone()
        };
        fs::write(inputs.label_dir.join("backup_label"), "other").unwrap();
        assert_eq!(prepare(&other).unwrap_err().reason(), "LabelInvalid");
    }

    #[test]
    fn a_standby_copy_loses_its_standby_signal_when_asked() {
        let (_dir, mut inputs) = scratch("16");
        fs::write(inputs.data_dir.join("standby.signal"), "").unwrap();
        inputs.remove_standby_signal = true;
        let PrepareOutcome::Prepared { actions, .. } = prepare(&inputs).unwrap() else {
            panic!("not prepared")
        };
        assert!(!inputs.data_dir.join("standby.signal").exists());
        assert!(
            actions.iter().any(|a| a.contains("standby.signal")),
            "{actions:?}"
        );
        assert!(inputs.data_dir.join("recovery.signal").exists());
    }

    #[test]
    fn a_directory_prepared_from_another_label_is_refused() {
        let (_dir, inputs) = scratch("17");
        fs::write(inputs.data_dir.join(DONE_MARKER), "abc\n").unwrap();
        assert_eq!(
            prepare(&inputs).unwrap_err().reason(),
            "PreparedFromAnotherBackup"
        );
    }

    #[test]
    fn checksums_compare_without_case_or_surrounding_blanks() {
        let sha = sha256_hex(LABEL.as_bytes());
        assert!(
            check_sha256(
                BACKUP_LABEL_KEY,
                &format!(" {}\n", sha.to_uppercase()),
                &sha
            )
            .is_ok()
        );
        let e = check_sha256(TABLESPACE_MAP_KEY, "abc", &sha).unwrap_err();
        assert_eq!(e.reason(), "LabelChecksumMismatch");
        assert!(
            e.to_string().starts_with("tablespace_map does not match"),
            "{e}"
        );
    }

    #[test]
    fn a_rerun_is_a_no_op_only_for_the_same_label() {
        assert_eq!(
            rerun_outcome(b"abc\n", "abc").unwrap(),
            PrepareOutcome::AlreadyPrepared
        );
        assert_eq!(
            rerun_outcome(b"abc\n", "def").unwrap_err().reason(),
            "PreparedFromAnotherBackup"
        );
    }

    #[test]
    fn recovery_settings_follow_target_and_promotion() {
        let r = |target, promote| Recovery {
            restore_command: None,
            target,
            promote,
        };
        assert_eq!(
            recovery_settings(
                18,
                &r(RecoveryStop::Time("2026-11-21 10:00:00+00".into()), false)
            )
            .unwrap(),
            [
                "restore_command = 'false'",
                "recovery_target_time = '2026-11-21 10:00:00+00'",
                "recovery_target_timeline = 'current'",
                "recovery_target_action = 'pause'"
            ]
        );
        assert!(
            recovery_settings(
                15,
                &r(
                    RecoveryStop::Time("2026-11-21T10:40:34.502967Z".into()),
                    true
                )
            )
            .unwrap()
            .contains(&"recovery_target_time = '2026-11-21T10:40:34.502967+00'".to_string())
        );
        assert!(
            recovery_settings(12, &r(RecoveryStop::Lsn("0/3000060".into()), true))
                .unwrap()
                .contains(&"recovery_target_lsn = '0/3000060'".to_string())
        );
        assert_eq!(
            recovery_settings(12, &r(RecoveryStop::Lsn("x'; drop".into()), true))
                .unwrap_err()
                .reason(),
            "InvalidRecoverySetting"
        );
        let bad = Recovery {
            restore_command: Some("cp a b\nrecovery_target = 'x'".into()),
            ..r(RecoveryStop::Immediate, true)
        };
        assert_eq!(
            recovery_settings(12, &bad).unwrap_err().reason(),
            "InvalidRecoverySetting"
        );
        assert_eq!(quote_setting("x", r"c:\a'b").unwrap(), r"'c:\\a''b'");
    }

    #[test]
    fn the_settings_block_is_replaced_not_appended_twice() {
        let once = with_settings_block("a = 1\n", "h1", &["x = '1'".into()]);
        let twice = with_settings_block(&once, "h2", &["x = '2'".into()]);
        assert_eq!(
            twice,
            format!("a = 1\n{BLOCK_BEGIN} (h2)\nx = '2'\n{BLOCK_END}\n")
        );
    }

    #[test]
    fn tablespace_maps_round_trip_and_relocate() {
        let map = "16400 /var/lib/ts one\n16401 /weird\\\\path\\\nname\n";
        let entries = parse_tablespace_map(map).unwrap();
        assert_eq!(
            entries,
            [
                MapEntry {
                    oid: 16400,
                    path: "/var/lib/ts one".into()
                },
                MapEntry {
                    oid: 16401,
                    path: "/weird\\path\nname".into()
                }
            ]
        );
        assert_eq!(render_tablespace_map(&entries), map);
        assert_eq!(relocated_map(map, &[]).unwrap(), map);
        let moved = relocated_map(map, &[(16400, "/mnt/ts".into())]).unwrap();
        assert!(moved.starts_with("16400 /mnt/ts\n16401 "), "{moved}");
        assert_eq!(
            relocated_map(map, &[(1, "/x".into())])
                .unwrap_err()
                .reason(),
            "RelocationFailed"
        );
    }

    #[test]
    fn relocation_rewrites_the_map_and_the_links() {
        let (_dir, mut inputs) = scratch("14");
        let map = "16400 /old/ts\n";
        fs::write(inputs.label_dir.join("tablespace_map"), map).unwrap();
        inputs.tablespace_map_sha256 = Some(sha256_hex(map.as_bytes()));
        fs::create_dir_all(inputs.data_dir.join("pg_tblspc")).unwrap();
        symlink("/old/ts", inputs.data_dir.join("pg_tblspc/16400")).unwrap();
        fs::remove_dir(inputs.data_dir.join("pg_wal")).unwrap();
        symlink("/old/wal", inputs.data_dir.join("pg_wal")).unwrap();
        inputs.tablespaces = vec![(16400, "/new/ts".into())];
        inputs.wal_dir = Some("/new/wal".into());
        prepare(&inputs).unwrap();
        assert_eq!(
            fs::read_to_string(inputs.data_dir.join("tablespace_map")).unwrap(),
            "16400 /new/ts\n"
        );
        assert_eq!(
            fs::read_link(inputs.data_dir.join("pg_tblspc/16400")).unwrap(),
            Path::new("/new/ts")
        );
        assert_eq!(
            fs::read_link(inputs.data_dir.join("pg_wal")).unwrap(),
            Path::new("/new/wal")
        );
    }

    /// A pg_wal whose volume is not restored (a backup that could not locate it): with a
    /// restore command it becomes an empty directory, owned like the data directory; without
    /// one, refused before anything is written. A link that leads somewhere is kept.
    #[test]
    fn a_pg_wal_link_to_nowhere_is_recreated_when_the_archive_has_the_wal() {
        let (_dir, mut inputs) = scratch("15");
        let pg_wal = inputs.data_dir.join("pg_wal");
        fs::remove_dir(&pg_wal).unwrap();
        symlink("/nonexistent/wal/pg_wal", &pg_wal).unwrap();
        inputs.recovery.restore_command = None;
        let refused = prepare(&inputs).unwrap_err();
        assert_eq!(refused.reason(), "WalMissing");
        assert!(
            refused.to_string().contains("/nonexistent/wal/pg_wal"),
            "{refused}"
        );
        assert!(
            !inputs.data_dir.join("backup_label").exists(),
            "nothing written"
        );

        inputs.recovery.restore_command = Some("cp /archive/%f %p".into());
        let Ok(PrepareOutcome::Prepared { actions, .. }) = prepare(&inputs) else {
            panic!("not prepared")
        };
        let meta = fs::symlink_metadata(&pg_wal).unwrap();
        assert!(meta.is_dir(), "a directory now");
        assert_eq!(meta.mode() & 0o777, 0o700);
        let data = fs::metadata(&inputs.data_dir).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (data.uid(), data.gid()));
        assert!(
            actions.iter().any(|a| a.starts_with("replaced pg_wal")),
            "{actions:?}"
        );

        // A run cut short after removing the link: pg_wal is made, not forgotten.
        let (_dir, inputs) = scratch("15");
        fs::remove_dir(inputs.data_dir.join("pg_wal")).unwrap();
        let Ok(PrepareOutcome::Prepared { actions, .. }) = prepare(&inputs) else {
            panic!("not prepared")
        };
        assert!(
            fs::symlink_metadata(inputs.data_dir.join("pg_wal"))
                .unwrap()
                .is_dir(),
            "{actions:?}"
        );

        let (dir, inputs) = scratch("15");
        let wal = dir.0.join("wal");
        fs::create_dir(&wal).unwrap();
        fs::remove_dir(inputs.data_dir.join("pg_wal")).unwrap();
        symlink(&wal, inputs.data_dir.join("pg_wal")).unwrap();
        prepare(&inputs).unwrap();
        assert_eq!(fs::read_link(inputs.data_dir.join("pg_wal")).unwrap(), wal);
    }
}
