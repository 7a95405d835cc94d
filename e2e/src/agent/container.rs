//! One container: its launch spec (program, env, mounts, user) and its process.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;

use super::env::{Refs, expand, resolve};
use super::images::{Image, postgres_mount_point};
use super::sandbox::{LaunchSpec, Mount};
use super::status::Exit;
use super::{PodError, Shared};

/// A resolved image: what the table says plus, for PostgreSQL, where its binaries are.
#[derive(Debug, Clone)]
pub struct ImageRun {
    pub image: Image,
    pub postgres_dir: Option<PathBuf>,
}

const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The uid/gid a container runs as: container securityContext over the pod's, else root
/// (like an image without USER), the primary group from the pod's passwd view.
pub fn user(pod: &Pod, c: &Container) -> (u32, u32) {
    let psc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let csc = c.security_context.as_ref();
    let uid = csc
        .and_then(|s| s.run_as_user)
        .or(psc.and_then(|s| s.run_as_user))
        .unwrap_or(0) as u32;
    let gid = csc
        .and_then(|s| s.run_as_group)
        .or(psc.and_then(|s| s.run_as_group))
        .map(|g| g as u32);
    (
        uid,
        gid.unwrap_or(if uid == super::entrypoint::POSTGRES_UID {
            uid
        } else {
            0
        }),
    )
}

/// `/etc/passwd` and `/etc/group` as the pod sees them: the host's, plus the image's
/// `postgres` (999) and any runAsUser the host does not know, so `initdb` (which looks its
/// user up) works for any uid without touching the host's files.
pub fn write_identity_files(pod: &Pod, pod_dir: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    let spec = pod.spec.as_ref();
    let all = spec.iter().flat_map(|s| {
        s.init_containers
            .iter()
            .flatten()
            .chain(s.containers.iter())
    });
    let uids: Vec<(u32, u32)> = all.map(|c| user(pod, c)).collect();
    let host_passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let host_group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let has = |text: &str, id: u32| {
        text.lines()
            .any(|l| l.split(':').nth(2) == Some(&id.to_string()))
    };
    // The image's own users come first, so a lookup of 999 finds `postgres` even when the
    // host has another name for that uid.
    let pg = super::entrypoint::POSTGRES_UID;
    let mut passwd = format!("postgres:x:{pg}:{pg}:PostgreSQL:/var/lib/postgresql:/bin/sh\n");
    let mut group = format!("postgres:x:{pg}:\n");
    for (uid, gid) in uids {
        if uid != pg && !has(&host_passwd, uid) && !has(&passwd, uid) {
            passwd.push_str(&format!("user{uid}:x:{uid}:{gid}::/tmp:/bin/sh\n"));
        }
        if gid != pg && !has(&host_group, gid) && !has(&group, gid) {
            group.push_str(&format!("group{gid}:x:{gid}:\n"));
        }
    }
    passwd.push_str(&host_passwd);
    group.push_str(&host_group);
    let etc = pod_dir.join("etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::write(etc.join("passwd"), passwd)?;
    std::fs::write(etc.join("group"), group)?;
    Ok((etc.join("passwd"), etc.join("group")))
}

/// Where a container's termination message is kept on the node.
pub fn termination_file(pod_dir: &Path, container: &str) -> PathBuf {
    pod_dir.join(format!("{container}.termination-log"))
}

/// Where a container's launch spec is kept on the node (what an exec runs in).
pub fn spec_file(pod_dir: &Path, container: &str) -> PathBuf {
    pod_dir.join(format!("{container}.json"))
}

/// The log of one start of a container, like the kubelet's
/// `/var/log/pods/<ns>_<pod>_<uid>/<container>/<restart>.log`: stdout and stderr of that
/// instance only, so `kubectl logs --previous` finds the one before.
pub fn log_file(pod_dir: &Path, container: &str, instance: u32) -> PathBuf {
    pod_dir
        .join("logs")
        .join(container)
        .join(format!("{instance}.log"))
}

/// The instance number of the next start of a container: one past the last log there is,
/// so a pod started again after an agent restart never appends to an older instance's log.
pub fn next_instance(pod_dir: &Path, container: &str) -> u32 {
    std::fs::read_dir(pod_dir.join("logs").join(container))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".log")?
                .parse::<u32>()
                .ok()
        })
        .max()
        .map_or(0, |n| n + 1)
}

/// The kubelet's limits for a termination message and its fallback from the log.
const MAX_MESSAGE_BYTES: usize = 4096;
const FALLBACK_LOG_LINES: usize = 80;
const FALLBACK_LOG_BYTES: usize = 2048;

