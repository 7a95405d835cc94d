//! The test cluster itself: storage, snapshots, garbage collection, RBAC, and the node
//! agent running PostgreSQL and Jobs. Needs `e2e/cluster up` (`make test` does it); a
//! missing cluster fails these tests with a message saying so.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use kube::{Api, Client, Resource};
use pgsnap_e2e::agent::network;
use pgsnap_e2e::{Cluster, postgres_pod};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn from_json<K: serde::de::DeserializeOwned>(v: serde_json::Value) -> K {
    serde_json::from_value(v).expect("valid object")
}

async fn create<K>(api: &Api<K>, v: serde_json::Value) -> K
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    api.create(&PostParams::default(), &from_json(v))
        .await
        .expect("create")
}

fn pvc(name: &str, from_snapshot: Option<&str>) -> serde_json::Value {
    let mut v = json!({
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    });
    if let Some(s) = from_snapshot {
        v["spec"]["dataSource"] =
            json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": s});
    }
    v
}

fn bound(p: Option<&PersistentVolumeClaim>) -> bool {
    p.and_then(|p| p.status.as_ref())
        .and_then(|s| s.phase.as_deref())
        == Some("Bound")
}

#[tokio::test]
async fn a_pvc_is_provisioned_and_bound() {
    let cluster = Cluster::from_env().await;
    let pvcs = cluster.api::<PersistentVolumeClaim>();
    create(&pvcs, pvc("data", None)).await;
    let claim = cluster.wait_for(pvcs, "data", "Bound", T, bound).await;
    let pv = claim
        .spec
        .and_then(|s| s.volume_name)
        .expect("a bound claim names its volume");
    assert!(
        cluster.pvc_host_dir("data").await.is_dir(),
        "the hostpath directory of {pv} exists"
    );
}

#[tokio::test]
async fn a_volume_snapshot_restores_into_a_new_pvc() {
    let cluster = Cluster::from_env().await;
    let pvcs = cluster.api::<PersistentVolumeClaim>();
    create(&pvcs, pvc("source", None)).await;
    let dir = cluster.pvc_host_dir("source").await;
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/hello.txt"), "hello from the source volume\n").unwrap();

    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "snapshot.storage.k8s.io",
        "v1",
        "VolumeSnapshot",
    ));
    let snapshots: Api<DynamicObject> =
        Api::namespaced_with(cluster.client.clone(), &cluster.namespace, &ar);
    let snapshot: DynamicObject = from_json(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "snap"},
        "spec": {"source": {"persistentVolumeClaimName": "source"}}
    }));
    snapshots
        .create(&PostParams::default(), &snapshot)
        .await
        .expect("create VolumeSnapshot");
    let ready = |s: Option<&DynamicObject>| {
        s.is_some_and(|s| s.data["status"]["readyToUse"] == json!(true))
    };
    let snap = cluster
        .wait_for(snapshots, "snap", "readyToUse", T, ready)
        .await;
    assert!(snap.data["status"]["boundVolumeSnapshotContentName"].is_string());
    assert!(
        snap.data["status"]["creationTime"].is_string(),
        "a cut snapshot has a creationTime"
    );

    create(&pvcs, pvc("restored", Some("snap"))).await;
    cluster.wait_for(pvcs, "restored", "Bound", T, bound).await;
    let restored = cluster.pvc_host_dir("restored").await;
    assert_ne!(restored, dir);
    assert_eq!(
        std::fs::read_to_string(restored.join("sub/hello.txt")).unwrap(),
        "hello from the source volume\n"
    );
}

