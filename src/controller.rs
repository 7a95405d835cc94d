//! What every pgsnap controller shares: a failure with a stable reason, the phase and its
//! `Ready` condition, status written by server-side apply under one field manager, Events,
//! names bounded to what the API server accepts, and the `Api` of the watched namespace(s).
//! A reconciler keeps only its own decisions; a new controller starts from here.

use std::collections::BTreeMap;
use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;

use crate::api::CreatorLabels;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tracing::warn;

/// The field manager of every server-side apply pgsnap makes.
pub const FIELD_MANAGER: &str = "pgsnap";

/// Why an object failed: a stable reason (status, Events, metric labels) and a message a
/// user can act on. Every module's typed error converts into one.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Failure {
    pub reason: String,
    pub message: String,
}

impl Failure {
    pub fn new(reason: &str, message: impl Into<String>) -> Self {
        Failure {
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

/// `From<E> for Failure` for typed errors that have a `reason()`. Each controller declares
/// the errors it turns into failures, so this module depends on none of them.
macro_rules! failure_from {
    ($($error:ty),* $(,)?) => {$(
        impl From<$error> for $crate::controller::Failure {
            fn from(e: $error) -> Self {
                $crate::controller::Failure::new(e.reason(), e.to_string())
            }
        }
    )*};
}
pub(crate) use failure_from;

impl From<kube::Error> for Failure {
    fn from(e: kube::Error) -> Self {
        Failure::new("KubernetesApi", e.to_string())
    }
}

/// What the Restore and Verification controllers are told: where to watch, and the image of
/// what they run in the cluster themselves (this operator's own).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Watch one namespace only; none watches all.
    pub namespace: Option<String>,
    /// The image with `pgsnap restore-prepare` and `pgsnap verify-server`.
    pub image: String,
}

/// Errors of one reconcile, all worth a retry; permanent problems become a Failed status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        "KubernetesApi"
    }
}

/// How a phase ends early: failed for good, or the API needs a retry.
pub enum Stop {
    Failed(Failure),
    Api(kube::Error),
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Self {
        Stop::Failed(f)
    }
}

impl From<kube::Error> for Stop {
    fn from(e: kube::Error) -> Self {
        Stop::Api(e)
    }
}

pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// How long a finalizer retries a cleanup that fails for a reason that may pass (the API
/// server briefly unavailable) before it reports and lets the object go.
pub const CLEANUP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

/// How long it retries one the API refuses (forbidden, as when the operator's Role went with
/// a deleted namespace; invalid): long enough for RBAC applied out of order to arrive.
pub const REFUSED_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a finalizer should stop retrying its cleanup, failing for `failing_for`, and let
/// the object go. A finalizer that never lets go keeps its object, and its namespace,
/// Terminating for ever.
pub fn cleanup_gives_up(error: Option<&kube::Error>, failing_for: std::time::Duration) -> bool {
    let refused = matches!(error, Some(kube::Error::Api(s)) if matches!(s.code, 400 | 403 | 422));
    failing_for
        >= if refused {
            REFUSED_PATIENCE
        } else {
            CLEANUP_PATIENCE
        }
}

/// Whether [`CLEANUP_PATIENCE`] has passed since `since`.
pub fn out_of_patience(since: Option<&Time>, now: &Time) -> bool {
    let patience = k8s_openapi::jiff::SignedDuration::try_from(CLEANUP_PATIENCE)
        .unwrap_or(k8s_openapi::jiff::SignedDuration::MAX);
    since.is_some_and(|t| now.0.duration_since(t.0) >= patience)
}

/// A status with a phase and conditions, as every pgsnap resource has.
/// Where a phase stands, as the Kubernetes condition conventions (and kstatus, which Flux,
/// Argo CD and kpt read) tell it: in progress, done and good, or failed for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    InProgress,
    Succeeded,
    Failed,
}

pub trait PhasedStatus {
    type Phase: Copy + PartialEq;
    fn progress(phase: Self::Phase) -> Progress;
    fn phase(&self) -> Option<Self::Phase>;
    fn set_phase_fields(&mut self, phase: Self::Phase, generation: Option<i64>);
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
}

