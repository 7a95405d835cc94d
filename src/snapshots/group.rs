//! A backup's volumes cut as one CSI VolumeGroupSnapshot, at one instant: whether a group is
//! possible, the claims labelled so that the group's selector picks exactly them, the group
//! cut in backup mode, and its members taken on as the backup's own snapshots, so that
//! everything after the cut (label ConfigMap, readiness, restore, deletion) treats them as
//! the snapshots of a backup cut one by one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

use super::{SnapshotError, create_own, default_class_for};
use crate::api::BACKUP_CREATOR;
use crate::api::backup::{Backup, GroupSnapshotPolicy};
use crate::api::snapshot::{
    ClassKind, Content as _, Grouped, SnapshotLike, VolumeGroupSnapshot, VolumeGroupSnapshotClass,
    VolumeGroupSnapshotContent, VolumeGroupSnapshotSource, VolumeGroupSnapshotSpec, VolumeSnapshot,
};
use crate::controller::creator_labels;

/// On a claim while its backup's group is cut: the backup's uid, which the group selects.
pub const CLAIM_LABEL: &str = "pgsnap.io/group-snapshot";

/// How a backup's volumes are cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CutPlan {
    /// One snapshot per volume; with `groupSnapshot: Auto` over several volumes, why.
    Volumes { why_not_group: Option<String> },
    /// One group of every volume, of this VolumeGroupSnapshotClass.
    Group { class: String },
}

/// Decides how a backup is cut, from its policy, the class it names, each claim's CSI driver
/// and the cluster's group classes (`None`: the cluster does not serve the group API).
pub fn plan(
    policy: GroupSnapshotPolicy,
    requested: Option<&str>,
    drivers: &[&str],
    classes: Option<&[VolumeGroupSnapshotClass]>,
) -> Result<CutPlan, SnapshotError> {
    let volumes = |why: Option<String>| Ok(CutPlan::Volumes { why_not_group: why });
    // One volume has nothing to be cut at one instant with, but a class named for it is
    // still checked: a mistake in a spec is never passed over quietly.
    let alone = policy == GroupSnapshotPolicy::Auto && drivers.len() < 2;
    if policy == GroupSnapshotPolicy::Never || (alone && requested.is_none()) {
        return volumes(None);
    }
    let impossible = |why: String| match policy {
        GroupSnapshotPolicy::Always => Err(SnapshotError::GroupImpossible(why)),
        _ if alone => volumes(None),
        _ => volumes(Some(why)),
    };
    let Some(classes) = classes else {
        if let Some(name) = requested {
            return Err(SnapshotError::GroupClassNotFound(name.to_string()));
        }
        return impossible(format!(
            "the cluster serves no {}/v1 VolumeGroupSnapshot API (external-snapshotter 8.2+ with its group CRDs and the CSIVolumeGroupSnapshot feature gate)",
            Grouped::GROUP
        ));
    };
    let distinct: BTreeSet<&str> = drivers.iter().copied().collect();
    let driver = match distinct.into_iter().collect::<Vec<_>>()[..] {
        [one] => one,
        ref several => {
            return impossible(format!(
                "the volumes belong to several CSI drivers ({}), and a group is cut by one",
                several.join(", ")
            ));
        }
    };
    let class = match requested {
        Some(name) => match classes.iter().find(|c| c.name_any() == name) {
            Some(class) if class.driver == driver => name.to_string(),
            Some(class) => {
                return Err(SnapshotError::GroupClassOfAnotherDriver {
                    class: name.to_string(),
                    class_driver: class.driver.clone(),
                    driver: driver.to_string(),
                });
            }
            None => return Err(SnapshotError::GroupClassNotFound(name.to_string())),
        },
        None => match default_class_for(classes, driver) {
            Some(class) => class,
            None => {
                return impossible(format!(
                    "no VolumeGroupSnapshotClass is marked default for CSI driver {driver}: name one in spec.volumeGroupSnapshotClassName or annotate one with {}=\"true\"",
                    Grouped::DEFAULT_ANNOTATION
                ));
            }
        },
    };
    match alone {
        true => volumes(None),
        false => Ok(CutPlan::Group { class }),
    }
}

