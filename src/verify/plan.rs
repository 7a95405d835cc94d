//! What a Verification creates and decides, from what it read: pure, so unit tests call it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, EnvVar, PersistentVolumeClaimVolumeSource, Pod,
    PodSecurityContext, PodSpec, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::ResourceExt;
use kube::api::ObjectMeta;

use super::server::Report;
use crate::api::backup::{Backup, VolumeRole};
use crate::api::restore::{Restore, RestoredClaim};
use crate::api::verification::{Verification, VerificationPhase, VerificationSettings};
use crate::controller::{Failure, bounded_name};

/// The temporary server's `pg_hba.conf`: every role trusted over its Unix socket, the only
/// way in (it listens on no address), in a directory only the pod's two containers mount.
pub const HBA: &str = "local all all trust\n";
const HBA_KEY: &str = "pg_hba.conf";
const HBA_MOUNT: &str = "/pgsnap/verify";
const SOCKET_DIR: &str = "/pgsnap/run";

/// What the temporary server is told last, over anything from the backed-up server: no
/// address but the pod's socket, the Verification's `pg_hba.conf`, and nothing that reaches
/// out of the pod, archiving, a subscription's apply workers, or waits on a standby that
/// never comes.
fn forced() -> Vec<String> {
    vec![
        "listen_addresses=".into(),
        format!("unix_socket_directories={SOCKET_DIR}"),
        "port=5432".into(),
        format!("hba_file={HBA_MOUNT}/{HBA_KEY}"),
        "archive_mode=off".into(),
        "max_logical_replication_workers=0".into(),
        "synchronous_standby_names=".into(),
        "ssl=off".into(),
    ]
}

/// Settings of the backed-up server the temporary one never takes: recovery is the
/// Restore's (in postgresql.auto.conf, which the command line would override), and
/// replication and archiving are the source's business.
fn refused(setting: &str) -> bool {
    let name = setting
        .split('=')
        .next()
        .unwrap_or_default()
        .trim()
        .to_lowercase();
    name.starts_with("recovery_")
        || name.starts_with("archive_")
        || name.starts_with("primary_")
        || matches!(
            name.as_str(),
            "restore_command" | "hot_standby" | "promote_trigger_file" | "config_file"
        )
        || forced()
            .iter()
            .any(|f| f.split('=').next() == Some(name.as_str()))
}
/// The containers of the temporary pod.
pub const SERVER: &str = "postgres";
pub const CHECKER: &str = "verify";

pub fn restore_name(verification: &str) -> String {
    bounded_name(verification, "restore", 253)
}

pub fn pod_name(verification: &str) -> String {
    bounded_name(verification, "server", 63)
}

pub fn hba_name(verification: &str) -> String {
    bounded_name(verification, "hba", 253)
}

/// Who goes first among a namespace's unfinished Verifications: the oldest (then by name),
/// so each waits its turn and none starves.
pub fn first_in_line(me: &Verification, all: &[Verification]) -> Option<String> {
    let key = |v: &Verification| (v.creation_timestamp().map(|t| t.0), v.name_any());
    all.iter()
        .filter(|v| v.namespace() == me.namespace())
        .filter(|v| {
            !v.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(VerificationPhase::is_terminal)
        })
        // One already running goes on, whatever its age (two created in one second).
        .min_by_key(|v| {
            let running = v.status.as_ref().and_then(|s| s.phase).is_some_and(|p| {
                matches!(
                    p,
                    VerificationPhase::Restoring | VerificationPhase::Checking
                )
            });
            (!running, key(v))
        })
        .map(|v| v.name_any())
        .filter(|first| *first != me.name_any())
}

/// Whether a failure is a verdict on the backup (its data, its WAL, its label, what the
/// user asked of it) rather than on the verification's own run.
pub fn is_verdict(reason: &str) -> bool {
    matches!(
        reason,
        "CorruptIndex"
            | "CorruptTable"
            | "RecoveryShort"
            | "NotPromoted"
            | "WrongServer"
            | "SqlCheckFailed"
            | "ServerFailed"
            | "RestoreFailed"
    )
}

