//! PostgreSQL in the test cluster, the way users run it: a Pod of the official `postgres`
//! image (as the node agent emulates it) on PVCs, optionally with a WAL volume, a tablespace
//! volume, a WAL archive, or as a streaming standby of another one.
//!
//! ```text
//! let cluster = Cluster::from_env().await;
//! let db = postgres_pod(16).archive_volume().wal_volume(true).create(&cluster).await;
//! db.sql("CREATE TABLE t (x int)").await;
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::PostParams;
use serde_json::json;
use tokio_postgres::{NoTls, SimpleQueryMessage};

use crate::cluster::Cluster;

/// Where things live inside the pod (the official image's layout, PGDATA in a subdirectory
/// of its volume as is usual in Kubernetes).
pub const DATA_MOUNT: &str = "/var/lib/postgresql/data";
pub const PGDATA: &str = "/var/lib/postgresql/data/pgdata";
pub const WAL_MOUNT: &str = "/var/lib/postgresql/wal";
pub const TABLESPACE_MOUNT: &str = "/var/lib/postgresql/tablespace";
pub const ARCHIVE_MOUNT: &str = "/var/lib/postgresql/archive";
/// The tablespace the builder creates on the tablespace volume.
pub const TABLESPACE: &str = "ts1";
/// The image's `postgres` user.
pub const POSTGRES_UID: u32 = 999;
/// The port every server listens on, as in the image: each pod has an address of its own.
pub const PORT: u16 = 5432;

/// Starts describing a PostgreSQL pod of one major version (10..18).
pub fn postgres_pod(major: u32) -> PostgresPodBuilder {
    PostgresPodBuilder {
        major,
        name: None,
        archive: Archive::Outside,
        wal_volume: false,
        tablespace_volume: false,
        standby_of: None,
        settings: BTreeMap::new(),
        storage_class: None,
        size: "1Gi",
    }
}

/// The StorageClass and VolumeSnapshotClass (e2e/manifests/storage.yaml) of copy-on-write
/// volumes and cuts.
pub const REFLINK_CLASS: &str = "csi-hostpath-reflink";

/// Where the server archives WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Archive {
    /// A directory outside every volume of the cluster, the way an object store is: backups
    /// have a WAL source, and nothing a test restores reads it.
    Outside,
    /// An archive PVC mounted in the pod, which restores read.
    Volume,
    /// `archive_mode=off`.
    Off,
}

pub struct PostgresPodBuilder {
    major: u32,
    name: Option<String>,
    archive: Archive,
    wal_volume: bool,
    tablespace_volume: bool,
    standby_of: Option<Primary>,
    settings: BTreeMap<String, String>,
    storage_class: Option<&'static str>,
    size: &'static str,
}

/// What a standby needs of its primary.
struct Primary {
    host: String,
    password: String,
    data_dir: PathBuf,
    tablespace_dir: Option<PathBuf>,
    major: u32,
}

