//! `kubectl pgsnap` as users run it: the binary on the PATH, found and run by the real
//! kubectl, against the test cluster.

use std::process::Command;

use pgsnap::api::Backup;
use pgsnap::api::backup::Phase;
use pgsnap_e2e::backups::{apply, backup_spec, on, wait_terminal};
use pgsnap_e2e::cluster::{repo_root, target_dir};
use pgsnap_e2e::operator::Operator;
use pgsnap_e2e::{Cluster, postgres_pod};
use serde_json::json;

/// `kubectl pgsnap <args>` with the cluster's kubectl and this build's plugin on the PATH;
/// (exit code, stdout, stderr).
fn kubectl_pgsnap(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("bash")
        .arg("-c")
        .arg("eval \"$(e2e/cluster env)\"; PATH=\"$PLUGIN_DIR:$PATH\" kubectl pgsnap \"$@\"")
        .arg("kubectl-pgsnap")
        .args(args)
        .env("PLUGIN_DIR", target_dir().join("debug"))
        .current_dir(repo_root())
        .output()
        .expect("bash");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `list` and `describe` of a Completed Backup, for people and for scripts; a Backup that
/// does not exist is an error naming it.
#[tokio::test]
async fn list_and_describe_show_a_completed_backup() {
    let cluster = Cluster::from_env().await;
    let _operator = Operator::for_test(&cluster).await;
    let db = postgres_pod(17).create(&cluster).await;
    let secret = db.password_secret(&cluster).await;
    let name = apply(
        &cluster,
        backup_spec("first", on(&db, &secret, json!({"checkpoint": "Fast"}))),
    )
    .await;
    let backup = wait_terminal(&cluster, &name).await;
    let status = backup.status.clone().unwrap();
    assert_eq!(status.phase, Some(Phase::Completed), "{:?}", status.error);
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
            "SCHEDULE"
        ],
        "{out}"
    );
    let window = status.backup_window.unwrap().seconds.unwrap();
    let row = &lines[1];
    assert_eq!(
        [row[0], row[1], row[2], row[4], row[6], row[7]],
        [
            "first",
            "Completed",
            db.name.as_str(),
            &format!("{window}s"),
            "Archive",
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
        "WAL source:     Archive",
        &format!("Steps (time in backup mode {window}s):"),
        "checkpoint (start)",
        "pgsnap's overhead",
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
