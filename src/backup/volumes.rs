//! Which PVCs a backup must snapshot: the directories the database reports (data directory,
//! the real pg_wal, tablespaces) mapped through the pod's volumeMounts to its claims.
//! Pure functions; the session and the pod spec are read elsewhere.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::PodSpec;

use crate::api::backup::VolumeRole;
use crate::label_store::Location;

/// A directory of the database, as the server reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseDir {
    pub role: VolumeRole,
    /// The tablespace's name, for role Tablespace.
    pub tablespace: Option<String>,
    /// The tablespace's OID: the name of its link in `pg_tblspc`, which `tablespace_map` keys on.
    pub tablespace_oid: Option<u32>,
    pub path: String,
}

/// One snapshot to take: a claim and the database directories it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedSnapshot {
    pub persistent_volume_claim: String,
    /// The most important role on the volume: Data before Wal before Tablespace.
    pub role: VolumeRole,
    pub locations: Vec<Location>,
}

impl PlannedSnapshot {
    /// The location that gives the snapshot its role (the data directory on the data volume).
    pub fn main_location(&self) -> &Location {
        self.locations
            .iter()
            .find(|l| l.role == self.role)
            .unwrap_or(&self.locations[0])
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "the {what} {path} is on the container's own filesystem, not on a volume: it cannot be snapshotted; put it on a PersistentVolumeClaim"
    )]
    NotOnVolume { what: String, path: String },
    #[error(
        "the {what} {path} is on volume {volume:?}, which is not a PersistentVolumeClaim: it cannot be snapshotted"
    )]
    NotOnClaim {
        what: String,
        path: String,
        volume: String,
    },
    #[error(
        "the {what} {path} is on PVC {claim}, which spec.volumes does not list: add it, or remove spec.volumes to discover volumes from the database"
    )]
    NotInOverride {
        what: String,
        path: String,
        claim: String,
    },
    #[error("spec.volumes lists PVC {0}, which no database directory uses")]
    UnusedOverride(String),
    #[error("the database reported a relative path {0:?}; expected an absolute one")]
    RelativePath(String),
}

impl PlanError {
    pub fn reason(&self) -> &'static str {
        match self {
            PlanError::NotOnVolume { .. }
            | PlanError::NotOnClaim { .. }
            | PlanError::RelativePath(_) => "PathNotOnClaim",
            PlanError::NotInOverride { .. } | PlanError::UnusedOverride(_) => {
                "VolumeOverrideMismatch"
            }
        }
    }
}

crate::controller::failure_from!(PlanError);

fn describe(dir: &DatabaseDir) -> String {
    match (&dir.role, &dir.tablespace) {
        (VolumeRole::Data, _) => "data directory".into(),
        (VolumeRole::Wal, _) => "WAL directory".into(),
        (VolumeRole::Tablespace, Some(name)) => format!("tablespace {name}"),
        (VolumeRole::Tablespace, None) => "tablespace".into(),
        (VolumeRole::BackupWal, _) => "backup's WAL".into(),
    }
}

/// Lexical normalisation: the server reports canonical paths, but mountPaths are user text.
fn normalise(path: &str) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in Path::new(path).components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// Maps the database's directories to the claims the pod mounts them from. Every directory
/// must be on a PVC (and on one of `overrides`, when given); anything else is refused rather
/// than silently left out of the backup.
pub fn plan(
    pod: &PodSpec,
    dirs: &[DatabaseDir],
    overrides: &[String],
) -> Result<Vec<PlannedSnapshot>, PlanError> {
    let mut by_claim: BTreeMap<String, Vec<Location>> = BTreeMap::new();
    for dir in dirs {
        let location = locate(pod, dir)?;
        let claim = &location.persistent_volume_claim;
        if !overrides.is_empty() && !overrides.contains(claim) {
            return Err(PlanError::NotInOverride {
                what: describe(dir),
                path: dir.path.clone(),
                claim: claim.clone(),
            });
        }
        by_claim.entry(claim.clone()).or_default().push(location);
    }
    if let Some(unused) = overrides
        .iter()
        .find(|o| !by_claim.contains_key(o.as_str()))
    {
        return Err(PlanError::UnusedOverride(unused.clone()));
    }
    Ok(by_claim
        .into_iter()
        .map(|(claim, locations)| PlannedSnapshot {
            role: locations
                .iter()
                .map(|l| l.role)
                .min()
                .unwrap_or(VolumeRole::Data),
            persistent_volume_claim: claim,
            locations,
        })
        .collect())
}

