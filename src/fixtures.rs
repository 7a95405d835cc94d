//! Reconcile tests without a cluster. The reconcile gets a `kube::Client` whose API server
//! is a script: the requests it must make, in order, each with the reply it gets. A request
//! off the script, one past its end, or one it never made fails the test and says which.
//! Also the test objects both controllers start from.

use std::fmt::Write as _;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::api::ObjectMeta;
use kube::client::Body;
use serde::Serialize;
use serde_json::{Value, json};
use tower_test::mock;

use crate::api::backup::{Backup, BackupSpec, BackupStatus, Connection, Target};
use crate::api::restore::{Restore, RestoreClaim, RestorePhase, RestoreSpec, RestoreStatus};
use crate::api::snapshot::{
    VolumeSnapshot, VolumeSnapshotError, VolumeSnapshotSource, VolumeSnapshotSpec,
    VolumeSnapshotStatus,
};
use crate::api::{BACKUP_NAME_LABEL, BACKUP_UID_LABEL, SecretKeyRef};
use crate::backup::FINALIZER;

/// Generous for a loaded CI machine: a scripted reconcile takes milliseconds.
const TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) const NS: &str = "shop";
pub(crate) const BACKUP: &str = "orders-1";
pub(crate) const RESTORE: &str = "r1";
pub(crate) const BACKUP_PATH: &str = "/apis/pgsnap.io/v1alpha1/namespaces/shop/backups/orders-1";
pub(crate) const SNAPSHOTS_PATH: &str =
    "/apis/snapshot.storage.k8s.io/v1/namespaces/shop/volumesnapshots";
pub(crate) const CONFIG_MAPS_PATH: &str = "/api/v1/namespaces/shop/configmaps";
/// The label ConfigMap of [`BACKUP`].
pub(crate) const LABEL_CONFIG_MAP: &str = "orders-1-backup-label";

type Check = Box<dyn FnOnce(&Value) + Send>;
type Reply = Box<dyn FnOnce(Value) -> (StatusCode, Value) + Send>;

/// One request the reconcile must make next, and the API server's reply to it.
pub(crate) struct Call {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    content_type: Option<&'static str>,
    checks: Vec<Check>,
    reply: Reply,
}

impl Call {
    /// Replies with the request's own body, as the API server answers a create.
    fn new(method: Method, path: impl Into<String>) -> Self {
        Call {
            method,
            path: path.into(),
            query: Vec::new(),
            content_type: None,
            checks: Vec::new(),
            reply: Box::new(|body| (StatusCode::CREATED, body)),
        }
    }

    pub(crate) fn get(path: impl Into<String>) -> Self {
        Call::new(Method::GET, path)
    }

    pub(crate) fn create(path: impl Into<String>) -> Self {
        Call::new(Method::POST, path)
    }

    /// Replies that the object is deleted.
    pub(crate) fn delete(path: impl Into<String>) -> Self {
        Call::new(Method::DELETE, path).returns(json!({
            "kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200,
        }))
    }

    /// A JSON patch, such as the finalizer helper's.
    pub(crate) fn json_patch(path: impl Into<String>) -> Self {
        let mut call = Call::new(Method::PATCH, path);
        call.content_type = Some("application/json-patch+json");
        call
    }

    /// A JSON merge patch, such as a label or a deletion policy.
    pub(crate) fn merge_patch(path: impl Into<String>) -> Self {
        let mut call = Call::new(Method::PATCH, path);
        call.content_type = Some("application/merge-patch+json");
        call
    }

    /// A list of the objects labelled `selector`.
    pub(crate) fn list(path: impl Into<String>, selector: &str) -> Self {
        Call::get(path).query("labelSelector", selector)
    }

    /// A server-side apply of `object`'s status by pgsnap's field manager; the reply is
    /// `object` with the status applied.
    pub(crate) fn apply_status(path: &str, object: &impl Serialize) -> Self {
        let mut object = serde_json::to_value(object).expect("a serializable object");
        let mut call = Call::new(Method::PATCH, format!("{path}/status"))
            .query("fieldManager", crate::controller::FIELD_MANAGER)
            .query("force", "true");
        call.content_type = Some("application/apply-patch+yaml");
        call.reply = Box::new(move |body| {
            object["status"] = body["status"].clone();
            (StatusCode::OK, object)
        });
        call
    }

