//! `kubectl pgsnap check`: the operator's own steps before backup mode, run from the command
//! line, and whether an operator runs that may back up this namespace.

use k8s_openapi::api::authorization::v1::{
    LocalSubjectAccessReview, ResourceAttributes, SubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};

use super::{BackupArgs, Error, backup_of, show};
use crate::api::backup::WalSource;
use crate::backup::{SecretsRead, phase, read_secrets, task};
use crate::controller::Failure;
use crate::snapshots::group::CutPlan;

#[derive(serde::Serialize)]
pub struct Check {
    check: &'static str,
    #[serde(flatten)]
    result: Checked,
}

#[derive(serde::Serialize)]
#[serde(tag = "result", content = "detail", rename_all = "lowercase")]
enum Checked {
    Passed(String),
    /// The reason a Backup would fail with, and its message (which says the fix).
    Failed(Failure),
    /// A backup would run, at a risk the detail names with its fix.
    Warned(String),
    /// Not checked: an earlier check it needs failed.
    Skipped(String),
}

impl From<Result<String, Failure>> for Checked {
    fn from(r: Result<String, Failure>) -> Self {
        match r {
            Ok(detail) => Checked::Passed(detail),
            Err(f) => Checked::Failed(f),
        }
    }
}

/// Whether a backup would pass every check.
pub fn passed(checks: &[Check]) -> bool {
    checks
        .iter()
        .all(|c| !matches!(c.result, Checked::Failed(_)))
}

/// The operator's own steps before backup mode, in its order, each reported (a step whose
/// input an earlier one could not give is skipped), then the operator itself.
pub async fn run(client: &Client, namespace: &str, args: &BackupArgs) -> Result<Vec<Check>, Error> {
    let mut checks = steps(client, namespace, args).await?;
    checks.push(Check {
        check: "operator",
        result: operator(client, namespace, &args.operator_lease).await,
    });
    Ok(checks)
}

