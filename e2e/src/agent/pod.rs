//! One pod's life on the node: images, volumes, init containers, containers, status,
//! and the graceful stop and final delete when the pod is deleted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use serde_json::json;
use tokio::sync::watch;

use super::container::{self, ImageRun, Stop};
use super::env::Refs;
use super::images::Image;
use super::status::{ContainerModel, Exit, Phase, PodModel, State};
use super::volumes::{self, VolumeContext};
use super::{PodError, SHUTDOWN_GRACE, Shared};

/// The latest object from the watch; `gone` once the API server no longer has it.
#[derive(Debug, Clone)]
pub struct Update {
    pub pod: Pod,
    pub gone: bool,
}

/// Retry delays: volume/config problems and container restarts (the kubelet's back-off,
/// capped low because tests wait on it).
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
enum Slot {
    Init(usize),
    Main(usize),
}

struct PodCtx {
    shared: Arc<Shared>,
    pod: Pod,
    name: String,
    dir: PathBuf,
    api: Api<Pod>,
    refs: Refs,
    model: Mutex<PodModel>,
    /// Serializes status patches so an older snapshot never lands after a newer one.
    publishing: tokio::sync::Mutex<()>,
}

/// Runs one pod until it is deleted (or the agent stops).
pub async fn worker(shared: Arc<Shared>, updates: watch::Receiver<Update>) {
    use tracing::Instrument;
    let pod = updates.borrow().pod.clone();
    let span = tracing::info_span!("pod", pod = %format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    ));
    run_pod(shared, updates, pod).instrument(span).await
}

async fn run_pod(shared: Arc<Shared>, mut updates: watch::Receiver<Update>, mut pod: Pod) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    // A pod that already ended (before an agent restart) is not run again.
    let finished_before = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    );
    // The sandbox's network first, as a runtime does: its address is in the environment.
    let link = if finished_before || spec.host_network == Some(true) {
        Ok(None)
    } else {
        shared.network.attach().map(Some)
    };
    let pod_ip = match &link {
        Ok(Some(l)) => l.ip.to_string(),
        _ => super::NODE_IP.to_string(),
    };
    pod.status.get_or_insert_default().pod_ip = Some(pod_ip.clone());
    let model = PodModel {
        phase: Phase::Pending,
        reason: None,
        message: None,
        start_time: Timestamp::now(),
        initialized: spec.init_containers.as_ref().is_none_or(Vec::is_empty),
        pod_ip,
        init: spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| ContainerModel::new(&c.name, c.image.as_deref().unwrap_or_default()))
            .collect(),
        containers: spec
            .containers
            .iter()
            .map(|c| ContainerModel::new(&c.name, c.image.as_deref().unwrap_or_default()))
            .collect(),
        transitions: Default::default(),
    };
    let ctx = Arc::new(PodCtx {
        api: Api::namespaced(shared.client.clone(), &ns),
        refs: Refs::new(shared.client.clone(), &ns),
        dir: pod_dir(&shared.root, &ns, &name, &uid),
        shared: shared.clone(),
        pod,
        name,
        model: Mutex::new(model),
        publishing: tokio::sync::Mutex::new(()),
    });
    shared.pods.insert(&ns, ctx.clone());
    tracing::info!("pod assigned to this node");

    let (stop_tx, stop_rx) = watch::channel(None::<Stop>);
    let (mut link, sandbox_failed) = match link {
        Ok(link) => (link, None),
        Err(e) => (None, Some(PodError::from(e))),
    };
    let lifecycle = {
        let ctx = ctx.clone();
        async move {
            match sandbox_failed {
                _ if finished_before => {}
                Some(e) => {
                    ctx.set_waiting_all(&e).await;
                    ctx.fail(&e).await;
                }
                None => ctx.lifecycle(stop_rx).await,
            }
        }
    };
    let mut lifecycle = std::pin::pin!(lifecycle);
    let mut shutdown = shared.shutdown.clone();
    let (mut done, mut deleting, mut gone, mut agent_stopping, mut watch_open) =
        (false, false, false, false, true);
    loop {
        {
            let u = updates.borrow_and_update();
            gone |= u.gone;
            if !deleting && (u.gone || u.pod.metadata.deletion_timestamp.is_some()) {
                deleting = true;
                let grace = u
                    .pod
                    .metadata
                    .deletion_grace_period_seconds
                    .or(spec.termination_grace_period_seconds)
                    .unwrap_or(30);
                let grace = if u.gone {
                    Duration::ZERO
                } else {
                    Duration::from_secs(grace.max(0) as u64)
                };
                tracing::info!(?grace, "pod deleted; stopping its containers");
                let _ = stop_tx.send(Some(Stop { grace }));
            }
        }
        if done && (deleting || agent_stopping) {
            break;
        }
        tokio::select! {
            _ = &mut lifecycle, if !done => {
                done = true;
                // Every container has ended for good: the sandbox goes, as the kubelet's
                // does for a finished pod (its address is free for the next one).
                if let Some(link) = link.take() {
                    shared.network.detach(link);
                }
            }
            changed = updates.changed(), if watch_open => watch_open = changed.is_ok(),
            _ = shutdown.wait_for(|s| *s), if !agent_stopping => {
                agent_stopping = true;
                let _ = stop_tx.send(Some(Stop { grace: SHUTDOWN_GRACE }));
            }
        }
    }
    if agent_stopping && !deleting {
        // The agent is exiting: the pod stays in the API, like a pod of a stopped kubelet.
        return;
    }
    if !gone {
        // The kubelet's final delete: the containers are gone, the object may go.
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..Default::default()
        };
        if let Err(e) = ctx.api.delete(&ctx.name, &dp).await {
            tracing::debug!(error = %e, "final delete");
        }
    }
    ctx.clean_up();
    shared.pods.remove(&ns, &ctx);
    tracing::info!("pod removed from this node");
}

