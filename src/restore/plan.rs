//! What a Restore creates, as pure functions: which claim each snapshot of the backup
//! becomes, the claims themselves, and the prepare Job with its `restore-prepare` command
//! line. The reconciler creates what these build.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, KeyToPath, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, SecurityContext, TypedLocalObjectReference, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ObjectMeta;

use crate::api::backup::VolumeRole;
use crate::api::restore::{RecoverySpec, RestoreClaim, RestoredClaim};
use crate::controller::Failure;
use crate::label_store::{
    BACKUP_LABEL_KEY, LabelRecord, LabelStoreError, SnapshotLocation, TABLESPACE_MAP_KEY,
};
use crate::restore::prepare::EXIT_REFUSED;

/// Where the prepare Job mounts the label ConfigMap.
pub const LABEL_MOUNT: &str = "/pgsnap/label";

fn invalid(config_map: &str, what: String) -> Failure {
    LabelStoreError::invalid(config_map, what).into()
}

/// One snapshot of the backup, with the directories it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceVolume {
    pub snapshot: String,
    /// Data before Wal before Tablespace: the volume's most important directory.
    pub role: VolumeRole,
    pub tablespace: Option<String>,
    pub mount_path: String,
    pub path_in_volume: String,
}

/// Where the volume was mounted on the backed-up server: the directory's server path minus
/// its path inside the volume.
pub fn mount_path(server_path: &str, path_in_volume: &str) -> Option<String> {
    let inner = path_in_volume.trim_matches('/');
    if inner.is_empty() {
        return Some(server_path.trim_end_matches('/').to_string())
            .filter(|p| !p.is_empty())
            .or(Some("/".into()));
    }
    let mount = server_path
        .trim_end_matches('/')
        .strip_suffix(inner)?
        .trim_end_matches('/');
    Some(if mount.is_empty() {
        "/".to_string()
    } else {
        mount.to_string()
    })
}

/// Groups the label's locations by snapshot.
pub fn source_volumes(config_map: &str, label: &LabelRecord) -> Result<Vec<SourceVolume>, Failure> {
    let mut by_snapshot: BTreeMap<&str, Vec<&SnapshotLocation>> = BTreeMap::new();
    for v in &label.volumes {
        by_snapshot.entry(&v.volume_snapshot).or_default().push(v);
    }
    by_snapshot
        .into_iter()
        .map(|(snapshot, locations)| {
            let main = locations
                .iter()
                .min_by_key(|l| l.location.role)
                .map(|l| &l.location)
                .ok_or_else(|| {
                    invalid(
                        config_map,
                        format!("snapshot {snapshot} holds no directory"),
                    )
                })?;
            let mount = mount_path(&main.server_path, &main.path_in_volume).ok_or_else(|| {
                invalid(
                    config_map,
                    format!(
                        "{} is not inside its volume path {:?}",
                        main.server_path, main.path_in_volume
                    ),
                )
            })?;
            Ok(SourceVolume {
                snapshot: snapshot.to_string(),
                role: main.role,
                tablespace: if main.role == VolumeRole::Tablespace {
                    main.tablespace.clone()
                } else {
                    None
                },
                mount_path: mount,
                path_in_volume: main.path_in_volume.trim_matches('/').to_string(),
            })
        })
        .collect()
}

/// A quantity in bytes (`10Gi`, `500M`, `1073741824`); None for what is not a size.
pub fn quantity_bytes(q: &str) -> Option<u128> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let scale: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        _ => return None,
    };
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut bytes = whole.checked_mul(scale)?;
    if !frac.is_empty() {
        let digits: u32 = frac.len().try_into().ok()?;
        let frac_value: u128 = frac.parse().ok()?;
        // Rounded up: a claim is never smaller than what was asked.
        bytes += (frac_value * scale).div_ceil(10u128.checked_pow(digits)?);
    }
    Some(bytes)
}

/// A PVC to create from a snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedClaim {
    pub name: String,
    pub role: VolumeRole,
    pub tablespace: Option<String>,
    pub snapshot: String,
    pub storage_class: Option<String>,
    pub size: String,
    pub mount_path: String,
    pub path_in_volume: String,
}