/// The claim a directory is on, through the deepest mount that holds it, and its path inside
/// the volume (the mount's subPath included).
fn locate(pod: &PodSpec, dir: &DatabaseDir) -> Result<Location, PlanError> {
    if !dir.path.starts_with('/') {
        return Err(PlanError::RelativePath(dir.path.clone()));
    }
    let path = normalise(&dir.path);
    let mount = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .filter(|m| path.starts_with(normalise(&m.mount_path)))
        .max_by_key(|m| normalise(&m.mount_path).components().count())
        .ok_or_else(|| PlanError::NotOnVolume {
            what: describe(dir),
            path: dir.path.clone(),
        })?;
    let claim = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.clone())
        .ok_or_else(|| PlanError::NotOnClaim {
            what: describe(dir),
            path: dir.path.clone(),
            volume: mount.name.clone(),
        })?;
    let rest = path
        .strip_prefix(normalise(&mount.mount_path))
        .unwrap_or(Path::new(""));
    let in_volume = Path::new(mount.sub_path.as_deref().unwrap_or("")).join(rest);
    Ok(Location {
        role: dir.role,
        tablespace: dir.tablespace.clone(),
        tablespace_oid: dir.tablespace_oid,
        server_path: dir.path.clone(),
        persistent_volume_claim: claim,
        path_in_volume: in_volume
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string(),
    })
}

/// Where pg_wal is when the server cannot say (PostgreSQL 10 reads no directory outside the
/// data directory) but `spec.volumes` lists the database's claims: the one listed claim that
/// holds no other directory of the database, at its mount path (the restored claim is
/// mounted there again, so the `pg_wal` link resolves whether it points at the mount or
/// below it). None when every listed claim holds another directory: pg_wal is inside the
/// data directory.
pub fn wal_on_listed_claim(
    pod: &PodSpec,
    dirs: &[DatabaseDir],
    overrides: &[String],
) -> Option<String> {
    let used: Vec<String> = dirs
        .iter()
        .filter(|d| d.role != VolumeRole::Wal)
        .filter_map(|d| locate(pod, d).ok())
        .map(|l| l.persistent_volume_claim)
        .collect();
    let mut spare = overrides.iter().filter(|o| !used.contains(o));
    let (Some(claim), None) = (spare.next(), spare.next()) else {
        return None;
    };
    let volume = pod.volumes.iter().flatten().find(|v| {
        v.persistent_volume_claim
            .as_ref()
            .is_some_and(|c| &c.claim_name == claim)
    })?;
    pod.containers
        .iter()
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .find(|m| m.name == volume.name && m.sub_path.is_none())
        .map(|m| normalise(&m.mount_path).to_string_lossy().to_string())
}

/// Where pg_wal could be if it links out of the data directory: every mount (and its
/// `pg_wal`) of a volume that can hold data, other than the data directory's own mount.
pub fn wal_candidates(pod: &PodSpec, data_directory: &str) -> Vec<String> {
    let writable: Vec<&str> = pod
        .volumes
        .iter()
        .flatten()
        .filter(|v| {
            v.persistent_volume_claim.is_some()
                || v.empty_dir.is_some()
                || v.host_path.is_some()
                || v.ephemeral.is_some()
        })
        .map(|v| v.name.as_str())
        .collect();
    let data = normalise(data_directory);
    let mut candidates: Vec<String> = pod
        .containers
        .iter()
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .filter(|m| {
            writable.contains(&m.name.as_str()) && !data.starts_with(normalise(&m.mount_path))
        })
        .flat_map(|m| {
            let root = normalise(&m.mount_path);
            [
                root.to_string_lossy().to_string(),
                root.join("pg_wal").to_string_lossy().to_string(),
            ]
        })
        .collect();
    candidates.sort();
    candidates.dedup();
    candidates
}