async fn stopped_within(stop: &mut watch::Receiver<Option<Stop>>, delay: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stop.wait_for(Option::is_some) => true,
    }
}

impl PodCtx {
    fn update<R>(&self, f: impl FnOnce(&mut PodModel) -> R) -> R {
        f(&mut self.model.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn slot(m: &mut PodModel, slot: Slot) -> &mut ContainerModel {
        match slot {
            Slot::Init(i) => &mut m.init[i],
            Slot::Main(i) => &mut m.containers[i],
        }
    }

    /// Writes the current model to `Pod.status` (status subresource, merge patch).
    async fn publish(&self) {
        let _turn = self.publishing.lock().await;
        let status = self.update(|m| m.to_status(Timestamp::now()));
        let patch = Patch::Merge(json!({ "status": status }));
        if let Err(e) = self
            .api
            .patch_status(&self.name, &PatchParams::default(), &patch)
            .await
        {
            match e {
                // Already deleted (the final delete, or a force delete): nothing to report to.
                kube::Error::Api(s) if s.code == 404 => tracing::debug!("status update: pod gone"),
                e => tracing::warn!(error = %e, "status update failed"),
            }
        }
    }

    /// Only the logs (`logs/`) stay after the pod is gone (for post-mortems): volumes,
    /// launch specs (which hold Secret values) and termination messages go.
    fn clean_up(&self) {
        let entries = std::fs::read_dir(&self.dir).into_iter().flatten().flatten();
        for path in entries.map(|e| e.path()) {
            if path.file_name().is_some_and(|n| n == "logs") {
                continue;
            }
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = removed {
                tracing::warn!(error = %e, path = %path.display(), "cleaning the pod directory");
            }
        }
    }

    fn spec(&self) -> k8s_openapi::api::core::v1::PodSpec {
        self.pod.spec.clone().unwrap_or_default()
    }

    async fn resolve_image(&self, c: &Container) -> Result<ImageRun, PodError> {
        let image = Image::parse(c.image.as_deref().unwrap_or_default())?;
        let postgres_dir = match image {
            Image::Postgres { major } => Some(self.shared.binaries.install_dir(major).await?),
            _ => None,
        };
        Ok(ImageRun {
            image,
            postgres_dir,
        })
    }

    async fn lifecycle(self: Arc<Self>, mut stop: watch::Receiver<Option<Stop>>) {
        let spec = self.spec();
        let inits: Vec<Container> = spec.init_containers.clone().unwrap_or_default();
        let mains: Vec<Container> = spec.containers.clone();

        // Images first: an unknown image fails the pod at once, it never hangs.
        let mut runs = Vec::new();
        for (slot, c) in inits
            .iter()
            .enumerate()
            .map(|(i, c)| (Slot::Init(i), c))
            .chain(mains.iter().enumerate().map(|(i, c)| (Slot::Main(i), c)))
        {
            match self.resolve_image(c).await {
                Ok(r) => runs.push(r),
                Err(e) => {
                    tracing::warn!(error = %e, container = %c.name, "image");
                    self.update(|m| {
                        Self::slot(m, slot).state = State::Waiting {
                            reason: e.reason().into(),
                            message: Some(e.to_string()),
                        };
                    });
                    self.fail(&e).await;
                    return;
                }
            }
        }
        let (init_runs, main_runs) = runs.split_at(inits.len());

        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            tracing::error!(error = %e, dir = %self.dir.display(), "cannot create the pod directory");
        }
        self.publish().await;
        let Some(volumes) = self.volumes(&mut stop).await else {
            return;
        };

        for (i, c) in inits.iter().enumerate() {
            let slot = Slot::Init(i);
            let mut backoff = FIRST_BACKOFF;
            loop {
                let Some(exit) = self
                    .run_container(slot, c, &init_runs[i], &volumes, &mut stop)
                    .await
                else {
                    return;
                };
                let code = exit.exit_code;
                self.update(|m| {
                    let s = Self::slot(m, slot);
                    s.ready = code == 0;
                    s.state = State::Terminated(exit.clone());
                });
                if stop.borrow().is_some() {
                    self.publish().await;
                    return;
                }
                if code == 0 {
                    break;
                }
                if spec.restart_policy.as_deref() == Some("Never") {
                    self.update(|m| {
                        m.phase = Phase::Failed;
                        m.message = Some(format!(
                            "init container {} failed with exit code {code}",
                            c.name
                        ));
                    });
                    self.publish().await;
                    return;
                }
                self.back_off(slot, exit, backoff).await;
                if stopped_within(&mut stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        self.update(|m| m.initialized = true);
        self.publish().await;

        let supervisors = mains.iter().enumerate().map(|(i, c)| {
            let ctx = self.clone();
            let (c, run, volumes, stop) = (
                c.clone(),
                main_runs[i].clone(),
                volumes.clone(),
                stop.clone(),
            );
            async move { ctx.supervise(i, &c, &run, &volumes, stop).await }
        });
        let exits = futures::future::join_all(supervisors).await;
        if stop.borrow().is_some() {
            return;
        }
        let failed = exits
            .iter()
            .any(|e| e.as_ref().is_none_or(|e| e.exit_code != 0));
        self.update(|m| {
            m.phase = if failed {
                Phase::Failed
            } else {
                Phase::Succeeded
            }
        });
        self.publish().await;
    }

    /// Prepares the volumes, retrying (with back-off) what may still appear: a claim not
    /// bound yet, a ConfigMap created after the pod. `None` when the pod is stopped first.
    async fn volumes(
        &self,
        stop: &mut watch::Receiver<Option<Stop>>,
    ) -> Option<HashMap<String, PathBuf>> {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let ctx = VolumeContext {
                client: &self.shared.client,
                refs: &self.refs,
                pod: &self.pod,
                pod_dir: &self.dir,
                hostpath_state: &self.shared.hostpath_state,
                ca_pem: &self.shared.ca_pem,
            };
            let result = tokio::select! {
                r = volumes::prepare(&ctx) => r,
                _ = stop.wait_for(Option::is_some) => return None,
            };
            match result {
                Ok(v) => return Some(v),
                Err(e) => {
                    tracing::info!(error = %e, "volumes not ready");
                    self.set_waiting_all(&e).await;
                }
            }
            if stopped_within(stop, backoff).await {
                return None;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Fails the pod for a problem no retry fixes (an unknown image, no sandbox).
    async fn fail(&self, e: &PodError) {
        tracing::warn!(error = %e, "pod failed");
        self.update(|m| {
            m.phase = Phase::Failed;
            m.reason = Some(e.reason().into());
            m.message = Some(e.to_string());
        });
        self.publish().await;
    }

    async fn set_waiting_all(&self, e: &PodError) {
        self.update(|m| {
            for c in m.init.iter_mut().chain(m.containers.iter_mut()) {
                c.state = State::Waiting {
                    reason: e.reason().into(),
                    message: Some(e.to_string()),
                };
            }
        });
        self.publish().await;
    }

    /// Records a failed run and the coming restart.
    async fn back_off(&self, slot: Slot, exit: Exit, delay: Duration) {
        let name = self.update(|m| {
            let s = Self::slot(m, slot);
            s.last = Some(exit);
            s.restarts += 1;
            s.ready = false;
            s.state = State::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: Some(format!(
                    "back-off {}s restarting failed container={}",
                    delay.as_secs(),
                    s.name
                )),
            };
            s.name.clone()
        });
        tracing::info!(container = %name, "restarting container");
        self.publish().await;
    }

    /// Runs one container to its end per the restart policy; its last exit, or `None`
    /// when stopped before it ran.
    async fn supervise(
        &self,
        i: usize,
        c: &Container,
        run: &ImageRun,
        volumes: &HashMap<String, PathBuf>,
        mut stop: watch::Receiver<Option<Stop>>,
    ) -> Option<Exit> {
        let slot = Slot::Main(i);
        let policy = self
            .spec()
            .restart_policy
            .unwrap_or_else(|| "Always".into());
        let mut backoff = FIRST_BACKOFF;
        loop {
            let exit = self.run_container(slot, c, run, volumes, &mut stop).await?;
            self.update(|m| {
                let s = Self::slot(m, slot);
                s.ready = false;
                s.state = State::Terminated(exit.clone());
            });
            tracing::info!(container = %c.name, code = exit.exit_code, "container exited");
            let restart = match policy.as_str() {
                "Always" => true,
                "OnFailure" => exit.exit_code != 0,
                _ => false,
            };
            if stop.borrow().is_some() || !restart {
                self.publish().await;
                return Some(exit);
            }
            // A container that ran a while starts over with a short back-off.
            if exit.finished.duration_since(exit.started).as_secs() >= 10 {
                backoff = FIRST_BACKOFF;
            }
            self.back_off(slot, exit.clone(), backoff).await;
            if stopped_within(&mut stop, backoff).await {
                return Some(exit);
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Builds the container's launch spec (retrying config errors), starts it, marks it
    /// Running, probes readiness while it runs; returns its exit.
    async fn run_container(
        &self,
        slot: Slot,
        c: &Container,
        run: &ImageRun,
        volumes: &HashMap<String, PathBuf>,
        stop: &mut watch::Receiver<Option<Stop>>,
    ) -> Option<Exit> {
        let shared = &self.shared;
        let instance = container::next_instance(&self.dir, &c.name);
        let mut backoff = FIRST_BACKOFF;
        let (spec, running) = loop {
            let started = match container::launch_spec(
                shared, &self.pod, c, run, volumes, &self.dir, &self.refs,
            )
            .await
            {
                Ok(spec) => {
                    container::start(shared, &spec, &self.dir, &c.name, instance).map(|r| (spec, r))
                }
                Err(e) => Err(e),
            };
            match started {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(error = %e, container = %c.name, "cannot start container");
                    self.update(|m| {
                        Self::slot(m, slot).state = State::Waiting {
                            reason: e.reason().into(),
                            message: Some(e.to_string()),
                        };
                    });
                    self.publish().await;
                    if stopped_within(stop, backoff).await {
                        return None;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        let readiness = c
            .readiness_probe
            .clone()
            .filter(|_| matches!(slot, Slot::Main(_)));
        self.update(|m| {
            let s = Self::slot(m, slot);
            s.state = State::Running {
                since: running.started,
                instance,
            };
            s.ready = readiness.is_none() && matches!(slot, Slot::Main(_));
            let all_started = m
                .containers
                .iter()
                .all(|c| !matches!(c.state, State::Waiting { .. }) || c.last.is_some());
            if m.initialized && all_started && m.phase == Phase::Pending {
                m.phase = Phase::Running;
            }
        });
        self.publish().await;
        tracing::info!(container = %c.name, "container started");

        let probe_file = self.dir.join(format!("{}.probe.json", c.name));
        let probing = async {
            let Some(probe) = readiness else {
                return std::future::pending::<std::convert::Infallible>().await;
            };
            tokio::time::sleep(Duration::from_secs(
                probe.initial_delay_seconds.unwrap_or(0).max(0) as u64,
            ))
            .await;
            let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64);
            let (need_ok, need_fail) = (
                probe.success_threshold.unwrap_or(1).max(1),
                probe.failure_threshold.unwrap_or(3).max(1),
            );
            let (mut oks, mut fails) = (0, 0);
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let ok = container::probe_once(
                    shared,
                    &probe,
                    c,
                    &spec,
                    &probe_file,
                    super::env::pod_ip(&self.pod),
                )
                .await;
                (oks, fails) = if ok { (oks + 1, 0) } else { (0, fails + 1) };
                let ready = self.update(|m| Self::slot(m, slot).ready);
                let now_ready = if oks >= need_ok {
                    true
                } else if fails >= need_fail {
                    false
                } else {
                    ready
                };
                if now_ready != ready {
                    self.update(|m| Self::slot(m, slot).ready = now_ready);
                    tracing::info!(container = %c.name, ready = now_ready, "readiness changed");
                    self.publish().await;
                }
            }
        };
        let stop_signal = run.image.stop_signal();
        let mut exit = tokio::select! {
            exit = running.finish(shared, stop_signal, stop) => exit,
            never = probing => match never {},
        };
        if exit.message.is_none() {
            let log = container::log_file(&self.dir, &c.name, instance);
            exit.message = container::termination_message(&self.dir, c, exit.exit_code, &log);
        }
        Some(exit)
    }
}

/// The pods this node runs, by namespace and name: what the kubelet API (`kubectl logs`,
/// `kubectl exec`) finds them by.
#[derive(Default)]
pub struct Registry(Mutex<HashMap<(String, String), Arc<PodCtx>>>);

/// Why the kubelet API cannot serve a request for a container (the kubelet's wording).
#[derive(Debug, thiserror::Error)]
pub enum Lookup {
    #[error("pod {0:?} does not exist")]
    NoPod(String),
    #[error("container {0:?} not found in pod {1:?}")]
    NoContainer(String, String),
    /// It exists but is not in a state to serve this (no such instance, not running).
    #[error("{0}")]
    Unavailable(String),
}

/// One instance's log, and whether that instance still runs (may still write to it).
pub struct LogSource {
    pub path: PathBuf,
    ctx: Arc<PodCtx>,
    container: String,
    instance: u32,
}

impl LogSource {
    pub fn running(&self) -> bool {
        self.ctx.update(|m| {
            find(m, &self.container).is_some_and(
                |c| matches!(c.state, State::Running { instance, .. } if instance == self.instance),
            )
        })
    }
}

/// What an exec in a running container starts from.
pub struct ExecTarget {
    /// The container's launch spec (mounts, environment, user, working directory).
    pub spec: crate::agent::sandbox::LaunchSpec,
    pub pod_dir: PathBuf,
}

fn find<'m>(m: &'m PodModel, container: &str) -> Option<&'m ContainerModel> {
    m.init
        .iter()
        .chain(m.containers.iter())
        .find(|c| c.name == container)
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<PodCtx>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, ns: &str, ctx: Arc<PodCtx>) {
        self.lock().insert((ns.to_owned(), ctx.name.clone()), ctx);
    }

    /// Forgets a pod, unless a newer pod of the same name took its place meanwhile.
    fn remove(&self, ns: &str, ctx: &PodCtx) {
        let mut pods = self.lock();
        let key = (ns.to_owned(), ctx.name.clone());
        if pods
            .get(&key)
            .is_some_and(|p| p.pod.metadata.uid == ctx.pod.metadata.uid)
        {
            pods.remove(&key);
        }
    }

    /// The pod, and the model of its container.
    fn container(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
    ) -> Result<(Arc<PodCtx>, ContainerModel), Lookup> {
        let ctx = self
            .lock()
            .get(&(ns.to_owned(), pod.to_owned()))
            .cloned()
            .ok_or_else(|| Lookup::NoPod(pod.to_owned()))?;
        let model = ctx
            .update(|m| find(m, container).cloned())
            .ok_or_else(|| Lookup::NoContainer(container.to_owned(), pod.to_owned()))?;
        Ok((ctx, model))
    }

    /// The log `kubectl logs` means, chosen as the kubelet does: with `previous` the last
    /// terminated instance; else the running one, else the one that ended last.
    pub fn logs(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
        previous: bool,
    ) -> Result<LogSource, Lookup> {
        let (ctx, c) = self.container(ns, pod, container)?;
        let unavailable = |what: String| {
            Lookup::Unavailable(format!("container {container:?} in pod {pod:?} {what}"))
        };
        let instance = match (&c.state, &c.last) {
            (_, Some(last)) if previous => last.instance,
            _ if previous => {
                return Err(Lookup::Unavailable(format!(
                    "previous terminated container {container:?} in pod {pod:?} not found"
                )));
            }
            (State::Running { instance, .. }, _) => *instance,
            (State::Terminated(exit), _) => exit.instance,
            (State::Waiting { .. }, Some(last)) => last.instance,
            (State::Waiting { reason, .. }, None) if reason == "ErrImagePull" => {
                return Err(unavailable(
                    "is waiting to start: image can't be pulled".into(),
                ));
            }
            (State::Waiting { reason, .. }, None) => {
                return Err(unavailable(format!("is waiting to start: {reason}")));
            }
        };
        Ok(LogSource {
            path: container::log_file(&ctx.dir, container, instance),
            ctx,
            container: container.to_owned(),
            instance,
        })
    }

    /// A running container's launch spec, for an exec.
    pub fn exec_target(&self, ns: &str, pod: &str, container: &str) -> Result<ExecTarget, Lookup> {
        let (ctx, c) = self.container(ns, pod, container)?;
        if !c.running() {
            return Err(Lookup::Unavailable(format!(
                "container {container:?} in pod {pod:?} is not running"
            )));
        }
        let file = container::spec_file(&ctx.dir, container);
        let spec = std::fs::read(&file)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(|e| Lookup::Unavailable(format!("{}: {e}", file.display())))?;
        Ok(ExecTarget {
            spec,
            pod_dir: ctx.dir.clone(),
        })
    }
}

/// The directory of a pod on the node (volumes, launch specs, logs `logs/<container>/<n>.log`).
pub fn pod_dir(root: &Path, namespace: &str, name: &str, uid: &str) -> PathBuf {
    root.join("pods").join(format!("{namespace}_{name}_{uid}"))
}