/// A VolumeGroupSnapshot of two PVCs (by label, class csi-hostpath-group): one member
/// VolumeSnapshot per PVC, owned by the group; a member restores like any snapshot; deleting
/// the group deletes the members, their contents and the driver's copies.
#[tokio::test]
async fn a_volume_group_snapshot_cuts_each_pvc_and_deletes_with_its_members() {
    let cluster = Cluster::from_env().await;
    let pvcs = cluster.api::<PersistentVolumeClaim>();
    let mut dirs = vec![];
    for name in ["one", "two"] {
        let mut claim = pvc(name, None);
        claim["metadata"]["labels"] = json!({"e2e.pgsnap.io/group": "together"});
        create(&pvcs, claim).await;
        let dir = cluster.pvc_host_dir(name).await;
        std::fs::write(dir.join("hello.txt"), format!("hello from {name}\n")).unwrap();
        dirs.push(dir);
    }
    // Not in the group: the selector must leave it out.
    create(&pvcs, pvc("other", None)).await;
    cluster
        .wait_for(pvcs.clone(), "other", "Bound", T, bound)
        .await;

    let dynamic = |group: &str, version: &str, kind: &str| {
        ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind))
    };
    let vgs_ar = dynamic("groupsnapshot.storage.k8s.io", "v1", "VolumeGroupSnapshot");
    let groups: Api<DynamicObject> =
        Api::namespaced_with(cluster.client.clone(), &cluster.namespace, &vgs_ar);
    let group_contents: Api<DynamicObject> = Api::all_with(
        cluster.client.clone(),
        &dynamic(
            "groupsnapshot.storage.k8s.io",
            "v1",
            "VolumeGroupSnapshotContent",
        ),
    );
    let snapshots: Api<DynamicObject> = Api::namespaced_with(
        cluster.client.clone(),
        &cluster.namespace,
        &dynamic("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"),
    );
    let contents: Api<DynamicObject> = Api::all_with(
        cluster.client.clone(),
        &dynamic("snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent"),
    );

    let t0 = std::time::Instant::now();
    let group: DynamicObject = from_json(json!({
        "apiVersion": "groupsnapshot.storage.k8s.io/v1", "kind": "VolumeGroupSnapshot",
        "metadata": {"name": "both"},
        "spec": {
            "volumeGroupSnapshotClassName": "csi-hostpath-group",
            "source": {"selector": {"matchLabels": {"e2e.pgsnap.io/group": "together"}}}
        }
    }));
    groups
        .create(&PostParams::default(), &group)
        .await
        .expect("create VolumeGroupSnapshot");
    let ready = |s: Option<&DynamicObject>| {
        s.is_some_and(|s| s.data["status"]["readyToUse"] == json!(true))
    };
    let group = cluster
        .wait_for(groups.clone(), "both", "readyToUse", T, ready)
        .await;
    let took = t0.elapsed();
    let group_uid = group.metadata.uid.clone().unwrap();
    let group_content = group.data["status"]["boundVolumeGroupSnapshotContentName"]
        .as_str()
        .expect("a ready group names its content")
        .to_string();
    assert!(group.data["status"]["creationTime"].is_string());

    // The members: made by the snapshot-controller once the group is cut, so they may come
    // (and be ready) a moment after the group is.
    let deadline = std::time::Instant::now() + T;
    let members = loop {
        let members: Vec<DynamicObject> = snapshots
            .list(&Default::default())
            .await
            .expect("list VolumeSnapshots")
            .items
            .into_iter()
            .filter(|s| {
                s.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.uid == group_uid && o.kind == "VolumeGroupSnapshot")
            })
            .collect();
        if members.len() >= 2 || std::time::Instant::now() > deadline {
            break members;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut by_claim = std::collections::BTreeMap::new();
    for m in &members {
        let name = m.metadata.name.clone().unwrap();
        let m = cluster
            .wait_for(snapshots.clone(), &name, "readyToUse", T, ready)
            .await;
        assert_eq!(m.data["status"]["volumeGroupSnapshotName"], json!("both"));
        let claim = m.data["spec"]["source"]["persistentVolumeClaimName"]
            .as_str()
            .expect("a member names its PVC")
            .to_string();
        let content = m.data["status"]["boundVolumeSnapshotContentName"]
            .as_str()
            .expect("a ready member names its content")
            .to_string();
        let content = contents.get(&content).await.expect("member content");
        by_claim.insert(claim, (m, content));
    }
    assert_eq!(
        by_claim.keys().map(String::as_str).collect::<Vec<_>>(),
        ["one", "two"],
        "one member per PVC with the label, none for the other"
    );
    eprintln!(
        "group of {} volumes readyToUse in {took:?}, members {:?}",
        members.len(),
        members
            .iter()
            .map(|m| m.metadata.name.clone().unwrap())
            .collect::<Vec<_>>()
    );

    // A member restores like any VolumeSnapshot.
    let member_of_two = by_claim["two"].0.metadata.name.clone().unwrap();
    create(&pvcs, pvc("restored", Some(&member_of_two))).await;
    cluster.wait_for(pvcs, "restored", "Bound", T, bound).await;
    let restored = cluster.pvc_host_dir("restored").await;
    assert!(!dirs.contains(&restored));
    assert_eq!(
        std::fs::read_to_string(restored.join("hello.txt")).unwrap(),
        "hello from two\n"
    );

    // Deleting the group deletes its members, their contents and the driver's copies.
    let handles: Vec<String> = by_claim
        .values()
        .map(|(_, c)| {
            c.data["status"]["snapshotHandle"]
                .as_str()
                .expect("a member content has a handle")
                .to_string()
        })
        .collect();
    let group_content_uid = group_contents
        .get(&group_content)
        .await
        .expect("group content")
        .metadata
        .uid
        .unwrap();
    groups
        .delete("both", &DeleteParams::background())
        .await
        .expect("delete VolumeGroupSnapshot");
    cluster.wait_deleted(groups, "both", &group_uid, T).await;
    cluster
        .wait_deleted(group_contents, &group_content, &group_content_uid, T)
        .await;
    for (m, c) in by_claim.values() {
        let (name, uid) = (
            m.metadata.name.clone().unwrap(),
            m.metadata.uid.clone().unwrap(),
        );
        cluster
            .wait_deleted(snapshots.clone(), &name, &uid, T)
            .await;
        let (name, uid) = (
            c.metadata.name.clone().unwrap(),
            c.metadata.uid.clone().unwrap(),
        );
        cluster.wait_deleted(contents.clone(), &name, &uid, T).await;
    }
    let state = cluster.dir.join("hostpath");
    for h in handles {
        assert!(
            !state.join(format!("{h}.snap")).exists(),
            "the driver's copy {h}.snap is removed with its group"
        );
    }
}

#[tokio::test]
async fn deleting_an_owner_deletes_its_dependent() {
    let cluster = Cluster::from_env().await;
    let cms = cluster.api::<ConfigMap>();
    let owner = create(&cms, json!({"metadata": {"name": "owner"}})).await;
    let owner_ref = owner.controller_owner_ref(&()).expect("owner reference");
    let dependent = create(
        &cms,
        json!({"metadata": {"name": "dependent", "ownerReferences": [owner_ref]}}),
    )
    .await;
    // The uid before the delete: the collector may be done before a later read.
    let uid = dependent.metadata.uid.unwrap();
    cms.delete("owner", &DeleteParams::background())
        .await
        .expect("delete owner");
    cluster.wait_deleted(cms, "dependent", &uid, T).await;
}

