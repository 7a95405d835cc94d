//! `node-agent entrypoint postgres --bin DIR --major N -- ARGS...`: the official `postgres`
//! image's docker-entrypoint.sh, in Rust, run inside the container's sandbox.
//!
//! Same contract as the image: POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB / PGDATA /
//! POSTGRES_INITDB_ARGS / POSTGRES_INITDB_WALDIR / POSTGRES_HOST_AUTH_METHOD, initdb on an
//! empty PGDATA, scripts from /docker-entrypoint-initdb.d, arguments starting with `-` go
//! to `postgres`, and as root it drops to the `postgres` user (uid 999) like `gosu`; the
//! server listens on every address of the pod (the image's `listen_addresses = '*'`).

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the official image's server puts its socket (its Debian build's default; ours
/// defaults to /tmp, so the entrypoint says it).
pub const SOCKET_DIR: &str = "/var/run/postgresql";

/// The uid and gid of `postgres` in the official image.
pub const POSTGRES_UID: u32 = 999;

#[derive(Debug, thiserror::Error)]
pub enum EntrypointError {
    #[error("usage: node-agent entrypoint postgres --bin DIR --major N -- ARGS...")]
    Usage,
    #[error(
        "Database is uninitialized and superuser password is not specified.\n       \
         You must specify POSTGRES_PASSWORD to a non-empty value for the superuser."
    )]
    NoPassword,
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0} failed with {1}")]
    Step(String, std::process::ExitStatus),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EntrypointError {
    let what = what.into();
    move |source| EntrypointError::Io { what, source }
}

struct Options {
    bin: PathBuf,
    major: u32,
    args: Vec<String>,
}

fn parse(args: &[String]) -> Result<Options, EntrypointError> {
    let mut it = args.iter();
    if it.next().map(String::as_str) != Some("postgres") {
        return Err(EntrypointError::Usage);
    }
    let (mut bin, mut major) = (None, None);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bin" => bin = it.next().map(PathBuf::from),
            "--major" => major = it.next().and_then(|m| m.parse().ok()),
            "--" => break,
            _ => return Err(EntrypointError::Usage),
        }
    }
    let mut args: Vec<String> = it.cloned().collect();
    // The image's rule: no arguments means `postgres`; options alone are postgres's options.
    if args.first().is_none_or(|a| a.starts_with('-')) {
        args.insert(0, "postgres".into());
    }
    Ok(Options {
        bin: bin.ok_or(EntrypointError::Usage)?,
        major: major.ok_or(EntrypointError::Usage)?,
        args,
    })
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Runs the entrypoint; returns only on failure (on success it has exec'd `postgres`).
pub fn run(args: &[String]) -> EntrypointError {
    match parse(args).and_then(|o| start(&o)) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn start(o: &Options) -> Result<std::convert::Infallible, EntrypointError> {
    if o.args[0] != "postgres" {
        // `docker run postgres bash`: the image runs any other program as given.
        return Err(io(format!("exec {}", o.args[0]))(
            Command::new(&o.args[0]).args(&o.args[1..]).exec(),
        ));
    }
    let pgdata = PathBuf::from(env("PGDATA").unwrap_or_else(|| "/var/lib/postgresql/data".into()));
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        become_postgres(&pgdata)?;
    } else {
        // As the image does for a non-root user: best effort, the directory may be read-only.
        std::fs::create_dir_all(&pgdata).ok();
        std::fs::set_permissions(&pgdata, std::fs::Permissions::from_mode(0o700)).ok();
    }
    if !pgdata.join("PG_VERSION").exists() {
        init_database(o, &pgdata)?;
    }
    let postgres = o.bin.join("postgres");
    // First, so the container's own arguments still win.
    let socket = format!("unix_socket_directories={SOCKET_DIR}");
    Err(io(format!("exec {}", postgres.display()))(
        Command::new(&postgres)
            .args(["-c", &socket])
            .args(&o.args[1..])
            .exec(),
    ))
}

/// The image's root path: own PGDATA and drop to uid/gid 999 (its `gosu postgres`).
fn become_postgres(pgdata: &Path) -> Result<(), EntrypointError> {
    std::fs::create_dir_all(pgdata).map_err(io(format!("creating {}", pgdata.display())))?;
    chown_tree(pgdata)?;
    std::fs::set_permissions(pgdata, std::fs::Permissions::from_mode(0o700))
        .map_err(io("chmod PGDATA"))?;
    if let Some(waldir) = env("POSTGRES_INITDB_WALDIR") {
        std::fs::create_dir_all(&waldir).map_err(io(format!("creating {waldir}")))?;
        chown_tree(Path::new(&waldir))?;
    }
    // SAFETY: plain syscalls; this process is single-threaded.
    unsafe {
        let none: [libc::gid_t; 0] = [];
        if libc::setgroups(0, none.as_ptr()) != 0
            || libc::setgid(POSTGRES_UID) != 0
            || libc::setuid(POSTGRES_UID) != 0
        {
            return Err(io("dropping to the postgres user")(
                std::io::Error::last_os_error(),
            ));
        }
        // Credential changes clear the parent-death signal; keep dying with the agent.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    // SAFETY: single-threaded; the image's postgres user has this home.
    unsafe { std::env::set_var("HOME", "/var/lib/postgresql") };
    Ok(())
}

/// `chown -R 999:999` of what is not owned by postgres yet (the image's `find ... -exec chown`).
fn chown_tree(dir: &Path) -> Result<(), EntrypointError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir).map_err(io(format!("stat {}", dir.display())))?;
    if meta.uid() != POSTGRES_UID {
        std::os::unix::fs::lchown(dir, Some(POSTGRES_UID), Some(POSTGRES_UID))
            .map_err(io(format!("chown {}", dir.display())))?;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir).map_err(io(format!("reading {}", dir.display())))? {
            chown_tree(&entry.map_err(io("readdir"))?.path())?;
        }
    }
    Ok(())
}