impl PlannedClaim {
    pub fn status(&self, bound: bool) -> RestoredClaim {
        RestoredClaim {
            name: self.name.clone(),
            role: self.role,
            tablespace: self.tablespace.clone(),
            volume_snapshot: self.snapshot.clone(),
            mount_path: self.mount_path.clone(),
            path_in_volume: self.path_in_volume.clone(),
            bound,
        }
    }
}

/// Where the prepare Job mounts the claim made of the backup's WAL snapshot.
pub const BACKUP_WAL_MOUNT: &str = "/pgsnap/backup-wal";

pub fn backup_wal_claim_name(restore: &str) -> String {
    crate::controller::bounded_name(restore, "backup-wal", 253)
}

/// The temporary claim made of the backup's WAL snapshot, which the prepare Job reads the
/// backup's WAL from; it lives only until the Job ends. None for a backup whose WAL is in
/// the archive. It takes the storage class of the restored claim of the same volume, whose
/// driver can make a claim of that volume's snapshot.
pub fn backup_wal_claim(
    restore: &str,
    label: &LabelRecord,
    planned: &[PlannedClaim],
    restore_sizes: &HashMap<String, Option<String>>,
) -> Result<Option<PlannedClaim>, Failure> {
    let Some(wal) = &label.wal else {
        return Ok(None);
    };
    let name = backup_wal_claim_name(restore);
    if planned.iter().any(|c| c.name == name) {
        return Err(Failure::new(
            "ClaimNameReserved",
            format!(
                "claim {name} is the name of the Restore's temporary claim of the backup's WAL; choose another name"
            ),
        ));
    }
    let size = restore_sizes.get(&wal.volume_snapshot).cloned().flatten();
    let size = size.ok_or_else(|| {
        Failure::new(
            "SizeUnknown",
            format!(
                "the backup's WAL snapshot {} reports no restoreSize, so no claim can be made of it",
                wal.volume_snapshot
            ),
        )
    })?;
    let same_volume = label
        .volumes
        .iter()
        .find(|v| v.location.persistent_volume_claim == wal.persistent_volume_claim)
        .and_then(|v| planned.iter().find(|c| c.snapshot == v.volume_snapshot));
    Ok(Some(PlannedClaim {
        name,
        role: VolumeRole::BackupWal,
        tablespace: None,
        snapshot: wal.volume_snapshot.clone(),
        storage_class: same_volume.and_then(|c| c.storage_class.clone()),
        size,
        mount_path: BACKUP_WAL_MOUNT.into(),
        path_in_volume: wal.path_in_volume.clone(),
    }))
}

/// A role as a Restore's spec writes it (`Data`, `Tablespace (tablespace fast)`).
fn role_in_spec(role: VolumeRole, tablespace: &Option<String>) -> String {
    match tablespace {
        Some(t) => format!("{role:?} (tablespace {t})"),
        None => format!("{role:?}"),
    }
}

/// Pairs each snapshot with its claim: every snapshot needs one (data without its WAL or
/// tablespace volume does not recover), and every claim needs a snapshot. `restore_sizes`
/// maps snapshot names to their restoreSize, when the driver reports one.
pub fn plan_claims(
    claims: &[RestoreClaim],
    volumes: &[SourceVolume],
    restore_sizes: &HashMap<String, Option<String>>,
    default_class: Option<&str>,
) -> Result<Vec<PlannedClaim>, Failure> {
    let mut planned = Vec::new();
    for v in volumes {
        let claim = claims.iter().find(|c| c.role == v.role && c.tablespace == v.tablespace).ok_or_else(|| {
            Failure::new(
                "ClaimsIncomplete",
                format!(
                    "snapshot {} holds the {} volume, and no claim has role {}; every volume of a backup must be restored together",
                    v.snapshot,
                    role_in_spec(v.role, &v.tablespace),
                    role_in_spec(v.role, &v.tablespace)
                ),
            )
        })?;
        let restore_size = restore_sizes.get(&v.snapshot).cloned().flatten();
        planned.push(PlannedClaim {
            name: claim.name.clone(),
            role: v.role,
            tablespace: v.tablespace.clone(),
            snapshot: v.snapshot.clone(),
            storage_class: claim
                .storage_class_name
                .clone()
                .or_else(|| default_class.map(str::to_string)),
            size: claim_size(claim, &v.snapshot, restore_size)?,
            mount_path: v.mount_path.clone(),
            path_in_volume: v.path_in_volume.clone(),
        });
    }
    if let Some(extra) = claims
        .iter()
        .find(|c| !planned.iter().any(|p| p.name == c.name))
    {
        return Err(Failure::new(
            "ClaimWithoutSnapshot",
            format!(
                "claim {} has role {}, which no snapshot of the backup has",
                extra.name,
                role_in_spec(extra.role, &extra.tablespace)
            ),
        ));
    }
    check_mounts_apart(&planned)?;
    Ok(planned)
}