    /// An Event of `type_` ("Normal", "Warning") with `reason` about an object in [`NS`].
    pub(crate) fn event(type_: &str, reason: &str) -> Self {
        let (type_, reason) = (type_.to_string(), reason.to_string());
        Call::create(format!("/apis/events.k8s.io/v1/namespaces/{NS}/events")).body(move |e| {
            assert_eq!(
                (e["type"].as_str(), e["reason"].as_str()),
                (Some(type_.as_str()), Some(reason.as_str())),
                "the Event's type and reason; note: {}",
                e["note"]
            );
        })
    }

    /// The request's query must hold this pair (among others).
    pub(crate) fn query(mut self, key: &str, value: &str) -> Self {
        self.query.push((key.into(), value.into()));
        self
    }

    /// Asserts on the request's JSON body (null when it has none).
    pub(crate) fn body(mut self, check: impl FnOnce(&Value) + Send + 'static) -> Self {
        self.checks.push(Box::new(check));
        self
    }

    pub(crate) fn returns(mut self, object: impl Serialize) -> Self {
        let object = serde_json::to_value(object).expect("a serializable object");
        self.reply = Box::new(move |_| (StatusCode::OK, object));
        self
    }

    pub(crate) fn returns_list<T: Serialize>(self, items: impl IntoIterator<Item = T>) -> Self {
        let items: Vec<Value> = items
            .into_iter()
            .map(|i| serde_json::to_value(i).expect("a serializable object"))
            .collect();
        self.returns(json!({ "metadata": {}, "items": items }))
    }

    pub(crate) fn not_found(self) -> Self {
        self.refused(StatusCode::NOT_FOUND, "NotFound")
    }

    /// RBAC's answer, as when the operator's Role went with a deleted namespace.
    pub(crate) fn forbidden(self) -> Self {
        self.refused(StatusCode::FORBIDDEN, "Forbidden")
    }

    /// An API server that cannot answer now.
    pub(crate) fn unavailable(self) -> Self {
        self.refused(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable")
    }

    fn refused(mut self, code: StatusCode, reason: &'static str) -> Self {
        let path = self.path.clone();
        self.reply = Box::new(move |_| {
            let status = json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": reason, "code": code.as_u16(), "message": format!("{path}: {reason}"),
            });
            (code, status)
        });
        self
    }

    fn describe(&self) -> String {
        let mut s = format!("{} {}", self.method, self.path);
        for (i, (k, v)) in self.query.iter().enumerate() {
            let _ = write!(s, "{}{k}={v}", if i == 0 { "?" } else { "&" });
        }
        s
    }
}

/// Runs `reconcile` with a client whose API server follows `script`, and returns its result
/// once the script is played out. The client must be dropped by then (the future owns it):
/// that is how the server knows no more requests come.
pub(crate) async fn run<F: Future>(
    script: Vec<Call>,
    reconcile: impl FnOnce(Client) -> F,
) -> F::Output {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, script));
    let result = tokio::time::timeout(TIMEOUT, reconcile(Client::new(service, "default")))
        .await
        .unwrap_or_else(|_| panic!("the reconcile did not end within {TIMEOUT:?}"));
    // The server's verdict first: a request off the script makes the reconcile fail too, and
    // the server says why.
    match tokio::time::timeout(TIMEOUT, server).await {
        Err(_) => panic!("the API server still waits for a request after {TIMEOUT:?}"),
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Ok(joined) => joined.expect("the API server task"),
    }
    result
}

async fn serve(mut handle: mock::Handle<Request<Body>, Response<Body>>, script: Vec<Call>) {
    let total = script.len();
    for (n, call) in (1..).zip(script) {
        let Some((request, respond)) = handle.next_request().await else {
            panic!(
                "call {n} of {total} never came: expected {}",
                call.describe()
            );
        };
        let (parts, body) = request.into_parts();
        let query = parse_query(parts.uri.query().unwrap_or_default());
        let got = format!("{} {}", parts.method, parts.uri);
        assert!(
            parts.method == call.method
                && parts.uri.path() == call.path
                && call.query.iter().all(|pair| query.contains(pair)),
            "call {n} of {total}: expected {}, got {got}",
            call.describe()
        );
        if let Some(expected) = call.content_type {
            let content_type = parts.headers.get(http::header::CONTENT_TYPE);
            assert_eq!(
                content_type.and_then(|v| v.to_str().ok()),
                Some(expected),
                "call {n} of {total} ({got}): content type"
            );
        }
        let bytes = body.collect_bytes().await.expect("the request's body");
        let body: Value = match bytes.is_empty() {
            true => Value::Null,
            false => serde_json::from_slice(&bytes).expect("a JSON request body"),
        };
        for check in call.checks {
            check(&body);
        }
        let (status, reply) = (call.reply)(body);
        let reply = serde_json::to_vec(&reply).expect("a JSON reply");
        let response = Response::builder().status(status).body(Body::from(reply));
        respond.send_response(response.expect("a valid response"));
    }
    if let Some((request, _)) = handle.next_request().await {
        panic!(
            "a request after all {total} calls of the script: {} {}",
            request.method(),
            request.uri()
        );
    }
}