#[tokio::test]
async fn a_service_account_needs_a_role() {
    let cluster = Cluster::from_env().await;
    let ns = cluster.namespace.clone();
    let sas = cluster.api::<ServiceAccount>();
    create(&sas, json!({"metadata": {"name": "reader"}})).await;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request("reader", &PostParams::default(), &request)
        .await
        .expect("TokenRequest");
    let token = token.status.expect("token").token;

    let mut config = cluster.client_config().await;
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    let reader = Client::try_from(config).unwrap();
    let pods: Api<Pod> = Api::namespaced(reader, &ns);
    match pods.list(&Default::default()).await {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("a ServiceAccount without a Role must be denied, got {other:?}"),
    }

    create(
        &cluster.api::<Role>(),
        json!({
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
        }),
    )
    .await;
    create(&cluster.api::<RoleBinding>(), json!({
        "metadata": {"name": "reader-reads-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}]
    }))
    .await;
    // The authorizer learns about new bindings through its informers: a moment's delay.
    let mut last = None;
    for _ in 0..50 {
        match pods.list(&Default::default()).await {
            Ok(_) => return,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("with the Role bound, listing pods must be allowed: {last:?}");
}

#[tokio::test]
async fn a_postgres_16_pod_runs_and_answers_sql() {
    let cluster = Cluster::from_env().await;
    let db = postgres_pod(16).create(&cluster).await;
    assert!(db.sql_value("SHOW server_version").await.starts_with("16."));
    db.sql("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)")
        .await;
    assert_eq!(db.sql_value("SELECT sum(x) FROM t").await, "3");
    assert_eq!(
        db.sql_value("SHOW data_directory").await,
        pgsnap_e2e::postgres::PGDATA
    );
    assert!(
        db.pgdata_host_dir().join("PG_VERSION").is_file(),
        "PGDATA lives on the PVC"
    );

    // Inside the container: the image's user, its PGDATA, its mounts.
    let out = cluster
        .exec(
            &db.name,
            "postgres",
            &["sh", "-c", "id -un; cat $PGDATA/PG_VERSION"],
        )
        .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "postgres\n16\n",
        "{out:?}"
    );

    let pods = cluster.api::<Pod>();
    let pod = pods.get(&db.name).await.unwrap();
    let status = pod.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some(db.host.as_str()));
    assert_ne!(db.host, "127.0.0.1", "an address of its own");
    assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));

    // Deletion: the server gets its stop signal, the pod object goes away.
    let uid = pod.metadata.uid.unwrap();
    pods.delete(&db.name, &DeleteParams::default())
        .await
        .unwrap();
    cluster.wait_deleted(pods, &db.name, &uid, T).await;
    assert!(
        std::net::TcpStream::connect_timeout(
            &format!("{}:{}", db.host, db.port).parse().unwrap(),
            std::time::Duration::from_secs(2)
        )
        .is_err(),
        "the server stopped"
    );
}

#[tokio::test]
async fn a_jobs_pod_runs_to_succeeded() {
    let cluster = Cluster::from_env().await;
    let jobs = cluster.api::<Job>();
    create(&jobs, json!({
        "metadata": {"name": "hello"},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox:1.36",
                "command": ["sh", "-c", "echo hello from $(POD_NAME) in $POD_NAMESPACE; cat /var/run/secrets/kubernetes.io/serviceaccount/namespace"],
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
                ]}]
        }}}
    }))
    .await;
    let complete = |j: Option<&Job>| {
        j.and_then(|j| j.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
            })
    };
    let job = cluster
        .wait_for(jobs, "hello", "finished", T, complete)
        .await;
    let pods = cluster
        .api::<Pod>()
        .list(&kube::api::ListParams::default().labels("job-name=hello"))
        .await
        .unwrap();
    let pod = pods.items.first().expect("the Job made a pod");
    let name = pod.metadata.name.clone().unwrap();
    let log = cluster.container_log(&name, "main").await;
    assert_eq!(
        job.status.and_then(|s| s.succeeded),
        Some(1),
        "pod log:\n{log}"
    );
    assert_eq!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded")
    );
    assert_eq!(
        log,
        format!(
            "hello from {name} in {}\n{}",
            cluster.namespace, cluster.namespace
        )
    );
}

#[tokio::test]
async fn an_unknown_image_fails_the_pod() {
    let cluster = Cluster::from_env().await;
    let pods = cluster.api::<Pod>();
    create(
        &pods,
        json!({
            "metadata": {"name": "nginx"},
            "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}
        }),
    )
    .await;
    let failed = |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref())
            .and_then(|s| s.phase.as_deref())
            == Some("Failed")
    };
    let pod = cluster.wait_for(pods, "nginx", "Failed", T, failed).await;
    let state = pod.status.unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap();
    let waiting = state.waiting.expect("waiting");
    assert_eq!(waiting.reason.as_deref(), Some("ErrImagePull"));
    assert!(
        waiting
            .message
            .unwrap()
            .contains("not in the node agent's image table")
    );
}

