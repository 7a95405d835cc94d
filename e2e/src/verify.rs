//! Proof that a backup restores, in the test cluster: the proof's rows (`proof`) written
//! throughout the backup, and a restore of its snapshots to read them back from.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::api::PostParams;
use pgsnap::api::Backup;
use pgsnap::api::backup::VolumeRole;
use pgsnap::label_store::{BACKUP_LABEL_KEY, TABLESPACE_MAP_KEY, WalRecord, annotations};
use pgsnap::postgres::Lsn;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;

use crate::cluster::{Cluster, cluster_dir};
use crate::operator::pgsnap_binary;
use crate::postgres::{
    ARCHIVE_MOUNT, DATA_MOUNT, PORT, POSTGRES_UID, PostgresPod, TABLESPACE_MOUNT, WAL_MOUNT,
};
use crate::prepare::{RestorePrepare, label_dir};
use crate::proof;

/// Writes numbered rows (`proof::mark`) one transaction at a time until finished.
pub struct Writer {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<(i64, Lsn)>>,
}

impl Writer {
    pub async fn start(db: &PostgresPod) -> Writer {
        let client = db.connect().await;
        proof::create_marks(&client)
            .await
            .expect("CREATE TABLE marks");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut written = Vec::new();
            let mut i = 0i64;
            while !flag.load(Ordering::Relaxed) {
                i += 1;
                let Ok(lsn) = proof::mark(&client, i).await else {
                    break;
                };
                written.push((i, lsn));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            written
        });
        Writer { stop, task }
    }

    /// Stops writing; returns (row, WAL position after its commit).
    pub async fn finish(self) -> Vec<(i64, Lsn)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("writer task")
    }
}

/// A WAL position as a Backup's status reports it (`startLSN`, `stopLSN`).
pub fn status_lsn(field: Option<&str>) -> Lsn {
    let text = field.expect("the Backup's status has no LSN");
    text.parse()
        .unwrap_or_else(|e| panic!("the Backup's status LSN {text:?}: {e}"))
}

/// How the restore is prepared, so a negative control can leave something out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prepare {
    /// By restore-prepare, with the WAL kept with the backup when it has its WAL snapshot
    /// (and no archive at all), else from the archive.
    Correct,
    /// The same, then backup_label removed: PostgreSQL then silently does plain crash
    /// recovery.
    WithoutLabel,
}

/// Restores `backup` into new PVCs (from its snapshots), prepares them with the product's
/// restore-prepare and the label ConfigMap (WAL from the backup's WAL snapshot, or else the
/// source's archive; recovery target "immediate": the end of the backup), starts PostgreSQL
/// on them and returns the rows it holds, or why it could not start.
pub async fn restore(
    cluster: &Cluster,
    source: &PostgresPod,
    backup: &Backup,
    how: Prepare,
) -> Result<BTreeSet<i64>, String> {
    let status = backup.status.clone().ok_or("backup has no status")?;
    let cm_name = status
        .label_config_map
        .clone()
        .ok_or("backup has no label ConfigMap")?;
    let cm = cluster
        .api::<ConfigMap>()
        .get(&cm_name)
        .await
        .map_err(|e| format!("label ConfigMap: {e}"))?;
    let data = cm.data.clone().unwrap_or_default();
    let suffix = match how {
        Prepare::Correct => "r",
        Prepare::WithoutLabel => "nolabel",
    };
    // Named after the backup: a test may restore several backups of one server.
    let name = format!("{}-{suffix}", backup.name_any());
    let wal: Option<WalRecord> = cm
        .annotations()
        .get(annotations::WAL)
        .map(|w| serde_json::from_str(w))
        .transpose()
        .map_err(|e| format!("the label's {}: {e}", annotations::WAL))?;
    // A backup that keeps its WAL restores without the archive: the restored server has none.
    let (mut mounts, mut volumes) = match wal {
        Some(_) => (vec![], vec![]),
        None => (
            vec![json!({"name": "archive", "mountPath": ARCHIVE_MOUNT})],
            vec![
                json!({"name": "archive", "persistentVolumeClaim": {"claimName": source.claim("archive")}}),
            ],
        ),
    };
    let mut pgdata = None;
    let mut wal_args = Vec::new();
    for snap in &status.snapshots {
        let claim = format!("{}-{:?}-{suffix}", backup.name_any(), snap.role).to_lowercase();
        let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": claim},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
                "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": snap.name},
            }
        }))
        .map_err(|e| e.to_string())?;
        cluster
            .api::<PersistentVolumeClaim>()
            .create(&PostParams::default(), &pvc)
            .await
            .map_err(|e| format!("PVC {claim}: {e}"))?;
        let dir = cluster.pvc_host_dir(&claim).await;
        let mount = match snap.role {
            VolumeRole::Data => {
                pgdata = Some(dir.join(&snap.path_in_volume));
                DATA_MOUNT
            }
            VolumeRole::Wal => WAL_MOUNT,
            VolumeRole::Tablespace => TABLESPACE_MOUNT,
            // Read by restore-prepare only, as a Restore's Job does; the server never has it.
            VolumeRole::BackupWal => {
                let wal = wal
                    .as_ref()
                    .ok_or("a WAL snapshot, but no WAL in the label")?;
                let from = dir.join(&wal.path_in_volume).display().to_string();
                wal_args = pgsnap::restore::plan::wal_flags(wal, from);
                continue;
            }
        };
        mounts.push(json!({"name": claim, "mountPath": mount}));
        volumes.push(json!({"name": claim, "persistentVolumeClaim": {"claimName": claim}}));
    }
    let pgdata = pgdata.ok_or("no data snapshot")?;
    let annotation = |key: &str| {
        cm.annotations()
            .get(key)
            .cloned()
            .ok_or(format!("no {key} on the label ConfigMap"))
    };
    let prepare = RestorePrepare {
        pgsnap: pgsnap_binary(),
        labels: label_dir(
            &cluster_dir().join("labels").join(&cluster.namespace),
            &name,
            data.get(BACKUP_LABEL_KEY)
                .ok_or("no backup_label in the ConfigMap")?,
            data.get(TABLESPACE_MAP_KEY)
                .map(String::as_str)
                .unwrap_or_default(),
        ),
        backup_label_sha256: annotation(annotations::BACKUP_LABEL_SHA256)?,
        tablespace_map_sha256: annotation(annotations::TABLESPACE_MAP_SHA256)?,
        system_identifier: annotation(annotations::SYSTEM_IDENTIFIER)?
            .parse()
            .map_err(|e| format!("system identifier: {e}"))?,
        stop_lsn: annotation(annotations::STOP_LSN)?,
    };
    // Paths as the restored server's pod sees them: the volumes are where they were.
    let extra = match wal_args.is_empty() {
        true => vec![
            "--restore-command".to_string(),
            format!("cp {ARCHIVE_MOUNT}/%f %p"),
        ],
        false => wal_args,
    };
    let run = prepare.run(&pgdata, &extra);
    if run.code != 0 {
        return Err(format!("restore-prepare:\n{}{}", run.stdout, run.stderr));
    }
    if how == Prepare::WithoutLabel {
        std::fs::remove_file(pgdata.join("backup_label")).map_err(|e| e.to_string())?;
    }
    start_and_read(cluster, source, &name, mounts, volumes, &pgdata).await
}

