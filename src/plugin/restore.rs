//! `kubectl pgsnap restore`: a Restore of a Backup into the claims a StatefulSet of the
//! restored server adopts, and that StatefulSet, made of the backed-up pod's spec.

use std::collections::BTreeMap;
use std::io::Write;

use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod, PodSpec, PodTemplateSpec, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};

use super::{Error, Output, encode, follow};
use crate::api::backup::{Backup, Phase, SnapshotStatus, VolumeRole};
use crate::api::restore::{Restore, RestorePhase, RestoredClaim};

#[derive(clap::Args)]
pub struct RestoreArgs {
    /// The Completed Backup.
    pub backup: String,
    /// The restored server's name: its Restore's, its StatefulSet's, and in its claims' names.
    #[arg(long)]
    pub to: String,
    /// The claims' StorageClass (default: the cluster's default).
    #[arg(long)]
    pub storage_class: Option<String>,
    /// PostgreSQL's restore_command (`%f`, `%p`), for WAL from an archive: needed only to
    /// recover past the backup's end, or for a backup that kept no WAL of its own.
    #[arg(long)]
    pub restore_command: Option<String>,
    /// Recover to this time (RFC 3339), not just to the backup's end.
    #[arg(long, conflicts_with = "target_lsn")]
    pub target_time: Option<String>,
    /// Recover to this WAL location, not just to the backup's end.
    #[arg(long)]
    pub target_lsn: Option<String>,
    /// Follow the Restore to its end (`-o yaml` always does).
    #[arg(long)]
    pub wait: bool,
    /// With `-o yaml`: a volume of the backed-up pod on storage the backup does not hold
    /// that the restored server shares with the source (repeatable).
    #[arg(long, value_name = "VOLUME")]
    pub keep_volume: Vec<String>,
    /// With `-o yaml`: such a volume the restored server gets empty (repeatable).
    #[arg(long, value_name = "VOLUME")]
    pub empty_volume: Vec<String>,
}

/// The label the restored server's pods carry, and its StatefulSet selects.
const SERVER_LABEL: &str = "pgsnap.io/restored-server";