/// Whether the verification outlived its timeout, counted from when it left the queue.
pub fn timed_out(started: Option<&Time>, timeout: std::time::Duration, now: &Time) -> bool {
    started.is_some_and(|s| now.0.duration_since(s.0).unsigned_abs() > timeout)
}

/// What is left of the timeout, once its turn came.
pub fn time_left(
    started: Option<&Time>,
    timeout: std::time::Duration,
    now: &Time,
) -> Option<std::time::Duration> {
    started.map(|s| timeout.saturating_sub(now.0.duration_since(s.0).unsigned_abs()))
}

/// The Restore of the backup into claims that go with it (and it with the Verification).
pub fn restore(
    verification: &Verification,
    backup: &Backup,
    owner: OwnerReference,
    labels: BTreeMap<String, String>,
) -> Result<Restore, serde_json::Error> {
    let name = verification.name_any();
    let snapshots = backup.status.iter().flat_map(|s| s.snapshots.iter());
    let claims: Vec<serde_json::Value> = snapshots
        .filter(|s| s.role != VolumeRole::BackupWal)
        .enumerate()
        .map(|(i, s)| {
            let role = format!("{:?}", s.role).to_lowercase();
            let mut claim = serde_json::json!({
                "role": s.role,
                "name": bounded_name(&name, &format!("{role}-{i}"), 253),
            });
            if let Some(t) = &s.tablespace {
                claim["tablespace"] = t.clone().into();
            }
            if let Some(class) = &verification.spec.settings.storage_class_name {
                claim["storageClassName"] = class.clone().into();
            }
            claim
        })
        .collect();
    let mut recovery = serde_json::json!({"target": {}, "promote": true});
    if let Some(command) = &verification.spec.settings.restore_command {
        recovery["restoreCommand"] = command.clone().into();
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "pgsnap.io/v1alpha1", "kind": "Restore",
        "metadata": {
            "name": restore_name(&name), "namespace": verification.namespace(),
            "labels": labels, "ownerReferences": [owner],
        },
        "spec": {
            "backupName": backup.name_any(), "claims": claims, "recovery": recovery,
            "claimDeletionPolicy": "Delete",
        },
    }))
}

pub fn hba(
    name: &str,
    namespace: &str,
    owner: OwnerReference,
    labels: BTreeMap<String, String>,
) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(hba_name(name)),
            namespace: Some(namespace.into()),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(HBA_KEY.to_string(), HBA.to_string())])),
        ..Default::default()
    }
}

/// What the temporary server takes from the backed-up one, so it starts on the restored
/// data as that server did: its image, its `-c` settings (`shared_preload_libraries`, a
/// `config_file`), its environment, its user and the pod's own volumes it mounts (a
/// ConfigMap of settings), but none of its storage.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceServer {
    pub image: String,
    pub settings: Vec<String>,
    pub env: Vec<EnvVar>,
    pub pod_security: Option<PodSecurityContext>,
    pub security: Option<SecurityContext>,
    pub volumes: Vec<Volume>,
    pub mounts: Vec<VolumeMount>,
    pub placement: Placement,
}

/// Where the backed-up pod could run and pull its image from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Placement {
    pub image_pull_secrets: Option<Vec<k8s_openapi::api::core::v1::LocalObjectReference>>,
    pub node_selector: Option<BTreeMap<String, String>>,
    pub affinity: Option<k8s_openapi::api::core::v1::Affinity>,
    pub tolerations: Option<Vec<k8s_openapi::api::core::v1::Toleration>>,
    pub service_account_name: Option<String>,
}