/// The cluster's group classes, or `None` when it does not serve the group API.
pub async fn classes(
    client: &Client,
) -> Result<Option<Vec<VolumeGroupSnapshotClass>>, SnapshotError> {
    let api: Api<VolumeGroupSnapshotClass> = Api::all(client.clone());
    match api.list(&ListParams::default()).await {
        Ok(list) => Ok(Some(list.items)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A backup's group: named as the backup (another kind, so no clash with it).
pub fn name(backup: &Backup) -> String {
    backup.name_any()
}

fn selector(uid: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([(CLAIM_LABEL.to_string(), uid.to_string())])),
        match_expressions: None,
    }
}

/// Labels the claims with the backup's uid, so that the group's selector picks exactly them.
/// Only this label is written: nothing else of the user's claims changes.
pub async fn label_claims(
    client: &Client,
    namespace: &str,
    claims: &[String],
    uid: &str,
) -> Result<(), SnapshotError> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({"metadata": {"labels": {CLAIM_LABEL: uid}}});
    for claim in claims {
        api.patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}

/// Removes the label from every claim that carries this backup's uid.
pub async fn unlabel_claims(
    client: &Client,
    namespace: &str,
    uid: &str,
) -> Result<(), SnapshotError> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let labelled = ListParams::default().labels(&format!("{CLAIM_LABEL}={uid}"));
    let patch = serde_json::json!({"metadata": {"labels": {CLAIM_LABEL: null}}});
    for claim in api.list(&labelled).await? {
        let (name, params, merge) = (
            claim.name_any(),
            PatchParams::default(),
            Patch::Merge(&patch),
        );
        match api.patch(&name, &params, &merge).await {
            Ok(_) => {}
            // Deleted since the list: nothing left to unlabel.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Requests the group of every claim labelled with the backup's uid. Creating one that
/// exists already is a retry when it is this backup's own, and a `NameConflict` otherwise.
pub async fn create(
    api: &Api<VolumeGroupSnapshot>,
    backup: &Backup,
    class: &str,
) -> Result<VolumeGroupSnapshot, SnapshotError> {
    let group = VolumeGroupSnapshot {
        metadata: ObjectMeta {
            name: Some(name(backup)),
            labels: Some(creator_labels(&BACKUP_CREATOR, backup)),
            ..Default::default()
        },
        spec: VolumeGroupSnapshotSpec {
            source: VolumeGroupSnapshotSource {
                selector: Some(selector(&backup.uid().unwrap_or_default())),
                volume_group_snapshot_content_name: None,
            },
            volume_group_snapshot_class_name: Some(class.to_string()),
        },
        status: None,
    };
    create_own(api, backup, &group, "VolumeGroupSnapshot", |_| true).await
}

/// Waits (by watch) until the storage has cut `group`, bound to its content (`group` as the
/// snapshot controller bound it): the content's creationTime, which the CSI sidecar sets as
/// soon as the driver has cut. The group's own creationTime comes only once the snapshot
/// controller has made every member, seconds later under its retries, and backup mode need
/// not last for that.
pub async fn wait_content_cut(
    client: &Client,
    group: &VolumeGroupSnapshot,
) -> Result<VolumeGroupSnapshotContent, SnapshotError> {
    let name = group.content_name().unwrap_or_default();
    let contents: Api<VolumeGroupSnapshotContent> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(contents, config).boxed();
    let failed = |message| SnapshotError::Failed {
        what: VolumeGroupSnapshot::WHAT,
        name: group.name_any(),
        message,
    };
    while let Some(event) = events.try_next().await? {
        let content = match event {
            watcher::Event::Apply(c) | watcher::Event::InitApply(c) => c,
            watcher::Event::Delete(_) => {
                return Err(SnapshotError::Deleted {
                    what: VolumeGroupSnapshot::WHAT,
                    name: group.name_any(),
                });
            }
            _ => continue,
        };
        // A content that names another group is not this group's cut.
        if content.bound_to() != group.uid().as_deref() {
            return Err(failed(format!(
                "its content {name} is bound to another group"
            )));
        }
        let status = content.status.clone().unwrap_or_default();
        if let Some(error) = status.error {
            let message = error.message.unwrap_or_else(|| "no message".into());
            return Err(failed(message));
        }
        if status.creation_time.is_some() {
            return Ok(content);
        }
    }
    Err(SnapshotError::Watch(watcher::Error::NoResourceVersion))
}

/// Waits (by watch) until the snapshot controller has made a member of `group` for every one
/// of `claims` and each is cut, then takes them on: the backup's labels, so that they are
/// found, waited for and deleted as its snapshots, and `annotations`. Returned by claim.
pub async fn adopt_members(
    api: &Api<VolumeSnapshot>,
    backup: &Backup,
    group: &VolumeGroupSnapshot,
    claims: &[String],
    annotations: &BTreeMap<String, String>,
) -> Result<HashMap<String, VolumeSnapshot>, SnapshotError> {
    let group_uid = group.uid().unwrap_or_default();
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    let mut members: HashMap<String, VolumeSnapshot> = HashMap::new();
    let found = loop {
        let Some(event) = events.try_next().await? else {
            return Err(SnapshotError::Watch(watcher::Error::NoResourceVersion));
        };
        match event {
            watcher::Event::Apply(s) | watcher::Event::InitApply(s)
                if s.owner_references().iter().any(|o| o.uid == group_uid) =>
            {
                members.insert(s.name_any(), s);
            }
            watcher::Event::Delete(s) if members.contains_key(&s.name_any()) => {
                return Err(SnapshotError::Deleted {
                    what: VolumeSnapshot::WHAT,
                    name: s.name_any(),
                });
            }
            _ => {}
        }
        if let Some((name, message)) = members
            .values()
            .find_map(|s| Some((s.name_any(), s.error_message()?)))
        {
            return Err(SnapshotError::Failed {
                what: VolumeSnapshot::WHAT,
                name,
                message,
            });
        }
        let by_claim = by_claim(members.values());
        if claims
            .iter()
            .all(|c| by_claim.get(c).is_some_and(|s| s.is_cut()))
        {
            break by_claim;
        }
    };
    let expected: BTreeSet<&String> = claims.iter().collect();
    let held: BTreeSet<&String> = found.keys().collect();
    if held != expected || found.len() != members.len() {
        return Err(SnapshotError::GroupMembers {
            group: group.name_any(),
            held: members
                .values()
                .map(|s| claim_of(s).unwrap_or_default().to_string())
                .collect(),
            expected: claims.to_vec(),
        });
    }
    let patch = serde_json::json!({"metadata": {
        "labels": creator_labels(&BACKUP_CREATOR, backup),
        "annotations": annotations,
    }});
    let mut adopted = HashMap::new();
    for (claim, member) in found {
        let patched = api
            .patch(
                &member.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        adopted.insert(claim.clone(), patched);
    }
    Ok(adopted)
}

fn claim_of(snapshot: &VolumeSnapshot) -> Option<&str> {
    snapshot.spec.source.persistent_volume_claim_name.as_deref()
}

fn by_claim<'a>(
    members: impl Iterator<Item = &'a VolumeSnapshot>,
) -> BTreeMap<String, VolumeSnapshot> {
    members
        .filter_map(|s| Some((claim_of(s)?.to_string(), s.clone())))
        .collect()
}

/// Every group `backup` made (by its uid); none where the cluster serves no group API.
pub async fn list_own(
    api: &Api<VolumeGroupSnapshot>,
    backup: &Backup,
) -> Result<Vec<VolumeGroupSnapshot>, SnapshotError> {
    match api
        .list(&super::of_backup(&backup.uid().unwrap_or_default()))
        .await
    {
        Ok(own) => Ok(own.items),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// The members the snapshot controller made of `group` (they carry its uid as their owner),
/// whether or not the backup has taken them on yet.
pub async fn members(
    api: &Api<VolumeSnapshot>,
    group: &VolumeGroupSnapshot,
) -> Result<Vec<VolumeSnapshot>, SnapshotError> {
    let uid = group.uid().unwrap_or_default();
    let all = api.list(&ListParams::default()).await?;
    Ok(all
        .items
        .into_iter()
        .filter(|s| s.owner_references().iter().any(|o| o.uid == uid))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use GroupSnapshotPolicy::{Always, Auto, Never};

    fn class(name: &str, driver: &str, default: bool) -> VolumeGroupSnapshotClass {
        let annotations = default.then(|| {
            BTreeMap::from([(Grouped::DEFAULT_ANNOTATION.to_string(), "true".to_string())])
        });
        VolumeGroupSnapshotClass {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations,
                ..Default::default()
            },
            driver: driver.into(),
            deletion_policy: "Delete".into(),
            parameters: BTreeMap::new(),
            kind: std::marker::PhantomData,
        }
    }

    const HOSTPATH: &str = "hostpath.csi.k8s.io";

    fn group(class: &str) -> CutPlan {
        CutPlan::Group {
            class: class.into(),
        }
    }

    fn why_not(plan: Result<CutPlan, SnapshotError>) -> String {
        match plan {
            Ok(CutPlan::Volumes {
                why_not_group: Some(why),
            }) => why,
            other => panic!("expected a fallback with a reason, got {other:?}"),
        }
    }

    #[test]
    fn auto_groups_several_volumes_of_a_driver_with_a_default_class() {
        let classes = [class("b", HOSTPATH, true), class("a", HOSTPATH, false)];
        let two = [HOSTPATH, HOSTPATH];
        assert_eq!(plan(Auto, None, &two, Some(&classes)).unwrap(), group("b"));
        assert_eq!(
            plan(Auto, Some("a"), &two, Some(&classes)).unwrap(),
            group("a")
        );
        // One volume: nothing to cut at one instant with anything else.
        let one = [HOSTPATH];
        let alone = plan(Auto, None, &one, Some(&classes)).unwrap();
        assert_eq!(
            alone,
            CutPlan::Volumes {
                why_not_group: None
            }
        );
        assert_eq!(
            plan(Always, None, &one, Some(&classes)).unwrap(),
            group("b")
        );
        let never = plan(Never, Some("a"), &two, Some(&classes)).unwrap();
        assert_eq!(
            never,
            CutPlan::Volumes {
                why_not_group: None
            }
        );
    }

    #[test]
    fn auto_falls_back_and_always_refuses_where_a_group_is_impossible() {
        let two = [HOSTPATH, HOSTPATH];
        let no_default = [class("a", HOSTPATH, false), class("c", "other", true)];
        let why = why_not(plan(Auto, None, &two, Some(&no_default)));
        assert!(
            why.starts_with(
                "no VolumeGroupSnapshotClass is marked default for CSI driver hostpath.csi.k8s.io"
            ),
            "{why}"
        );
        let refused = plan(Always, None, &two, Some(&no_default)).unwrap_err();
        assert_eq!(refused.reason(), "GroupSnapshotImpossible");
        assert_eq!(
            refused.to_string(),
            format!("groupSnapshot Always, but {why}")
        );

        let mixed = [HOSTPATH, "other"];
        let classes = [class("a", HOSTPATH, true), class("c", "other", true)];
        let why = why_not(plan(Auto, None, &mixed, Some(&classes)));
        assert_eq!(
            why,
            "the volumes belong to several CSI drivers (hostpath.csi.k8s.io, other), and a group is cut by one"
        );
        let unserved = why_not(plan(Auto, None, &two, None));
        assert!(
            unserved.starts_with(
                "the cluster serves no groupsnapshot.storage.k8s.io/v1 VolumeGroupSnapshot API"
            ),
            "{unserved}"
        );
        let refused = plan(Always, None, &two, None).unwrap_err();
        assert_eq!(refused.reason(), "GroupSnapshotImpossible");
    }

    #[test]
    fn a_named_class_is_never_passed_over() {
        let two = [HOSTPATH, HOSTPATH];
        let classes = [class("a", HOSTPATH, true), class("c", "other", false)];
        let alone = plan(Auto, Some("a"), &[HOSTPATH], Some(&classes)).unwrap();
        assert_eq!(
            alone,
            CutPlan::Volumes {
                why_not_group: None
            }
        );
        let missing = plan(Auto, Some("x"), &[HOSTPATH], Some(&classes)).unwrap_err();
        assert_eq!(missing.reason(), "NoGroupSnapshotClass");
        let unserved = plan(Auto, Some("a"), &two, None).unwrap_err();
        assert_eq!(
            unserved.to_string(),
            "VolumeGroupSnapshotClass a does not exist"
        );
        for policy in [Auto, Always] {
            let missing = plan(policy, Some("x"), &two, Some(&classes)).unwrap_err();
            assert_eq!(missing.reason(), "NoGroupSnapshotClass");
            assert_eq!(
                missing.to_string(),
                "VolumeGroupSnapshotClass x does not exist"
            );
            let foreign = plan(policy, Some("c"), &two, Some(&classes)).unwrap_err();
            assert_eq!(foreign.reason(), "NoGroupSnapshotClass");
            assert_eq!(
                foreign.to_string(),
                "VolumeGroupSnapshotClass c is for CSI driver other, but the volumes are of hostpath.csi.k8s.io: name a group class of hostpath.csi.k8s.io, or none for its default"
            );
        }
    }
}
