//! `kubectl pgsnap` as users run it: the binary on the PATH, found and run by the real
//! kubectl, against the test cluster: `list`, `describe`, `check` before a first backup,
//! `backup --wait`, and `restore` with the StatefulSet it prints.

use k8s_openapi::api::apps::v1::StatefulSet;
use pgsnap::api::Backup;
use pgsnap::api::backup::Phase;
use pgsnap::api::restore::Restore;
use pgsnap::postgres::grants;
use pgsnap_e2e::backups::completed_backup;
use pgsnap_e2e::cluster::cluster_dir;
use pgsnap_e2e::operator::{
    OPERATOR_NAMESPACE, Operator, check_rows, cluster_shell, cluster_tool, kubectl_pgsnap,
};
use pgsnap_e2e::postgres::password_secret;
use pgsnap_e2e::{Cluster, postgres_pod, verify};
use serde_json::json;

/// `list` and `describe` of a Completed Backup, for people and for scripts; a Backup that
/// does not exist is an error naming it.
#[tokio::test]
async fn list_and_describe_show_a_completed_backup() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(17).create(&cluster).await;
    let backup = completed_backup(&cluster, &db, "first", json!({})).await;
    let status = backup.status.clone().unwrap();
    let ns = cluster.namespace.as_str();

    let (code, out, err) = kubectl_pgsnap(&["list", "-n", ns]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| {
            l.split("   ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(
        lines[0],
        [
            "NAME",
            "PHASE",
            "DATABASE",
            "AGE",
            "BACKUP MODE",
            "SIZE",
            "WAL",
            "VERIFIED",
            "SCHEDULE"
        ],
        "{out}"
    );
    let window = status.backup_window.unwrap().seconds.unwrap();
    let row = &lines[1];
    assert_eq!(
        [row[0], row[1], row[2], row[4], row[6], row[7], row[8]],
        [
            "first",
            "Completed",
            db.name.as_str(),
            &format!("{window}s"),
            "Snapshot",
            "-",
            "-"
        ],
        "{out}"
    );
    assert!(
        !out.contains('\u{1b}'),
        "colour only on a terminal: {out:?}"
    );

    let (code, out, _) = kubectl_pgsnap(&["list", "-n", ns, "-o", "json"]);
    assert_eq!(code, 0);
    let listed: Vec<Backup> = serde_json::from_str(&out).expect("a JSON list of Backups");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].metadata.name.as_deref(), Some("first"));

    let (code, out, err) = kubectl_pgsnap(&["describe", "first", "-n", ns]);
    assert_eq!(code, 0, "{err}");
    for expected in [
        "Phase:          Completed",
        &format!("Database:       {} (PostgreSQL 17", db.name),
        "WAL source:     Snapshot",
        &format!("Steps (time in backup mode {window}s):"),
        "checkpoint (start)",
        "pgsnap's overhead",
        "WAL snapshot (after)",
        "BackupWal",
        "Snapshots:",
        &db.claim("data"),
        "Events:",
        "BackupModeEnded",
    ] {
        assert!(out.contains(expected), "no {expected:?} in:\n{out}");
    }

    let (code, _, err) = kubectl_pgsnap(&["describe", "nope", "-n", ns]);
    assert_eq!(code, 1);
    assert!(
        err.contains("backups.pgsnap.io \"nope\" not found"),
        "{err}"
    );
}