/// Creates the Restore (or finds the same one made before) and, as asked, follows it and
/// prints the StatefulSet; whether it did not fail, and what to print.
pub async fn run(
    client: &Client,
    namespace: &str,
    args: &RestoreArgs,
    output: Output,
) -> Result<(bool, String), Error> {
    check_server_name(&args.to)?;
    let backup = Api::<Backup>::namespaced(client.clone(), namespace)
        .get(&args.backup)
        .await?;
    let status = backup.status.clone().unwrap_or_default();
    if status.phase != Some(Phase::Completed) {
        let phase = status.phase.unwrap_or(Phase::Pending);
        return Err(Error::Refused(format!(
            "Backup {} is {phase:?}: only a Completed backup restores",
            args.backup
        )));
    }
    let pod_name = status.postgres.map(|p| p.pod).unwrap_or_default();
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get_opt(&pod_name)
        .await?;
    let restore = restore_of(namespace, &backup, pod.as_ref(), args)?;
    // People for a table, the terminal for everything else, whose stdout is for scripts.
    let mut progress: Box<dyn Write> = match output {
        Output::Table => Box::new(std::io::stdout()),
        _ => Box::new(std::io::stderr()),
    };
    // What can refuse the StatefulSet is checked before anything is created.
    let source = match (output, &pod) {
        (Output::Yaml, Some(pod)) => {
            let source = source_template(client, pod).await?;
            let templated = claim_volumes(&restore, &args.to);
            planned_volumes(
                &source.spec,
                &templated,
                &args.keep_volume,
                &args.empty_volume,
            )
            .map_err(Error::Refused)?;
            if let Some(note) = &source.note {
                let _ = writeln!(progress, "warning: {note}");
            }
            Some(source)
        }
        (Output::Yaml, None) => {
            return Err(Error::Refused(format!(
                "the StatefulSet is made of the backed-up pod {pod_name}, which is gone: restore without -o yaml and mount the claims yourself (the Restore's status.claims names each one's mount path)"
            )));
        }
        _ => None,
    };
    let api = Api::<Restore>::namespaced(client.clone(), namespace);
    let made = match api.create(&PostParams::default(), &restore).await {
        Ok(made) => {
            let _ = writeln!(progress, "restore.pgsnap.io/{} created", args.to);
            made
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = api.get(&args.to).await?;
            if existing.spec != restore.spec {
                let of = existing
                    .spec
                    .backup_name
                    .as_deref()
                    .unwrap_or("its snapshots");
                return Err(Error::Refused(format!(
                    "Restore {} exists already, restoring {of} into claims {}: choose another --to, or delete it",
                    args.to,
                    claim_names(&existing).join(", ")
                )));
            }
            let _ = writeln!(progress, "restore.pgsnap.io/{} unchanged", args.to);
            existing
        }
        Err(e) => return Err(e.into()),
    };
    if !args.wait && output != Output::Yaml {
        return Ok((
            true,
            match output {
                Output::Table => format!("claims: {}", claim_names(&made).join(", ")),
                _ => encode(output, &made)?,
            },
        ));
    }
    let ended = follow(&api, &args.to, &mut progress).await?;
    let status = ended.status.clone().unwrap_or_default();
    if status.phase != Some(RestorePhase::Completed) {
        let failed = status.error.map_or("Failed".into(), |e| {
            format!("Failed: {}: {}", e.reason, e.message)
        });
        return Ok(match output {
            Output::Table => (false, failed),
            Output::Json => (false, encode(output, &ended)?),
            Output::Yaml => {
                let _ = writeln!(progress, "{failed}");
                (false, String::new())
            }
        });
    }
    let text = match source {
        Some(source) => {
            let pvcs = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace);
            let mut claims = Vec::new();
            for c in &status.claims {
                claims.push((pvcs.get(&c.name).await?, c.clone()));
            }
            let choices = (&args.keep_volume[..], &args.empty_volume[..]);
            let server = restored_server(&args.to, &args.backup, source, &claims, choices)
                .map_err(|why| {
                    Error::Refused(format!(
                        "{why}; the Restore {} is complete: mount its claims yourself (status.claims names each one's mount path)",
                        args.to
                    ))
                })?;
            format!(
                "# PostgreSQL on the claims restored from Backup {} (Restore {}), with the spec of\n# the backed-up server's pod: its settings and its environment as they are. If that\n# server archives WAL, give this one another archive before applying.\n{}",
                args.backup,
                args.to,
                encode(output, &server)?
            )
        }
        None if output == Output::Json => encode(output, &ended)?,
        None => format!(
            "Completed: claims {}\nPostgreSQL on them: kubectl pgsnap restore {} --to {} -o yaml | kubectl apply -f -",
            claim_names(&ended).join(", "),
            args.backup,
            args.to
        ),
    };
    Ok((true, text))
}

fn claim_names(restore: &Restore) -> Vec<String> {
    restore.spec.claims.iter().map(|c| c.name.clone()).collect()
}

/// The volume names of a Restore's claims `<volume>-<to>-0`: the StatefulSet's templates.
fn claim_volumes(restore: &Restore, to: &str) -> Vec<String> {
    let suffix = format!("-{to}-0");
    restore
        .spec
        .claims
        .iter()
        .map(|c| c.name.strip_suffix(&suffix).unwrap_or(&c.name).to_string())
        .collect()
}

/// A StatefulSet's name must leave room for its pods' `-0` and its revisions' hash label.
fn check_server_name(name: &str) -> Result<(), Error> {
    match dns_label(name, 52) {
        true => Ok(()),
        false => Err(Error::Refused(format!(
            "--to {name:?}: a StatefulSet's name, at most 52 lower-case letters, digits and '-', starting and ending with a letter or digit"
        ))),
    }
}