/// The message of a finished container: its termination-log file, else (with the policy
/// FallbackToLogsOnError and a failure) the tail of its log (`log`, this instance's).
pub fn termination_message(
    pod_dir: &Path,
    c: &Container,
    exit_code: i32,
    log: &Path,
) -> Option<String> {
    let tail = |text: &str, max: usize| {
        let mut start = text.len().saturating_sub(max);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_owned()
    };
    let written = std::fs::read_to_string(termination_file(pod_dir, &c.name)).unwrap_or_default();
    if !written.is_empty() {
        return Some(tail(&written, MAX_MESSAGE_BYTES));
    }
    if exit_code == 0 || c.termination_message_policy.as_deref() != Some("FallbackToLogsOnError") {
        return None;
    }
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let last = lines[lines.len().saturating_sub(FALLBACK_LOG_LINES)..].join("\n");
    Some(tail(&last, FALLBACK_LOG_BYTES)).filter(|m| !m.is_empty())
}

/// Builds the launch spec of a container (without starting it).
pub async fn launch_spec(
    shared: &Shared,
    pod: &Pod,
    c: &Container,
    run: &ImageRun,
    volumes: &HashMap<String, PathBuf>,
    pod_dir: &Path,
    refs: &Refs,
) -> Result<LaunchSpec, PodError> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let mut env: Vec<(String, String)> = vec![("HOSTNAME".into(), name.clone())];
    let path = match run.image {
        Image::Postgres { major } => {
            env.push(("PGDATA".into(), "/var/lib/postgresql/data".into()));
            // The image uses en_US.utf8; hosts reliably have only C.UTF-8 (same encoding).
            env.push(("LANG".into(), "C.UTF-8".into()));
            format!(
                "{}/bin:{SYSTEM_PATH}",
                postgres_mount_point(major).display()
            )
        }
        _ => SYSTEM_PATH.into(),
    };
    env.push(("PATH".into(), path));
    // As a runtime does from the image's passwd: root's home, the postgres user's, else /.
    let home = match user(pod, c).0 {
        0 => "/root",
        super::entrypoint::POSTGRES_UID => "/var/lib/postgresql",
        _ => "/",
    };
    env.push(("HOME".into(), home.into()));
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
    // The `kubernetes` Service: its ClusterIP in a pod's own network (the agent relays it),
    // the API server itself on the host's.
    let host = if host_network {
        shared.api_host.clone()
    } else {
        super::network::SERVICE_IP.to_string()
    };
    let port = &shared.api_port;
    env.extend([
        ("KUBERNETES_SERVICE_HOST".to_string(), host.clone()),
        ("KUBERNETES_SERVICE_PORT".to_string(), port.clone()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".to_string(), port.clone()),
        (
            "KUBERNETES_PORT".to_string(),
            format!("tcp://{host}:{port}"),
        ),
    ]);
    for (k, v) in resolve(pod, c, refs).await? {
        env.retain(|(n, _)| *n != k);
        env.push((k, v));
    }
    let lookup = |n: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
    };
    let command: Vec<String> = c
        .command
        .iter()
        .flatten()
        .map(|s| expand(s, &lookup))
        .collect();
    let args: Vec<String> = c
        .args
        .iter()
        .flatten()
        .map(|s| expand(s, &lookup))
        .collect();
    let argv = match run.image {
        Image::Postgres { major } if command.is_empty() => {
            let bin = postgres_mount_point(major).join("bin");
            let mut v = vec![
                shared.agent_exe.display().to_string(),
                "entrypoint".into(),
                "postgres".into(),
            ];
            v.extend([
                "--bin".into(),
                bin.display().to_string(),
                "--major".into(),
                major.to_string(),
                "--".into(),
            ]);
            v.extend(args);
            v
        }
        Image::Pgsnap if command.is_empty() => {
            std::iter::once(shared.pgsnap_bin.display().to_string())
                .chain(args)
                .collect()
        }
        Image::Pgsnap
            if matches!(
                command[0].as_str(),
                "pgsnap" | "/pgsnap" | "/usr/local/bin/pgsnap" | "/usr/bin/pgsnap"
            ) =>
        {
            std::iter::once(shared.pgsnap_bin.display().to_string())
                .chain(command[1..].iter().cloned())
                .chain(args)
                .collect()
        }
        Image::Shell if command.is_empty() && args.is_empty() => vec!["sh".into()],
        _ if command.is_empty() => args,
        _ => command.into_iter().chain(args).collect(),
    };

    let mut mounts = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let source = volumes.get(&m.name).ok_or_else(|| {
            PodError::Config(format!("volumeMount {}: no volume of that name", m.name))
        })?;
        let source = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => {
                let p = source.join(sub);
                if !p.exists() {
                    // The kubelet creates a missing subPath as a directory.
                    std::fs::create_dir_all(&p)
                        .map_err(|e| PodError::Volume(format!("subPath {sub}: {e}")))?;
                }
                p
            }
            None => source.clone(),
        };
        mounts.push(Mount {
            source,
            target: m.mount_path.clone().into(),
            read_only: m.read_only.unwrap_or(false),
        });
    }
    if let Image::Postgres { .. } = run.image {
        // The image's socket directory, the container's own and fresh at each start as its
        // writable layer is: every server listens on 5432, so their sockets and lock files
        // (`.s.PGSQL.5432`) must not meet. Not a private /tmp: the host's files are the image
        // here, and the agent's own binaries may live under /tmp.
        let run_dir = pod_dir.join(format!("{}.run", c.name));
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir)
            .and_then(|()| {
                std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o3777))
            })
            .map_err(|e| PodError::Launch(format!("{}: {e}", run_dir.display())))?;
        mounts.push(Mount {
            source: run_dir,
            target: super::entrypoint::SOCKET_DIR.into(),
            read_only: false,
        });
    }
    // Parents before children, so a volume mounted inside another one stays visible.
    mounts.sort_by_key(|m| m.target.components().count());
    // The termination message file, fresh for each start, writable by any user (kubelet's).
    let termination = termination_file(pod_dir, &c.name);
    std::fs::write(&termination, b"")
        .and_then(|()| {
            std::fs::set_permissions(&termination, std::fs::Permissions::from_mode(0o666))
        })
        .map_err(|e| PodError::Launch(format!("{}: {e}", termination.display())))?;
    let termination_path = c.termination_message_path.clone();
    mounts.push(Mount {
        source: termination,
        target: termination_path
            .unwrap_or_else(|| "/dev/termination-log".into())
            .into(),
        read_only: false,
    });
    let (passwd, group) = write_identity_files(pod, pod_dir)
        .map_err(|e| PodError::Launch(format!("/etc/passwd: {e}")))?;
    mounts.push(Mount {
        source: passwd,
        target: "/etc/passwd".into(),
        read_only: true,
    });
    mounts.push(Mount {
        source: group,
        target: "/etc/group".into(),
        read_only: true,
    });
    if let (Image::Postgres { major }, Some(dir)) = (run.image, &run.postgres_dir) {
        mounts.push(Mount {
            source: dir.clone(),
            target: postgres_mount_point(major),
            read_only: true,
        });
    }

    let (uid, gid) = user(pod, c);
    let psc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let mut groups: Vec<u32> = psc
        .and_then(|s| s.supplemental_groups.clone())
        .unwrap_or_default()
        .iter()
        .map(|g| *g as u32)
        .collect();
    groups.extend(psc.and_then(|s| s.fs_group).map(|g| g as u32));
    let hostname = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .unwrap_or(name);
    Ok(LaunchSpec {
        argv,
        env,
        working_dir: c.working_dir.clone().map(PathBuf::from),
        uid,
        gid,
        supplementary_groups: groups,
        mounts,
        hostname: hostname.chars().take(64).collect(),
        netns: (!host_network)
            .then(|| super::env::pod_ip(pod).parse().ok())
            .flatten()
            .map(|ip| shared.network.netns_of(ip)),
    })
}

