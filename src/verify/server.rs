//! `pgsnap verify-server`: the checks of a Verification, run beside the temporary PostgreSQL
//! in its pod. The server listens on no address, only on a Unix socket in a directory the
//! two containers share, where its `pg_hba.conf` (the Verification's) trusts every role: the
//! checker needs no password, and nothing outside the pod, a port-forward included, reaches
//! the restored data. What it found goes to the termination message, which the controller
//! reads.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, NoTls};

use crate::api::verification::{Checked, SqlCheck, VerificationError};
use crate::postgres::Lsn;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A role of the backed-up server, and a database it connects to (the Backup's).
    #[arg(long)]
    pub user: String,
    #[arg(long, default_value = "postgres")]
    pub database: String,
    /// The directory of the server's Unix socket.
    #[arg(long)]
    pub socket_dir: PathBuf,
    /// What the restored server must be: the Backup's system identifier...
    #[arg(long)]
    pub system_identifier: String,
    /// ...the timeline it was taken on (the restored server promotes onto a later one)...
    #[arg(long)]
    pub timeline: u32,
    /// ...and where it ended: recovery must have gone at least this far.
    #[arg(long)]
    pub stop_lsn: Lsn,
    /// amcheck's heapallindexed (PostgreSQL 11+).
    #[arg(long)]
    pub heap_all_indexed: bool,
    /// The user's SQL checks, as JSON (the Verification's `spec.checks`).
    #[arg(long, default_value = "[]")]
    pub checks: String,
    /// How long the server may take to start and recover.
    #[arg(long, default_value = "25m")]
    pub recovery_timeout: crate::api::Duration,
    #[arg(long, default_value = "/dev/termination-log")]
    pub termination_message_path: PathBuf,
}

/// What the checker reports: the termination message, read by the controller.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub recovery_seconds: Option<f64>,
    pub checks_seconds: Option<f64>,
    pub checked: Option<Checked>,
    /// The first failure; none when everything passed.
    pub failure: Option<VerificationError>,
}

/// A termination message holds 4096 bytes; a failure's message is cut so that its JSON,
/// every character escaped at worst, still fits with the rest of the report.
const MAX_MESSAGE: usize = 500;
// Escaped at worst six bytes a character, the report still fits a termination message.
const _: () = assert!(6 * MAX_MESSAGE + 1000 < 4096);

fn failure(reason: &str, message: impl Into<String>) -> VerificationError {
    let mut message: String = message.into();
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    VerificationError {
        reason: reason.into(),
        message,
    }
}

/// Runs the checks and writes the report; the exit code: 0 passed, 1 a check failed.
pub async fn main(args: Args) -> i32 {
    let report = run(&args).await;
    let text = serde_json::to_string(&report).unwrap_or_default();
    println!("{text}");
    if let Err(e) = std::fs::write(&args.termination_message_path, &text) {
        eprintln!(
            "verify-server: writing {}: {e}",
            args.termination_message_path.display()
        );
    }
    i32::from(report.failure.is_some())
}

async fn run(args: &Args) -> Report {
    let mut report = Report {
        recovery_seconds: None,
        checks_seconds: None,
        checked: None,
        failure: None,
    };
    let t0 = Instant::now();
    let first = match promoted(args).await {
        Ok(client) => client,
        Err(f) => {
            report.failure = Some(f);
            return report;
        }
    };
    report.recovery_seconds = Some(t0.elapsed().as_secs_f64());
    let t1 = Instant::now();
    let mut checked = Checked::default();
    let result = check(args, &first, &mut checked).await;
    report.checks_seconds = Some(t1.elapsed().as_secs_f64());
    report.checked = Some(checked);
    report.failure = result.err();
    report
}