fn dns_label(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The name the backed-up pod gives the volume of `snapshot`'s claim, or one for its role.
fn volume_name(pod: Option<&Pod>, snapshot: &SnapshotStatus) -> String {
    let named = pod
        .and_then(|p| p.spec.as_ref())
        .into_iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .find(|v| {
            v.persistent_volume_claim
                .as_ref()
                .is_some_and(|c| c.claim_name == snapshot.persistent_volume_claim)
        })
        .map(|v| v.name.clone());
    named.unwrap_or_else(|| match (&snapshot.role, &snapshot.tablespace) {
        (VolumeRole::Wal, _) => "wal".into(),
        // A tablespace's name need not be a DNS label, and two may differ only in case.
        (VolumeRole::Tablespace, Some(t)) if dns_label(t, 40) => format!("tablespace-{t}"),
        (VolumeRole::Tablespace, Some(t)) => {
            format!("tablespace-{}", crate::controller::hash_prefix(t, 10))
        }
        _ => "data".into(),
    })
}

/// The Restore of `backup` into claims `<volume>-<to>-0`.
fn restore_of(
    namespace: &str,
    backup: &Backup,
    pod: Option<&Pod>,
    args: &RestoreArgs,
) -> Result<Restore, serde_json::Error> {
    let snapshots = backup.status.iter().flat_map(|s| s.snapshots.iter());
    let claims: Vec<serde_json::Value> = snapshots
        .filter(|s| s.role != VolumeRole::BackupWal)
        .map(|s| {
            let mut claim = serde_json::json!({
                "role": s.role,
                "name": format!("{}-{}-0", volume_name(pod, s), args.to),
            });
            if let Some(t) = &s.tablespace {
                claim["tablespace"] = t.clone().into();
            }
            if let Some(class) = &args.storage_class {
                claim["storageClassName"] = class.clone().into();
            }
            claim
        })
        .collect();
    let mut recovery = serde_json::json!({"target": {}});
    if let Some(command) = &args.restore_command {
        recovery["restoreCommand"] = command.clone().into();
    }
    if let Some(time) = &args.target_time {
        recovery["target"]["time"] = time.clone().into();
    }
    if let Some(lsn) = &args.target_lsn {
        recovery["target"]["lsn"] = lsn.clone().into();
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "pgsnap.io/v1alpha1", "kind": "Restore",
        "metadata": {"name": args.to, "namespace": namespace},
        "spec": {"backupName": backup.name_any(), "claims": claims, "recovery": recovery},
    }))
}

/// The pod spec the restored server runs, and what a user should know about where it came
/// from.
struct SourceTemplate {
    namespace: Option<String>,
    spec: PodSpec,
    annotations: Option<BTreeMap<String, String>>,
    note: Option<String>,
}

/// A StatefulSet's pod is built from its current revision: the spec as its owner wrote it,
/// without what admission webhooks (sidecar injectors) and the API server added to the pod,
/// which they add again. Any other pod is taken as it runs.
async fn source_template(client: &Client, pod: &Pod) -> Result<SourceTemplate, Error> {
    let owned_by_statefulset = pod
        .owner_references()
        .iter()
        .any(|o| o.kind == "StatefulSet" && o.controller == Some(true));
    let revision = pod.labels().get("controller-revision-hash");
    if let (true, Some(revision)) = (owned_by_statefulset, revision) {
        let api = Api::<ControllerRevision>::namespaced(
            client.clone(),
            &pod.namespace().unwrap_or_default(),
        );
        let template = api
            .get(revision)
            .await?
            .data
            .and_then(|d| d.0.pointer("/spec/template").cloned())
            .and_then(|t| serde_json::from_value::<PodTemplateSpec>(t).ok());
        if let Some(PodTemplateSpec {
            metadata,
            spec: Some(spec),
        }) = template
        {
            return Ok(SourceTemplate {
                namespace: pod.namespace(),
                spec,
                annotations: metadata.and_then(|m| m.annotations),
                note: None,
            });
        }
    }
    Ok(live_template(pod))
}