/// The server's container (the one mounting the data claim) of the backed-up pod.
pub fn source_server(pod: &Pod, data_claim: &str) -> Result<SourceServer, Failure> {
    let spec = pod.spec.clone().unwrap_or_default();
    let volumes = spec.volumes.clone().unwrap_or_default();
    let data_volume = volumes
        .iter()
        .find(|v| {
            v.persistent_volume_claim
                .as_ref()
                .is_some_and(|c| c.claim_name == data_claim)
        })
        .map(|v| v.name.clone());
    let container = spec
        .containers
        .iter()
        .find(|c| {
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| Some(&m.name) == data_volume.as_ref())
        })
        .ok_or_else(|| {
            Failure::new(
                "SourcePodChanged",
                format!(
                    "no container of pod {} mounts claim {data_claim}, the backup's data directory: the verification takes its image and settings from that container",
                    pod.name_any()
                ),
            )
        })?;
    let image = container.image.clone().unwrap_or_default();
    let own = |v: &Volume| {
        v.config_map.is_some()
            || v.secret.is_some()
            || v.downward_api.is_some()
            || v.empty_dir.is_some()
            || v.projected.as_ref().is_some_and(|p| {
                !p.sources
                    .iter()
                    .flatten()
                    .any(|s| s.service_account_token.is_some())
            })
    };
    let mut kept_volumes = Vec::new();
    let mut mounts = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        if let Some(v) = volumes.iter().find(|v| v.name == m.name && own(v)) {
            if !kept_volumes.contains(v) {
                kept_volumes.push(v.clone());
            }
            mounts.push(m.clone());
        }
    }
    Ok(SourceServer {
        image,
        settings: settings(
            container
                .command
                .iter()
                .flatten()
                .chain(container.args.iter().flatten()),
        ),
        env: container.env.clone().unwrap_or_default(),
        pod_security: spec.security_context.clone(),
        security: container.security_context.clone(),
        volumes: kept_volumes,
        mounts,
        placement: Placement {
            image_pull_secrets: spec.image_pull_secrets.clone(),
            node_selector: spec.node_selector.clone(),
            affinity: spec.affinity.clone(),
            // Admission's defaults come back by themselves.
            tolerations: spec.tolerations.clone().map(|t| {
                t.into_iter()
                    .filter(|t| !crate::controller::added_by_admission(t))
                    .collect()
            }),
            service_account_name: spec.service_account_name.clone(),
        },
    })
}

/// The temporary server: the backed-up pod's (when it still exists), with the
/// Verification's image and parameters over it. Without the pod only an image makes one.
pub fn with_settings(
    pod: Option<&Pod>,
    data_claim: &str,
    settings: &VerificationSettings,
) -> Result<SourceServer, Failure> {
    let mut server = match (pod, &settings.image) {
        (Some(pod), _) => source_server(pod, data_claim)?,
        (None, Some(image)) => SourceServer {
            image: image.clone(),
            settings: Vec::new(),
            env: Vec::new(),
            pod_security: None,
            security: None,
            volumes: Vec::new(),
            mounts: Vec::new(),
            placement: Placement::default(),
        },
        (None, None) => {
            return Err(Failure::new(
                "SourcePodGone",
                "the temporary server runs the image and settings of the backed-up pod, which is gone: set the Verification's image",
            ));
        }
    };
    if let Some(image) = &settings.image {
        server.image = image.clone();
    }
    server
        .settings
        .extend(settings.parameters.iter().map(|(k, v)| format!("{k}={v}")));
    Ok(server)
}

/// The `-c name=value` (`-cname=value`, `--name=value`) settings of a server's command line,
/// after its `postgres` when it has one (a wrapper's own flags come before it), but none the
/// temporary server refuses.
pub fn settings<'a>(argv: impl Iterator<Item = &'a String>) -> Vec<String> {
    let argv: Vec<&String> = argv.collect();
    let start = argv
        .iter()
        .rposition(|a| *a == "postgres" || a.ends_with("/postgres"))
        .map_or(0, |i| i + 1);
    let mut out = Vec::new();
    let mut rest = argv[start..].iter().copied();
    while let Some(a) = rest.next() {
        let setting = if a == "-c" {
            rest.next().cloned()
        } else if let Some(s) = a.strip_prefix("-c") {
            Some(s.to_string())
        } else {
            a.strip_prefix("--").map(str::to_string)
        };
        out.extend(setting.filter(|s| s.contains('=') && !refused(s)));
    }
    out
}

/// Everything the temporary pod needs that the controller read.
pub struct ServerPod<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub owner: OwnerReference,
    pub labels: BTreeMap<String, String>,
    pub source: &'a SourceServer,
    pub claims: &'a [RestoredClaim],
    pub checker_image: &'a str,
    pub checker_args: Vec<String>,
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
}