/// How to stop a running container: the image's stop signal, then SIGKILL after `grace`.
#[derive(Debug, Clone, Copy)]
pub struct Stop {
    pub grace: Duration,
}

fn signal_group(pgid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; a vanished group is ESRCH, ignored.
    unsafe { libc::kill(-(pgid as libc::pid_t), sig) };
}

/// Where the standard streams of a sandboxed process go.
pub enum Io<'a> {
    /// stdout and stderr appended to a log file, no stdin (a container).
    Log(&'a Path),
    /// Nothing in, nothing out (an exec probe).
    Null,
    /// Pipes for the streams asked for, the rest null (`kubectl exec`).
    Pipes {
        stdin: bool,
        stdout: bool,
        stderr: bool,
    },
    /// All three on this terminal (the slave side of a pty), which becomes the process's
    /// controlling terminal in a session of its own (`kubectl exec -t`).
    Tty(std::os::fd::OwnedFd),
}

/// Starts the sandbox for `spec`, in a process group of its own (its pid).
fn spawn(
    shared: &Shared,
    spec: &LaunchSpec,
    spec_file: &Path,
    io: Io,
) -> std::io::Result<tokio::process::Child> {
    // Owner-only: the spec holds the container's environment, Secret values included.
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(spec_file)?;
    file.write_all(&serde_json::to_vec_pretty(spec)?)?;
    drop(file);
    let pipe = |wanted: bool| {
        if wanted {
            Stdio::piped()
        } else {
            Stdio::null()
        }
    };
    let tty = matches!(io, Io::Tty(_));
    let (stdin, stdout, stderr) = match io {
        Io::Log(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            (Stdio::null(), Stdio::from(f.try_clone()?), Stdio::from(f))
        }
        Io::Null => (Stdio::null(), Stdio::null(), Stdio::null()),
        Io::Pipes {
            stdin,
            stdout,
            stderr,
        } => (pipe(stdin), pipe(stdout), pipe(stderr)),
        Io::Tty(slave) => (
            Stdio::from(slave.try_clone()?),
            Stdio::from(slave.try_clone()?),
            Stdio::from(slave),
        ),
    };
    let mut cmd = tokio::process::Command::new(&shared.agent_exe);
    cmd.arg("sandbox")
        .arg(spec_file)
        .env_clear()
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    // Its own process group: stop and kill reach every process of the container. A
    // terminal's process gets a session (and so a group) of its own below instead.
    if !tty {
        cmd.process_group(0);
    }
    // SAFETY: setsid, ioctl and prctl are async-signal-safe. The container dies with the
    // agent (and with the runtime thread that forked it, which lives as long as the agent).
    unsafe {
        cmd.pre_exec(move || {
            if tty && (libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0) {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    };
    cmd.spawn()
}

/// Starts `argv` in a container's sandbox: the container's launch spec (mounts, environment,
/// user, working directory) with another command. The one way exec probes and `kubectl exec`
/// run a command in a container. `spec_file` is where the exec's spec is written.
pub fn spawn_exec(
    shared: &Shared,
    container: &LaunchSpec,
    argv: Vec<String>,
    spec_file: &Path,
    io: Io,
) -> std::io::Result<tokio::process::Child> {
    let spec = LaunchSpec {
        argv,
        ..container.clone()
    };
    spawn(shared, &spec, spec_file, io)
}

/// A started container process.
pub struct Running {
    child: tokio::process::Child,
    pgid: u32,
    pub started: Timestamp,
    /// Which start of the container this is (`log_file`).
    pub instance: u32,
}

/// Starts a container's process (in its sandbox, logging to `log_file(.., instance)`).
pub fn start(
    shared: &Shared,
    spec: &LaunchSpec,
    pod_dir: &Path,
    container: &str,
    instance: u32,
) -> Result<Running, PodError> {
    let started = Timestamp::now();
    let log = log_file(pod_dir, container, instance);
    let child = spawn(shared, spec, &spec_file(pod_dir, container), Io::Log(&log))
        .map_err(|e| PodError::Launch(format!("starting the sandbox: {e}")))?;
    let pgid = child.id().unwrap_or_default();
    shared
        .groups
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(pgid);
    Ok(Running {
        child,
        pgid,
        started,
        instance,
    })
}

impl Running {
    /// Waits for the process to end, or stops it (stop signal, then SIGKILL after the
    /// grace period) when `stop` fires.
    pub async fn finish(
        mut self,
        shared: &Shared,
        stop_signal: libc::c_int,
        stop: &mut watch::Receiver<Option<Stop>>,
    ) -> Exit {
        let status = tokio::select! {
            s = self.child.wait() => s,
            Ok(grace) = async { stop.wait_for(Option::is_some).await.map(|s| s.map_or(Duration::ZERO, |s| s.grace)) } => {
                signal_group(self.pgid, stop_signal);
                match tokio::time::timeout(grace, self.child.wait()).await {
                    Ok(s) => s,
                    Err(_) => {
                        signal_group(self.pgid, libc::SIGKILL);
                        self.child.wait().await
                    }
                }
            }
        };
        // When a container's main process ends, so does everything else in it.
        signal_group(self.pgid, libc::SIGKILL);
        shared
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.pgid);
        let finished = Timestamp::now();
        use std::os::unix::process::ExitStatusExt;
        match status {
            Ok(s) => Exit {
                instance: self.instance,
                // Like a container runtime: death by signal N is exit code 128+N.
                exit_code: s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
                signal: s.signal(),
                started: self.started,
                finished,
                message: None,
            },
            Err(e) => Exit {
                instance: self.instance,
                exit_code: 128,
                signal: None,
                started: self.started,
                finished,
                message: Some(format!("waiting for the process: {e}")),
            },
        }
    }
}

/// One readiness check. Exec probes run in the container's sandbox (same mounts and user).
pub async fn probe_once(
    shared: &Shared,
    probe: &Probe,
    c: &Container,
    spec: &LaunchSpec,
    spec_file: &Path,
    pod_ip: &str,
) -> bool {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    if let Some(exec) = &probe.exec {
        let argv = exec.command.clone().unwrap_or_default();
        let Ok(mut child) = spawn_exec(shared, spec, argv, spec_file, Io::Null) else {
            return false;
        };
        let pgid = child.id().unwrap_or_default();
        let ok =
            matches!(tokio::time::timeout(timeout, child.wait()).await, Ok(Ok(s)) if s.success());
        signal_group(pgid, libc::SIGKILL);
        return ok;
    }
    let port_of = |port: &IntOrString| match port {
        IntOrString::Int(p) => Some(*p),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port),
    };
    if let Some(tcp) = &probe.tcp_socket {
        let Some(port) = port_of(&tcp.port) else {
            return false;
        };
        let addr = format!("{}:{port}", tcp.host.as_deref().unwrap_or(pod_ip));
        return matches!(
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        );
    }
    if let Some(http) = &probe.http_get {
        let Some(port) = port_of(&http.port) else {
            return false;
        };
        let host = http.host.as_deref().unwrap_or(pod_ip);
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        // HTTPS is not spoken here: a TLS port that accepts connections counts as up.
        let tls = http.scheme.as_deref() == Some("HTTPS");
        let check = http_check(host, port, &path, tls);
        return matches!(tokio::time::timeout(timeout, check).await, Ok(Ok(true)));
    }
    // gRPC probes are not implemented: report ready rather than never.
    true
}

/// The kubelet's HTTP probe: success is a status from 200 to 399.
async fn http_check(host: &str, port: i32, path: &str, tls: bool) -> std::io::Result<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(format!("{host}:{port}")).await?;
    if tls {
        return Ok(true);
    }
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.34\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = [0u8; 16];
    let n = stream.read(&mut head).await?;
    // "HTTP/1.x NNN ..."
    let status = std::str::from_utf8(&head[..n])
        .ok()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|code| code.parse::<u16>().ok());
    Ok(status.is_some_and(|code| (200..400).contains(&code)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server(answer: &'static str) -> i32 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(answer.as_bytes()).await;
        });
        port as i32
    }

    #[tokio::test]
    async fn http_probes_accept_2xx_and_3xx_only() {
        let ok = server("HTTP/1.1 204 No Content\r\n\r\n").await;
        assert!(
            http_check("127.0.0.1", ok, "/healthz", false)
                .await
                .unwrap()
        );
        let bad = server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        assert!(
            !http_check("127.0.0.1", bad, "/healthz", false)
                .await
                .unwrap()
        );
    }

    #[test]
    fn termination_message_falls_back_to_the_log_tail() {
        let dir = std::env::temp_dir().join(format!("node-agent-term-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Container {
            name: "c".into(),
            ..Default::default()
        };
        let log = log_file(&dir, "c", 1);
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        std::fs::write(log_file(&dir, "c", 0), "from the previous instance\n").unwrap();
        std::fs::write(&log, "a\nb\n").unwrap();
        assert_eq!(next_instance(&dir, "c"), 2);
        assert_eq!(next_instance(&dir, "other"), 0);
        std::fs::write(termination_file(&dir, "c"), "").unwrap();
        assert_eq!(
            termination_message(&dir, &c, 1, &log),
            None,
            "policy File: no fallback"
        );
        c.termination_message_policy = Some("FallbackToLogsOnError".into());
        assert_eq!(
            termination_message(&dir, &c, 0, &log),
            None,
            "only on failure"
        );
        assert_eq!(
            termination_message(&dir, &c, 1, &log).as_deref(),
            Some("a\nb"),
            "this instance's log only"
        );
        std::fs::write(termination_file(&dir, "c"), "Reason: x").unwrap();
        assert_eq!(
            termination_message(&dir, &c, 1, &log).as_deref(),
            Some("Reason: x")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