/// A pod's spec as it runs, but for the ServiceAccount token volume the API server gave it
/// (it gives the new pod its own).
fn live_template(pod: &Pod) -> SourceTemplate {
    let mut spec = pod.spec.clone().unwrap_or_default();
    let token = |v: &Volume| {
        v.projected.as_ref().is_some_and(|p| {
            p.sources
                .iter()
                .flatten()
                .any(|s| s.service_account_token.is_some())
        }) && v.name.starts_with("kube-api-access-")
    };
    let tokens: Vec<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| token(v))
        .map(|v| v.name.clone())
        .collect();
    if let Some(volumes) = &mut spec.volumes {
        volumes.retain(|v| !tokens.contains(&v.name));
    }
    for c in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
    {
        if let Some(mounts) = &mut c.volume_mounts {
            mounts.retain(|m| !tokens.contains(&m.name));
        }
    }
    SourceTemplate {
        namespace: pod.namespace(),
        spec,
        annotations: None,
        note: Some(format!(
            "{} has no StatefulSet: its spec is taken as it runs, with what webhooks added to it",
            pod.name_any()
        )),
    }
}

/// The source's volumes the restored server keeps: all but the restored claims' (`templated`),
/// where storage the backup does not hold (another claim, a host path, a network share)
/// must be chosen for, kept (`keep`, shared with the source) or made an empty directory
/// (`empty`): a restored server writing into the source's storage, its WAL archive above
/// all, is never a default.
fn planned_volumes(
    spec: &PodSpec,
    templated: &[String],
    keep: &[String],
    empty: &[String],
) -> Result<Vec<Volume>, String> {
    let mut planned = Vec::new();
    let mut undecided = Vec::new();
    for v in spec.volumes.iter().flatten() {
        if templated.contains(&v.name) {
            continue;
        }
        // What the pod itself holds, or the API server gives it.
        let own = v.config_map.is_some()
            || v.secret.is_some()
            || v.downward_api.is_some()
            || v.projected.is_some()
            || v.empty_dir.is_some()
            || v.ephemeral.is_some();
        if own || keep.contains(&v.name) {
            planned.push(v.clone());
        } else if empty.contains(&v.name) {
            planned.push(Volume {
                name: v.name.clone(),
                empty_dir: Some(Default::default()),
                ..Default::default()
            });
        } else {
            undecided.push(v.name.clone());
        }
    }
    match undecided.is_empty() {
        true => Ok(planned),
        false => Err(format!(
            "the backed-up pod's volumes {} are storage the backup does not hold, which the restored server would share with the source: say for each --keep-volume NAME (share it) or --empty-volume NAME (an empty directory)",
            undecided.join(", ")
        )),
    }
}