#[tokio::test]
async fn postgres_pods_with_wal_tablespace_and_archive_volumes_and_a_standby() {
    let cluster = Cluster::from_env().await;
    for major in [11, 18] {
        let primary = postgres_pod(major)
            .name(&format!("primary{major}"))
            .archive_volume()
            .wal_volume(true)
            .tablespace_volume(true)
            .setting("max_wal_senders", "5")
            .create(&cluster)
            .await;
        primary.sql("CREATE TABLE t (x int) TABLESPACE ts1; INSERT INTO t SELECT generate_series(1, 1000)").await;
        primary.sql("SELECT pg_switch_wal()").await;
        let standby = postgres_pod(major)
            .name(&format!("standby{major}"))
            .standby_of(&primary)
            .create(&cluster)
            .await;
        assert_eq!(standby.sql_value("SELECT pg_is_in_recovery()").await, "t");
        primary.sql("INSERT INTO t VALUES (1001)").await;
        let mut count = String::new();
        for _ in 0..50 {
            count = standby.sql_value("SELECT count(*) FROM t").await;
            if count == "1001" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(count, "1001", "the standby streams from the primary");
        let archive = primary.archive_dir.clone().unwrap();
        assert!(
            std::fs::read_dir(&archive).unwrap().count() > 0,
            "WAL is archived"
        );
        primary.pgbench_init(1);
        assert!(primary.pgbench_run(1).contains("tps"));
    }
}

#[tokio::test]
async fn a_pod_gets_its_volumes_env_identity_and_readiness() {
    let cluster = Cluster::from_env().await;
    create(
        &cluster.api::<ConfigMap>(),
        json!({
            "metadata": {"name": "settings"},
            "data": {"greeting": "hello", "other": "x"}
        }),
    )
    .await;
    create(
        &cluster.api::<k8s_openapi::api::core::v1::Secret>(),
        json!({
            "metadata": {"name": "creds"},
            "stringData": {"password": "s3cret"}
        }),
    )
    .await;
    // The script checks what a container sees, then becomes ready (an exec probe that runs
    // in the container's own mounts) and waits to be stopped.
    let script = r#"
        set -ex
        test "$(cat /scratch/init)" = "from the init container"
        test "$(cat /config/hello.txt)" = hello
        test "$(stat -c %a /config/hello.txt)" = 640  # 0600 plus fsGroup read
        test "$PASSWORD" = s3cret && test "$CFG_greeting" = hello
        test "$(id -u):$(id -g)" = 1234:2345 && id -G | grep -qw 3456
        test "$(stat -c %g /scratch)" = 3456
        SA=/var/run/secrets/kubernetes.io/serviceaccount
        test "$(cat $SA/namespace)" = "$NS"
        code=$(curl -s -o /scratch/answer -w '%{http_code}' --cacert $SA/ca.crt \
          -H "Authorization: Bearer $(cat $SA/token)" \
          https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/namespaces/$NS/secrets)
        test "$code" = 403 && grep -q "system:serviceaccount:$NS:default" /scratch/answer
        echo checked > /scratch/ok
        exec sleep 1000
    "#;
    create(&cluster.api::<Pod>(), json!({
        "metadata": {"name": "inspector"},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "securityContext": {"runAsUser": 1234, "runAsGroup": 2345, "fsGroup": 3456},
            "initContainers": [{
                "name": "init", "image": "busybox",
                "command": ["sh", "-c", "echo 'from the init container' > /scratch/init"],
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]
            }],
            "containers": [{
                "name": "main", "image": "debian:13",
                // Requests make the pod Burstable: the agent must not touch status.qosClass.
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
                "command": ["bash", "-c", script],
                "env": [
                    {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                    {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
                ],
                "envFrom": [{"prefix": "CFG_", "configMapRef": {"name": "settings"}}],
                "volumeMounts": [{"name": "config", "mountPath": "/config"}, {"name": "scratch", "mountPath": "/scratch"}],
                "readinessProbe": {"exec": {"command": ["test", "-f", "/scratch/ok"]}, "periodSeconds": 1}
            }],
            "volumes": [
                {"name": "config", "configMap": {"name": "settings", "items": [{"key": "greeting", "path": "hello.txt", "mode": 0o600}]}},
                {"name": "scratch", "emptyDir": {}}
            ]
        }
    }))
    .await;
    let pods = cluster.api::<Pod>();
    let ready_or_done = |p: Option<&Pod>| {
        let s = p.and_then(|p| p.status.as_ref());
        let ready = s
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        ready
            || s.and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.restart_count > 0))
    };
    let pod = cluster
        .wait_for(pods.clone(), "inspector", "Ready", T, ready_or_done)
        .await;
    let restarts = pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .restart_count;
    assert_eq!(
        restarts,
        0,
        "the checks failed:\n{}",
        cluster.pod_logs("inspector").await
    );

    // Deleting it: the stop signal, then SIGKILL after the 2 s grace (sleep ignores neither,
    // bash forwards nothing), then the object is gone.
    let uid = pod.metadata.uid.unwrap();
    let t0 = std::time::Instant::now();
    pods.delete("inspector", &DeleteParams::default())
        .await
        .unwrap();
    cluster.wait_deleted(pods, "inspector", &uid, T).await;
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "deletion took {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn every_postgres_major_from_10_to_18_runs_like_the_official_image() {
    let cluster = Cluster::from_env().await;
    let starts = (10..=18).map(|major| {
        postgres_pod(major)
            .setting("shared_buffers", "16MB")
            .create(&cluster)
    });
    for db in futures::future::join_all(starts).await {
        let version = db.sql_value("SHOW server_version_num").await;
        assert_eq!(
            version.parse::<u32>().unwrap() / 10000,
            db.major,
            "{}",
            db.name
        );
        assert_eq!(db.sql_value("SHOW shared_buffers").await, "16MB");
        // Password authentication over TCP, as from another pod.
        let wrong = format!(
            "host={} port={} user=postgres password=wrong dbname=postgres",
            db.host, db.port
        );
        assert!(
            tokio_postgres::connect(&wrong, tokio_postgres::NoTls)
                .await
                .is_err(),
            "{}",
            db.name
        );
    }
}

