//! The custom resources of group `pgsnap.io`, and the CSI snapshot types pgsnap uses.
// kube's derive takes one `printcolumn(...)` per column; clippy reads the repeats as duplicates.
#![allow(clippy::duplicated_attributes)]

pub mod backup;
pub mod restore;
pub mod schedule;
pub mod snapshot;
pub mod verification;

pub use backup::{Backup, BackupSpec, BackupStatus, Phase};

use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every pgsnap resource; also the prefix of its labels and annotations.
pub const GROUP: &str = "pgsnap.io";

/// Label on every object a Backup creates (snapshots, label ConfigMap): the Backup's name,
/// as a label value (shortened with a hash beyond 63 characters).
pub const BACKUP_NAME_LABEL: &str = "pgsnap.io/backup";
/// Label on every object a Backup creates: the Backup's uid. Only the object with this uid
/// ever adopts or deletes it, so a new Backup of a reused name never touches a retained one.
pub const BACKUP_UID_LABEL: &str = "pgsnap.io/backup-uid";
/// Label on every object a Restore creates (PVCs, the prepare Job): the Restore's name, as
/// a label value.
pub const RESTORE_NAME_LABEL: &str = "pgsnap.io/restore";
/// Label on every object a Restore creates: the Restore's uid, which ownership goes by.
pub const RESTORE_UID_LABEL: &str = "pgsnap.io/restore-uid";

/// Label on every Backup a BackupSchedule creates: the schedule's name, as a label value.
pub const SCHEDULE_NAME_LABEL: &str = "pgsnap.io/schedule";
/// Label on every Backup a BackupSchedule creates: the schedule's uid. A schedule prunes only
/// Backups with its own uid, never one made by hand or by another schedule of the same name.
pub const SCHEDULE_UID_LABEL: &str = "pgsnap.io/schedule-uid";

/// Label on every object a Verification creates (its Restore, ConfigMap and pod): its name,
/// as a label value, and its uid, which ownership goes by.
pub const VERIFICATION_NAME_LABEL: &str = "pgsnap.io/verification";
pub const VERIFICATION_UID_LABEL: &str = "pgsnap.io/verification-uid";

/// The two labels that tie an object to the Backup or Restore that created it.
pub struct CreatorLabels {
    pub name: &'static str,
    pub uid: &'static str,
}

pub const BACKUP_CREATOR: CreatorLabels = CreatorLabels {
    name: BACKUP_NAME_LABEL,
    uid: BACKUP_UID_LABEL,
};

pub const RESTORE_CREATOR: CreatorLabels = CreatorLabels {
    name: RESTORE_NAME_LABEL,
    uid: RESTORE_UID_LABEL,
};

pub const VERIFICATION_CREATOR: CreatorLabels = CreatorLabels {
    name: VERIFICATION_NAME_LABEL,
    uid: VERIFICATION_UID_LABEL,
};

pub const SCHEDULE_CREATOR: CreatorLabels = CreatorLabels {
    name: SCHEDULE_NAME_LABEL,
    uid: SCHEDULE_UID_LABEL,
};

/// All CRDs as one multi-document YAML stream, as `pgsnap crd` prints and `crds/` holds.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in [
        Backup::crd(),
        restore::Restore::crd(),
        schedule::BackupSchedule::crd(),
        verification::Verification::crd(),
    ] {
        let mut crd = serde_yaml::to_value(&crd)?;
        unwrap_descriptions(&mut crd);
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// Doc comments wrap at the source's line width; `kubectl explain` would show those breaks
/// mid-sentence. Lines of a paragraph are joined; paragraphs and list items stay apart.
fn unwrap_descriptions(value: &mut serde_yaml::Value) {
    match value {
        serde_yaml::Value::Mapping(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    serde_yaml::Value::String(text) if key.as_str() == Some("description") => {
                        *text = unwrap_lines(text);
                    }
                    value => unwrap_descriptions(value),
                }
            }
        }
        serde_yaml::Value::Sequence(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}

fn unwrap_lines(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines().map(str::trim_end) {
        let starts_block = line.is_empty() || line.starts_with("- ") || line.starts_with("* ");
        let ends_block = out.is_empty() || out.ends_with('\n');
        if !ends_block {
            out.push(if starts_block { '\n' } else { ' ' });
        }
        out.push_str(line);
        if line.is_empty() {
            out.push('\n');
        }
    }
    out
}

/// A key of a Secret in the resource's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

/// A duration written the Go way (`90s`, `10m`, `1h30m`), as Kubernetes users expect and
/// CEL's `duration()` checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Duration(std::time::Duration::from_secs(secs))
    }
}

impl std::str::FromStr for Duration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a duration like 90s, 10m or 1h30m");
        let mut total = 0f64;
        let mut rest = s;
        if rest.is_empty() {
            return Err(bad());
        }
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(bad)?;
            let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
            rest = &rest[num_len..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let scale = match &rest[..unit_len] {
                "ms" => 0.001,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return Err(bad()),
            };
            total += value * scale;
            rest = &rest[unit_len..];
        }
        Ok(Duration(std::time::Duration::from_secs_f64(total)))
    }
}

impl std::fmt::Display for Duration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.0.as_secs();
        let millis = self.0.subsec_millis();
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        match (s, millis) {
            (0, 0) if secs > 0 => Ok(()),
            (s, 0) => write!(f, "{s}s"),
            (0, ms) if secs == 0 => write!(f, "{ms}ms"),
            (s, ms) => write!(f, "{s}.{ms:03}s"),
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "maxLength": 32})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_the_go_way_and_print_back() {
        for (text, secs) in [
            ("10m", 600.0),
            ("1h30m", 5400.0),
            ("90s", 90.0),
            ("1.5s", 1.5),
            ("250ms", 0.25),
        ] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.0.as_secs_f64(), secs, "{text}");
        }
        assert_eq!(Duration::from_secs(5400).to_string(), "1h30m");
        assert_eq!(Duration::from_secs(600).to_string(), "10m");
        assert_eq!(Duration::from_secs(61).to_string(), "1m1s");
        assert_eq!(
            Duration(std::time::Duration::from_millis(1500)).to_string(),
            "1.500s"
        );
        for bad in ["", "10", "m", "10d", "1h-5m", "ten minutes"] {
            assert!(
                bad.parse::<Duration>().is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn descriptions_read_as_sentences_in_kubectl_explain() {
        assert_eq!(
            unwrap_lines("a session held open\nwhile snapshots are cut.\n\nSecond.\n- one\n- two"),
            "a session held open while snapshots are cut.\n\nSecond.\n- one\n- two"
        );
        let yaml = crds_yaml().unwrap();
        assert!(
            yaml.contains("a non-exclusive backup session held open while CSI VolumeSnapshots"),
            "a doc comment's line break survived into the CRD"
        );
    }

    #[test]
    fn crds_in_the_repository_match_the_rust_types() {
        let generated = crds_yaml().unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/pgsnap.io.yaml");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "crds/pgsnap.io.yaml differs from the Rust types in src/api: run `make crds` and commit the result"
        );
        let chart = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/charts/pgsnap/crds/pgsnap.io.yaml"
        ))
        .unwrap_or_default();
        assert!(
            chart == generated,
            "charts/pgsnap/crds/ differs from crds/: run `make crds` and commit the result"
        );
    }
}