/// A StatefulSet `name` of one replica running the source's pod spec on the restored
/// `claims` (`<volume>-<name>-0`, which its claim templates adopt), each mounted where the
/// Restore prepared it for; the source's other volumes as `choices` (keep, empty) say.
///
/// It selects a label of its own, never the source's: the source's Services must not send
/// it their clients. What the node, admission or the source's identity set is left out, and
/// so are liveness and startup probes, which a long replay would fail and restart.
fn restored_server(
    name: &str,
    backup: &str,
    source: SourceTemplate,
    claims: &[(PersistentVolumeClaim, RestoredClaim)],
    choices: (&[String], &[String]),
) -> Result<StatefulSet, String> {
    let suffix = format!("-{name}-0");
    let volume_of = |c: &RestoredClaim| c.name.strip_suffix(&suffix).unwrap_or(&c.name).to_string();
    let templated: Vec<String> = claims.iter().map(|(_, c)| volume_of(c)).collect();
    let volumes = planned_volumes(&source.spec, &templated, choices.0, choices.1)?;
    let mut spec = source.spec;
    for (_, restored) in claims {
        let volume = volume_of(restored);
        let at = restored.mount_path.trim_end_matches('/');
        let mounted = spec.containers.iter().any(|c| {
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == volume && m.mount_path.trim_end_matches('/') == at)
        });
        if !mounted {
            return Err(format!(
                "no container of the backed-up pod mounts volume {volume} at {at}, where claim {} must be (the links in its data directory point there)",
                restored.name
            ));
        }
    }
    let templates: Vec<PersistentVolumeClaim> = claims
        .iter()
        .map(|(pvc, restored)| {
            let spec = pvc.spec.clone().unwrap_or_default();
            PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(volume_of(restored)),
                    ..Default::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: spec.access_modes,
                    storage_class_name: spec.storage_class_name,
                    resources: spec.resources,
                    volume_mode: spec.volume_mode,
                    ..Default::default()
                }),
                status: None,
            }
        })
        .collect();
    for c in &mut spec.containers {
        c.liveness_probe = None;
        c.startup_probe = None;
    }
    // Admission's defaults come back by themselves.
    if let Some(tolerations) = &mut spec.tolerations {
        tolerations.retain(|t| !crate::controller::added_by_admission(t));
    }
    let spec = PodSpec {
        volumes: (!volumes.is_empty()).then_some(volumes),
        restart_policy: Some("Always".into()),
        node_name: None,
        hostname: None,
        subdomain: None,
        priority: None,
        preemption_policy: None,
        overhead: None,
        // Refused in a StatefulSet's template.
        active_deadline_seconds: None,
        ephemeral_containers: None,
        service_account: None,
        tolerations: spec.tolerations.filter(|t| !t.is_empty()),
        ..spec
    };
    let labels = BTreeMap::from([(SERVER_LABEL.to_string(), name.to_string())]);
    Ok(StatefulSet {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: source.namespace,
            labels: Some(labels.clone()),
            annotations: Some(BTreeMap::from([(
                "pgsnap.io/restored-from".to_string(),
                backup.to_string(),
            )])),
            ..Default::default()
        },
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(name.into()),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: source.annotations,
                    ..Default::default()
                }),
                spec: Some(spec),
            },
            volume_claim_templates: Some(templates),
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::golden;

    /// The backed-up pod, as the API server returns a StatefulSet's pod.
    fn source_pod() -> Pod {
        serde_yaml::from_str(include_str!("../../tests/golden/restore-source-pod.yaml")).unwrap()
    }

    fn backup() -> Backup {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "pgsnap.io/v1alpha1", "kind": "Backup",
            "metadata": {"name": "orders-1", "namespace": "shop"},
            "spec": {"target": {"podName": "orders-db-0"}},
            "status": {"phase": "Completed", "snapshots": [
                {"name": "orders-1-data", "persistentVolumeClaim": "data-orders-db-0", "role": "Data", "pathInVolume": "pgdata"},
                {"name": "orders-1-wal", "persistentVolumeClaim": "wal-orders-db-0", "role": "Wal", "pathInVolume": ""},
                {"name": "orders-1-ts", "persistentVolumeClaim": "gone-claim", "role": "Tablespace", "tablespace": "Fast_TS", "pathInVolume": ""},
                {"name": "orders-1-data-wal", "persistentVolumeClaim": "wal-orders-db-0", "role": "BackupWal", "pathInVolume": ""},
            ]},
        }))
        .unwrap()
    }

    fn args(to: &str) -> RestoreArgs {
        RestoreArgs {
            backup: "orders-1".into(),
            to: to.into(),
            storage_class: Some("fast".into()),
            restore_command: None,
            target_time: None,
            target_lsn: Some("0/3000060".into()),
            wait: false,
            keep_volume: Vec::new(),
            empty_volume: Vec::new(),
        }
    }

    #[test]
    fn claims_take_the_pods_volume_names_or_their_roles() {
        let restore =
            restore_of("shop", &backup(), Some(&source_pod()), &args("orders-r")).unwrap();
        // Its claim is not the pod's: named for its role, its name hashed (not a DNS label).
        let tablespace = format!(
            "tablespace-{}-orders-r-0",
            crate::controller::hash_prefix("Fast_TS", 10)
        );
        let claims: Vec<(VolumeRole, &str, Option<&str>)> = restore
            .spec
            .claims
            .iter()
            .map(|c| (c.role, c.name.as_str(), c.storage_class_name.as_deref()))
            .collect();
        assert_eq!(
            claims,
            [
                (VolumeRole::Data, "data-orders-r-0", Some("fast")),
                (VolumeRole::Wal, "wal-orders-r-0", Some("fast")),
                (VolumeRole::Tablespace, tablespace.as_str(), Some("fast")),
            ]
        );
        assert_eq!(restore.spec.backup_name.as_deref(), Some("orders-1"));
        assert_eq!(
            restore.spec.recovery.target.lsn.as_deref(),
            Some("0/3000060")
        );
        // Without the pod, each claim is named for its role.
        let restore = restore_of("shop", &backup(), None, &args("r")).unwrap();
        assert_eq!(restore.spec.claims[1].name, "wal-r-0");
    }

    #[test]
    fn server_names_fit_a_statefulset() {
        assert!(check_server_name("orders-restored").is_ok());
        for bad in ["", "Orders", "-a", "a-", "a_b", &"a".repeat(53)] {
            assert!(check_server_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_restored_server_is_the_source_pod_on_the_restored_claims() {
        let claim = |name: &str, size: &str, at: &str| {
            let pvc: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "uid": "u", "resourceVersion": "1"},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                         "resources": {"requests": {"storage": size}},
                         "dataSource": {"kind": "VolumeSnapshot", "name": "x", "apiGroup": "snapshot.storage.k8s.io"},
                         "volumeName": "pv-1"},
                "status": {"phase": "Bound"},
            }))
            .unwrap();
            let restored = RestoredClaim {
                name: name.into(),
                role: VolumeRole::Data,
                tablespace: None,
                volume_snapshot: "x".into(),
                mount_path: at.into(),
                path_in_volume: String::new(),
                bound: true,
            };
            (pvc, restored)
        };
        let claims = [
            claim("data-orders-r-0", "1Gi", "/var/lib/postgresql/data"),
            claim("wal-orders-r-0", "512Mi", "/var/lib/postgresql/wal/"),
        ];
        let source = || live_template(&source_pod());
        let none: &[String] = &[];
        // The source's WAL archive claim is never shared by default.
        let refused = restored_server("orders-r", "orders-1", source(), &claims, (none, none));
        assert_eq!(
            refused.unwrap_err(),
            "the backed-up pod's volumes archive are storage the backup does not hold, which the restored server would share with the source: say for each --keep-volume NAME (share it) or --empty-volume NAME (an empty directory)"
        );
        let empty = ["archive".to_string()];
        let server = restored_server("orders-r", "orders-1", source(), &claims, (none, &empty));
        golden(
            "restore-statefulset.yaml",
            &serde_yaml::to_string(&server.unwrap()).unwrap(),
        );
        // A claim must be mounted where the Restore prepared it for.
        let moved = [claim("data-orders-r-0", "1Gi", "/data"), claims[1].clone()];
        let refused = restored_server("orders-r", "orders-1", source(), &moved, (none, &empty));
        assert_eq!(
            refused.unwrap_err(),
            "no container of the backed-up pod mounts volume data at /data, where claim data-orders-r-0 must be (the links in its data directory point there)"
        );
    }

    #[test]
    fn tablespace_volumes_are_dns_labels() {
        let snapshot = |t: &str| SnapshotStatus {
            name: "s".into(),
            persistent_volume_claim: "gone".into(),
            role: VolumeRole::Tablespace,
            tablespace: Some(t.into()),
            path_in_volume: String::new(),
            cut_at: None,
            ready_to_use: true,
            restore_size: None,
        };
        assert_eq!(volume_name(None, &snapshot("fast")), "tablespace-fast");
        let (upper, lower) = (
            volume_name(None, &snapshot("Fast_TS")),
            volume_name(None, &snapshot("fast_ts")),
        );
        assert!(dns_label(&upper, 63) && dns_label(&lower, 63) && upper != lower);
        assert!(dns_label(
            &volume_name(None, &snapshot(&"t".repeat(63))),
            63
        ));
    }
}
