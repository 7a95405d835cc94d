//! A pod's volumes as host directories, ready to be bind-mounted into its containers.
//!
//! PVC → its bound PV → `spec.csi.volumeHandle` → `<hostpath state dir>/<handle>`, the
//! directory the CSI hostpath driver created for the volume (the driver's NodePublish would
//! bind-mount exactly that directory). ConfigMap, Secret, downward API and projected volumes
//! are written once into `<pod dir>/volumes/<name>` (no live updates), emptyDir is a plain
//! directory there.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    DownwardAPIVolumeFile, KeyToPath, PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount,
    Volume,
};
use kube::api::PostParams;
use kube::runtime::wait::await_condition;
use kube::{Api, Client};

use super::PodError;
use super::env::{Refs, field};

/// What the volume code needs from the node.
pub struct VolumeContext<'a> {
    pub client: &'a Client,
    pub refs: &'a Refs,
    pub pod: &'a Pod,
    pub pod_dir: &'a Path,
    pub hostpath_state: &'a Path,
    /// The cluster CA, for `kube-root-ca.crt` when its ConfigMap is not published yet.
    pub ca_pem: &'a str,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> PodError {
    move |e| PodError::Volume(format!("{what}: {e}"))
}

/// Writes `files` (relative path → bytes, mode) under `dir`, replacing what was there.
fn write_files(dir: &Path, files: Vec<(String, Vec<u8>, u32)>) -> Result<(), PodError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(format!("clearing {}", dir.display())))?;
    }
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).ok();
    for (rel, data, mode) in files {
        if rel.split('/').any(|c| c == "..") {
            return Err(PodError::Volume(format!("path {rel:?} escapes the volume")));
        }
        let path = dir.join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("creating {}", parent.display())))?;
        }
        std::fs::write(&path, data).map_err(io(format!("writing {}", path.display())))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(io(format!("chmod {rel}")))?;
    }
    Ok(())
}

/// Selects keys of a ConfigMap/Secret: `items` (key → path, mode) or every key.
fn select(
    what: &str,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    mode: u32,
    optional: bool,
) -> Result<Vec<(String, Vec<u8>, u32)>, PodError> {
    match items {
        None => Ok(data.into_iter().map(|(k, v)| (k, v, mode)).collect()),
        Some(items) => items
            .iter()
            .filter_map(|i| match data.get(&i.key) {
                Some(v) => Some(Ok((
                    i.path.clone(),
                    v.clone(),
                    i.mode.map_or(mode, |m| m as u32),
                ))),
                None if optional => None,
                None => Some(Err(PodError::Volume(format!(
                    "{what} has no key {:?}",
                    i.key
                )))),
            })
            .collect(),
    }
}

