//! CSI VolumeSnapshots of a backup: create one per claim (or one group of them, see `group`),
//! wait (by watch) until each is cut or ready, delete them all.

pub mod group;

use std::collections::{BTreeMap, HashMap};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;

use crate::api::backup::Backup;
use crate::api::snapshot::{
    ClassKind, Content, DEFAULT_CLASS_ANNOTATION, SnapshotClass, SnapshotLike, VolumeGroupSnapshot,
    VolumeSnapshot, VolumeSnapshotClass, VolumeSnapshotSource, VolumeSnapshotSpec,
};
use crate::api::{BACKUP_CREATOR, BACKUP_NAME_LABEL, BACKUP_UID_LABEL};
use crate::controller::{
    created_by, creator_labels, delete_exactly, label_value, now, out_of_patience,
};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("PVC {0} does not exist")]
    ClaimNotFound(String),
    #[error("PVC {0} is not bound to a volume yet")]
    ClaimNotBound(String),
    #[error("PVC {claim} is not a CSI volume; only CSI volumes can be snapshotted")]
    NotCsi { claim: String },
    #[error(
        "no VolumeSnapshotClass is marked default for CSI driver {driver} (PVC {claim}); set spec.volumeSnapshotClassName or annotate a class with {DEFAULT_CLASS_ANNOTATION}=\"true\""
    )]
    NoDefaultClass { driver: String, claim: String },
    #[error("VolumeSnapshotClass {0} does not exist")]
    ClassNotFound(String),
    #[error(
        "VolumeSnapshotClass {class} is for CSI driver {class_driver}, but PVC {claim} is a volume of {driver}: name a class of {driver}, or none for its default"
    )]
    ClassOfAnotherDriver {
        class: String,
        class_driver: String,
        claim: String,
        driver: String,
    },
    #[error("groupSnapshot Always, but {0}")]
    GroupImpossible(String),
    #[error("VolumeGroupSnapshotClass {0} does not exist")]
    GroupClassNotFound(String),
    #[error(
        "VolumeGroupSnapshotClass {class} is for CSI driver {class_driver}, but the volumes are of {driver}: name a group class of {driver}, or none for its default"
    )]
    GroupClassOfAnotherDriver {
        class: String,
        class_driver: String,
        driver: String,
    },
    #[error(
        "VolumeGroupSnapshot {group} holds snapshots of the claims {held:?}, not of exactly {expected:?}"
    )]
    GroupMembers {
        group: String,
        held: Vec<String>,
        expected: Vec<String>,
    },
    #[error("{what} {name} failed: {message}")]
    Failed {
        what: &'static str,
        name: String,
        message: String,
    },
    #[error("{what} {name} was deleted while the backup waited for it")]
    Deleted { what: &'static str, name: String },
    #[error(
        "{kind} {name} already exists and belongs to another backup (an earlier Backup of this name whose deletionPolicy retained it, or another object): pgsnap never adopts or overwrites it. Delete it if it is not needed, or give this Backup another name"
    )]
    NameConflict { kind: &'static str, name: String },
    #[error("snapshot API call failed: {0}")]
    Api(#[from] kube::Error),
    #[error("watching snapshots failed: {0}")]
    Watch(#[from] watcher::Error),
}

impl SnapshotError {
    /// The API server's refusal behind this error, when there is one.
    pub fn api_error(&self) -> Option<&kube::Error> {
        match self {
            SnapshotError::Api(e) => Some(e),
            _ => None,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            SnapshotError::ClaimNotFound(_) | SnapshotError::ClaimNotBound(_) => "ClaimNotReady",
            SnapshotError::NotCsi { .. } => "ClaimNotCsi",
            SnapshotError::NoDefaultClass { .. }
            | SnapshotError::ClassNotFound(_)
            | SnapshotError::ClassOfAnotherDriver { .. } => "NoSnapshotClass",
            SnapshotError::GroupImpossible(_) => "GroupSnapshotImpossible",
            SnapshotError::GroupClassNotFound(_)
            | SnapshotError::GroupClassOfAnotherDriver { .. } => "NoGroupSnapshotClass",
            SnapshotError::Failed { .. }
            | SnapshotError::Deleted { .. }
            | SnapshotError::GroupMembers { .. } => "SnapshotFailed",
            SnapshotError::NameConflict { .. } => "NameConflict",
            SnapshotError::Api(_) | SnapshotError::Watch(_) => "KubernetesApi",
        }
    }
}

crate::controller::failure_from!(SnapshotError);

/// A snapshot's name: the backup's, then the claim's, within the 253 characters of a name.
pub fn snapshot_name(backup: &str, claim: &str) -> String {
    let name = format!("{backup}-{claim}");
    if name.len() <= 253 {
        return name;
    }
    let hash = crate::controller::hash_prefix(&name, 10);
    format!("{}-{hash}", &name[..242].trim_end_matches(['-', '.']))
}

/// The name of a backup's WAL snapshot of `claim`: beside its snapshot cut in backup mode.
pub fn wal_snapshot_name(backup: &str, claim: &str) -> String {
    snapshot_name(backup, &format!("{claim}-wal"))
}

/// The class to snapshot `claim` with: the one asked for, else the default of its CSI driver.
pub async fn resolve_class(
    client: &Client,
    namespace: &str,
    claim: &str,
    requested: Option<&str>,
) -> Result<ResolvedClass, SnapshotError> {
    let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
        .get_opt(claim)
        .await?
        .ok_or_else(|| SnapshotError::ClaimNotFound(claim.to_string()))?;
    let volume = pvc
        .spec
        .and_then(|s| s.volume_name)
        .ok_or_else(|| SnapshotError::ClaimNotBound(claim.to_string()))?;
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get(&volume)
        .await?;
    let driver = pv
        .spec
        .and_then(|s| s.csi)
        .map(|c| c.driver)
        .ok_or_else(|| SnapshotError::NotCsi {
            claim: claim.to_string(),
        })?;
    let classes: Api<VolumeSnapshotClass> = Api::all(client.clone());
    let name = match requested {
        // A class of another driver would be refused by the snapshot controller only once
        // the cut is asked for, in backup mode.
        Some(name) => match classes.get_opt(name).await? {
            Some(class) if class.driver == driver => name.to_string(),
            Some(class) => {
                return Err(SnapshotError::ClassOfAnotherDriver {
                    class: name.to_string(),
                    class_driver: class.driver,
                    claim: claim.to_string(),
                    driver,
                });
            }
            None => return Err(SnapshotError::ClassNotFound(name.to_string())),
        },
        None => {
            let list = classes.list(&ListParams::default()).await?;
            default_class_for(&list.items, &driver).ok_or_else(|| {
                SnapshotError::NoDefaultClass {
                    driver: driver.clone(),
                    claim: claim.to_string(),
                }
            })?
        }
    };
    Ok(ResolvedClass { name, driver })
}

/// The VolumeSnapshotClass a claim's snapshots use, and the claim's CSI driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedClass {
    pub name: String,
    pub driver: String,
}

/// The driver's default class; with several defaults, the first by name, so the choice is stable.
pub fn default_class_for<K: ClassKind>(
    classes: &[SnapshotClass<K>],
    driver: &str,
) -> Option<String> {
    let mut defaults: Vec<_> = classes
        .iter()
        .filter(|c| {
            c.driver == driver
                && c.annotations()
                    .get(K::DEFAULT_ANNOTATION)
                    .is_some_and(|v| v == "true")
        })
        .map(|c| c.name_any())
        .collect();
    defaults.sort();
    defaults.into_iter().next()
}

/// Requests a snapshot of `claim` for `backup`.
pub async fn create(
    api: &Api<VolumeSnapshot>,
    backup: &Backup,
    name: &str,
    claim: &str,
    class: &str,
    annotations: BTreeMap<String, String>,
) -> Result<VolumeSnapshot, SnapshotError> {
    let snapshot = VolumeSnapshot {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(creator_labels(&BACKUP_CREATOR, backup)),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: VolumeSnapshotSpec {
            source: VolumeSnapshotSource {
                persistent_volume_claim_name: Some(claim.to_string()),
                volume_snapshot_content_name: None,
            },
            volume_snapshot_class_name: Some(class.to_string()),
        },
        status: None,
    };
    let same_source = |existing: &VolumeSnapshot| {
        existing.spec.source.persistent_volume_claim_name.as_deref() == Some(claim)
    };
    create_own(api, backup, &snapshot, "VolumeSnapshot", same_source).await
}

/// Creates `object` for `backup`. Creating one that exists already is a retry when it is this
/// backup's own and `same` says it is the same request, and a `NameConflict` otherwise.
pub(crate) async fn create_own<K>(
    api: &Api<K>,
    backup: &Backup,
    object: &K,
    kind: &'static str,
    same: impl Fn(&K) -> bool,
) -> Result<K, SnapshotError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let existing = api.get(&object.name_any()).await?;
            if created_by(&existing, &BACKUP_CREATOR, backup) && same(&existing) {
                Ok(existing)
            } else {
                Err(SnapshotError::NameConflict {
                    kind,
                    name: object.name_any(),
                })
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// The selector of every snapshot a backup (by uid) made.
pub fn of_backup(uid: &str) -> ListParams {
    ListParams::default().labels(&format!("{BACKUP_UID_LABEL}={uid}"))
}

/// Every snapshot `backup` made: by its uid, and those it made before snapshots carried the
/// uid (pgsnap 0.1), by its name (see `controller::created_by`).
pub async fn list_own(
    api: &Api<VolumeSnapshot>,
    backup: &Backup,
) -> Result<Vec<VolumeSnapshot>, SnapshotError> {
    let mut own = api
        .list(&of_backup(&backup.uid().unwrap_or_default()))
        .await?
        .items;
    let legacy = format!(
        "{BACKUP_NAME_LABEL}={},!{BACKUP_UID_LABEL}",
        label_value(&backup.name_any())
    );
    let legacy = api.list(&ListParams::default().labels(&legacy)).await?;
    own.extend(
        legacy
            .items
            .into_iter()
            .filter(|s| created_by(s, &BACKUP_CREATOR, backup)),
    );
    Ok(own)
}

/// Watches the backup's snapshots until every one of `names` satisfies `done`; a snapshot
/// error or deletion ends the wait at once. The caller bounds it with its deadline.
pub async fn wait_until<K>(
    api: &Api<K>,
    backup_uid: &str,
    names: &[String],
    done: fn(&K) -> bool,
) -> Result<Vec<K>, SnapshotError>
where
    K: Resource<DynamicType = ()>
        + SnapshotLike
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + 'static,
{
    let config = watcher::Config::default().labels(&format!("{BACKUP_UID_LABEL}={backup_uid}"));
    let mut events = watcher(api.clone(), config).boxed();
    let mut seen: HashMap<String, K> = HashMap::new();
    while let Some(event) = events.try_next().await? {
        match event {
            watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                seen.insert(s.name_any(), s);
            }
            watcher::Event::Delete(s) if names.contains(&s.name_any()) => {
                return Err(SnapshotError::Deleted {
                    what: K::WHAT,
                    name: s.name_any(),
                });
            }
            watcher::Event::Delete(_) | watcher::Event::Init => {}
            watcher::Event::InitDone => {}
        }
        if let Some(failed) = names
            .iter()
            .filter_map(|n| seen.get(n))
            .find_map(|s| Some((s.name_any(), s.error_message()?)))
        {
            return Err(SnapshotError::Failed {
                what: K::WHAT,
                name: failed.0,
                message: failed.1,
            });
        }
        if names.iter().all(|n| seen.get(n).is_some_and(done)) {
            return Ok(names.iter().filter_map(|n| seen.remove(n)).collect());
        }
    }
    Err(SnapshotError::Watch(watcher::Error::NoResourceVersion))
}

/// What deleting a backup's snapshots did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removal {
    pub deleted: usize,
    /// Snapshots and groups still being cut, left to delete once cut.
    pub deferred: Vec<String>,
    /// Whether one of them waits on something no watch of the Backup sees (a group, or a
    /// content the CSI sidecar is still finishing): look again soon.
    pub recheck: bool,
}

