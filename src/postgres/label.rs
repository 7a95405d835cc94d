//! `backup_label` as PostgreSQL writes it, parsed into a typed value. The text itself is
//! kept byte for byte elsewhere: a restore writes what the server returned, never a
//! re-rendering of this struct.

use std::fmt;
use std::str::FromStr;

/// A WAL location (`pg_lsn`), printed as PostgreSQL prints it: `16/B374D848`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The name of the WAL segment file that holds this location, as `pg_walfile_name`
    /// computes it. Computed here because `pg_walfile_name` refuses to run on a standby.
    pub fn wal_file_name(self, timeline: u32, wal_segment_size: u64) -> String {
        let seg_size = wal_segment_size.max(1);
        segment_name(timeline, self.0 / seg_size, 0x1_0000_0000 / seg_size)
    }
}

/// A segment's file name: the timeline, then its number split at 4 GiB of WAL, the way
/// PostgreSQL's `XLogFileName` writes it.
fn segment_name(timeline: u32, segno: u64, segs_per_xlogid: u64) -> String {
    format!(
        "{:08X}{:08X}{:08X}",
        timeline,
        segno / segs_per_xlogid,
        segno % segs_per_xlogid
    )
}

/// Every WAL segment file name from `first` to `last` inclusive. None when either is not
/// the name of a segment of `segment_size` bytes, they are on different timelines, `last`
/// comes before `first`, or `segment_size` is not one PostgreSQL allows (a power of two
/// from 1 MiB to 1 GiB).
pub fn wal_segments(first: &str, last: &str, segment_size: u64) -> Option<Vec<String>> {
    if !segment_size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&segment_size) {
        return None;
    }
    let segs_per_xlogid = 0x1_0000_0000 / segment_size;
    let parse = |name: &str| -> Option<(u32, u64)> {
        // Upper case only, as PostgreSQL writes them: a lower-case name is no file in pg_wal.
        if name.len() != 24 || !name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')) {
            return None;
        }
        let field = |at: usize| u32::from_str_radix(&name[at..at + 8], 16).ok();
        let (timeline, xlogid, seg) = (field(0)?, u64::from(field(8)?), u64::from(field(16)?));
        // The low part counts segments within 4 GiB only: 16 MiB segments end at ...000000FF,
        // so ...00000100 is no segment (it would alias the next 4 GiB's first).
        (seg < segs_per_xlogid).then_some((timeline, xlogid * segs_per_xlogid + seg))
    };
    let (timeline, from) = parse(first)?;
    let (last_timeline, to) = parse(last)?;
    if timeline != last_timeline || to < from {
        return None;
    }
    Some(
        (from..=to)
            .map(|segno| segment_name(timeline, segno, segs_per_xlogid))
            .collect(),
    )
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = LabelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || LabelError::BadValue {
            field: "LSN",
            value: s.to_string(),
        };
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// Where the backup was taken: `master` (≤ 13) and `primary` (14+) mean the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupFrom {
    Primary,
    Standby,
}