/// Moves `object` to `phase`: its status (phase and conditions) written, and an Event, a
/// Warning when it failed, when that is news; whether it was, so the caller counts it once.
pub async fn enter<K, S>(
    reporter: &Reporter,
    object: &K,
    status: &mut S,
    phase: S::Phase,
    reason: &str,
    message: String,
) -> Result<bool, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
    S: PhasedStatus + Serialize,
{
    let news =
        status.phase() != Some(phase) || !ready_says(status.conditions_mut(), reason, &message);
    set_phase(status, object, phase, reason, &message);
    reporter.patch_status(object, status).await?;
    if news {
        let type_ = match S::progress(phase) {
            Progress::Failed => EventType::Warning,
            _ => EventType::Normal,
        };
        reporter.publish(object, type_, reason, message).await;
    }
    Ok(news)
}

/// Sets the phase, `observedGeneration` and the conditions that mirror the phase: `Ready`
/// (True when it succeeded), `Reconciling` (True while in progress) and `Stalled` (True when
/// it failed for good), so a GitOps pipeline stops at once on a failure instead of timing out.
pub fn set_phase<S: PhasedStatus>(
    status: &mut S,
    object: &impl Resource,
    phase: S::Phase,
    reason: &str,
    message: &str,
) {
    let generation = object.meta().generation;
    status.set_phase_fields(phase, generation);
    let progress = S::progress(phase);
    for (type_, true_when) in [
        ("Ready", Progress::Succeeded),
        ("Reconciling", Progress::InProgress),
        ("Stalled", Progress::Failed),
    ] {
        let condition = Condition {
            type_: type_.into(),
            status: if progress == true_when {
                "True"
            } else {
                "False"
            }
            .into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: generation,
            last_transition_time: now(),
        };
        set_condition(status.conditions_mut(), condition);
    }
}

/// Replaces the condition of the same type, keeping its transition time when the status
/// did not change, as the Kubernetes API conventions ask.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            let keep_time = old.status == new.status;
            let time = old.last_transition_time.clone();
            *old = new;
            if keep_time {
                old.last_transition_time = time;
            }
        }
        None => conditions.push(new),
    }
}

/// Whether the `Ready` condition already says exactly this: a repeated reconcile then writes
/// and announces nothing new.
pub fn ready_says(conditions: &[Condition], reason: &str, message: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.reason == reason && c.message == message)
}

/// A toleration admission gives every pod (DefaultTolerationSeconds): a spec copied from a
/// live pod leaves it out, and the copy's own pod gets it back.
pub fn added_by_admission(t: &k8s_openapi::api::core::v1::Toleration) -> bool {
    matches!(
        t.key.as_deref(),
        Some("node.kubernetes.io/not-ready" | "node.kubernetes.io/unreachable")
    ) && t.toleration_seconds == Some(300)
}

/// The first `len` hex digits of the sha256 of `text`: what keeps shortened names distinct.
pub fn hash_prefix(text: &str, len: usize) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))[..len].to_string()
}

/// A name of at most `max` characters: `base-suffix`, with the base shortened and a hash of
/// the whole added when too long, so distinct inputs keep distinct names.
pub fn bounded_name(base: &str, suffix: &str, max: usize) -> String {
    let name = format!("{base}-{suffix}");
    if name.len() <= max {
        return name;
    }
    let hash = hash_prefix(&name, 8);
    let keep = max.saturating_sub(suffix.len() + hash.len() + 2);
    let mut cut = keep.min(base.len());
    while !base.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(
        "{}-{hash}-{suffix}",
        base[..cut].trim_end_matches(['-', '.'])
    )
}

/// A name as a label value (at most 63 characters): itself when it fits, else shortened with
/// a hash of the whole, so people can still select by it. Ownership never goes by this value.
pub fn label_value(name: &str) -> String {
    if name.len() <= 63 {
        return name.to_string();
    }
    let hash = hash_prefix(name, 8);
    format!("{}-{hash}", name[..54].trim_end_matches(['-', '.', '_']))
}