impl PostgresPodBuilder {
    /// The pod's name (default `pg<major>`); PVCs are `<role>-<name>`.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.into());
        self
    }
    /// WAL archived to an archive volume (a PVC restores mount), instead of to a directory
    /// outside the cluster's volumes.
    pub fn archive_volume(mut self) -> Self {
        self.archive = Archive::Volume;
        self
    }
    /// No WAL archive at all (`archive_mode=off`), like most plain StatefulSets.
    pub fn no_archive(mut self) -> Self {
        self.archive = Archive::Off;
        self
    }
    /// pg_wal on a volume of its own (initdb --waldir).
    pub fn wal_volume(mut self, on: bool) -> Self {
        self.wal_volume = on;
        self
    }
    /// A tablespace (`ts1`) on a volume of its own.
    pub fn tablespace_volume(mut self, on: bool) -> Self {
        self.tablespace_volume = on;
        self
    }
    /// A streaming standby of `primary` (same major), from a base backup taken with the
    /// low-level backup API while the primary runs.
    pub fn standby_of(mut self, primary: &PostgresPod) -> Self {
        self.standby_of = Some(Primary {
            host: primary.host.clone(),
            password: primary.password.clone(),
            data_dir: primary.data_dir.clone(),
            tablespace_dir: primary.tablespace_dir.clone(),
            major: primary.major,
        });
        self.major = primary.major;
        self.tablespace_volume |= primary.tablespace_dir.is_some();
        self
    }
    /// Every PVC of the pod from this StorageClass (default: the cluster's default), of `size`
    /// (default 1Gi).
    pub fn storage(mut self, class: &'static str, size: &'static str) -> Self {
        self.storage_class = Some(class);
        self.size = size;
        self
    }
    /// A server setting, passed as `-c key=value` like users do with the image.
    pub fn setting(mut self, key: &str, value: &str) -> Self {
        self.settings.insert(key.into(), value.into());
        self
    }

    /// Creates the PVCs and the Pod, and waits until the server accepts connections.
    pub async fn create(self, cluster: &Cluster) -> PostgresPod {
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| format!("pg{}", self.major));
        // A standby has its primary's catalog, so its password too.
        let password = match &self.standby_of {
            Some(p) => p.password.clone(),
            None => format!("pw-{name}"),
        };
        let claim = |role: &str| format!("{role}-{name}");
        let mut claims = vec![(claim("data"), DATA_MOUNT)];
        if self.wal_volume {
            claims.push((claim("wal"), WAL_MOUNT));
        }
        if self.tablespace_volume {
            claims.push((claim("tablespace"), TABLESPACE_MOUNT));
        }
        if self.archive == Archive::Volume {
            claims.push((claim("archive"), ARCHIVE_MOUNT));
        }
        for (c, _) in &claims {
            create_pvc(cluster, c, self.storage_class, self.size).await;
        }
        let data_dir = cluster.pvc_host_dir(&claim("data")).await;
        let tablespace_dir = match self.tablespace_volume {
            true => Some(cluster.pvc_host_dir(&claim("tablespace")).await),
            false => None,
        };
        let archive_dir = match self.archive {
            Archive::Volume => Some(cluster.pvc_host_dir(&claim("archive")).await),
            Archive::Outside => Some(outside_archive(cluster, &name)),
            Archive::Off => None,
        };
        if let Some(primary) = &self.standby_of {
            base_backup(primary, &name, &data_dir, tablespace_dir.as_deref()).await;
        }

        let mut args: Vec<String> = Vec::new();
        let mut settings = self.settings.clone();
        // A standby archives only with `always`.
        let mode = match (&self.archive, &self.standby_of) {
            (Archive::Off, _) => "off",
            (_, Some(_)) => "always",
            (_, None) => "on",
        };
        settings
            .entry("archive_mode".into())
            .or_insert_with(|| mode.into());
        let archive_in = match self.archive {
            Archive::Volume => Some(PathBuf::from(ARCHIVE_MOUNT)),
            Archive::Outside => archive_dir.clone(),
            Archive::Off => None,
        };
        if let Some(dir) = archive_in {
            let dir = dir.display();
            settings
                .entry("archive_command".into())
                .or_insert_with(|| format!("test ! -f {dir}/%f && cp %p {dir}/%f"));
        }
        for (k, v) in &settings {
            args.extend(["-c".into(), format!("{k}={v}")]);
        }
        let mut env = vec![
            json!({"name": "POSTGRES_PASSWORD", "value": password}),
            json!({"name": "PGDATA", "value": PGDATA}),
        ];
        if self.wal_volume {
            env.push(
                json!({"name": "POSTGRES_INITDB_WALDIR", "value": format!("{WAL_MOUNT}/pg_wal")}),
            );
        }
        let mounts: Vec<_> = claims
            .iter()
            .map(|(c, m)| json!({"name": c, "mountPath": m}))
            .collect();
        let volumes: Vec<_> = claims
            .iter()
            .map(|(c, _)| json!({"name": c, "persistentVolumeClaim": {"claimName": c}}))
            .collect();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": name, "app.kubernetes.io/name": "postgresql"}},
            "spec": {
                "securityContext": {"runAsUser": POSTGRES_UID, "runAsGroup": POSTGRES_UID, "fsGroup": POSTGRES_UID},
                "terminationGracePeriodSeconds": 10,
                "containers": [{
                    "name": "postgres",
                    "image": format!("postgres:{}", self.major),
                    "args": args,
                    "env": env,
                    "ports": [{"name": "postgresql", "containerPort": PORT}],
                    "readinessProbe": {"tcpSocket": {"port": PORT}, "periodSeconds": 1, "failureThreshold": 1},
                    "volumeMounts": mounts,
                }],
                "volumes": volumes,
            }
        }))
        .unwrap_or_else(|e| panic!("building the pod: {e}"));
        cluster
            .api::<Pod>()
            .create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("creating pod {name}: {e}"));
        let mut db = PostgresPod {
            name: name.clone(),
            namespace: cluster.namespace.clone(),
            major: self.major,
            host: String::new(),
            port: PORT,
            user: "postgres".into(),
            password,
            data_dir,
            tablespace_dir,
            archive_dir,
        };
        db.wait_ready(cluster).await;
        if let (Some(dir), None) = (&db.tablespace_dir, &self.standby_of) {
            // CREATE TABLESPACE wants an existing, empty directory owned by the server's user.
            let host = dir.join("data");
            std::fs::create_dir_all(&host).unwrap_or_else(|e| panic!("{}: {e}", host.display()));
            let _ = std::os::unix::fs::lchown(&host, Some(POSTGRES_UID), Some(POSTGRES_UID));
            let location = format!("{TABLESPACE_MOUNT}/data");
            db.sql(&format!(
                "CREATE TABLESPACE {TABLESPACE} LOCATION '{location}'"
            ))
            .await;
        }
        db
    }
}