async fn steps(client: &Client, namespace: &str, args: &BackupArgs) -> Result<Vec<Check>, Error> {
    // Never applied: the operator's steps run on it here.
    let backup = std::sync::Arc::new(backup_of(namespace, "kubectl-pgsnap-check", args)?);
    let mut checks = Vec::new();
    let mut push = |check, result: Checked| checks.push(Check { check, result });
    let skipped = |what: &str| Checked::Skipped(format!("needs {what}"));

    let pods = match task::target_pods(client, &backup).await {
        Ok(pods) => {
            push(
                "target pod",
                Checked::Passed(format!("{} is running", args.pod)),
            );
            pods
        }
        Err(f) => {
            push("target pod", Checked::Failed(f));
            for c in [
                "credentials",
                "connection",
                "server",
                "WAL source",
                "volumes",
                "snapshot classes",
                "group snapshot",
            ] {
                push(c, skipped("the target pod"));
            }
            return Ok(checks);
        }
    };
    let secrets = match read_secrets(client, &backup).await? {
        SecretsRead::Found(s) => {
            let what = match &args.secret {
                Some(s) => format!("Secret {s}"),
                None => "no password (trust or a client certificate)".into(),
            };
            push("credentials", Checked::Passed(what));
            s
        }
        SecretsRead::Missing(message) => {
            push(
                "credentials",
                Checked::Failed(Failure::new("SecretNotFound", message)),
            );
            return Ok(checks);
        }
        SecretsRead::Invalid(f) => {
            push("credentials", Checked::Failed(f));
            return Ok(checks);
        }
    };
    let work = task::Assignment {
        backup: backup.clone(),
        connect_timeout: std::time::Duration::from_secs(10),
        pods,
        password: secrets.password,
        ca_cert: secrets.ca_cert,
    };
    let (mut session, pod) = match task::connect(&work).await {
        Ok(connected) => connected,
        Err(mut f) => {
            if f.reason == "Unreachable" {
                f.message.push_str(
                    " (check connects from this machine to the pod's address, as the operator does from its pod: run it where pod addresses are reachable)",
                );
            }
            push("connection", Checked::Failed(f));
            for c in [
                "server",
                "WAL source",
                "volumes",
                "snapshot classes",
                "group snapshot",
            ] {
                push(c, skipped("a connection"));
            }
            return Ok(checks);
        }
    };
    let server = session.server().clone();
    push(
        "connection",
        Checked::Passed(format!(
            "PostgreSQL {} as {}, {}",
            server.version,
            server.role.name,
            if server.in_recovery {
                "standby"
            } else {
                "primary"
            }
        )),
    );
    let ready = session.check_ready().await.map_err(Failure::from);
    let standby = match server.in_recovery {
        true => "; the primary writes full-page images",
        false => "",
    };
    let detail = format!(
        "wal_level {}; {} may call the backup functions{standby}",
        server.wal_level, server.role.name
    );
    let server_row = match (ready, session.unpinnable()) {
        (Ok(()), Some(why)) => Checked::Warned(format!(
            "{detail}; but no slot will pin the backup's WAL: {why}, so a checkpoint may recycle it before it is kept"
        )),
        (ready, _) => ready.map(|()| detail).into(),
    };
    push("server", server_row);
    let source = phase::wal_source(
        backup.spec.wal_source,
        server.in_recovery,
        &server.archive_mode,
        &server.archiver,
    );
    let planned = task::plan_snapshots(&mut session, &pod, &backup.spec).await;
    let wal = match (source, &planned) {
        (Ok(WalSource::Snapshot), Ok((plan, location))) => {
            let mut listing = session.check_wal_listing().await.map_err(Failure::from);
            if listing.is_ok() && server.in_recovery {
                let receiver = session
                    .wal_receiver(crate::postgres::Step::Connect)
                    .await
                    .map_err(Failure::from);
                listing =
                    receiver.and_then(|r| phase::standby_streams(r.as_ref(), &server.role.name));
            }
            listing
                .and_then(|()| phase::wal_volume(plan, location.unconfirmed()))
                .map(|(p, _)| {
                    format!(
                        "Snapshot: kept with the backup, in a snapshot of {} cut after the stop",
                        p.persistent_volume_claim
                    )
                })
                .into()
        }
        (Ok(WalSource::Snapshot), Err(_)) => skipped("the volumes"),
        (Ok(WalSource::Archive), _) => Checked::Passed(format!("Archive ({})", server.archiver)),
        (Err(f), _) => Checked::Failed(f),
    };
    push("WAL source", wal);
    match planned {
        Ok((plan, location)) => {
            let claims: Vec<String> = plan
                .iter()
                .map(|p| format!("{:?}: {}", p.role, p.persistent_volume_claim))
                .collect();
            let mut detail = claims.join(", ");
            if let Some(note) = location.unconfirmed() {
                detail.push_str(&format!(" ({note})"));
            }
            push("volumes", Checked::Passed(detail));
            let classes = task::snapshot_classes(client, &backup, &plan).await;
            let detail = |classes: Vec<crate::snapshots::ResolvedClass>| {
                let named: Vec<String> = plan
                    .iter()
                    .zip(classes)
                    .map(|(p, c)| {
                        format!("{}: {} ({})", p.persistent_volume_claim, c.name, c.driver)
                    })
                    .collect();
                named.join(", ")
            };
            let cut = match &classes {
                Ok(classes) => match task::cut_plan(client, &backup, classes).await {
                    Ok(CutPlan::Group { class }) => Checked::Passed(format!(
                        "one VolumeGroupSnapshot of class {class}: every volume at one instant"
                    )),
                    Ok(CutPlan::Volumes {
                        why_not_group: Some(why),
                    }) => Checked::Passed(format!("one snapshot per volume: {why}")),
                    Ok(CutPlan::Volumes {
                        why_not_group: None,
                    }) => Checked::Passed("one snapshot per volume".into()),
                    Err(f) => Checked::Failed(f),
                },
                Err(_) => skipped("the snapshot classes"),
            };
            push("snapshot classes", classes.map(detail).into());
            push("group snapshot", cut);
        }
        Err(f) => {
            push("volumes", Checked::Failed(f));
            push("snapshot classes", skipped("the volumes"));
            push("group snapshot", skipped("the volumes"));
        }
    }
    Ok(checks)
}

pub fn table(checks: &[Check], colour: bool) -> String {
    let paint = |code, text| show::paint(colour, code, text);
    let mut rows = vec![["CHECK", "", "DETAIL"].map(String::from).to_vec()];
    for c in checks {
        let (mark, detail) = match &c.result {
            Checked::Passed(d) => (paint(show::GREEN, "✓"), d.clone()),
            Checked::Failed(f) => (
                paint(show::RED, "✗"),
                format!("{}: {}", f.reason, f.message),
            ),
            Checked::Warned(d) => (paint(show::YELLOW, "!"), d.clone()),
            Checked::Skipped(d) => ("-".to_string(), d.clone()),
        };
        rows.push(vec![c.check.to_string(), mark, detail]);
    }
    show::table(&rows)
}

/// What a Backup in `namespace` needs the operator's ServiceAccount to be allowed.
const OPERATOR_NEEDS: [(&str, &str, &str, &str); 6] = [
    ("watch", "pgsnap.io", "backups", ""),
    ("patch", "pgsnap.io", "backups", "status"),
    ("get", "", "pods", ""),
    ("get", "", "secrets", ""),
    ("create", "snapshot.storage.k8s.io", "volumesnapshots", ""),
    ("create", "events.k8s.io", "events", ""),
];

