//! A container's environment: env, envFrom, valueFrom and `$(VAR)` expansion, in the
//! kubelet's order and with its rules.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Container, ObjectFieldSelector, Pod, Secret};
use kube::{Api, Client};

use super::PodError;

/// Expands `$(NAME)` from `vars`; `$$` is a literal `$`; an undefined `$(NAME)` stays as
/// written (Kubernetes' expansion rules, so `$(HOME)` in a shell script survives).
pub fn expand(input: &str, vars: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars(name) {
                Some(v) => out.push_str(&v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The pod's address: the agent records it in its copy of the pod before anything runs.
pub fn pod_ip(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .unwrap_or(super::NODE_IP)
}

/// Resolves `fieldRef` paths against the pod (the downward API).
pub fn field(pod: &Pod, sel: &ObjectFieldSelector) -> Result<String, PodError> {
    let meta = &pod.metadata;
    let path = sel.field_path.as_str();
    let map_key = |prefix: &str| path.strip_prefix(prefix).and_then(|r| r.strip_suffix("']"));
    let value = match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone()),
        "status.podIP" | "status.podIPs" => Some(pod_ip(pod).into()),
        "status.hostIP" | "status.hostIPs" => Some(super::NODE_IP.into()),
        "metadata.labels" | "metadata.annotations" => {
            let map = if path == "metadata.labels" {
                &meta.labels
            } else {
                &meta.annotations
            };
            Some(
                map.iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={v:?}\n"))
                    .collect(),
            )
        }
        _ => {
            if let Some(k) = map_key("metadata.labels['") {
                Some(
                    meta.labels
                        .as_ref()
                        .and_then(|l| l.get(k).cloned())
                        .unwrap_or_default(),
                )
            } else if let Some(k) = map_key("metadata.annotations['") {
                Some(
                    meta.annotations
                        .as_ref()
                        .and_then(|l| l.get(k).cloned())
                        .unwrap_or_default(),
                )
            } else {
                return Err(PodError::Config(format!("unsupported fieldRef {path}")));
            }
        }
    };
    Ok(value.unwrap_or_default())
}

/// ConfigMaps and Secrets of the pod's namespace, as the containers see them.
pub struct Refs {
    configmaps: Api<ConfigMap>,
    secrets: Api<Secret>,
}

impl Refs {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            configmaps: Api::namespaced(client.clone(), namespace),
            secrets: Api::namespaced(client, namespace),
        }
    }

    /// All keys of a ConfigMap (data and binaryData); `None` when it does not exist.
    pub async fn configmap(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, PodError> {
        let Some(cm) = self.configmaps.get_opt(name).await? else {
            return Ok(None);
        };
        let mut out: BTreeMap<String, Vec<u8>> = cm
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        out.extend(
            cm.binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0)),
        );
        Ok(Some(out))
    }

    /// All keys of a Secret (data, and stringData if the server echoed it); `None` if absent.
    pub async fn secret(&self, name: &str) -> Result<Option<BTreeMap<String, Vec<u8>>>, PodError> {
        let Some(s) = self.secrets.get_opt(name).await? else {
            return Ok(None);
        };
        let mut out: BTreeMap<String, Vec<u8>> = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        out.extend(
            s.string_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes())),
        );
        Ok(Some(out))
    }

    async fn key(
        &self,
        secret: bool,
        name: &str,
        key: &str,
        optional: bool,
    ) -> Result<Option<String>, PodError> {
        let kind = if secret { "secret" } else { "configmap" };
        let data = if secret {
            self.secret(name).await?
        } else {
            self.configmap(name).await?
        };
        match data.and_then(|d| d.get(key).cloned()) {
            Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            None if optional => Ok(None),
            None => Err(PodError::Config(format!(
                "{kind} \"{name}\" or its key \"{key}\" not found"
            ))),
        }
    }
}

/// The container's environment in order: envFrom, then env (later entries win), each value
/// expanded against what came before it, as the kubelet does.
pub async fn resolve(
    pod: &Pod,
    c: &Container,
    refs: &Refs,
) -> Result<Vec<(String, String)>, PodError> {
    let mut vars: Vec<(String, String)> = Vec::new();
    let set = |vars: &mut Vec<(String, String)>, k: String, v: String| {
        vars.retain(|(n, _)| *n != k);
        vars.push((k, v));
    };
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (data, name, optional, kind) = if let Some(r) = &from.config_map_ref {
            (
                refs.configmap(&r.name).await?,
                &r.name,
                r.optional.unwrap_or(false),
                "configmap",
            )
        } else if let Some(r) = &from.secret_ref {
            (
                refs.secret(&r.name).await?,
                &r.name,
                r.optional.unwrap_or(false),
                "secret",
            )
        } else {
            continue;
        };
        match data {
            Some(d) => d.into_iter().for_each(|(k, v)| {
                set(
                    &mut vars,
                    format!("{prefix}{k}"),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            }),
            None if optional => {}
            None => return Err(PodError::Config(format!("{kind} \"{name}\" not found"))),
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            let snapshot = vars.clone();
            Some(expand(v, &|n| {
                snapshot
                    .iter()
                    .rev()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
            }))
        } else if let Some(from) = &e.value_from {
            if let Some(f) = &from.field_ref {
                Some(field(pod, f)?)
            } else if let Some(r) = &from.secret_key_ref {
                refs.key(true, &r.name, &r.key, r.optional.unwrap_or(false))
                    .await?
            } else if let Some(r) = &from.config_map_key_ref {
                refs.key(false, &r.name, &r.key, r.optional.unwrap_or(false))
                    .await?
            } else {
                return Err(PodError::Config(format!(
                    "env {}: only fieldRef, secretKeyRef and configMapKeyRef are supported",
                    e.name
                )));
            }
        } else {
            Some(String::new())
        };
        if let Some(v) = value {
            set(&mut vars, e.name.clone(), v);
        }
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let vars = |n: &str| (n == "A").then(|| "x".to_string());
        assert_eq!(expand("$(A)/$(B)", &vars), "x/$(B)");
        assert_eq!(expand("$$(A) $$ $", &vars), "$(A) $ $");
        assert_eq!(expand("pre$(A", &vars), "pre$(A");
    }

    #[test]
    fn downward_api_fields() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "labels": {"app": "db"}},
            "spec": {"containers": [], "nodeName": "node"},
            "status": {"podIP": "10.244.0.9"}
        }))
        .unwrap();
        let f = |p: &str| {
            field(
                &pod,
                &ObjectFieldSelector {
                    field_path: p.into(),
                    api_version: None,
                },
            )
            .unwrap()
        };
        assert_eq!(f("metadata.namespace"), "n");
        assert_eq!(f("metadata.labels['app']"), "db");
        assert_eq!(f("status.podIP"), "10.244.0.9");
        assert_eq!(f("status.hostIP"), "127.0.0.1");
        assert_eq!(f("spec.nodeName"), "node");
    }
}