async fn source(
    ctx: &VolumeContext<'_>,
    secret: bool,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, PodError> {
    let data = if secret {
        ctx.refs.secret(name).await?
    } else {
        ctx.refs.configmap(name).await?
    };
    match data {
        Some(d) => Ok(Some(d)),
        // The root CA ConfigMap is published by the controller-manager a moment after a
        // namespace appears; the node knows the same CA.
        None if !secret && name == "kube-root-ca.crt" => Ok(Some(BTreeMap::from([(
            "ca.crt".to_string(),
            ctx.ca_pem.as_bytes().to_vec(),
        )]))),
        None if optional => Ok(None),
        None => Err(PodError::Volume(format!(
            "{} \"{name}\" not found",
            if secret { "secret" } else { "configmap" }
        ))),
    }
}

fn downward(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    mode: u32,
) -> Result<Vec<(String, Vec<u8>, u32)>, PodError> {
    items
        .iter()
        .map(|i| match &i.field_ref {
            Some(f) => Ok((
                i.path.clone(),
                field(pod, f)?.into_bytes(),
                i.mode.map_or(mode, |m| m as u32),
            )),
            None => Err(PodError::Volume(format!(
                "downwardAPI {}: only fieldRef is supported",
                i.path
            ))),
        })
        .collect()
}

async fn token(
    ctx: &VolumeContext<'_>,
    audience: Option<&String>,
    seconds: Option<i64>,
) -> Result<Vec<u8>, PodError> {
    let spec = ctx.pod.spec.as_ref();
    let sa = spec
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let ns = ctx.pod.metadata.namespace.as_deref().unwrap_or("default");
    let request = TokenRequest {
        spec: TokenRequestSpec {
            // Empty means the API server's own audience, as for the kubelet.
            audiences: audience.into_iter().cloned().collect(),
            expiration_seconds: Some(seconds.unwrap_or(3607)),
            bound_object_ref: Some(BoundObjectReference {
                kind: Some("Pod".into()),
                api_version: Some("v1".into()),
                name: ctx.pod.metadata.name.clone(),
                uid: ctx.pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(ctx.client.clone(), ns)
        .create_token_request(&sa, &PostParams::default(), &request)
        .await?;
    Ok(answer
        .status
        .map(|s| s.token)
        .unwrap_or_default()
        .into_bytes())
}

/// The hostpath directory behind a PVC, waiting (by watch) until the claim is Bound.
pub async fn claim_dir(
    client: &Client,
    ns: &str,
    claim: &str,
    hostpath_state: &Path,
) -> Result<PathBuf, PodError> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let bound = |c: Option<&PersistentVolumeClaim>| {
        c.and_then(|c| c.status.as_ref())
            .and_then(|s| s.phase.as_deref())
            == Some("Bound")
    };
    let pvc = await_condition(claims, claim, bound)
        .await
        .map_err(|e| PodError::Volume(format!("waiting for claim {claim}: {e}")))?
        .ok_or_else(|| PodError::Volume(format!("claim {claim} disappeared")))?;
    let pv_name = pvc.spec.and_then(|s| s.volume_name).unwrap_or_default();
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get(&pv_name)
        .await?;
    let spec = pv.spec.unwrap_or_default();
    let dir = if let Some(csi) = spec.csi {
        hostpath_state.join(csi.volume_handle)
    } else if let Some(hp) = spec.host_path {
        PathBuf::from(hp.path)
    } else {
        return Err(PodError::Volume(format!(
            "volume {pv_name} is neither a CSI hostpath nor a hostPath volume"
        )));
    };
    if !dir.is_dir() {
        return Err(PodError::Volume(format!(
            "volume {pv_name} of claim {claim}: {} does not exist",
            dir.display()
        )));
    }
    Ok(dir)
}

/// Prepares every volume of the pod; returns volume name → host path.
pub async fn prepare(ctx: &VolumeContext<'_>) -> Result<HashMap<String, PathBuf>, PodError> {
    let spec = ctx.pod.spec.as_ref();
    let ns = ctx.pod.metadata.namespace.as_deref().unwrap_or("default");
    let fs_group = spec
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.fs_group);
    let mut out = HashMap::new();
    for v in spec.and_then(|s| s.volumes.as_ref()).into_iter().flatten() {
        let dir = ctx.pod_dir.join("volumes").join(&v.name);
        let path = prepare_one(ctx, ns, v, &dir).await?;
        if let (Some(gid), true) = (fs_group, v.host_path.is_none()) {
            // Like the kubelet: API-sourced volumes are read-only to the group.
            let read_only = v.persistent_volume_claim.is_none() && v.empty_dir.is_none();
            apply_fs_group(&path, gid as u32, read_only)
                .map_err(io(format!("fsGroup on volume {}", v.name)))?;
        }
        out.insert(v.name.clone(), path);
    }
    Ok(out)
}

async fn prepare_one(
    ctx: &VolumeContext<'_>,
    ns: &str,
    v: &Volume,
    dir: &Path,
) -> Result<PathBuf, PodError> {
    if let Some(c) = &v.persistent_volume_claim {
        return claim_dir(ctx.client, ns, &c.claim_name, ctx.hostpath_state).await;
    }
    if let Some(hp) = &v.host_path {
        let path = PathBuf::from(&hp.path);
        if hp.type_.as_deref() == Some("DirectoryOrCreate") {
            std::fs::create_dir_all(&path).map_err(io(format!("hostPath {}", hp.path)))?;
        }
        return Ok(path);
    }
    if v.empty_dir.is_some() {
        std::fs::create_dir_all(dir).map_err(io(format!("emptyDir {}", v.name)))?;
        // Like the kubelet: world-writable, so any runAsUser can use it.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).ok();
        return Ok(dir.to_owned());
    }
    let files = if let Some(cm) = &v.config_map {
        let mode = cm.default_mode.unwrap_or(0o644) as u32;
        let optional = cm.optional.unwrap_or(false);
        match source(ctx, false, &cm.name, optional).await? {
            Some(d) => select(
                &format!("configmap {}", cm.name),
                d,
                cm.items.as_ref(),
                mode,
                optional,
            )?,
            None => vec![],
        }
    } else if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let mode = s.default_mode.unwrap_or(0o644) as u32;
        let optional = s.optional.unwrap_or(false);
        match source(ctx, true, &name, optional).await? {
            Some(d) => select(
                &format!("secret {name}"),
                d,
                s.items.as_ref(),
                mode,
                optional,
            )?,
            None => vec![],
        }
    } else if let Some(d) = &v.downward_api {
        downward(
            ctx.pod,
            d.items.as_deref().unwrap_or_default(),
            d.default_mode.unwrap_or(0o644) as u32,
        )?
    } else if let Some(p) = &v.projected {
        let mode = p.default_mode.unwrap_or(0o644) as u32;
        let mut files = Vec::new();
        for s in p.sources.iter().flatten() {
            if let Some(t) = &s.service_account_token {
                files.push((
                    t.path.clone(),
                    token(ctx, t.audience.as_ref(), t.expiration_seconds).await?,
                    mode,
                ));
            } else if let Some(cm) = &s.config_map {
                let optional = cm.optional.unwrap_or(false);
                if let Some(d) = source(ctx, false, &cm.name, optional).await? {
                    files.extend(select(
                        &format!("configmap {}", cm.name),
                        d,
                        cm.items.as_ref(),
                        mode,
                        optional,
                    )?);
                }
            } else if let Some(sec) = &s.secret {
                let optional = sec.optional.unwrap_or(false);
                if let Some(d) = source(ctx, true, &sec.name, optional).await? {
                    files.extend(select(
                        &format!("secret {}", sec.name),
                        d,
                        sec.items.as_ref(),
                        mode,
                        optional,
                    )?);
                }
            } else if let Some(d) = &s.downward_api {
                files.extend(downward(
                    ctx.pod,
                    d.items.as_deref().unwrap_or_default(),
                    mode,
                )?);
            } else {
                return Err(PodError::Volume(format!(
                    "projected volume {}: unsupported source",
                    v.name
                )));
            }
        }
        files
    } else {
        return Err(PodError::Volume(format!(
            "volume {}: only persistentVolumeClaim, configMap, secret, emptyDir, downwardAPI, projected and hostPath are supported",
            v.name
        )));
    };
    write_files(dir, files)?;
    Ok(dir.to_owned())
}

/// The kubelet's fsGroup ownership: group `gid` everywhere, group read/write (read only for
/// ConfigMap/Secret-like volumes), directories group-searchable with setgid so new files
/// inherit the group.
pub fn apply_fs_group(path: &Path, gid: u32, read_only: bool) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, None, Some(gid))?;
    let mode = meta.permissions().mode() & 0o7777;
    let group = if read_only { 0o040 } else { 0o060 };
    let wanted = if meta.is_dir() {
        mode | 0o2010 | group
    } else {
        mode | group
    };
    if wanted != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(wanted))?;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            apply_fs_group(&entry?.path(), gid, read_only)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_select_and_rename_keys() {
        let data = BTreeMap::from([
            ("a".to_string(), b"1".to_vec()),
            ("b".to_string(), b"2".to_vec()),
        ]);
        let items = vec![KeyToPath {
            key: "b".into(),
            path: "sub/b.txt".into(),
            mode: Some(0o600),
        }];
        let files = select("cm", data.clone(), Some(&items), 0o644, false).unwrap();
        assert_eq!(files, vec![("sub/b.txt".to_string(), b"2".to_vec(), 0o600)]);
        assert_eq!(
            select("cm", data.clone(), None, 0o644, false)
                .unwrap()
                .len(),
            2
        );
        let missing = vec![KeyToPath {
            key: "z".into(),
            path: "z".into(),
            mode: None,
        }];
        assert!(select("cm", data.clone(), Some(&missing), 0o644, false).is_err());
        assert!(
            select("cm", data, Some(&missing), 0o644, true)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn files_are_written_with_modes() {
        let dir = std::env::temp_dir().join(format!("node-agent-volumes-{}", std::process::id()));
        write_files(&dir, vec![("x/y".into(), b"hi".to_vec(), 0o640)]).unwrap();
        let meta = std::fs::metadata(dir.join("x/y")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert!(write_files(&dir, vec![("../evil".into(), vec![], 0o644)]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