#[tokio::test]
async fn the_pgsnap_dev_image_runs_the_projects_binary() {
    let cluster = Cluster::from_env().await;
    let pods = cluster.api::<Pod>();
    create(&pods, json!({
        "metadata": {"name": "crd"},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "pgsnap", "image": "pgsnap:dev", "args": ["crd"]}]}
    }))
    .await;
    let done = |p: Option<&Pod>| {
        matches!(
            p.and_then(|p| p.status.as_ref())
                .and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
    };
    let pod = cluster.wait_for(pods, "crd", "finished", T, done).await;
    let log = cluster.container_log("crd", "pgsnap").await;
    let phase = pod.status.and_then(|s| s.phase);
    assert_eq!(
        phase.as_deref(),
        Some("Succeeded"),
        "(is target/debug/pgsnap built? cargo build)\n{log}"
    );
    assert!(log.contains("kind: CustomResourceDefinition"), "{log}");
}

#[tokio::test]
async fn a_failed_container_reports_exit_code_and_termination_message() {
    let cluster = Cluster::from_env().await;
    let pods = cluster.api::<Pod>();
    let pod = |name: &str, script: &str, policy: &str| {
        json!({
            "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [{
                "name": "main", "image": "busybox", "command": ["sh", "-c", script],
                "terminationMessagePolicy": policy
            }]}
        })
    };
    create(
        &pods,
        pod(
            "file",
            "echo 'Refused: because' > /dev/termination-log; exit 3",
            "File",
        ),
    )
    .await;
    create(
        &pods,
        pod(
            "logs",
            "echo first; echo 'the last words'; exit 4",
            "FallbackToLogsOnError",
        ),
    )
    .await;
    let failed = |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref())
            .and_then(|s| s.phase.as_deref())
            == Some("Failed")
    };
    for (name, code, message) in [
        ("file", 3, "Refused: because\n"),
        ("logs", 4, "first\nthe last words"),
    ] {
        let p = cluster
            .wait_for(pods.clone(), name, "Failed", T, failed)
            .await;
        let status = &p.status.unwrap().container_statuses.unwrap()[0];
        let terminated = status
            .state
            .clone()
            .unwrap()
            .terminated
            .expect("terminated");
        assert_eq!(terminated.exit_code, code);
        assert_eq!(terminated.reason.as_deref(), Some("Error"));
        assert_eq!(terminated.message.as_deref(), Some(message));
        assert_eq!(status.restart_count, 0);
    }
}

#[tokio::test]
async fn the_postgres_image_honours_its_environment_and_init_scripts() {
    let cluster = Cluster::from_env().await;
    create(&cluster.api::<ConfigMap>(), json!({
        "metadata": {"name": "initdb"},
        "data": {
            "01-role.sql": "CREATE ROLE backup LOGIN PASSWORD 'b' REPLICATION;",
            "02-table.sh": "psql -v ON_ERROR_STOP=1 -c \"CREATE TABLE made_by_sh (db text); INSERT INTO made_by_sh VALUES (current_database())\""
        }
    }))
    .await;
    // No securityContext: the entrypoint starts as root and drops to postgres (999).
    create(&cluster.api::<Pod>(), json!({
        "metadata": {"name": "app-db"},
        "spec": {"containers": [{
            "name": "postgres", "image": "postgres:15-bookworm",
            "env": [
                {"name": "POSTGRES_USER", "value": "app"},
                {"name": "POSTGRES_PASSWORD", "value": "app-pw"},
                {"name": "POSTGRES_DB", "value": "appdb"},
                {"name": "POSTGRES_INITDB_ARGS", "value": "--data-checksums"}
            ],
            "readinessProbe": {"exec": {"command": ["pg_isready", "-h", "127.0.0.1"]}, "periodSeconds": 1},
            "volumeMounts": [{"name": "scripts", "mountPath": "/docker-entrypoint-initdb.d"}, {"name": "data", "mountPath": "/var/lib/postgresql/data"}]
        }],
        "volumes": [{"name": "scripts", "configMap": {"name": "initdb"}}, {"name": "data", "emptyDir": {}}]}
    }))
    .await;
    let ready = |p: Option<&Pod>| {
        let s = p.and_then(|p| p.status.as_ref());
        s.and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            || s.and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.restart_count > 0))
    };
    let pod = cluster
        .wait_for(cluster.api::<Pod>(), "app-db", "Ready", T, ready)
        .await;
    let ip = pod.status.and_then(|s| s.pod_ip).unwrap();
    let conninfo = format!("host={ip} port=5432 user=app password=app-pw dbname=appdb");
    let (client, conn) = match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) => panic!("{e}\n{}", cluster.pod_logs("app-db").await),
    };
    tokio::spawn(conn);
    let one = |q: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(q, &[])
                .await
                .unwrap_or_else(|e| panic!("{q}: {e}"))
        }
    };
    assert_eq!(
        one("SELECT db FROM made_by_sh").await.get::<_, String>(0),
        "appdb"
    );
    assert!(
        one("SELECT rolreplication FROM pg_roles WHERE rolname = 'backup'")
            .await
            .get::<_, bool>(0)
    );
    assert_eq!(one("SHOW data_checksums").await.get::<_, String>(0), "on");
    assert!(
        one("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            .await
            .get::<_, bool>(0)
    );
}