/// The temporary pod: the backed-up server's image on the restored claims (each where the
/// restore prepared it for), listening on the loopback only, not archiving, and the checker
/// beside it.
pub fn server_pod(p: ServerPod) -> Result<Pod, Failure> {
    let data = p
        .claims
        .iter()
        .find(|c| c.role == VolumeRole::Data)
        .ok_or_else(|| Failure::new("RestoreFailed", "the Restore restored no Data claim"))?;
    let pgdata = match data.path_in_volume.as_str() {
        "" => data.mount_path.clone(),
        inner => format!("{}/{inner}", data.mount_path.trim_end_matches('/')),
    };
    let mut volumes = p.source.volumes.clone();
    let mut mounts = p.source.mounts.clone();
    for (i, c) in p.claims.iter().enumerate() {
        let name = format!("restored-{i}");
        volumes.push(Volume {
            name: name.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: c.name.clone(),
                read_only: None,
            }),
            ..Default::default()
        });
        mounts.retain(|m| m.mount_path != c.mount_path);
        mounts.push(VolumeMount {
            name,
            mount_path: c.mount_path.clone(),
            ..Default::default()
        });
    }
    volumes.push(Volume {
        name: "pgsnap-run".into(),
        empty_dir: Some(Default::default()),
        ..Default::default()
    });
    let socket = VolumeMount {
        name: "pgsnap-run".into(),
        mount_path: SOCKET_DIR.into(),
        ..Default::default()
    };
    mounts.push(socket.clone());
    volumes.push(Volume {
        name: "pgsnap-hba".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: hba_name(p.name),
            ..Default::default()
        }),
        ..Default::default()
    });
    mounts.push(VolumeMount {
        name: "pgsnap-hba".into(),
        mount_path: HBA_MOUNT.into(),
        read_only: Some(true),
        ..Default::default()
    });
    // Through the image's entrypoint, as the backed-up server started: the official images'
    // fixes the data directory's mode (an fsGroup makes it group-writable, which PostgreSQL
    // refuses) and then runs `postgres` with these arguments as the image's user.
    let mut args = vec!["postgres".to_string(), "-D".to_string(), pgdata.clone()];
    // The source's settings first: the verification's own come after and win.
    for s in p.source.settings.iter().cloned().chain(forced()) {
        args.extend(["-c".to_string(), s]);
    }
    let mut env = p.source.env.clone();
    env.retain(|e| e.name != "PGDATA");
    env.push(EnvVar {
        name: "PGDATA".into(),
        value: Some(pgdata),
        ..Default::default()
    });
    let server = Container {
        name: SERVER.into(),
        image: Some(p.source.image.clone()),
        args: Some(args),
        env: Some(env),
        volume_mounts: Some(mounts),
        security_context: p.source.security.clone(),
        resources: p.resources,
        // A server that does not start says why in its log; this brings the log's tail.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };
    let mut checker_args = p.checker_args;
    checker_args.push(format!("--socket-dir={SOCKET_DIR}"));
    let checker = Container {
        name: CHECKER.into(),
        image: Some(p.checker_image.to_string()),
        args: Some(checker_args),
        volume_mounts: Some(vec![socket]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(p.name)),
            namespace: Some(p.namespace.into()),
            labels: Some(p.labels),
            owner_references: Some(vec![p.owner]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            security_context: p.source.pod_security.clone(),
            // Where and how the backed-up server could run, this one can.
            image_pull_secrets: p.source.placement.image_pull_secrets.clone(),
            node_selector: p.source.placement.node_selector.clone(),
            affinity: p.source.placement.affinity.clone(),
            tolerations: p.source.placement.tolerations.clone(),
            service_account_name: p.source.placement.service_account_name.clone(),
            containers: vec![server, checker],
            volumes: Some(volumes),
            // Nothing in it talks to the API server.
            automount_service_account_token: Some(false),
            termination_grace_period_seconds: Some(10),
            ..Default::default()
        }),
        status: None,
    })
}

/// What the temporary pod says.
#[derive(Debug, PartialEq)]
pub enum PodOutcome {
    Running,
    /// The checker finished and reported.
    Reported(Report),
    /// The server stopped before the checker finished: why, from its log.
    ServerStopped(String),
    /// The checker ended without a report it could write.
    CheckerFailed(String),
}