/// A fresh archive directory for one pod in the cluster's state directory, which no volume
/// mounts; the pods see the host's file system outside their volumes.
fn outside_archive(cluster: &Cluster, pod: &str) -> PathBuf {
    let dir = cluster.archives().join(pod);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let _ = std::os::unix::fs::lchown(&dir, Some(POSTGRES_UID), Some(POSTGRES_UID));
    dir
}

/// A running PostgreSQL pod.
#[derive(Debug, Clone)]
pub struct PostgresPod {
    pub name: String,
    pub namespace: String,
    pub major: u32,
    /// The pod's address: the test process reaches it over the node's bridge.
    pub host: String,
    pub port: u16,
    /// The superuser and its password.
    pub user: String,
    pub password: String,
    /// Host directories behind the PVCs (PGDATA is `data_dir/pgdata`).
    pub data_dir: PathBuf,
    pub tablespace_dir: Option<PathBuf>,
    pub archive_dir: Option<PathBuf>,
}

impl PostgresPod {
    /// The data directory on the host.
    pub fn pgdata_host_dir(&self) -> PathBuf {
        self.data_dir.join("pgdata")
    }

    /// A Secret `<name>-password` (key `password`) holding the superuser's password, for a
    /// Backup's `passwordSecretRef`; its name. Creating it again is fine.
    pub async fn password_secret(&self, cluster: &Cluster) -> String {
        password_secret(cluster, &format!("{}-password", self.name), &self.password).await
    }

    /// The PVC name of a role: `data`, `wal`, `tablespace` or `archive`.
    pub fn claim(&self, role: &str) -> String {
        format!("{role}-{}", self.name)
    }

    /// A `key=value` connection string for the superuser.
    pub fn conninfo(&self, database: &str) -> String {
        format!(
            "host={} port={} user={} password={} dbname={database}",
            self.host, self.port, self.user, self.password
        )
    }