/// Each pod has a network namespace and an address of its own on the node's bridge: two
/// servers on 5432, pod to pod and host to pod, the `kubernetes` Service at its ClusterIP
/// inside, `hostNetwork` pods on the host's; a cut pod drops packets without closing
/// connections, and its namespace goes with it.
#[tokio::test]
async fn every_pod_has_a_network_of_its_own() {
    let cluster = Cluster::from_env().await;
    let (a, b) = tokio::join!(
        postgres_pod(16).name("net-a").create(&cluster),
        postgres_pod(16).name("net-b").create(&cluster)
    );
    assert_ne!(a.host, b.host);
    assert_eq!((a.port, b.port), (5432, 5432));
    let in_a = |argv: &'static [&'static str]| cluster.exec(&a.name, "postgres", argv);
    let shell = |out: std::process::Output| {
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    };
    let b_ready = format!("pg_isready -h {} -p 5432", b.host);
    let out = cluster
        .exec(&a.name, "postgres", &["sh", "-c", &b_ready])
        .await;
    assert_eq!(shell(out).0, Some(0), "pod to pod");
    // The Service's ClusterIP answers inside the pod; the API server's certificate names it.
    let (code, readyz) = shell(in_a(&["sh", "-c", "curl -sS --cacert /var/run/secrets/kubernetes.io/serviceaccount/ca.crt https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/readyz; echo; echo $KUBERNETES_SERVICE_HOST"]).await);
    assert_eq!((code, readyz.as_str()), (Some(0), "ok\n10.96.0.1"));

    create(
        &cluster.api::<Pod>(),
        json!({
            "metadata": {"name": "on-the-host"},
            "spec": {"hostNetwork": true, "containers": [{
                "name": "sh", "image": "busybox",
                "command": ["sleep", "3600"],
            }]}
        }),
    )
    .await;
    assert_eq!(cluster.pod_ip("on-the-host").await, "127.0.0.1");

    // The partition: the open session hangs (no reset, no error), then carries on.
    let client = a.connect().await;
    let cut = cluster.cut(&a.name).await;
    let hung = tokio::time::timeout(Duration::from_secs(3), client.simple_query("SELECT 1")).await;
    assert!(hung.is_err(), "a query over a cut link must hang: {hung:?}");
    let out = cluster
        .exec(
            &b.name,
            "postgres",
            &["sh", "-c", &format!("pg_isready -t 2 -h {}", a.host)],
        )
        .await;
    assert_eq!(shell(out).0, Some(2), "pod to cut pod: no response");
    drop(cut);
    let rows = tokio::time::timeout(Duration::from_secs(30), client.simple_query("SELECT 1"))
        .await
        .expect("the link is back")
        .expect("the same session works again");
    assert!(!rows.is_empty());

    // The bridge keeps its MAC address when a port with a lower one comes (and goes): one that
    // followed its ports would leave the other pods' cached gateway address pointing nowhere,
    // and an idle session's keepalives unanswered, for half a minute.
    let pods = cluster.api::<Pod>();
    let pod = pods.get(&a.name).await.unwrap();
    let ip = a.host.parse().unwrap();
    let bridge = network::bridge_of(ip).unwrap();
    let mac = || std::fs::read_to_string(format!("/sys/class/net/{bridge}/address")).unwrap();
    let before = mac();
    let lowest = std::process::Command::new("ip")
        .args(["link", "set", "dev", &network::host_veth(&bridge, ip)])
        .args(["address", "00:00:00:00:00:01"])
        .status()
        .unwrap();
    assert!(lowest.success());
    assert_eq!(mac(), before, "the bridge took its new port's address");

    // The namespace goes with the pod.
    let netns = network::netns_of(&bridge, ip);
    assert!(netns.exists(), "{}", netns.display());
    pods.delete(&a.name, &DeleteParams::default())
        .await
        .unwrap();
    cluster
        .wait_deleted(pods, &a.name, &pod.metadata.uid.unwrap(), T)
        .await;
    assert!(!netns.exists(), "{} is left", netns.display());
}

/// `kubectl <args>` (namespaced to the test), its output.
async fn kubectl(cluster: &Cluster, args: &[&str]) -> std::process::Output {
    cluster
        .kubectl()
        .args(args)
        .output()
        .await
        .expect("running kubectl")
}

/// kubectl's stdout, after asserting it succeeded.
async fn kubectl_ok(cluster: &Cluster, args: &[&str]) -> String {
    let out = kubectl(cluster, args).await;
    assert!(
        out.status.success(),
        "kubectl {args:?}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn running(p: Option<&Pod>) -> bool {
    p.and_then(|p| p.status.as_ref())
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|c| {
            c.iter()
                .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
        })
}