/// The fields of a `backup_label` that a restore or a status report needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupLabel {
    pub start_wal_location: Lsn,
    pub start_wal_file: String,
    pub checkpoint_location: Lsn,
    /// `streamed` for a non-exclusive backup.
    pub backup_method: String,
    pub backup_from: BackupFrom,
    /// As the server printed it, in the server's log_timezone, e.g. `2026-11-21 10:00:00 UTC`.
    pub start_time: String,
    pub label: String,
    /// Absent before PostgreSQL 11.
    pub start_timeline: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("backup_label has no \"{0}\" line")]
    Missing(&'static str),
    #[error("backup_label has an unreadable {field}: {value:?}")]
    BadValue { field: &'static str, value: String },
}

impl FromStr for BackupLabel {
    type Err = LabelError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let field = |name: &'static str| -> Option<&str> {
            text.lines().find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(": "))
            })
        };
        let required = |name: &'static str| field(name).ok_or(LabelError::Missing(name));

        // "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)"
        let start = required("START WAL LOCATION")?;
        let bad_start = || LabelError::BadValue {
            field: "START WAL LOCATION",
            value: start.to_string(),
        };
        let (lsn, rest) = start.split_once(' ').ok_or_else(bad_start)?;
        let file = rest
            .strip_prefix("(file ")
            .and_then(|f| f.strip_suffix(')'))
            .filter(|f| f.len() == 24 && f.chars().all(|c| c.is_ascii_hexdigit()))
            .ok_or_else(bad_start)?;

        let backup_from = match required("BACKUP FROM")? {
            "master" | "primary" => BackupFrom::Primary,
            "standby" => BackupFrom::Standby,
            other => {
                return Err(LabelError::BadValue {
                    field: "BACKUP FROM",
                    value: other.to_string(),
                });
            }
        };
        let start_timeline = field("START TIMELINE")
            .map(|t| {
                t.parse::<u32>().map_err(|_| LabelError::BadValue {
                    field: "START TIMELINE",
                    value: t.to_string(),
                })
            })
            .transpose()?;

        Ok(BackupLabel {
            start_wal_location: lsn.parse()?,
            start_wal_file: file.to_string(),
            checkpoint_location: required("CHECKPOINT LOCATION")?.parse()?,
            backup_method: required("BACKUP METHOD")?.to_string(),
            backup_from,
            start_time: required("START TIME")?.to_string(),
            label: required("LABEL")?.to_string(),
            start_timeline,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG16_PRIMARY: &str = "START WAL LOCATION: 0/9000028 (file 000000010000000000000009)
CHECKPOINT LOCATION: 0/9000060
BACKUP METHOD: streamed
BACKUP FROM: primary
START TIME: 2026-11-21 10:00:00 UTC
LABEL: pgsnap shop/orders-1
START TIMELINE: 1
";

    const PG10_STANDBY: &str = "START WAL LOCATION: 1/A0000028 (file 0000000200000001000000A0)
CHECKPOINT LOCATION: 1/A0000098
BACKUP METHOD: streamed
BACKUP FROM: standby
START TIME: 2026-11-21 10:00:00 CET
LABEL: x: y
";

    const PG17_INCREMENTAL: &str = "START WAL LOCATION: 0/4000028 (file 000000010000000000000004)
CHECKPOINT LOCATION: 0/4000080
BACKUP METHOD: streamed
BACKUP FROM: primary
START TIME: 2026-11-21 10:00:00 UTC
LABEL: l
START TIMELINE: 1
INCREMENTAL FROM LSN: 0/2000028
INCREMENTAL FROM TLI: 1
";

    #[test]
    fn parses_a_primary_label() {
        let l: BackupLabel = PG16_PRIMARY.parse().unwrap();
        assert_eq!(l.start_wal_location, Lsn(0x0900_0028));
        assert_eq!(l.start_wal_file, "000000010000000000000009");
        assert_eq!(l.checkpoint_location.to_string(), "0/9000060");
        assert_eq!(l.backup_method, "streamed");
        assert_eq!(l.backup_from, BackupFrom::Primary);
        assert_eq!(l.start_time, "2026-11-21 10:00:00 UTC");
        assert_eq!(l.label, "pgsnap shop/orders-1");
        assert_eq!(l.start_timeline, Some(1));
    }

    #[test]
    fn parses_a_pg10_standby_label_without_timeline() {
        let l: BackupLabel = PG10_STANDBY.parse().unwrap();
        assert_eq!(l.backup_from, BackupFrom::Standby);
        assert_eq!(l.start_timeline, None);
        assert_eq!(l.start_wal_location, Lsn(0x1_A000_0028));
        // A label may itself contain ": ".
        assert_eq!(l.label, "x: y");
    }

    #[test]
    fn tolerates_fields_added_by_later_majors() {
        let l: BackupLabel = PG17_INCREMENTAL.parse().unwrap();
        assert_eq!(l.checkpoint_location, Lsn(0x0400_0080));
    }

    #[test]
    fn master_means_primary() {
        let text = PG16_PRIMARY.replace("BACKUP FROM: primary", "BACKUP FROM: master");
        assert_eq!(
            text.parse::<BackupLabel>().unwrap().backup_from,
            BackupFrom::Primary
        );
    }

    #[test]
    fn rejects_broken_labels() {
        let no_checkpoint: String = PG16_PRIMARY
            .lines()
            .filter(|l| !l.starts_with("CHECKPOINT"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            no_checkpoint.parse::<BackupLabel>(),
            Err(LabelError::Missing("CHECKPOINT LOCATION"))
        );
        let bad_file = PG16_PRIMARY.replace("(file 000000010000000000000009)", "(file x)");
        assert!(matches!(
            bad_file.parse::<BackupLabel>(),
            Err(LabelError::BadValue {
                field: "START WAL LOCATION",
                ..
            })
        ));
        assert!("".parse::<BackupLabel>().is_err());
    }

    #[test]
    fn lsn_round_trips_and_names_wal_files() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(
            lsn.wal_file_name(1, 16 * 1024 * 1024),
            "0000000100000016000000B3"
        );
        assert_eq!(
            Lsn(0x0900_0028).wal_file_name(3, 64 * 1024 * 1024),
            "000000030000000000000002"
        );
        assert!("16B374D848".parse::<Lsn>().is_err());
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn wal_segments_cross_into_the_next_4_gib() {
        assert_eq!(
            wal_segments(
                "0000000100000000000000FE",
                "000000010000000100000001",
                16 * MIB
            )
            .unwrap(),
            [
                "0000000100000000000000FE",
                "0000000100000000000000FF",
                "000000010000000100000000",
                "000000010000000100000001"
            ]
        );
        assert_eq!(
            wal_segments(
                "00000002000000000000003F",
                "000000020000000100000000",
                64 * MIB
            )
            .unwrap(),
            ["00000002000000000000003F", "000000020000000100000000"]
        );
        let one = "000000010000000000000002";
        assert_eq!(wal_segments(one, one, 16 * MIB).unwrap(), [one]);
        // The same naming as the server's, from the LSNs a backup records.
        let (start, stop) = (Lsn(0x0000_0000_FE00_0028), Lsn(0x0000_0001_0100_0100));
        assert_eq!(
            wal_segments(
                &start.wal_file_name(1, 16 * MIB),
                &stop.wal_file_name(1, 16 * MIB),
                16 * MIB
            )
            .unwrap()
            .len(),
            4
        );
    }

    #[test]
    fn wal_segments_refuse_what_is_not_a_range_of_segments() {
        let first = "000000010000000000000002";
        let last = "000000010000000000000005";
        assert_eq!(
            wal_segments(first, last, 16 * MIB).map(|s| s.len()),
            Some(4)
        );
        for (first, last) in [
            (last, first),
            (first, "000000020000000000000005"),
            (first, "00000001000000000000000a"),
            (first, "00000001000000000000005"),
            (first, "0000000100000000000000-5"),
            (first, "000000010000000000000005.partial"),
            // Past the last 16 MiB segment of the first 4 GiB.
            (first, "000000010000000000000100"),
        ] {
            assert_eq!(wal_segments(first, last, 16 * MIB), None, "{first}..{last}");
        }
        assert_eq!(
            wal_segments(first, "000000010000000000000040", 64 * MIB),
            None
        );
        for size in [0, MIB / 2, 3 * MIB, 2048 * MIB] {
            assert_eq!(wal_segments(first, last, size), None, "{size}");
        }
        assert!(wal_segments(first, first, MIB).is_some());
        assert!(wal_segments(first, "000000010000000000000003", 1024 * MIB).is_some());
    }
}
