//! The operator under test: `pgsnap run` as a local process that authenticates with a
//! ServiceAccount token bound to exactly the Helm chart's RBAC, so a missing verb in the
//! chart fails the tests.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::{Api, Client};

use crate::cluster::{cluster_dir, repo_root, target_dir};
use crate::free_port;

/// Where the operator's ServiceAccount and Lease live: a release of the chart of its own,
/// so tests and `make demo` (release `pgsnap` in `pgsnap-system`) never own the same objects.
pub const OPERATOR_NAMESPACE: &str = "pgsnap-e2e";
const RELEASE: &str = "pgsnap-e2e";

/// Runs a shell command with the cluster's kubectl and helm on PATH; panics with its output
/// when it fails.
pub fn cluster_shell(script: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -euo pipefail; eval \"$({}/e2e/cluster env)\"; {script}",
            repo_root().display()
        ))
        .current_dir(repo_root())
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "`{script}` failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs `argv` as a user would at a shell after `eval "$(e2e/cluster env)"` (the cluster's
/// kubectl and helm), with this build's binaries (`kubectl-pgsnap`) first on the PATH;
/// (exit code, stdout, stderr).
pub fn cluster_tool(argv: &[&str]) -> (i32, String, String) {
    let out = Command::new("bash")
        .arg("-c")
        .arg("eval \"$(e2e/cluster env)\"; PATH=\"$BUILD_DIR:$PATH\" \"$@\"")
        .arg("cluster-tool")
        .args(argv)
        .env("BUILD_DIR", target_dir().join("debug"))
        .current_dir(repo_root())
        .output()
        .expect("bash");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `kubectl pgsnap <args>` with the cluster's kubectl and this build's plugin on the PATH;
/// (exit code, stdout, stderr).
pub fn kubectl_pgsnap(args: &[&str]) -> (i32, String, String) {
    let argv: Vec<&str> = ["kubectl", "pgsnap"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    cluster_tool(&argv)
}

/// The rows of `kubectl pgsnap check`'s table: (check, mark, detail).
pub fn check_rows(out: &str) -> Vec<(String, String, String)> {
    out.lines()
        .skip(1)
        .map(|l| {
            let cells: Vec<&str> = l
                .split("   ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect();
            (
                cells[0].to_string(),
                cells[1].to_string(),
                cells.get(2).unwrap_or(&"").to_string(),
            )
        })
        .collect()
}

/// Applies pgsnap's CRDs, and the chart's ServiceAccount and RBAC (rendered by
/// `helm template`), as an administrator would before installing the operator.
pub fn install_chart_rbac() {
    // Tests of one binary start operators side by side; one install is enough and two
    // concurrent server-side applies of the CRDs can conflict.
    static INSTALLED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return;
    }
    *installed = true;
    cluster_shell(&format!(
        "kubectl apply --server-side --force-conflicts -f crds/ >/dev/null; \
         kubectl wait --for condition=Established --timeout=30s -f crds/ >/dev/null; \
         kubectl create namespace {OPERATOR_NAMESPACE} --dry-run=client -o yaml | kubectl apply -f - >/dev/null; \
         helm template {RELEASE} charts/pgsnap --namespace {OPERATOR_NAMESPACE} --kube-version 1.34.0 \
           --show-only templates/serviceaccount.yaml --show-only templates/rbac.yaml | kubectl apply -f - >/dev/null"
    ));
}

/// Whether the operator's ServiceAccount (the chart's RBAC) may `verb` `resource` (core
/// group) in `namespace`, as the API server's authorizer says.
pub async fn operator_may(client: &Client, verb: &str, resource: &str, namespace: &str) -> bool {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!(
                "system:serviceaccount:{OPERATOR_NAMESPACE}:{RELEASE}"
            )),
            groups: Some(vec!["system:serviceaccounts".into()]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                resource: Some(resource.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("a SubjectAccessReview")
        .status
        .is_some_and(|s| s.allowed)
}

pub struct Operator {
    child: Child,
    pub metrics_port: u16,
    log: PathBuf,
    /// The namespace of `--namespace`, whose pgsnap objects go before the operator does.
    namespace: Option<String>,
}

/// The product's binary, `target/debug/pgsnap` (`target/$PGSNAP_PROFILE/pgsnap`).
pub fn pgsnap_binary() -> PathBuf {
    // Benchmarks measure a release build: `PGSNAP_PROFILE=release`.
    let profile = std::env::var("PGSNAP_PROFILE").unwrap_or_else(|_| "debug".into());
    let binary = target_dir().join(profile).join("pgsnap");
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build -p pgsnap` first (make test does)",
        binary.display()
    );
    binary
}

impl Operator {
    /// An operator for one test's namespace alone, without leader election, so tests running
    /// side by side never share one.
    pub async fn for_test(cluster: &crate::Cluster) -> Operator {
        Operator::start(
            &cluster.client,
            &[
                "--leader-election=false",
                &format!("--namespace={}", cluster.namespace),
            ],
        )
        .await
    }

    /// Starts `target/debug/pgsnap run` (built by `cargo build -p pgsnap` before the tests)
    /// with the chart's RBAC and no other right.
    pub async fn start(client: &Client, args: &[&str]) -> Operator {
        install_chart_rbac();
        let token = Api::<ServiceAccount>::namespaced(client.clone(), OPERATOR_NAMESPACE)
            .create_token_request(
                RELEASE,
                &PostParams::default(),
                &TokenRequest {
                    spec: TokenRequestSpec {
                        expiration_seconds: Some(3600),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .expect("a token for the operator's ServiceAccount")
            .status
            .expect("token status")
            .token;
        let dir = cluster_dir().join("operator");
        std::fs::create_dir_all(&dir).expect("operator dir");
        let port = free_port();
        let kubeconfig = dir.join(format!("kubeconfig-{port}"));
        std::fs::write(&kubeconfig, service_account_kubeconfig(&token)).expect("write kubeconfig");
        let log = dir.join(format!("operator-{port}.log"));
        let child = Command::new(pgsnap_binary())
            .arg("run")
            .arg(format!("--metrics-addr=127.0.0.1:{port}"))
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", OPERATOR_NAMESPACE)
            .env("POD_NAME", format!("pgsnap-e2e-{port}"))
            .env("PGSNAP_LOG_LEVEL", "info,pgsnap=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("operator log"))
            .spawn()
            .expect("start pgsnap run");
        let namespace = args
            .iter()
            .find_map(|a| a.strip_prefix("--namespace="))
            .map(str::to_string);
        let operator = Operator {
            child,
            metrics_port: port,
            log,
            namespace,
        };
        operator.wait_ready().await;
        operator
    }

    async fn wait_ready(&self) {
        for _ in 0..300 {
            if self.get("/readyz").await.is_some_and(|b| b == "ready") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the operator did not become ready in 30s; its log:\n{}",
            self.log_tail()
        );
    }

    async fn get(&self, path: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response.split_once("\r\n\r\n")?.1.to_string())
    }

    /// The Prometheus exposition of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.unwrap_or_default()
    }

    /// Waits (10 s at most) until `/metrics` holds every line of `series`: the operator counts
    /// a result just after writing it to status, where a test sees it first. Panics with the
    /// exposition otherwise.
    pub async fn expect_metrics(&self, series: &[&str]) {
        let mut metrics = String::new();
        for _ in 0..50 {
            metrics = self.metrics().await;
            if series.iter().all(|s| metrics.lines().any(|l| l == *s)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let missing: Vec<_> = series
            .iter()
            .filter(|s| !metrics.lines().any(|l| l == **s))
            .collect();
        panic!("no {missing:?} in /metrics:\n{metrics}");
    }

    /// Kills the operator at once, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as Kubernetes stops a pod; returns whether it exited 0 within `grace`.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let exited = self.wait_exit(grace);
        if exited.is_none() {
            self.kill();
        }
        exited.is_some_and(|s| s.success())
    }

    /// How the process exited, if it did within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Whether this replica runs the controllers now (`pgsnap_leader`).
    pub async fn leading(&self) -> bool {
        self.metrics().await.lines().any(|l| l == "pgsnap_leader 1")
    }

    /// Waits until this replica leads; returns how long that took.
    pub async fn wait_leading(&self, within: Duration) -> Duration {
        let since = std::time::Instant::now();
        while !self.leading().await {
            assert!(
                since.elapsed() < within,
                "the replica did not lead within {within:?}; its log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        since.elapsed()
    }

    /// SIGSTOP: the process freezes with every socket open, as a hung node or a stopped
    /// container does; [`Operator::resume`] thaws it.
    pub fn suspend(&self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    pub fn resume(&self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }

    /// Where the operator logs (text format).
    pub fn log_path(&self) -> &std::path::Path {
        &self.log
    }

    /// The operator's resident set size, MiB.
    pub fn rss_mib(&self) -> f64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- operator log tail ---\n{}", self.log_tail());
        }
        // Backups and Restores carry finalizers only a running operator removes: delete them
        // while it still runs, or the test's namespace would stay Terminating for good.
        if let (Some(ns), Ok(None)) = (&self.namespace, self.child.try_wait()) {
            let _ = Command::new("bash")
                .arg("-c")
                .arg(format!(
                    "eval \"$({}/e2e/cluster env)\"; kubectl -n {ns} delete backups.pgsnap.io,restores.pgsnap.io --all --timeout=60s",
                    repo_root().display()
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        self.kill();
    }
}

/// The API server's URL from the administrator's kubeconfig (the cluster may have moved to
/// other ports when the default ones were taken).
fn api_server_url() -> String {
    let path = std::env::var_os("KUBECONFIG")
        .map(PathBuf::from)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| cluster_dir().join("kubeconfig"));
    let config = kube::config::Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    config
        .clusters
        .into_iter()
        .find_map(|c| c.cluster?.server)
        .unwrap_or_else(|| panic!("{} names no API server", path.display()))
}

fn service_account_kubeconfig(token: &str) -> String {
    let ca = cluster_dir().join("pki/ca.crt");
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
         users:\n- name: pgsnap\n  user:\n    token: {token}\ncontexts:\n- name: pgsnap\n  context: {{cluster: e2e, user: pgsnap}}\ncurrent-context: pgsnap\n",
        api_server_url(),
        ca.display()
    )
}