/// Polls `kubectl logs <args>` until its output ends with `last` (a container writes its
/// lines soon after it counts as running, not before).
async fn logs_until(cluster: &Cluster, args: &[&str], last: &str) -> String {
    let mut out = String::new();
    for _ in 0..100 {
        out = kubectl_ok(cluster, &[&["logs"], args].concat()).await;
        if out.ends_with(last) {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("kubectl logs {args:?} never ended with {last:?}; last output: {out:?}")
}

#[tokio::test]
async fn kubectl_logs_shows_each_containers_own_lines() {
    let cluster = Cluster::from_env().await;
    create(&cluster.api::<Pod>(), json!({
        "metadata": {"name": "talker"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "initContainers": [{"name": "init", "image": "busybox", "command": ["sh", "-c", "echo from init"]}],
            "containers": [{"name": "main", "image": "busybox",
                "command": ["sh", "-c", "echo one; echo two >&2; echo three; exec sleep 1000"]}]
        }
    }))
    .await;
    cluster
        .wait_for(cluster.api::<Pod>(), "talker", "running", T, running)
        .await;
    assert_eq!(
        logs_until(&cluster, &["talker", "-c", "main"], "three\n").await,
        "one\ntwo\nthree\n",
        "stdout and stderr, in order"
    );
    assert_eq!(
        kubectl_ok(&cluster, &["logs", "talker", "-c", "init"]).await,
        "from init\n"
    );
    assert_eq!(
        kubectl_ok(&cluster, &["logs", "talker", "-c", "main", "--tail=1"]).await,
        "three\n"
    );
    assert_eq!(
        kubectl_ok(
            &cluster,
            &["logs", "talker", "-c", "main", "--limit-bytes=5"]
        )
        .await,
        "one\nt"
    );
    // No restart yet: no previous instance, with the kubelet's words.
    let previous = kubectl(&cluster, &["logs", "talker", "-c", "main", "--previous"]).await;
    assert!(!previous.status.success());
    let stderr = String::from_utf8_lossy(&previous.stderr);
    assert!(
        stderr.contains(r#"previous terminated container "main" in pod "talker" not found"#),
        "{stderr}"
    );
    // And the test support's helper reads the same.
    assert_eq!(
        cluster.container_log("talker", "main").await,
        "one\ntwo\nthree\n"
    );
}

#[tokio::test]
async fn kubectl_logs_follow_sees_later_lines_and_ends_with_the_container() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let cluster = Cluster::from_env().await;
    create(&cluster.api::<Pod>(), json!({
        "metadata": {"name": "waiter"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox",
                "command": ["sh", "-c", "echo first; until [ -e /signal/go ]; do sleep 0.1; done; echo second"],
                "volumeMounts": [{"name": "signal", "mountPath": "/signal"}]}],
            "volumes": [{"name": "signal", "emptyDir": {}}]
        }
    }))
    .await;
    cluster
        .wait_for(cluster.api::<Pod>(), "waiter", "running", T, running)
        .await;
    logs_until(&cluster, &["waiter"], "first\n").await;

    let mut follow = cluster
        .kubectl()
        .args(["logs", "-f", "waiter"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl logs -f");
    let mut out = tokio::io::BufReader::new(follow.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(T, out.read_line(&mut line))
        .await
        .expect("the first line within a minute")
        .unwrap();
    assert_eq!(line, "first\n");
    // Only now does the container write its second line, and end.
    let touched = cluster
        .exec("waiter", "main", &["touch", "/signal/go"])
        .await;
    assert!(touched.status.success(), "{touched:?}");
    line.clear();
    tokio::time::timeout(T, out.read_line(&mut line))
        .await
        .expect("the line written after kubectl logs -f started, within a minute")
        .unwrap();
    assert_eq!(line, "second\n");
    let mut rest = String::new();
    let status = tokio::time::timeout(Duration::from_secs(20), async {
        out.read_to_string(&mut rest).await.unwrap();
        follow.wait().await.unwrap()
    })
    .await
    .expect("kubectl logs -f ends when the container exits");
    assert!(status.success(), "{status:?}");
    assert_eq!(rest, "");
}

#[tokio::test]
async fn kubectl_logs_previous_shows_the_last_instance_only() {
    let cluster = Cluster::from_env().await;
    // The first run fails after two lines, the second stays up.
    let script = r#"n=$(( $(cat /state/n 2>/dev/null || echo 0) + 1 )); echo $n > /state/n
        echo "run $n: hello"; echo "run $n: bye"
        [ $n -ge 2 ] || exit 1
        exec sleep 1000"#;
    create(
        &cluster.api::<Pod>(),
        json!({
            "metadata": {"name": "restarter"},
            "spec": {
                "restartPolicy": "OnFailure",
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script],
                    "volumeMounts": [{"name": "state", "mountPath": "/state"}]}],
                "volumes": [{"name": "state", "emptyDir": {}}]
            }
        }),
    )
    .await;
    let restarted = |p: Option<&Pod>| {
        running(p)
            && p.and_then(|p| p.status.as_ref()?.container_statuses.as_ref())
                .is_some_and(|c| c[0].restart_count == 1)
    };
    cluster
        .wait_for(
            cluster.api::<Pod>(),
            "restarter",
            "restarted once",
            T,
            restarted,
        )
        .await;
    assert_eq!(
        logs_until(&cluster, &["restarter"], "run 2: bye\n").await,
        "run 2: hello\nrun 2: bye\n",
        "the running instance only"
    );
    assert_eq!(
        kubectl_ok(&cluster, &["logs", "restarter", "--previous"]).await,
        "run 1: hello\nrun 1: bye\n"
    );
    assert_eq!(
        kubectl_ok(&cluster, &["logs", "restarter", "--previous", "--tail=1"]).await,
        "run 1: bye\n"
    );
    assert_eq!(
        kubectl_ok(&cluster, &["logs", "restarter", "--tail=1"]).await,
        "run 2: bye\n"
    );
    let both = cluster.pod_logs("restarter").await;
    assert!(
        both.contains("run 1: bye") && both.contains("run 2: bye"),
        "{both}"
    );
}