pub fn pod_outcome(pod: &Pod) -> PodOutcome {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    let terminated = |name: &str| {
        statuses
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.clone())
    };
    if let Some(t) = terminated(CHECKER) {
        let message = t.message.clone().unwrap_or_default();
        return match serde_json::from_str::<Report>(&message) {
            Ok(report) => PodOutcome::Reported(report),
            Err(_) => PodOutcome::CheckerFailed(format!(
                "the checker exited {} without a report: {}",
                t.exit_code,
                message.trim()
            )),
        };
    }
    let status = pod.status.as_ref();
    if status.and_then(|s| s.phase.as_deref()) == Some("Failed") {
        let why = status
            .and_then(|s| s.message.clone().or(s.reason.clone()))
            .unwrap_or_default();
        return PodOutcome::ServerStopped(format!("the pod failed: {why}"));
    }
    if let Some(t) = terminated(SERVER) {
        return PodOutcome::ServerStopped(format!(
            "PostgreSQL exited {} on the restored data: {}",
            t.exit_code,
            t.message.unwrap_or_default().trim()
        ));
    }
    PodOutcome::Running
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verification(name: &str, created: &str, phase: Option<&str>) -> Verification {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "pgsnap.io/v1alpha1", "kind": "Verification",
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "creationTimestamp": created},
            "spec": {"backupName": "b"},
            "status": phase.map(|p| serde_json::json!({"phase": p})),
        }))
        .unwrap()
    }

    #[test]
    fn the_oldest_unfinished_verification_goes_first() {
        let old = verification("old", "2026-12-03T10:00:00Z", Some("Checking"));
        let done = verification("done", "2026-12-03T09:00:00Z", Some("Passed"));
        let young = verification("young", "2026-12-03T11:00:00Z", None);
        let all = [old.clone(), done.clone(), young.clone()];
        assert_eq!(first_in_line(&young, &all).as_deref(), Some("old"));
        assert_eq!(first_in_line(&old, &all), None);
        assert_eq!(first_in_line(&young, &[done, young.clone()]), None);
        // One running goes on before an older one still queued.
        let older = verification("older", "2026-12-03T09:30:00Z", None);
        let queue = [older.clone(), old.clone()];
        assert_eq!(first_in_line(&older, &queue).as_deref(), Some("old"));
    }

    #[test]
    fn the_timeout_counts_from_the_turn() {
        let t = |s: &str| Time(s.parse().unwrap());
        let started = t("2026-12-03T10:00:00Z");
        let timeout = std::time::Duration::from_secs(60);
        assert!(!timed_out(None, timeout, &t("2026-12-04T10:00:00Z")));
        assert!(!timed_out(
            Some(&started),
            timeout,
            &t("2026-12-03T10:01:00Z")
        ));
        assert!(timed_out(
            Some(&started),
            timeout,
            &t("2026-12-03T10:01:01Z")
        ));
    }

    #[test]
    fn settings_come_from_every_form_of_the_command_line() {
        let argv: Vec<String> = [
            "dumb-init",
            "--rewrite=15:2",
            "postgres",
            "-c",
            "archive_command=cp %p /x",
            "-c",
            "primary_conninfo=host=db",
            "-c",
            "listen_addresses=*",
            "-c",
            "Recovery_Target_Time=now",
            "-c",
            "shared_preload_libraries=pg_stat_statements",
            "-cwork_mem=8MB",
            "--max_connections=50",
            "-D",
            "/data",
            "-c",
            "nothing",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            settings(argv.iter()),
            [
                "shared_preload_libraries=pg_stat_statements",
                "work_mem=8MB",
                "max_connections=50"
            ]
        );
    }

    fn source_pod() -> Pod {
        serde_yaml::from_str(include_str!("../../tests/golden/restore-source-pod.yaml")).unwrap()
    }

    #[test]
    fn the_temporary_server_takes_the_source_s_image_and_settings_but_none_of_its_storage() {
        let source = source_server(&source_pod(), "data-orders-db-0").unwrap();
        assert_eq!(source.image, "postgres:17");
        assert_eq!(
            source.settings,
            ["shared_preload_libraries=pg_stat_statements"]
        );
        let volumes: Vec<&str> = source.volumes.iter().map(|v| v.name.as_str()).collect();
        // The init ConfigMap; not the archive claim, the WAL claim or the token volume.
        assert_eq!(volumes, ["init"]);
        let err = source_server(&source_pod(), "another-claim").unwrap_err();
        assert_eq!(err.reason, "SourcePodChanged");

        let owner = OwnerReference {
            api_version: "pgsnap.io/v1alpha1".into(),
            kind: "Verification".into(),
            name: "v".into(),
            uid: "uid-v".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let claim = |role, name: &str, at: &str, inner: &str| RestoredClaim {
            name: name.into(),
            role,
            tablespace: None,
            volume_snapshot: "s".into(),
            mount_path: at.into(),
            path_in_volume: inner.into(),
            bound: true,
        };
        let claims = [
            claim(
                VolumeRole::Data,
                "v-data-0",
                "/var/lib/postgresql/data",
                "pgdata",
            ),
            claim(VolumeRole::Wal, "v-wal-1", "/var/lib/postgresql/wal", ""),
        ];
        let pod = server_pod(ServerPod {
            name: "v",
            namespace: "shop",
            owner,
            labels: BTreeMap::from([("pgsnap.io/verification".into(), "v".into())]),
            source: &source,
            claims: &claims,
            checker_image: "pgsnap:dev",
            checker_args: vec!["verify-server".into()],
            resources: None,
        })
        .unwrap();
        crate::fixtures::golden(
            "verify-server-pod.yaml",
            &serde_yaml::to_string(&pod).unwrap(),
        );
    }

    #[test]
    fn the_verification_s_image_and_parameters_come_over_the_source_s() {
        let mut settings = VerificationSettings::default();
        settings
            .parameters
            .insert("shared_buffers".into(), "32MB".into());
        let server = with_settings(Some(&source_pod()), "data-orders-db-0", &settings).unwrap();
        assert_eq!(
            server.settings,
            [
                "shared_preload_libraries=pg_stat_statements",
                "shared_buffers=32MB"
            ]
        );
        assert_eq!(
            with_settings(None, "data-orders-db-0", &settings)
                .unwrap_err()
                .reason,
            "SourcePodGone"
        );
        settings.image = Some("postgres:17.2".into());
        let server = with_settings(None, "data-orders-db-0", &settings).unwrap();
        assert_eq!(
            (server.image.as_str(), server.env.len()),
            ("postgres:17.2", 0)
        );
    }

    #[test]
    fn the_pod_says_the_checker_s_report_or_why_the_server_stopped() {
        let pod = |statuses: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({"status": {"containerStatuses": statuses}}))
                .unwrap()
        };
        let status = |name: &str, terminated: Option<serde_json::Value>| {
            serde_json::json!({
                "name": name, "ready": false, "restartCount": 0, "image": "i", "imageID": "",
                "state": match terminated {
                    Some(t) => serde_json::json!({"terminated": t}),
                    None => serde_json::json!({"running": {}}),
                },
            })
        };
        let running = pod(serde_json::json!([
            status(SERVER, None),
            status(CHECKER, None)
        ]));
        assert_eq!(pod_outcome(&running), PodOutcome::Running);
        let report = Report {
            recovery_seconds: Some(1.0),
            checks_seconds: Some(2.0),
            checked: None,
            failure: None,
        };
        let reported = pod(serde_json::json!([
            status(SERVER, None),
            status(
                CHECKER,
                Some(
                    serde_json::json!({"exitCode": 0, "message": serde_json::to_string(&report).unwrap()})
                )
            ),
        ]));
        assert_eq!(pod_outcome(&reported), PodOutcome::Reported(report));
        let crashed = pod(serde_json::json!([
            status(
                SERVER,
                Some(
                    serde_json::json!({"exitCode": 1, "message": "FATAL:  could not locate a valid checkpoint record\n"})
                )
            ),
            status(CHECKER, None),
        ]));
        assert_eq!(
            pod_outcome(&crashed),
            PodOutcome::ServerStopped(
                "PostgreSQL exited 1 on the restored data: FATAL:  could not locate a valid checkpoint record".into()
            )
        );
    }
}
