//! The node agent: a stand-in for the kubelet and a container runtime that runs the Pods
//! bound to its Node as local processes (see docs/cluster.md for what it does and does not).

pub mod container;
pub mod entrypoint;
pub mod env;
pub mod exec;
pub mod images;
pub mod kubelet;
pub mod network;
pub mod node;
pub mod pod;
pub mod sandbox;
pub mod status;
pub mod volumes;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;

/// The node's address (its InternalIP, every pod's hostIP, and the podIP of `hostNetwork`
/// pods): the host's loopback, where the control plane listens.
pub const NODE_IP: &str = "127.0.0.1";

/// `node-agent` command line (the contract with `e2e/cluster up`).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "node-agent",
    about = "Runs the Pods bound to one Node as local processes"
)]
pub struct Args {
    #[arg(long)]
    pub kubeconfig: PathBuf,
    #[arg(long, default_value = "pgsnap-node")]
    pub node_name: String,
    /// Where pod directories (volumes, logs) live.
    #[arg(long)]
    pub root: PathBuf,
    /// The CSI hostpath driver's state directory (a volume is `<dir>/<volumeHandle>`).
    #[arg(long)]
    pub hostpath_state: PathBuf,
    /// The API server as pods must reach it (KUBERNETES_SERVICE_HOST/PORT).
    #[arg(long, default_value = "https://127.0.0.1:16443")]
    pub api_server: String,
    /// The cluster CA (ca.crt of service-account volumes).
    #[arg(long)]
    pub ca_file: PathBuf,
    /// The repository (for hack/postgres-bin); default: found from this binary's path.
    #[arg(long, env = "PGSNAP_REPO")]
    pub repo: Option<PathBuf>,
    /// The binary behind the `pgsnap:dev` image; default `<repo>/target/debug/pgsnap`.
    #[arg(long)]
    pub pgsnap_bin: Option<PathBuf>,
    /// The bridge that joins the pods' network namespaces (created if missing).
    #[arg(long, default_value = "pgsnap0")]
    pub bridge: String,
    /// The pods' addresses (a /24; the first is the bridge's).
    #[arg(long, default_value = "10.244.0.0/24")]
    pub pod_cidr: String,
    /// The kubelet API's port on 127.0.0.1 (`kubectl logs`/`exec` through the API server),
    /// published as the Node's `status.daemonEndpoints.kubeletEndpoint.Port`.
    #[arg(long)]
    pub port: u16,
    /// The kubelet API's serving certificate and key (PEM).
    #[arg(long)]
    pub tls_cert_file: PathBuf,
    #[arg(long)]
    pub tls_private_key_file: PathBuf,
    /// The CA that must have signed every kubelet API client's certificate.
    #[arg(long)]
    pub client_ca_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("kubeconfig {0}: {1}")]
    Kubeconfig(PathBuf, #[source] kube::config::KubeconfigError),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("--api-server {0:?} is not an https://HOST:PORT URL")]
    ApiServer(String),
    #[error("cannot find the repository (hack/postgres-bin) from {0}; pass --repo")]
    Repo(PathBuf),
    #[error("pod network: {0}")]
    Network(#[from] network::NetworkError),
    #[error("kubelet API TLS: {0}")]
    Tls(String),
}

/// Why a pod cannot run (yet); shown as the containers' waiting reason and message.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    Image(#[from] images::ImageError),
    #[error("{0}")]
    Volume(String),
    #[error("{0}")]
    Config(String),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Launch(String),
    #[error(transparent)]
    Network(#[from] network::NetworkError),
}

impl PodError {
    /// The kubelet's waiting reason for this kind of problem.
    pub fn reason(&self) -> &'static str {
        match self {
            PodError::Image(_) => "ErrImagePull",
            PodError::Volume(_) | PodError::Kube(_) => "ContainerCreating",
            PodError::Config(_) => "CreateContainerConfigError",
            PodError::Launch(_) => "RunContainerError",
            PodError::Network(_) => "FailedCreatePodSandBox",
        }
    }
}

/// What every pod worker shares.
pub struct Shared {
    pub client: Client,
    pub root: PathBuf,
    pub hostpath_state: PathBuf,
    pub api_host: String,
    pub api_port: String,
    pub ca_pem: String,
    pub agent_exe: PathBuf,
    pub pgsnap_bin: PathBuf,
    pub binaries: images::PostgresBinaries,
    pub network: network::PodNetwork,
    /// Process groups of running containers and execs, so the agent can stop them all on
    /// exit.
    pub groups: Mutex<HashSet<u32>>,
    /// The pods running here, for the kubelet API.
    pub pods: pod::Registry,
    /// Flips to true when the agent is asked to exit.
    pub shutdown: watch::Receiver<bool>,
}

fn find_repo(exe: &std::path::Path) -> Option<PathBuf> {
    exe.ancestors()
        .find(|d| d.join("hack/postgres-bin").is_file())
        .map(PathBuf::from)
}

fn split_api_server(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("https://")?.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    Some((host.trim_matches(['[', ']']).to_owned(), port.to_owned()))
}