/// Query pairs, percent-decoded: kube encodes label selectors (`pgsnap.io%2Fbackup%3Dx`).
fn parse_query(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
            match (bytes[i], hex) {
                (b'%', Some(byte)) => {
                    out.push(byte);
                    i += 3;
                    continue;
                }
                (b'+', _) => out.push(b' '),
                (b, _) => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Asserts the phase of an applied status and the `Ready` condition that mirrors it.
/// Failed for `reason`: the phase, Ready False with the message, and `status.error`.
pub(crate) fn assert_failed(status: &Value, reason: &str, message: &str) {
    assert_phase(status, "Failed", "False", reason);
    assert_eq!(ready_message(status), message);
    assert_eq!(
        status["error"],
        json!({ "reason": reason, "message": message })
    );
}

pub(crate) fn assert_phase(status: &Value, phase: &str, ready: &str, reason: &str) {
    let condition = status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .unwrap_or_else(|| panic!("no Ready condition in {status}"));
    assert_eq!(
        (
            status["phase"].as_str(),
            condition["status"].as_str(),
            condition["reason"].as_str()
        ),
        (Some(phase), Some(ready), Some(reason)),
        "phase, Ready and its reason; message: {}",
        condition["message"]
    );
}

/// The message of the `Ready` condition of an applied status.
pub(crate) fn ready_message(status: &Value) -> &str {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .and_then(|c| c["message"].as_str())
        .unwrap_or_default()
}

fn meta(name: &str, uid: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NS.into()),
        uid: Some(uid.into()),
        generation: Some(1),
        ..Default::default()
    }
}

impl Backup {
    /// Backup [`BACKUP`] of pod `db-0` with a password Secret, finalizer in place, as a
    /// reconcile sees it after the first one added it.
    pub(crate) fn test() -> Self {
        let spec = BackupSpec {
            target: Target {
                pod_name: Some("db-0".into()),
                ..Default::default()
            },
            connection: Connection {
                password_secret_ref: Some(SecretKeyRef {
                    name: "db-password".into(),
                    key: "password".into(),
                }),
                ..Default::default()
            },
            volume_snapshot_class_name: None,
            group_snapshot: Default::default(),
            volume_group_snapshot_class_name: None,
            checkpoint: Default::default(),
            wal_source: Default::default(),
            wait_for_archive: true,
            deadline: crate::api::Duration::from_secs(600),
            ready_timeout: crate::api::Duration::from_secs(86400),
            deletion_policy: Default::default(),
            volumes: Vec::new(),
        };
        let mut backup = Backup::new(BACKUP, spec);
        backup.metadata = ObjectMeta {
            finalizers: Some(vec![FINALIZER.into()]),
            ..meta(BACKUP, "backup-uid")
        };
        backup
    }

    pub(crate) fn with_status(mut self, status: BackupStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Deleted by a user: only the finalizer holds it.
    pub(crate) fn deleted(mut self) -> Self {
        self.metadata.deletion_timestamp = Some(crate::controller::now());
        self
    }
}

impl Restore {
    /// Restore [`RESTORE`] of Backup [`BACKUP`] into one data claim, `restored-data`.
    pub(crate) fn test() -> Self {
        let spec = RestoreSpec {
            backup_name: Some(BACKUP.into()),
            volume_snapshot_name: None,
            label_config_map_name: None,
            source_namespace: None,
            claims: vec![RestoreClaim {
                role: crate::api::backup::VolumeRole::Data,
                tablespace: None,
                name: "restored-data".into(),
                storage_class_name: None,
                size: None,
            }],
            recovery: Default::default(),
            claim_deletion_policy: Default::default(),
        };
        let mut restore = Restore::new(RESTORE, spec);
        restore.metadata = meta(RESTORE, "restore-uid");
        restore
    }

