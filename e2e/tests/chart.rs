//! The Helm chart: lint, the rendered manifests against a reviewed golden copy, refusal of
//! bad values, and an install into the test cluster where the operator runs as a Pod
//! (image `pgsnap:dev`) with only the chart's RBAC and a Backup completes.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::PostParams;
use pgsnap::api::Backup;
use pgsnap::api::backup::Phase;
use pgsnap_e2e::backups::{
    apply, backup_spec, delete_snapshot_class, on, snapshot_class, wait_phase, wait_terminal,
};
use pgsnap_e2e::cluster::repo_root;
use pgsnap_e2e::operator::{check_rows, cluster_tool, kubectl_pgsnap};
use pgsnap_e2e::{Cluster, postgres_pod};
use serde::Deserialize;
use serde_json::json;

/// `helm <args>` from the cluster's tool cache; (success, stdout, stderr).
fn helm(args: &[&str]) -> (bool, String, String) {
    let argv: Vec<&str> = std::iter::once("helm")
        .chain(args.iter().copied())
        .collect();
    let (code, out, err) = cluster_tool(&argv);
    (code == 0, out, err)
}

/// `helm install` of the chart into the test's namespace as the tests run it: the node
/// agent's `pgsnap:dev` image, watching that namespace only, waiting for the rollout.
fn install(release: &str, ns: &str) -> (bool, String, String) {
    helm(&[
        "install",
        release,
        "charts/pgsnap",
        "--namespace",
        ns,
        "--set",
        "image.repository=pgsnap",
        "--set",
        "image.tag=dev",
        "--set",
        "image.pullPolicy=Never",
        "--set",
        &format!("watchNamespaces={{{ns}}}"),
        "--wait",
        "--timeout",
        "2m",
    ])
}

const TEMPLATE: &[&str] = &[
    "template",
    "pgsnap",
    "charts/pgsnap",
    "--namespace",
    "pgsnap-system",
    "--kube-version",
    "1.34.0",
];

#[test]
fn the_chart_lints_clean() {
    for extra in [&[][..], &["--set", "watchNamespaces={shop}"][..]] {
        let mut args = vec!["lint", "--strict", "charts/pgsnap"];
        args.extend(extra);
        let (ok, out, err) = helm(&args);
        assert!(ok, "helm lint {extra:?}:\n{out}\n{err}");
    }
}

/// The rendered chart is reviewed as a whole: a change to it must update the golden copy
/// (`PGSNAP_UPDATE_GOLDEN=1 cargo test -p pgsnap-e2e --test chart`) and show in the diff.
#[test]
fn helm_template_matches_the_golden_output() {
    for (name, extra) in [
        ("default", &[][..]),
        (
            "one-namespace",
            &["--set", "watchNamespaces={shop}", "--set", "replicaCount=2"][..],
        ),
    ] {
        let mut args = TEMPLATE.to_vec();
        args.extend(extra);
        let (ok, out, err) = helm(&args);
        assert!(ok, "helm template: {err}");
        let path = repo_root().join(format!("charts/pgsnap/tests/golden-{name}.yaml"));
        if std::env::var_os("PGSNAP_UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &out).unwrap();
        }
        let golden = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            golden == out,
            "{} differs from `helm template {extra:?}`; review and update with PGSNAP_UPDATE_GOLDEN=1",
            path.display()
        );
    }
}

/// The PrometheusRule's alerts, evaluated by promtool against series that must and must not
/// fire them (charts/pgsnap/tests/alerts.test.yaml).
/// The metric names the operator registers, as `/metrics` lists them (`# TYPE` lines; a
/// family shows once it has a series, so each gets one).
fn exported_metrics() -> Vec<String> {
    use pgsnap::telemetry::{DatabaseLabels, Metrics, Outcome, ScheduleLabels, TimedStep};
    let m = Metrics::default();
    m.ended(Outcome::Failed, "SessionLost");
    m.restore_ended(Outcome::Completed, "Completed");
    m.observe(TimedStep::Overhead, 0.1);
    m.backup_mode_seconds.observe(1.0);
    let db = || DatabaseLabels {
        namespace: "shop".into(),
        database: "7350000000000000001".into(),
    };
    m.database_backup_ended(db(), Outcome::Completed, 1);
    m.database_backup_ended(db(), Outcome::Failed, 1);
    let schedule = ScheduleLabels {
        namespace: "shop".into(),
        schedule: "nightly".into(),
    };
    for family in [
        &m.schedule_last_success,
        &m.schedule_last_failure,
        &m.schedule_interval,
        &m.schedule_kept,
    ] {
        family.get_or_create(&schedule).set(1);
    }
    let text = m.render().unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(String::from)
        .collect()
}

