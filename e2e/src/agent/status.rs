//! The node agent's view of one pod, and its translation into `Pod.status`.

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

/// How a container ended.
#[derive(Debug, Clone)]
pub struct Exit {
    /// Which start of the container this was (its log file, see `container::log_file`).
    pub instance: u32,
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub started: Timestamp,
    pub finished: Timestamp,
    pub message: Option<String>,
}

impl Exit {
    pub fn reason(&self) -> &'static str {
        if self.exit_code == 0 {
            "Completed"
        } else {
            "Error"
        }
    }

    fn json(&self) -> Value {
        json!({
            "exitCode": self.exit_code,
            "signal": self.signal,
            "reason": self.reason(),
            "message": self.message,
            "startedAt": self.started.to_string(),
            "finishedAt": self.finished.to_string(),
        })
    }
}

#[derive(Debug, Clone)]
pub enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        since: Timestamp,
        /// Which start of the container this is (its log file).
        instance: u32,
    },
    Terminated(Exit),
}

#[derive(Debug, Clone)]
pub struct ContainerModel {
    pub name: String,
    pub image: String,
    pub state: State,
    pub last: Option<Exit>,
    pub restarts: i32,
    pub ready: bool,
}

impl ContainerModel {
    pub fn new(name: &str, image: &str) -> Self {
        Self {
            name: name.into(),
            image: image.into(),
            state: State::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            last: None,
            restarts: 0,
            ready: false,
        }
    }

    pub fn running(&self) -> bool {
        matches!(self.state, State::Running { .. })
    }

    fn json(&self) -> Value {
        let state = match &self.state {
            State::Waiting { reason, message } => {
                json!({ "waiting": { "reason": reason, "message": message } })
            }
            State::Running { since, .. } => {
                json!({ "running": { "startedAt": since.to_string() } })
            }
            State::Terminated(e) => json!({ "terminated": e.json() }),
        };
        json!({
            "name": self.name,
            "image": self.image,
            "imageID": format!("node-agent://{}", self.image),
            "containerID": format!("node-agent://{}", self.name),
            "state": state,
            "lastState": self.last.as_ref().map_or(json!({}), |e| json!({ "terminated": e.json() })),
            "restartCount": self.restarts,
            "ready": self.ready,
            "started": self.running(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct PodModel {
    pub phase: Phase,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub start_time: Timestamp,
    pub initialized: bool,
    /// The pod's own address, or the node's for a `hostNetwork` pod.
    pub pod_ip: String,
    pub init: Vec<ContainerModel>,
    pub containers: Vec<ContainerModel>,
    /// Each condition's last value and when it took it (its lastTransitionTime).
    pub transitions: std::collections::BTreeMap<&'static str, (bool, Timestamp)>,
}

impl PodModel {
    pub fn containers_ready(&self) -> bool {
        !self.containers.is_empty() && self.containers.iter().all(|c| c.ready)
    }

    /// The whole `status` (as a merge patch: lists are replaced, absent scalars are null).
    pub fn to_status(&mut self, now: Timestamp) -> Value {
        let ready = self.containers_ready() && self.phase == Phase::Running;
        let mut cond = |type_: &'static str, ok: bool| {
            let since = self.transitions.entry(type_).or_insert((ok, now));
            if since.0 != ok {
                *since = (ok, now);
            }
            let status = if ok { "True" } else { "False" };
            json!({ "type": type_, "status": status, "lastTransitionTime": since.1.to_string() })
        };
        let conditions = [
            cond("PodScheduled", true),
            cond("Initialized", self.initialized),
            cond("ContainersReady", ready),
            cond("Ready", ready),
        ];
        json!({
            "phase": self.phase.as_str(),
            "reason": self.reason,
            "message": self.message,
            "hostIP": super::NODE_IP,
            "hostIPs": [{ "ip": super::NODE_IP }],
            "podIP": self.pod_ip,
            "podIPs": [{ "ip": self.pod_ip }],
            "startTime": self.start_time.to_string(),
            "conditions": conditions,
            "initContainerStatuses": self.init.iter().map(ContainerModel::json).collect::<Vec<_>>(),
            "containerStatuses": self.containers.iter().map(ContainerModel::json).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shape() {
        let now = Timestamp::now();
        let mut c = ContainerModel::new("db", "postgres:16");
        c.state = State::Terminated(Exit {
            instance: 0,
            exit_code: 3,
            signal: None,
            started: now,
            finished: now,
            message: None,
        });
        let mut m = PodModel {
            phase: Phase::Failed,
            reason: None,
            message: None,
            start_time: now,
            initialized: true,
            pod_ip: "10.244.0.2".into(),
            init: vec![],
            containers: vec![c],
            transitions: Default::default(),
        };
        let s = m.to_status(now);
        assert_eq!(s["phase"], "Failed");
        assert_eq!(
            s["containerStatuses"][0]["state"]["terminated"]["reason"],
            "Error"
        );
        assert_eq!(
            s["containerStatuses"][0]["state"]["terminated"]["exitCode"],
            3
        );
        assert_eq!(s["conditions"][3]["status"], "False");
        // A condition keeps its transition time until its value changes.
        let later = now + std::time::Duration::from_secs(5);
        assert_eq!(
            m.to_status(later)["conditions"][3]["lastTransitionTime"],
            s["conditions"][3]["lastTransitionTime"]
        );
        m.phase = Phase::Running;
        m.containers[0].ready = true;
        assert_eq!(
            m.to_status(later)["conditions"][3]["lastTransitionTime"],
            later.to_string()
        );
        // The status must be a valid PodStatus.
        let typed: k8s_openapi::api::core::v1::PodStatus = serde_json::from_value(s).unwrap();
        assert_eq!(typed.pod_ip.as_deref(), Some("10.244.0.2"));
        assert_eq!(typed.host_ip.as_deref(), Some("127.0.0.1"));
    }
}