/// Deletes every snapshot and group `backup` made, and with each its storage snapshot: a
/// content its class would retain is switched to Delete first, or it would outlive the backup
/// as an orphan. A snapshot still being cut is deferred: deleted mid-cut, external-snapshotter's
/// two controllers can race and keep it until their next resync, 15 minutes later
/// (kubernetes-csi/external-snapshotter#880, seen here with 8.6). One cutting for longer
/// than `CLEANUP_PATIENCE` is deleted anyway. So is one whose content the CSI sidecar is still
/// finishing (its being-created annotation), which deleted at once met the same race in CI
/// just after the cut was reported. Groups go first: the snapshot controller keeps a group's
/// members until their group is deleted, and then deletes them itself.
pub async fn delete_all(client: &Client, backup: &Backup) -> Result<Removal, SnapshotError> {
    let ns = backup.namespace().unwrap_or_default();
    let api: Api<VolumeSnapshot> = Api::namespaced(client.clone(), &ns);
    let mut removal = Removal::default();
    let now = now();
    // Looked for whatever the status says: a Backup deleted before its status write was seen
    // may have made a group all the same. None where the cluster serves no group API.
    let groups: Api<VolumeGroupSnapshot> = Api::namespaced(client.clone(), &ns);
    for g in group::list_own(&groups, backup).await? {
        let content = own_content(client, &g).await?;
        // A failed group's sidecar retries for ever under that annotation: it goes now.
        let finishing = g.error().is_none() && content.as_ref().is_some_and(Content::being_created);
        let unsettled = g.is_being_cut() || finishing;
        if unsettled && !out_of_patience(g.metadata.creation_timestamp.as_ref(), &now) {
            removal.deferred.push(g.name_any());
            removal.recheck = true;
            continue;
        }
        // Each member's content took the group content's deletion policy, and the snapshot
        // controller deletes the members with the group, adopted or not.
        for member in group::members(&api, &g).await? {
            let member_content = own_content(client, &member).await?;
            release_content(client, member_content).await?;
        }
        release_content(client, content).await?;
        delete_exactly(&groups, &g).await?;
        removal.deleted += 1;
    }
    group::unlabel_claims(client, &ns, &backup.uid().unwrap_or_default()).await?;
    for snapshot in list_own(&api, backup).await? {
        let content = own_content(client, &snapshot).await?;
        let finishing =
            snapshot.error().is_none() && content.as_ref().is_some_and(Content::being_created);
        if (snapshot.is_being_cut() || finishing)
            && !out_of_patience(snapshot.metadata.creation_timestamp.as_ref(), &now)
        {
            removal.deferred.push(snapshot.name_any());
            removal.recheck |= finishing;
            continue;
        }
        release_content(client, content).await?;
        delete_exactly(&api, &snapshot).await?;
        removal.deleted += 1;
    }
    Ok(removal)
}