    /// A new superuser connection to `postgres`.
    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.conninfo("postgres"), NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.name));
        tokio::spawn(conn);
        client
    }

    /// Runs SQL (simple protocol, several statements allowed); rows as text, NULL as "".
    pub async fn sql(&self, query: &str) -> Vec<Vec<String>> {
        let client = self.connect().await;
        let messages = client
            .simple_query(query)
            .await
            .unwrap_or_else(|e| panic!("{}: {query}: {e}", self.name));
        messages
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or_default().to_owned())
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    }

    /// The single value of a one-row, one-column query.
    pub async fn sql_value(&self, query: &str) -> String {
        let rows = self.sql(query).await;
        rows.first()
            .and_then(|r| r.first())
            .cloned()
            .unwrap_or_else(|| panic!("{query}: no row"))
    }

    /// The single value of a query run by `psql` inside the pod (over its own loopback,
    /// which initdb trusts): works while the pod is cut off the network.
    pub async fn sql_in_pod(&self, cluster: &Cluster, query: &str) -> String {
        let out = cluster
            .exec(
                &self.name,
                "postgres",
                &["psql", "-h", "127.0.0.1", "-U", &self.user, "-XAtc", query],
            )
            .await;
        assert!(
            out.status.success(),
            "psql in {}: {query}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn pgbench(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("pgbench")
            .args([
                "-h",
                &self.host,
                "-p",
                &self.port.to_string(),
                "-U",
                &self.user,
            ])
            .args(args)
            .arg("postgres")
            .env("PGPASSWORD", &self.password)
            .output()
            .unwrap_or_else(|e| {
                panic!("running pgbench (install postgresql-client: hack/deps): {e}")
            });
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
        text
    }

    /// `pgbench -i -s <scale>`.
    pub fn pgbench_init(&self, scale: u32) -> String {
        self.pgbench(&["-i", "-q", "-s", &scale.to_string()])
    }

    /// `pgbench -T <seconds>` with 2 clients; its report.
    pub fn pgbench_run(&self, seconds: u32) -> String {
        self.pgbench(&["-T", &seconds.to_string(), "-c", "2", "-n"])
    }

    /// Waits for the pod's readiness (TCP probe on its port), then for a working session
    /// (the server may still be finishing recovery). A pod that fails ends the test with
    /// its logs.
    async fn wait_ready(&mut self, cluster: &Cluster) {
        let ready_or_failed = |p: Option<&Pod>| {
            let status = p.and_then(|p| p.status.as_ref());
            let phase = status.and_then(|s| s.phase.as_deref());
            let ready = status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            // A server that keeps crashing will not get better: stop waiting, show its log.
            let crashing = status
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.restart_count >= 2));
            ready || crashing || matches!(phase, Some("Failed") | Some("Succeeded"))
        };
        let waited = tokio::time::timeout(
            Duration::from_secs(120),
            kube::runtime::wait::await_condition(cluster.api::<Pod>(), &self.name, ready_or_failed),
        )
        .await;
        let pod = match waited {
            Ok(Ok(Some(p))) => p,
            other => {
                let logs = cluster.pod_logs(&self.name).await;
                let status = cluster
                    .api::<Pod>()
                    .get_opt(&self.name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|p| p.status);
                panic!(
                    "postgres pod {} not ready ({:?}); status {status:#?}\n{logs}",
                    self.name,
                    other.err()
                );
            }
        };
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        let restarts: i32 = (pod.status.as_ref())
            .and_then(|s| s.container_statuses.as_ref())
            .map_or(0, |c| c.iter().map(|c| c.restart_count).sum());
        if phase != "Running" || restarts >= 2 {
            panic!(
                "postgres pod {} is {phase} after {restarts} restarts:\n{}",
                self.name,
                cluster.pod_logs(&self.name).await
            );
        }
        self.host = pod
            .status
            .and_then(|s| s.pod_ip)
            .unwrap_or_else(|| panic!("postgres pod {} is Running without a podIP", self.name));
        let mut last = String::new();
        for _ in 0..60 {
            match tokio_postgres::connect(&self.conninfo("postgres"), NoTls).await {
                Ok(_) => return,
                // "the database system is starting up": retry shortly; nothing to watch here.
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!(
            "postgres pod {} is Ready but refuses sessions: {last}\n{}",
            self.name,
            cluster.pod_logs(&self.name).await
        );
    }
}