    /// As a reconcile that already wrote `phase` left it.
    pub(crate) fn in_phase(mut self, phase: RestorePhase) -> Self {
        self.status = Some(RestoreStatus {
            phase: Some(phase),
            ..Default::default()
        });
        self
    }
}

/// The labels of what [`BACKUP`] (uid `backup-uid`) creates.
pub(crate) fn backup_labels() -> std::collections::BTreeMap<String, String> {
    [
        (BACKUP_NAME_LABEL.into(), BACKUP.into()),
        (BACKUP_UID_LABEL.into(), "backup-uid".into()),
    ]
    .into()
}

/// The label ConfigMap as [`BACKUP`] wrote it, as far as deleting it looks.
pub(crate) fn own_label_config_map() -> k8s_openapi::api::core::v1::ConfigMap {
    k8s_openapi::api::core::v1::ConfigMap {
        metadata: ObjectMeta {
            labels: Some(backup_labels()),
            ..meta(LABEL_CONFIG_MAP, "label-uid")
        },
        ..Default::default()
    }
}

/// A snapshot of [`BACKUP`] of 10Gi, cut, ready or not, failed when `error` says why.
pub(crate) fn snapshot(name: &str, ready: bool, error: Option<&str>) -> VolumeSnapshot {
    let mut snapshot = VolumeSnapshot::new(
        name,
        VolumeSnapshotSpec {
            source: VolumeSnapshotSource {
                persistent_volume_claim_name: Some("data-db-0".into()),
                volume_snapshot_content_name: None,
            },
            volume_snapshot_class_name: Some("csi-hostpath".into()),
        },
    );
    snapshot.metadata = meta(name, &format!("{name}-uid"));
    snapshot.metadata.labels = Some(backup_labels());
    snapshot.status = Some(VolumeSnapshotStatus {
        creation_time: Some(crate::controller::now()),
        ready_to_use: Some(ready),
        restore_size: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
            "10Gi".into(),
        )),
        error: error.map(|m| VolumeSnapshotError {
            message: Some(m.into()),
            time: None,
        }),
        ..Default::default()
    });
    snapshot
}

/// Compares `actual` with `tests/golden/<name>`; `PGSNAP_UPDATE_GOLDEN=1` rewrites it.
pub fn golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("PGSNAP_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("write the golden file");
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        actual,
        expected,
        "{} differs (PGSNAP_UPDATE_GOLDEN=1 rewrites it)",
        path.display()
    );
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::Api;

    use super::*;

    const PATH: &str = "/api/v1/namespaces/shop/configmaps/x";

    async fn get_config_map(client: Client) {
        let _ = Api::<ConfigMap>::namespaced(client, NS).get("x").await;
    }

    #[tokio::test]
    async fn a_scripted_call_is_answered() {
        let script = vec![Call::get(PATH).returns(json!({ "metadata": { "name": "x" } }))];
        run(script, |client| async move {
            let cm = Api::<ConfigMap>::namespaced(client, NS).get("x").await;
            assert_eq!(
                cm.expect("the scripted reply").metadata.name.as_deref(),
                Some("x")
            );
        })
        .await;
    }

    #[tokio::test]
    #[should_panic(
        expected = "a request after all 0 calls of the script: GET /api/v1/namespaces/shop/configmaps/x"
    )]
    async fn a_request_past_the_end_of_the_script_fails_the_test() {
        run(Vec::new(), get_config_map).await;
    }

    #[tokio::test]
    #[should_panic(
        expected = "call 1 of 1 never came: expected GET /api/v1/namespaces/shop/configmaps/x"
    )]
    async fn a_scripted_call_never_made_fails_the_test() {
        run(vec![Call::get(PATH).not_found()], |_| async {}).await;
    }

    #[tokio::test]
    #[should_panic(
        expected = "call 1 of 1: expected DELETE /api/v1/namespaces/shop/configmaps/x, got GET"
    )]
    async fn a_call_other_than_the_scripted_one_fails_the_test() {
        run(vec![Call::delete(PATH)], get_config_map).await;
    }

    #[tokio::test]
    #[should_panic(expected = "expected GET /api/v1/namespaces/shop/configmaps?labelSelector=a=b")]
    async fn a_call_without_the_scripted_query_fails_the_test() {
        let script = vec![Call::list(CONFIG_MAPS_PATH, "a=b").returns_list(Vec::<Value>::new())];
        run(script, |client| async move {
            let lp = kube::api::ListParams::default().labels("a=c");
            let _ = Api::<ConfigMap>::namespaced(client, NS).list(&lp).await;
        })
        .await;
    }

    #[test]
    fn queries_are_read_percent_decoded() {
        assert_eq!(
            parse_query("labelSelector=pgsnap.io%2Fbackup%3Dorders-1&force=true&x"),
            [
                ("labelSelector".into(), "pgsnap.io/backup=orders-1".into()),
                ("force".into(), "true".into()),
                ("x".into(), String::new()),
            ]
        );
    }
}
