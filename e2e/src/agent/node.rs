//! The Node object: registration and the heartbeat that keeps it Ready.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus,
    NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};
use serde_json::json;

use super::AgentError;

/// How often the Lease is renewed and the Ready condition refreshed (the kubelet's default
/// lease renewal is 10 s; the node controller's grace period is 40 s).
const HEARTBEAT: Duration = Duration::from_secs(10);

fn conditions(now: &Time) -> Vec<NodeCondition> {
    let cond = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    };
    vec![
        cond(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "node-agent has sufficient memory",
        ),
        cond(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "node-agent has no disk pressure",
        ),
        cond(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "node-agent has sufficient PID",
        ),
        cond(
            "Ready",
            "True",
            "KubeletReady",
            "pgsnap node agent is posting ready status",
        ),
    ]
}

/// The Node's status; `port` is where the API server reaches the kubelet API.
fn status(now: &Time, port: u16) -> NodeStatus {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let resources = BTreeMap::from([
        // Generous on purpose: the node's only job is to run test pods side by side.
        ("cpu".to_string(), Quantity(format!("{}", cpus.max(8)))),
        ("memory".to_string(), Quantity("64Gi".into())),
        ("pods".to_string(), Quantity("110".into())),
        ("ephemeral-storage".to_string(), Quantity("100Gi".into())),
    ]);
    NodeStatus {
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        conditions: Some(conditions(now)),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: i32::from(port),
            }),
        }),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: super::NODE_IP.into(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: "localhost".into(),
            },
        ]),
        node_info: Some(NodeSystemInfo {
            architecture: std::env::consts::ARCH
                .replace("x86_64", "amd64")
                .replace("aarch64", "arm64"),
            boot_id: String::new(),
            container_runtime_version: "pgsnap-node-agent://0.1.0".into(),
            kernel_version: String::new(),
            kube_proxy_version: String::new(),
            kubelet_version: "v1.34.0-pgsnap-node-agent".into(),
            machine_id: String::new(),
            operating_system: "linux".into(),
            os_image: "pgsnap node agent".into(),
            system_uuid: String::new(),
            swap: None,
        }),
        ..Default::default()
    }
}

/// Creates the Node if needed and posts a Ready status, with the kubelet API's `port`.
pub async fn register(client: &Client, name: &str, port: u16) -> Result<(), AgentError> {
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes.get_opt(name).await?.is_none() {
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([
                    ("kubernetes.io/hostname".to_string(), name.to_string()),
                    ("kubernetes.io/os".to_string(), "linux".to_string()),
                    ("kubernetes.io/arch".to_string(), "amd64".to_string()),
                ])),
                ..Default::default()
            },
            ..Default::default()
        };
        nodes.create(&PostParams::default(), &node).await?;
    }
    let now = Time(Timestamp::now());
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status(&now, port) })),
        )
        .await?;
    // The API server's TaintNodesByCondition admission taints a new node not-ready; the node
    // lifecycle controller, which would lift it, does not run in the test cluster (it would
    // also evict pods when a heartbeat is late). The node is ready: lift it here.
    let node = nodes.get(name).await?;
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    let kept: Vec<_> = taints
        .iter()
        .filter(|t| !t.key.starts_with("node.kubernetes.io/"))
        .cloned()
        .collect();
    if kept.len() != taints.len() {
        let patch = Patch::Merge(json!({ "spec": { "taints": kept } }));
        nodes.patch(name, &PatchParams::default(), &patch).await?;
    }
    Ok(())
}

/// Renews the node Lease and the Ready heartbeat forever; errors are logged, not fatal
/// (the next beat retries).
pub async fn heartbeat(client: Client, name: String, port: u16) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tick.tick().await;
        if let Err(e) = beat(&client, &name, port).await {
            tracing::warn!(error = %e, "node heartbeat failed");
        }
    }
}

async fn beat(client: &Client, name: &str, port: u16) -> Result<(), AgentError> {
    let now = Timestamp::now();
    let nodes: Api<Node> = Api::all(client.clone());
    let Some(node) = nodes.get_opt(name).await? else {
        // Someone deleted the Node: register it again, as the kubelet does on restart.
        tracing::warn!("the Node object is gone; registering again");
        return register(client, name, port).await;
    };
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Strategic(json!({ "status": { "conditions": conditions(&Time(now)) } })),
        )
        .await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let spec = LeaseSpec {
        holder_identity: Some(name.into()),
        lease_duration_seconds: Some(40),
        renew_time: Some(MicroTime(now)),
        ..Default::default()
    };
    if leases.get_opt(name).await?.is_some() {
        leases
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await?;
    } else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                owner_references: node.controller_owner_ref(&()).map(|o| {
                    vec![OwnerReference {
                        controller: None,
                        ..o
                    }]
                }),
                ..Default::default()
            },
            spec: Some(spec),
        };
        leases.create(&PostParams::default(), &lease).await?;
    }
    Ok(())
}
