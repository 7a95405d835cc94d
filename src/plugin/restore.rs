//! `kubectl pgsnap restore`: a Restore of a Backup into the claims a StatefulSet of the
//! restored server adopts, and that StatefulSet, made of the backed-up pod's spec.

use std::collections::BTreeMap;
use std::io::Write;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Container, PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod, PodSpec, PodTemplateSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};

use super::{Error, Output, encode, follow};
use crate::api::backup::{Backup, Phase, SnapshotStatus, VolumeRole};
use crate::api::restore::{Restore, RestorePhase};

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
    if output == Output::Yaml && pod.is_none() {
        return Err(Error::Refused(format!(
            "the StatefulSet is made of the backed-up pod {pod_name}, which is gone: restore without -o yaml and mount the claims yourself (the Restore's status.claims names each one's mount path)"
        )));
    }
    let restore = restore_of(namespace, &backup, pod.as_ref(), args)?;
    let api = Api::<Restore>::namespaced(client.clone(), namespace);
    // People for a table, the terminal for everything else, whose stdout is for scripts.
    let mut progress: Box<dyn Write> = match output {
        Output::Table => Box::new(std::io::stdout()),
        _ => Box::new(std::io::stderr()),
    };
    let made = match api.create(&PostParams::default(), &restore).await {
        Ok(made) => {
            let _ = writeln!(progress, "restore.pgsnap.io/{} created", args.to);
            made
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = api.get(&args.to).await?;
            if existing.spec != restore.spec {
                return Err(Error::Refused(format!(
                    "Restore {} exists and restores something else: choose another --to",
                    args.to
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
    let text = match (output, pod) {
        (Output::Yaml, Some(pod)) => {
            let pvcs = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace);
            let mut claims = Vec::new();
            for c in &status.claims {
                claims.push(pvcs.get(&c.name).await?);
            }
            let (server, kept) = restored_server(&args.to, &args.backup, &pod, &claims);
            for volume in kept {
                let _ = writeln!(
                    progress,
                    "warning: volume {volume} still names the backed-up pod's claim: pgsnap did not back it up"
                );
            }
            format!(
                "# PostgreSQL on the claims restored from Backup {} (Restore {}), with the pod\n# spec of {pod_name}. It has that server's settings: if it archives WAL, give this\n# one another archive before applying.\n{}",
                args.backup,
                args.to,
                encode(output, &server)?
            )
        }
        (Output::Json, _) => encode(output, &ended)?,
        _ => format!(
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

/// A StatefulSet's name must leave room for its pods' `-0` and its revisions' hash label.
fn check_server_name(name: &str) -> Result<(), Error> {
    let label = !name.is_empty()
        && name.len() <= 52
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    match label {
        true => Ok(()),
        false => Err(Error::Refused(format!(
            "--to {name:?}: a StatefulSet's name, at most 52 lower-case letters, digits and '-', starting and ending with a letter or digit"
        ))),
    }
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
        (VolumeRole::Tablespace, Some(t)) => format!(
            "tablespace-{}",
            t.to_lowercase()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
        ),
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

/// A StatefulSet `name` of one replica running `source`'s spec on the restored `claims`
/// (`<volume>-<name>-0`, which its claim templates adopt), and the names of the source's
/// other claim volumes, which it keeps as they are.
///
/// It selects a label of its own, never the source's: the source's Services must not send
/// it their clients. What only the source's node, or admission, may set is left out.
fn restored_server(
    name: &str,
    backup: &str,
    source: &Pod,
    claims: &[PersistentVolumeClaim],
) -> (StatefulSet, Vec<String>) {
    let suffix = format!("-{name}-0");
    let templates: Vec<PersistentVolumeClaim> = claims
        .iter()
        .map(|c| {
            let claim_name = c.name_any();
            let spec = c.spec.clone().unwrap_or_default();
            PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(
                        claim_name
                            .strip_suffix(&suffix)
                            .unwrap_or(&claim_name)
                            .to_string(),
                    ),
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
    let templated = |volume: &str| templates.iter().any(|t| t.name_any() == volume);
    let mut spec = source.spec.clone().unwrap_or_default();
    // The API server's own: its ServiceAccount token volume comes back by itself.
    let injected = |volume: &str| volume.starts_with("kube-api-access-");
    let volumes = spec.volumes.take().unwrap_or_default();
    let kept: Vec<String> = volumes
        .iter()
        .filter(|v| v.persistent_volume_claim.is_some() && !templated(&v.name))
        .map(|v| v.name.clone())
        .collect();
    let volumes: Vec<_> = volumes
        .into_iter()
        .filter(|v| !templated(&v.name) && !injected(&v.name))
        .collect();
    let unmount = |containers: &mut Vec<Container>| {
        for c in containers {
            if let Some(mounts) = &mut c.volume_mounts {
                mounts.retain(|m| !injected(&m.name));
            }
        }
    };
    unmount(&mut spec.containers);
    if let Some(init) = &mut spec.init_containers {
        unmount(init);
    }
    // Admission's defaults come back by themselves; the node and the source's own DNS name
    // are the source's.
    let default_toleration = |t: &k8s_openapi::api::core::v1::Toleration| {
        matches!(
            t.key.as_deref(),
            Some("node.kubernetes.io/not-ready" | "node.kubernetes.io/unreachable")
        ) && t.toleration_seconds == Some(300)
    };
    if let Some(tolerations) = &mut spec.tolerations {
        tolerations.retain(|t| !default_toleration(t));
    }
    let spec = PodSpec {
        volumes: (!volumes.is_empty()).then_some(volumes),
        restart_policy: Some("Always".into()),
        node_name: None,
        hostname: None,
        subdomain: None,
        priority: None,
        preemption_policy: None,
        ephemeral_containers: None,
        service_account: None,
        tolerations: spec.tolerations.filter(|t| !t.is_empty()),
        ..spec
    };
    let labels = BTreeMap::from([(SERVER_LABEL.to_string(), name.to_string())]);
    let server = StatefulSet {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: source.namespace(),
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
                    ..Default::default()
                }),
                spec: Some(spec),
            },
            volume_claim_templates: Some(templates),
            ..Default::default()
        }),
        status: None,
    };
    (server, kept)
}

#[cfg(test)]
mod tests {
    use super::super::golden;
    use super::*;

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
        }
    }

    #[test]
    fn claims_take_the_pods_volume_names_or_their_roles() {
        let restore =
            restore_of("shop", &backup(), Some(&source_pod()), &args("orders-r")).unwrap();
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
                (
                    VolumeRole::Tablespace,
                    "tablespace-fast-ts-orders-r-0",
                    Some("fast")
                ),
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
        let claim = |name: &str, size: &str| -> PersistentVolumeClaim {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "uid": "u", "resourceVersion": "1"},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                         "resources": {"requests": {"storage": size}},
                         "dataSource": {"kind": "VolumeSnapshot", "name": "x", "apiGroup": "snapshot.storage.k8s.io"},
                         "volumeName": "pv-1"},
                "status": {"phase": "Bound"},
            }))
            .unwrap()
        };
        let (server, kept) = restored_server(
            "orders-r",
            "orders-1",
            &source_pod(),
            &[
                claim("data-orders-r-0", "1Gi"),
                claim("wal-orders-r-0", "512Mi"),
            ],
        );
        assert_eq!(kept, ["archive"]);
        golden(
            "restore-statefulset.yaml",
            &serde_yaml::to_string(&server).unwrap(),
        );
    }
}
