//! The test cluster from a test's point of view: a client, a fresh namespace per test, waits
//! with useful failure messages, pod logs, and a log dump when a test fails.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, LogParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{Condition, await_condition, conditions};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::agent::volumes::claim_dir;

/// The repository root (this crate lives in `<repo>/e2e`).
/// Where cargo puts this workspace's binaries, as cargo itself decides it.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The cluster's directory: `PGSNAP_CLUSTER_DIR`, else `<repo>/.cluster` (as `e2e/cluster`).
pub fn cluster_dir() -> PathBuf {
    std::env::var_os("PGSNAP_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cluster"))
}

const HOW_TO_FIX: &str =
    "start the test cluster with `e2e/cluster up` (docs/cluster.md), or run `make test`";

/// A pod cut off the network ([`Cluster::cut`]); dropping it restores the link.
#[must_use = "the link is restored when this is dropped"]
pub struct Cut(std::net::Ipv4Addr);

impl Drop for Cut {
    fn drop(&mut self) {
        if let Err(e) = crate::agent::network::set_cut(self.0, false) {
            eprintln!("restoring the link of {}: {e}", self.0);
        }
    }
}

/// A test's handle on the cluster, with its own namespace (deleted when dropped; every
/// component's log tail is printed first if the test is failing).
pub struct Cluster {
    pub client: Client,
    pub namespace: String,
    pub dir: PathBuf,
    kubeconfig: PathBuf,
}