/// A leader renewing its Lease and, when it runs as a pod here, watching `namespace` with a
/// ServiceAccount allowed what a Backup there needs, as the API server's authorizer says.
async fn operator(client: &Client, namespace: &str, lease: &str) -> Checked {
    let Some((lease_ns, lease_name)) = lease.split_once('/') else {
        return Checked::Skipped(format!("--operator-lease {lease} is not NAMESPACE/NAME"));
    };
    let leases = Api::<Lease>::namespaced(client.clone(), lease_ns);
    let spec = match leases.get_opt(lease_name).await {
        Ok(Some(lease)) => lease.spec.unwrap_or_default(),
        Ok(None) => {
            return Checked::Failed(Failure::new(
                "OperatorNotFound",
                format!(
                    "no Lease {lease_ns}/{lease_name}: no pgsnap operator runs there; install the chart (README), or name its Lease with --operator-lease NAMESPACE/NAME"
                ),
            ));
        }
        Err(e) => return Checked::Skipped(format!("reading Lease {lease_ns}/{lease_name}: {e}")),
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let duration = u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15);
    let renewed = |s: &k8s_openapi::api::coordination::v1::LeaseSpec| s.renew_time.clone();
    let age = renewed(&spec).map(|t| Timestamp::now().duration_since(t.0).as_secs());
    let leads = match age {
        Some(age) if !holder.is_empty() && (0..=duration as i64).contains(&age) => {
            format!("{holder} leads (Lease {lease_ns}/{lease_name} renewed {age}s ago)")
        }
        // The renewal time is the leader's clock, not this machine's: what tells is whether
        // it still changes.
        _ if !holder.is_empty() => {
            let first = renewed(&spec);
            let mut changed = false;
            for _ in 0..duration {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let now = leases.get_opt(lease_name).await.ok().flatten();
                if now.and_then(|l| l.spec).as_ref().and_then(renewed) != first {
                    changed = true;
                    break;
                }
            }
            if !changed {
                return Checked::Failed(Failure::new(
                    "OperatorNotRunning",
                    format!(
                        "Lease {lease_ns}/{lease_name} was not renewed in {duration}s (last holder {holder}): no pgsnap replica leads; see the operator's pods and logs"
                    ),
                ));
            }
            format!("{holder} leads (Lease {lease_ns}/{lease_name} renewed while watched)")
        }
        _ => {
            return Checked::Failed(Failure::new(
                "OperatorNotRunning",
                format!(
                    "Lease {lease_ns}/{lease_name} has no holder: no pgsnap replica leads; see the operator's pods and logs"
                ),
            ));
        }
    };
    let pod = match Api::<Pod>::namespaced(client.clone(), lease_ns)
        .get_opt(&holder)
        .await
    {
        Ok(Some(pod)) => pod,
        Ok(None) => {
            return Checked::Passed(format!("{leads}; not a pod here, its rights unchecked"));
        }
        Err(e) => return Checked::Skipped(format!("{leads}; reading its pod: {e}")),
    };
    let spec = pod.spec.unwrap_or_default();
    let account = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    let user = format!("system:serviceaccount:{lease_ns}:{account}");
    for (verb, group, resource, subresource) in OPERATOR_NEEDS {
        // Namespaced, so a namespace's admin may ask too.
        let review = LocalSubjectAccessReview {
            metadata: kube::api::ObjectMeta {
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            spec: SubjectAccessReviewSpec {
                user: Some(user.clone()),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{lease_ns}"),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.into()),
                    group: Some(group.into()),
                    resource: Some(resource.into()),
                    subresource: Some(subresource.into()),
                    namespace: Some(namespace.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            status: None,
        };
        let allowed = Api::<LocalSubjectAccessReview>::namespaced(client.clone(), namespace)
            .create(&PostParams::default(), &review)
            .await
            .map(|r| r.status.is_some_and(|s| s.allowed));
        let what = match subresource {
            "" => resource.to_string(),
            s => format!("{resource}/{s}"),
        };
        match allowed {
            Ok(true) => {}
            Ok(false) => {
                return Checked::Failed(Failure::new(
                    "OperatorNotAllowed",
                    format!(
                        "{leads}, but its ServiceAccount {lease_ns}/{account} may not {verb} {what} in {namespace}: its RBAC does not reach this namespace (the chart: add it to watchNamespaces)"
                    ),
                ));
            }
            Err(e) => {
                return Checked::Skipped(format!("{leads}; asking whether it may act here: {e}"));
            }
        }
    }
    Checked::Passed(format!(
        "{leads}; its ServiceAccount may act in {namespace}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::golden;

    #[test]
    fn the_check_table_reads_as_the_golden_file() {
        let checks = vec![
            Check {
                check: "target pod",
                result: Checked::Passed("orders-db-0 is running".into()),
            },
            Check {
                check: "server",
                result: Checked::Failed(Failure::new(
                    "WalLevelTooLow",
                    "wal_level is minimal: set wal_level = replica and restart",
                )),
            },
            Check {
                check: "volumes",
                result: Checked::Skipped("needs a connection".into()),
            },
            Check {
                check: "server",
                result: Checked::Warned("no slot will pin the backup's WAL".into()),
            },
        ];
        assert!(!passed(&checks));
        assert!(passed(&checks[..1]));
        golden("plugin-check.txt", &table(&checks, false));
        golden(
            "plugin-check.json",
            &serde_json::to_string_pretty(&checks).unwrap(),
        );
    }
}