async fn start_and_read(
    cluster: &Cluster,
    source: &PostgresPod,
    name: &str,
    mounts: Vec<serde_json::Value>,
    volumes: Vec<serde_json::Value>,
    pgdata: &Path,
) -> Result<BTreeSet<i64>, String> {
    let pgdata = format!(
        "{DATA_MOUNT}/{}",
        pgdata
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("pgdata")
    );
    let pod = restored_pod(source, name, &pgdata, mounts, volumes)?;
    let (client, _) = serve_restored(cluster, source, &pod).await?;
    proof::restored_marks(&client)
        .await
        .map_err(|e| format!("reading marks: {e}"))
}

/// A one-shot pod of `source`'s image serving the restored claims: `mounts` and `volumes`
/// as the pod spec takes them, PGDATA at `pgdata`, archiving nothing.
pub fn restored_pod(
    source: &PostgresPod,
    name: &str,
    pgdata: &str,
    mounts: Vec<serde_json::Value>,
    volumes: Vec<serde_json::Value>,
) -> Result<Pod, String> {
    // It must not archive into the backed-up server's archive.
    let args = ["-c", "archive_mode=off"];
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "securityContext": {"runAsUser": POSTGRES_UID, "runAsGroup": POSTGRES_UID, "fsGroup": POSTGRES_UID},
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "postgres",
                "image": format!("postgres:{}", source.major),
                "args": args,
                "env": [
                    {"name": "POSTGRES_PASSWORD", "value": source.password},
                    {"name": "PGDATA", "value": pgdata},
                ],
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        }
    }))
    .map_err(|e| e.to_string())
}

/// Creates the pod of a restored server (with `source`'s superuser) and waits until it
/// accepts sessions out of recovery; the session, and how long it took.
pub async fn serve_restored(
    cluster: &Cluster,
    source: &PostgresPod,
    pod: &Pod,
) -> Result<(tokio_postgres::Client, Duration), String> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let t0 = std::time::Instant::now();
    cluster
        .api::<Pod>()
        .create(&PostParams::default(), pod)
        .await
        .map_err(|e| format!("pod {name}: {e}"))?;
    let client = wait_serving(cluster, source, &name).await?;
    Ok((client, t0.elapsed()))
}

/// Waits until the pod `name`, a server restored from `source`, accepts `source`'s superuser
/// out of recovery; a session.
pub async fn wait_serving(
    cluster: &Cluster,
    source: &PostgresPod,
    name: &str,
) -> Result<tokio_postgres::Client, String> {
    let t0 = std::time::Instant::now();
    let mut last = String::new();
    // Recovery ends with a promotion; until then the server refuses or is in recovery.
    while t0.elapsed() < Duration::from_secs(90) {
        let status = cluster
            .api::<Pod>()
            .get(name)
            .await
            .ok()
            .and_then(|p| p.status)
            .unwrap_or_default();
        let phase = status.phase.unwrap_or_default();
        if phase == "Failed" || phase == "Succeeded" {
            return Err(format!(
                "the restored server exited ({phase}):\n{}",
                cluster.pod_logs(name).await
            ));
        }
        let conninfo = format!(
            "host={} port={PORT} user={} password={} dbname=postgres",
            status.pod_ip.as_deref().unwrap_or("0.0.0.0"),
            source.user,
            source.password
        );
        match tokio_postgres::connect(&conninfo, NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                match client.query_one("SELECT pg_is_in_recovery()", &[]).await {
                    Ok(row) if !row.get::<_, bool>(0) => return Ok(client),
                    Ok(_) => last = "still in recovery".into(),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "recovery did not end in 90 s ({last}):\n{}",
        cluster.pod_logs(name).await
    ))
}