/// The labels that tie an object to the object that created it: its uid, which ownership,
/// selection and deletion go by, and its name as a label value, for people.
pub fn creator_labels(labels: &CreatorLabels, creator: &impl Resource) -> BTreeMap<String, String> {
    let meta = creator.meta();
    BTreeMap::from([
        (
            labels.name.to_string(),
            label_value(meta.name.as_deref().unwrap_or_default()),
        ),
        (labels.uid.to_string(), meta.uid.clone().unwrap_or_default()),
    ])
}

/// Whether `creator` created `object`: it carries the creator's uid. An object made before
/// objects carried it (pgsnap 0.1) counts when it carries the creator's name, no uid, and is
/// no older than the creator, so an older object of a reused name is never taken for its own.
pub fn created_by(object: &impl Resource, labels: &CreatorLabels, creator: &impl Resource) -> bool {
    let (object, creator) = (object.meta(), creator.meta());
    let label = |key: &str| object.labels.as_ref().and_then(|l| l.get(key));
    match (label(labels.uid), &creator.uid) {
        (Some(uid), Some(own)) => uid == own,
        (Some(_), None) => false,
        (None, _) => {
            let name = creator.name.as_deref().map(label_value);
            let no_older = match (&object.creation_timestamp, &creator.creation_timestamp) {
                (Some(made), Some(born)) => made.0 >= born.0,
                _ => false,
            };
            label(labels.name).is_some() && label(labels.name) == name.as_ref() && no_older
        }
    }
}

/// The object in `store` whose uid the `uid_label` of `child` names: how a watched object
/// maps back to the one that created it.
pub fn creator_in<K>(
    store: &Store<K>,
    child: &impl Resource,
    uid_label: &str,
) -> Option<ObjectRef<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    let uid = child.labels().get(uid_label)?;
    store
        .state()
        .iter()
        .find(|k| k.uid().as_ref() == Some(uid))
        .map(|k| ObjectRef::from_obj(&**k))
}

/// The `Api` of the namespace the operator watches, or of all namespaces.
pub fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Deletes one object, but only if `creator` created it; one that is gone, or that is not
/// its own, is left alone. The uid precondition keeps a same-named successor safe.
pub async fn delete_if_created_by<K>(
    api: &Api<K>,
    name: &str,
    labels: &CreatorLabels,
    creator: &impl Resource,
) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let Some(object) = api.get_opt(name).await? else {
        return Ok(false);
    };
    if !created_by(&object, labels, creator) {
        return Ok(false);
    }
    delete_exactly(api, &object).await
}