/// How long the agent gives containers to stop when it exits itself.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs the agent until SIGTERM/SIGINT, then stops every container.
pub async fn run(args: Args) -> Result<(), AgentError> {
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .map_err(|e| AgentError::Kubeconfig(args.kubeconfig.clone(), e))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| AgentError::Kubeconfig(args.kubeconfig.clone(), e))?;
    let client = Client::try_from(config)?;
    let (api_host, api_port) = split_api_server(&args.api_server)
        .ok_or_else(|| AgentError::ApiServer(args.api_server.clone()))?;
    let ca_pem = std::fs::read_to_string(&args.ca_file)
        .map_err(|e| AgentError::Io(format!("--ca-file {}", args.ca_file.display()), e))?;
    let agent_exe =
        std::env::current_exe().map_err(|e| AgentError::Io("locating node-agent".into(), e))?;
    let repo = match args.repo.clone() {
        Some(r) => r,
        None => find_repo(&agent_exe).ok_or_else(|| AgentError::Repo(agent_exe.clone()))?,
    };
    std::fs::create_dir_all(args.root.join("pods"))
        .map_err(|e| AgentError::Io(format!("creating {}", args.root.display()), e))?;
    let api_addr = format!("{api_host}:{api_port}")
        .parse()
        .map_err(|_| AgentError::ApiServer(args.api_server.clone()))?;
    let network = network::PodNetwork::new(&args.bridge, &args.pod_cidr, api_addr)?;
    network.set_up()?;
    let (shutdown_tx, shutdown) = watch::channel(false);
    let shared = Arc::new(Shared {
        client: client.clone(),
        root: args.root.clone(),
        hostpath_state: args.hostpath_state.clone(),
        api_host,
        api_port,
        ca_pem,
        agent_exe,
        pgsnap_bin: args
            .pgsnap_bin
            .clone()
            .unwrap_or_else(|| repo.join("target/debug/pgsnap")),
        binaries: images::PostgresBinaries::new(&repo),
        network,
        groups: Mutex::default(),
        pods: pod::Registry::default(),
        shutdown,
    });

    // Listening before the Node says where: the API server may call as soon as it knows.
    let tls = kubelet::tls_acceptor(
        &args.tls_cert_file,
        &args.tls_private_key_file,
        &args.client_ca_file,
    )?;
    let listener = tokio::net::TcpListener::bind((NODE_IP, args.port))
        .await
        .map_err(|e| {
            AgentError::Io(
                format!("kubelet API: listening on {NODE_IP}:{}", args.port),
                e,
            )
        })?;
    let server = tokio::spawn(kubelet::serve(shared.clone(), listener, tls));
    tracing::info!(port = args.port, "kubelet API listening");

    node::register(&client, &args.node_name, args.port).await?;
    tracing::info!(node = %args.node_name, "node registered");
    let heartbeat = tokio::spawn(node::heartbeat(
        client.clone(),
        args.node_name.clone(),
        args.port,
    ));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| AgentError::Io("installing the SIGTERM handler".into(), e))?;
    let stopped = async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let workers = watch_pods(shared.clone(), &args.node_name, stopped).await;

    tracing::info!("stopping every container");
    heartbeat.abort();
    server.abort();
    let _ = shutdown_tx.send(true);
    let all_done = futures::future::join_all(workers);
    if tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(2), all_done)
        .await
        .is_err()
    {
        tracing::warn!("some pod workers did not finish in time");
    }
    // Last resort for anything still running.
    for pgid in shared
        .groups
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        // SAFETY: signalling a process group has no memory-safety preconditions.
        unsafe { libc::kill(-(*pgid as libc::pid_t), libc::SIGKILL) };
    }
    Ok(())
}

/// Watches the node's pods and keeps one worker per pod until `stopped` resolves; returns
/// the workers still running.
async fn watch_pods(
    shared: Arc<Shared>,
    node: &str,
    stopped: impl std::future::Future<Output = ()>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    let mut workers: HashMap<String, (watch::Sender<pod::Update>, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    let mut listed: Option<HashSet<String>> = None;
    let mut stopped = std::pin::pin!(stopped);
    loop {
        let event = tokio::select! {
            _ = &mut stopped => break,
            e = events.next() => e,
        };
        // Forget workers that finished (their pod is gone).
        workers.retain(|_, (_, h)| !h.is_finished());
        let (pod, gone) = match event {
            None => break,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "pod watch failed; retrying");
                continue;
            }
            Some(Ok(watcher::Event::Init)) => {
                listed = Some(HashSet::new());
                continue;
            }
            Some(Ok(watcher::Event::InitDone)) => {
                // Pods deleted while the watch was down: stop their processes.
                if let Some(seen) = listed.take() {
                    for (uid, (tx, _)) in &workers {
                        if !seen.contains(uid) {
                            tx.send_modify(|u| u.gone = true);
                        }
                    }
                }
                continue;
            }
            Some(Ok(watcher::Event::InitApply(p))) => {
                if let (Some(seen), Some(uid)) = (listed.as_mut(), p.metadata.uid.clone()) {
                    seen.insert(uid);
                }
                (p, false)
            }
            Some(Ok(watcher::Event::Apply(p))) => (p, false),
            Some(Ok(watcher::Event::Delete(p))) => (p, true),
        };
        let Some(uid) = pod.metadata.uid.clone() else {
            continue;
        };
        match workers.get(&uid) {
            Some((tx, _)) => {
                tx.send_modify(|u| {
                    u.gone |= gone;
                    u.pod = pod;
                });
            }
            None if !gone => {
                let (tx, rx) = watch::channel(pod::Update { pod, gone: false });
                let handle = tokio::spawn(pod::worker(shared.clone(), rx));
                workers.insert(uid, (tx, handle));
            }
            None => {}
        }
    }
    workers.into_values().map(|(_, h)| h).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_server_url() {
        assert_eq!(
            split_api_server("https://127.0.0.1:16443"),
            Some(("127.0.0.1".into(), "16443".into()))
        );
        assert_eq!(split_api_server("http://x"), None);
    }
}