async fn connect(args: &Args, user: &str, database: &str) -> Result<Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(&args.socket_dir)
        .user(user)
        .dbname(database)
        .application_name("pgsnap-verify")
        // Over what a database or role sets (ALTER DATABASE ... SET): a timeout or a
        // read-only default there must not read as corruption.
        .options(
            "-c statement_timeout=0 -c lock_timeout=0 -c idle_in_transaction_session_timeout=0 \
             -c default_transaction_read_only=off -c synchronous_commit=local",
        )
        .connect_timeout(Duration::from_secs(5));
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A session once the server is up and out of recovery, which it leaves by promoting when
/// it reached the backup's end.
async fn promoted(args: &Args) -> Result<Client, VerificationError> {
    let deadline = Instant::now() + args.recovery_timeout.0;
    let mut last = String::from("not tried");
    while Instant::now() < deadline {
        match connect(args, &args.user, &args.database).await {
            Ok(client) => match client.query_one("select pg_is_in_recovery()", &[]).await {
                Ok(row) if !row.get::<_, bool>(0) => return Ok(client),
                Ok(_) => last = "still in recovery".into(),
                Err(e) => last = db_message(&e),
            },
            Err(e) => last = db_message(&e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(failure(
        "RecoveryTimeout",
        format!(
            "the restored server was not out of recovery after {:?}: {last}",
            args.recovery_timeout.0
        ),
    ))
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// Every check, stopping at the first failure.
async fn check(
    args: &Args,
    first: &Client,
    checked: &mut Checked,
) -> Result<(), VerificationError> {
    let sql_error = |what: &str, e: tokio_postgres::Error| {
        failure("CheckError", format!("{what}: {}", db_message(&e)))
    };
    // The role the backup used need not read everything: a superuser does.
    let superuser: String = first
        .query_one(
            "select rolname::text from pg_roles where rolsuper and rolcanlogin order by oid limit 1",
            &[],
        )
        .await
        .map_err(|e| sql_error("finding a superuser", e))?
        .get(0);
    let admin = connect(args, &superuser, &args.database)
        .await
        .map_err(|e| sql_error("connecting as a superuser", e))?;
    let major: i32 = admin
        .query_one(
            "select current_setting('server_version_num')::int / 10000",
            &[],
        )
        .await
        .map_err(|e| sql_error("server_version_num", e))?
        .get(0);
    identity(args, &admin, checked).await?;

    let databases: Vec<String> = admin
        .query(
            // An invalid database (a DROP DATABASE cut short, 15.4+) takes no connection.
            "select datname::text from pg_database where datallowconn and datconnlimit <> -2 order by 1",
            &[],
        )
        .await
        .map_err(|e| sql_error("listing databases", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for database in &databases {
        let db = connect(args, &superuser, database)
            .await
            .map_err(|e| sql_error(&format!("connecting to database {database}"), e))?;
        let schema = amcheck(&db, database).await?;
        indexes(args, &db, &schema, database, major, checked).await?;
        if major >= 14 {
            tables(&db, &schema, database, checked).await?;
        }
        checked.databases += 1;
    }
    let checks: Vec<SqlCheck> = serde_json::from_str(&args.checks)
        .map_err(|e| failure("CheckError", format!("--checks: {e}")))?;
    for c in &checks {
        let db = connect(args, &superuser, &c.database).await.map_err(|e| {
            sql_error(
                &format!("check {}: connecting to {}", c.name, c.database),
                e,
            )
        })?;
        let holds = db
            .query_one(c.sql.as_str(), &[])
            .await
            .and_then(|row| row.try_get::<_, bool>(0));
        match holds {
            Ok(true) => checked.sql_checks += 1,
            Ok(false) => {
                return Err(failure(
                    "SqlCheckFailed",
                    format!("check {} returned false: {}", c.name, c.sql),
                ));
            }
            // Only the SQLSTATE: a message can quote the data (a value that did not cast),
            // and this one goes into status and Events.
            Err(e) => {
                let code = e.code().map_or("none", |c| c.code());
                return Err(failure(
                    "SqlCheckFailed",
                    format!(
                        "check {} (one row, one boolean) failed with SQLSTATE {code}",
                        c.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The restored server is the backed-up one, promoted onto a new timeline that branched off
/// the backup's at or after its end.
async fn identity(
    args: &Args,
    admin: &Client,
    checked: &mut Checked,
) -> Result<(), VerificationError> {
    let row = admin
        .query_one(
            "select system_identifier::text, \
                    ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int \
             from pg_control_system()",
            &[],
        )
        .await
        .map_err(|e| {
            failure(
                "CheckError",
                format!("pg_control_system(): {}", db_message(&e)),
            )
        })?;
    let (system_identifier, timeline): (String, i32) = (row.get(0), row.get(1));
    checked.system_identifier = system_identifier.clone();
    checked.timeline = u32::try_from(timeline).unwrap_or_default();
    if system_identifier != args.system_identifier {
        return Err(failure(
            "WrongServer",
            format!(
                "the restored server's system identifier is {system_identifier}, the backup's {}",
                args.system_identifier
            ),
        ));
    }
    let history = format!("pg_wal/{timeline:08X}.history");
    let text: String = admin
        .query_one("select pg_read_file($1)", &[&history])
        .await
        .map_err(|e| {
            failure(
                "NotPromoted",
                format!(
                    "timeline {timeline} has no history file ({history}: {}): the server did not promote out of the backup's timeline {}",
                    db_message(&e),
                    args.timeline
                ),
            )
        })?
        .get(0);
    match branch_point(&text, args.timeline) {
        Some(at) if at >= args.stop_lsn => Ok(()),
        Some(at) => Err(failure(
            "RecoveryShort",
            format!(
                "recovery left timeline {} at {at}, before the backup's end {}",
                args.timeline, args.stop_lsn
            ),
        )),
        None => Err(failure(
            "NotPromoted",
            format!(
                "timeline {timeline} does not branch off the backup's timeline {}: {history} reads {text:?}",
                args.timeline
            ),
        )),
    }
}

/// Where a timeline history file says `parent` was left.
pub fn branch_point(history: &str, parent: u32) -> Option<Lsn> {
    history.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let tli: u32 = fields.next()?.parse().ok()?;
        let lsn: Lsn = fields.next()?.parse().ok()?;
        (tli == parent).then_some(lsn)
    })
}

/// amcheck in the database (the copy is thrown away), current, and its schema, which the
/// checks call it in whatever the search_path.
async fn amcheck(db: &Client, database: &str) -> Result<String, VerificationError> {
    db.batch_execute("create extension if not exists amcheck; alter extension amcheck update")
        .await
        .map_err(|e| {
            failure(
                "AmcheckUnavailable",
                format!(
                    "database {database}: create extension amcheck: {} (the image needs PostgreSQL's contrib modules)",
                    db_message(&e)
                ),
            )
        })?;
    let row = db
        .query_one(
            "select quote_ident(n.nspname::text) from pg_extension e \
             join pg_namespace n on n.oid = e.extnamespace where e.extname = 'amcheck'",
            &[],
        )
        .await
        .map_err(|e| {
            failure(
                "CheckError",
                format!("amcheck's schema: {}", db_message(&e)),
            )
        })?;
    Ok(row.get(0))
}

/// `corrupt` when PostgreSQL says the data is (SQLSTATE data_corrupted, index_corrupted);
/// anything else (a lock, a cancel, a missing function) is no verdict on the backup.
fn corrupt_or_not<'a>(e: &tokio_postgres::Error, corrupt: &'a str) -> &'a str {
    match e.code().map(|c| c.code()) {
        Some("XX001" | "XX002") => corrupt,
        _ => "CheckError",
    }
}

/// amcheck over every valid B-tree index of the database; the first corrupt one fails.
async fn indexes(
    args: &Args,
    db: &Client,
    schema: &str,
    database: &str,
    major: i32,
    checked: &mut Checked,
) -> Result<(), VerificationError> {
    // Leaf indexes only: a partitioned index (relkind I) holds no data and amcheck refuses it.
    let list = db
        .query(
            "select c.oid::regclass::text from pg_index i \
             join pg_class c on c.oid = i.indexrelid \
             join pg_am a on a.oid = c.relam \
             where a.amname = 'btree' and c.relkind = 'i' and i.indisvalid and i.indisready \
               and c.relpersistence <> 't' \
             order by 1",
            &[],
        )
        .await
        .map_err(|e| failure("CheckError", format!("listing indexes: {}", db_message(&e))))?;
    // heapallindexed exists from 11.
    let sql = match major >= 11 {
        true => format!("select {schema}.bt_index_check($1::text::regclass, $2)"),
        false => format!("select {schema}.bt_index_check($1::text::regclass)"),
    };
    for row in list {
        let index: String = row.get(0);
        let result = match major >= 11 {
            true => db.execute(&sql, &[&index, &args.heap_all_indexed]).await,
            false => db.execute(&sql, &[&index]).await,
        };
        if let Err(e) = result {
            return Err(failure(
                corrupt_or_not(&e, "CorruptIndex"),
                format!("index {index} in database {database}: {}", db_message(&e)),
            ));
        }
        checked.indexes += 1;
    }
    Ok(())
}

/// verify_heapam over every table of the database and its TOAST (PostgreSQL 14+).
async fn tables(
    db: &Client,
    schema: &str,
    database: &str,
    checked: &mut Checked,
) -> Result<(), VerificationError> {
    let list = db
        .query(
            "select c.oid::regclass::text from pg_class c \
             where c.relkind in ('r', 'm') and c.relpersistence <> 't' order by 1",
            &[],
        )
        .await
        .map_err(|e| failure("CheckError", format!("listing tables: {}", db_message(&e))))?;
    let sql = format!(
        "select blkno::text, coalesce(offnum::text, '-'), msg \
         from {schema}.verify_heapam($1::text::regclass, on_error_stop => true, check_toast => true) \
         limit 1"
    );
    for row in list {
        let table: String = row.get(0);
        match db.query_opt(&sql, &[&table]).await {
            Ok(None) => checked.tables += 1,
            Ok(Some(r)) => {
                let (block, offset, msg): (String, String, String) = (r.get(0), r.get(1), r.get(2));
                return Err(failure(
                    "CorruptTable",
                    format!(
                        "table {table} in database {database}, block {block}, item {offset}: {msg}"
                    ),
                ));
            }
            Err(e) => {
                return Err(failure(
                    corrupt_or_not(&e, "CorruptTable"),
                    format!("table {table} in database {database}: {}", db_message(&e)),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_branch_point_is_where_the_parent_timeline_was_left() {
        let history =
            "1\t0/5000100\tno recovery target specified\n\n2\t0/7000000\tat restore point\n";
        assert_eq!(branch_point(history, 1), Some("0/5000100".parse().unwrap()));
        assert_eq!(branch_point(history, 2), Some("0/7000000".parse().unwrap()));
        assert_eq!(branch_point(history, 3), None);
        assert_eq!(branch_point("", 1), None);
    }

    #[test]
    fn long_messages_are_cut_to_fit_a_termination_message() {
        let f = failure("CorruptIndex", "é".repeat(3000));
        assert!(f.message.len() <= MAX_MESSAGE + 3);
        assert!(f.message.ends_with('…'));
    }
}