/// The size to ask for: the claim's, which must hold the snapshot, else the snapshot's.
fn claim_size(
    claim: &RestoreClaim,
    snapshot: &str,
    restore_size: Option<String>,
) -> Result<String, Failure> {
    match (&claim.size, restore_size) {
        (Some(asked), Some(needed)) => match (quantity_bytes(&asked.0), quantity_bytes(&needed)) {
            (Some(a), Some(n)) if a >= n => Ok(asked.0.clone()),
            (Some(_), Some(_)) => Err(Failure::new(
                "ClaimTooSmall",
                format!(
                    "claim {} asks for {}, but snapshot {snapshot} needs {needed}",
                    claim.name, asked.0
                ),
            )),
            _ => Err(Failure::new(
                "InvalidSize",
                format!("cannot compare sizes {} and {needed}", asked.0),
            )),
        },
        (Some(asked), None) => Ok(asked.0.clone()),
        (None, Some(needed)) => Ok(needed),
        (None, None) => Err(Failure::new(
            "SizeUnknown",
            format!(
                "snapshot {snapshot} reports no restoreSize; set spec.claims[].size for claim {}",
                claim.name
            ),
        )),
    }
}

/// The prepare Job mounts every claim where the server had it: no two may nest or coincide.
fn check_mounts_apart(planned: &[PlannedClaim]) -> Result<(), Failure> {
    let mut mounts: Vec<&str> = planned.iter().map(|p| p.mount_path.as_str()).collect();
    mounts.sort();
    if mounts
        .windows(2)
        .any(|w| w[0] == w[1] || w[1].starts_with(&format!("{}/", w[0].trim_end_matches('/'))))
    {
        return Err(Failure::new(
            "LabelConfigMapInvalid",
            format!("the backed-up volumes were mounted at overlapping paths {mounts:?}"),
        ));
    }
    Ok(())
}