/// The port the server will listen on: `-c port=N` / `-p N` in the arguments, else PGPORT,
/// else 5432 (the temporary init server uses it too, on a private socket directory).
fn port(args: &[String]) -> String {
    let mut port = env("PGPORT").unwrap_or_else(|| "5432".into());
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        let setting = match a.as_str() {
            "-p" => it.next().cloned(),
            "-c" => it
                .next()
                .and_then(|kv| kv.strip_prefix("port=").map(str::to_owned)),
            _ => a.strip_prefix("--port=").map(str::to_owned),
        };
        if let Some(p) = setting {
            port = p;
        }
    }
    port
}

fn init_database(o: &Options, pgdata: &Path) -> Result<(), EntrypointError> {
    let user = env("POSTGRES_USER").unwrap_or_else(|| "postgres".into());
    let db = env("POSTGRES_DB").unwrap_or_else(|| user.clone());
    let auth = env("POSTGRES_HOST_AUTH_METHOD").unwrap_or_else(|| {
        if o.major >= 14 {
            "scram-sha-256".into()
        } else {
            "md5".into()
        }
    });
    let password = env("POSTGRES_PASSWORD");
    if password.is_none() && auth != "trust" {
        return Err(EntrypointError::NoPassword);
    }
    let scratch = std::env::temp_dir().join(format!("pg-entrypoint-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(io("creating a scratch directory"))?;
    let pwfile = scratch.join("pwfile");
    std::fs::write(&pwfile, password.unwrap_or_default())
        .map_err(io("writing the password file"))?;

    let mut initdb = Command::new(o.bin.join("initdb"));
    initdb
        .arg(format!("--username={user}"))
        .arg(format!("--pwfile={}", pwfile.display()));
    if let Some(waldir) = env("POSTGRES_INITDB_WALDIR") {
        initdb.arg(format!("--waldir={waldir}"));
    }
    initdb.args(
        env("POSTGRES_INITDB_ARGS")
            .unwrap_or_default()
            .split_whitespace(),
    );
    initdb.arg("-D").arg(pgdata);
    step("initdb", &mut initdb)?;
    std::fs::remove_file(&pwfile).ok();

    // The image's postgresql.conf.sample listens everywhere; its pg_setup_hba_conf asks for
    // a password from anywhere but the pod's own loopback.
    let conf = pgdata.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).map_err(io("reading postgresql.conf"))?;
    text.push_str("\nlisten_addresses = '*'\n");
    std::fs::write(&conf, text).map_err(io("writing postgresql.conf"))?;
    let hba = pgdata.join("pg_hba.conf");
    let mut text = std::fs::read_to_string(&hba).map_err(io("reading pg_hba.conf"))?;
    text.push_str(&format!("\nhost all all all {auth}\n"));
    std::fs::write(&hba, text).map_err(io("writing pg_hba.conf"))?;

    // A temporary server on a private socket only, for POSTGRES_DB and the init scripts.
    let port = port(&o.args);
    let socket = scratch.to_string_lossy().into_owned();
    let pg_ctl = o.bin.join("pg_ctl");
    step(
        "starting the temporary server",
        Command::new(&pg_ctl)
            .arg("-D")
            .arg(pgdata)
            .arg("-w")
            .arg("-o")
            .arg(format!(
                "-c listen_addresses='' -c unix_socket_directories='{socket}' -p {port}"
            ))
            .arg("start"),
    )?;
    let psql = |db: &str| {
        let mut c = Command::new("psql");
        c.args([
            "-v",
            "ON_ERROR_STOP=1",
            "--no-psqlrc",
            "--no-password",
            "-h",
            &socket,
            "-p",
            &port,
        ])
        .args(["-U", &user, "-d", db]);
        c
    };
    if db != "postgres" {
        step(
            "creating POSTGRES_DB",
            psql("postgres")
                .arg("-c")
                .arg(format!("CREATE DATABASE \"{db}\"")),
        )?;
    }
    run_init_scripts(
        &|| psql(&db),
        [
            ("PGHOST", &socket),
            ("PGPORT", &port),
            ("PGUSER", &user),
            ("PGDATABASE", &db),
        ],
    )?;
    step(
        "stopping the temporary server",
        Command::new(&pg_ctl)
            .arg("-D")
            .arg(pgdata)
            .args(["-m", "fast", "-w", "stop"]),
    )?;
    std::fs::remove_dir_all(&scratch).ok();
    eprintln!("PostgreSQL init process complete; ready for start up.");
    Ok(())
}

/// `/docker-entrypoint-initdb.d`: `*.sql` through psql, `*.sh` through sh, in name order.
fn run_init_scripts(
    psql: &dyn Fn() -> Command,
    env: [(&str, &String); 4],
) -> Result<(), EntrypointError> {
    let Ok(dir) = std::fs::read_dir("/docker-entrypoint-initdb.d") else {
        return Ok(());
    };
    let mut files: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for f in files {
        let name = f.to_string_lossy().into_owned();
        if name.ends_with(".sql") {
            eprintln!("running {name}");
            step(&name, psql().arg("-f").arg(&f))?;
        } else if name.ends_with(".sh") {
            eprintln!("running {name}");
            let mut sh = Command::new("sh");
            sh.arg(&f).envs(
                env.iter()
                    .map(|(k, v)| (OsString::from(k), OsString::from(v.as_str()))),
            );
            step(&name, &mut sh)?;
        } else {
            eprintln!("ignoring {name}");
        }
    }
    Ok(())
}

fn step(what: &str, cmd: &mut Command) -> Result<(), EntrypointError> {
    let status = cmd.status().map_err(io(what.to_owned()))?;
    if status.success() {
        Ok(())
    } else {
        Err(EntrypointError::Step(what.into(), status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn options_alone_are_postgres_options() {
        let o = parse(&s(&[
            "postgres",
            "--bin",
            "/b",
            "--major",
            "16",
            "--",
            "-c",
            "port=5433",
        ]))
        .unwrap();
        assert_eq!(o.args, s(&["postgres", "-c", "port=5433"]));
        let o = parse(&s(&["postgres", "--bin", "/b", "--major", "16", "--"])).unwrap();
        assert_eq!(o.args, s(&["postgres"]));
        let o = parse(&s(&[
            "postgres", "--bin", "/b", "--major", "9", "--", "bash", "-c", "x",
        ]))
        .unwrap();
        assert_eq!(o.args[0], "bash");
    }

    #[test]
    fn port_comes_from_the_arguments() {
        assert_eq!(
            port(&s(&["postgres", "-c", "port=6000", "-c", "x=y"])),
            "6000"
        );
        assert_eq!(port(&s(&["postgres", "-p", "6001"])), "6001");
    }
}