/// The content bound to `snapshot` (a snapshot or a group), when it is that very object's
/// (it names the object's uid).
async fn own_content<S: SnapshotLike + Resource>(
    client: &Client,
    snapshot: &S,
) -> Result<Option<S::Content>, SnapshotError> {
    let Some(name) = snapshot.content_name() else {
        return Ok(None);
    };
    let contents: Api<S::Content> = Api::all(client.clone());
    let content = contents.get_opt(name).await?;
    let uid = snapshot.meta().uid.as_deref();
    Ok(content.filter(|c| c.bound_to().is_some() && c.bound_to() == uid))
}

/// Sets a snapshot's or group's own content to deletionPolicy Delete, so deleting the object
/// deletes the storage's copy.
async fn release_content<C: Content>(
    client: &Client,
    content: Option<C>,
) -> Result<(), SnapshotError> {
    let Some(content) = content.filter(|c| c.deletion_policy() != "Delete") else {
        return Ok(());
    };
    let patch = serde_json::json!({"spec": {"deletionPolicy": "Delete"}});
    Api::<C>::all(client.clone())
        .patch(
            &content.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: &str, driver: &str, default: bool) -> VolumeSnapshotClass {
        let mut meta = ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        };
        if default {
            meta.annotations = Some(BTreeMap::from([(
                DEFAULT_CLASS_ANNOTATION.to_string(),
                "true".to_string(),
            )]));
        }
        VolumeSnapshotClass {
            metadata: meta,
            driver: driver.into(),
            deletion_policy: "Delete".into(),
            parameters: BTreeMap::new(),
            kind: std::marker::PhantomData,
        }
    }

    #[test]
    fn the_default_class_is_the_drivers_own() {
        let classes = [
            class("b", "hostpath.csi.k8s.io", true),
            class("a", "hostpath.csi.k8s.io", true),
            class("c", "ebs.csi.aws.com", true),
            class("d", "x", false),
        ];
        assert_eq!(
            default_class_for(&classes, "hostpath.csi.k8s.io").as_deref(),
            Some("a")
        );
        assert_eq!(default_class_for(&classes, "x"), None);
    }

    #[test]
    fn names_stay_valid_and_distinct() {
        assert_eq!(
            snapshot_name("orders-1", "data-orders-db-0"),
            "orders-1-data-orders-db-0"
        );
        let long = "x".repeat(200);
        let a = snapshot_name(&long, &"a".repeat(100));
        let b = snapshot_name(&long, &"b".repeat(100));
        assert!(a.len() <= 253 && b.len() <= 253);
        assert_ne!(a, b);
    }
}