/// The PVC for a planned claim, with the labels of the Restore that creates it; owned by
/// the Restore only when the claims go with it.
pub fn claim(
    planned: &PlannedClaim,
    namespace: &str,
    labels: BTreeMap<String, String>,
    owner: Option<OwnerReference>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(planned.name.clone()),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: planned.storage_class.clone(),
            data_source: Some(TypedLocalObjectReference {
                api_group: Some("snapshot.storage.k8s.io".into()),
                kind: "VolumeSnapshot".into(),
                name: planned.snapshot.clone(),
            }),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(planned.size.clone()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `pgsnap restore-prepare`'s arguments. The data directory is found where the backed-up
/// server had it, because the Job mounts every claim at the server's mount path.
pub fn prepare_args(
    claims: &[PlannedClaim],
    label: &LabelRecord,
    recovery: &RecoverySpec,
) -> Vec<String> {
    let dir_of = |role| {
        claims.iter().find(|c| c.role == role).map(|c| {
            if c.path_in_volume.is_empty() {
                c.mount_path.clone()
            } else {
                format!(
                    "{}/{}",
                    c.mount_path.trim_end_matches('/'),
                    c.path_in_volume
                )
            }
        })
    };
    let data_dir = dir_of(VolumeRole::Data);
    let mut args = vec![
        "restore-prepare".to_string(),
        "--data-dir".into(),
        data_dir.unwrap_or_default(),
        "--label-dir".into(),
        LABEL_MOUNT.into(),
        "--backup-label-sha256".into(),
        label.backup_label_sha256(),
        "--tablespace-map-sha256".into(),
        label.tablespace_map_sha256(),
        "--system-identifier".into(),
        label.system_identifier.clone(),
        "--stop-lsn".into(),
        label.stop_lsn.clone(),
        "--promote".into(),
        recovery.promote.to_string(),
        "--termination-message-path".into(),
        "/dev/termination-log".into(),
        // A backup of a standby carries standby.signal, which would win over recovery.signal
        // and keep the restored server following a primary instead of recovering to the target.
        "--remove-standby-signal".into(),
    ];
    if let (Some(wal), Some(dir)) = (&label.wal, dir_of(VolumeRole::BackupWal)) {
        args.extend(wal_flags(wal, dir));
    }
    if let Some(cmd) = &recovery.restore_command {
        args.extend(["--restore-command".into(), cmd.clone()]);
    }
    if let Some(t) = &recovery.target.time {
        args.extend(["--target-time".into(), t.clone()]);
    } else if let Some(l) = &recovery.target.lsn {
        args.extend(["--target-lsn".into(), l.clone()]);
    }
    args
}

/// `restore-prepare`'s flags for the backup's WAL, found in `dir`.
pub fn wal_flags(wal: &crate::label_store::WalRecord, dir: String) -> Vec<String> {
    vec![
        "--wal-from".into(),
        dir,
        "--wal-first".into(),
        wal.first_segment.clone(),
        "--wal-last".into(),
        wal.last_segment.clone(),
        "--wal-segment-size".into(),
        wal.segment_size.to_string(),
    ]
}

/// Who the prepare Job is: its name, where, whose (the Restore's labels), and what it runs.
pub struct JobIdentity<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub labels: BTreeMap<String, String>,
    pub owner: OwnerReference,
    pub image: &'a str,
    /// The backup's label ConfigMap, mounted into the Job.
    pub label_config_map: &'a str,
}

/// The Job that runs restore-prepare on the restored claims. It runs as root with only the
/// capabilities to write into and chown files of a data directory owned by PostgreSQL's
/// user, whatever uid that is in the user's image. A refusal (exit 3) fails the Job at once;
/// anything else is retried twice (restore-prepare is idempotent).
pub fn prepare_job(
    job: JobIdentity,
    claims: &[PlannedClaim],
    label: &LabelRecord,
    recovery: &RecoverySpec,
) -> Job {
    let JobIdentity {
        name,
        namespace,
        labels,
        owner,
        image,
        label_config_map,
    } = job;
    let mut volumes = vec![Volume {
        name: "label".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: label_config_map.to_string(),
            items: Some(vec![
                KeyToPath {
                    key: BACKUP_LABEL_KEY.into(),
                    path: BACKUP_LABEL_KEY.into(),
                    ..Default::default()
                },
                KeyToPath {
                    key: TABLESPACE_MAP_KEY.into(),
                    path: TABLESPACE_MAP_KEY.into(),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "label".into(),
        mount_path: LABEL_MOUNT.into(),
        read_only: Some(true),
        ..Default::default()
    }];
    for (i, c) in claims.iter().enumerate() {
        let vol = format!("claim-{i}");
        volumes.push(Volume {
            name: vol.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: c.name.clone(),
                read_only: None,
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: vol,
            mount_path: c.mount_path.clone(),
            // The backup's WAL is only read.
            read_only: (c.role == VolumeRole::BackupWal).then_some(true),
            ..Default::default()
        });
    }
    Job {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(labels.clone()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(2),
            pod_failure_policy: Some(PodFailurePolicy {
                rules: vec![PodFailurePolicyRule {
                    action: "FailJob".into(),
                    on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                        container_name: Some("restore-prepare".into()),
                        operator: "In".into(),
                        values: vec![EXIT_REFUSED],
                    }),
                    on_pod_conditions: None,
                }],
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    security_context: Some(PodSecurityContext {
                        run_as_user: Some(0),
                        run_as_non_root: Some(false),
                        ..Default::default()
                    }),
                    containers: vec![Container {
                        name: "restore-prepare".into(),
                        image: Some(image.to_string()),
                        args: Some(prepare_args(claims, label, recovery)),
                        volume_mounts: Some(mounts),
                        termination_message_policy: Some("FallbackToLogsOnError".into()),
                        security_context: Some(SecurityContext {
                            allow_privilege_escalation: Some(false),
                            read_only_root_filesystem: Some(true),
                            capabilities: Some(Capabilities {
                                drop: Some(vec!["ALL".into()]),
                                add: Some(vec![
                                    "CHOWN".into(),
                                    "DAC_OVERRIDE".into(),
                                    "FOWNER".into(),
                                ]),
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RESTORE_NAME_LABEL;
    use crate::label_store::Location;

    fn loc(
        snapshot: &str,
        role: VolumeRole,
        ts: Option<&str>,
        server: &str,
        inner: &str,
    ) -> SnapshotLocation {
        SnapshotLocation {
            volume_snapshot: snapshot.into(),
            location: Location {
                role,
                tablespace: ts.map(Into::into),
                tablespace_oid: ts.map(|_| 16400),
                server_path: server.into(),
                persistent_volume_claim: format!("pvc-{snapshot}"),
                path_in_volume: inner.into(),
            },
        }
    }

    fn record(label: &str, volumes: &[SnapshotLocation]) -> LabelRecord {
        LabelRecord {
            backup: Some("b1".into()),
            backup_label: label.into(),
            tablespace_map: String::new(),
            start_lsn: "0/3000028".into(),
            stop_lsn: "0/3000100".into(),
            timeline: 1,
            server_version: "17.10".into(),
            system_identifier: "7312345678901234567".into(),
            volumes: volumes.to_vec(),
            wal: None,
        }
    }

    fn three_volumes() -> Vec<SnapshotLocation> {
        vec![
            loc(
                "b1-data",
                VolumeRole::Data,
                None,
                "/var/lib/postgresql/data/pgdata",
                "pgdata",
            ),
            loc("b1-wal", VolumeRole::Wal, None, "/wal/pg_wal", "pg_wal"),
            loc("b1-ts", VolumeRole::Tablespace, Some("fast"), "/ts", ""),
        ]
    }

    #[test]
    fn mount_paths_are_the_server_path_minus_the_path_in_the_volume() {
        assert_eq!(
            mount_path("/var/lib/postgresql/data/pgdata", "pgdata").as_deref(),
            Some("/var/lib/postgresql/data")
        );
        assert_eq!(mount_path("/data", "").as_deref(), Some("/data"));
        assert_eq!(mount_path("/a/b/c", "b/c").as_deref(), Some("/a"));
        assert_eq!(mount_path("/pgdata", "pgdata").as_deref(), Some("/"));
        assert_eq!(mount_path("/a/x", "y"), None);
    }

    #[test]
    fn quantities_compare_in_bytes() {
        assert_eq!(quantity_bytes("1Gi"), Some(1 << 30));
        assert_eq!(quantity_bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(quantity_bytes("500M"), Some(500_000_000));
        assert_eq!(quantity_bytes("1073741824"), Some(1 << 30));
        assert_eq!(quantity_bytes("1Gb"), None);
        assert!(quantity_bytes("1Gi") > quantity_bytes("1000Mi"));
    }

    fn claim_spec(
        role: VolumeRole,
        ts: Option<&str>,
        name: &str,
        size: Option<&str>,
    ) -> RestoreClaim {
        RestoreClaim {
            role,
            tablespace: ts.map(Into::into),
            name: name.into(),
            storage_class_name: None,
            size: size.map(|s| Quantity(s.into())),
        }
    }

    #[test]
    fn every_snapshot_gets_exactly_one_claim_of_at_least_its_size() {
        let label = record("L\n", &three_volumes());
        let volumes = source_volumes("b1-backup-label", &label).unwrap();
        let sizes: HashMap<String, Option<String>> = [
            ("b1-data", Some("1Gi")),
            ("b1-wal", Some("512Mi")),
            ("b1-ts", None),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.map(Into::into)))
        .collect();
        let claims = vec![
            claim_spec(VolumeRole::Data, None, "data-r", Some("2Gi")),
            claim_spec(VolumeRole::Wal, None, "wal-r", None),
            claim_spec(VolumeRole::Tablespace, Some("fast"), "ts-r", Some("1Gi")),
        ];
        let planned = plan_claims(&claims, &volumes, &sizes, Some("standard")).unwrap();
        let by_name: HashMap<_, _> = planned.iter().map(|p| (p.name.as_str(), p)).collect();
        assert_eq!(by_name["data-r"].size, "2Gi");
        assert_eq!(by_name["data-r"].mount_path, "/var/lib/postgresql/data");
        assert_eq!(by_name["wal-r"].size, "512Mi");
        assert_eq!(by_name["ts-r"].storage_class.as_deref(), Some("standard"));

        let too_small = vec![
            claim_spec(VolumeRole::Data, None, "d", Some("1Mi")),
            claims[1].clone(),
            claims[2].clone(),
        ];
        assert_eq!(
            plan_claims(&too_small, &volumes, &sizes, None)
                .unwrap_err()
                .reason,
            "ClaimTooSmall"
        );
        assert_eq!(
            plan_claims(&claims[..2], &volumes, &sizes, None)
                .unwrap_err()
                .reason,
            "ClaimsIncomplete"
        );
        let unknown_size = vec![
            claims[0].clone(),
            claims[1].clone(),
            claim_spec(VolumeRole::Tablespace, Some("fast"), "ts-r", None),
        ];
        assert_eq!(
            plan_claims(&unknown_size, &volumes, &sizes, None)
                .unwrap_err()
                .reason,
            "SizeUnknown"
        );
        let data_only = record("L\n", &three_volumes()[..1]);
        let extra = plan_claims(
            &claims,
            &source_volumes("b1-backup-label", &data_only).unwrap(),
            &sizes,
            None,
        )
        .unwrap_err();
        assert_eq!(extra.reason, "ClaimWithoutSnapshot");
    }

    #[test]
    fn a_volume_holding_data_and_a_tablespace_is_one_data_claim() {
        let volumes = vec![
            loc("b1-data", VolumeRole::Data, None, "/data/pgdata", "pgdata"),
            loc(
                "b1-data",
                VolumeRole::Tablespace,
                Some("t"),
                "/data/ts",
                "ts",
            ),
        ];
        let label = record("L\n", &volumes);
        let source = source_volumes("b1-backup-label", &label).unwrap();
        assert_eq!(source.len(), 1);
        assert_eq!(
            (
                source[0].role,
                source[0].mount_path.as_str(),
                source[0].path_in_volume.as_str()
            ),
            (VolumeRole::Data, "/data", "pgdata")
        );
    }

    #[test]
    fn the_backups_wal_is_read_from_a_claim_of_its_wal_snapshot_mounted_read_only() {
        let mut label = record("L\n", &three_volumes());
        let wal = crate::label_store::WalRecord {
            volume_snapshot: "b1-wal-wal".into(),
            persistent_volume_claim: "pvc-b1-wal".into(),
            path_in_volume: "pg_wal".into(),
            timeline: 1,
            first_segment: "000000010000000000000003".into(),
            last_segment: "000000010000000000000005".into(),
            segment_size: 16 << 20,
            checked_by: "pg_ls_waldir".into(),
        };
        label.wal = Some(wal.clone());
        let volumes = source_volumes("b1-backup-label", &label).unwrap();
        let mut claims = vec![
            claim_spec(VolumeRole::Data, None, "data-r", Some("1Gi")),
            claim_spec(VolumeRole::Wal, None, "wal-r", Some("1Gi")),
            claim_spec(VolumeRole::Tablespace, Some("fast"), "ts-r", Some("1Gi")),
        ];
        claims[1].storage_class_name = Some("wal-class".into());
        let mut planned = plan_claims(&claims, &volumes, &HashMap::new(), Some("std")).unwrap();
        let mut sizes = HashMap::new();
        let refused = backup_wal_claim("r1", &label, &planned, &sizes).unwrap_err();
        assert_eq!(refused.reason, "SizeUnknown");
        sizes.insert("b1-wal-wal".to_string(), Some("2Gi".to_string()));
        let temporary = backup_wal_claim("r1", &label, &planned, &sizes)
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                temporary.name.as_str(),
                temporary.role,
                temporary.snapshot.as_str()
            ),
            ("r1-backup-wal", VolumeRole::BackupWal, "b1-wal-wal")
        );
        // A claim of the WAL volume's snapshot needs that volume's driver: its class.
        assert_eq!(temporary.storage_class.as_deref(), Some("wal-class"));
        let mut alike = planned.clone();
        alike[0].name = "r1-backup-wal".into();
        let named_alike = backup_wal_claim("r1", &label, &alike, &sizes).unwrap_err();
        assert_eq!(named_alike.reason, "ClaimNameReserved");
        let archived = LabelRecord {
            wal: None,
            ..label.clone()
        };
        assert_eq!(
            backup_wal_claim("r1", &archived, &planned, &sizes).map_err(|f| f.reason),
            Ok(None)
        );
        planned.push(temporary);
        let args = prepare_args(&planned, &label, &RecoverySpec::default());
        let arg = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .map(|i| args[i + 1].as_str())
        };
        assert_eq!(arg("--wal-from"), Some("/pgsnap/backup-wal/pg_wal"));
        assert_eq!(arg("--wal-first"), Some("000000010000000000000003"));
        assert_eq!(arg("--wal-last"), Some("000000010000000000000005"));
        assert_eq!(arg("--wal-segment-size"), Some("16777216"));
        assert_eq!(arg("--restore-command"), None, "no archive needed");
        let id = JobIdentity {
            name: "r1-prepare",
            namespace: "shop",
            labels: BTreeMap::new(),
            owner: OwnerReference::default(),
            image: "pgsnap:dev",
            label_config_map: "b1-backup-label",
        };
        let job = prepare_job(id, &planned, &label, &RecoverySpec::default());
        let pod = job.spec.unwrap().template.spec.unwrap();
        let mounts = pod.containers[0].volume_mounts.clone().unwrap();
        let read_only: Vec<_> = mounts
            .iter()
            .filter(|m| m.read_only == Some(true))
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(read_only, [LABEL_MOUNT, BACKUP_WAL_MOUNT]);
    }

    #[test]
    fn the_job_mounts_claims_where_the_server_had_them_and_passes_the_checks() {
        let label = record("L\n", &three_volumes());
        let volumes = source_volumes("b1-backup-label", &label).unwrap();
        let sizes = HashMap::new();
        let claims = vec![
            claim_spec(VolumeRole::Data, None, "data-r", Some("1Gi")),
            claim_spec(VolumeRole::Wal, None, "wal-r", Some("1Gi")),
            claim_spec(VolumeRole::Tablespace, Some("fast"), "ts-r", Some("1Gi")),
        ];
        let planned = plan_claims(&claims, &volumes, &sizes, None).unwrap();
        let recovery = RecoverySpec {
            restore_command: Some("cp /archive/%f %p".into()),
            target: crate::api::restore::RecoveryTarget {
                time: Some("2026-11-21T10:00:00Z".into()),
                lsn: None,
            },
            promote: false,
        };
        let owner = OwnerReference {
            api_version: "pgsnap.io/v1alpha1".into(),
            kind: "Restore".into(),
            name: "r".into(),
            uid: "u".into(),
            ..Default::default()
        };
        let id = JobIdentity {
            name: "r-prepare",
            namespace: "shop",
            labels: BTreeMap::from([(RESTORE_NAME_LABEL.to_string(), "r".to_string())]),
            owner,
            image: "pgsnap:dev",
            label_config_map: "b1-backup-label",
        };
        let job = prepare_job(id, &planned, &label, &recovery);
        let pod = job.spec.unwrap().template.spec.unwrap();
        let c = &pod.containers[0];
        let args = c.args.clone().unwrap();
        let arg = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .map(|i| args[i + 1].as_str())
        };
        assert_eq!(arg("--data-dir"), Some("/var/lib/postgresql/data/pgdata"));
        assert_eq!(arg("--system-identifier"), Some("7312345678901234567"));
        assert_eq!(
            arg("--backup-label-sha256"),
            Some(crate::label_store::sha256_hex(b"L\n").as_str())
        );
        assert_eq!(arg("--target-time"), Some("2026-11-21T10:00:00Z"));
        assert_eq!(arg("--promote"), Some("false"));
        assert!(args.contains(&"--remove-standby-signal".to_string()));
        assert_eq!(arg("--restore-command"), Some("cp /archive/%f %p"));
        let mounts: Vec<_> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(
            mounts,
            [LABEL_MOUNT, "/var/lib/postgresql/data", "/ts", "/wal"]
        );
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        // Restored claims: from the snapshot, at least the size.
        let pvc = claim(&planned[0], "shop", BTreeMap::new(), None);
        let spec = pvc.spec.unwrap();
        assert_eq!(spec.data_source.unwrap().name, "b1-data");
        assert_eq!(
            spec.resources.unwrap().requests.unwrap()["storage"].0,
            "1Gi"
        );
    }

    /// The Job's command line is read by the binary's own parser, into what was meant.
    #[test]
    fn the_job_arguments_parse_into_the_restore_the_spec_asks_for() {
        use crate::cli::{Cli, Command};
        use crate::restore::prepare;
        use clap::Parser;

        let label = record("L\n", &three_volumes());
        let volumes = source_volumes("b1-backup-label", &label).unwrap();
        let claims = vec![
            claim_spec(VolumeRole::Data, None, "data-r", Some("1Gi")),
            claim_spec(VolumeRole::Wal, None, "wal-r", Some("1Gi")),
            claim_spec(VolumeRole::Tablespace, Some("fast"), "ts-r", Some("1Gi")),
        ];
        let planned = plan_claims(&claims, &volumes, &HashMap::new(), None).unwrap();
        let recovery =
            |restore_command: Option<&str>, time: Option<&str>, lsn: Option<&str>| RecoverySpec {
                restore_command: restore_command.map(Into::into),
                target: crate::api::restore::RecoveryTarget {
                    time: time.map(Into::into),
                    lsn: lsn.map(Into::into),
                },
                promote: time.is_none(),
            };
        let cases = [
            (recovery(None, None, None), prepare::RecoveryStop::Immediate),
            (
                recovery(
                    Some("cp /archive/%f %p"),
                    Some("2026-11-21T10:00:00Z"),
                    None,
                ),
                prepare::RecoveryStop::Time("2026-11-21T10:00:00Z".into()),
            ),
            (
                recovery(Some("cp /archive/%f %p"), None, Some("0/3000100")),
                prepare::RecoveryStop::Lsn("0/3000100".into()),
            ),
        ];
        for (spec, target) in cases {
            let args = prepare_args(&planned, &label, &spec);
            let cli = Cli::try_parse_from(std::iter::once("pgsnap".to_string()).chain(args))
                .unwrap_or_else(|e| panic!("the Job's arguments do not parse: {e}"));
            let Command::RestorePrepare(parsed) = cli.command else {
                panic!("the Job does not run restore-prepare");
            };
            let inputs = parsed.inputs();
            assert_eq!(
                inputs.data_dir.to_str(),
                Some("/var/lib/postgresql/data/pgdata")
            );
            assert_eq!(inputs.label_dir.to_str(), Some(LABEL_MOUNT));
            assert_eq!(inputs.backup_label_sha256, label.backup_label_sha256());
            assert_eq!(
                inputs.tablespace_map_sha256,
                Some(label.tablespace_map_sha256())
            );
            assert_eq!(inputs.system_identifier, 7312345678901234567);
            assert_eq!(inputs.stop_lsn.to_string(), label.stop_lsn);
            assert!(inputs.remove_standby_signal);
            assert_eq!(
                inputs.recovery,
                prepare::Recovery {
                    restore_command: spec.restore_command.clone(),
                    target,
                    promote: spec.promote,
                }
            );
            assert_eq!(
                parsed
                    .termination_message_path
                    .as_deref()
                    .and_then(|p| p.to_str()),
                Some("/dev/termination-log")
            );
        }
    }
}