/// Every `pgsnap_*` series a query names, as families (counters end `_total`, histograms
/// `_bucket`, `_sum`, `_count`).
fn queried_families(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("pgsnap_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        found.push(family.to_string());
    }
    found
}

/// The dashboard (a ConfigMap for Grafana's sidecar, off by default) is valid JSON whose
/// every query names only metrics the operator exports; the alerts likewise.
#[test]
fn the_dashboard_and_the_alerts_query_what_the_operator_exports() {
    let exported = exported_metrics();
    let mut args = TEMPLATE.to_vec();
    args.extend([
        "--set",
        "metrics.grafanaDashboard.enabled=true",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--show-only",
        "templates/dashboard.yaml",
        "--show-only",
        "templates/prometheusrule.yaml",
    ]);
    let (ok, out, err) = helm(&args);
    assert!(ok, "helm template: {err}");
    let mut exprs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&out) {
        let doc = serde_yaml::Value::deserialize(doc).unwrap();
        match doc["kind"].as_str() {
            Some("ConfigMap") => {
                assert_eq!(doc["metadata"]["labels"]["grafana_dashboard"], "1");
                let json = doc["data"]["pgsnap.json"].as_str().expect("the dashboard");
                let dashboard: serde_json::Value = serde_json::from_str(json).expect("JSON");
                for panel in dashboard["panels"].as_array().unwrap() {
                    for target in panel["targets"].as_array().unwrap() {
                        exprs.push(target["expr"].as_str().unwrap().to_string());
                    }
                }
            }
            Some("PrometheusRule") => {
                for rule in doc["spec"]["groups"][0]["rules"].as_sequence().unwrap() {
                    exprs.push(rule["expr"].as_str().unwrap().to_string());
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(exprs.len() > 10, "{exprs:?}");
    for expr in &exprs {
        let families = queried_families(expr);
        assert!(!families.is_empty(), "{expr}");
        for family in families {
            assert!(
                exported.contains(&family),
                "{expr}: no {family} in {exported:?}"
            );
        }
    }
}

#[test]
fn the_alerts_fire_when_they_should() {
    let mut args = TEMPLATE.to_vec();
    args.extend([
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--show-only",
        "templates/prometheusrule.yaml",
    ]);
    let (ok, out, err) = helm(&args);
    assert!(ok, "helm template: {err}");
    let rule: serde_yaml::Value = serde_yaml::from_str(&out).expect("a PrometheusRule");
    let dir = std::env::temp_dir().join(format!("pgsnap-alerts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("alerts.rules.yaml"),
        serde_yaml::to_string(&rule["spec"]).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        repo_root().join("charts/pgsnap/tests/alerts.test.yaml"),
        dir.join("alerts.test.yaml"),
    )
    .unwrap();
    for check in [
        ["check", "rules", "alerts.rules.yaml"],
        ["test", "rules", "alerts.test.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(check)
            .current_dir(&dir)
            .output()
            .expect("promtool (hack/deps installs it)");
        assert!(
            out.status.success(),
            "promtool {check:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_values_are_refused() {
    for bad in [
        "maxConcurrentBackups=0",
        "watchNamespaces={a,b}",
        "logging.level=loud",
        "image.pullPolicy=Sometimes",
        "unknownKey=1",
    ] {
        let mut args = TEMPLATE.to_vec();
        args.extend(["--set", bad]);
        let (ok, _, err) = helm(&args);
        assert!(!ok, "helm accepted {bad}");
        assert!(
            err.contains("values don't meet the specifications of the schema"),
            "{bad}: {err}"
        );
    }
}

/// The operator as users run it: `helm install`, a Deployment whose Pod runs `pgsnap:dev`
/// with the chart's ServiceAccount (in-cluster configuration, leader election on), watching
/// one namespace; a Backup there completes.
#[tokio::test]
async fn helm_install_runs_the_operator_and_a_backup_completes() {
    let cluster = Cluster::from_env().await;
    let ns = cluster.namespace.clone();
    let release = format!("it-{}", &ns[ns.len() - 5..]);
    let (ok, out, err) = install(&release, &ns);
    assert!(ok, "helm install:\n{out}\n{err}");

    let db = postgres_pod(17).create(&cluster).await;
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("pw".into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(
            "password".to_string(),
            db.password.clone(),
        )])),
        ..Default::default()
    };
    cluster
        .api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let backup: Backup = serde_json::from_value(json!({
        "apiVersion": "pgsnap.io/v1alpha1", "kind": "Backup",
        "metadata": {"name": "via-helm"},
        "spec": {
            "target": {"podName": db.name},
            "connection": {"passwordSecretRef": {"name": "pw", "key": "password"}},
            "checkpoint": "Fast",
            "waitForArchive": false,
        },
    }))
    .unwrap();
    cluster
        .api::<Backup>()
        .create(&PostParams::default(), &backup)
        .await
        .unwrap();
    let done = cluster
        .wait_for(
            cluster.api::<Backup>(),
            "via-helm",
            "Completed or Failed",
            Duration::from_secs(120),
            |b: Option<&Backup>| {
                b.and_then(|b| b.status.as_ref())
                    .and_then(|s| s.phase)
                    .is_some_and(Phase::is_terminal)
            },
        )
        .await;
    let status = done.status.unwrap();
    let operator_logs = {
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = cluster.api();
        let list = pods
            .list(&kube::api::ListParams::default().labels("app.kubernetes.io/name=pgsnap"))
            .await
            .unwrap();
        let mut logs = String::new();
        for p in list.items {
            logs.push_str(&cluster.pod_logs(&p.metadata.name.unwrap_or_default()).await);
        }
        logs
    };
    assert_eq!(
        status.phase,
        Some(Phase::Completed),
        "{:?}\noperator:\n{operator_logs}",
        status.error
    );

    // `kubectl pgsnap check` finds this operator by its Lease and asks the API server what
    // its pod's ServiceAccount may do: all a Backup needs here, and not in a namespace it
    // does not watch.
    let lease = format!("{ns}/pgsnap-leader");
    let (code, out, err) = kubectl_pgsnap(&[
        "check",
        &db.name,
        "-n",
        &ns,
        "--secret",
        "pw/password",
        "--operator-lease",
        &lease,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let rows = check_rows(&out);
    let operator = rows
        .iter()
        .find(|r| r.0 == "operator")
        .expect("the operator line");
    assert!(
        operator.0 == "operator"
            && operator.2.starts_with(&format!("{release}-"))
            && operator
                .2
                .ends_with(&format!("; its ServiceAccount may act in {ns}")),
        "{out}"
    );
    let (code, out, _) = kubectl_pgsnap(&[
        "check",
        "nothing",
        "-n",
        "default",
        "--operator-lease",
        &lease,
    ]);
    assert_eq!(code, 1, "{out}");
    let rows = check_rows(&out);
    let operator = rows
        .iter()
        .find(|r| r.0 == "operator")
        .expect("the operator line");
    assert!(
        operator.1 == "✗"
            && operator.2.starts_with("OperatorNotAllowed: ")
            && operator
                .2
                .contains("may not watch backups in default: its RBAC does not reach this namespace (the chart: add it to watchNamespaces)"),
        "{out}"
    );

    // Uninstall the way a user would: Backups first, while the operator still removes their finalizers.
    cluster
        .api::<Backup>()
        .delete("via-helm", &Default::default())
        .await
        .unwrap();
    let uid = done.metadata.uid.unwrap();
    cluster
        .wait_deleted(
            cluster.api::<Backup>(),
            "via-helm",
            &uid,
            Duration::from_secs(30),
        )
        .await;
    let (ok, _, err) = helm(&["uninstall", &release, "--namespace", &ns, "--wait"]);
    assert!(ok, "helm uninstall: {err}");
}

/// `helm upgrade` while a backup runs, as users upgrade: a changed value, then a new image
/// tag. Ready means serving, not leading, so the rolling update's new pod turns Ready beside
/// the old leader and the rollout finishes; the old pod, stopped, ends its backup
/// `OperatorShutdown` (or lets it complete); the new pod takes the lease and completes the
/// next backup. Nothing is left running or stuck.
#[tokio::test]
async fn helm_upgrade_finishes_while_a_backup_runs() {
    let cluster = Cluster::from_env().await;
    let ns = cluster.namespace.clone();
    let release = format!("up-{}", &ns[ns.len() - 5..]);
    let (ok, out, err) = install(&release, &ns);
    assert!(ok, "helm install:\n{out}\n{err}");
    let db = postgres_pod(17).create(&cluster).await;
    let secret = db.password_secret(&cluster).await;
    // A cut that takes a while: the upgrade lands mid-backup.
    let slow = snapshot_class(&cluster, "slow-cut", "Delete", json!({"cutSeconds": "15"})).await;
    let spec = |class: Option<&str>| {
        let mut rest = json!({"checkpoint": "Fast", "waitForArchive": false});
        if let Some(class) = class {
            rest["volumeSnapshotClassName"] = json!(class);
        }
        on(&db, &secret, rest)
    };
    for (step, change) in [("value", "logging.format=text"), ("image", "image.tag=v2")] {
        let during = apply(
            &cluster,
            backup_spec(&format!("during-{step}"), spec(Some(&slow))),
        )
        .await;
        wait_phase(
            &cluster,
            &during,
            &[Phase::Snapshotting],
            Duration::from_secs(60),
        )
        .await;
        let t0 = std::time::Instant::now();
        let (ok, out, err) = helm(&[
            "upgrade",
            &release,
            "charts/pgsnap",
            "--namespace",
            &ns,
            "--reuse-values",
            "--set",
            change,
            "--wait",
            "--timeout",
            "2m",
        ]);
        assert!(ok, "helm upgrade --set {change}:\n{out}\n{err}");
        eprintln!("helm upgrade --set {change}: {:?}", t0.elapsed());
        let ended = wait_terminal(&cluster, &during).await;
        let status = ended.status.unwrap();
        eprintln!(
            "the backup during the upgrade: {:?} {:?}",
            status.phase,
            status.error.as_ref().map(|e| &e.reason)
        );
        match status.phase {
            Some(Phase::Completed) => {}
            _ => assert_eq!(
                status.error.as_ref().map(|e| e.reason.as_str()),
                Some("OperatorShutdown"),
                "{change}: {status:?}"
            ),
        }
        let after = apply(&cluster, backup_spec(&format!("after-{step}"), spec(None))).await;
        let next = wait_terminal(&cluster, &after).await.status.unwrap();
        assert_eq!(
            next.phase,
            Some(Phase::Completed),
            "{change}: {:?}",
            next.error
        );
    }
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = cluster.api();
    let operators = pods
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/name=pgsnap"))
        .await
        .unwrap();
    let images: Vec<_> = operators
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            p.spec.as_ref().unwrap().containers[0]
                .image
                .clone()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(images, ["pgsnap:v2"], "one operator pod, the upgraded one");

    for b in cluster
        .api::<Backup>()
        .list(&Default::default())
        .await
        .unwrap()
    {
        cluster
            .api::<Backup>()
            .delete(&b.name_any(), &Default::default())
            .await
            .unwrap();
        cluster
            .wait_deleted(
                cluster.api::<Backup>(),
                &b.name_any(),
                &b.uid().unwrap(),
                Duration::from_secs(60),
            )
            .await;
    }
    let (ok, _, err) = helm(&["uninstall", &release, "--namespace", &ns, "--wait"]);
    assert!(ok, "helm uninstall: {err}");
    delete_snapshot_class(&cluster, &slow).await;
}