/// The order in which snapshots are cut. From a standby, the volume holding `global/pg_control`
/// (the data volume) is cut last, after the others, as the server's documentation requires;
/// a primary's volumes are all cut at once to keep backup mode short.
pub fn batches(plan: &[PlannedSnapshot], from_standby: bool) -> Vec<Vec<&PlannedSnapshot>> {
    if !from_standby {
        return vec![plan.iter().collect()];
    }
    let (data, others): (Vec<_>, Vec<_>) = plan.iter().partition(|s| s.role == VolumeRole::Data);
    [others, data]
        .into_iter()
        .filter(|b| !b.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, EmptyDirVolumeSource, PersistentVolumeClaimVolumeSource, Volume, VolumeMount,
    };

    fn pod(mounts: &[(&str, &str, Option<&str>)], volumes: &[(&str, Option<&str>)]) -> PodSpec {
        PodSpec {
            containers: vec![Container {
                name: "postgres".into(),
                volume_mounts: Some(
                    mounts
                        .iter()
                        .map(|(name, path, sub)| VolumeMount {
                            name: name.to_string(),
                            mount_path: path.to_string(),
                            sub_path: sub.map(str::to_string),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }],
            volumes: Some(
                volumes
                    .iter()
                    .map(|(name, claim)| Volume {
                        name: name.to_string(),
                        persistent_volume_claim: claim.map(|c| PersistentVolumeClaimVolumeSource {
                            claim_name: c.into(),
                            read_only: None,
                        }),
                        empty_dir: claim.is_none().then(EmptyDirVolumeSource::default),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn dir(role: VolumeRole, path: &str) -> DatabaseDir {
        DatabaseDir {
            role,
            tablespace: None,
            tablespace_oid: None,
            path: path.into(),
        }
    }

    /// PostgreSQL 10 cannot locate a linked pg_wal: the listed claims say where it is.
    #[test]
    fn without_the_server_pg_wal_is_on_the_one_listed_claim_holding_nothing_else() {
        let pod = pod(
            &[
                ("data", "/var/lib/postgresql/data", None),
                ("wal", "/wal", None),
                ("archive", "/archive", None),
            ],
            &[
                ("data", Some("data-db-0")),
                ("wal", Some("wal-db-0")),
                ("archive", Some("archive-db-0")),
            ],
        );
        let dirs = [
            dir(VolumeRole::Data, "/var/lib/postgresql/data/pgdata"),
            dir(VolumeRole::Wal, "/var/lib/postgresql/data/pgdata/pg_wal"),
        ];
        let listed = |claims: &[&str]| claims.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        assert_eq!(
            wal_on_listed_claim(&pod, &dirs, &listed(&["data-db-0", "wal-db-0"])).as_deref(),
            Some("/wal")
        );
        // Only the data volume listed: pg_wal is inside it.
        assert_eq!(
            wal_on_listed_claim(&pod, &dirs, &listed(&["data-db-0"])),
            None
        );
        // Two spare claims: no guess (the plan then refuses the one no directory uses).
        assert_eq!(
            wal_on_listed_claim(
                &pod,
                &dirs,
                &listed(&["data-db-0", "wal-db-0", "archive-db-0"])
            ),
            None
        );
    }

    #[test]
    fn data_wal_and_tablespace_on_three_claims() {
        let spec = pod(
            &[
                ("data", "/var/lib/postgresql/data", None),
                ("wal", "/wal", None),
                ("ts", "/ts", Some("spaces")),
            ],
            &[
                ("data", Some("data-db-0")),
                ("wal", Some("wal-db-0")),
                ("ts", Some("ts-db-0")),
            ],
        );
        let mut ts = dir(VolumeRole::Tablespace, "/ts/fast");
        ts.tablespace = Some("fast".into());
        ts.tablespace_oid = Some(16400);
        let dirs = [
            dir(VolumeRole::Data, "/var/lib/postgresql/data/pgdata"),
            dir(VolumeRole::Wal, "/wal/pg_wal"),
            ts,
        ];
        let plan = plan(&spec, &dirs, &[]).unwrap();
        let summary: Vec<_> = plan
            .iter()
            .map(|s| {
                (
                    s.persistent_volume_claim.as_str(),
                    s.role,
                    s.main_location().path_in_volume.as_str(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("data-db-0", VolumeRole::Data, "pgdata"),
                ("ts-db-0", VolumeRole::Tablespace, "spaces/fast"),
                ("wal-db-0", VolumeRole::Wal, "pg_wal")
            ]
        );
    }

    #[test]
    fn wal_inside_the_data_volume_is_one_snapshot() {
        let spec = pod(&[("data", "/pg/", None)], &[("data", Some("data-db-0"))]);
        let plan = plan(
            &spec,
            &[
                dir(VolumeRole::Data, "/pg/data"),
                dir(VolumeRole::Wal, "/pg/data/pg_wal"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].role, VolumeRole::Data);
        assert_eq!(plan[0].locations.len(), 2);
    }

    #[test]
    fn the_longest_mount_wins() {
        let spec = pod(
            &[("root", "/pg", None), ("wal", "/pg/wal", None)],
            &[("root", Some("a")), ("wal", Some("b"))],
        );
        let plan = plan(
            &spec,
            &[
                dir(VolumeRole::Data, "/pg/data"),
                dir(VolumeRole::Wal, "/pg/wal"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            plan.iter()
                .map(|s| s.persistent_volume_claim.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(plan[1].main_location().path_in_volume, "");
    }

    #[test]
    fn a_directory_off_any_claim_is_refused() {
        let spec = pod(
            &[("data", "/pg", None), ("scratch", "/wal", None)],
            &[("data", Some("a")), ("scratch", None)],
        );
        let err = plan(
            &spec,
            &[
                dir(VolumeRole::Data, "/pg/data"),
                dir(VolumeRole::Wal, "/wal/pg_wal"),
            ],
            &[],
        )
        .unwrap_err();
        assert_eq!(err.reason(), "PathNotOnClaim");
        assert!(
            err.to_string()
                .contains("WAL directory /wal/pg_wal is on volume \"scratch\""),
            "{err}"
        );
        let err = plan(&spec, &[dir(VolumeRole::Data, "/elsewhere/data")], &[]).unwrap_err();
        assert!(matches!(err, PlanError::NotOnVolume { .. }));
        // "/pgdata" must not match mount "/pg" just because the string starts the same.
        assert!(plan(&spec, &[dir(VolumeRole::Data, "/pgdata")], &[]).is_err());
    }

    #[test]
    fn overrides_must_cover_every_directory_and_nothing_else() {
        let spec = pod(
            &[("data", "/pg", None), ("wal", "/wal", None)],
            &[("data", Some("a")), ("wal", Some("b"))],
        );
        let dirs = [
            dir(VolumeRole::Data, "/pg/data"),
            dir(VolumeRole::Wal, "/wal"),
        ];
        assert!(plan(&spec, &dirs, &["a".into(), "b".into()]).is_ok());
        assert!(matches!(
            plan(&spec, &dirs, &["a".into()]),
            Err(PlanError::NotInOverride { .. })
        ));
        assert!(matches!(
            plan(&spec, &dirs[..1], &["a".into(), "b".into()]),
            Err(PlanError::UnusedOverride(_))
        ));
    }

    #[test]
    fn wal_candidates_are_the_other_writable_mounts() {
        let spec = pod(
            &[
                ("data", "/pg", None),
                ("wal", "/wal/", None),
                ("cache", "/cache", None),
            ],
            &[("data", Some("a")), ("wal", Some("b")), ("cache", None)],
        );
        assert_eq!(
            wal_candidates(&spec, "/pg/data"),
            ["/cache", "/cache/pg_wal", "/wal", "/wal/pg_wal"]
        );
        let single = pod(&[("data", "/pg", None)], &[("data", Some("a"))]);
        assert!(wal_candidates(&single, "/pg/data").is_empty());
    }

    #[test]
    fn a_standby_cuts_the_data_volume_last() {
        let spec = pod(
            &[("data", "/pg", None), ("wal", "/wal", None)],
            &[("data", Some("a")), ("wal", Some("b"))],
        );
        let plan = plan(
            &spec,
            &[
                dir(VolumeRole::Data, "/pg/data"),
                dir(VolumeRole::Wal, "/wal"),
            ],
            &[],
        )
        .unwrap();
        let order = |standby| {
            batches(&plan, standby)
                .iter()
                .map(|b| {
                    b.iter()
                        .map(|s| s.persistent_volume_claim.as_str())
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(order(false), [vec!["a", "b"]]);
        assert_eq!(order(true), [vec!["b"], vec!["a"]]);
    }
}