/// Deletes `object` itself: its uid is a precondition, so a successor of the same name is
/// never deleted in its place. Returns whether it was still there to delete.
pub async fn delete_exactly<K>(api: &Api<K>, object: &K) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let params = DeleteParams::background().preconditions(Preconditions {
        uid: object.meta().uid.clone(),
        resource_version: None,
    });
    let name = object.meta().name.clone().unwrap_or_default();
    match api.delete(&name, &params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes status and Events for one kind of object.
pub struct Reporter {
    pub client: Client,
    recorder: Recorder,
    /// The Event's action: what the controller was doing ("Backup", "Restore").
    action: &'static str,
}

impl Reporter {
    pub fn new(client: Client, action: &'static str) -> Self {
        Reporter {
            recorder: Recorder::new(client.clone(), "pgsnap".into()),
            client,
            action,
        }
    }

    /// An Event on `object`; failing to record one is logged, never fatal.
    pub async fn publish<K>(&self, object: &K, type_: EventType, reason: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: self.action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &object.object_ref(&())).await {
            warn!(error = %e, reason, "could not publish an Event");
        }
    }

    /// Applies `status` as the object's whole status, server-side, as pgsnap's field manager.
    pub async fn patch_status<K, S>(&self, object: &K, status: &S) -> Result<(), kube::Error>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug,
        S: Serialize,
    {
        let api: Api<K> =
            Api::namespaced(self.client.clone(), &object.namespace().unwrap_or_default());
        let patch = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": status,
        });
        api.patch_status(
            &object.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_fit_and_stay_distinct() {
        assert_eq!(label_value("orders-1"), "orders-1");
        let long = format!("{}a", "b".repeat(252));
        let value = label_value(&long);
        assert_eq!(value.len(), 63);
        assert_ne!(value, label_value(&format!("{}c", "b".repeat(252))));
        let dotted = format!("{}.{}", "b".repeat(53), "x".repeat(20));
        assert!(!label_value(&dotted).contains(".-"));
    }

    #[test]
    fn only_the_creator_owns_what_it_made_even_from_before_uid_labels() {
        use crate::api::BACKUP_CREATOR;
        use k8s_openapi::api::core::v1::ConfigMap;
        let at = |s: i64| Some(Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap()));
        let object = |labels: &[(&str, &str)], made: i64| ConfigMap {
            metadata: kube::api::ObjectMeta {
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                creation_timestamp: at(made),
                ..Default::default()
            },
            ..Default::default()
        };
        let creator = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some("b1".into()),
                uid: Some("u1".into()),
                creation_timestamp: at(100),
                ..Default::default()
            },
            ..Default::default()
        };
        let (name, uid) = (BACKUP_CREATOR.name, BACKUP_CREATOR.uid);
        assert!(created_by(
            &object(&[(name, "b1"), (uid, "u1")], 50),
            &BACKUP_CREATOR,
            &creator
        ));
        assert!(!created_by(
            &object(&[(name, "b1"), (uid, "u0")], 150),
            &BACKUP_CREATOR,
            &creator
        ));
        // Made before uid labels: its own when no older than the creator.
        assert!(created_by(
            &object(&[(name, "b1")], 150),
            &BACKUP_CREATOR,
            &creator
        ));
        assert!(!created_by(
            &object(&[(name, "b1")], 50),
            &BACKUP_CREATOR,
            &creator
        ));
        assert!(!created_by(
            &object(&[(name, "b2")], 150),
            &BACKUP_CREATOR,
            &creator
        ));
        assert!(!created_by(&object(&[], 150), &BACKUP_CREATOR, &creator));
    }

    #[test]
    fn the_conditions_say_in_progress_done_or_failed_as_kstatus_reads_them() {
        use crate::api::backup::{BackupStatus, Phase};
        let backup = k8s_openapi::api::core::v1::ConfigMap::default();
        let states = |phase: Phase| {
            let mut status = BackupStatus::default();
            set_phase(&mut status, &backup, phase, "R", "m");
            status
                .conditions
                .iter()
                .map(|c| (c.type_.clone(), c.status.clone()))
                .collect::<Vec<_>>()
        };
        let said = |r: &str, g: &str, s: &str| {
            vec![
                ("Ready".to_string(), r.to_string()),
                ("Reconciling".to_string(), g.to_string()),
                ("Stalled".to_string(), s.to_string()),
            ]
        };
        assert_eq!(states(Phase::Snapshotting), said("False", "True", "False"));
        assert_eq!(states(Phase::Completed), said("True", "False", "False"));
        assert_eq!(states(Phase::Failed), said("False", "False", "True"));
    }

    #[test]
    fn bounded_names_fit_and_stay_distinct() {
        assert_eq!(bounded_name("r", "prepare", 63), "r-prepare");
        let long = "x".repeat(80);
        let a = bounded_name(&long, "prepare", 63);
        assert_eq!(a.len(), 63);
        assert!(a.ends_with("-prepare"));
        assert_ne!(a, bounded_name(&format!("{long}y"), "prepare", 63));
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let at = |s: i64| Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap());
        let cond = |status: &str, reason: &str, t: i64| Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: at(t),
        };
        let mut conditions = vec![cond("False", "Pending", 1)];
        set_condition(&mut conditions, cond("False", "Starting", 2));
        assert_eq!(conditions[0].reason, "Starting");
        assert_eq!(conditions[0].last_transition_time, at(1));
        set_condition(&mut conditions, cond("True", "Completed", 3));
        assert_eq!(conditions[0].last_transition_time, at(3));
        assert_eq!(conditions.len(), 1);
    }
}