/// A Secret `name` whose key `password` holds `password`; its name. Creating it again is fine.
pub async fn password_secret(cluster: &Cluster, name: &str, password: &str) -> String {
    secret(cluster, name, "password", password).await
}

/// A Secret `name` holding `value` under `key` (kept if it exists); returns its name.
pub async fn secret(cluster: &Cluster, name: &str, key: &str, value: &str) -> String {
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(key.to_string(), value.to_string())])),
        ..Default::default()
    };
    match cluster
        .api::<k8s_openapi::api::core::v1::Secret>()
        .create(&PostParams::default(), &secret)
        .await
    {
        Ok(_) => name.to_string(),
        Err(kube::Error::Api(s)) if s.code == 409 => name.to_string(),
        Err(e) => panic!("secret {name}: {e}"),
    }
}

async fn create_pvc(cluster: &Cluster, name: &str, class: Option<&str>, size: &str) {
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}, "storageClassName": class}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    cluster
        .api::<PersistentVolumeClaim>()
        .create(&PostParams::default(), &pvc)
        .await
        .unwrap_or_else(|e| panic!("creating PVC {name}: {e}"));
}

/// What a base backup copy leaves out (as pg_basebackup does).
fn skipped(rel: &Path) -> bool {
    let s = rel.to_string_lossy();
    matches!(
        s.as_ref(),
        "postmaster.pid" | "postmaster.opts" | "backup_label" | "tablespace_map"
    ) || [
        "pg_wal/",
        "pg_replslot/",
        "pg_stat_tmp/",
        "pg_notify/",
        "pg_subtrans/",
        "pg_dynshmem/",
        "pg_snapshots/",
        "pg_serial/",
    ]
    .iter()
    .any(|d| s.starts_with(d))
}

/// Copies a tree while the server writes it: files vanishing under the copy are expected
/// (the backup label makes the copy consistent). Everything ends up owned by postgres.
fn copy_tree(from: &Path, to: &Path, rel: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let src = from.join(rel);
    let dst = to.join(rel);
    let Ok(meta) = std::fs::symlink_metadata(&src) else {
        return;
    };
    if meta.file_type().is_symlink() {
        if let Ok(target) = std::fs::read_link(&src) {
            let _ = std::os::unix::fs::symlink(target, &dst);
        }
    } else if meta.is_dir() {
        std::fs::create_dir_all(&dst).unwrap_or_else(|e| panic!("{}: {e}", dst.display()));
        let _ = std::fs::set_permissions(
            &dst,
            std::fs::Permissions::from_mode(meta.permissions().mode()),
        );
        for e in std::fs::read_dir(&src).into_iter().flatten().flatten() {
            let child = rel.join(e.file_name());
            if !skipped(&child) {
                copy_tree(from, to, &child);
            }
        }
    } else if std::fs::copy(&src, &dst).is_err() {
        return;
    }
    let _ = std::os::unix::fs::lchown(&dst, Some(POSTGRES_UID), Some(POSTGRES_UID));
}

const REPLICATION_HBA: &str = "\nhost replication all all md5\n";