/// `check` before a first backup: a server that can be backed up passes every check (exit
/// 0); a role without the backup functions, `wal_level = minimal`, and a data directory on no
/// PVC each fail their check with the reason a Backup would fail with and the fix (exit 1).
#[tokio::test]
async fn check_says_whether_a_database_can_be_backed_up_and_how_to_fix_it() {
    let cluster = Cluster::from_env().await;
    let ns = cluster.namespace.clone();
    let (good, minimal) = tokio::join!(
        postgres_pod(17).name("good").create(&cluster),
        postgres_pod(17)
            .name("minimal")
            .no_archive()
            .setting("wal_level", "minimal")
            .setting("max_wal_senders", "0")
            .create(&cluster),
    );
    // An operator for this namespace under a Lease of its own.
    let lease = format!("check-{ns}");
    let _operator = Operator::start(
        &cluster.client,
        &[
            &format!("--namespace={ns}"),
            &format!("--lease-name={lease}"),
        ],
    )
    .await;
    let operator_lease = format!("{OPERATOR_NAMESPACE}/{lease}");
    let secret = good.password_secret(&cluster).await;
    let (code, out, err) = kubectl_pgsnap(&[
        "check",
        "good",
        "-n",
        &ns,
        "--secret",
        &format!("{secret}/password"),
        "--operator-lease",
        &operator_lease,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let rows = check_rows(&out);
    let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "target pod",
            "credentials",
            "connection",
            "server",
            "WAL source",
            "volumes",
            "snapshot classes",
            "group snapshot",
            "operator"
        ],
        "{out}"
    );
    assert!(rows.iter().all(|r| r.1 == "✓"), "{out}");
    assert!(rows[2].2.starts_with("PostgreSQL 17"), "{out}");
    assert_eq!(rows[5].2, format!("Data: {}", good.claim("data")), "{out}");
    assert_eq!(
        rows[6].2,
        format!(
            "{}: csi-hostpath-snapclass (hostpath.csi.k8s.io)",
            good.claim("data")
        ),
        "{out}"
    );
    assert_eq!(
        rows[4].2,
        format!(
            "Snapshot: kept with the backup, in a snapshot of {} cut after the stop",
            good.claim("data")
        ),
        "{out}"
    );
    assert_eq!(rows[7].2, "one snapshot per volume", "{out}");
    // The operator runs here as a process, not a pod: whether it leads is all there is to see.
    assert!(
        rows[8].2.starts_with("pgsnap-e2e-")
            && rows[8]
                .2
                .contains(&format!("leads (Lease {operator_lease} renewed "))
            && rows[8]
                .2
                .ends_with("; not a pod here, its rights unchecked"),
        "{out}"
    );

    // A group: of the class named, or refused where the cluster marks no class default.
    let base = [
        "check",
        "good",
        "-n",
        &ns,
        "--secret",
        &format!("{secret}/password"),
        "--operator-lease",
        &operator_lease,
        "--group-snapshot",
        "always",
    ];
    let (code, out, _) =
        kubectl_pgsnap(&[&base[..], &["--group-snapshot-class", "csi-hostpath-group"]].concat());
    assert_eq!(code, 0, "{out}");
    let group = &check_rows(&out)[7];
    assert_eq!(
        (group.1.as_str(), group.2.as_str()),
        (
            "✓",
            "one VolumeGroupSnapshot of class csi-hostpath-group: every volume at one instant"
        ),
        "{out}"
    );
    let (code, out, _) = kubectl_pgsnap(&base);
    assert_eq!(code, 1, "{out}");
    let group = &check_rows(&out)[7];
    assert_eq!(group.1, "✗", "{out}");
    assert!(
        group
            .2
            .starts_with("GroupSnapshotImpossible: groupSnapshot Always, but no VolumeGroupSnapshotClass is marked default for CSI driver hostpath.csi.k8s.io"),
        "{out}"
    );

    // A role that may read the settings, but not call the backup functions.
    good.sql("CREATE ROLE weak LOGIN PASSWORD 'weak'; GRANT pg_read_all_settings TO weak")
        .await;
    let weak = password_secret(&cluster, "weak", "weak").await;
    let (code, out, _) = kubectl_pgsnap(&[
        "check",
        "good",
        "-n",
        &ns,
        "--secret",
        &format!("{weak}/password"),
        "--user",
        "weak",
        "--operator-lease",
        &format!("{OPERATOR_NAMESPACE}/nobody"),
    ]);
    assert_eq!(code, 1, "{out}");
    let operator = &check_rows(&out)[8];
    assert_eq!(
        (operator.1.as_str(), operator.2.split(':').next()),
        ("✗", Some("OperatorNotFound")),
        "{out}"
    );
    let server = &check_rows(&out)[3];
    assert_eq!(server.1, "✗", "{out}");
    let wal = &check_rows(&out)[4];
    assert!(
        wal.2.starts_with("MissingPrivilege: ")
            && wal
                .2
                .contains("GRANT EXECUTE ON FUNCTION pg_ls_waldir() TO weak"),
        "{out}"
    );
    assert!(
        server.2.starts_with("MissingPrivilege: ")
            && server
                .2
                .contains("GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO weak"),
        "{out}"
    );

    // Each privilege a backup needs, missing alone: what fails is MissingPrivilege naming
    // exactly that GRANT; without REPLICATION a backup runs, but no slot pins its WAL.
    for i in 0..grants(17, "x").len() {
        let role = format!("lacks{i}");
        let mut all = grants(17, &role);
        let missing = all.remove(i);
        good.sql(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{role}'; {}",
            all.join("; ")
        ))
        .await;
        let secret = password_secret(&cluster, &role, &role).await;
        let (code, out, _) = kubectl_pgsnap(&[
            "check",
            "good",
            "-n",
            &ns,
            "--secret",
            &format!("{secret}/password"),
            "--user",
            &role,
            "--operator-lease",
            &operator_lease,
        ]);
        if missing.starts_with("ALTER ROLE") {
            let server = &check_rows(&out)[3];
            assert!(
                code == 0 && server.1 == "!" && server.2.contains(&missing),
                "without `{missing}`:\n{out}"
            );
            continue;
        }
        assert_eq!(code, 1, "without `{missing}`:\n{out}");
        let failed: Vec<_> = check_rows(&out)
            .into_iter()
            .filter(|r| r.1 == "✗")
            .collect();
        assert!(
            !failed.is_empty()
                && failed
                    .iter()
                    .all(|r| r.2.starts_with("MissingPrivilege: ") && r.2.contains(&missing)),
            "without `{missing}`:\n{out}"
        );
    }

    let secret = minimal.password_secret(&cluster).await;
    let (code, out, _) = kubectl_pgsnap(&[
        "check",
        "minimal",
        "-n",
        &ns,
        "--secret",
        &format!("{secret}/password"),
        "--wal-source",
        "archive",
        "-o",
        "json",
    ]);
    assert_eq!(code, 1, "{out}");
    let checks: Vec<serde_json::Value> = serde_json::from_str(&out).expect("JSON");
    let reason = |check: &str| {
        checks
            .iter()
            .find(|c| c["check"] == check)
            .map(|c| (c["result"].clone(), c["detail"]["reason"].clone()))
    };
    assert_eq!(
        reason("server"),
        Some((json!("failed"), json!("WalLevelTooLow"))),
        "{out}"
    );
    assert_eq!(
        reason("WAL source"),
        Some((json!("failed"), json!("NoWalSource"))),
        "{out}"
    );

    // PGDATA on an emptyDir: no PVC to snapshot.
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "ephemeral"},
        "spec": {"containers": [{
            "name": "postgres", "image": "postgres:17",
            "env": [{"name": "POSTGRES_PASSWORD", "value": "eph"}],
            "readinessProbe": {"tcpSocket": {"port": 5432}, "periodSeconds": 1},
            "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
        }], "volumes": [{"name": "data", "emptyDir": {}}]}
    }))
    .unwrap();
    cluster
        .api::<k8s_openapi::api::core::v1::Pod>()
        .create(&Default::default(), &pod)
        .await
        .unwrap();
    let eph = password_secret(&cluster, "eph", "eph").await;
    let since = std::time::Instant::now();
    let out = loop {
        let (code, out, _) = kubectl_pgsnap(&[
            "check",
            "ephemeral",
            "-n",
            &ns,
            "--secret",
            &format!("{eph}/password"),
        ]);
        let rows = check_rows(&out);
        // Until the server accepts the session.
        if rows.get(2).is_some_and(|r| r.1 == "✓") {
            assert_eq!(code, 1, "{out}");
            break out;
        }
        assert!(
            since.elapsed() < std::time::Duration::from_secs(90),
            "{out}"
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    };
    let volumes = &check_rows(&out)[5];
    assert_eq!(
        (volumes.1.as_str(), volumes.2.split(':').next()),
        ("✗", Some("PathNotOnClaim")),
        "{out}"
    );
}