impl Cluster {
    /// Connects with `KUBECONFIG` (else `<cluster dir>/kubeconfig`) and creates a namespace
    /// named after the running test. Panics, saying how to start the cluster, when there is
    /// none: a missing cluster fails a test, it never skips it.
    pub async fn from_env() -> Cluster {
        let dir = cluster_dir();
        let kubeconfig = std::env::var_os("KUBECONFIG")
            .map(PathBuf::from)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| dir.join("kubeconfig"));
        if !kubeconfig.exists() {
            panic!(
                "no test cluster: {} does not exist; {HOW_TO_FIX}",
                kubeconfig.display()
            );
        }
        let client = client_from(&kubeconfig).await;
        if let Err(e) = client.apiserver_version().await {
            panic!(
                "the test cluster of {} does not answer ({e}); {HOW_TO_FIX}",
                kubeconfig.display()
            );
        }
        warn_if_no_node(&client).await;
        let namespace = test_namespace_name();
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(namespace.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {namespace}: {e}"));
        // Pods need the namespace's default ServiceAccount (made by the controller-manager).
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), &namespace);
        tokio::time::timeout(Duration::from_secs(30), await_condition(sas, "default", |s: Option<&_>| s.is_some()))
            .await
            .unwrap_or_else(|_| panic!("namespace {namespace} got no default ServiceAccount in 30s: is kube-controller-manager running? {HOW_TO_FIX}"))
            .unwrap_or_else(|e| panic!("watching ServiceAccounts: {e}"));
        Cluster {
            client,
            namespace,
            dir,
            kubeconfig,
        }
    }

    /// The admin client's configuration (to build clients with other credentials).
    pub async fn client_config(&self) -> kube::Config {
        config_from(&self.kubeconfig).await
    }

    /// An Api of a namespaced kind in the test's namespace.
    /// The test's WAL archives outside every volume (see `postgres_pod`), removed with the
    /// test's namespace.
    pub fn archives(&self) -> PathBuf {
        self.dir.join("archives").join(&self.namespace)
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Waits (by watch) until `cond` holds for the named object of `api`; on timeout panics
    /// with the object as last seen.
    pub async fn wait_for<K>(
        &self,
        api: Api<K>,
        name: &str,
        what: &str,
        timeout: Duration,
        cond: impl Condition<K>,
    ) -> K
    where
        K: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
    {
        match tokio::time::timeout(timeout, await_condition(api.clone(), name, cond)).await {
            Ok(Ok(Some(obj))) => obj,
            Ok(Ok(None)) => panic!("{name}: {what}: the object does not exist"),
            Ok(Err(e)) => panic!("{name}: {what}: watch failed: {e}"),
            Err(_) => {
                let last = api.get_opt(name).await.ok().flatten();
                panic!("{name}: not {what} after {timeout:?}; last seen: {last:#?}")
            }
        }
    }

    /// Waits (by watch) until the object with this uid is gone.
    pub async fn wait_deleted<K>(&self, api: Api<K>, name: &str, uid: &str, timeout: Duration)
    where
        K: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
    {
        match tokio::time::timeout(
            timeout,
            await_condition(api.clone(), name, conditions::is_deleted(uid)),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("{name}: waiting for its deletion: watch failed: {e}"),
            Err(_) => {
                let last = api.get_opt(name).await.ok().flatten();
                panic!("{name}: not deleted after {timeout:?}; last seen: {last:#?}")
            }
        }
    }

    /// Waits until a PVC is Bound and returns the host directory behind it (the CSI hostpath
    /// driver's directory for its volume).
    pub async fn pvc_host_dir(&self, claim: &str) -> PathBuf {
        let state = self.dir.join("hostpath");
        match tokio::time::timeout(
            Duration::from_secs(60),
            claim_dir(&self.client, &self.namespace, claim, &state),
        )
        .await
        {
            Ok(Ok(dir)) => dir,
            Ok(Err(e)) => panic!("PVC {claim}: {e}"),
            Err(_) => {
                let pvc = self
                    .api::<PersistentVolumeClaim>()
                    .get_opt(claim)
                    .await
                    .ok()
                    .flatten();
                panic!(
                    "PVC {claim} not Bound after 60s: {:#?}",
                    pvc.and_then(|p| p.status)
                )
            }
        }
    }

    /// The log of one container of a pod of the test namespace, as `kubectl logs -c` gives
    /// it (the running instance's, else the last one's); a line saying why when there is none.
    pub async fn container_log(&self, pod: &str, container: &str) -> String {
        self.log(pod, container, false).await
    }

    async fn log(&self, pod: &str, container: &str, previous: bool) -> String {
        let params = LogParams {
            container: Some(container.into()),
            previous,
            ..Default::default()
        };
        self.api::<Pod>()
            .logs(pod, &params)
            .await
            .unwrap_or_else(|e| format!("(logs of {pod}/{container}: {e})"))
    }

    /// `kubectl` (from the PATH that `e2e/cluster env` sets) for this cluster, in the test's
    /// namespace.
    pub fn kubectl(&self) -> tokio::process::Command {
        let path = std::env::var("PATH").unwrap_or_default();
        let Some(kubectl) = crate::agent::sandbox::lookup("kubectl", &[("PATH".into(), path)])
        else {
            panic!(
                "kubectl is not in the PATH: eval \"$(e2e/cluster env)\" puts it there; {HOW_TO_FIX}"
            )
        };
        let mut cmd = tokio::process::Command::new(kubectl);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--namespace")
            .arg(&self.namespace);
        cmd
    }

    /// `kubectl exec <pod> -c <container> -- argv`: the command in the container's mounts,
    /// environment, working directory and user. Returns its output (and exit status).
    pub async fn exec(&self, pod: &str, container: &str, argv: &[&str]) -> std::process::Output {
        self.kubectl()
            .args(["exec", pod, "-c", container, "--"])
            .args(argv)
            .output()
            .await
            .unwrap_or_else(|e| panic!("running kubectl exec: {e}"))
    }

    /// Cuts the pod off the network, as a partition does: packets to and from its address
    /// are dropped, connections stay open, until the returned guard is dropped. The API
    /// server stays reachable from inside the pod (the agent relays it over the pod's own
    /// loopback): cut database pods, not operator pods.
    pub async fn cut(&self, pod: &str) -> Cut {
        let ip = self.pod_ip(pod).await;
        let ip = ip
            .parse()
            .unwrap_or_else(|_| panic!("cut: pod {pod}'s address {ip} is not IPv4"));
        crate::agent::network::set_cut(ip, true).unwrap_or_else(|e| panic!("cut {pod}: {e}"));
        Cut(ip)
    }

    /// The pod's address, once it has one (the pod may not even exist yet).
    pub async fn pod_ip(&self, pod: &str) -> String {
        let has_ip = |p: Option<&Pod>| {
            p.and_then(|p| p.status.as_ref())
                .is_some_and(|s| s.pod_ip.is_some())
        };
        let p = self
            .wait_for(
                self.api::<Pod>(),
                pod,
                "an address",
                Duration::from_secs(120),
                has_ip,
            )
            .await;
        p.status.and_then(|s| s.pod_ip).unwrap_or_default()
    }

    /// Every container log of a pod, each under a header; a restarted container's previous
    /// instance first.
    pub async fn pod_logs(&self, pod: &str) -> String {
        let Ok(p) = self.api::<Pod>().get(pod).await else {
            return format!("(pod {pod} not found)");
        };
        let status = p.status.unwrap_or_default();
        let restarted = |name: &str| {
            status
                .init_container_statuses
                .iter()
                .flatten()
                .chain(status.container_statuses.iter().flatten())
                .any(|c| c.name == name && c.restart_count > 0)
        };
        let spec = p.spec.unwrap_or_default();
        let mut out = String::new();
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
        {
            if restarted(&c.name) {
                out.push_str(&format!(
                    "---- {pod}/{} (previous instance)\n{}\n",
                    c.name,
                    self.log(pod, &c.name, true).await
                ));
            }
            out.push_str(&format!(
                "---- {pod}/{}\n{}\n",
                c.name,
                self.container_log(pod, &c.name).await
            ));
        }
        out
    }

    /// Prints the tail of every component's log and of every pod log of this test.
    pub fn dump_logs(&self) {
        eprintln!(
            "======== test cluster logs ({}) ========",
            self.dir.display()
        );
        let mut files: Vec<PathBuf> = read_dir(&self.dir.join("logs"));
        let prefix = format!("{}_", self.namespace);
        for pod in read_dir(&self.dir.join("node/pods")) {
            if pod
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            {
                // Each container's last two instances (`logs/<container>/<n>.log`).
                for container in read_dir(&pod.join("logs")) {
                    let mut instances = read_dir(&container);
                    instances.sort_by_key(|f| {
                        f.file_stem().and_then(|n| n.to_str()?.parse::<u32>().ok())
                    });
                    files.extend(instances.into_iter().rev().take(2).rev());
                }
            }
        }
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("---- {} (last {} lines)", f.display(), lines.len().min(40));
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("    {l}");
            }
        }
        eprintln!("======== end of test cluster logs ========");
    }
}

