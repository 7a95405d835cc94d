//! `pgsnap restore-prepare`, the product's binary, run on a restored data directory the way a
//! Restore's Job runs it: by the PostgreSQL matrix on its copies and by `verify` on restored
//! claims.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pgsnap::label_store::{WalRecord, sha256_hex};
use pgsnap::postgres::Stopped;

/// The label ConfigMap as a restore mounts it: one file per key, in `root/name`.
pub fn label_dir(root: &Path, name: &str, backup_label: &str, tablespace_map: &str) -> PathBuf {
    let dir = root.join(name);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("backup_label"), backup_label).unwrap();
    fs::write(dir.join("tablespace_map"), tablespace_map).unwrap();
    dir
}

/// restore-prepare's flags for the WAL of backup `stopped` kept in `from` (a copy of pg_wal
/// made after the stop), built as the operator builds them from a Backup's record.
pub fn kept_wal_flags(from: &Path, stopped: &Stopped, segment_size: u64) -> Vec<String> {
    let record = WalRecord {
        volume_snapshot: String::new(),
        persistent_volume_claim: String::new(),
        path_in_volume: String::new(),
        timeline: stopped.timeline,
        first_segment: stopped.label.start_wal_file.clone(),
        last_segment: stopped.stop_wal_file.clone(),
        segment_size,
        checked_by: String::new(),
    };
    pgsnap::restore::plan::wal_flags(&record, from.display().to_string())
}

/// `pgsnap restore-prepare` for one backup, run as a Restore's Job runs it: the product's
/// binary, the backup's label files as the mounted ConfigMap, and the checksums and system
/// identifier the Backup recorded.
pub struct RestorePrepare {
    /// The binary: `env!("CARGO_BIN_EXE_pgsnap")` in the root package's tests,
    /// `operator::pgsnap_binary()` in the e2e suites.
    pub pgsnap: PathBuf,
    pub labels: PathBuf,
    pub backup_label_sha256: String,
    pub tablespace_map_sha256: String,
    pub system_identifier: u64,
    /// The backup's stop LSN: restore-prepare refuses a directory that has run past it.
    pub stop_lsn: String,
}

/// How a restore-prepare run ended.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl RestorePrepare {
    /// For the backup `stopped` of database system `system_identifier`, its label files
    /// in `root/label`.
    pub fn new(pgsnap: &str, root: &Path, stopped: &Stopped, system_identifier: u64) -> Self {
        RestorePrepare {
            pgsnap: PathBuf::from(pgsnap),
            labels: label_dir(root, "label", &stopped.labelfile, &stopped.spcmapfile),
            backup_label_sha256: sha256_hex(stopped.labelfile.as_bytes()),
            tablespace_map_sha256: sha256_hex(stopped.spcmapfile.as_bytes()),
            system_identifier,
            stop_lsn: stopped.stop_lsn.to_string(),
        }
    }

    /// Prepares `data` with the backup's label files; `extra` are further flags.
    pub fn run(&self, data: &Path, extra: &[String]) -> Run {
        self.run_with_labels(data, &self.labels, extra)
    }

    /// `run` with other label files (tampered, missing, another backup's) in `labels`.
    pub fn run_with_labels(&self, data: &Path, labels: &Path, extra: &[String]) -> Run {
        let t0 = Instant::now();
        let out = Command::new(&self.pgsnap)
            .arg("restore-prepare")
            .arg("--data-dir")
            .arg(data)
            .arg("--label-dir")
            .arg(labels)
            .args(["--backup-label-sha256", &self.backup_label_sha256])
            .args(["--tablespace-map-sha256", &self.tablespace_map_sha256])
            .args(["--system-identifier", &self.system_identifier.to_string()])
            .args(["--stop-lsn", &self.stop_lsn])
            .args(extra)
            .output()
            .expect("pgsnap restore-prepare");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
            took: t0.elapsed(),
        }
    }

    /// `run`, which must prepare the directory.
    pub fn prepare(&self, data: &Path, extra: &[String]) -> Run {
        let run = self.run(data, extra);
        assert_eq!(
            run.code,
            0,
            "restore-prepare {}:\n{}{}",
            data.display(),
            run.stdout,
            run.stderr
        );
        run
    }
}