/// `backup --wait` creates a Backup and follows it phase by phase to its end: exit 0 and the
/// split of its time in backup mode when Completed, exit 1 and the reason when Failed.
#[tokio::test]
async fn backup_wait_follows_a_backup_to_its_end() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(17).create(&cluster).await;
    let secret = db.password_secret(&cluster).await;
    let ns = cluster.namespace.as_str();
    let (code, out, err) = kubectl_pgsnap(&[
        "backup",
        &db.name,
        "-n",
        ns,
        "--secret",
        &format!("{secret}/password"),
        "--checkpoint",
        "fast",
        "--name",
        "by-cli",
        "--wait",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "backup.pgsnap.io/by-cli created", "{out}");
    let completed = lines
        .iter()
        .position(|l| l.contains("s  Completed"))
        .expect(&out);
    assert!(
        lines[1..completed].iter().all(|l| !l.contains("Failed")),
        "{out}"
    );
    assert!(
        lines.last().unwrap().starts_with("Completed: ")
            && out.contains("s in backup mode (checkpoint "),
        "{out}"
    );
    let backup = cluster.api::<Backup>().get("by-cli").await.unwrap();
    assert_eq!(backup.status.unwrap().phase, Some(Phase::Completed));

    let (code, out, _) =
        kubectl_pgsnap(&["backup", "nope", "-n", ns, "--name", "of-nothing", "--wait"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines()
            .last()
            .unwrap()
            .starts_with("Failed: TargetPodNotFound: "),
        "{out}"
    );
}

/// `restore --to NAME -o yaml`: a Restore into the claims a StatefulSet NAME adopts
/// (`<volume>-NAME-0`), followed to its end, then that StatefulSet on stdout; `kubectl apply`
/// of it starts PostgreSQL on the restored claims with every row. Asking again changes
/// nothing; a bad name and a Backup that does not exist are refused.
#[tokio::test]
async fn restore_prints_a_statefulset_that_serves_the_restored_claims() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    // It archives into a claim of its own, which the backup does not hold.
    let db = postgres_pod(16).archive_volume().create(&cluster).await;
    db.sql("CREATE TABLE kept AS SELECT generate_series(1, 500) AS v")
        .await;
    completed_backup(&cluster, &db, "b", json!({})).await;
    let ns = cluster.namespace.as_str();

    // Sharing the source's archive is never a default: refused before anything is made.
    let archive = db.claim("archive");
    let (code, _, err) = kubectl_pgsnap(&["restore", "b", "--to", "back", "-n", ns, "-o", "yaml"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "the backed-up pod's volumes {archive} are storage the backup does not hold"
        )),
        "{err}"
    );
    assert!(
        cluster
            .api::<Restore>()
            .get_opt("back")
            .await
            .unwrap()
            .is_none()
    );

    let restore = [
        "restore",
        "b",
        "--to",
        "back",
        "-n",
        ns,
        "-o",
        "yaml",
        "--empty-volume",
        &archive,
    ];
    let (code, out, err) = kubectl_pgsnap(&restore);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.starts_with(&format!(
            "warning: {} has no StatefulSet: its spec is taken as it runs, with what webhooks added to it\nrestore.pgsnap.io/back created\n",
            db.name
        )) && err.contains("s  Completed"),
        "{err}"
    );
    let server: StatefulSet = serde_yaml::from_str(&out).expect(&out);
    let spec = server.spec.clone().unwrap();
    // The pod calls its data volume by its claim's name.
    let volume = db.claim("data");
    let templates: Vec<String> = spec
        .volume_claim_templates
        .iter()
        .flatten()
        .map(|t| t.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(templates, std::slice::from_ref(&volume), "{out}");
    let restored = cluster
        .api::<Restore>()
        .get("back")
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(restored.claims[0].name, format!("{volume}-back-0"));

    let manifest = cluster_dir().join(format!("{ns}-back.yaml"));
    std::fs::write(&manifest, &out).unwrap();
    let (code, _, err) = cluster_tool(&[
        "kubectl",
        "apply",
        "-n",
        ns,
        "-f",
        manifest.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let client = verify::wait_serving(&cluster, &db, "back-0")
        .await
        .unwrap_or_else(|e| panic!("the restored StatefulSet's server: {e}"));
    let rows: i64 = client
        .query_one("SELECT count(*) FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 500);

    let (code, again, err) = kubectl_pgsnap(&restore);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("\nrestore.pgsnap.io/back unchanged\n"),
        "{err}"
    );
    assert_eq!(again, out);

    let (code, _, err) = kubectl_pgsnap(&["restore", "b", "--to", "Back_2", "-n", ns]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--to \"Back_2\": a StatefulSet's name"),
        "{err}"
    );
    let (code, _, err) = kubectl_pgsnap(&["restore", "nope", "--to", "x", "-n", ns]);
    assert_eq!(code, 1);
    assert!(
        err.contains("backups.pgsnap.io \"nope\" not found"),
        "{err}"
    );
}

/// The krew manifest installs the plugin: `hack/krew-package` packs this build and renders
/// `.krew.yaml` as krew-release-bot does on a release; the real krew installs it into an
/// empty KREW_ROOT, and kubectl finds `kubectl pgsnap` there and nowhere else.
#[test]
fn krew_installs_the_plugin_from_its_manifest() {
    let root = cluster_dir().join(format!("krew-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let binary = pgsnap_e2e::cluster::target_dir().join("debug/kubectl-pgsnap");
    let out = cluster_shell(&format!(
        "root={root}; export KREW_ROOT=$root; \
         files=$(KREW_OUT=$root/out hack/krew-package {binary}); \
         krew install --manifest=$(sed -n 1p <<<\"$files\") --archive=$(sed -n 2p <<<\"$files\") 2>&1; \
         PATH=$root/bin:$PATH; kubectl plugin list 2>/dev/null; kubectl pgsnap --version",
        root = root.display(),
        binary = binary.display()
    ));
    let _ = std::fs::remove_dir_all(&root);
    assert!(out.contains("Installed plugin: pgsnap"), "{out}");
    let found: Vec<&str> = out
        .lines()
        .filter(|l| l.ends_with("/kubectl-pgsnap"))
        .collect();
    assert_eq!(
        found,
        [format!("{}/bin/kubectl-pgsnap", root.display())],
        "{out}"
    );
    assert!(
        out.ends_with(&format!("kubectl-pgsnap {}\n", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
}