/// A base backup of the primary into the standby's (empty) volumes, with the low-level API
/// in one session, a replication slot named after the standby, and standby settings.
async fn base_backup(
    primary: &Primary,
    standby: &str,
    data_dir: &Path,
    tablespace_dir: Option<&Path>,
) {
    let conninfo = format!(
        "host={} port={PORT} user=postgres password={} dbname=postgres",
        primary.host, primary.password
    );
    let (client, conn) = tokio_postgres::connect(&conninfo, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to the primary: {e}"));
    tokio::spawn(conn);
    // The image allows replication from its own loopback only; a standby is another pod.
    // (`md5` also takes SCRAM passwords.)
    let hba = primary.data_dir.join("pgdata/pg_hba.conf");
    let mut text =
        std::fs::read_to_string(&hba).unwrap_or_else(|e| panic!("{}: {e}", hba.display()));
    if !text.contains(REPLICATION_HBA) {
        text.push_str(REPLICATION_HBA);
        std::fs::write(&hba, text).unwrap_or_else(|e| panic!("{}: {e}", hba.display()));
        client
            .simple_query("SELECT pg_reload_conf()")
            .await
            .unwrap_or_else(|e| panic!("reloading the primary: {e}"));
    }
    let slot = standby.replace('-', "_");
    client
        .simple_query(&format!(
            "SELECT pg_create_physical_replication_slot('{slot}', true)"
        ))
        .await
        .unwrap_or_else(|e| panic!("creating slot {slot}: {e}"));
    let (start, stop) = if primary.major >= 15 {
        (
            "SELECT pg_backup_start('standby', true)",
            "SELECT labelfile, spcmapfile FROM pg_backup_stop(false)",
        )
    } else {
        (
            "SELECT pg_start_backup('standby', true, false)",
            "SELECT labelfile, spcmapfile FROM pg_stop_backup(false, false)",
        )
    };
    client
        .simple_query(start)
        .await
        .unwrap_or_else(|e| panic!("{start}: {e}"));
    let pgdata = data_dir.join("pgdata");
    copy_tree(&primary.data_dir.join("pgdata"), &pgdata, Path::new(""));
    if let (Some(from), Some(to)) = (&primary.tablespace_dir, tablespace_dir) {
        copy_tree(from, to, Path::new(""));
    }
    let rows = client
        .simple_query(stop)
        .await
        .unwrap_or_else(|e| panic!("{stop}: {e}"));
    let Some(SimpleQueryMessage::Row(row)) = rows
        .into_iter()
        .find(|m| matches!(m, SimpleQueryMessage::Row(_)))
    else {
        panic!("{stop}: no row")
    };
    let write = |name: &str, text: &str| {
        let path = pgdata.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let _ = std::os::unix::fs::lchown(&path, Some(POSTGRES_UID), Some(POSTGRES_UID));
    };
    write("backup_label", row.get(0).unwrap_or_default());
    if let Some(map) = row.get(1).filter(|m| !m.is_empty()) {
        write("tablespace_map", map);
    }
    // pg_wal is not copied; an empty directory (also where a WAL volume's symlink was).
    let wal = pgdata.join("pg_wal");
    let _ = std::fs::remove_file(&wal);
    for dir in [
        "pg_wal",
        "pg_wal/archive_status",
        "pg_replslot",
        "pg_stat_tmp",
        "pg_notify",
        "pg_subtrans",
        "pg_dynshmem",
        "pg_snapshots",
        "pg_serial",
    ] {
        let path = pgdata.join(dir);
        let _ = std::fs::create_dir_all(&path);
        let _ = std::os::unix::fs::lchown(&path, Some(POSTGRES_UID), Some(POSTGRES_UID));
    }
    let conn = format!(
        "host={} port={PORT} user=postgres password={} application_name={slot}",
        primary.host, primary.password
    );
    if primary.major >= 12 {
        write("standby.signal", "");
        let auto = std::fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap_or_default();
        write(
            "postgresql.auto.conf",
            &format!("{auto}\nprimary_conninfo = '{conn}'\nprimary_slot_name = '{slot}'\n"),
        );
    } else {
        write(
            "recovery.conf",
            &format!(
                "standby_mode = 'on'\nprimary_conninfo = '{conn}'\nprimary_slot_name = '{slot}'\n"
            ),
        );
    }
}
