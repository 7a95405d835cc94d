//! The sandbox a container process starts in: `node-agent sandbox <spec.json>`.
//!
//! The agent never sets up namespaces in a `pre_exec` hook: `unshare(CLONE_NEWNS)` is refused
//! in a multi-threaded process (the tokio runtime) and only async-signal-safe code may run
//! between fork and exec. Instead it re-executes itself with this subcommand, which is
//! single-threaded, builds the container's view of the file system in a private mount
//! namespace, drops privileges and `execve`s the container's program.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Everything one container process needs; written by the agent as JSON beside the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// Program and arguments, after `$(VAR)` expansion. `argv[0]` is looked up in `PATH`
    /// of `env` when it has no slash, like a container runtime does.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    pub uid: u32,
    pub gid: u32,
    pub supplementary_groups: Vec<u32>,
    /// Bind mounts, applied in order (the agent sorts parents before children).
    pub mounts: Vec<Mount>,
    pub hostname: String,
    /// The pod's network namespace; `None` for `hostNetwork` pods.
    pub netns: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Mount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("reading the launch spec {0}: {1}")]
    Spec(PathBuf, String),
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: std::io::Error,
    },
    #[error("executable file not found in $PATH: {0}")]
    NotFound(String),
}

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Sys { what, source }
}

fn check(rc: libc::c_int, what: impl Into<String>) -> Result<(), SandboxError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(sys(what)(std::io::Error::last_os_error()))
    }
}

fn cstr(s: impl AsRef<OsStr>) -> CString {
    // Paths and arguments from a Pod spec are JSON strings: they hold no NUL byte.
    CString::new(s.as_ref().as_bytes()).unwrap_or_default()
}

/// Runs the sandbox; returns only on failure (the caller reports it and exits 127/126 like
/// a container runtime's "executable not found" / "permission denied").
pub fn run(spec_path: &Path) -> SandboxError {
    match std::fs::read(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<LaunchSpec>(&b).map_err(|e| e.to_string()))
    {
        Ok(spec) => enter(&spec).err().unwrap_or_else(|| exec(&spec)),
        Err(e) => SandboxError::Spec(spec_path.to_owned(), e),
    }
}

/// Sets up namespaces, mounts and credentials (everything before exec).
fn enter(spec: &LaunchSpec) -> Result<(), SandboxError> {
    if let Some(path) = &spec.netns {
        let ns = std::fs::File::open(path).map_err(sys(format!("{}", path.display())))?;
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace file descriptor we hold open.
        check(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            "entering the pod's network namespace",
        )?;
    }
    // SAFETY: plain syscalls on valid, NUL-terminated arguments in a single-threaded process.
    unsafe {
        // A private mount namespace (the volumes) and UTS namespace (the pod's hostname).
        check(
            libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS),
            "unshare",
        )?;
        // Slave, not shared: host mounts still appear here, ours never leak to the host.
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ),
            "making / a slave mount",
        )?;
        let host = cstr(&spec.hostname);
        check(
            libc::sethostname(host.as_ptr(), spec.hostname.len()),
            "sethostname",
        )?;
    }
    for m in &spec.mounts {
        bind(m)?;
    }
    // SAFETY: as above.
    unsafe {
        let groups: Vec<libc::gid_t> = spec.supplementary_groups.clone();
        check(libc::setgroups(groups.len(), groups.as_ptr()), "setgroups")?;
        check(libc::setgid(spec.gid), format!("setgid {}", spec.gid))?;
        check(libc::setuid(spec.uid), format!("setuid {}", spec.uid))?;
        // Credential changes clear the parent-death signal: set it again, so the container
        // dies with the agent even if the agent is killed without a chance to clean up.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL), "prctl")?;
        if libc::getppid() == 1 {
            return Err(sys("the node agent exited")(std::io::Error::other(
                "parent gone",
            )));
        }
    }
    if let Some(dir) = &spec.working_dir {
        std::fs::create_dir_all(dir).ok();
        std::env::set_current_dir(dir).map_err(sys(format!("workingDir {}", dir.display())))?;
    }
    Ok(())
}

/// Bind-mounts one volume. A missing mount point is created (on the host file system: the
/// namespace only changes what is mounted, not the directories that exist).
fn bind(m: &Mount) -> Result<(), SandboxError> {
    let is_dir = std::fs::metadata(&m.source)
        .map_err(sys(format!("volume source {}", m.source.display())))?
        .is_dir();
    if is_dir {
        std::fs::create_dir_all(&m.target)
            .map_err(sys(format!("mount point {}", m.target.display())))?;
    } else if !m.target.exists() {
        if let Some(parent) = m.target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(sys(format!("mount point {}", parent.display())))?;
        }
        std::fs::write(&m.target, b"")
            .map_err(sys(format!("mount point {}", m.target.display())))?;
    }
    let (src, dst) = (cstr(&m.source), cstr(&m.target));
    // SAFETY: valid C strings; single-threaded.
    unsafe {
        check(
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ),
            format!("bind {} at {}", m.source.display(), m.target.display()),
        )?;
        if m.read_only {
            check(
                libc::mount(
                    std::ptr::null(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                    std::ptr::null(),
                ),
                format!("read-only {}", m.target.display()),
            )?;
        }
    }
    Ok(())
}

/// Finds `program` in the container's PATH, like execvp but with the container's env.
pub fn lookup(program: &str, env: &[(String, String)]) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/local/bin:/usr/bin:/bin");
    path.split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn exec(spec: &LaunchSpec) -> SandboxError {
    let Some(program) = spec.argv.first() else {
        return SandboxError::NotFound("(empty command)".into());
    };
    let Some(path) = lookup(program, &spec.env) else {
        return SandboxError::NotFound(program.clone());
    };
    let argv: Vec<CString> = spec.argv.iter().map(cstr).collect();
    let envp: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| cstr(format!("{k}={v}")))
        .collect();
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    let path_c = cstr(&path);
    // SAFETY: NULL-terminated arrays of valid C strings that outlive the call.
    unsafe { libc::execve(path_c.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    sys(format!("exec {}", path.display()))(std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_uses_the_container_path() {
        let env = vec![("PATH".to_string(), "/nonexistent:/bin".to_string())];
        assert_eq!(lookup("sh", &env), Some(PathBuf::from("/bin/sh")));
        assert_eq!(lookup("/x/y", &env), Some(PathBuf::from("/x/y")));
        assert_eq!(lookup("no-such-program-here", &env), None);
    }
}