fn read_dir(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    v
}

async fn config_from(kubeconfig: &Path) -> kube::Config {
    let kc = Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("reading {}: {e}; {HOW_TO_FIX}", kubeconfig.display()));
    kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", kubeconfig.display()))
}

async fn client_from(kubeconfig: &Path) -> Client {
    Client::try_from(config_from(kubeconfig).await).unwrap_or_else(|e| panic!("kube client: {e}"))
}

/// `t-<test name>-<suffix>`: a valid, unique namespace name that says which test made it.
/// Tests without pods work without the node agent; tests with pods would only time out, so
/// say up front why their pods will stay Pending.
async fn warn_if_no_node(client: &Client) {
    use k8s_openapi::api::core::v1::Node;
    let node = Api::<Node>::all(client.clone())
        .get_opt(NODE)
        .await
        .ok()
        .flatten();
    let ready = node
        .as_ref()
        .and_then(|n| n.status.as_ref()?.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    let fresh = ready.is_some_and(|c| {
        c.status == "True"
            && c.last_heartbeat_time.as_ref().is_some_and(|t| {
                k8s_openapi::jiff::Timestamp::now()
                    .duration_since(t.0)
                    .as_secs()
                    < 60
            })
    });
    if !fresh {
        eprintln!(
            "warning: Node {NODE} is not Ready with a fresh heartbeat: is the node agent running? \
             Pods will stay Pending. `e2e/cluster up` starts it; its log: {}",
            cluster_dir().join("logs/node-agent.log").display()
        );
    }
}

/// The test cluster's only Node (the node agent).
const NODE: &str = "pgsnap-node";

fn test_namespace_name() -> String {
    let thread = std::thread::current();
    let test = thread
        .name()
        .unwrap_or("test")
        .rsplit("::")
        .next()
        .unwrap_or("test");
    let mut name: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    name = name.trim_matches('-').to_owned();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("t-{name}-{:05x}", (nanos ^ std::process::id()) & 0xfffff)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        // Drop cannot await and may run inside the test's runtime: delete the namespace from
        // a thread of its own (without waiting for the namespace to be gone).
        let (kubeconfig, namespace) = (self.kubeconfig.clone(), self.namespace.clone());
        let deleted = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let client = client_from(&kubeconfig).await;
                Api::<Namespace>::all(client)
                    .delete(&namespace, &DeleteParams::background())
                    .await
                    .ok()
            })
        })
        .join();
        if !matches!(deleted, Ok(Some(_))) {
            eprintln!(
                "warning: could not delete test namespace {}",
                self.namespace
            );
        }
        let _ = std::fs::remove_dir_all(self.archives());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn namespace_names_are_valid_dns_labels() {
        let n = super::test_namespace_name();
        assert!(n.len() <= 63 && n.starts_with("t-"), "{n}");
        assert!(
            n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{n}"
        );
    }
}