#[tokio::test]
async fn kubectl_exec_passes_output_input_exit_code_and_a_terminal() {
    let cluster = Cluster::from_env().await;
    create(
        &cluster.api::<Pod>(),
        json!({
            "metadata": {"name": "shell"},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "securityContext": {"runAsUser": 1234},
                "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "1000"],
                    "workingDir": "/scratch", "env": [{"name": "GREETING", "value": "hi"}],
                    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
                "volumes": [{"name": "scratch", "emptyDir": {}}]
            }
        }),
    )
    .await;
    cluster
        .wait_for(cluster.api::<Pod>(), "shell", "running", T, running)
        .await;

    let out = kubectl(
        &cluster,
        &[
            "exec",
            "shell",
            "--",
            "sh",
            "-c",
            "echo $GREETING from $(id -u) in $(pwd); echo to stderr >&2",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi from 1234 in /scratch\n"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to stderr\n");

    // stdin, to its end (the client closes it and cat sees EOF).
    let mut child = cluster
        .kubectl()
        .args(["exec", "-i", "shell", "--", "sh", "-c", "cat; echo done"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"line 1\nline 2\n")
        .await
        .unwrap();
    drop(stdin);
    let out = tokio::time::timeout(T, child.wait_with_output())
        .await
        .expect("kubectl exec -i ends once its stdin is done")
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "line 1\nline 2\ndone\n"
    );

    let failed = kubectl(&cluster, &["exec", "shell", "--", "sh", "-c", "exit 3"]).await;
    assert_eq!(failed.status.code(), Some(3), "{failed:?}");

    // -t needs a terminal on kubectl's side too: script(1) gives it one.
    let command = format!(
        "kubectl --kubeconfig {} -n {} exec -it shell -- tty",
        cluster.dir.join("kubeconfig").display(),
        cluster.namespace
    );
    let tty = tokio::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("script(1) (util-linux)");
    let text = String::from_utf8_lossy(&tty.stdout);
    assert!(
        tty.status.success() && text.contains("/dev/pts/"),
        "{tty:?}: {text}"
    );
}

#[tokio::test]
async fn the_kubelet_api_requires_a_client_certificate_of_the_cluster_ca() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::from_env().await;
    let node = Api::<k8s_openapi::api::core::v1::Node>::all(cluster.client.clone())
        .get("pgsnap-node")
        .await
        .unwrap();
    let port = node
        .status
        .and_then(|s| s.daemon_endpoints?.kubelet_endpoint)
        .map(|e| e.port)
        .expect("the Node publishes its kubelet port");
    let pki = cluster.dir.join("pki");
    // A client certificate (of the API server's identity) signed by a CA of its own.
    let other = tempdir();
    for args in [
        &[
            "-x509",
            "-subj",
            "/CN=other-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ][..],
        &[
            "-x509",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-subj",
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=clientAuth",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ][..],
    ] {
        let openssl = std::process::Command::new("openssl")
            .current_dir(&other)
            .args(["req", "-newkey", "rsa:2048", "-nodes", "-days", "1"])
            .args(args)
            .output()
            .expect("openssl");
        assert!(openssl.status.success(), "{openssl:?}");
    }

    // One GET of the kubelet API; the HTTP status line, or why there is none.
    let get = |cert: Option<(std::path::PathBuf, std::path::PathBuf)>| {
        let (pki, ns) = (pki.clone(), cluster.namespace.clone());
        async move {
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(pki.join("ca.crt")).unwrap() {
                roots.add(ca.unwrap()).unwrap();
            }
            let builder = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
            let config = match cert {
                Some((cert, key)) => builder
                    .with_client_auth_cert(
                        CertificateDer::pem_file_iter(cert)
                            .unwrap()
                            .map(Result::unwrap)
                            .collect(),
                        PrivateKeyDer::from_pem_file(key).unwrap(),
                    )
                    .unwrap(),
                None => builder.with_no_client_auth(),
            };
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port as u16))
                .await
                .unwrap();
            let name = ServerName::try_from("127.0.0.1").unwrap();
            let mut tls = connector.connect(name, tcp).await?;
            let request = format!(
                "GET /containerLogs/{ns}/no-such-pod/main HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            );
            tls.write_all(request.as_bytes()).await?;
            let mut answer = String::new();
            tls.read_to_string(&mut answer).await?;
            Ok::<_, std::io::Error>(answer.lines().next().unwrap_or_default().to_owned())
        }
    };

    // The API server's own client certificate is served (the pod does not exist: 404).
    let apiserver = get(Some((
        pki.join("apiserver-kubelet-client.crt"),
        pki.join("apiserver-kubelet-client.key"),
    )))
    .await
    .expect("the API server's client certificate is accepted");
    assert_eq!(apiserver, "HTTP/1.1 404 Not Found");

    let refused = |r: Result<String, std::io::Error>, expected: rustls::AlertDescription| {
        let e = r.expect_err("refused");
        let alert = e
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .cloned();
        assert_eq!(alert, Some(rustls::Error::AlertReceived(expected)), "{e:?}");
    };
    refused(
        get(None).await,
        rustls::AlertDescription::CertificateRequired,
    );
    refused(
        get(Some((other.join("cert.pem"), other.join("key.pem")))).await,
        rustls::AlertDescription::UnknownCA,
    );
    let _ = std::fs::remove_dir_all(&other);
}

fn tempdir() -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("pgsnap-e2e-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
